//! RewardPool: a router over M reward workers that label trajectories
//! concurrently, and the assembly of labeled trajectories into complete groups.
//!
//! ```text
//! RewardPool (router; supervises its workers)
//!   ├── RewardWorker 0
//!   ├── ...
//!   └── RewardWorker M-1
//! ```
//!
//! Bounded both ways: a group is accepted from a rollout worker only while the
//! pool holds fewer than `capacity` groups (otherwise the reply waits, and so
//! does the worker), and complete groups leave only when the learner asks
//! ([`PoolMsg::TakeGroups`]). A trajectory whose labeling fails (an error, or a
//! worker that panicked) is retried on another worker up to `attempts` times;
//! after that its whole group is dropped and counted.

use crate::backend::{BackendResult, DropReason, Label};
use crate::metrics::MetricsMsg;
use crate::restart::RestartPolicy;
use crate::source::SourceMsg;
use prism_core::{GroupId, LabeledTrajectory, RewardLabel, Trajectory, TrajectoryId};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

/// A group whose G members are all labeled.
#[derive(Debug, Clone)]
pub struct CompleteGroup {
    pub group: GroupId,
    pub trajectories: Vec<LabeledTrajectory>,
}

pub enum PoolMsg {
    /// A rollout worker hands over a sampled group; the reply (`true` =
    /// accepted) waits while the pool is full, and is `false` once stopped.
    SubmitGroup { group: GroupId, trajectories: Vec<Trajectory>, reply: RpcReplyPort<bool> },
    /// The learner takes up to `max` complete groups; the reply waits until one
    /// exists, and is empty once stopped.
    TakeGroups { max: usize, reply: RpcReplyPort<Vec<CompleteGroup>> },
    /// A reward worker finished one trajectory.
    Labeled { worker: usize, trajectory: Box<Trajectory>, result: BackendResult<RewardLabel>, label_s: f64 },
    /// Restart reward worker `i` (after its backoff).
    RespawnWorker(usize),
    /// Stop: reject new groups, answer waiters, and report what is still held.
    Stop(RpcReplyPort<()>),
}

pub struct RewardPool;

pub struct PoolArgs {
    pub labeler: Arc<dyn Label>,
    pub workers: usize,
    /// Most groups held (queued, being labeled, or complete) at once.
    pub capacity: usize,
    /// Tries per trajectory before its group is dropped.
    pub attempts: u32,
    pub restarts: RestartPolicy,
    pub source: ActorRef<SourceMsg>,
    pub metrics: ActorRef<MetricsMsg>,
}

struct Assembly {
    expected: usize,
    labeled: Vec<LabeledTrajectory>,
    pending: usize,
    failed: bool,
}

struct WorkerSlot {
    actor: Option<ActorRef<LabelMsg>>,
    busy: Option<(Trajectory, u32)>,
}

pub struct PoolState {
    args: PoolArgs,
    workers: Vec<WorkerSlot>,
    queue: VecDeque<(Trajectory, u32)>,
    groups: HashMap<GroupId, Assembly>,
    ready: VecDeque<CompleteGroup>,
    held: usize,
    submits: VecDeque<(GroupId, Vec<Trajectory>, RpcReplyPort<bool>)>,
    take: Option<(usize, RpcReplyPort<Vec<CompleteGroup>>)>,
    stopped: bool,
}

impl RewardPool {
    async fn spawn_worker(myself: &ActorRef<PoolMsg>, state: &mut PoolState, i: usize) -> Result<(), ActorProcessingErr> {
        let (actor, _) = Actor::spawn_linked(
            None,
            RewardWorker,
            WorkerArgs { index: i, labeler: state.args.labeler.clone(), pool: myself.clone() },
            myself.get_cell(),
        )
        .await?;
        state.workers[i].actor = Some(actor);
        Ok(())
    }
}

impl PoolState {
    fn accept(&mut self, group: GroupId, trajectories: Vec<Trajectory>) {
        self.held += 1;
        let n = trajectories.len();
        self.groups.insert(group, Assembly { expected: n, labeled: Vec::with_capacity(n), pending: n, failed: false });
        self.queue.extend(trajectories.into_iter().map(|t| (t, 0)));
        let _ = self.args.source.cast(SourceMsg::Delivered(group));
    }

