//! The learner's side of Control: the cluster's state (workers, ranks,
//! progress, the current step of the learner ranks), shared by the gRPC
//! service and the learner that updates it.

use super::types::{ClusterStatus, NcclId, Role, WorkerCounters, WorkerState, WorkerStatus};
use crate::redis::QueueDepth;
use prism_core::Assignment;
use prism_proto::v1;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// Where the learner's prompts come from, for the `GetWork` and `Delivered`
/// RPCs (the learner process backs it with its PromptSource), and who hears
/// that a rollout worker died (its leased prompts are handed out again).
#[tonic::async_trait]
pub trait WorkSource: Send + Sync + 'static {
    /// Up to `max` assignments for `worker`, waiting up to `wait` for one to be
    /// issuable: `Some(empty)` = none yet, `None` = the run stopped.
    async fn get_work(&self, worker: &str, max: usize, wait: Duration) -> Option<Vec<Assignment>>;
    /// `worker` put `groups` (`trajectories` trajectories, `tokens` tokens,
    /// generated in `generate_s` seconds) on the sampled stream.
    fn delivered(&self, worker: &str, groups: &[u64], trajectories: u64, tokens: u64, generate_s: f64);
    /// `worker` was declared dead or left.
    fn worker_failed(&self, worker: &str);
}

impl std::fmt::Debug for dyn WorkSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkSource")
    }
}

/// One registered worker, as the learner sees it.
#[derive(Debug, Clone)]
pub(super) struct Worker {
    pub role: Role,
    pub name: String,
    pub device: String,
    pub state: WorkerState,
    pub policy_version: u64,
    pub last_seen: Instant,
    pub counters: WorkerCounters,
    /// Items per second, smoothed over heartbeats.
    pub throughput: f64,
    /// Rank in the learner's NCCL weight broadcast, or a learner rank's in
    /// the data-parallel group (0: none).
    pub nccl_rank: u32,
    /// A reward worker's reward health from its latest heartbeat.
    pub reward_health: Option<prism_reward::Health>,
}

/// The step the data-parallel learner ranks are to train.
#[derive(Debug, Default)]
pub(super) struct Steps {
    /// Index of the next step published.
    pub next: u64,
    /// The newest published step, encoded once for every rank that fetches it.
    pub current: Option<Arc<v1::StepBatch>>,
    /// Rank 0 trains no more steps.
    pub stopped: bool,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub run_id: String,
    pub heartbeat: Duration,
    pub dead_after: Duration,
    pub next_id: u64,
    /// Tells this learner's worker ids from a restarted learner's: ids end in
    /// it (`rollout-2-3fa9c0`), so a worker still heartbeating under an id
    /// the learner before the restart gave is told it is gone, never taken for
    /// another worker given the same number.
    pub incarnation: String,
    pub workers: BTreeMap<String, Worker>,
    /// Every worker ever declared dead, in order.
    pub dead: Vec<String>,
    pub policy_version: u64,
    pub step: u64,
    pub total_steps: u64,
    pub trained: u64,
    pub dropped: BTreeMap<String, u64>,
    pub queues: Vec<QueueDepth>,
    pub nccl_ids: HashMap<String, NcclId>,
    /// Ranks of the weight broadcast still to hand to rollouts (`dist.weights
    /// = "nccl"`), lowest first; empty otherwise.
    pub nccl_ranks: VecDeque<u32>,
    /// Data-parallel learner ranks still to hand out (`dist.learner_ranks > 1`).
    pub learner_ranks: VecDeque<u32>,
    pub learner_world: u64,
    pub steps: Steps,
    pub work: Option<Arc<dyn WorkSource>>,
}

impl Inner {
    /// Marks workers silent for longer than `dead_after` dead (and tells the
    /// work source, so a dead rollout worker's prompts are issued again).
    pub fn sweep(&mut self, now: Instant) {
        for (id, w) in &mut self.workers {
            if w.state == WorkerState::Alive && now.duration_since(w.last_seen) > self.dead_after {
                w.state = WorkerState::Dead;
                self.dead.push(id.clone());
                tracing::warn!(
                    worker_id = %id,
                    role = w.role.name(),
                    name = %w.name,
                    silent_ms = now.duration_since(w.last_seen).as_millis() as u64,
                    "worker missed its heartbeats: marked dead, its entries will be reclaimed"
                );
                if let Some(work) = &self.work {
                    work.worker_failed(id);
                }
            }
        }
    }
}

