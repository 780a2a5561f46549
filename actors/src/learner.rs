//! Learner: takes complete labeled groups when it has room, enforces the
//! staleness bound, trains on a blocking thread, and publishes each new version.

use crate::backend::{DropReason, Train};
use crate::metrics::{MetricsMsg, StepEvent};
use crate::reward_pool::{CompleteGroup, PoolMsg};
use crate::source::SourceMsg;
use crate::supervisor::SupMsg;
use crate::weight_sync::SyncMsg;
use prism_core::{LabeledTrajectory, PolicyVersion};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::VecDeque;
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
    pub supervisor: ActorRef<SupMsg>,
}

pub struct LearnerState {
    plan: LearnerPlan,
    peers: Peers,
    backend: Option<Box<dyn Train>>,
    buffer: VecDeque<(CompleteGroup, u64)>,
    started: Instant,
    last_eval: Option<PolicyVersion>,
    finished: bool,
}

impl LearnerState {
    fn version(&self) -> PolicyVersion {
        self.backend.as_ref().map(|b| b.version()).unwrap_or_default()
    }

    fn due(&self) -> Option<Finish> {
        if self.version().0 >= self.plan.max_steps {
            Some(Finish::MaxSteps)
        } else if self.plan.time_limit.is_some_and(|t| self.started.elapsed() >= t) {
            Some(Finish::TimeLimit)
        } else {
            None
        }
    }

    /// Runs `f` on the backend on a blocking thread.
    async fn blocking<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut dyn Train) -> R + Send + 'static,
    ) -> Result<R, ActorProcessingErr> {
        let mut backend = self.backend.take().ok_or("learner backend lost by an earlier failure")?;
        let (backend, out) = tokio::task::spawn_blocking(move || {
            let out = f(backend.as_mut());
            (backend, out)
        })
        .await?;
        self.backend = Some(backend);
        Ok(out)
    }

    async fn cursor(&mut self) -> Result<u64, ActorProcessingErr> {
        match self.peers.source.call(SourceMsg::GetCursor, Some(Duration::from_secs(30))).await? {
            CallResult::Success(c) => Ok(c),
            _ => Err("prompt source did not answer with its cursor".into()),
        }
    }

    async fn evaluate(&mut self) -> Result<(), ActorProcessingErr> {
        let version = self.version();
        let span = tracing::info_span!("evaluate", actor = "learner", policy_version = version.0);
        let eval = self.blocking(move |b| span.in_scope(|| b.evaluate())).await??;
        self.last_eval = Some(version);
        self.peers.metrics.cast(MetricsMsg::Evaluated { version: version.0, eval })?;
        Ok(())
    }

    async fn checkpoint(&mut self) -> Result<(), ActorProcessingErr> {
        let cursor = self.cursor().await?;
        let span = tracing::info_span!("checkpoint", actor = "learner", prompt_cursor = cursor);
        self.blocking(move |b| span.in_scope(|| b.checkpoint(cursor))).await??;
        Ok(())
    }

    async fn finish(&mut self, why: Finish) -> Result<(), ActorProcessingErr> {
        self.finished = true;
        tracing::info!(reason = ?why, policy_version = self.version().0, "learner finishing");
        if self.last_eval != Some(self.version()) {
            self.evaluate().await?;
        }
        self.checkpoint().await?;
        let held: usize = self.buffer.iter().map(|(g, _)| g.trajectories.len()).sum();
        self.peers.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "learner", trajectories: held as u64 })?;
        self.buffer.clear();
        self.peers.supervisor.cast(SupMsg::LearnerFinished(why))?;
        Ok(())
    }

    async fn step(&mut self, wait_s: f64) -> Result<(), ActorProcessingErr> {
        let n = self.plan.batch_groups;
        let batch: Vec<(CompleteGroup, u64)> = self.buffer.drain(..n).collect();
        let lags: Vec<u64> = batch.iter().map(|(_, l)| *l).collect();
        let (reward, accuracy, step_accuracy) = batch_outcomes(batch.iter().flat_map(|(g, _)| g.trajectories.iter()));
        let groups: Vec<_> = batch.into_iter().map(|(g, _)| g.trajectories).collect();

        let started = Instant::now();
        let version = self.version();
        let span = tracing::info_span!("train", actor = "learner", policy_version = version.0, groups = n);
        let lags_for_step = lags.clone();
        let (report, weights) = self
            .blocking(move |b| {
                let _enter = span.enter();
                let report = b.train(groups, &lags_for_step)?;
                Ok::<_, crate::backend::BackendError>((report, b.weights()?))
            })
            .await?
            .map_err(|e| format!("learner step {} failed: {e}", version.0 + 1))?;
        let train_s = started.elapsed().as_secs_f64();
        let new_version = weights.version;
        self.peers.sync.cast(SyncMsg::WeightsPublished(weights))?;
        self.peers.source.cast(SourceMsg::VersionPublished(new_version))?;
        self.peers.source.cast(SourceMsg::GroupsRetired { count: n })?;
        self.peers.metrics.cast(MetricsMsg::StepCompleted(Box::new(StepEvent {
            version: new_version.0,
            report,
            lags,
            reward,
            accuracy,
            step_accuracy,
            train_s,
            wait_s,
        })))?;
        let (eval_every, checkpoint_every) = (self.plan.eval_every, self.plan.checkpoint_every);
        if eval_every > 0 && new_version.0 % eval_every == 0 {
            self.evaluate().await?;
        }
        if checkpoint_every > 0 && new_version.0 % checkpoint_every == 0 {
            self.checkpoint().await?;
        }
        Ok(())
    }
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

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

