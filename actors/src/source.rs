//! PromptSource: hands out prompts, bounded by credits, and keeps the cursor.
//!
//! Rollout workers pull work with [`SourceMsg::GetWork`]. A prompt is issued only
//! while fewer than `max_outstanding` groups are issued but not yet retired
//! (trained or dropped by the learner): the learner's pace sets the rollout
//! pace, and at most `batch_groups × (1 + max_staleness)` groups are ever in the
//! system. Each assignment carries the policy version current when it was issued
//! as its `min_version`, which bounds the lag between sampling and training.
//!
//! Assignments are leased to the worker that took them until the reward pool
//! accepts the group ([`SourceMsg::Delivered`]); if the worker fails first, its
//! leases are re-issued ([`SourceMsg::WorkerFailed`]), so no prompt is lost.

use crate::backend::Assignment;
use prism_core::{GroupId, PolicyVersion};
use prism_rollout::Task;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub enum SourceMsg {
    /// A worker asks for up to `max` prompts; answered when at least one can be
    /// issued, or with none once the source has stopped.
    GetWork { worker: String, max: usize, reply: RpcReplyPort<Vec<Assignment>> },
    /// The reward pool accepted this group: its lease ends.
    Delivered(GroupId),
    /// A worker failed: re-issue what it held.
    WorkerFailed(String),
    /// The learner trained or dropped `count` groups; their credits return.
    GroupsRetired { count: usize },
    /// The learner published a new version.
    VersionPublished(PolicyVersion),
    /// Issue nothing more; answer waiting workers with no work.
    Stop,
    /// The cursor to checkpoint: index of the next fresh prompt.
    GetCursor(RpcReplyPort<u64>),
}

pub struct PromptSource;

pub struct SourceArgs {
    pub task: Arc<Task>,
    /// First prompt index (0, or the checkpointed cursor on resume).
    pub cursor: u64,
    /// Id of the group of prompt `cursor`; the next prompts' groups follow
    /// it. `cursor` in one process; a resumed distributed learner starts
    /// past every group id its predecessors handed out.
    pub first_group: u64,
    pub max_outstanding: usize,
    pub version: PolicyVersion,
}

pub struct SourceState {
    task: Arc<Task>,
    cursor: u64,
    /// Group id minus prompt index.
    group_offset: u64,
    max_outstanding: usize,
    outstanding: usize,
    version: PolicyVersion,
    stopped: bool,
    /// Prompts to hand out again before fresh ones (from failed workers).
    reissue: VecDeque<Assignment>,
    leases: HashMap<String, Vec<Assignment>>,
    waiting: VecDeque<(String, usize, RpcReplyPort<Vec<Assignment>>)>,
}

impl SourceState {
    fn take(&mut self, worker: &str, max: usize) -> Vec<Assignment> {
        let mut out = Vec::new();
        while out.len() < max {
            if let Some(a) = self.reissue.pop_front() {
                out.push(a);
                continue;
            }
            if self.outstanding >= self.max_outstanding {
                break;
            }
            let index = self.cursor;
            self.cursor += 1;
            self.outstanding += 1;
            out.push(Assignment { group: GroupId(index + self.group_offset), prompt: self.task.train_prompt(index), min_version: self.version });
        }
        self.leases.entry(worker.to_string()).or_default().extend(out.iter().cloned());
        out
    }

    /// Answers waiting workers while there is work for them.
    fn serve_waiting(&mut self) {
        while let Some((worker, max, reply)) = self.waiting.pop_front() {
            if reply.is_closed() {
                continue;
            }
            if self.stopped {
                let _ = reply.send(Vec::new());
                continue;
            }
            let work = self.take(&worker, max);
            if work.is_empty() {
                self.waiting.push_front((worker, max, reply));
                return;
            }
            if let Err(ractor::MessagingErr::SendErr(work)) = reply.send(work) {
                // The asker gave up waiting (a remote worker's request timed
                // out): what it never received is handed out again.
                tracing::debug!(%worker, groups = work.len(), "work reply not delivered; re-issuing it");
                if let Some(leases) = self.leases.get_mut(&worker) {
                    leases.retain(|a| !work.iter().any(|w| w.group == a.group));
                }
                self.reissue.extend(work);
            }
        }
    }
}

impl Actor for PromptSource {
    type Msg = SourceMsg;
    type State = SourceState;
    type Arguments = SourceArgs;

    async fn pre_start(&self, _myself: ActorRef<SourceMsg>, args: SourceArgs) -> Result<SourceState, ActorProcessingErr> {
        let group_offset = args.first_group.checked_sub(args.cursor).ok_or_else(|| {
            format!("the first group id {} is below the first prompt index {}", args.first_group, args.cursor)
        })?;
        Ok(SourceState {
            task: args.task,
            cursor: args.cursor,
            group_offset,
            max_outstanding: args.max_outstanding.max(1),
            outstanding: 0,
            version: args.version,
            stopped: false,
            reissue: VecDeque::new(),
            leases: HashMap::new(),
            waiting: VecDeque::new(),
        })
    }

    async fn handle(&self, _myself: ActorRef<SourceMsg>, msg: SourceMsg, state: &mut SourceState) -> Result<(), ActorProcessingErr> {
        match msg {
            SourceMsg::GetWork { worker, max, reply } => {
                state.waiting.push_back((worker, max, reply));
                state.serve_waiting();
            }
            SourceMsg::Delivered(group) => {
                for leases in state.leases.values_mut() {
                    leases.retain(|a| a.group != group);
                }
            }
            SourceMsg::WorkerFailed(worker) => {
                if let Some(leases) = state.leases.remove(&worker) {
                    tracing::info!(%worker, groups = leases.len(), "re-issuing the failed worker's prompts");
                    state.reissue.extend(leases);
                    state.serve_waiting();
                }
            }
            SourceMsg::GroupsRetired { count } => {
                state.outstanding = state.outstanding.saturating_sub(count);
                state.serve_waiting();
            }
            SourceMsg::VersionPublished(v) => {
                state.version = state.version.max(v);
                // Re-issued prompts must be sampled by current weights too.
                for a in state.reissue.iter_mut() {
                    a.min_version = state.version;
                }
            }
            SourceMsg::Stop => {
                state.stopped = true;
                state.serve_waiting();
            }
            SourceMsg::GetCursor(reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(state.cursor);
                }
            }
        }
        Ok(())
    }
}
