//! HTTP liveness and readiness endpoints, for Kubernetes probes and compose
//! health checks: `GET /livez` answers 200 while the process runs, `GET /readyz`
//! 200 once the role is ready (connected, registered) and 503 before.

use super::{Error, Result};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the role is ready; cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Not ready yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the role ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Serves the endpoints on `listener` until `shutdown` resolves.
    pub async fn serve(self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let ready = self.ready.clone();
        let app = Router::new().route("/livez", get(|| async { "ok\n" })).route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
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

    #[tokio::test]
    async fn readiness_follows_the_role_and_liveness_is_always_ok() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(health.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        assert_eq!(get(addr, "/livez").await, "HTTP/1.0 200 OK");
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.0 503 Service Unavailable");
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await, "HTTP/1.0 200 OK");
        assert_eq!(get(addr, "/nope").await, "HTTP/1.0 404 Not Found");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
