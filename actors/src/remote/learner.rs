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
//! Each step's metrics row carries the reward health of the run's reward
//! processes, as their latest heartbeats reported it ([`RewardHealth`]).
//!
//! A group's stream entries are acknowledged once it is trained on or dropped.
//! A group delivered but not fully labeled within `dist.group_timeout_ms` (a
//! member lost or undecodable) is dropped as `incomplete`, so its credit
//! returns. Group ids start at `first_group`: a resumed learner numbers its
//! groups past every id an earlier learner of the run handed out (the run's
//! reservation in Redis, which this loop keeps ahead of the prompt source), and
//! drops what arrives of the earlier ones as `superseded`.
//! At the end the learner asks every worker to stop, waits for them to leave,
//! and counts what is still in the streams as in flight, so the ledger
//! (`made = trained + dropped + in flight`) is checked against Redis itself.

use prism_transport::assembly::{Assembled, Assembler};
use prism_transport::control::{Control, WorkSource};
use prism_transport::redis::{self, Redis, RunKeys, LEARNER_GROUP, REWARD_GROUP};
use prism_transport::weights::Weights;
use prism_transport::weights::{Part, WeightBytes};
use crate::error::Error;
use crate::backend::{Assignment, BackendError, DropReason, Label, LabelFuture, Train, WeightSet};
use crate::learner::{Core, Finish, LearnerPlan};
use crate::metrics::{Metrics, MetricsArgs, MetricsMsg, Progress};
use crate::source::{PromptSource, SourceArgs, SourceMsg};
use crate::supervisor::Summary;
use prism_core::{GroupId, LabeledTrajectory};
use prism_rollout::curriculum::Curriculum;
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
    /// The curriculum (continued from the checkpoint on resume).
    pub curriculum: Curriculum,
    /// Group id of prompt `cursor`: past every group id an earlier learner
    /// of the run handed out (`Redis::issued_below`), and at least `cursor`.
    pub first_group: u64,
    /// `dist.group_timeout_ms` (`None`: wait forever).
    pub group_timeout: Option<Duration>,
    pub control: Control,
    pub weights: Weights,
    pub redis: Redis,
    pub keys: RunKeys,
    /// `metrics.jsonl` of the run folder.
    pub metrics_path: Option<PathBuf>,
    pub progress: watch::Sender<Progress>,
    /// How long the end of the run waits for workers to leave.
    pub drain: Duration,
    /// With `dist.weights = "nccl"`: broadcasts each published version to
    /// the rollout GPUs (which also keep the Weights stream to fall back on).
    pub broadcast: Option<prism_transport::nccl_weights::Sender>,
    /// `dist.learner_ranks`: with more than one, `trainer` has joined the
    /// data-parallel ranks, and each step's groups are published on Control
    /// for the others before it trains on them.
    pub learner_ranks: usize,
    /// Its liveness: every turn of the loop (a read of the labeled stream, a
    /// step) is progress.
    pub health: prism_transport::health::Health,
}

/// Hands the PromptSource's prompts to remote rollout workers.
struct SourceBridge {
    source: ActorRef<SourceMsg>,
    metrics: ActorRef<MetricsMsg>,
    /// Groups counted as made so far.
    reported: Reported,
    /// Groups delivered and not yet taken off the labeled stream.
    awaiting: Awaiting,
    /// Groups below this id were issued by an earlier learner of the run.
    first_group: u64,
}

/// The groups counted as made, shared by the Delivered reports and the end of
/// the run's reconciliation.
type Reported = Arc<std::sync::Mutex<std::collections::HashSet<u64>>>;

/// Groups delivered and not yet taken off the labeled stream: when their
/// Delivered report came, and their size.
type Awaiting = Arc<std::sync::Mutex<std::collections::HashMap<u64, (Instant, u64)>>>;

#[prism_transport::async_trait]
impl WorkSource for SourceBridge {
    async fn get_work(&self, worker: &str, max: usize, wait: Duration) -> Option<Vec<Assignment>> {
        let worker = worker.to_string();
        match self.source.call(|reply| SourceMsg::GetWork { worker, max, reply }, Some(wait)).await {
            // The source answers an empty list only once it has stopped.
            Ok(CallResult::Success(work)) if work.is_empty() => None,
            Ok(CallResult::Success(work)) => Some(work),
            Ok(CallResult::Timeout) => Some(Vec::new()),
            Ok(CallResult::SenderError) | Err(_) => None,
        }
    }