    /// Accepts waiting submissions while there is room.
    fn admit_waiting(&mut self) {
        while self.held < self.args.capacity {
            let Some((group, trajectories, reply)) = self.submits.pop_front() else { break };
            self.accept(group, trajectories);
            if !reply.is_closed() {
                let _ = reply.send(true);
            }
        }
    }

    fn dispatch(&mut self) {
        for (i, slot) in self.workers.iter_mut().enumerate() {
            if slot.busy.is_some() {
                continue;
            }
            let Some(actor) = &slot.actor else { continue };
            let Some((t, attempt)) = self.queue.pop_front() else { return };
            if let Err(e) = actor.cast(LabelMsg::Label(Box::new(t.clone()))) {
                tracing::warn!(worker = i, error = %e, "reward worker unreachable");
                self.queue.push_front((t, attempt));
                continue;
            }
            slot.busy = Some((t, attempt));
        }
    }

    /// One member of `group` is resolved (labeled or given up on).
    fn resolve(&mut self, group: GroupId, labeled: Option<LabeledTrajectory>) {
        let Some(a) = self.groups.get_mut(&group) else { return };
        a.pending -= 1;
        match labeled {
            Some(l) => a.labeled.push(l),
            None => a.failed = true,
        }
        if a.pending > 0 {
            return;
        }
        let a = self.groups.remove(&group).expect("present");
        if a.failed {
            self.held -= 1;
            let _ = self.args.metrics.cast(MetricsMsg::Dropped { reason: DropReason::RewardFailed, trajectories: a.expected as u64 });
            let _ = self.args.source.cast(SourceMsg::GroupsRetired { count: 1, outcomes: Vec::new() });
            self.admit_waiting();
        } else {
            let mut trajectories = a.labeled;
            trajectories.sort_by_key(|l| l.trajectory.sample);
            self.ready.push_back(CompleteGroup { group, trajectories });
            self.serve_take();
        }
    }

    fn serve_take(&mut self) {
        if self.ready.is_empty() && !self.stopped {
            return;
        }
        let Some((max, reply)) = self.take.take() else { return };
        let n = max.min(self.ready.len());
        let groups: Vec<CompleteGroup> = self.ready.drain(..n).collect();
        self.held -= groups.len();
        if reply.is_closed() {
            // The learner went away; keep the groups for its successor.
            self.held += groups.len();
            for g in groups.into_iter().rev() {
                self.ready.push_front(g);
            }
            return;
        }
        let _ = reply.send(groups);
        self.admit_waiting();
    }

    /// A trajectory's labeling failed: retry it, or give up on its group.
    fn failed(&mut self, t: Trajectory, attempt: u32, error: &str) {
        let attempt = attempt + 1;
        if attempt < self.args.attempts && !self.stopped {
            tracing::warn!(trajectory_id = t.id.0, attempt, error, "labeling failed; retrying");
            self.queue.push_front((t, attempt));
        } else {
            tracing::warn!(trajectory_id = t.id.0, attempt, error, "labeling failed; dropping its group");
            self.resolve(t.group, None);
        }
    }

    fn worker_of(&self, cell: &ActorCell) -> Option<usize> {
        self.workers.iter().position(|w| w.actor.as_ref().is_some_and(|a| a.get_id() == cell.get_id()))
    }

    /// Trajectories the pool still holds.
    fn held_trajectories(&self) -> u64 {
        let queued = self.queue.len();
        let labeling = self.workers.iter().filter(|w| w.busy.is_some()).count();
        let labeled: usize = self.groups.values().map(|a| a.labeled.len()).sum();
        let ready: usize = self.ready.iter().map(|g| g.trajectories.len()).sum();
        (queued + labeling + labeled + ready) as u64
    }
}

impl Actor for RewardPool {
    type Msg = PoolMsg;
    type State = PoolState;
    type Arguments = PoolArgs;

