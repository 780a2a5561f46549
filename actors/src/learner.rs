//! Learner: takes complete labeled groups when it has room, enforces the
//! staleness bound, trains on a blocking thread, and publishes each new version.

use crate::backend::{DropReason, SourcePosition, Train, WeightSet};
use crate::error::Error;
use crate::metrics::{MetricsMsg, StepEvent};
use crate::reward_pool::{CompleteGroup, PoolMsg};
use crate::source::SourceMsg;
use crate::weight_sync::SyncMsg;
use prism_core::{LabeledTrajectory, PolicyVersion, PromptId, ScoreSource};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to do with a group sampled more than `max_staleness` versions ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalePolicy {
    /// Drop it (counted as `stale`).
    Drop,
    /// Train on it; the learner's truncated importance weights correct for the lag.
    ImportanceWeight,
}

/// When training ends and what happens along the way.
#[derive(Debug, Clone)]
pub struct LearnerPlan {
    /// Groups per optimizer step.
    pub batch_groups: usize,
    pub max_staleness: u64,
    pub stale: StalePolicy,
    /// Stop after this version (total optimizer steps, counting resumed ones).
    pub max_steps: u64,
    /// Stop after this much wall time in this process.
    pub time_limit: Option<Duration>,
    /// Evaluate every this many steps (0 = only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many steps (0 = only at the end).
    pub checkpoint_every: u64,
}

/// Why the learner stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    MaxSteps,
    TimeLimit,
    /// The pool stopped handing out groups (shutdown requested).
    Interrupted,
}

pub enum LearnerMsg {
    /// Take groups and train when a batch is full (sent to itself).
    Pull,
}

pub struct Learner;

pub struct LearnerArgs {
    pub backend: Box<dyn Train>,
    pub plan: LearnerPlan,
    pub peers: Peers,
}

/// The actors the learner talks to.
pub struct Peers {
    pub source: ActorRef<SourceMsg>,
    pub pool: ActorRef<PoolMsg>,
    pub sync: ActorRef<SyncMsg>,
    pub metrics: ActorRef<MetricsMsg>,
    /// Hears why the learner stopped (its owner subscribes: the supervisor
    /// in-process), once, after the learner wrapped up.
    pub finished: Arc<ractor::OutputPort<Finish>>,
}

pub struct LearnerState {
    core: Core,
    peers: Peers,
    buffer: VecDeque<(CompleteGroup, u64)>,
    finished: bool,
}

/// What the learner actor and the distributed learner loop
/// ([`crate::dist::learner`]) share: the backend on its blocking thread, when
/// to stop, which groups are trained on, one optimizer step with its report,
/// and evaluations and checkpoints on the plan's cadence.
pub(crate) struct Core {
    pub plan: LearnerPlan,
    backend: Option<Box<dyn Train>>,
    source: ActorRef<SourceMsg>,
    metrics: ActorRef<MetricsMsg>,
    started: Instant,
    last_eval: Option<PolicyVersion>,
}

/// A step trained but not yet announced: its caller publishes the weights
/// first, then hands this to [`Core::commit`].
pub(crate) struct StepDone {
    groups: usize,
    /// Each trained group's prompt and pass rate, for the curriculum.
    outcomes: Vec<(PromptId, f32)>,
    event: StepEvent,
}

impl Core {
    pub fn new(backend: Box<dyn Train>, plan: LearnerPlan, source: ActorRef<SourceMsg>, metrics: ActorRef<MetricsMsg>) -> Self {
        Self { plan, backend: Some(backend), source, metrics, started: Instant::now(), last_eval: None }
    }

    pub fn version(&self) -> PolicyVersion {
        self.backend.as_ref().map(|b| b.version()).unwrap_or_default()
    }

    /// Whether the run is over, and why.
    pub fn due(&self) -> Option<Finish> {
        if self.version().0 >= self.plan.max_steps {
            Some(Finish::MaxSteps)
        } else if self.plan.time_limit.is_some_and(|t| self.started.elapsed() >= t) {
            Some(Finish::TimeLimit)
        } else {
            None
        }
    }