    fn delivered(&self, worker: &str, groups: &[u64], trajectories: u64, tokens: u64, generate_s: f64) {
        // A group can arrive twice: its worker was declared dead (the prompt was
        // issued again) and delivered after all. The learner ingests each
        // trajectory id once, so only the first delivery counts as made.
        let per_group = trajectories / groups.len().max(1) as u64;
        // An earlier learner's groups (a worker that sampled for it and joined
        // this one) are not made in this run: if they reach the labeled
        // stream, they are counted there, and dropped as superseded.
        let (earlier, ours): (Vec<u64>, Vec<u64>) = groups.iter().partition(|g| **g < self.first_group);
        if !earlier.is_empty() {
            tracing::warn!(worker, groups = earlier.len(), "groups delivered that an earlier learner of the run issued (dropped as superseded)");
        }
        // Reported and awaited in one step, under the `reported` lock the
        // learner's ingestion also holds (see `ingest`): else a group
        // ingested between the two would be awaited after it was taken, and
        // counted lost at the end besides trained or dropped.
        let fresh: Vec<u64> = {
            let mut seen = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            let fresh: Vec<u64> = ours.iter().copied().filter(|g| seen.insert(*g)).collect();
            let mut awaiting = self.awaiting.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            awaiting.extend(fresh.iter().map(|g| (*g, (now, per_group))));
            fresh
        };
        if fresh.len() < ours.len() {
            tracing::warn!(worker, groups = ours.len() - fresh.len(), "groups delivered a second time (not counted again)");
        }
        let fresh = fresh.len() as u64;
        for g in groups {
            let _ = self.source.cast(SourceMsg::Delivered(GroupId(*g)));
        }
        let _ = self.metrics.cast(MetricsMsg::TrajectoriesMade { count: fresh * per_group, tokens, generate_s });
    }

    fn worker_failed(&self, worker: &str) {
        let _ = self.source.cast(SourceMsg::WorkerFailed(worker.to_string()));
    }
}

/// The reward health of a distributed run, for the metrics rows: the live
/// reward workers' latest heartbeats, merged ([`merge_health`]), with how many
/// reported (`reward_workers`). It labels nothing: the reward processes do.
pub struct RewardHealth {
    pub control: Control,
}

impl Label for RewardHealth {
    fn label<'a>(&'a self, _: &'a prism_core::Trajectory) -> LabelFuture<'a> {
        Box::pin(async { Err(BackendError::new("the distributed learner labels nothing: its reward processes do")) })
    }

    fn health(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        let reported: Vec<prism_reward::Health> = self.control.reward_health().into_iter().map(|(_, h)| h).collect();
        let merged = merge_health(&reported)?;
        let serde_json::Value::Object(mut m) = serde_json::to_value(merged).ok()? else { return None };
        m.insert("reward_workers".into(), reported.len().into());
        Some(m)
    }
}