    async fn pre_start(&self, myself: ActorRef<PoolMsg>, args: PoolArgs) -> Result<PoolState, ActorProcessingErr> {
        let n = args.workers.max(1);
        let mut state = PoolState {
            args,
            workers: (0..n).map(|_| WorkerSlot { actor: None, busy: None }).collect(),
            queue: VecDeque::new(),
            groups: HashMap::new(),
            ready: VecDeque::new(),
            held: 0,
            submits: VecDeque::new(),
            take: None,
            stopped: false,
        };
        for i in 0..n {
            Self::spawn_worker(&myself, &mut state, i).await?;
        }
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<PoolMsg>, msg: PoolMsg, state: &mut PoolState) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMsg::SubmitGroup { group, trajectories, reply } => {
                if state.stopped {
                    let _ = reply.send(false);
                } else {
                    state.submits.push_back((group, trajectories, reply));
                    state.admit_waiting();
                }
            }
            PoolMsg::TakeGroups { max, reply } => {
                state.take = Some((max.max(1), reply));
                state.serve_take();
            }
            PoolMsg::Labeled { worker, trajectory, result, label_s } => {
                let attempt = state.workers.get_mut(worker).and_then(|w| w.busy.take()).map_or(0, |(_, a)| a);
                match result {
                    Ok(label) => {
                        let _ = state.args.metrics.cast(MetricsMsg::Labeled { count: 1, label_s });
                        let group = trajectory.group;
                        state.resolve(group, Some(LabeledTrajectory { trajectory: *trajectory, label }));
                    }
                    Err(e) => state.failed(*trajectory, attempt, &e.0),
                }
            }
            PoolMsg::RespawnWorker(i) => {
                if !state.stopped {
                    Self::spawn_worker(&myself, state, i).await?;
                }
            }
            PoolMsg::Stop(reply) => {
                state.stopped = true;
                for (_, trajectories, reply) in state.submits.drain(..) {
                    let _ = state.args.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "rollout", trajectories: trajectories.len() as u64 });
                    let _ = reply.send(false);
                }
                state.serve_take();
                let _ = state.args.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "reward", trajectories: state.held_trajectories() });
                state.queue.clear();
                state.groups.clear();
                state.ready.clear();
                for w in &mut state.workers {
                    w.busy = None;
                    if let Some(a) = w.actor.take() {
                        a.stop(None);
                    }
                }
                let _ = reply.send(());
                return Ok(());
            }
        }
        state.dispatch();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PoolMsg>,
        evt: SupervisionEvent,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, error) = evt {
            let Some(i) = state.worker_of(&cell) else { return Ok(()) };
            let name = format!("reward-worker-{i}");
            let error = error.to_string();
            state.workers[i].actor = None;
            tracing::warn!(actor = %name, %error, "reward worker failed");
            let _ = state.args.metrics.cast(MetricsMsg::ActorRestarted { actor: name.clone(), error: error.clone() });
            if let Some((t, attempt)) = state.workers[i].busy.take() {
                state.failed(t, attempt, &error);
            }
            let backoff = state.args.restarts.on_failure(&name, &error, Instant::now())?;
            ractor::time::send_after(backoff, myself.get_cell(), move || PoolMsg::RespawnWorker(i));
            state.dispatch();
        }
        Ok(())
    }
}

/// Labels one trajectory at a time with the shared labeler.
pub struct RewardWorker;

pub struct WorkerArgs {
    index: usize,
    labeler: Arc<dyn Label>,
    pool: ActorRef<PoolMsg>,
}

pub enum LabelMsg {
    Label(Box<Trajectory>),
}

impl Actor for RewardWorker {
    type Msg = LabelMsg;
    type State = WorkerArgs;
    type Arguments = WorkerArgs;

    async fn pre_start(&self, _myself: ActorRef<LabelMsg>, args: WorkerArgs) -> Result<WorkerArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(&self, _myself: ActorRef<LabelMsg>, msg: LabelMsg, state: &mut WorkerArgs) -> Result<(), ActorProcessingErr> {
        let LabelMsg::Label(trajectory) = msg;
        let started = Instant::now();
        let span = tracing::info_span!(
            "label",
            actor = %format!("reward-worker-{}", state.index),
            trajectory_id = trajectory.id.0,
            policy_version = trajectory.policy_version.0
        );
        let result = state.labeler.label(&trajectory).instrument(span).await;
        state.pool.cast(PoolMsg::Labeled {
            worker: state.index,
            trajectory,
            result,
            label_s: started.elapsed().as_secs_f64(),
        })?;
        Ok(())
    }
}

/// Ids of a group's members, for tests and logs.
pub fn member_ids(group: &CompleteGroup) -> Vec<TrajectoryId> {
    group.trajectories.iter().map(|l| l.trajectory.id).collect()
}
