//! Supervisor: the root of a local run. Spawns every actor linked to itself,
//! restarts failed rollout workers with backoff (the reward pool does the same
//! for its workers), fails the run when a restart budget is spent or a
//! singleton fails, and stops everything in order at the end.
//!
//! Shutdown order (Ctrl-C, or the learner reaching its last step): the source
//! stops issuing; the pool stops accepting and reports what it holds; the
//! learner takes a final checkpoint and reports its buffer; rollout workers
//! finish their current generation, report what was not accepted, and stop;
//! then the ledger is read and the summary returned.

use crate::backend::{Factory, Generate, Label, Train};
use crate::learner::{Finish, Learner, LearnerArgs, LearnerMsg, LearnerPlan, Peers};
use crate::metrics::{Ledger, Metrics, MetricsArgs, MetricsMsg, Progress};
use crate::restart::RestartPolicy;
use crate::reward_pool::{PoolArgs, PoolMsg, RewardPool};
use crate::rollout_worker::{Channels, RolloutArgs, RolloutMsg, RolloutWorker};
use crate::source::{PromptSource, SourceArgs, SourceMsg};
use crate::weight_sync::{SyncMsg, WeightSync};
use crate::Config;
use crate::error::Error;
use prism_rollout::Task;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Everything a local run is made of.
pub struct PipelineSpec {
    pub task: Arc<Task>,
    /// First prompt index (the checkpointed cursor on resume).
    pub cursor: u64,
    /// The curriculum (continued from the checkpoint on resume).
    pub curriculum: prism_rollout::curriculum::Curriculum,
    pub generator: Factory<Box<dyn Generate>>,
    pub labeler: Arc<dyn Label>,
    pub trainer: Box<dyn Train>,
    pub plan: LearnerPlan,
    pub rollout_workers: usize,
    pub prompts_per_batch: usize,
    pub config: Config,
    /// `metrics.jsonl` of the run folder.
    pub metrics_path: Option<PathBuf>,
    pub progress: watch::Sender<Progress>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    pub finish: Finish,
    pub ledger: Ledger,
    pub wall: Duration,
}

pub enum SupMsg {
    LearnerFinished(Finish),
    /// Stop the run (Ctrl-C).
    Shutdown(String),
    RespawnRollout(usize),
    /// Give up waiting for actors to stop.
    ShutdownTimeout,
}

pub struct Supervisor;

pub struct SupArgs {
    pub spec: PipelineSpec,
    pub done: oneshot::Sender<Result<Summary, Error>>,
}

enum Phase {
    Running,
    Stopping,
}

pub struct SupState {
    config: Config,
    started: Instant,
    done: Option<oneshot::Sender<Result<Summary, Error>>>,
    phase: Phase,
    finish: Option<Finish>,
    restarts: RestartPolicy,
    rollout_args: Vec<RolloutArgs<Channels>>,
    rollouts: Vec<Option<ActorRef<RolloutMsg>>>,
    source: ActorRef<SourceMsg>,
    sync: ActorRef<SyncMsg>,
    pool: ActorRef<PoolMsg>,
    learner: ActorRef<LearnerMsg>,
    metrics: ActorRef<MetricsMsg>,
}

impl SupState {
    fn role(&self, cell: &ActorCell) -> Option<String> {
        let id = cell.get_id();
        if let Some(i) = self.rollouts.iter().position(|r| r.as_ref().is_some_and(|r| r.get_id() == id)) {
            return Some(self.rollout_args[i].name.clone());
        }
        [
            (self.source.get_id(), "prompt source"),
            (self.sync.get_id(), "weight sync"),
            (self.pool.get_id(), "reward pool"),
            (self.learner.get_id(), "learner"),
            (self.metrics.get_id(), "metrics"),
        ]
        .into_iter()
        .find(|(a, _)| *a == id)
        .map(|(_, name)| name.to_string())
    }

    fn stopped_all(&self) -> bool {
        self.finish.is_some() && self.rollouts.iter().all(Option::is_none)
    }

    fn fail(&mut self, myself: &ActorRef<SupMsg>, message: String) {
        tracing::error!(%message, "run failed");
        if let Some(done) = self.done.take() {
            let _ = done.send(Err(Error::Run(message.clone())));
        }
        myself.stop_children(Some(message.clone()));
        myself.stop(Some(message));
    }