    /// Whether any evaluation happened yet (the first one starts every curve).
    pub fn evaluated_once(&self) -> bool {
        self.last_eval.is_some()
    }

    /// Whether a complete group is trained on, with how many versions it lags,
    /// or dropped and why (too stale under `StalePolicy::Drop`, or not admitted
    /// by the backend).
    pub fn admit(&self, group: &[LabeledTrajectory]) -> Result<u64, DropReason> {
        let current = self.version();
        let sampled = group.iter().map(|l| l.trajectory.policy_version).min().unwrap_or(current);
        let lag = sampled.lag_behind(current);
        if lag > self.plan.max_staleness && self.plan.stale == StalePolicy::Drop {
            return Err(DropReason::Stale);
        }
        match &self.backend {
            Some(b) => b.admit(group).map(|()| lag),
            None => Ok(lag),
        }
    }

    /// Counts a dropped group and returns its credit to the prompt source,
    /// with its pass rate when its members are known.
    pub fn dropped(&self, reason: DropReason, group: &[LabeledTrajectory], size: u64) -> Result<(), Error> {
        self.metrics.cast(MetricsMsg::Dropped { reason, trajectories: size })?;
        let outcomes = group_outcome(group).into_iter().collect();
        Ok(self.source.cast(SourceMsg::GroupsRetired { count: 1, outcomes })?)
    }

    /// Counts a dropped group that holds no credit of this learner's (one
    /// an earlier learner of the run issued).
    pub fn dropped_uncredited(&self, reason: DropReason, trajectories: u64) -> Result<(), Error> {
        Ok(self.metrics.cast(MetricsMsg::Dropped { reason, trajectories })?)
    }

