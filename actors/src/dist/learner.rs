//! The learner role's loop: the same PromptSource and Metrics actors as a local
//! run, with rollout and reward workers in other processes.
//!
//! ```text
//! Control.GetWork ──▶ SourceBridge ──▶ PromptSource (credits, leases, cursor)
//! Control.Delivered ─▶ SourceBridge ──▶ PromptSource (lease ends) + Metrics (made)
//! labeled stream ──▶ Assembler ──▶ staleness / admit ──▶ Train ──▶ Weights.publish
//!                                                          └──────▶ Metrics (step, ledger)
//! ```
//!
//! A group's stream entries are acknowledged once it is trained on or dropped.
//! At the end the learner asks every worker to stop, waits for them to leave,
//! and counts what is still in the streams as in flight, so the ledger
//! (`made = trained + dropped + in flight`) is checked against Redis itself.

use super::assembly::{Assembled, Assembler};
use super::control::{Control, WorkSource};
use super::redis::{self, Redis, RunKeys, LEARNER_GROUP, REWARD_GROUP};
use super::weights::Weights;
use crate::backend::{DropReason, Train};
use crate::learner::{batch_outcomes, Finish, LearnerPlan, StalePolicy};
use crate::metrics::{Metrics, MetricsArgs, MetricsMsg, Progress, StepEvent};
use crate::source::{PromptSource, SourceArgs, SourceMsg};
use crate::supervisor::Summary;
use prism_core::{GroupId, LabeledTrajectory, PolicyVersion};
use prism_proto::v1;
use prism_rollout::Task;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Everything the learner process is made of.
pub struct LearnerRole {
    pub trainer: Box<dyn Train>,
    pub plan: LearnerPlan,
    pub task: Arc<Task>,
    /// First prompt index (the checkpointed cursor on resume).
    pub cursor: u64,
    pub control: Control,
    pub weights: Weights,
    pub redis: Redis,
    pub keys: RunKeys,
    /// `metrics.jsonl` of the run folder.
    pub metrics_path: Option<PathBuf>,
    pub progress: watch::Sender<Progress>,
    /// How long the end of the run waits for workers to leave.
    pub drain: Duration,
}

/// Hands the PromptSource's prompts to remote rollout workers.
struct SourceBridge {
    source: ActorRef<SourceMsg>,
    metrics: ActorRef<MetricsMsg>,
    /// Groups delivered so far.
    delivered: std::sync::Mutex<std::collections::HashSet<u64>>,
}

#[tonic::async_trait]
impl WorkSource for SourceBridge {
    async fn get_work(&self, worker: &str, max: usize, wait: Duration) -> Option<Vec<v1::Assignment>> {
        let worker = worker.to_string();
        match self.source.call(|reply| SourceMsg::GetWork { worker, max, reply }, Some(wait)).await {
            // The source answers an empty list only once it has stopped.
            Ok(CallResult::Success(work)) if work.is_empty() => None,
            Ok(CallResult::Success(work)) => Some(
                work.iter()
                    .map(|a| v1::Assignment { group: a.group.0, prompt: Some((&a.prompt).into()), min_version: a.min_version.0 })
                    .collect(),
            ),
            Ok(CallResult::Timeout) => Some(Vec::new()),
            Ok(CallResult::SenderError) | Err(_) => None,
        }
    }

    fn delivered(&self, worker: &str, groups: &[u64], trajectories: u64, tokens: u64, generate_s: f64) {
        // A group can arrive twice: its worker was declared dead (the prompt was
        // issued again) and delivered after all. The learner ingests each
        // trajectory id once, so only the first delivery counts as made.
        let per_group = trajectories / groups.len().max(1) as u64;
        let fresh = {
            let mut seen = self.delivered.lock().unwrap_or_else(|e| e.into_inner());
            groups.iter().filter(|g| seen.insert(**g)).count() as u64
        };
        if fresh < groups.len() as u64 {
            tracing::warn!(worker, groups = groups.len() as u64 - fresh, "groups delivered a second time (not counted again)");
        }
        for g in groups {
            let _ = self.source.cast(SourceMsg::Delivered(GroupId(*g)));
        }
        let _ = self.metrics.cast(MetricsMsg::TrajectoriesMade { count: fresh * per_group, tokens, generate_s });
    }

