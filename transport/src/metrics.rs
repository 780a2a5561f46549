//! Every role's Prometheus metrics, `GET /metrics` on `dist.health_listen`
//! beside `/livez` and `/readyz` (OpenMetrics text, encoded by the
//! `prometheus-client` crate). The figures are read when scraped from what
//! the role already keeps: the learner's from its Control state (what
//! `prism status` shows), a worker's from the counters its heartbeats carry
//! and, for a reward worker, its reward health. Series are named `prism_…`.

use crate::control::{ClusterStatus, Control, Counters, Role, WorkerState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// The figures of one scrape, by series name.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    families: BTreeMap<String, Family>,
}

#[derive(Debug, Clone)]
struct Family {
    help: String,
    counter: bool,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

impl Snapshot {
    fn add(&mut self, name: &str, help: &str, counter: bool, labels: &[(&str, &str)], value: f64) {
        let family = self
            .families
            .entry(name.to_string())
            .or_insert_with(|| Family { help: help.to_string(), counter, samples: Vec::new() });
        family.samples.push((labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), value));
    }

    /// A counter (exposed as `<name>_total`): a count that only grows.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, true, labels, value);
    }

    /// A gauge: a value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.add(name, help, false, labels, value);
    }

    /// The value of series `name` with `labels` (as exposed, counters
    /// without `_total`), if present.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let f = self.families.get(name)?;
        f.samples.iter().find(|(l, _)| l.len() == labels.len() && l.iter().zip(labels).all(|(a, b)| a.0 == b.0 && a.1 == b.1)).map(|(_, v)| *v)
    }

    /// The OpenMetrics text of the snapshot.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, f) in &self.families {
            let kind = if f.counter { MetricType::Counter } else { MetricType::Gauge };
            let mut metric = encoder.encode_descriptor(name, &f.help, None, kind)?;
            if let [(labels, value)] = &f.samples[..] {
                if labels.is_empty() {
                    if f.counter { ConstCounter::new(*value).encode(metric)? } else { ConstGauge::new(*value).encode(metric)? }
                    continue;
                }
            }
            for (labels, value) in &f.samples {
                let series = metric.encode_family(labels)?;
                if f.counter { ConstCounter::new(*value).encode(series)? } else { ConstGauge::new(*value).encode(series)? }
            }
        }
        Ok(())
    }
}

/// Where a role's figures come from at scrape time.
pub type Source = Arc<dyn Fn(&mut Snapshot) + Send + Sync>;

/// The learner's figures: steps, trajectories trained and dropped by reason,
/// queue depths, its workers by role and state with their lag, and the
/// reward workers' judge latency and annotation queues.
pub fn learner(control: Control) -> Source {
    Arc::new(move |s: &mut Snapshot| cluster(&control.status(), s))
}

/// What [`learner`] reads from a [`ClusterStatus`].
pub fn cluster(c: &ClusterStatus, s: &mut Snapshot) {
    s.gauge("prism_policy_version", "The newest policy version published.", &[], c.policy_version as f64);
    s.counter("prism_steps", "Learner steps taken (counting resumed ones).", &[], c.step as f64);
    s.gauge("prism_steps_planned", "train.steps of the run.", &[], c.total_steps as f64);
    s.counter("prism_trajectories_trained", "Trajectories trained on.", &[], c.trajectories_trained as f64);
    for (reason, n) in &c.dropped {
        s.counter("prism_trajectories_dropped", "Trajectories dropped, by reason.", &[("reason", reason)], *n as f64);
    }
    for q in &c.queues {
        let stream = q.stream.rsplit(':').next().unwrap_or(&q.stream);
        s.gauge("prism_queue_waiting", "Stream entries not yet delivered to a consumer.", &[("stream", stream)], q.waiting as f64);
        s.gauge("prism_queue_pending", "Stream entries delivered and not yet acknowledged.", &[("stream", stream)], q.pending as f64);
    }
    let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let mut max_lag: BTreeMap<&str, u64> = BTreeMap::new();
    for w in &c.workers {
        let (role, state) = (w.role.name(), w.state.name());
        *by_state.entry((role, state)).or_default() += 1;
        if w.state == WorkerState::Alive {
            let lag = max_lag.entry(role).or_default();
            *lag = (*lag).max(w.lag);
        }
        if w.role == Role::Reward {
            if let Some(h) = &w.reward_health {
                let worker = w.worker_id.as_str();
                if let Some(l) = h.judge_latency_ms {
                    s.gauge("prism_judge_latency_ms", "A reward worker's judge latency, by quantile.", &[("worker", worker), ("quantile", "0.5")], l.p50);
                    s.gauge("prism_judge_latency_ms", "A reward worker's judge latency, by quantile.", &[("worker", worker), ("quantile", "0.95")], l.p95);
                }
                if let Some(q) = &h.annotation_queue {
                    s.gauge("prism_annotation_queue_depth", "Steps waiting for a reward worker's judge.", &[("worker", worker)], q.depth as f64);
                    s.counter("prism_annotations_shed", "Judge requests a reward worker's full queue shed.", &[("worker", worker)], q.shed as f64);
                }
            }
        }
    }
    for ((role, state), n) in by_state {
        s.gauge("prism_workers", "Workers registered with the learner, by role and state.", &[("role", role), ("state", state)], n as f64);
    }
    for (role, lag) in max_lag {
        s.gauge("prism_worker_lag_max", "The most policy versions a live worker of the role is behind.", &[("role", role)], lag as f64);
    }
}

