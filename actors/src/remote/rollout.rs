//! The rollout role: the in-process [`RolloutWorker`] with remote ports. It
//! asks the learner for prompts (`Control.GetWork`), brings its policy copy up
//! to the newest version over the Weights stream or the NCCL broadcast between
//! generations (and, with `rollout.inflight_updates`, between the decode
//! steps of one: announced versions are fetched while it generates), samples
//! each group on a blocking thread,
//! adds the trajectories to the sampled stream (waiting while it is at its
//! cap), then reports them (`Control.Delivered`) so their leases end. A LoRA
//! learner's versions come as their adapters, merged here over the frozen
//! base, which is fetched once.
//!
//! A generation that fails makes the worker leave the run at once (its prompts
//! are issued again) and return the error; the process supervisor (compose,
//! Kubernetes) restarts it.

use prism_transport::control::{ControlClient, Counters, Membership};
use prism_transport::redis::{self, Redis, RunKeys};
use prism_transport::nccl_weights::Receiver;
use prism_transport::weights::{Part, WeightBytes, WeightsClient};
use prism_transport::{Error, Result};
use crate::backend::{Assignment, Generate, NewerWeights, WeightSet};
use crate::rollout_worker::{self as worker, Leave, Ports, RolloutWorker, Sampled, Weights};
use prism_core::{PolicyVersion, Trajectory};
use ractor::Actor;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
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
    /// In-flight weight updates (`rollout.inflight_updates`; over the
    /// Weights stream): versions announced while the worker generates are
    /// fetched at once and loaded between decode steps.
    pub inflight: bool,
}

/// Counts at the end of a rollout process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutSummary {
    pub groups: u64,
    pub trajectories: u64,
    /// Weight versions taken from the Weights stream (between generations,
    /// or between decode steps with in-flight updates).
    pub weight_pulls: u64,
    /// Weight versions received by NCCL broadcast.
    pub weight_broadcasts: u64,
    /// Bytes fetched over the Weights stream (versions, and a LoRA policy's
    /// frozen base once).
    pub weight_bytes: u64,
}

/// The ports of a rollout process's worker: work from the learner's Control
/// service, weights over the Weights stream or the NCCL broadcast, groups to
/// the sampled stream.
struct Remote {
    control: ControlClient,
    weights: WeightsClient,
    producer: prism_transport::redis::Producer<Trajectory>,
    config: redis::Config,
    counters: Arc<Counters>,
    membership: watch::Receiver<Membership>,
    give_up_after: Duration,
    broadcast: Option<(Arc<Receiver>, Duration)>,
    health: prism_transport::health::Health,
    /// Turns true when the process is asked to stop.
    stop: watch::Receiver<bool>,
    /// The group ids in hand (taken, not yet delivered).
    in_hand: Vec<u64>,
    /// The worker id they were taken under: once the heartbeats register
    /// again under another (the learner restarted, or declared this worker
    /// dead), the learner has forgotten them.
    taken_as: String,
    /// How the weights being loaded came, and since when.
    fetching: Option<(bool, Instant)>,
    /// A LoRA policy's frozen base, which each version's adapters are merged
    /// over (shared with the in-flight prefetch; a mutex also keeps the
    /// ports `Sync`: tensors are not).
    base: Arc<Mutex<Base>>,
    /// With in-flight updates: the newest version fetched while the worker
    /// generates, not yet loaded.
    staged: Option<Arc<Mutex<Option<Arc<WeightSet>>>>>,
    /// The newest version handed to the worker to load (shared with the
    /// in-flight prefetch, which fetches only versions above it).
    taken: Arc<AtomicU64>,
    /// What the worker did and how it ended, read by [`run`].
    end: Arc<Mutex<End>>,
}

#[derive(Default)]
struct End {
    summary: RolloutSummary,
    failure: Option<crate::Error>,
}

impl Remote {
    fn worker_id(&self) -> String {
        self.membership.borrow().worker_id.clone()
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow() || self.membership.borrow().shutdown
    }

