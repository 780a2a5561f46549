//! The Control service: workers register and heartbeat with the learner, which
//! marks a worker that stays silent for `dist.dead_after_ms` dead (survivors
//! then reclaim its stream entries), answers `prism status`, hands out the NCCL
//! unique ids and ranks, hands data-parallel learner ranks the groups of each
//! step, and tells workers when to stop.

use super::grpc::{self, ClientAuth, Token};
use super::{Error, Result};
use prism_proto::v1;
use prism_proto::v1::control_server::ControlServer;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Where the learner's prompts come from, for the `GetWork` and `Delivered`
/// RPCs (the learner process backs it with its PromptSource), and who hears
/// that a rollout worker died (its leased prompts are handed out again).
#[tonic::async_trait]
pub trait WorkSource: Send + Sync + 'static {
    /// Up to `max` assignments for `worker`, waiting up to `wait` for one to be
    /// issuable: `Some(empty)` = none yet, `None` = the run stopped.
    async fn get_work(&self, worker: &str, max: usize, wait: Duration) -> Option<Vec<v1::Assignment>>;
    /// `worker` put `groups` (`trajectories` trajectories, `tokens` tokens,
    /// generated in `generate_s` seconds) on the sampled stream.
    fn delivered(&self, worker: &str, groups: &[u64], trajectories: u64, tokens: u64, generate_s: f64);
    /// `worker` was declared dead or left.
    fn worker_failed(&self, worker: &str);
}

/// One registered worker, as the learner sees it.
#[derive(Debug, Clone)]
struct Worker {
    role: v1::Role,
    name: String,
    device: String,
    state: v1::WorkerState,
    policy_version: u64,
    last_seen: Instant,
    counters: v1::WorkerCounters,
    /// Items per second, smoothed over heartbeats.
    throughput: f64,
    /// Rank in the learner's NCCL weight broadcast, or a learner rank's in
    /// the data-parallel group (0: none).
    nccl_rank: u32,
    /// A reward worker's reward health from its latest heartbeat.
    reward_health: Option<v1::RewardHealth>,
}

/// The step the data-parallel learner ranks are to train.
#[derive(Debug, Default)]
struct Steps {
    /// Index of the next step published.
    next: u64,
    /// The newest published step.
    current: Option<Arc<v1::StepBatch>>,
    /// Rank 0 trains no more steps.
    stopped: bool,
}

#[derive(Debug)]
struct Inner {
    run_id: String,
    heartbeat: Duration,
    dead_after: Duration,
    next_id: u64,
    workers: BTreeMap<String, Worker>,
    /// Every worker ever declared dead, in order.
    dead: Vec<String>,
    policy_version: u64,
    step: u64,
    total_steps: u64,
    trained: u64,
    dropped: BTreeMap<String, u64>,
    queues: Vec<v1::QueueDepth>,
    nccl_ids: HashMap<String, v1::NcclId>,
    /// Ranks of the weight broadcast still to hand to rollouts (`dist.weights
    /// = "nccl"`), lowest first; empty otherwise.
    nccl_ranks: std::collections::VecDeque<u32>,
    /// Data-parallel learner ranks still to hand out (`dist.learner_ranks > 1`).
    learner_ranks: std::collections::VecDeque<u32>,
    learner_world: u64,
    steps: Steps,
    work: Option<Arc<dyn WorkSource>>,
}

impl std::fmt::Debug for dyn WorkSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkSource")
    }
}