    async fn begin_stopping(&mut self, myself: &ActorRef<SupMsg>) -> Result<(), ActorProcessingErr> {
        if matches!(self.phase, Phase::Stopping) {
            return Ok(());
        }
        self.phase = Phase::Stopping;
        self.source.cast(SourceMsg::Stop)?;
        let _ = self.pool.call(PoolMsg::Stop, Some(Duration::from_secs(60))).await?;
        self.sync.cast(SyncMsg::Stop)?;
        let timeout = Duration::from_secs_f64(self.config.shutdown_timeout_s);
        ractor::time::send_after(timeout, myself.get_cell(), || SupMsg::ShutdownTimeout);
        Ok(())
    }

    async fn finalize(&mut self, myself: &ActorRef<SupMsg>) -> Result<(), ActorProcessingErr> {
        let _ = self.metrics.call(MetricsMsg::Flush, Some(Duration::from_secs(30))).await?;
        let ledger = match self.metrics.call(MetricsMsg::GetLedger, Some(Duration::from_secs(30))).await? {
            ractor::rpc::CallResult::Success(l) => l,
            _ => return Err("metrics did not answer with the ledger".into()),
        };
        let finish = self.finish.clone().unwrap_or(Finish::Interrupted);
        tracing::info!(%ledger, balanced = ledger.balanced(), "run accounting");
        if let Some(done) = self.done.take() {
            let _ = done.send(Ok(Summary { finish, ledger, wall: self.started.elapsed() }));
        }
        myself.stop_children(None);
        myself.stop(None);
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupMsg;
    type State = SupState;
    type Arguments = SupArgs;

    async fn pre_start(&self, myself: ActorRef<SupMsg>, args: SupArgs) -> Result<SupState, ActorProcessingErr> {
        let SupArgs { spec, done } = args;
        let me = myself.get_cell();
        let config = spec.config.clone();
        let (metrics, _) =
            Actor::spawn_linked(None, Metrics, MetricsArgs { path: spec.metrics_path.clone(), progress: spec.progress, labeler: Some(spec.labeler.clone()) }, me.clone()).await?;
        let (sync, _) = Actor::spawn_linked(None, WeightSync, None, me.clone()).await?;
        let max_outstanding = spec.plan.batch_groups * (1 + spec.plan.max_staleness as usize);
        let (source, _) = Actor::spawn_linked(
            None,
            PromptSource,
            SourceArgs {
                task: spec.task,
                cursor: spec.cursor,
                first_group: spec.cursor,
                max_outstanding,
                version: spec.trainer.version(),
                curriculum: spec.curriculum,
            },
            me.clone(),
        )
        .await?;
        let capacity = if config.pool_capacity_groups == 0 { max_outstanding } else { config.pool_capacity_groups };
        let (pool, _) = Actor::spawn_linked(
            None,
            RewardPool,
            PoolArgs {
                labeler: spec.labeler,
                workers: config.reward_workers,
                capacity,
                attempts: config.reward_attempts,
                restarts: config.restart_policy(),
                source: source.clone(),
                metrics: metrics.clone(),
            },
            me.clone(),
        )
        .await?;
        // The learner says why it stopped on its output port; the run stops then.
        let finished = Arc::new(ractor::OutputPort::default());
        finished.subscribe(myself.clone(), |why| Some(SupMsg::LearnerFinished(why)));
        let (learner, _) = Actor::spawn_linked(
            None,
            Learner,
            LearnerArgs {
                backend: spec.trainer,
                plan: spec.plan,
                peers: Peers {
                    source: source.clone(),
                    pool: pool.clone(),
                    sync: sync.clone(),
                    metrics: metrics.clone(),
                    finished: finished.clone(),
                },
            },
            me.clone(),
        )
        .await?;
        let rollout_args: Vec<RolloutArgs<Channels>> = (0..spec.rollout_workers.max(1))
            .map(|i| RolloutArgs {
                name: format!("rollout-{i}"),
                factory: spec.generator.clone(),
                ports: Channels {
                    source: source.clone(),
                    sync: sync.clone(),
                    pool: pool.clone(),
                    metrics: metrics.clone(),
                },
                prompts_per_batch: spec.prompts_per_batch,
            })
            .collect();
        let mut rollouts = Vec::new();
        for a in &rollout_args {
            let (r, _) = Actor::spawn_linked(None, RolloutWorker::new(), a.clone(), me.clone()).await?;
            rollouts.push(Some(r));
        }
        Ok(SupState {
            restarts: config.restart_policy(),
            config,
            started: Instant::now(),
            done: Some(done),
            phase: Phase::Running,
            finish: None,
            rollout_args,
            rollouts,
            source,
            sync,
            pool,
            learner,
            metrics,
        })
    }

    async fn handle(&self, myself: ActorRef<SupMsg>, msg: SupMsg, state: &mut SupState) -> Result<(), ActorProcessingErr> {
        match msg {
            SupMsg::LearnerFinished(why) => {
                state.finish = Some(why);
                state.begin_stopping(&myself).await?;
            }
            SupMsg::Shutdown(reason) => {
                tracing::info!(%reason, "stopping the run");
                state.begin_stopping(&myself).await?;
            }
            SupMsg::RespawnRollout(i) => {
                if matches!(state.phase, Phase::Running) {
                    let (r, _) = Actor::spawn_linked(None, RolloutWorker::new(), state.rollout_args[i].clone(), myself.get_cell()).await?;
                    state.rollouts[i] = Some(r);
                }
                return Ok(());
            }
            SupMsg::ShutdownTimeout => {
                if state.done.is_some() {
                    let waiting: Vec<String> = state
                        .rollouts
                        .iter()
                        .zip(&state.rollout_args)
                        .filter(|(r, _)| r.is_some())
                        .map(|(_, a)| a.name.clone())
                        .collect();
                    let learner = if state.finish.is_none() { " learner" } else { "" };
                    tracing::warn!(?waiting, "shutdown timed out; stopping anyway");
                    if state.finish.is_none() {
                        state.fail(&myself, format!("shutdown timed out waiting for{learner} {}", waiting.join(", ")));
                        return Ok(());
                    }
                    state.rollouts.iter_mut().for_each(|r| {
                        if let Some(r) = r.take() {
                            r.kill();
                        }
                    });
                }
            }
        }
        if matches!(state.phase, Phase::Stopping) && state.stopped_all() && state.done.is_some() {
            state.finalize(&myself).await?;
        }
        Ok(())
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<SupMsg>, evt: SupervisionEvent, state: &mut SupState) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(i) = state.rollouts.iter().position(|r| r.as_ref().is_some_and(|r| r.get_id() == cell.get_id())) {
                    state.rollouts[i] = None;
                }
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                let Some(role) = state.role(&cell) else { return Ok(()) };
                let error = error.to_string();
                let rollout = state.rollouts.iter().position(|r| r.as_ref().is_some_and(|r| r.get_id() == cell.get_id()));
                match rollout {
                    Some(i) => {
                        state.rollouts[i] = None;
                        tracing::warn!(actor = %role, %error, "rollout worker failed");
                        let _ = state.metrics.cast(MetricsMsg::ActorRestarted { actor: role.clone(), error: error.clone() });
                        let _ = state.source.cast(SourceMsg::WorkerFailed(role.clone()));
                        if matches!(state.phase, Phase::Running) {
                            match state.restarts.on_failure(&role, &error, Instant::now()) {
                                Ok(backoff) => {
                                    tracing::info!(actor = %role, ?backoff, "restarting");
                                    ractor::time::send_after(backoff, myself.get_cell(), move || SupMsg::RespawnRollout(i));
                                }
                                Err(message) => {
                                    state.fail(&myself, message);
                                    return Ok(());
                                }
                            }
                        }
                    }
                    None => {
                        state.fail(&myself, format!("{role} failed: {error}"));
                        return Ok(());
                    }
                }
            }
            _ => {}
        }
        if matches!(state.phase, Phase::Stopping) && state.stopped_all() && state.done.is_some() {
            state.finalize(&myself).await?;
        }
        Ok(())
    }
}

/// Runs a local pipeline until the learner finishes, the run fails, or
/// `shutdown` resolves (then it stops cleanly: final checkpoint, accounting).
pub async fn run(spec: PipelineSpec, shutdown: impl std::future::Future<Output = ()>) -> Result<Summary, Error> {
    let (done_tx, mut done_rx) = oneshot::channel();
    let (sup, handle) = Actor::spawn(None, Supervisor, SupArgs { spec, done: done_tx })
        .await
        .map_err(|e| Error::Run(format!("starting the pipeline failed: {e}")))?;
    tokio::pin!(shutdown);
    let mut asked = false;
    let result = loop {
        tokio::select! {
            r = &mut done_rx => break r.unwrap_or_else(|_| Err(Error::Run("the supervisor stopped without a result".into()))),
            _ = &mut shutdown, if !asked => {
                asked = true;
                let _ = sup.cast(SupMsg::Shutdown("interrupted".into()));
            }
        }
    };
    let _ = handle.await;
    result
}
