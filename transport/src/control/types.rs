//! What the Control service speaks, as the rest of prism sees it: roles,
//! registrations, heartbeats, the cluster's status, NCCL ids and the steps of
//! the data-parallel learner ranks. Converted to and from `prism.v1` here, so
//! that nothing outside this crate needs the wire format.

use crate::redis::QueueDepth;
use prism_core::{Assignment, GroupId, LabeledTrajectory, PolicyVersion};
use prism_proto::ConvertError;
use prism_proto::v1;
use std::collections::BTreeMap;
use std::time::Duration;

/// What a worker process does in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A data-parallel learner rank beside rank 0 (`prism learner-rank`).
    Learner,
    Rollout,
    Reward,
}

impl Role {
    /// Every role, in the order `prism status` lists them.
    pub const ALL: [Role; 3] = [Role::Learner, Role::Rollout, Role::Reward];

    /// `learner`, `rollout` or `reward` (also the prefix of worker ids).
    pub fn name(self) -> &'static str {
        match self {
            Role::Learner => "learner",
            Role::Rollout => "rollout",
            Role::Reward => "reward",
        }
    }

    pub(crate) fn to_wire(self) -> v1::Role {
        match self {
            Role::Learner => v1::Role::Learner,
            Role::Rollout => v1::Role::Rollout,
            Role::Reward => v1::Role::Reward,
        }
    }

    /// The role a wire value names; `None` for unspecified or unknown values.
    pub(crate) fn from_wire(value: i32) -> Option<Role> {
        match v1::Role::try_from(value).ok()? {
            v1::Role::Learner => Some(Role::Learner),
            v1::Role::Rollout => Some(Role::Rollout),
            v1::Role::Reward => Some(Role::Reward),
            v1::Role::Unspecified => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the learner counts a worker in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Alive,
    /// Missed its heartbeats for `dist.dead_after_ms`: its entries are reclaimed.
    Dead,
    /// Said it leaves.
    Left,
}

impl WorkerState {
    /// `alive`, `dead` or `left`.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Alive => "alive",
            WorkerState::Dead => "dead",
            WorkerState::Left => "left",
        }
    }

    fn to_wire(self) -> v1::WorkerState {
        match self {
            WorkerState::Alive => v1::WorkerState::Alive,
            WorkerState::Dead => v1::WorkerState::Dead,
            WorkerState::Left => v1::WorkerState::Left,
        }
    }

    fn from_wire(value: i32) -> Result<WorkerState, ConvertError> {
        match v1::WorkerState::try_from(value) {
            Ok(v1::WorkerState::Alive) => Ok(WorkerState::Alive),
            Ok(v1::WorkerState::Dead) => Ok(WorkerState::Dead),
            Ok(v1::WorkerState::Left) => Ok(WorkerState::Left),
            _ => Err(ConvertError::UnknownEnum { message: "WorkerStatus", field: "state", value }),
        }
    }
}

/// What a worker counts and reports with each heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Items done (trajectories sampled, labelled or trained).
    pub processed: u64,
    /// Items held and not yet handed on.
    pub in_flight: u64,
    pub dropped: u64,
}

impl From<WorkerCounters> for v1::WorkerCounters {
    fn from(c: WorkerCounters) -> Self {
        Self { processed: c.processed, in_flight: c.in_flight, dropped: c.dropped }
    }
}

impl From<v1::WorkerCounters> for WorkerCounters {
    fn from(c: v1::WorkerCounters) -> Self {
        Self { processed: c.processed, in_flight: c.in_flight, dropped: c.dropped }
    }
}

/// What the learner tells a worker that registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// The worker's id for this run, e.g. `rollout-3`.
    pub worker_id: String,
    pub run_id: String,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// The newest published policy version.
    pub policy_version: u64,
    /// A rollout's rank in the weight broadcast, or a learner rank's in the
    /// data-parallel group (0: none).
    pub nccl_rank: u32,
}