    fn worker_failed(&self, worker: &str) {
        let _ = self.source.cast(SourceMsg::WorkerFailed(worker.to_string()));
    }
}

/// A complete group waiting for its step, with its lag and stream entries.
struct Held {
    trajectories: Vec<LabeledTrajectory>,
    lag: u64,
    entries: Vec<String>,
}

struct Loop {
    trainer: Option<Box<dyn Train>>,
    plan: LearnerPlan,
    control: Control,
    weights: Weights,
    source: ActorRef<SourceMsg>,
    metrics: ActorRef<MetricsMsg>,
    assembler: Assembler,
    redis: Redis,
    keys: RunKeys,
    buffer: Vec<Held>,
    started: Instant,
    last_eval: Option<u64>,
    duplicates: u64,
    trained: u64,
}

fn err(what: impl std::fmt::Display) -> String {
    what.to_string()
}

impl Loop {
    fn version(&self) -> u64 {
        self.trainer.as_ref().map_or(0, |t| t.version().0)
    }

    fn due(&self) -> Option<Finish> {
        if self.version() >= self.plan.max_steps {
            Some(Finish::MaxSteps)
        } else if self.plan.time_limit.is_some_and(|t| self.started.elapsed() >= t) {
            Some(Finish::TimeLimit)
        } else {
            None
        }
    }

