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

use crate::backend::{Assignment, SourcePosition};
use prism_core::{GroupId, PolicyVersion, PromptId};
use prism_rollout::Task;
use prism_rollout::curriculum::Curriculum;
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
    /// The learner trained or dropped `count` groups; their credits return,
    /// and the pass rates of those it knows (prompt, share correct) feed the
    /// curriculum.
    GroupsRetired { count: usize, outcomes: Vec<(PromptId, f32)> },
    /// The learner published a new version.
    VersionPublished(PolicyVersion),
    /// Issue nothing more; answer waiting workers with no work.
    Stop,
    /// Where the source stands, to checkpoint and to report: the index of
    /// the next fresh prompt and the curriculum.
    GetPosition(RpcReplyPort<SourcePosition>),
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
    /// Skips prompts and sets the difficulty (`task.adaptive`); continues a
    /// checkpoint's on resume.
    pub curriculum: Curriculum,
}

pub struct SourceState {
    task: Arc<Task>,
    cursor: u64,
    /// Group id minus prompt index.
    group_offset: u64,
    max_outstanding: usize,
    outstanding: usize,
    version: PolicyVersion,
    curriculum: Curriculum,
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
            if self.curriculum.enabled() && self.task.train_row(index).is_some_and(|row| self.curriculum.skip(index, row)) {
                continue;
            }
            self.outstanding += 1;
            let prompt = self.task.train_prompt_at(index, self.curriculum.level());
            out.push(Assignment { group: GroupId(index + self.group_offset), prompt, min_version: self.version });
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
            curriculum: args.curriculum,
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
            SourceMsg::GroupsRetired { count, outcomes } => {
                for (prompt, pass_rate) in outcomes {
                    let row = if state.curriculum.enabled() { state.task.train_row(prompt.0) } else { None };
                    state.curriculum.observe(row, pass_rate);
                }
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
            SourceMsg::GetPosition(reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(SourcePosition { prompt_cursor: state.cursor, curriculum: state.curriculum.state().clone() });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prism_rollout::curriculum;

    /// A dataset of four questions and a source over it whose curriculum
    /// already saw `streaks` (row → uniform groups in a row).
    async fn source(dir: &std::path::Path, streaks: &[(u32, u32)]) -> ActorRef<SourceMsg> {
        let path = dir.join("train.jsonl");
        std::fs::write(&path, (0..4).map(|i| format!("{{\"question\":\"q{i}\",\"answer\":\"#### {i}\"}}\n")).collect::<String>()).unwrap();
        let mut config = prism_rollout::task::Config { kind: "jsonl".into(), ..Default::default() };
        config.jsonl.train = path;
        let task = Arc::new(Task::new(&config, 5, Box::new(|q| q.to_string())).unwrap());
        let adaptive = curriculum::Config { enabled: true, skip_max: 0.99, ..Default::default() };
        let state = curriculum::State { uniform_streak: streaks.iter().copied().collect(), ..Default::default() };
        let curriculum = Curriculum::new(&adaptive, 5, Some(state));
        let args = SourceArgs { task, cursor: 0, first_group: 0, max_outstanding: 1000, version: PolicyVersion(0), curriculum };
        Actor::spawn(None, PromptSource, args).await.unwrap().0
    }

    async fn take(source: &ActorRef<SourceMsg>, n: usize) -> Vec<Assignment> {
        let work = source.call(|reply| SourceMsg::GetWork { worker: "w".into(), max: n, reply }, None).await.unwrap();
        match work {
            ractor::rpc::CallResult::Success(w) => w,
            _ => panic!("no answer"),
        }
    }

    /// Prompts whose rows were uniform many times are mostly skipped (and
    /// counted), never all of them; the others are handed out as before, and
    /// the cursor moves past the skipped ones. Mixed groups bring a row back.
    #[tokio::test]
    async fn the_source_skips_prompts_the_curriculum_finds_uniform() {
        let dir = tempfile::tempdir().unwrap();
        let source = source(dir.path(), &[(0, 20), (1, 20)]).await;
        let work = take(&source, 400).await;
        let position = source.call(SourceMsg::GetPosition, None).await.unwrap().unwrap();
        let asked = |q: &str| work.iter().filter(|a| a.prompt.text == q).count();
        assert_eq!(position.prompt_cursor, 400 + position.curriculum.skipped, "the cursor counts skipped prompts");
        assert!(position.curriculum.skipped > 300, "{}", position.curriculum.skipped);
        assert!(asked("q0") + asked("q1") > 0, "a uniform row still comes back now and then");
        assert!(asked("q2") + asked("q3") > 380, "{} {}", asked("q2"), asked("q3"));
        // Group ids still follow prompt indices.
        assert!(work.iter().all(|a| a.group.0 == a.prompt.id.0));
        // A mixed group of row 0 (the prompt of one of its indices) resets its streak.
        let index = (0..).find(|&i| source_row(dir.path(), i) == 0).unwrap();
        source.cast(SourceMsg::GroupsRetired { count: 0, outcomes: vec![(PromptId(index), 0.5)] }).unwrap();
        let position = source.call(SourceMsg::GetPosition, None).await.unwrap().unwrap();
        assert_eq!(position.curriculum.uniform_streak.get(&0), None);
        assert_eq!(position.curriculum.groups, 1);
    }

    fn source_row(dir: &std::path::Path, index: u64) -> u32 {
        let mut config = prism_rollout::task::Config { kind: "jsonl".into(), ..Default::default() };
        config.jsonl.train = dir.join("train.jsonl");
        Task::new(&config, 5, Box::new(|q| q.to_string())).unwrap().train_row(index).unwrap()
    }
}