impl From<v1::RegisterResponse> for Registration {
    fn from(r: v1::RegisterResponse) -> Self {
        Self {
            worker_id: r.worker_id,
            run_id: r.run_id,
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms),
            policy_version: r.policy_version,
            nccl_rank: r.nccl_rank,
        }
    }
}

/// What the learner answers a heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatReply {
    /// The newest published policy version.
    pub latest_version: u64,
    /// The learner asks workers to stop.
    pub shutdown: bool,
    /// Every worker declared dead so far: their stream entries are to be reclaimed.
    pub dead_workers: Vec<String>,
}

impl From<v1::HeartbeatResponse> for HeartbeatReply {
    fn from(r: v1::HeartbeatResponse) -> Self {
        Self { latest_version: r.latest_version, shutdown: r.shutdown, dead_workers: r.dead_workers }
    }
}

/// One worker as `prism status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub worker_id: String,
    pub role: Role,
    pub name: String,
    pub device: String,
    pub state: WorkerState,
    /// The policy version it holds (from its latest heartbeat).
    pub policy_version: u64,
    /// Versions behind the newest.
    pub lag: u64,
    /// Since its latest heartbeat, in ms.
    pub last_seen_ms: u64,
    pub counters: WorkerCounters,
    /// Items per second, smoothed over heartbeats.
    pub throughput: f64,
    /// Its rank in the weight broadcast or the data-parallel group (0: none).
    pub nccl_rank: u32,
    /// A reward worker's reward health from its latest heartbeat.
    pub reward_health: Option<prism_reward::Health>,
}

/// The cluster as `prism status` shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterStatus {
    pub run_id: String,
    pub policy_version: u64,
    pub step: u64,
    pub total_steps: u64,
    pub workers: Vec<WorkerStatus>,
    pub queues: Vec<QueueDepth>,
    pub trajectories_trained: u64,
    /// Trajectories dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    pub shutting_down: bool,
}

impl From<&ClusterStatus> for v1::ClusterStatus {
    fn from(s: &ClusterStatus) -> Self {
        Self {
            run_id: s.run_id.clone(),
            policy_version: s.policy_version,
            step: s.step,
            total_steps: s.total_steps,
            workers: s
                .workers
                .iter()
                .map(|w| v1::WorkerStatus {
                    worker_id: w.worker_id.clone(),
                    role: w.role.to_wire() as i32,
                    name: w.name.clone(),
                    device: w.device.clone(),
                    state: w.state.to_wire() as i32,
                    policy_version: w.policy_version,
                    lag: w.lag,
                    last_seen_ms: w.last_seen_ms,
                    counters: Some(w.counters.into()),
                    throughput: w.throughput,
                    nccl_rank: w.nccl_rank,
                    reward_health: w.reward_health.as_ref().map(health_to_wire),
                })
                .collect(),
            queues: s.queues.iter().map(|q| v1::QueueDepth { stream: q.stream.clone(), waiting: q.waiting, pending: q.pending }).collect(),
            trajectories_trained: s.trajectories_trained,
            dropped: s.dropped.clone().into_iter().collect(),
            shutting_down: s.shutting_down,
        }
    }
}

impl TryFrom<v1::ClusterStatus> for ClusterStatus {
    type Error = ConvertError;

