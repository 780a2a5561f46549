//! The reward role's loop: one consumer of the sampled stream (group
//! `reward`), labeling trajectories with the run's [`Label`] backend —
//! concurrently, each tried up to `attempts` times (a panic counts as a failed
//! try) — and adding each result to the labeled stream before acknowledging
//! the sampled entry. A crash between the two leaves the entry pending: another
//! reward process reclaims and labels it again, and the learner ingests the
//! trajectory once (its ids are deduplicated).
//!
//! Entries of reward workers the learner declared dead are taken over at once
//! (from the heartbeat's `dead_workers`); entries idle for
//! `redis.claim_idle_ms` are taken over in any case.

use super::control::{Counters, Membership};
use super::redis::{Config, Redis, RunKeys, REWARD_GROUP};
use super::Result;
use crate::backend::Label;
use futures::StreamExt;
use prism_core::{LabeledTrajectory, Trajectory};
use prism_proto::{LabelFailure, LabelResult};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::watch;

/// What a reward process needs.
pub struct RewardArgs {
    pub redis: Redis,
    pub keys: RunKeys,
    /// This worker's consumer name (its worker id).
    pub consumer: String,
    pub labeler: Arc<dyn Label>,
    /// Trajectories labeled at once.
    pub concurrency: usize,
    /// Tries per trajectory before it is reported as failed.
    pub attempts: u32,
    pub counters: Arc<Counters>,
    /// Heartbeat news: dead workers to take over from, and shutdown.
    pub membership: Option<watch::Receiver<Membership>>,
}

/// Counts at the end of a reward process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewardSummary {
    pub labeled: u64,
    pub failed: u64,
    pub reclaimed: u64,
}

async fn label_one(labeler: Arc<dyn Label>, t: Trajectory, attempts: u32) -> LabelResult {
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        let (l, traj) = (labeler.clone(), t.clone());
        match tokio::spawn(async move { l.label(&traj).await }).await {
            Ok(Ok(label)) => return Ok(LabeledTrajectory { trajectory: t, label }),
            Ok(Err(e)) => last = e.to_string(),
            Err(e) => last = if e.is_panic() { "the labeler panicked".to_string() } else { e.to_string() },
        }
        tracing::warn!(trajectory_id = t.id.0, attempt, error = %last, "labeling failed");
    }
    Err(LabelFailure { trajectory: t, error: format!("labeling failed {} times; last error: {last}", attempts.max(1)) })
}

/// Labels until `shutdown` resolves or the learner says the run is over.
pub async fn run(args: RewardArgs, config: &Config, shutdown: impl Future<Output = ()>) -> Result<RewardSummary> {
    let mut consumer = args.redis.consumer::<Trajectory>(&args.keys.sampled, REWARD_GROUP, &args.consumer, None).await?;
    let mut producer = args.redis.producer::<LabelResult>(&args.keys.labeled).await?;
    let mut summary = RewardSummary::default();
    let mut taken_over: HashSet<String> = HashSet::new();
    let mut membership = args.membership;
    tokio::pin!(shutdown);
    loop {
        let mut batch = None;
        if let Some(m) = &mut membership {
            let news = m.borrow_and_update().clone();
            if news.shutdown {
                break;
            }
            if let Some(dead) = news.dead_workers.iter().find(|d| d.starts_with("reward-") && **d != args.consumer && !taken_over.contains(*d)) {
                taken_over.insert(dead.clone());
                batch = Some(consumer.claim_from(dead, config).await?);
            }
        }
        let batch = match batch {
            Some(b) => b,
            None => tokio::select! {
                b = consumer.recv(config) => b?,
                _ = &mut shutdown => break,
            },
        };
        if batch.items.is_empty() {
            continue;
        }
        summary.reclaimed += batch.items.iter().filter(|d| d.reclaimed).count() as u64;
        let entries: Vec<String> = batch.items.iter().map(|d| d.entry.clone()).collect();
        args.counters.in_flight.store(entries.len() as u64, Relaxed);
        let results: Vec<LabelResult> = futures::stream::iter(batch.items)
            .map(|d| label_one(args.labeler.clone(), d.item, args.attempts))
            .buffered(args.concurrency.max(1))
            .collect()
            .await;
        let failed = results.iter().filter(|r| r.is_err()).count() as u64;
        producer.send(&results, config).await?;
        consumer.ack(&entries).await?;
        args.counters.in_flight.store(0, Relaxed);
        args.counters.processed.fetch_add(results.len() as u64 - failed, Relaxed);
        args.counters.dropped.fetch_add(failed, Relaxed);
        summary.labeled += results.len() as u64 - failed;
        summary.failed += failed;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests;