/// A worker's figures: what it processed (sampled, labeled or trained), what
/// it holds, what failed, the version it holds, its weight fetches and how
/// often it registered.
pub fn worker(role: Role, counters: Arc<Counters>) -> Source {
    Arc::new(move |s: &mut Snapshot| {
        let role = role.name();
        let c = &counters;
        s.counter("prism_worker_processed", "Items the worker finished (trajectories sampled or labeled, steps trained).", &[("role", role)], c.processed.load(Relaxed) as f64);
        s.gauge("prism_worker_in_flight", "Items the worker holds now.", &[("role", role)], c.in_flight.load(Relaxed) as f64);
        s.counter("prism_worker_failed", "Items the worker could not finish (e.g. labels that failed).", &[("role", role)], c.dropped.load(Relaxed) as f64);
        s.gauge("prism_worker_policy_version", "The policy version the worker holds.", &[("role", role)], c.policy_version.load(Relaxed) as f64);
        s.counter("prism_worker_registrations", "Times the worker registered with the learner (more than one: it was declared dead, or the learner restarted).", &[("role", role)], c.registrations.load(Relaxed) as f64);
        s.counter("prism_weight_fetches", "Weight versions the worker loaded.", &[("role", role)], c.weight_fetches.load(Relaxed) as f64);
        s.counter("prism_weight_fetch_seconds", "Time spent fetching and loading weight versions.", &[("role", role)], c.weight_fetch_ms.load(Relaxed) as f64 / 1000.0);
        if let Some(h) = c.health() {
            if let Some(l) = h.judge_latency_ms {
                s.gauge("prism_judge_latency_ms", "The judge's latency, by quantile.", &[("quantile", "0.5")], l.p50);
                s.gauge("prism_judge_latency_ms", "The judge's latency, by quantile.", &[("quantile", "0.95")], l.p95);
            }
            if let Some(q) = &h.annotation_queue {
                s.gauge("prism_annotation_queue_depth", "Steps waiting for the judge.", &[], q.depth as f64);
                s.counter("prism_annotations_shed", "Judge requests the full annotation queue shed.", &[], q.shed as f64);
                s.counter("prism_annotations_judged", "Steps the judge scored in the background.", &[], q.judged as f64);
            }
            if let Some(a) = h.distill_agreement {
                s.gauge("prism_distill_agreement", "The distilled model's agreement with the judge on held-out judged steps.", &[], a);
            }
            if let Some(t) = h.judge_trusted {
                s.gauge("prism_judge_trusted", "1 while the canary gate trusts the judge.", &[], f64::from(u8::from(t)));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ControlClient, WorkerCounters};
    use crate::testing::TestLearner;

    #[test]
    fn a_snapshot_renders_as_openmetrics_text() {
        let mut s = Snapshot::default();
        s.counter("prism_trajectories_dropped", "Dropped.", &[("reason", "stale")], 8.0);
        s.counter("prism_trajectories_dropped", "Dropped.", &[("reason", "invalid")], 4.0);
        s.gauge("prism_ready", "Ready.", &[], 1.0);
        assert_eq!(s.value("prism_trajectories_dropped", &[("reason", "invalid")]), Some(4.0));
        let text = s.render();
        assert!(text.contains("# TYPE prism_trajectories_dropped counter\n"), "{text}");
        assert!(text.contains("prism_trajectories_dropped_total{reason=\"stale\"} 8.0\n"), "{text}");
        assert!(text.contains("prism_trajectories_dropped_total{reason=\"invalid\"} 4.0\n"), "{text}");
        assert!(text.contains("# TYPE prism_ready gauge\nprism_ready 1.0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The learner's figures are what `prism status` reads: progress,
    /// trained and dropped by reason, queues, workers by role and state, lag.
    #[tokio::test]
    async fn the_learners_metrics_are_its_status() {
        let l = TestLearner::start(&Default::default(), Default::default(), None).await;
        l.control.set_policy_version(5);
        l.control.set_progress(5, 10, 120);
        l.control.record_dropped("stale", 8);
        l.control.set_queues(vec![crate::redis::QueueDepth { stream: "prism:r:sampled".into(), waiting: 3, pending: 8 }]);
        let mut c = ControlClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
        let r = c.register(Role::Rollout, "a", "cpu").await.unwrap().worker_id;
        c.heartbeat(&r, 2, WorkerCounters::default()).await.unwrap();
        let w = c.register(Role::Reward, "b", "cpu").await.unwrap().worker_id;
        c.shutdown(&w, "done").await.unwrap();
        let mut s = Snapshot::default();
        learner(l.control.clone())(&mut s);
        assert_eq!(s.value("prism_steps", &[]), Some(5.0));
        assert_eq!(s.value("prism_trajectories_trained", &[]), Some(120.0));
        assert_eq!(s.value("prism_trajectories_dropped", &[("reason", "stale")]), Some(8.0));
        assert_eq!(s.value("prism_queue_pending", &[("stream", "sampled")]), Some(8.0));
        assert_eq!(s.value("prism_workers", &[("role", "rollout"), ("state", "alive")]), Some(1.0));
        assert_eq!(s.value("prism_workers", &[("role", "reward"), ("state", "left")]), Some(1.0));
        assert_eq!(s.value("prism_worker_lag_max", &[("role", "rollout")]), Some(3.0));
    }

    #[test]
    fn a_workers_metrics_are_its_counters() {
        let counters = Arc::new(Counters::default());
        counters.processed.store(64, Relaxed);
        counters.registrations.store(2, Relaxed);
        counters.weight_fetches.store(3, Relaxed);
        counters.weight_fetch_ms.store(1500, Relaxed);
        let mut s = Snapshot::default();
        worker(Role::Rollout, counters)(&mut s);
        assert_eq!(s.value("prism_worker_processed", &[("role", "rollout")]), Some(64.0));
        assert_eq!(s.value("prism_worker_registrations", &[("role", "rollout")]), Some(2.0));
        assert_eq!(s.value("prism_weight_fetch_seconds", &[("role", "rollout")]), Some(1.5));
    }

    /// Every series the shipped Grafana dashboard (k8s/grafana) queries is
    /// one some role serves.
    #[test]
    fn the_dashboard_queries_only_series_the_roles_serve() {
        let health = prism_reward::Health {
            judge_latency_ms: Some(prism_reward::LatencyMs { p50: 1.0, p95: 2.0 }),
            annotation_queue: Some(Default::default()),
            distill_agreement: Some(0.8),
            judge_trusted: Some(true),
            ..Default::default()
        };
        let counters = Arc::new(Counters::default());
        counters.report_health(Arc::new(move || Some(health.clone())));
        let status = ClusterStatus {
            dropped: [("stale".to_string(), 1)].into(),
            queues: vec![crate::redis::QueueDepth { stream: "s".into(), waiting: 0, pending: 0 }],
            workers: vec![crate::control::WorkerStatus {
                worker_id: "rollout-1".into(),
                role: Role::Rollout,
                name: "a".into(),
                device: "cpu".into(),
                state: WorkerState::Alive,
                policy_version: 0,
                lag: 0,
                last_seen_ms: 0,
                counters: Default::default(),
                throughput: 0.0,
                nccl_rank: 0,
                reward_health: None,
            }],
            ..Default::default()
        };
        let mut s = crate::health::Health::new().metrics();
        cluster(&status, &mut s);
        worker(Role::Reward, counters)(&mut s);
        let text = s.render();
        let served: std::collections::BTreeSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/grafana/prism-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for (i, _) in expr.match_indices("prism_") {
                    let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    assert!(served.contains(&name), "{} queries {name}, which no role serves: {served:?}", panel["title"]);
                    queried += 1;
                }
            }
        }
        assert!(queried >= 10, "{queried}");
    }
}