impl Inner {
    /// Marks workers silent for longer than `dead_after` dead (and tells the
    /// work source, so a dead rollout worker's prompts are issued again).
    fn sweep(&mut self, now: Instant) {
        for (id, w) in &mut self.workers {
            if w.state == v1::WorkerState::Alive && now.duration_since(w.last_seen) > self.dead_after {
                w.state = v1::WorkerState::Dead;
                self.dead.push(id.clone());
                tracing::warn!(
                    worker_id = %id,
                    role = w.role.as_str_name(),
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

/// The learner's side of Control: the cluster's state, shared by the gRPC
/// service and the learner that updates it. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Control {
    inner: Arc<Mutex<Inner>>,
    shutdown: Arc<watch::Sender<Option<String>>>,
    nccl_published: Arc<Notify>,
    step_published: Arc<Notify>,
}

impl Control {
    /// State for run `run_id` with the heartbeat settings of `config`.
    pub fn new(run_id: &str, config: &super::Config) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                run_id: run_id.to_string(),
                heartbeat: Duration::from_millis(config.heartbeat_ms),
                dead_after: Duration::from_millis(config.dead_after_ms),
                next_id: 0,
                workers: BTreeMap::new(),
                dead: Vec::new(),
                policy_version: 0,
                step: 0,
                total_steps: 0,
                trained: 0,
                dropped: BTreeMap::new(),
                queues: Vec::new(),
                nccl_ids: HashMap::new(),
                nccl_ranks: if config.weights == "nccl" { (1..=config.nccl_rollouts as u32).collect() } else { Default::default() },
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

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tonic service, refusing requests without `token` when one is set.
    pub fn service(&self, token: Option<Token>) -> InterceptedService<ControlServer<Self>, grpc::Auth> {
        InterceptedService::new(ControlServer::new(self.clone()), grpc::Auth::new(token))
    }

    /// Publishes the NCCL unique id of `group` (the learner's own groups).
    pub fn set_nccl_id(&self, group: &str, id: Vec<u8>, world_size: u32) {
        self.lock().nccl_ids.insert(group.to_string(), v1::NcclId { group: group.to_string(), id, world_size });
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
        };
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
        for (id, w) in s.workers.iter().filter(|(_, w)| w.role == v1::Role::Learner) {
            let held = ranks.entry(w.nccl_rank).or_insert((false, id.clone()));
            held.0 |= w.state == v1::WorkerState::Alive;
            held.1 = id.clone();
        }
        ranks.into_iter().filter(|(_, (alive, _))| !alive).map(|(rank, (_, id))| (rank, id)).collect()
    }

    /// Rank 0 trains no more steps: the learner ranks leave.
    pub fn stop_steps(&self) {
        self.lock().steps.stopped = true;
        self.step_published.notify_waiters();
    }

    /// Hands out prompts from `work` (until then `GetWork` answers UNAVAILABLE).
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
    pub fn set_queues(&self, queues: Vec<super::redis::QueueDepth>) {
        self.lock().queues =
            queues.into_iter().map(|q| v1::QueueDepth { stream: q.stream, waiting: q.waiting, pending: q.pending }).collect();
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
            .filter(|(_, w)| w.role == v1::Role::Reward && w.state == v1::WorkerState::Alive)
            .filter_map(|(id, w)| Some((id.clone(), health_from_wire(w.reward_health?))))
            .collect()
    }

    /// The cluster as `prism status` shows it.
    pub fn status(&self) -> v1::ClusterStatus {
        let mut s = self.lock();
        let now = Instant::now();
        s.sweep(now);
        v1::ClusterStatus {
            run_id: s.run_id.clone(),
            policy_version: s.policy_version,
            step: s.step,
            total_steps: s.total_steps,
            workers: s
                .workers
                .iter()
                .map(|(id, w)| v1::WorkerStatus {
                    worker_id: id.clone(),
                    role: w.role as i32,
                    name: w.name.clone(),
                    device: w.device.clone(),
                    state: w.state as i32,
                    policy_version: w.policy_version,
                    lag: s.policy_version.saturating_sub(w.policy_version),
                    last_seen_ms: now.duration_since(w.last_seen).as_millis() as u64,
                    counters: Some(w.counters),
                    throughput: w.throughput,
                    nccl_rank: w.nccl_rank,
                    reward_health: w.reward_health,
                })
                .collect(),
            queues: s.queues.clone(),
            trajectories_trained: s.trained,
            dropped: s.dropped.clone().into_iter().collect(),
            shutting_down: self.shutdown.borrow().is_some(),
        }
    }
}

#[tonic::async_trait]
impl v1::control_server::Control for Control {
    async fn register(&self, request: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = request.into_inner();
        let role = v1::Role::try_from(r.role).unwrap_or(v1::Role::Unspecified);
        if role == v1::Role::Unspecified {
            return Err(Status::invalid_argument(format!("register: role {} cannot join as a worker", r.role)));
        }
        if self.shutdown.borrow().is_some() {
            return Err(Status::unavailable("register: the run is shutting down"));
        }
        let mut s = self.lock();
        // A worker that registers again keeps the rank it holds.
        let nccl_rank = match role {
            v1::Role::Rollout if r.nccl_rank == 0 => s.nccl_ranks.pop_front().unwrap_or(0),
            v1::Role::Rollout => r.nccl_rank,
            v1::Role::Learner if r.nccl_rank > 0 => r.nccl_rank,
            v1::Role::Learner => match s.learner_ranks.pop_front() {
                Some(rank) => rank,
                None if s.learner_world <= 1 => {
                    return Err(Status::invalid_argument(
                        "register: this run trains on one learner (dist.learner_ranks = 1): a learner rank cannot join",
                    ));
                }
                None => {
                    return Err(Status::resource_exhausted(format!(
                        "register: every data-parallel learner rank (1..{} of dist.learner_ranks = {}) is taken",
                        s.learner_world, s.learner_world
                    )));
                }
            },
            _ => 0,
        };
        s.next_id += 1;
        let role_name = match role {
            v1::Role::Rollout => "rollout",
            v1::Role::Learner => "learner",
            _ => "reward",
        };
        let worker_id = format!("{role_name}-{}", s.next_id);
        tracing::info!(worker_id = %worker_id, name = %r.name, device = %r.device, pid = r.pid, nccl_rank, "worker registered");
        s.workers.insert(
            worker_id.clone(),
            Worker {
                role,
                name: r.name,
                device: r.device,
                state: v1::WorkerState::Alive,
                policy_version: 0,
                last_seen: Instant::now(),
                counters: v1::WorkerCounters::default(),
                throughput: 0.0,
                nccl_rank,
                reward_health: None,
            },
        );
        Ok(Response::new(v1::RegisterResponse {
            worker_id,
            run_id: s.run_id.clone(),
            heartbeat_interval_ms: s.heartbeat.as_millis() as u64,
            policy_version: s.policy_version,
            nccl_rank,
        }))
    }

    async fn heartbeat(&self, request: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let now = Instant::now();
        let mut s = self.lock();
        s.sweep(now);
        let Some(w) = s.workers.get_mut(&r.worker_id) else {
            return Err(Status::not_found(format!("heartbeat: unknown worker {}: register first", r.worker_id)));
        };
        match w.state {
            v1::WorkerState::Alive => {}
            state => {
                return Err(Status::failed_precondition(format!(
                    "heartbeat: worker {} is {}: its entries were handed to others; register again",
                    r.worker_id,
                    state.as_str_name()
                )));
            }
        }
        let counters = r.counters.unwrap_or_default();
        let dt = now.duration_since(w.last_seen).as_secs_f64();
        if dt > 0.0 {
            let rate = counters.processed.saturating_sub(w.counters.processed) as f64 / dt;
            w.throughput = if w.throughput == 0.0 { rate } else { 0.7 * w.throughput + 0.3 * rate };
        }
        w.last_seen = now;
        w.policy_version = r.policy_version;
        w.counters = counters;
        w.reward_health = r.reward_health;
        Ok(Response::new(v1::HeartbeatResponse {
            latest_version: s.policy_version,
            shutdown: self.shutdown.borrow().is_some(),
            dead_workers: s.dead.clone(),
        }))
    }

    async fn get_status(&self, _: Request<v1::GetStatusRequest>) -> Result<Response<v1::ClusterStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn shutdown(&self, request: Request<v1::ShutdownRequest>) -> Result<Response<v1::ShutdownResponse>, Status> {
        let r = request.into_inner();
        if r.worker_id.is_empty() {
            tracing::info!(reason = %r.reason, "shutdown requested over gRPC");
            self.request_shutdown(&r.reason);
        } else {
            let mut s = self.lock();
            if let Some(w) = s.workers.get_mut(&r.worker_id) {
                tracing::info!(worker_id = %r.worker_id, reason = %r.reason, "worker left");
                w.state = v1::WorkerState::Left;
                // Survivors take over whatever it read and did not acknowledge.
                s.dead.push(r.worker_id.clone());
                if let Some(work) = &s.work {
                    work.worker_failed(&r.worker_id);
                }
            }
        }
        Ok(Response::new(v1::ShutdownResponse {}))
    }

    async fn publish_nccl_id(&self, request: Request<v1::NcclId>) -> Result<Response<v1::PublishNcclIdResponse>, Status> {
        let id = request.into_inner();
        if id.id.len() != super::nccl::UNIQUE_ID_BYTES || id.world_size == 0 {
            return Err(Status::invalid_argument(format!(
                "publish NCCL id for {}: want {} bytes and world_size > 0, got {} bytes and world_size {}",
                id.group,
                super::nccl::UNIQUE_ID_BYTES,
                id.id.len(),
                id.world_size
            )));
        }
        self.set_nccl_id(&id.group, id.id, id.world_size);
        Ok(Response::new(v1::PublishNcclIdResponse {}))
    }

    async fn get_work(&self, request: Request<v1::GetWorkRequest>) -> Result<Response<v1::GetWorkResponse>, Status> {
        let r = request.into_inner();
        let work = {
            let s = self.lock();
            match s.workers.get(&r.worker_id).map(|w| w.state) {
                Some(v1::WorkerState::Alive) => {}
                Some(state) => {
                    return Err(Status::failed_precondition(format!(
                        "get work: worker {} is {}; register again",
                        r.worker_id,
                        state.as_str_name()
                    )));
                }
                None => return Err(Status::not_found(format!("get work: unknown worker {}: register first", r.worker_id))),
            }
            s.work.clone().ok_or_else(|| Status::unavailable("get work: the learner is not handing out prompts yet"))?
        };
        if self.shutdown.borrow().is_some() {
            return Ok(Response::new(v1::GetWorkResponse { assignments: vec![], stopped: true }));
        }
        let wait = Duration::from_millis(r.wait_ms.min(60_000));
        Ok(Response::new(match work.get_work(&r.worker_id, r.max.max(1) as usize, wait).await {
            Some(assignments) => v1::GetWorkResponse { assignments, stopped: false },
            None => v1::GetWorkResponse { assignments: vec![], stopped: true },
        }))
    }

    async fn delivered(&self, request: Request<v1::DeliveredRequest>) -> Result<Response<v1::DeliveredResponse>, Status> {
        let r = request.into_inner();
        let work = self.lock().work.clone().ok_or_else(|| Status::unavailable("delivered: the learner has no work source"))?;
        work.delivered(&r.worker_id, &r.groups, r.trajectories, r.tokens, r.generate_s);
        Ok(Response::new(v1::DeliveredResponse {}))
    }

    async fn get_step(&self, request: Request<v1::GetStepRequest>) -> Result<Response<v1::StepBatch>, Status> {
        let r = request.into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.wait_ms.min(60_000));
        loop {
            let notified = self.step_published.notified();
            {
                let s = self.lock();
                match s.workers.get(&r.worker_id).map(|w| (w.role, w.state)) {
                    Some((v1::Role::Learner, _)) => {}
                    Some(_) => return Err(Status::permission_denied(format!("get step: worker {} is not a learner rank", r.worker_id))),
                    None => return Err(Status::not_found(format!("get step: unknown worker {}: register first", r.worker_id))),
                }
                match &s.steps.current {
                    Some(b) if b.index == r.index => return Ok(Response::new((**b).clone())),
                    Some(b) if b.index > r.index => {
                        return Err(Status::failed_precondition(format!(
                            "get step: step {} is gone (rank 0 is at step {}): this learner rank fell behind, and \
                             the ranks' weights have parted",
                            r.index, b.index
                        )));
                    }
                    _ if s.steps.stopped || self.shutdown.borrow().is_some() => {
                        return Ok(Response::new(v1::StepBatch { index: r.index, stopped: true, ..Default::default() }));
                    }
                    _ => {}
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(v1::StepBatch { index: r.index, ..Default::default() }));
            }
        }
    }

    async fn get_nccl_id(&self, request: Request<v1::GetNcclIdRequest>) -> Result<Response<v1::NcclId>, Status> {
        let r = request.into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.wait_ms);
        loop {
            let notified = self.nccl_published.notified();
            if let Some(id) = self.lock().nccl_ids.get(&r.group) {
                return Ok(Response::new(id.clone()));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!("NCCL id of group {} not published within {} ms", r.group, r.wait_ms)));
            }
        }
    }
}