    /// Asks the learner for work until it answers with some, says the run is
    /// over, stays unreachable for `give_up_after`, or the process stops.
    async fn ask(&mut self, max: usize) -> Result<Option<Vec<Assignment>>> {
        let mut unreachable_since: Option<Instant> = None;
        loop {
            if self.stopping() {
                return Ok(None);
            }
            let worker_id = self.worker_id();
            let mut stop = self.stop.clone();
            let asked = tokio::select! {
                asked = self.control.get_work(&worker_id, max, Duration::from_secs(1)) => asked,
                _ = stop.wait_for(|s| *s) => return Ok(None),
            };
            match asked {
                Ok(work) => {
                    self.health.beat();
                    return Ok(work);
                }
                Err(Error::NotReady { .. }) => {
                    self.health.beat();
                    // The learner is up and still preparing (e.g. its warm start).
                }
                Err(e) if e.is_transient() => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.give_up_after {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "asking the learner for work failed; retrying");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
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

    /// The learner forgot the work in hand: this worker registered again
    /// since it took it.
    fn work_forgotten(&self) -> bool {
        !self.in_hand.is_empty() && self.worker_id() != self.taken_as
    }

    /// The newest version on the Weights stream, once it is at least
    /// `min_version`; `None` when the learner forgot the work in hand first
    /// (it restarted, from a checkpoint of an older version). An unreachable
    /// learner is waited for, up to `give_up_after`.
    async fn pull(&mut self, min_version: u64, started: Instant) -> Result<Option<Arc<WeightSet>>> {
        loop {
            if self.work_forgotten() {
                return Ok(None);
            }
            let served = match self.weights.fetch(0).await {
                Ok(set) if set.version >= min_version => {
                    tracing::debug!(policy_version = set.version, bytes = set.total_bytes(), part = ?set.part, "weights fetched");
                    return Ok(Some(weight_set_of(&mut self.weights, &self.base, &self.end, set).await?));
                }
                Ok(set) => format!("the learner still serves v{}", set.version),
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, policy_version = min_version, "fetching weights failed; retrying");
                    e.to_string()
                }
                Err(e) => return Err(e),
            };
            // The learner announced a version it has not published yet, or
            // is restarting.
            if started.elapsed() > self.give_up_after {
                return Err(Error::Weights { version: min_version, reason: served });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tells the learner of delivered groups, retried while it is
    /// unreachable: until it hears of them the prompts stay leased to this worker.
    async fn report(&mut self, groups: Vec<u64>, n: u64, tokens: u64, generate_s: f64) -> Result<()> {
        let since = Instant::now();
        loop {
            let worker_id = self.worker_id();
            match self.control.delivered(&worker_id, groups.clone(), n, tokens, generate_s).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && since.elapsed() < self.give_up_after => {
                    tracing::warn!(error = %e, "reporting delivered groups failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn end(&self) -> std::sync::MutexGuard<'_, End> {
        self.end.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Ports for Remote {
    // The learner knows this worker by its worker id (from the heartbeats),
    // not by the actor's name.
    async fn work(&mut self, _worker: &str, max: usize) -> crate::error::Result<Option<Vec<Assignment>>> {
        let work = self.ask(max).await?;
        if let Some(work) = &work {
            self.in_hand = work.iter().map(|a| a.group.0).collect();
            self.taken_as = self.worker_id();
            self.counters.in_flight.store(self.in_hand.len() as u64, Relaxed);
        }
        Ok(work)
    }

    /// At least `min` and the newest version the heartbeats announced: the
    /// broadcast one when this worker has a broadcast rank and it arrives in
    /// time, else pulled over the Weights stream. Work the learner forgot
    /// meanwhile is void.
    async fn weights(&mut self, _worker: &str, held: Option<PolicyVersion>, min: PolicyVersion) -> crate::error::Result<Weights> {
        let announced = self.membership.borrow().latest_version;
        let want = announced.max(min.0);
        if held.is_some_and(|h| h.0 >= want) {
            return Ok(Weights::Keep);
        }
        let started = Instant::now();
        let staged = self.staged.as_ref().and_then(|s| s.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(set) = staged.filter(|s| s.version.0 >= want) {
            self.end().summary.weight_pulls += 1;
            self.taken.fetch_max(set.version.0, Relaxed);
            self.fetching = Some((false, started));
            return Ok(Weights::Load(set));
        }
        let (set, broadcast) = match self.broadcast_of(want).await? {
            Some(set) => (set, true),
            None => match self.pull(min.0, started).await? {
                Some(set) => {
                    self.end().summary.weight_pulls += 1;
                    (set, false)
                }
                None => {
                    self.in_hand.clear();
                    self.counters.in_flight.store(0, Relaxed);
                    // The learner restarted: its versions may start below the old ones.
                    self.taken.store(0, Relaxed);
                    return Ok(Weights::Void);
                }
            },
        };
        self.taken.fetch_max(set.version.0, Relaxed);
        self.fetching = Some((broadcast, started));
        Ok(Weights::Load(set))
    }

    fn newer(&self) -> Option<Box<NewerWeights<'static>>> {
        let (staged, end, taken) = (self.staged.clone()?, self.end.clone(), self.taken.clone());
        Some(Box::new(move |after: PolicyVersion| {
            let mut staged = staged.lock().unwrap_or_else(|p| p.into_inner());
            let newer = staged.as_ref().is_some_and(|s| s.version > after).then(|| staged.take()).flatten();
            if let Some(set) = &newer {
                end.lock().unwrap_or_else(|p| p.into_inner()).summary.weight_pulls += 1;
                taken.fetch_max(set.version.0, Relaxed);
            }
            newer
        }))
    }

    fn loaded(&mut self, version: PolicyVersion) {
        let (broadcast, started) = self.fetching.take().unwrap_or((false, Instant::now()));
        let via = if broadcast { "nccl broadcast" } else { "weights stream" };
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(policy_version = version.0, via, ms, "weights loaded");
        if broadcast {
            self.end().summary.weight_broadcasts += 1;
        }
        self.counters.policy_version.store(version.0, Relaxed);
        self.counters.weight_fetches.fetch_add(1, Relaxed);
        self.counters.weight_fetch_ms.fetch_add(ms, Relaxed);
    }

    async fn deliver(&mut self, _worker: &str, sampled: Sampled) -> crate::error::Result<()> {
        let groups = std::mem::take(&mut self.in_hand);
        let trajectories: Vec<Trajectory> = sampled.groups.into_iter().flatten().collect();
        let tokens: u64 = trajectories.iter().map(|t| t.tokens.len() as u64).sum();
        self.producer.send(&trajectories, &self.config).await?;
        let n = trajectories.len() as u64;
        self.report(groups.clone(), n, tokens, sampled.generate_s).await?;
        self.counters.in_flight.store(0, Relaxed);
        self.counters.processed.fetch_add(n, Relaxed);
        {
            let mut end = self.end();
            end.summary.groups += groups.len() as u64;
            end.summary.trajectories += n;
        }
        self.health.beat();
        Ok(())
    }

    /// Leaving: the learner re-issues whatever this worker still holds.
    async fn leave(&mut self, _worker: &str, why: Leave) {
        let reason = match &why {
            Leave::Finished => "finished".to_string(),
            Leave::Stopped => "stopped".to_string(),
            Leave::Failed(e) => format!("failed: {e}"),
        };
        let worker_id = self.worker_id();
        if let Err(e) = self.control.shutdown(&worker_id, &reason).await {
            tracing::warn!(error = %e, "telling the learner this worker leaves failed");
        }
        if let Leave::Failed(e) = why {
            self.end().failure = Some(e);
        }
    }
}

/// A LoRA policy's frozen base as a rollout process holds it: its id and tensors.
type Base = Option<(u64, HashMap<String, tch::Tensor>)>;

/// The model's weights at a fetched version: its tensors, or (a LoRA
/// policy's version) its adapters merged over the frozen base in `base`,
/// which is fetched the first time and again whenever the learner names
/// another. The bytes fetched (the version's, the base's) are counted in `end`.
async fn weight_set_of(weights: &mut WeightsClient, base: &Mutex<Base>, end: &Mutex<End>, set: WeightBytes) -> Result<Arc<WeightSet>> {
    end.lock().unwrap_or_else(|p| p.into_inner()).summary.weight_bytes += set.total_bytes();
    let version = PolicyVersion(set.version);
    let Part::Adapters { base: id, scale } = set.part else {
        return Ok(WeightSet::new(version, set.to_tensors()?));
    };
    let bad = |reason: String| Error::Weights { version: set.version, reason };
    let lock = || base.lock().unwrap_or_else(|p| p.into_inner());
    if lock().as_ref().map(|(held, _)| *held) != Some(id) {
        let fetched = weights.fetch_base().await?;
        if fetched.part != (Part::Base { id }) {
            return Err(bad(format!("its adapters are over base {id:#x}, but the learner serves {:?}", fetched.part)));
        }
        tracing::info!(base = format!("{id:#x}"), bytes = fetched.total_bytes(), "frozen base fetched");
        end.lock().unwrap_or_else(|p| p.into_inner()).summary.weight_bytes += fetched.total_bytes();
        *lock() = Some((id, fetched.to_tensors()?.into_iter().collect()));
    }
    let held = lock();
    let held = &held.as_ref().expect("fetched above").1;
    let source = std::path::PathBuf::from(format!("weights v{} (LoRA adapters from the learner)", set.version));
    let merged = prism_model::lora::merge_named(held, set.to_tensors()?.into_iter().collect(), scale, None, &source).map_err(|e| bad(e.to_string()))?;
    let mut all: HashMap<String, tch::Tensor> = held.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    all.extend(merged);
    let mut all: Vec<(String, tch::Tensor)> = all.into_iter().collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(WeightSet::new(version, all))
}

/// In-flight weight updates (`rollout.inflight_updates`): fetches each
/// version the heartbeats announce as soon as they announce it, while the
/// worker generates (once it holds a version), into `staged`, which the
/// generation takes between two decode steps (or the next `weights` call,
/// when the generation ended first). A failed fetch is logged and left to the next announcement or to
/// the worker's own pull between generations.
async fn prefetch(
    mut weights: WeightsClient,
    mut news: watch::Receiver<Membership>,
    taken: Arc<AtomicU64>,
    staged: Arc<Mutex<Option<Arc<WeightSet>>>>,
    base: Arc<Mutex<Base>>,
    end: Arc<Mutex<End>>,
) {
    let mut have = 0;
    loop {
        let announced = news.borrow_and_update().latest_version;
        // The worker fetches its first version itself; after that, each
        // announced version above the one it holds is fetched here.
        let held = taken.load(Relaxed);
        have = have.max(held);
        if held > 0 && announced > have {
            let fetched = match weights.fetch(0).await {
                Ok(set) if set.version > have => weight_set_of(&mut weights, &base, &end, set).await.map(Some),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
            match fetched {
                Ok(Some(set)) => {
                    have = set.version.0;
                    tracing::debug!(policy_version = have, "weights staged for the generation in flight");
                    *staged.lock().unwrap_or_else(|p| p.into_inner()) = Some(set);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, policy_version = announced, "fetching announced weights in flight failed; the next announcement or pull tries again"),
            }
        }
        if news.changed().await.is_err() {
            return;
        }
    }
}

/// Samples until the learner says the run is over, `shutdown` resolves, or a
/// generation fails: one [`RolloutWorker`] whose ports are the learner's services.
pub async fn run(args: RolloutArgs, config: &redis::Config, shutdown: impl Future<Output = ()>) -> crate::error::Result<RolloutSummary> {
    let RolloutArgs { control, weights, redis, keys, generator, prompts_per_batch, counters, membership, give_up_after, broadcast, health, inflight } =
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
    let (stop_tx, stop) = watch::channel(false);
    let end = Arc::new(Mutex::new(End::default()));
    let base = Arc::new(Mutex::new(None));
    let staged = inflight.then(|| Arc::new(Mutex::new(None)));
    let taken = Arc::new(AtomicU64::new(0));
    let prefetcher = staged.as_ref().map(|staged| {
        tokio::spawn(prefetch(weights.clone(), membership.clone(), taken.clone(), staged.clone(), base.clone(), end.clone()))
    });
    let ports = Remote {
        control,
        weights,
        producer,
        config: config.clone(),
        counters,
        membership,
        give_up_after,
        broadcast,
        health,
        stop,
        in_hand: Vec::new(),
        taken_as: String::new(),
        fetching: None,
        base,
        staged,
        taken,
        end: end.clone(),
    };
    let args = worker::RolloutArgs { name: "rollout".into(), factory: worker::once(generator), ports, prompts_per_batch };
    let (actor, handle) = Actor::spawn(None, RolloutWorker::new(), args)
        .await
        .map_err(|e| crate::Error::Thread(format!("the rollout worker did not start: {e}")))?;
    tokio::pin!(handle);
    tokio::select! {
        _ = &mut handle => {}
        _ = shutdown => {
            // The batch in hand is finished and delivered; then the worker leaves.
            stop_tx.send_replace(true);
            let _ = (&mut handle).await;
        }
    }
    drop(actor);
    for task in announcer.into_iter().chain(prefetcher) {
        task.abort();
    }
    let mut end = end.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match end.failure.take() {
        Some(e) => Err(e),
        None => Ok(std::mem::take(&mut end.summary)),
    }
}

#[cfg(test)]
mod tests;