    fn try_from(s: v1::ClusterStatus) -> Result<Self, ConvertError> {
        let workers = s
            .workers
            .into_iter()
            .map(|w| -> Result<WorkerStatus, ConvertError> {
                Ok(WorkerStatus {
                    role: Role::from_wire(w.role).ok_or(ConvertError::UnknownEnum { message: "WorkerStatus", field: "role", value: w.role })?,
                    state: WorkerState::from_wire(w.state)?,
                    worker_id: w.worker_id,
                    name: w.name,
                    device: w.device,
                    policy_version: w.policy_version,
                    lag: w.lag,
                    last_seen_ms: w.last_seen_ms,
                    counters: w.counters.unwrap_or_default().into(),
                    throughput: w.throughput,
                    nccl_rank: w.nccl_rank,
                    reward_health: w.reward_health.map(health_from_wire),
                })
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        Ok(Self {
            run_id: s.run_id,
            policy_version: s.policy_version,
            step: s.step,
            total_steps: s.total_steps,
            workers,
            queues: s.queues.into_iter().map(|q| QueueDepth { stream: q.stream, waiting: q.waiting, pending: q.pending }).collect(),
            trajectories_trained: s.trajectories_trained,
            dropped: s.dropped.into_iter().collect(),
            shutting_down: s.shutting_down,
        })
    }
}

/// An NCCL communicator's unique id, as rank 0 publishes it for a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclId {
    /// The group it is for, e.g. `learner-dp`.
    pub group: String,
    /// The `ncclUniqueId` bytes.
    pub id: Vec<u8>,
    pub world_size: u32,
}

impl From<v1::NcclId> for NcclId {
    fn from(n: v1::NcclId) -> Self {
        Self { group: n.group, id: n.id, world_size: n.world_size }
    }
}

impl From<&NcclId> for v1::NcclId {
    fn from(n: &NcclId) -> Self {
        Self { group: n.group.clone(), id: n.id.clone(), world_size: n.world_size }
    }
}

/// The groups rank 0 trains one step on, in its order, for the other
/// data-parallel learner ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The step's index, counted from 0 by the ranks.
    pub index: u64,
    /// The policy version the step makes.
    pub version: u64,
    pub groups: Vec<Vec<LabeledTrajectory>>,
}

/// What a learner rank learns when it asks for a step.
#[derive(Debug, Clone, PartialEq)]
pub enum StepPoll {
    Ready(Step),
    /// Not published within the wait: ask again.
    Waiting,
    /// Rank 0 trains no more steps.
    Stopped,
    /// Rank 0 writes a checkpoint now: the ranks send it their optimizer shares.
    Checkpoint { index: u64 },
}

impl TryFrom<v1::StepBatch> for StepPoll {
    type Error = ConvertError;

    fn try_from(b: v1::StepBatch) -> Result<Self, ConvertError> {
        if b.stopped {
            return Ok(StepPoll::Stopped);
        }
        if b.checkpoint {
            return Ok(StepPoll::Checkpoint { index: b.index });
        }
        if b.groups.is_empty() {
            return Ok(StepPoll::Waiting);
        }
        let groups = b
            .groups
            .into_iter()
            .map(|g| g.trajectories.into_iter().map(LabeledTrajectory::try_from).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StepPoll::Ready(Step { index: b.index, version: b.version, groups }))
    }
}

pub(crate) fn assignment_to_wire(a: &Assignment) -> v1::Assignment {
    v1::Assignment { group: a.group.0, prompt: Some((&a.prompt).into()), min_version: a.min_version.0 }
}

pub(crate) fn assignment_from_wire(a: v1::Assignment) -> Result<Assignment, ConvertError> {
    let prompt = a.prompt.ok_or(ConvertError::Missing { message: "Assignment", field: "prompt" })?;
    Ok(Assignment { group: GroupId(a.group), prompt: prompt.into(), min_version: PolicyVersion(a.min_version) })
}

/// Reward health on the wire. `prism-proto` must not know the reward crate,
/// so its conversions live here, at the edge where both meet.
pub(crate) fn health_to_wire(h: &prism_reward::Health) -> v1::RewardHealth {
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
        distill_keep_rate: h.distill_keep_rate,
        implicit_loss: h.implicit_loss,
        implicit_updates: h.implicit_updates,
    }
}

/// Reward health from the wire (every field is optional on both sides).
pub(crate) fn health_from_wire(h: v1::RewardHealth) -> prism_reward::Health {
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
        distill_keep_rate: h.distill_keep_rate,
        implicit_loss: h.implicit_loss,
        implicit_updates: h.implicit_updates,
    }
}
