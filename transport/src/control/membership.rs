//! A worker's side of membership: register, heartbeat in the background,
//! register again when the learner forgot it, and publish what it learns.

use super::client::ControlClient;
use super::types::{Role, WorkerCounters};
use crate::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::sync::watch;

/// What a worker learns from its heartbeats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Membership {
    /// This worker's id (changes if it had to register again).
    pub worker_id: String,
    /// The newest published policy version.
    pub latest_version: u64,
    /// The learner asked workers to stop.
    pub shutdown: bool,
    /// Workers declared dead: their stream entries are to be reclaimed.
    pub dead_workers: Vec<String>,
    /// The last heartbeat error, if the latest one failed.
    pub error: Option<String>,
    /// This rollout's rank in the learner's weight broadcast (0: none), from
    /// its first registration.
    pub nccl_rank: u32,
}

/// Where a reward worker's heartbeats read its reward health (`None`: nothing
/// to report, e.g. no judge).
pub type HealthSource = Arc<dyn Fn() -> Option<prism_reward::Health> + Send + Sync>;

/// The counters a worker reports; shared between the worker's loop and its
/// heartbeat task.
#[derive(Default)]
pub struct Counters {
    pub processed: AtomicU64,
    pub in_flight: AtomicU64,
    pub dropped: AtomicU64,
    pub policy_version: AtomicU64,
    /// Times it registered with the learner (for its metrics).
    pub registrations: AtomicU64,
    /// Weight versions it loaded, and the time that took in ms (a rollout's
    /// metrics).
    pub weight_fetches: AtomicU64,
    pub weight_fetch_ms: AtomicU64,
    health: std::sync::OnceLock<HealthSource>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("processed", &self.processed)
            .field("in_flight", &self.in_flight)
            .field("dropped", &self.dropped)
            .field("policy_version", &self.policy_version)
            .field("registrations", &self.registrations)
            .field("weight_fetches", &self.weight_fetches)
            .field("reports_health", &self.health.get().is_some())
            .finish()
    }
}

impl Counters {
    /// Sends `source`'s reward health with every heartbeat from now on (a
    /// reward worker; the first source set stays).
    pub fn report_health(&self, source: HealthSource) {
        let _ = self.health.set(source);
    }

    /// The reward health the next heartbeat carries.
    pub fn health(&self) -> Option<prism_reward::Health> {
        self.health.get().and_then(|h| h())
    }

    fn snapshot(&self) -> (u64, WorkerCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.policy_version.load(Relaxed),
            WorkerCounters {
                processed: self.processed.load(Relaxed),
                in_flight: self.in_flight.load(Relaxed),
                dropped: self.dropped.load(Relaxed),
            },
        )
    }
}

/// Registers as `role` and heartbeats every interval the learner asks for, in a
/// background task, publishing what it learns. A worker declared dead (or
/// forgotten by a restarted learner) registers again.
pub async fn join(
    mut client: ControlClient,
    role: Role,
    name: &str,
    device: &str,
    counters: Arc<Counters>,
) -> Result<(watch::Receiver<Membership>, tokio::task::JoinHandle<()>)> {
    let reg = client.register(role, name, device).await?;
    counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let interval = reg.heartbeat_interval.max(Duration::from_millis(1));
    let (tx, rx) = watch::channel(Membership {
        worker_id: reg.worker_id.clone(),
        latest_version: reg.policy_version,
        nccl_rank: reg.nccl_rank,
        ..Default::default()
    });
    let nccl_rank = reg.nccl_rank;
    let (name, device) = (name.to_string(), device.to_string());
    let task = tokio::spawn(async move {
        let mut worker_id = reg.worker_id;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (version, c) = counters.snapshot();
            let health = counters.health();
            match client.heartbeat_with_health(&worker_id, version, c, health.as_ref()).await {
                Ok(r) => {
                    let stop = r.shutdown;
                    tx.send_replace(Membership {
                        worker_id: worker_id.clone(),
                        latest_version: r.latest_version,
                        shutdown: r.shutdown,
                        dead_workers: r.dead_workers,
                        error: None,
                        nccl_rank,
                    });
                    if stop {
                        return;
                    }
                }
                Err(Error::Gone { reason, .. }) => {
                    tracing::warn!(worker_id = %worker_id, reason = %reason, "registering again");
                    if let Ok(reg) = client.register_again(role, &name, &device, nccl_rank).await {
                        counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        worker_id = reg.worker_id;
                        tx.send_modify(|m| m.worker_id = worker_id.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!(worker_id = %worker_id, error = %e, "heartbeat failed");
                    tx.send_modify(|m| m.error = Some(e.to_string()));
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok((rx, task))
}
