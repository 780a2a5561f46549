//! The rollout role's loop: asks the learner for prompts (`Control.GetWork`),
//! brings its policy copy up to the newest version over the Weights stream
//! between generations (never during one), samples each group on a blocking
//! thread, adds the trajectories to the sampled stream (waiting while it is at
//! its cap), then reports them (`Control.Delivered`) so their leases end.
//!
//! A generation that fails makes the worker leave the run at once (its prompts
//! are issued again) and return the error; the process supervisor (compose,
//! Kubernetes) restarts it.

use prism_transport::control::{ControlClient, Counters, Membership};
use prism_transport::redis::{self, Redis, RunKeys};
use prism_transport::nccl_weights::Receiver;
use prism_transport::weights::WeightsClient;
use prism_transport::{Error, Result};
use crate::backend::{Assignment, Generate, WeightSet};
use prism_core::{PolicyVersion, Trajectory};
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What a rollout process needs.
pub struct RolloutArgs {
    pub control: ControlClient,
    pub weights: WeightsClient,
    pub redis: Redis,
    pub keys: RunKeys,
    pub generator: Box<dyn Generate>,
    /// Prompts asked for (and sampled together) at once.
    pub prompts_per_batch: usize,
    pub counters: Arc<Counters>,
    /// Heartbeat news: this worker's id, the newest version, shutdown.
    pub membership: watch::Receiver<Membership>,
    /// How long the learner may stay unreachable before the worker gives up.
    pub give_up_after: Duration,
    /// With `dist.weights = "nccl"` and a rank: the broadcast receiver, and
    /// how long to wait for an announced version before pulling it instead.
    pub broadcast: Option<(Arc<Receiver>, Duration)>,
    /// Its liveness: every answer from the learner and every batch sampled
    /// is progress.
    pub health: prism_transport::health::Health,
}

/// Counts at the end of a rollout process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutSummary {
    pub groups: u64,
    pub trajectories: u64,
    /// Weight versions pulled from the learner (over the Weights stream).
    pub weight_pulls: u64,
    /// Weight versions received by NCCL broadcast.
    pub weight_broadcasts: u64,
}

struct Worker {
    control: ControlClient,
    weights: WeightsClient,
    producer: prism_transport::redis::Producer<Trajectory>,
    prompts_per_batch: usize,
    counters: Arc<Counters>,
    membership: watch::Receiver<Membership>,
    give_up_after: Duration,
    broadcast: Option<(Arc<Receiver>, Duration)>,
    generator: Option<Box<dyn Generate>>,
    /// The version loaded into the generator.
    held: Option<u64>,
    summary: RolloutSummary,
}

impl Worker {
    fn worker_id(&self) -> String {
        self.membership.borrow().worker_id.clone()
    }