/// A worker's (or `prism status`'s) connection to the learner's Control service.
#[derive(Clone, Debug)]
pub struct ControlClient {
    inner: v1::control_client::ControlClient<InterceptedService<Channel, ClientAuth>>,
    addr: String,
}

impl ControlClient {
    /// Connects to the learner at `grpc.learner`, or `addr` when given.
    pub async fn connect(config: &grpc::Config, addr: Option<&str>, token: Option<&Token>) -> Result<Self> {
        let addr = addr.unwrap_or(&config.learner).to_string();
        let channel = grpc::connect(config, &addr).await?;
        Ok(Self { inner: v1::control_client::ControlClient::with_interceptor(channel, ClientAuth::new(token)), addr })
    }

    fn err(&self, rpc: &'static str) -> impl Fn(Status) -> Error + '_ {
        move |status| Error::Rpc { addr: self.addr.clone(), rpc, status: Box::new(status) }
    }

    /// Joins the run as `role`.
    pub async fn register(&mut self, role: v1::Role, name: &str, device: &str) -> Result<v1::RegisterResponse> {
        self.register_again(role, name, device, 0).await
    }

    /// Registers again after the learner forgot this worker, keeping
    /// `nccl_rank`, the weight-broadcast rank it holds (0: none).
    pub async fn register_again(&mut self, role: v1::Role, name: &str, device: &str, nccl_rank: u32) -> Result<v1::RegisterResponse> {
        let req = v1::RegisterRequest { role: role as i32, name: name.into(), pid: std::process::id(), device: device.into(), nccl_rank };
        let r = self.inner.register(req).await;
        r.map(Response::into_inner).map_err(self.err("Register"))
    }

    /// Reports liveness, the held policy version and counters.
    pub async fn heartbeat(&mut self, worker_id: &str, policy_version: u64, counters: v1::WorkerCounters) -> Result<v1::HeartbeatResponse> {
        self.heartbeat_with_health(worker_id, policy_version, counters, None).await
    }

    /// [`Self::heartbeat`] with a reward worker's reward health.
    pub async fn heartbeat_with_health(
        &mut self,
        worker_id: &str,
        policy_version: u64,
        counters: v1::WorkerCounters,
        reward_health: Option<&prism_reward::Health>,
    ) -> Result<v1::HeartbeatResponse> {
        let req = v1::HeartbeatRequest {
            worker_id: worker_id.into(),
            policy_version,
            counters: Some(counters),
            reward_health: reward_health.map(health_to_wire),
        };
        let r = self.inner.heartbeat(req).await;
        r.map(Response::into_inner).map_err(self.err("Heartbeat"))
    }

    /// The cluster's status.
    pub async fn status(&mut self) -> Result<v1::ClusterStatus> {
        let r = self.inner.get_status(v1::GetStatusRequest {}).await;
        r.map(Response::into_inner).map_err(self.err("GetStatus"))
    }

    /// Stops the run (`worker_id` empty) or leaves it.
    pub async fn shutdown(&mut self, worker_id: &str, reason: &str) -> Result<()> {
        let r = self.inner.shutdown(v1::ShutdownRequest { worker_id: worker_id.into(), reason: reason.into() }).await;
        r.map(|_| ()).map_err(self.err("Shutdown"))
    }

    /// Rank 0: publishes the NCCL unique id of `group`.
    pub async fn publish_nccl_id(&mut self, group: &str, id: Vec<u8>, world_size: u32) -> Result<()> {
        let r = self.inner.publish_nccl_id(v1::NcclId { group: group.into(), id, world_size }).await;
        r.map(|_| ()).map_err(self.err("PublishNcclId"))
    }

    /// Other ranks: waits up to `wait` for rank 0's id of `group`.
    pub async fn get_nccl_id(&mut self, group: &str, wait: Duration) -> Result<v1::NcclId> {
        let req = v1::GetNcclIdRequest { group: group.into(), wait_ms: wait.as_millis() as u64 };
        let r = self.inner.get_nccl_id(req).await;
        r.map(Response::into_inner).map_err(self.err("GetNcclId"))
    }

    /// [`Self::get_nccl_id`], answering `None` when it is not published
    /// within `wait`.
    pub async fn wait_nccl_id(&mut self, group: &str, wait: Duration) -> Result<Option<v1::NcclId>> {
        match self.get_nccl_id(group, wait).await {
            Ok(id) => Ok(Some(id)),
            Err(Error::Rpc { status, .. }) if status.code() == tonic::Code::DeadlineExceeded => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl ControlClient {
    /// Up to `max` prompts for `worker_id`, the learner waiting up to `wait`;
    /// `None` once the run is over.
    pub async fn get_work(&mut self, worker_id: &str, max: usize, wait: Duration) -> Result<Option<Vec<v1::Assignment>>> {
        let req = v1::GetWorkRequest { worker_id: worker_id.into(), max: max as u32, wait_ms: wait.as_millis() as u64 };
        let mut request = Request::new(req);
        // The long poll may take `wait`; leave room beyond the usual deadline.
        request.set_timeout(wait + Duration::from_secs(30));
        let r = self.inner.get_work(request).await.map_err(self.err("GetWork"))?.into_inner();
        Ok(if r.stopped { None } else { Some(r.assignments) })
    }

    /// A learner rank: the groups of step `index`, the learner waiting up to
    /// `wait`; `Ok(None)` while not ready.
    pub async fn get_step(&mut self, worker_id: &str, index: u64, wait: Duration) -> Result<Option<v1::StepBatch>> {
        let req = v1::GetStepRequest { worker_id: worker_id.into(), index, wait_ms: wait.as_millis() as u64 };
        let mut request = Request::new(req);
        request.set_timeout(wait + Duration::from_secs(30));
        let r = self.inner.get_step(request).await.map_err(self.err("GetStep"))?.into_inner();
        Ok((r.stopped || !r.groups.is_empty()).then_some(r))
    }

    /// Reports groups put on the sampled stream.
    pub async fn delivered(&mut self, worker_id: &str, groups: Vec<u64>, trajectories: u64, tokens: u64, generate_s: f64) -> Result<()> {
        let req = v1::DeliveredRequest { worker_id: worker_id.into(), groups, trajectories, tokens, generate_s };
        let r = self.inner.delivered(req).await;
        r.map(|_| ()).map_err(self.err("Delivered"))
    }
}

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
    pub processed: std::sync::atomic::AtomicU64,
    pub in_flight: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
    pub policy_version: std::sync::atomic::AtomicU64,
    health: std::sync::OnceLock<HealthSource>,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters")
            .field("processed", &self.processed)
            .field("in_flight", &self.in_flight)
            .field("dropped", &self.dropped)
            .field("policy_version", &self.policy_version)
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

    fn snapshot(&self) -> (u64, v1::WorkerCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.policy_version.load(Relaxed),
            v1::WorkerCounters {
                processed: self.processed.load(Relaxed),
                in_flight: self.in_flight.load(Relaxed),
                dropped: self.dropped.load(Relaxed),
            },
        )
    }
}

/// Reward health on the wire. `prism-proto` must not know the reward crate,
/// so its conversions live here, at the edge where both meet.
pub fn health_to_wire(h: &prism_reward::Health) -> v1::RewardHealth {
    v1::RewardHealth {
        judge_wait_ms: h.judge_wait_ms,
        judge_latency_ms: h.judge_latency_ms.map(|l| v1::LatencyMs { p50: l.p50, p95: l.p95 }),
        annotation_queue: h.annotation_queue.as_ref().map(|q| v1::AnnotationQueue {
            depth: q.depth,
            capacity: q.capacity,
            busy: q.busy,
            queued: q.queued,
            judged: q.judged,
            shed: q.shed,
            untrusted: q.untrusted,
        }),
        canary_fp_rate: h.canary_fp_rate,
        canary_max_rate: h.canary_max_rate,
        judge_trusted: h.judge_trusted,
        distill_agreement: h.distill_agreement,
        distill_min_agreement: h.distill_min_agreement,
        distill_ready: h.distill_ready,
        judge_budget_refused: h.judge_budget_refused,
    }
}

/// Reward health from the wire (every field is optional on both sides).
pub fn health_from_wire(h: v1::RewardHealth) -> prism_reward::Health {
    prism_reward::Health {
        judge_wait_ms: h.judge_wait_ms,
        judge_latency_ms: h.judge_latency_ms.map(|l| prism_reward::LatencyMs { p50: l.p50, p95: l.p95 }),
        annotation_queue: h.annotation_queue.map(|q| prism_reward::QueueHealth {
            depth: q.depth,
            capacity: q.capacity,
            busy: q.busy,
            queued: q.queued,
            judged: q.judged,
            shed: q.shed,
            untrusted: q.untrusted,
        }),
        canary_fp_rate: h.canary_fp_rate,
        canary_max_rate: h.canary_max_rate,
        judge_trusted: h.judge_trusted,
        distill_agreement: h.distill_agreement,
        distill_min_agreement: h.distill_min_agreement,
        distill_ready: h.distill_ready,
        judge_budget_refused: h.judge_budget_refused,
    }
}

/// Registers as `role` and heartbeats every interval the learner asks for, in a
/// background task, publishing what it learns. A worker declared dead (or
/// forgotten by a restarted learner) registers again.
pub async fn join(
    mut client: ControlClient,
    role: v1::Role,
    name: &str,
    device: &str,
    counters: Arc<Counters>,
) -> Result<(watch::Receiver<Membership>, tokio::task::JoinHandle<()>)> {
    let reg = client.register(role, name, device).await?;
    let interval = Duration::from_millis(reg.heartbeat_interval_ms.max(1));
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
                Err(Error::Rpc { status, .. }) if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {
                    tracing::warn!(worker_id = %worker_id, reason = %status.message(), "registering again");
                    if let Ok(reg) = client.register_again(role, &name, &device, nccl_rank).await {
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

#[cfg(test)]
mod tests;