/// One health for several reward processes: queue counts and budget refusals
/// summed, the worst latency quantiles, canary rate and judge wait, the mean
/// agreement; the judge trusted and the distilled model ready only where every
/// process says so. `None` when none reported.
pub fn merge_health(all: &[prism_reward::Health]) -> Option<prism_reward::Health> {
    fn max(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
        values.flatten().reduce(f64::max)
    }
    fn all_true(values: impl Iterator<Item = Option<bool>>) -> Option<bool> {
        values.flatten().reduce(|a, b| a && b)
    }
    fn sum(values: impl Iterator<Item = Option<u64>>) -> Option<u64> {
        values.flatten().reduce(|a, b| a + b)
    }
    fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
        let v: Vec<f64> = values.flatten().collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
    if all.is_empty() {
        return None;
    }
    let agreements: Vec<f64> = all.iter().filter_map(|h| h.distill_agreement).collect();
    let latencies: Vec<prism_reward::LatencyMs> = all.iter().filter_map(|h| h.judge_latency_ms).collect();
    let queues: Vec<&prism_reward::QueueHealth> = all.iter().filter_map(|h| h.annotation_queue.as_ref()).collect();
    Some(prism_reward::Health {
        judge_wait_ms: all.iter().filter_map(|h| h.judge_wait_ms).max(),
        judge_latency_ms: (!latencies.is_empty()).then(|| prism_reward::LatencyMs {
            p50: latencies.iter().map(|l| l.p50).fold(0.0, f64::max),
            p95: latencies.iter().map(|l| l.p95).fold(0.0, f64::max),
        }),
        annotation_queue: (!queues.is_empty()).then(|| {
            queues.iter().fold(prism_reward::QueueHealth::default(), |a, q| prism_reward::QueueHealth {
                depth: a.depth + q.depth,
                capacity: a.capacity + q.capacity,
                busy: a.busy + q.busy,
                queued: a.queued + q.queued,
                judged: a.judged + q.judged,
                shed: a.shed + q.shed,
                untrusted: a.untrusted + q.untrusted,
            })
        }),
        canary_fp_rate: max(all.iter().map(|h| h.canary_fp_rate)),
        canary_max_rate: max(all.iter().map(|h| h.canary_max_rate)),
        judge_trusted: all_true(all.iter().map(|h| h.judge_trusted)),
        distill_agreement: (!agreements.is_empty()).then(|| agreements.iter().sum::<f64>() / agreements.len() as f64),
        distill_min_agreement: max(all.iter().map(|h| h.distill_min_agreement)),
        distill_ready: all_true(all.iter().map(|h| h.distill_ready)),
        judge_budget_refused: sum(all.iter().map(|h| h.judge_budget_refused)),
        distill_keep_rate: mean(all.iter().map(|h| h.distill_keep_rate)),
        implicit_loss: mean(all.iter().map(|h| h.implicit_loss)),
        implicit_updates: sum(all.iter().map(|h| h.implicit_updates)),
    })
}

/// A complete group waiting for its step, with its lag and stream entries.
struct Held {
    trajectories: Vec<LabeledTrajectory>,
    lag: u64,
    entries: Vec<String>,
}

/// How many group ids past what the prompt source can have issued the
/// reservation in Redis runs ahead (raised when less than half is left).
const RESERVE_AHEAD: u64 = 4096;

struct Loop {
    /// Groups counted as made (see `SourceBridge`).
    reported: Reported,
    awaiting: Awaiting,
    group_timeout: Option<Duration>,
    /// Ids of the groups this learner issues start here.
    first_group: u64,
    /// Credits returned to the prompt source so far: it can have issued at
    /// most `retired + max_outstanding` groups.
    retired: u64,
    max_outstanding: u64,
    /// The group-id reservation as last written to Redis.
    reserved: u64,
    /// The groups the learner took off the labeled stream (trained on or
    /// dropped) before their Delivered report arrived, with their sizes
    /// (rare: the others are counted already and need no remembering).
    ingested: std::collections::HashMap<u64, u64>,
    /// Groups counted at the end as partly lost (members in no stream), with
    /// the trajectory ids that were in a stream then: members that reach a
    /// stream afterwards were counted in that drop, not in flight.
    lost_at_end: std::collections::HashMap<u64, std::collections::HashSet<u64>>,
    core: Core,
    control: Control,
    weights: Weights,
    broadcast: Option<prism_transport::nccl_weights::Sender>,
    learner_ranks: usize,
    metrics: ActorRef<MetricsMsg>,
    assembler: Assembler,
    redis: Redis,
    keys: RunKeys,
    buffer: Vec<Held>,
    duplicates: u64,
    trained: u64,
}