    /// Runs `f` on the backend on a blocking thread.
    pub async fn blocking<R: Send + 'static>(&mut self, f: impl FnOnce(&mut dyn Train) -> R + Send + 'static) -> Result<R, Error> {
        let mut backend = self.backend.take().ok_or_else(|| Error::Thread("learner backend lost by an earlier failure".into()))?;
        let (backend, out) = tokio::task::spawn_blocking(move || {
            let out = f(backend.as_mut());
            (backend, out)
        })
        .await
        .map_err(|e| Error::Thread(format!("the learner thread failed: {e}")))?;
        self.backend = Some(backend);
        Ok(out)
    }

    pub async fn evaluate(&mut self) -> Result<(), Error> {
        let version = self.version();
        let span = tracing::info_span!("evaluate", actor = "learner", policy_version = version.0);
        let eval = self.blocking(move |b| span.in_scope(|| b.evaluate())).await?.map_err(|e| Error::backend("evaluation", e))?;
        self.last_eval = Some(version);
        Ok(self.metrics.cast(MetricsMsg::Evaluated { version: version.0, eval })?)
    }

    pub async fn checkpoint(&mut self) -> Result<(), Error> {
        let position = self.position().await?;
        let span = tracing::info_span!("checkpoint", actor = "learner", prompt_cursor = position.prompt_cursor);
        self.blocking(move |b| span.in_scope(|| b.checkpoint(&position))).await?.map_err(|e| Error::backend("checkpoint", e))
    }

    fn position(&self) -> impl std::future::Future<Output = Result<SourcePosition, Error>> + Send + 'static {
        let source = self.source.clone();
        async move {
            match source.call(SourceMsg::GetPosition, Some(Duration::from_secs(30))).await {
                Ok(CallResult::Success(p)) => Ok(p),
                _ => Err(Error::Unanswered("prompt source did not answer with its position".into())),
            }
        }
    }

    /// The end of a run: an evaluation of the final weights (unless they were
    /// just evaluated) and a checkpoint.
    pub async fn wrap_up(&mut self, why: &Finish) -> Result<(), Error> {
        tracing::info!(reason = ?why, policy_version = self.version().0, "learner finishing");
        if self.last_eval != Some(self.version()) {
            self.evaluate().await?;
        }
        self.checkpoint().await
    }

    /// One optimizer step on `batch` (complete groups with their lags); the
    /// new weights, and the step to [`Core::commit`] once they are published.
    pub async fn train(&mut self, batch: Vec<(Vec<LabeledTrajectory>, u64)>, wait_s: f64) -> Result<(Arc<WeightSet>, StepDone), Error> {
        let n = batch.len();
        let lags: Vec<u64> = batch.iter().map(|(_, l)| *l).collect();
        let (reward, accuracy, step_accuracy) = batch_outcomes(batch.iter().flat_map(|(g, _)| g.iter()));
        let sources = score_sources(batch.iter().flat_map(|(g, _)| g.iter()));
        let outcomes: Vec<(PromptId, f32)> = batch.iter().filter_map(|(g, _)| group_outcome(g)).collect();
        let version = self.version();
        let token_lags = crate::metrics::token_lags(batch.iter().flat_map(|(g, _)| g.iter().map(|l| &l.trajectory)), version);
        let groups: Vec<Vec<LabeledTrajectory>> = batch.into_iter().map(|(g, _)| g).collect();
        let started = Instant::now();
        let span = tracing::info_span!("train", actor = "learner", policy_version = version.0, groups = n);
        let lags_for_step = lags.clone();
        let (report, weights) = self
            .blocking(move |b| {
                let _enter = span.enter();
                let report = b.train(groups, &lags_for_step)?;
                Ok::<_, crate::backend::BackendError>((report, b.weights()?))
            })
            .await?
            .map_err(|e| Error::backend(format!("learner step {} failed", version.0 + 1), e))?;
        let train_s = started.elapsed().as_secs_f64();
        let event = StepEvent {
            version: weights.version.0,
            report,
            lags,
            reward,
            accuracy,
            step_accuracy,
            sources,
            train_s,
            wait_s,
            curriculum: None,
            token_lags,
        };
        Ok((weights, StepDone { groups: n, outcomes, event }))
    }

    /// Announces a step whose weights are published: the new version and the
    /// groups' credits to the prompt source, the step to the metrics; then
    /// evaluates and checkpoints when the plan says.
    pub async fn commit(&mut self, done: StepDone) -> Result<(), Error> {
        let StepDone { groups, outcomes, mut event } = done;
        let version = event.version;
        self.source.cast(SourceMsg::VersionPublished(PolicyVersion(version)))?;
        self.source.cast(SourceMsg::GroupsRetired { count: groups, outcomes })?;
        event.curriculum = Some(self.position().await?.curriculum);
        self.metrics.cast(MetricsMsg::StepCompleted(Box::new(event)))?;
        if self.plan.eval_every > 0 && version % self.plan.eval_every == 0 {
            self.evaluate().await?;
        }
        if self.plan.checkpoint_every > 0 && version % self.plan.checkpoint_every == 0 {
            self.checkpoint().await?;
        }
        Ok(())
    }
}

impl LearnerState {
    async fn finish(&mut self, why: Finish) -> Result<(), ActorProcessingErr> {
        self.finished = true;
        self.core.wrap_up(&why).await?;
        let held: usize = self.buffer.iter().map(|(g, _)| g.trajectories.len()).sum();
        self.peers.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "learner", trajectories: held as u64 })?;
        self.buffer.clear();
        self.peers.finished.send(why);
        Ok(())
    }

    async fn step(&mut self, wait_s: f64) -> Result<(), ActorProcessingErr> {
        let n = self.core.plan.batch_groups;
        let batch: Vec<(Vec<LabeledTrajectory>, u64)> = self.buffer.drain(..n).map(|(g, lag)| (g.trajectories, lag)).collect();
        let (weights, done) = self.core.train(batch, wait_s).await?;
        self.peers.sync.cast(SyncMsg::WeightsPublished(weights))?;
        self.core.commit(done).await?;
        Ok(())
    }
}

