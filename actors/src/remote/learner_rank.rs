//! A data-parallel learner rank (`prism learner-rank`, `dist.learner_ranks
//! > 1`): a process that trains every step alongside the learner that owns
//! the run (rank 0), so that each step's rows are shared out among the ranks
//! and their gradients summed (see `prism_learner::Learner::join_data_parallel`).
//!
//! ```text
//! Register (role LEARNER) ──▶ rank r of dist.learner_ranks, heartbeats
//! GetNcclId "learner-dp"  ──▶ join the communicator; rank 0's weights, optimizer state and RNG arrive
//! GetStep 0, 1, 2, …      ──▶ the groups rank 0 trains each step on ──▶ train_step (collectives with the others)
//!         → checkpoint    ──▶ rank 0 writes one: send it this rank's optimizer shares (dist.shard)
//! GetStep → stopped       ──▶ leave
//! ```
//!
//! Rank 0 publishes a step's groups before it trains on them, and its
//! training waits in the collectives for every rank, so the ranks move in
//! lockstep: a rank cannot fall behind by more than the step it is fetching.
//! A rank that dies fails rank 0's next collective within
//! `dist.nccl_timeout_ms` (and rank 0 refuses to start a step once the rank
//! missed its heartbeats); a rank 0 that dies fails this rank the same way.

use prism_transport::control::{ControlClient, Counters, Membership, NcclId, StepPoll};
use prism_transport::{Error, Result};
use crate::backend::BackendResult;
use prism_core::LabeledTrajectory;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The NCCL group of the data-parallel learner ranks.
pub const GROUP: &str = "learner-dp";

/// The learner a rank trains. Runs on a blocking thread.
pub trait RankTrainer: Send + 'static {
    /// Joins the communicator `id` as `rank` of `id.world_size` and takes rank
    /// 0's state; blocks until every rank has joined.
    fn join(&mut self, id: &NcclId, rank: usize) -> BackendResult<()>;
    /// One step on the same groups as rank 0, in its order.
    fn train(&mut self, groups: Vec<Vec<LabeledTrajectory>>) -> BackendResult<()>;
    /// Rank 0 writes a checkpoint now: hand it what only this rank holds
    /// (its optimizer shares, when the ranks shard them).
    fn checkpoint(&mut self) -> BackendResult<()>;
}

pub struct RankArgs {
    pub control: ControlClient,
    /// From `control::join` with role LEARNER: the rank, the worker id, shutdown.
    pub membership: watch::Receiver<Membership>,
    pub counters: Arc<Counters>,
    pub trainer: Box<dyn RankTrainer>,
    /// How long one GetStep (and GetNcclId) request may wait on the learner.
    pub poll: Duration,
    /// Its liveness: every answer from rank 0 is progress.
    pub health: prism_transport::health::Health,
}

/// What a rank did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RankSummary {
    pub rank: usize,
    pub world: usize,
    pub steps: u64,
    pub trajectories: u64,
    /// The policy version of the last step trained.
    pub version: u64,
    /// Checkpoints of rank 0's it took part in.
    pub checkpoints: u64,
}


/// Joins rank 0 and trains each step it publishes until it stops, `shutdown`,
/// or a failure (which is the run's: the ranks cannot go on without each other).
pub async fn run(args: RankArgs, shutdown: impl Future<Output = ()>) -> Result<RankSummary> {
    let RankArgs { mut control, membership, counters, trainer, poll, health } = args;
    let rank = membership.borrow().nccl_rank as usize;
    let failed = |reason: String| Error::LearnerRank { rank, reason };
    if rank == 0 {
        return Err(failed("the learner handed this process no rank".into()));
    }
    tokio::pin!(shutdown);
    let started = Instant::now();
    let id = loop {
        tokio::select! {
            r = control.wait_nccl_id(GROUP, poll) => match r? {
                Some(id) => break id,
                None => tracing::info!(waited_s = started.elapsed().as_secs(), "rank 0 has not published the learner group's NCCL id yet (warm start?)"),
            },
            _ = &mut shutdown => return Ok(RankSummary { rank, ..Default::default() }),
        }
    };
    let world = id.world_size as usize;
    tracing::info!(rank, world, "joining the data-parallel learner ranks");
    let mut trainer = tokio::task::spawn_blocking(move || {
        let mut trainer = trainer;
        trainer.join(&id, rank).map(|()| trainer)
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(format!("joining: {}", e.0)))?;
    tracing::info!(rank, world, "joined: training rank 0's steps");
    let mut summary = RankSummary { rank, world, ..Default::default() };
    // Steps and checkpoints share one index.
    let mut next = 0u64;
    loop {
        let worker_id = membership.borrow().worker_id.clone();
        let batch = tokio::select! {
            r = control.get_step(&worker_id, next, poll) => r?,
            _ = &mut shutdown => break,
        };
        health.beat();
        let batch = match batch {
            StepPoll::Ready(step) => step,
            StepPoll::Waiting => continue,
            StepPoll::Stopped => break,
            StepPoll::Checkpoint { index } => {
                trainer = tokio::task::spawn_blocking(move || {
                    let mut trainer = trainer;
                    trainer.checkpoint().map(|()| trainer)
                })
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| failed(format!("rank 0's checkpoint after step {index}: {}", e.0)))?;
                summary.checkpoints += 1;
                next += 1;
                continue;
            }
        };
        let groups = batch.groups;
        let trajectories: u64 = groups.iter().map(|g| g.len() as u64).sum();
        trainer = tokio::task::spawn_blocking(move || {
            let mut trainer = trainer;
            trainer.train(groups).map(|()| trainer)
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(format!("step {} (policy version {}): {}", batch.index, batch.version, e.0)))?;
        summary.steps += 1;
        next += 1;
        summary.trajectories += trajectories;
        summary.version = batch.version;
        counters.processed.fetch_add(trajectories, Relaxed);
        counters.policy_version.store(batch.version, Relaxed);
    }
    let worker_id = membership.borrow().worker_id.clone();
    if let Err(e) = control.shutdown(&worker_id, "finished").await {
        tracing::warn!(error = %e, "telling the learner this rank leaves failed");
    }
    Ok(summary)
}

#[cfg(test)]
mod tests;