    /// Runs `f` on the generator on a blocking thread.
    async fn blocking<R: Send + 'static>(&mut self, f: impl FnOnce(&mut dyn Generate) -> R + Send + 'static) -> Result<R> {
        let mut g = self.generator.take().ok_or_else(|| Error::Weights { version: 0, reason: "generator lost by an earlier failure".into() })?;
        let (g, out) = tokio::task::spawn_blocking(move || {
            let out = f(g.as_mut());
            (g, out)
        })
        .await
        .map_err(|e| Error::Weights { version: 0, reason: format!("the generator thread failed: {e}") })?;
        self.generator = Some(g);
        Ok(out)
    }

    /// Makes the generator hold at least `min_version` and the newest version
    /// the heartbeats announced: the broadcast one when this worker has a
    /// broadcast rank and it arrives in time, else pulled over the Weights stream.
    async fn refresh_weights(&mut self, min_version: u64) -> Result<()> {
        let announced = self.membership.borrow().latest_version;
        let want = announced.max(min_version);
        if self.held.is_some_and(|h| h >= want) {
            return Ok(());
        }
        let started = Instant::now();
        let (set, broadcast) = match self.broadcast_of(want).await? {
            Some(set) => (set, true),
            None => (self.pull(min_version, started).await?, false),
        };
        let version = set.version.0;
        self.blocking(move |g| g.load_weights(&set))
            .await?
            .map_err(|e| Error::Weights { version, reason: format!("loading into the policy failed: {e}") })?;
        let via = if broadcast { "nccl broadcast" } else { "weights stream" };
        tracing::info!(policy_version = version, via, ms = started.elapsed().as_millis() as u64, "weights loaded");
        self.held = Some(version);
        if broadcast {
            self.summary.weight_broadcasts += 1;
        } else {
            self.summary.weight_pulls += 1;
        }
        self.counters.policy_version.store(version, Relaxed);
        self.counters.weight_fetches.fetch_add(1, Relaxed);
        self.counters.weight_fetch_ms.fetch_add(started.elapsed().as_millis() as u64, Relaxed);
        Ok(())
    }

    /// With a broadcast rank: the staged broadcast of `want` or newer, waited
    /// for up to the NCCL timeout (the learner broadcasts every version it
    /// announces, or a newer one); `None` when it does not come or there is no rank.
    async fn broadcast_of(&self, want: u64) -> Result<Option<Arc<WeightSet>>> {
        let Some((receiver, wait)) = &self.broadcast else { return Ok(None) };
        receiver.announce(want);
        let (receiver, wait) = (receiver.clone(), *wait);
        let staged = tokio::task::spawn_blocking(move || receiver.wait_for(want, wait))
            .await
            .map_err(|e| Error::Weights { version: want, reason: format!("the broadcast wait failed: {e}") })??;
        if staged.is_none() {
            tracing::warn!(
                policy_version = want,
                waited_ms = wait.as_millis() as u64,
                "the NCCL broadcast of this version did not arrive in time; pulling it over the Weights stream"
            );
        }
        Ok(staged)
    }

    /// The newest version on the Weights stream, once it is at least `min_version`.
    async fn pull(&mut self, min_version: u64, started: Instant) -> Result<Arc<WeightSet>> {
        loop {
            let set = self.weights.fetch(0).await?;
            if set.version >= min_version {
                tracing::debug!(policy_version = set.version, bytes = set.total_bytes(), "weights fetched");
                return Ok(WeightSet::new(PolicyVersion(set.version), set.to_tensors()?));
            }
            // The learner announced a version it has not published yet.
            if started.elapsed() > self.give_up_after {
                return Err(Error::Weights { version: min_version, reason: format!("the learner still serves v{}", set.version) });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Samples `work` and hands it on; returns how many trajectories it made.
    async fn sample(&mut self, work: Vec<Assignment>, config: &redis::Config) -> Result<()> {
        let min_version = work.iter().map(|a| a.min_version.0).max().unwrap_or(0);
        self.refresh_weights(min_version).await?;
        let version = PolicyVersion(self.held.unwrap_or(0));
        let groups: Vec<u64> = work.iter().map(|a| a.group.0).collect();
        self.counters.in_flight.store(groups.len() as u64, Relaxed);
        let started = Instant::now();
        let span = tracing::info_span!("generate", actor = "rollout", policy_version = version.0, groups = groups.len());
        let sampled = self
            .blocking(move |g| span.in_scope(|| g.generate(&work, version)))
            .await?
            .map_err(|e| Error::Weights { version: version.0, reason: format!("generation failed: {e}") })?;
        let generate_s = started.elapsed().as_secs_f64();
        let trajectories: Vec<Trajectory> = sampled.into_iter().flatten().collect();
        let tokens: u64 = trajectories.iter().map(|t| t.tokens.len() as u64).sum();
        self.producer.send(&trajectories, config).await?;
        let n = trajectories.len() as u64;
        // Retried while the learner is unreachable: until it hears of them the
        // prompts stay leased to this worker.
        let since = Instant::now();
        loop {
            let worker_id = self.worker_id();
            match self.control.delivered(&worker_id, groups.clone(), n, tokens, generate_s).await {
                Ok(()) => break,
                Err(e) if e.is_transient() && since.elapsed() < self.give_up_after => {
                    tracing::warn!(error = %e, "reporting delivered groups failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.counters.in_flight.store(0, Relaxed);
        self.counters.processed.fetch_add(n, Relaxed);
        self.summary.groups += groups.len() as u64;
        self.summary.trajectories += n;
        Ok(())
    }
}

/// Samples until the learner says the run is over, `shutdown` resolves, or a
/// generation fails.
pub async fn run(args: RolloutArgs, config: &redis::Config, shutdown: impl Future<Output = ()>) -> Result<RolloutSummary> {
    let RolloutArgs { control, weights, redis, keys, generator, prompts_per_batch, counters, membership, give_up_after, broadcast, health } =
        args;
    // Announcements reach the receiver while this worker generates, so that
    // it joins the learner's broadcasts without delaying them.
    let announcer = broadcast.as_ref().map(|(receiver, _)| {
        let (receiver, mut news) = (receiver.clone(), membership.clone());
        tokio::spawn(async move {
            loop {
                let latest = news.borrow_and_update().latest_version;
                receiver.announce(latest);
                if news.changed().await.is_err() {
                    return;
                }
            }
        })
    });
    let producer = redis.producer::<Trajectory>(&keys.sampled).await?;
    let mut w = Worker {
        control,
        weights,
        producer,
        prompts_per_batch,
        counters,
        membership,
        give_up_after,
        broadcast,
        generator: Some(generator),
        held: None,
        summary: RolloutSummary::default(),
    };
    tokio::pin!(shutdown);
    let mut unreachable_since: Option<Instant> = None;
    let result = loop {
        if w.membership.borrow().shutdown {
            break Ok(());
        }
        let worker_id = w.worker_id();
        let max = w.prompts_per_batch.max(1);
        let asked = tokio::select! {
            r = w.control.get_work(&worker_id, max, Duration::from_secs(1)) => r,
            _ = &mut shutdown => break Ok(()),
        };
        let work = match asked {
            Ok(None) => break Ok(()),
            Ok(Some(work)) => {
                unreachable_since = None;
                health.beat();
                work
            }
            Err(Error::NotReady { .. }) => {
                health.beat();
                // The learner is up and still preparing (e.g. its warm start).
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) if e.is_transient() => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > w.give_up_after {
                    break Err(e);
                }
                tracing::warn!(error = %e, "asking the learner for work failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        if work.is_empty() {
            continue;
        }
        if let Err(e) = w.sample(work, config).await {
            break Err(e);
        }
        health.beat();
    };
    // Leaving: the learner re-issues whatever this worker still holds.
    let reason = match &result {
        Ok(()) => "finished".to_string(),
        Err(e) => format!("failed: {e}"),
    };
    let worker_id = w.worker_id();
    if let Err(e) = w.control.shutdown(&worker_id, &reason).await {
        tracing::warn!(error = %e, "telling the learner this worker leaves failed");
    }
    if let Some(a) = announcer {
        a.abort();
    }
    result.map(|()| w.summary)
}

#[cfg(test)]
mod tests;