/// Six hex digits that differ between two starts of a learner: the clock's
/// nanoseconds and the process id, mixed (splitmix64's finalizer).
fn incarnation() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    format!("{:06x}", z & 0xff_ffff)
}

/// The learner's side of Control: the cluster's state, shared by the gRPC
/// service and the learner that updates it. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Control {
    pub(super) inner: Arc<Mutex<Inner>>,
    pub(super) shutdown: Arc<watch::Sender<Option<String>>>,
    pub(super) nccl_published: Arc<Notify>,
    pub(super) step_published: Arc<Notify>,
}

impl Control {
    /// State for run `run_id` with the heartbeat settings of `config`.
    pub fn new(run_id: &str, config: &crate::Config) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                run_id: run_id.to_string(),
                heartbeat: Duration::from_millis(config.heartbeat_ms),
                dead_after: Duration::from_millis(config.dead_after_ms),
                next_id: 0,
                incarnation: incarnation(),
                workers: BTreeMap::new(),
                dead: Vec::new(),
                policy_version: 0,
                step: 0,
                total_steps: 0,
                trained: 0,
                dropped: BTreeMap::new(),
                queues: Vec::new(),
                nccl_ids: HashMap::new(),
                nccl_ranks: if config.weights == crate::WeightTransport::Nccl { (1..=config.nccl_rollouts as u32).collect() } else { Default::default() },
                learner_ranks: (1..config.learner_ranks as u32).collect(),
                learner_world: config.learner_ranks,
                steps: Steps::default(),
                work: None,
            })),
            shutdown: Arc::new(watch::channel(None).0),
            nccl_published: Arc::new(Notify::new()),
            step_published: Arc::new(Notify::new()),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes the NCCL unique id of `group` (the learner's own groups).
    pub fn set_nccl_id(&self, group: &str, id: Vec<u8>, world_size: u32) {
        self.lock().nccl_ids.insert(group.to_string(), NcclId { group: group.to_string(), id, world_size });
        self.nccl_published.notify_waiters();
    }

    /// Hands the data-parallel learner ranks the groups rank 0 trains its next
    /// step on (making policy version `version`), in its order.
    pub fn publish_step(&self, version: u64, groups: &[Vec<prism_core::LabeledTrajectory>]) {
        let mut s = self.lock();
        let batch = v1::StepBatch {
            index: s.steps.next,
            version,
            groups: groups.iter().map(|g| v1::StepGroup { trajectories: g.iter().map(Into::into).collect() }).collect(),
            stopped: false,
            checkpoint: false,
        };
        s.steps.next += 1;
        s.steps.current = Some(Arc::new(batch));
        drop(s);
        self.step_published.notify_waiters();
    }

    /// Tells the data-parallel learner ranks that rank 0 writes a checkpoint
    /// now (after the step it published last): ranks that shard the
    /// optimizer send it their shares. It takes the next step index.
    pub fn publish_checkpoint(&self) {
        let mut s = self.lock();
        let batch = v1::StepBatch { index: s.steps.next, version: s.policy_version, checkpoint: true, ..Default::default() };
        s.steps.next += 1;
        s.steps.current = Some(Arc::new(batch));
        drop(s);
        self.step_published.notify_waiters();
    }

    /// Data-parallel learner ranks held by no live worker any more (their
    /// worker stopped heartbeating or left, and did not register again), as
    /// `(rank, its last worker id)`: rank 0 cannot train another step without them.
    pub fn lost_learner_ranks(&self) -> Vec<(u32, String)> {
        let mut s = self.lock();
        s.sweep(Instant::now());
        let mut ranks: BTreeMap<u32, (bool, String)> = BTreeMap::new();
        for (id, w) in s.workers.iter().filter(|(_, w)| w.role == Role::Learner) {
            let held = ranks.entry(w.nccl_rank).or_insert((false, id.clone()));
            held.0 |= w.state == WorkerState::Alive;
            held.1 = id.clone();
        }
        ranks.into_iter().filter(|(_, (alive, _))| !alive).map(|(rank, (_, id))| (rank, id)).collect()
    }

    /// Rank 0 trains no more steps: the learner ranks leave.
    pub fn stop_steps(&self) {
        self.lock().steps.stopped = true;
        self.step_published.notify_waiters();
    }

    /// Hands out prompts from `work` (until then `GetWork` answers "not ready").
    pub fn set_work_source(&self, work: Arc<dyn WorkSource>) {
        self.lock().work = Some(work);
    }

    /// Records the newest published policy version.
    pub fn set_policy_version(&self, version: u64) {
        self.lock().policy_version = version;
    }

    /// Records training progress.
    pub fn set_progress(&self, step: u64, total_steps: u64, trained: u64) {
        let mut s = self.lock();
        (s.step, s.total_steps, s.trained) = (step, total_steps, trained);
    }

    /// Counts `n` trajectories dropped for `reason`.
    pub fn record_dropped(&self, reason: &str, n: u64) {
        *self.lock().dropped.entry(reason.to_string()).or_default() += n;
    }

    /// Records the streams' depths (shown by `prism status`).
    pub fn set_queues(&self, queues: Vec<QueueDepth>) {
        self.lock().queues = queues;
    }

    /// Asks every worker to stop (they learn it from their next heartbeat).
    pub fn request_shutdown(&self, reason: &str) {
        self.shutdown.send_replace(Some(reason.to_string()));
    }

    /// Resolves with the reason once a shutdown was requested (by the learner
    /// or by a `Shutdown` call).
    pub fn shutdown_requested(&self) -> watch::Receiver<Option<String>> {
        self.shutdown.subscribe()
    }

    /// Marks silent workers dead now and returns every worker declared dead so far.
    pub fn sweep(&self) -> Vec<String> {
        let mut s = self.lock();
        s.sweep(Instant::now());
        s.dead.clone()
    }

    /// Sweeps every heartbeat interval in a background task, so a dead worker
    /// is noticed (and its prompts re-issued) even while no RPC arrives.
    pub fn spawn_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let every = self.lock().heartbeat;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                me.sweep();
            }
        })
    }

    /// The reward health each live reward worker reported with its latest
    /// heartbeat, by worker id (workers without a judge report none).
    pub fn reward_health(&self) -> Vec<(String, prism_reward::Health)> {
        let s = self.lock();
        s.workers
            .iter()
            .filter(|(_, w)| w.role == Role::Reward && w.state == WorkerState::Alive)
            .filter_map(|(id, w)| Some((id.clone(), w.reward_health.clone()?)))
            .collect()
    }

    /// Ids of the workers alive now.
    pub fn alive_workers(&self) -> Vec<String> {
        let mut s = self.lock();
        s.sweep(Instant::now());
        s.workers.iter().filter(|(_, w)| w.state == WorkerState::Alive).map(|(id, _)| id.clone()).collect()
    }

    /// The cluster as `prism status` shows it.
    pub fn status(&self) -> ClusterStatus {
        let mut s = self.lock();
        let now = Instant::now();
        s.sweep(now);
        ClusterStatus {
            run_id: s.run_id.clone(),
            policy_version: s.policy_version,
            step: s.step,
            total_steps: s.total_steps,
            workers: s
                .workers
                .iter()
                .map(|(id, w)| WorkerStatus {
                    worker_id: id.clone(),
                    role: w.role,
                    name: w.name.clone(),
                    device: w.device.clone(),
                    state: w.state,
                    policy_version: w.policy_version,
                    lag: s.policy_version.saturating_sub(w.policy_version),
                    last_seen_ms: now.duration_since(w.last_seen).as_millis() as u64,
                    counters: w.counters,
                    throughput: w.throughput,
                    nccl_rank: w.nccl_rank,
                    reward_health: w.reward_health.clone(),
                })
                .collect(),
            queues: s.queues.clone(),
            trajectories_trained: s.trained,
            dropped: s.dropped.clone(),
            shutting_down: self.shutdown.borrow().is_some(),
        }
    }
}
