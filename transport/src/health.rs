//! HTTP liveness and readiness endpoints, for Kubernetes probes and compose
//! health checks: `GET /readyz` answers 200 once the role is ready
//! (connected, registered) and 503 before; `GET /livez` answers 200 while the
//! role's loop makes progress, and 503 once a ready role has not (no
//! [`Health::beat`]) for `dist.stuck_after_ms`, so that a stuck role is
//! restarted; `GET /metrics` answers the role's Prometheus metrics
//! ([`crate::metrics`]).

use super::{Error, Result};
use crate::metrics::{Snapshot, Source};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Whether the role is ready, and when its loop last made progress; cloning
/// shares it.
#[derive(Clone)]
pub struct Health {
    ready: Arc<AtomicBool>,
    /// Milliseconds after `epoch` of the last beat.
    beat: Arc<AtomicU64>,
    epoch: Instant,
    stuck_after: Option<Duration>,
    /// What `/metrics` reads, besides readiness and progress.
    metrics: Arc<std::sync::Mutex<Vec<Source>>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").field("ready", &self.ready).field("stuck_after", &self.stuck_after).finish_non_exhaustive()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Not ready yet; never stuck.
    pub fn new() -> Self {
        Self { ready: Default::default(), beat: Default::default(), epoch: Instant::now(), stuck_after: None, metrics: Default::default() }
    }

    /// Reports the role stuck once ready and without a beat for `after`
    /// (`None`: never).
    pub fn stuck_after(mut self, after: Option<Duration>) -> Self {
        self.stuck_after = after;
        self
    }

    /// Marks the role ready (or not); becoming ready counts as progress.
    pub fn set_ready(&self, ready: bool) {
        self.beat();
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The role's loop made progress (a step, a batch, an answer, a wait
    /// that ended).
    pub fn beat(&self) {
        self.beat.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Adds `source`'s figures to `/metrics`.
    pub fn add_metrics(&self, source: Source) {
        self.metrics.lock().unwrap_or_else(|e| e.into_inner()).push(source);
    }

    /// What `/metrics` answers now: readiness, progress and the role's figures.
    pub fn metrics(&self) -> Snapshot {
        let mut s = Snapshot::default();
        s.gauge("prism_ready", "1 once the role is ready (what /readyz answers).", &[], f64::from(u8::from(self.is_ready())));
        s.gauge("prism_seconds_since_progress", "Seconds since the role's loop last made progress (see /livez).", &[], self.since_beat().as_secs_f64());
        s.gauge("prism_uptime_seconds", "Seconds since the role started.", &[], self.epoch.elapsed().as_secs_f64());
        for source in self.metrics.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            source(&mut s);
        }
        s
    }

    /// Time since the last beat.
    fn since_beat(&self) -> Duration {
        Duration::from_millis((self.epoch.elapsed().as_millis() as u64).saturating_sub(self.beat.load(Ordering::Relaxed)))
    }

    /// How long a ready role has gone without progress, once that is longer
    /// than `stuck_after`.
    pub fn stuck_for(&self) -> Option<Duration> {
        let after = self.stuck_after?;
        let since = self.since_beat();
        (self.is_ready() && since > after).then_some(since)
    }

    /// Serves the endpoints on `listener` until `shutdown` resolves.
    pub async fn serve(self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let (ready, live, metrics) = (self.clone(), self.clone(), self);
        let app = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let text = metrics.metrics().render();
                    async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text) }
                }),
            )
            .route(
                "/livez",
                get(move || {
                    let stuck = live.stuck_for();
                    async move {
                        match stuck {
                            None => (StatusCode::OK, "ok\n".to_string()),
                            Some(d) => (StatusCode::SERVICE_UNAVAILABLE, format!("stuck: no progress for {} s\n", d.as_secs())),
                        }
                    }
                }),
            )
            .route(
                "/readyz",
                get(move || {
                    let ready = ready.is_ready();
                    async move {
                        if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
                    }
                }),
            );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::Serve { what: "health endpoints", addr, reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_string()
    }

    /// `/metrics`: readiness, progress and the role's own figures, as
    /// OpenMetrics text.
    #[tokio::test]
    async fn metrics_are_served_beside_the_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        health.add_metrics(Arc::new(|s: &mut Snapshot| s.counter("prism_worker_processed", "Done.", &[("role", "reward")], 12.0)));
        health.set_ready(true);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(health.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
        assert!(out.contains("content-type: application/openmetrics-text"), "{out}");
        assert!(out.contains("\nprism_ready 1.0\n"), "{out}");
        assert!(out.contains("prism_worker_processed_total{role=\"reward\"} 12.0\n"), "{out}");
        assert!(out.contains("prism_seconds_since_progress "), "{out}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn readiness_follows_the_role_and_liveness_its_progress() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new().stuck_after(Some(Duration::from_millis(300)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(health.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        assert_eq!(get(addr, "/livez").await, "HTTP/1.0 200 OK");
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.0 503 Service Unavailable");
        // Not ready yet (a warm start): not stuck, however long it takes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(get(addr, "/livez").await, "HTTP/1.0 200 OK");
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.0 200 OK");
        // Beating: alive.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            health.beat();
            assert_eq!(get(addr, "/livez").await, "HTTP/1.0 200 OK");
        }
        // No progress past stuck_after: 503, until it beats again.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(get(addr, "/livez").await, "HTTP/1.0 503 Service Unavailable");
        assert!(health.stuck_for().unwrap() > Duration::from_millis(300));
        health.beat();
        assert_eq!(get(addr, "/livez").await, "HTTP/1.0 200 OK");
        assert_eq!(get(addr, "/nope").await, "HTTP/1.0 404 Not Found");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        // Without stuck_after it never reports stuck.
        let h = Health::new();
        h.set_ready(true);
        assert_eq!(h.stuck_for(), None);
    }
}