impl Loop {
    /// Puts `weights` on the Weights service (converted on a blocking thread),
    /// and queues it for the NCCL broadcast.
    async fn publish(&mut self, weights: Arc<WeightSet>) -> Result<(), Error> {
        if let Some(b) = &self.broadcast {
            // Fails the run if an earlier broadcast failed (a rank is gone).
            b.publish(weights.clone())?;
        }
        // A LoRA policy's versions go out as their adapters (a few percent
        // of the model's bytes), merged by each rollout process over the
        // frozen base, which goes out once; every other policy's whole.
        let base_held = self.weights.base_id();
        let (set, base) = tokio::task::spawn_blocking(move || {
            let poisoned = || Error::Thread("weight set poisoned".into());
            let version = weights.version.0;
            let Some(lora) = &weights.lora else {
                let tensors = weights.tensors.lock().map_err(|_| poisoned())?;
                return Ok::<_, Error>((WeightBytes::from_tensors(version, tensors.iter().map(|(n, t)| (n.as_str(), t)))?, None));
            };
            let base = match base_held {
                0 => {
                    let mut tensors = lora.base.lock().map_err(|_| poisoned())?.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect::<Vec<_>>();
                    tensors.sort_by(|a, b| a.0.cmp(&b.0));
                    let base = WeightBytes::from_tensors(0, tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
                    let id = prism_transport::weights::base_id(&base.tensors);
                    Some(base.with_part(Part::Base { id }))
                }
                _ => None,
            };
            let id = base.as_ref().map_or(base_held, |b| b.part.to_wire().0);
            let adapters = lora.adapters.lock().map_err(|_| poisoned())?;
            let set = WeightBytes::from_tensors(version, adapters.iter().map(|(n, t)| (n.as_str(), t)))?;
            Ok((set.with_part(Part::Adapters { base: id, scale: lora.scale }), base))
        })
        .await
        .map_err(|e| Error::Thread(format!("converting the weights: {e}")))??;
        if let Some(base) = base {
            self.weights.publish_base(base);
        }
        let version = set.version;
        self.weights.publish(set);
        self.control.set_policy_version(version);
        Ok(())
    }

    /// Drops group `group` (its `members` when known, for the curriculum).
    async fn drop_group(
        &mut self,
        group: u64,
        reason: DropReason,
        members: &[LabeledTrajectory],
        size: u64,
        entries: &[String],
    ) -> Result<(), Error> {
        if group < self.first_group {
            self.core.dropped_uncredited(reason, size)?;
        } else {
            self.core.dropped(reason, members, size)?;
            self.retired += 1;
        }
        self.control.record_dropped(reason.as_str(), size);
        Ok(self.assembler.ack(entries).await?)
    }

    /// Keeps the run's group-id reservation ahead of every id the prompt
    /// source can issue before the next call.
    async fn reserve(&mut self) -> Result<(), Error> {
        let can_issue = self.first_group + self.retired + self.max_outstanding;
        if can_issue + RESERVE_AHEAD / 2 > self.reserved {
            self.reserved = can_issue + RESERVE_AHEAD;
            self.redis.reserve_issued(&self.keys, self.reserved).await?;
        }
        Ok(())
    }

    /// Drops the groups delivered longer than `dist.group_timeout_ms` ago and
    /// still not fully labeled.
    async fn expire(&mut self) -> Result<(), Error> {
        let Some(timeout) = self.group_timeout else { return Ok(()) };
        let overdue: Vec<(u64, u64)> = {
            let mut awaiting = self.awaiting.lock().unwrap_or_else(|e| e.into_inner());
            let overdue: Vec<(u64, u64)> =
                awaiting.iter().filter(|(_, (at, _))| at.elapsed() >= timeout).map(|(g, (_, size))| (*g, *size)).collect();
            for (g, _) in &overdue {
                awaiting.remove(g);
            }
            overdue
        };
        for (group, size) in overdue {
            // Taken off the stream before its report came: not missing.
            if self.ingested.contains_key(&group) {
                continue;
            }
            let Some(entries) = self.assembler.abandon(GroupId(group)) else { continue };
            tracing::warn!(
                group,
                arrived = entries.len(),
                size,
                timeout_ms = timeout.as_millis() as u64,
                "group dropped as incomplete: not every member arrived labeled within dist.group_timeout_ms"
            );
            self.drop_group(group, DropReason::Incomplete, &[], size, &entries).await?;
        }
        Ok(())
    }

    /// Takes what arrived on the labeled stream into the buffer (or drops it).
    async fn ingest(&mut self, redis_cfg: &redis::Config) -> Result<(), Error> {
        let undecodable = self.assembler.undecodable();
        let arrived = self.assembler.next(redis_cfg).await?;
        let bad = self.assembler.undecodable() - undecodable;
        if bad > 0 {
            // Each is logged with its entry id; its group ends as incomplete.
            self.metrics.cast(MetricsMsg::Undecodable { entries: bad })?;
        }
        let duplicates = self.assembler.duplicates();
        if duplicates > self.duplicates {
            // Labeled twice (a reward worker died between adding the label and
            // acknowledging the trajectory) or sampled twice: skipped, not lost.
            tracing::info!(skipped = duplicates - self.duplicates, "trajectories already ingested skipped");
            self.duplicates = duplicates;
        }
        for group in arrived {
            let (id, size) = match &group {
                Assembled::Failed { group, size, .. } => (group.0, *size),
                Assembled::Complete { group, trajectories, .. } => {
                    let (rejected, tokens) = crate::metrics::rejected(trajectories.iter().map(|lt| &lt.trajectory));
                    if rejected > 0 {
                        self.metrics.cast(MetricsMsg::Rejected { trajectories: rejected, tokens })?;
                    }
                    (group.0, trajectories.len() as u64)
                }
            };
            {
                // Under the `reported` lock, as a Delivered report records its
                // groups: the report comes wholly before this or wholly after.
                let reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
                if !reported.contains(&id) {
                    self.ingested.insert(id, size);
                }
                self.awaiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            }
            match group {
                Assembled::Failed { entries, .. } | Assembled::Complete { entries, .. } if id < self.first_group => {
                    tracing::info!(group = id, trajectories = size, "dropping a group an earlier learner of the run issued");
                    self.drop_group(id, DropReason::Superseded, &[], size, &entries).await?
                }
                Assembled::Failed { size, entries, .. } => self.drop_group(id, DropReason::RewardFailed, &[], size, &entries).await?,
                Assembled::Complete { trajectories, entries, .. } => match self.core.admit(&trajectories) {
                    Ok(lag) => self.buffer.push(Held { trajectories, lag, entries }),
                    Err(reason) => self.drop_group(id, reason, &trajectories, trajectories.len() as u64, &entries).await?,
                },
            }
        }
        Ok(())
    }

    async fn step(&mut self, wait_s: f64) -> Result<(), Error> {
        let n = self.core.plan.batch_groups;
        let batch: Vec<Held> = self.buffer.drain(..n).collect();
        let entries: Vec<String> = batch.iter().flat_map(|h| h.entries.iter().cloned()).collect();
        let trajectories: u64 = batch.iter().map(|h| h.trajectories.len() as u64).sum();
        if self.learner_ranks > 1 {
            let lost = self.control.lost_learner_ranks();
            if let Some((rank, worker)) = lost.first() {
                return Err(Error::Run(format!(
                    "data-parallel learner rank {rank} ({worker}) stopped heartbeating or left: the {} ranks cannot train \
                     another step without it",
                    self.learner_ranks
                )));
            }
            let groups: Vec<Vec<LabeledTrajectory>> = batch.iter().map(|h| h.trajectories.clone()).collect();
            self.control.publish_step(self.core.version().0 + 1, &groups);
        }
        let (weights, done) = self.core.train(batch.into_iter().map(|h| (h.trajectories, h.lag)).collect(), wait_s).await?;
        self.publish(weights).await?;
        self.assembler.ack(&entries).await?;
        self.trained += trajectories;
        self.retired += n as u64;
        self.control.set_progress(self.core.version().0, self.core.plan.max_steps, self.trained);
        self.core.commit(done).await
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

    /// Counts as made the trajectories whose worker added them to the sampled
    /// stream but whose Delivered report never reached the learner (the worker
    /// died or was cut off between the two): they are trained on, dropped or
    /// still in a stream, and would otherwise be missing from the ledger.
    async fn count_unreported(&mut self) -> Result<(), Error> {
        let (sampled, bad_sampled) = self.redis.groups_in::<prism_core::Trajectory>(&self.keys.sampled).await?;
        let (labeled, bad_labeled) = self.redis.groups_in::<prism_core::LabelResult>(&self.keys.labeled).await?;
        if bad_sampled + bad_labeled > 0 {
            tracing::warn!(entries = bad_sampled + bad_labeled, "stream entries that do not decode; they are not in the accounting");
        }
        // A group the learner took is counted whole; one still in the streams
        // by its distinct trajectories (a labeled one may also linger,
        // unacknowledged, in the sampled stream).
        let mut in_streams = sampled;
        for (g, ids) in labeled {
            in_streams.entry(g).or_default().extend(ids);
        }
        // Delivered groups with members neither taken off the labeled stream
        // nor in a stream are lost (e.g. undecodable, and not yet given up on).
        let awaiting: Vec<(u64, u64)> =
            self.awaiting.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(g, (_, size))| (g, size)).collect();
        for (g, size) in awaiting {
            let present = in_streams.get(&g).map_or(0, |ids| ids.len() as u64);
            if present < size && !self.ingested.contains_key(&g) {
                tracing::warn!(group = g, lost = size - present, "members of a delivered group are in no stream at the end; dropped as incomplete");
                self.core.dropped_uncredited(DropReason::Incomplete, size - present)?;
                self.lost_at_end.insert(g, in_streams.get(&g).cloned().unwrap_or_default());
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let (mut groups, mut trajectories) = (0u64, 0u64);
        let sizes = self.ingested.iter().map(|(g, n)| (*g, *n));
        for (g, n) in sizes.chain(in_streams.iter().map(|(g, ids)| (*g, ids.len() as u64))) {
            if reported.insert(g) {
                groups += 1;
                trajectories += n;
            }
        }
        drop(reported);
        if trajectories > 0 {
            tracing::warn!(
                groups,
                trajectories,
                "trajectories in the streams or ingested whose Delivered report never reached the learner; counted as made"
            );
            self.metrics.cast(MetricsMsg::TrajectoriesMade { count: trajectories, tokens: 0, generate_s: 0.0 })?;
        }
        Ok(())
    }

    /// Stops the workers and counts what is left where.
    async fn finish(&mut self, why: &Finish, source: &ActorRef<SourceMsg>, drain: Duration) -> Result<(), Error> {
        let _ = source.cast(SourceMsg::Stop);
        // The final checkpoint is written with the learner ranks (their
        // optimizer shares); then they train no step after the last one.
        let wrapped = self.core.wrap_up(why).await;
        self.control.stop_steps();
        wrapped?;
        self.control.request_shutdown(&format!("{why:?}"));
        // Workers finish what they are doing, deliver it and leave.
        let alive = |c: &Control| -> Vec<String> { c.alive_workers() };
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline && !alive(&self.control).is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = alive(&self.control);
        if !left.is_empty() {
            tracing::warn!(alive = ?left, "workers still alive at the end of the run; counting the streams anyway");
        }
        self.count_unreported().await?;
        let held: u64 = self.buffer.iter().map(|h| h.trajectories.len() as u64).sum();
        self.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "learner", trajectories: held })?;
        for (stage, stream, group) in
            [("sampled stream", &self.keys.sampled, REWARD_GROUP), ("labeled stream", &self.keys.labeled, LEARNER_GROUP)]
        {
            let d = self.redis.depth(stream, group).await?;
            let mut n = d.waiting + d.pending;
            if stage == "labeled stream" {
                // The buffer's entries are still in the stream, counted above.
                n = n.saturating_sub(held);
            }
            // Members of groups already dropped whole (failed, or given up on
            // after dist.group_timeout_ms while these were still on their
            // way), or counted lost just above while still being labeled,
            // are counted in that drop, not again as in flight.
            let ids = match stage {
                "sampled stream" => self.redis.groups_in::<prism_core::Trajectory>(stream).await?.0,
                _ => self.redis.groups_in::<prism_core::LabelResult>(stream).await?.0,
            };
            let counted: u64 = ids
                .iter()
                .map(|(g, t)| match self.lost_at_end.get(g) {
                    _ if self.assembler.has_failed(GroupId(*g)) => t.len() as u64,
                    // Members that were in no stream when the group was counted as partly lost.
                    Some(then) => t.difference(then).count() as u64,
                    None => 0,
                })
                .sum();
            if counted > 0 {
                tracing::info!(stage, trajectories = counted, "members of dropped groups left in the stream; counted in their drop");
            }
            n = n.saturating_sub(counted);
            self.metrics.cast(MetricsMsg::InFlightAtShutdown { stage, trajectories: n })?;
        }
        Ok(())
    }
}

/// Runs the learner until `plan.max_steps`, its time limit, a failure, or
/// `shutdown`; then stops the workers and returns the accounting.
pub async fn run(role: LearnerRole, redis_cfg: &redis::Config, shutdown: impl Future<Output = ()>) -> Result<Summary, Error> {
    let LearnerRole {
        trainer,
        plan,
        task,
        cursor,
        curriculum,
        first_group,
        group_timeout,
        control,
        weights,
        redis,
        keys,
        metrics_path,
        progress,
        drain,
        broadcast,
        learner_ranks,
        health,
    } = role;
    let started = Instant::now();
    let (metrics, metrics_task) = Actor::spawn(
        None,
        Metrics,
        MetricsArgs { path: metrics_path, progress, labeler: Some(Arc::new(RewardHealth { control: control.clone() })) },
    )
    .await
    .map_err(|e| Error::Run(format!("starting metrics: {e}")))?;
    let max_outstanding = plan.batch_groups * (1 + plan.max_staleness as usize);
    let source_args = SourceArgs { task, cursor, first_group, max_outstanding, version: trainer.version(), curriculum };
    let (source, source_task) = Actor::spawn(None, PromptSource, source_args)
        .await
        .map_err(|e| Error::Run(format!("starting the prompt source: {e}")))?;
    let assembler = Assembler::new(&redis, &keys, "learner").await?;
    let reported: Reported = Default::default();
    let awaiting: Awaiting = Default::default();
    let mut l = Loop {
        reported: reported.clone(),
        awaiting: awaiting.clone(),
        group_timeout,
        first_group,
        retired: 0,
        max_outstanding: max_outstanding as u64,
        reserved: 0,
        ingested: Default::default(),
        lost_at_end: Default::default(),
        core: Core::new(trainer, plan, source.clone(), metrics.clone()),
        control: control.clone(),
        weights,
        broadcast,
        learner_ranks,
        metrics: metrics.clone(),
        assembler,
        redis,
        keys,
        buffer: Vec::new(),
        duplicates: 0,
        trained: 0,
    };
    let result = async {
        let first = l.core.blocking(|t| t.weights()).await?.map_err(|e| Error::backend("the first weights", e))?;
        l.publish(first).await?;
        control.set_progress(l.core.version().0, l.core.plan.max_steps, 0);
        // Before any prompt goes out, the ids it may carry are reserved.
        l.reserve().await?;
        control.set_work_source(Arc::new(SourceBridge {
            source: source.clone(),
            metrics: metrics.clone(),
            reported: reported.clone(),
            awaiting,
            first_group,
        }));
        l.core.evaluate().await?;
        tokio::pin!(shutdown);
        let mut waited = Instant::now();
        let mut queues_at = Instant::now();
        let why = loop {
            if let Some(why) = l.core.due() {
                break why;
            }
            tokio::select! {
                r = l.ingest(redis_cfg) => r?,
                _ = &mut shutdown => break Finish::Interrupted,
            }
            l.expire().await?;
            if queues_at.elapsed() >= Duration::from_secs(1) {
                l.update_queues().await;
                queues_at = Instant::now();
            }
            if l.buffer.len() >= l.core.plan.batch_groups {
                l.step(waited.elapsed().as_secs_f64()).await?;
                waited = Instant::now();
            }
            l.reserve().await?;
            health.beat();
        };
        l.finish(&why, &source, drain).await?;
        Ok::<_, Error>(why)
    }
    .await;
    control.stop_steps();
    if result.is_err() {
        control.request_shutdown("the learner failed");
    }
    source.stop(None);
    let _ = source_task.await;
    let ledger = match metrics.call(MetricsMsg::GetLedger, Some(Duration::from_secs(30))).await {
        Ok(CallResult::Success(l)) => l,
        _ => return Err(Error::Unanswered("metrics did not answer with the ledger".into())),
    };
    let _ = metrics.call(MetricsMsg::Flush, Some(Duration::from_secs(30))).await;
    metrics.stop(None);
    let _ = metrics_task.await;
    let finish = result?;
    tracing::info!(%ledger, balanced = ledger.balanced(), "run accounting");
    Ok(Summary { finish, ledger, wall: started.elapsed() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prism_reward::{Health, LatencyMs, QueueHealth};

    fn health(depth: u64, shed: u64, p50: f64, p95: f64, agreement: Option<f64>, trusted: bool) -> Health {
        Health {
            judge_wait_ms: Some(0),
            judge_latency_ms: Some(LatencyMs { p50, p95 }),
            annotation_queue: Some(QueueHealth { depth, capacity: 1024, shed, ..Default::default() }),
            canary_fp_rate: Some(if trusted { 0.0 } else { 0.2 }),
            canary_max_rate: Some(0.05),
            judge_trusted: Some(trusted),
            distill_agreement: agreement,
            distill_min_agreement: Some(0.75),
            distill_ready: Some(agreement.is_some_and(|a| a >= 0.75)),
            judge_budget_refused: Some(2),
            ..Health::default()
        }
    }

    /// Two reward processes, one of them distrusting its judge: by hand, the
    /// queues sum, latencies and the canary rate take the worst, agreement the
    /// mean of those that have one, and trust/readiness need every process.
    #[test]
    fn reward_health_of_several_processes_merges_into_one() {
        assert_eq!(merge_health(&[]), None);
        let a = health(12, 3, 1480.0, 2900.0, Some(0.9), true);
        let b = health(5, 0, 1600.0, 2100.0, Some(0.7), false);
        let m = merge_health(&[a.clone(), b]).unwrap();
        let q = m.annotation_queue.clone().unwrap();
        assert_eq!((q.depth, q.capacity, q.shed), (17, 2048, 3));
        assert_eq!(m.judge_latency_ms, Some(LatencyMs { p50: 1600.0, p95: 2900.0 }));
        assert_eq!((m.canary_fp_rate, m.judge_trusted, m.distill_ready), (Some(0.2), Some(false), Some(false)));
        assert!((m.distill_agreement.unwrap() - 0.8).abs() < 1e-12);
        assert_eq!((m.judge_budget_refused, m.judge_wait_ms, m.canary_max_rate), (Some(4), Some(0), Some(0.05)));
        let no_distiller = Health { distill_agreement: None, distill_ready: None, distill_min_agreement: None, ..a.clone() };
        let m = merge_health(&[a.clone(), no_distiller]).unwrap();
        assert_eq!((m.distill_agreement, m.distill_ready, m.judge_trusted), (Some(0.9), Some(true), Some(true)));
        assert_eq!(merge_health(std::slice::from_ref(&a)), Some(a));
    }

    /// The metrics rows' health is what the live reward workers heartbeat.
    #[tokio::test]
    async fn the_metrics_health_merges_the_reward_workers_heartbeats() {
        use prism_transport::control::{ControlClient, Role};
        use prism_transport::testing::TestLearner;
        let l = TestLearner::start(&Default::default(), Default::default(), None).await;
        let source = RewardHealth { control: l.control.clone() };
        assert_eq!(source.health(), None, "no reward worker reported");
        let mut c = ControlClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
        let r1 = c.register(Role::Reward, "a", "cpu").await.unwrap().worker_id;
        let r2 = c.register(Role::Reward, "b", "cpu").await.unwrap().worker_id;
        let rollout = c.register(Role::Rollout, "c", "cpu").await.unwrap().worker_id;
        c.heartbeat_with_health(&r1, 0, Default::default(), Some(&health(12, 3, 1480.0, 2900.0, Some(0.9), true))).await.unwrap();
        c.heartbeat_with_health(&r2, 0, Default::default(), Some(&health(5, 0, 1600.0, 2100.0, Some(0.7), true))).await.unwrap();
        c.heartbeat(&rollout, 0, Default::default()).await.unwrap();
        let m = source.health().unwrap();
        assert_eq!(m["reward_workers"], 2);
        assert_eq!(m["annotation_queue"]["depth"], 17);
        assert_eq!(m["judge_latency_ms"]["p95"], 2900.0);
        assert_eq!(m["judge_trusted"], true);
        // A worker that leaves stops counting.
        c.shutdown(&r2, "done").await.unwrap();
        let m = source.health().unwrap();
        assert_eq!((m["reward_workers"].as_u64(), m["annotation_queue"]["depth"].as_u64()), (Some(1), Some(12)));
    }
}