    /// Runs `f` on the trainer on a blocking thread.
    async fn blocking<R: Send + 'static>(&mut self, f: impl FnOnce(&mut dyn Train) -> R + Send + 'static) -> Result<R, String> {
        let mut trainer = self.trainer.take().ok_or("learner backend lost by an earlier failure")?;
        let (trainer, out) = tokio::task::spawn_blocking(move || {
            let out = f(trainer.as_mut());
            (trainer, out)
        })
        .await
        .map_err(|e| format!("learner thread failed: {e}"))?;
        self.trainer = Some(trainer);
        Ok(out)
    }

    /// Publishes the trainer's current weights on the Weights service.
    async fn publish(&mut self) -> Result<(), String> {
        let set = self
            .blocking(|t| {
                let w = t.weights().map_err(err)?;
                let tensors = w.tensors.lock().map_err(|_| "weight set poisoned".to_string())?;
                super::weights::WeightSet::from_tensors(w.version.0, tensors.iter().map(|(n, t)| (n.as_str(), t))).map_err(err)
            })
            .await??;
        let version = set.version;
        self.weights.publish(set);
        self.control.set_policy_version(version);
        let _ = self.source.cast(SourceMsg::VersionPublished(PolicyVersion(version)));
        Ok(())
    }

    async fn evaluate(&mut self) -> Result<(), String> {
        let version = self.version();
        let span = tracing::info_span!("evaluate", actor = "learner", policy_version = version);
        let eval = self.blocking(move |b| span.in_scope(|| b.evaluate())).await?.map_err(err)?;
        self.last_eval = Some(version);
        self.metrics.cast(MetricsMsg::Evaluated { version, eval }).map_err(err)?;
        Ok(())
    }

    async fn checkpoint(&mut self) -> Result<(), String> {
        let cursor = match self.source.call(SourceMsg::GetCursor, Some(Duration::from_secs(30))).await {
            Ok(CallResult::Success(c)) => c,
            _ => return Err("prompt source did not answer with its cursor".into()),
        };
        let span = tracing::info_span!("checkpoint", actor = "learner", prompt_cursor = cursor);
        self.blocking(move |b| span.in_scope(|| b.checkpoint(cursor))).await?.map_err(err)
    }

    async fn drop_group(&mut self, reason: DropReason, size: u64, entries: &[String]) -> Result<(), String> {
        self.metrics.cast(MetricsMsg::Dropped { reason, trajectories: size }).map_err(err)?;
        self.control.record_dropped(reason.as_str(), size);
        let _ = self.source.cast(SourceMsg::GroupsRetired { count: 1 });
        self.assembler.ack(entries).await.map_err(err)
    }

    /// Takes what arrived on the labeled stream into the buffer (or drops it).
    async fn ingest(&mut self, redis_cfg: &redis::Config) -> Result<(), String> {
        let arrived = self.assembler.next(redis_cfg).await.map_err(err)?;
        let duplicates = self.assembler.duplicates();
        if duplicates > self.duplicates {
            // Labeled twice (a reward worker died between adding the label and
            // acknowledging the trajectory) or sampled twice: skipped, not lost.
            tracing::info!(skipped = duplicates - self.duplicates, "trajectories already ingested skipped");
            self.duplicates = duplicates;
        }
        let current = PolicyVersion(self.version());
        for group in arrived {
            match group {
                Assembled::Failed { size, entries, .. } => self.drop_group(DropReason::RewardFailed, size, &entries).await?,
                Assembled::Complete { trajectories, entries, .. } => {
                    let sampled = trajectories.iter().map(|l| l.trajectory.policy_version).min().unwrap_or(current);
                    let lag = sampled.lag_behind(current);
                    let verdict = if lag > self.plan.max_staleness && self.plan.stale == StalePolicy::Drop {
                        Err(DropReason::Stale)
                    } else {
                        self.trainer.as_ref().ok_or("learner backend lost")?.admit(&trajectories)
                    };
                    match verdict {
                        Ok(()) => self.buffer.push(Held { trajectories, lag, entries }),
                        Err(reason) => self.drop_group(reason, trajectories.len() as u64, &entries).await?,
                    }
                }
            }
        }
        Ok(())
    }

    async fn step(&mut self, wait_s: f64) -> Result<(), String> {
        let n = self.plan.batch_groups;
        let batch: Vec<Held> = self.buffer.drain(..n).collect();
        let lags: Vec<u64> = batch.iter().map(|h| h.lag).collect();
        let entries: Vec<String> = batch.iter().flat_map(|h| h.entries.iter().cloned()).collect();
        let groups: Vec<Vec<LabeledTrajectory>> = batch.into_iter().map(|h| h.trajectories).collect();
        let (reward, accuracy, step_accuracy) = batch_outcomes(groups.iter().flatten());
        let version = self.version();
        let started = Instant::now();
        let span = tracing::info_span!("train", actor = "learner", policy_version = version, groups = n);
        let lags_for_step = lags.clone();
        let report = self
            .blocking(move |b| span.in_scope(|| b.train(groups, &lags_for_step)))
            .await?
            .map_err(|e| format!("learner step {} failed: {e}", version + 1))?;
        let train_s = started.elapsed().as_secs_f64();
        self.publish().await?;
        self.assembler.ack(&entries).await.map_err(err)?;
        let _ = self.source.cast(SourceMsg::GroupsRetired { count: n });
        let new_version = self.version();
        self.trained += report.trajectories as u64;
        self.control.set_progress(new_version, self.plan.max_steps, self.trained);
        self.metrics
            .cast(MetricsMsg::StepCompleted(Box::new(StepEvent {
                version: new_version,
                report,
                lags,
                reward,
                accuracy,
                step_accuracy,
                train_s,
                wait_s,
            })))
            .map_err(err)?;
        if self.plan.eval_every > 0 && new_version % self.plan.eval_every == 0 {
            self.evaluate().await?;
        }
        if self.plan.checkpoint_every > 0 && new_version % self.plan.checkpoint_every == 0 {
            self.checkpoint().await?;
        }
        Ok(())
    }

    async fn update_queues(&self) {
        let mut queues = Vec::new();
        for (stream, group) in [(&self.keys.sampled, REWARD_GROUP), (&self.keys.labeled, LEARNER_GROUP)] {
            match self.redis.depth(stream, group).await {
                Ok(d) => queues.push(d),
                Err(e) => tracing::warn!(stream = %stream, error = %e, "cannot read the stream's depth"),
            }
        }
        self.control.set_queues(queues);
    }

    /// Stops the workers and counts what is left where.
    async fn finish(&mut self, why: &Finish, drain: Duration) -> Result<(), String> {
        tracing::info!(reason = ?why, policy_version = self.version(), "learner finishing");
        let _ = self.source.cast(SourceMsg::Stop);
        if self.last_eval != Some(self.version()) {
            self.evaluate().await?;
        }
        self.checkpoint().await?;
        self.control.request_shutdown(&format!("{why:?}"));
        // Workers finish what they are doing, deliver it and leave.
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline {
            let alive = self.control.status().workers.iter().filter(|w| w.state() == v1::WorkerState::Alive).count();
            if alive == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let alive: Vec<String> = self
            .control
            .status()
            .workers
            .into_iter()
            .filter(|w| w.state() == v1::WorkerState::Alive)
            .map(|w| w.worker_id)
            .collect();
        if !alive.is_empty() {
            tracing::warn!(?alive, "workers still alive at the end of the run; counting the streams anyway");
        }
        let held: usize = self.buffer.iter().map(|h| h.trajectories.len()).sum();
        self.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "learner", trajectories: held as u64 }).map_err(err)?;
        for (stage, stream, group) in
            [("sampled stream", &self.keys.sampled, REWARD_GROUP), ("labeled stream", &self.keys.labeled, LEARNER_GROUP)]
        {
            let d = self.redis.depth(stream, group).await.map_err(err)?;
            let mut n = d.waiting + d.pending;
            if stage == "labeled stream" {
                // The buffer's entries are still in the stream, counted above.
                n = n.saturating_sub(held as u64);
            }
            self.metrics.cast(MetricsMsg::InFlightAtShutdown { stage, trajectories: n }).map_err(err)?;
        }
        Ok(())
    }
}