impl Actor for Learner {
    type Msg = LearnerMsg;
    type State = LearnerState;
    type Arguments = LearnerArgs;

    async fn pre_start(&self, myself: ActorRef<LearnerMsg>, args: LearnerArgs) -> Result<LearnerState, ActorProcessingErr> {
        let mut state = LearnerState {
            plan: args.plan,
            peers: args.peers,
            backend: Some(args.backend),
            buffer: VecDeque::new(),
            started: Instant::now(),
            last_eval: None,
            finished: false,
        };
        let weights = state.blocking(|b| b.weights()).await??;
        state.peers.sync.cast(SyncMsg::WeightsPublished(weights))?;
        myself.cast(LearnerMsg::Pull)?;
        Ok(state)
    }

    async fn handle(&self, myself: ActorRef<LearnerMsg>, msg: LearnerMsg, state: &mut LearnerState) -> Result<(), ActorProcessingErr> {
        let LearnerMsg::Pull = msg;
        if state.finished {
            return Ok(());
        }
        if state.last_eval.is_none() {
            // The starting point of every curve.
            state.evaluate().await?;
        }
        if let Some(why) = state.due() {
            return state.finish(why).await;
        }
        let need = state.plan.batch_groups.saturating_sub(state.buffer.len()).max(1);
        let waited = Instant::now();
        let groups = match state.peers.pool.call(|reply| PoolMsg::TakeGroups { max: need, reply }, None).await? {
            CallResult::Success(g) if !g.is_empty() => g,
            _ => return state.finish(Finish::Interrupted).await,
        };
        let wait_s = waited.elapsed().as_secs_f64();
        let current = state.version();
        for group in groups {
            let sampled = group.trajectories.iter().map(|l| l.trajectory.policy_version).min().unwrap_or(current);
            let lag = sampled.lag_behind(current);
            let n = group.trajectories.len() as u64;
            let verdict = if lag > state.plan.max_staleness && state.plan.stale == StalePolicy::Drop {
                Err(DropReason::Stale)
            } else {
                state.backend.as_ref().ok_or("learner backend lost")?.admit(&group.trajectories)
            };
            match verdict {
                Ok(()) => state.buffer.push_back((group, lag)),
                Err(reason) => {
                    state.peers.metrics.cast(MetricsMsg::Dropped { reason, trajectories: n })?;
                    state.peers.source.cast(SourceMsg::GroupsRetired { count: 1 })?;
                }
            }
        }
        if state.buffer.len() >= state.plan.batch_groups {
            state.step(wait_s).await?;
        }
        myself.cast(LearnerMsg::Pull)?;
        Ok(())
    }
}