/// A group's prompt and the share of its samples whose outcome was correct
/// (score ≥ 0.5); `None` for an empty group.
pub(crate) fn group_outcome(group: &[LabeledTrajectory]) -> Option<(PromptId, f32)> {
    let first = group.first()?;
    let correct = group.iter().filter(|l| l.label.outcome >= 0.5).count();
    Some((first.trajectory.prompt.id, correct as f32 / group.len() as f32))
}

/// Of the samples of one step: mean outcome score, share correct (score ≥ 0.5),
/// and share of scored steps judged correct (when steps were scored).
pub(crate) fn batch_outcomes<'a>(samples: impl Iterator<Item = &'a LabeledTrajectory>) -> (f64, f64, Option<f64>) {
    let samples: Vec<&LabeledTrajectory> = samples.collect();
    let reward = mean(samples.iter().map(|l| l.label.outcome as f64));
    let accuracy = mean(samples.iter().map(|l| if l.label.outcome >= 0.5 { 1.0 } else { 0.0 }));
    let step_scores: Vec<f64> =
        samples.iter().flat_map(|l| l.label.steps.iter().filter_map(|s| s.score)).map(|s| if s >= 0.5 { 1.0 } else { 0.0 }).collect();
    let step_accuracy = (!step_scores.is_empty()).then(|| mean(step_scores.into_iter()));
    (reward, accuracy, step_accuracy)
}

/// Step scores of the samples by source.
pub(crate) fn score_sources<'a>(samples: impl Iterator<Item = &'a LabeledTrajectory>) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for s in samples.flat_map(|l| l.label.steps.iter()) {
        let name = match s.source {
            ScoreSource::Judge => "judge",
            ScoreSource::JudgeCache => "cache",
            ScoreSource::Distilled => "distilled",
            ScoreSource::Verifier => "verifier",
            ScoreSource::Guard => "guard",
            ScoreSource::Unknown => "unknown",
            ScoreSource::Implicit => "implicit",
        };
        *out.entry(name).or_insert(0) += 1;
    }
    out
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

impl Actor for Learner {
    type Msg = LearnerMsg;
    type State = LearnerState;
    type Arguments = LearnerArgs;

    async fn pre_start(&self, myself: ActorRef<LearnerMsg>, args: LearnerArgs) -> Result<LearnerState, ActorProcessingErr> {
        let core = Core::new(args.backend, args.plan, args.peers.source.clone(), args.peers.metrics.clone());
        let mut state = LearnerState { core, peers: args.peers, buffer: VecDeque::new(), finished: false };
        let weights = state.core.blocking(|b| b.weights()).await??;
        state.peers.sync.cast(SyncMsg::WeightsPublished(weights))?;
        myself.cast(LearnerMsg::Pull)?;
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<LearnerMsg>, msg: LearnerMsg, state: &mut LearnerState) -> Result<(), ActorProcessingErr> {
        let LearnerMsg::Pull = msg;
        if state.finished {
            return Ok(());
        }
        if !state.core.evaluated_once() {
            // The starting point of every curve.
            state.core.evaluate().await?;
        }
        if let Some(why) = state.core.due() {
            return state.finish(why).await;
        }
        let need = state.core.plan.batch_groups.saturating_sub(state.buffer.len()).max(1);
        let waited = Instant::now();
        let groups = match state.peers.pool.call(|reply| PoolMsg::TakeGroups { max: need, reply }, None).await? {
            CallResult::Success(g) if !g.is_empty() => g,
            _ => return state.finish(Finish::Interrupted).await,
        };
        let wait_s = waited.elapsed().as_secs_f64();
        for group in groups {
            match state.core.admit(&group.trajectories) {
                Ok(lag) => state.buffer.push_back((group, lag)),
                Err(reason) => state.core.dropped(reason, &group.trajectories, group.trajectories.len() as u64)?,
            }
        }
        if state.buffer.len() >= state.core.plan.batch_groups {
            state.step(wait_s).await?;
        }
        myself.cast(LearnerMsg::Pull)?;
        Ok(())
    }
}