/// Runs the learner until `plan.max_steps`, its time limit, a failure, or
/// `shutdown`; then stops the workers and returns the accounting.
pub async fn run(role: LearnerRole, redis_cfg: &redis::Config, shutdown: impl Future<Output = ()>) -> Result<Summary, String> {
    let LearnerRole { trainer, plan, task, cursor, control, weights, redis, keys, metrics_path, progress, drain } = role;
    let started = Instant::now();
    let (metrics, metrics_task) =
        Actor::spawn(None, Metrics, MetricsArgs { path: metrics_path, progress }).await.map_err(|e| format!("starting metrics: {e}"))?;
    let max_outstanding = plan.batch_groups * (1 + plan.max_staleness as usize);
    let (source, source_task) = Actor::spawn(None, PromptSource, SourceArgs { task, cursor, max_outstanding, version: trainer.version() })
        .await
        .map_err(|e| format!("starting the prompt source: {e}"))?;
    let assembler = Assembler::new(&redis, &keys, "learner").await.map_err(err)?;
    let mut l = Loop {
        trainer: Some(trainer),
        plan,
        control: control.clone(),
        weights,
        source: source.clone(),
        metrics: metrics.clone(),
        assembler,
        redis,
        keys,
        buffer: Vec::new(),
        started,
        last_eval: None,
        duplicates: 0,
        trained: 0,
    };
    let result = async {
        l.publish().await?;
        control.set_progress(l.version(), l.plan.max_steps, 0);
        control.set_work_source(Arc::new(SourceBridge { source: source.clone(), metrics: metrics.clone(), delivered: Default::default() }));
        l.evaluate().await?;
        tokio::pin!(shutdown);
        let mut waited = Instant::now();
        let mut queues_at = Instant::now();
        let why = loop {
            if let Some(why) = l.due() {
                break why;
            }
            tokio::select! {
                r = l.ingest(redis_cfg) => r?,
                _ = &mut shutdown => break Finish::Interrupted,
            }
            if queues_at.elapsed() >= Duration::from_secs(1) {
                l.update_queues().await;
                queues_at = Instant::now();
            }
            if l.buffer.len() >= l.plan.batch_groups {
                l.step(waited.elapsed().as_secs_f64()).await?;
                waited = Instant::now();
            }
        };
        l.finish(&why, drain).await?;
        Ok::<_, String>(why)
    }
    .await;
    if result.is_err() {
        control.request_shutdown("the learner failed");
    }
    source.stop(None);
    let _ = source_task.await;
    let ledger = match metrics.call(MetricsMsg::GetLedger, Some(Duration::from_secs(30))).await {
        Ok(CallResult::Success(l)) => l,
        _ => return Err("metrics did not answer with the ledger".into()),
    };
    let _ = metrics.call(MetricsMsg::Flush, Some(Duration::from_secs(30))).await;
    metrics.stop(None);
    let _ = metrics_task.await;
    let finish = result?;
    tracing::info!(%ledger, balanced = ledger.balanced(), "run accounting");
    Ok(Summary { finish, ledger, wall: started.elapsed() })
}
