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
//! `redis.claim_idle_ms` are taken over in any case. While a worker labels
//! its entries it keeps them from going idle, however slow its judge.
//!
//! With a judge ([`RewardArgs::annotator`]), each heartbeat carries the
//! labeler's reward health; with a distilled model too, the process shares
//! its judge's verdicts ([`Sharing`]): the steps its own judge scored go to the
//! run's judged stream, and the steps every other reward process's judge
//! scored come back from it to train this process's distilled model.
//!
//! ```text
//! run ─┬─ labeling loop (sampled stream ──▶ Label ──▶ labeled stream)
//!      └─ Sharing ─┬─ publish: Annotator::take_judged ──▶ judged stream (every `share.every`)
//!                  └─ learn:   judged stream (others' entries) ──▶ Annotator::learn_from
//! ```

use prism_transport::control::{Counters, Membership};
use prism_transport::redis::{Config, Publisher, REWARD_GROUP, Redis, RunKeys, Subscriber};
use prism_transport::{Error, Result};
use crate::backend::Label;
use futures::StreamExt;
use prism_core::{LabelFailure, LabelResult, LabeledTrajectory, Trajectory};
use prism_transport::judged::{decode as decode_judged, encode as encode_judged};
use prism_reward::{Health, JudgedStep};
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::watch;

/// What the reward loop needs of a labeler beyond labeling: its reward health
/// for the heartbeats and, with a distilled model, the steps its own judge
/// scored (to share) and a way to learn from other processes' (the reward
/// library's [`prism_reward::Labeler`] implements it).
pub trait Annotator: Send + Sync + 'static {
    /// Reward health now; `None` without a judge.
    fn health(&self) -> Option<Health>;
    /// Whether it has a distilled model to share verdicts for.
    fn distills(&self) -> bool;
    /// Starts keeping (up to `cap` between two takes) the steps its judge scores.
    fn share_judged(&self, cap: usize);
    /// The steps its judge scored since the last call.
    fn take_judged(&self) -> Vec<JudgedStep>;
    /// Trains its distilled model on another process's judged steps; returns
    /// how many it took.
    fn learn_from(&self, judged: Vec<JudgedStep>) -> usize;
}

impl Annotator for prism_reward::Labeler {
    fn health(&self) -> Option<Health> {
        if self.judge().is_none() && self.implicit().is_none() {
            return None;
        }
        Some(prism_reward::Labeler::health(self))
    }
    fn distills(&self) -> bool {
        self.distiller().is_some()
    }
    fn share_judged(&self, cap: usize) {
        prism_reward::Labeler::share_judged(self, cap)
    }
    fn take_judged(&self) -> Vec<JudgedStep> {
        prism_reward::Labeler::take_judged(self)
    }
    fn learn_from(&self, judged: Vec<JudgedStep>) -> usize {
        prism_reward::Labeler::learn_from(self, judged)
    }
}

/// How a reward process shares its judge's verdicts on the judged stream
/// (the stream's length is capped by `redis.max_len` entries).
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    /// How often the steps its judge scored are published. Default 500 ms.
    pub every: Duration,
    /// Most steps in one entry of the judged stream. Default 256.
    pub steps_per_entry: usize,
    /// Most steps kept between two publications; more are not shared (they
    /// still train this process's own distilled model). Default 65536.
    pub keep: usize,
}

impl Default for Share {
    fn default() -> Self {
        Self { every: Duration::from_millis(500), steps_per_entry: 256, keep: 65_536 }
    }
}

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
    /// The labeler's judge side, when it has a judge: its health goes with
    /// the heartbeats and, with a distilled model, its verdicts are shared
    /// with the run's other reward processes as `share` says.
    pub annotator: Option<Arc<dyn Annotator>>,
    pub share: Share,
    /// Its liveness: every read of the stream and every batch labeled is
    /// progress.
    pub health: prism_transport::health::Health,
}

/// Counts at the end of a reward process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewardSummary {
    pub labeled: u64,
    pub failed: u64,
    pub reclaimed: u64,
    /// Sharing judged steps (zeros when this process has no distilled model).
    pub shared: ShareSummary,
}

/// What [`Sharing`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShareSummary {
    /// Steps this process's judge scored, published.
    pub published: u64,
    /// Steps other processes' judges scored, learned from.
    pub learned: u64,
    /// This process's own entries, skipped when read back.
    pub own: u64,
    /// Entries that could not be read (no sender or payload, or an
    /// undecodable payload), skipped.
    pub malformed: u64,
}

/// Live counters of a [`Sharing`]; cloning shares them.
#[derive(Debug, Clone, Default)]
pub struct ShareStats(Arc<ShareCounts>);

#[derive(Debug, Default)]
struct ShareCounts {
    published: AtomicU64,
    learned: AtomicU64,
    own: AtomicU64,
    malformed: AtomicU64,
}

impl ShareStats {
    /// A snapshot.
    pub fn get(&self) -> ShareSummary {
        let c = &self.0;
        ShareSummary {
            published: c.published.load(Relaxed),
            learned: c.learned.load(Relaxed),
            own: c.own.load(Relaxed),
            malformed: c.malformed.load(Relaxed),
        }
    }
}

/// One reward process's sharing of judged steps over the run's judged stream.
pub struct Sharing {
    annotator: Arc<dyn Annotator>,
    share: Share,
    worker: String,
    stream: String,
    publisher: Publisher,
    subscriber: Subscriber,
    stats: ShareStats,
}

impl Sharing {
    /// Starts sharing for `worker` of the run `keys` (turns on keeping the
    /// judge's verdicts); it reads the judged stream from its newest entry on.
    pub async fn start(annotator: Arc<dyn Annotator>, redis: &Redis, keys: &RunKeys, worker: &str, share: Share) -> Result<Self> {
        annotator.share_judged(share.keep);
        Ok(Self {
            publisher: redis.publisher(&keys.judged, worker).await?,
            subscriber: redis.subscriber(&keys.judged, worker).await?,
            annotator,
            share,
            worker: worker.to_string(),
            stream: keys.judged.clone(),
            stats: ShareStats::default(),
        })
    }

    /// Its live counters.
    pub fn stats(&self) -> ShareStats {
        self.stats.clone()
    }

    /// Publishes and learns until `stop` resolves; then publishes what its
    /// judge scored since the last round. Fails only when Redis stays
    /// unreachable for `redis.retry_for_ms`.
    pub async fn run(self, config: &Config, stop: impl Future<Output = ()>) -> Result<ShareSummary> {
        let Self { annotator, share, worker, stream, mut publisher, mut subscriber, stats } = self;
        let (stopped_tx, stopped) = watch::channel(false);
        let publish = {
            let (annotator, stats, mut stopped) = (annotator.clone(), stats.clone(), stopped.clone());
            async move {
                let mut ticker = tokio::time::interval(share.every);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let last = tokio::select! {
                        _ = ticker.tick() => false,
                        _ = stopped.wait_for(|s| *s) => true,
                    };
                    let steps = annotator.take_judged();
                    for chunk in steps.chunks(share.steps_per_entry.max(1)) {
                        publisher.publish(&encode_judged(&worker, chunk), config).await?;
                        stats.0.published.fetch_add(chunk.len() as u64, Relaxed);
                    }
                    if last {
                        return Ok::<_, Error>(());
                    }
                }
            }
        };
        let learn = {
            let (stats, mut stopped) = (stats.clone(), stopped.clone());
            async move {
                loop {
                    let batch = tokio::select! {
                        b = subscriber.recv(config) => b?,
                        _ = stopped.wait_for(|s| *s) => return Ok::<_, Error>(()),
                    };
                    stats.0.own.fetch_add(batch.own, Relaxed);
                    stats.0.malformed.fetch_add(batch.dropped.len() as u64, Relaxed);
                    for b in batch.items {
                        match decode_judged(&b.payload) {
                            Ok(steps) => {
                                let n = annotator.learn_from(steps);
                                stats.0.learned.fetch_add(n as u64, Relaxed);
                            }
                            Err(reason) => {
                                stats.0.malformed.fetch_add(1, Relaxed);
                                tracing::warn!(
                                    stream = %stream, entry = %b.entry, sender = %b.sender, %reason,
                                    "skipping a malformed judged-steps entry"
                                );
                            }
                        }
                    }
                }
            }
        };
        let stopper = async move {
            stop.await;
            stopped_tx.send_replace(true);
            Ok::<_, Error>(())
        };
        drop(stopped);
        tokio::try_join!(stopper, publish, learn)?;
        Ok(stats.get())
    }
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

/// Labels until `shutdown` resolves or the learner says the run is over
/// (sharing judged steps meanwhile, when the labeler has a distilled model).
pub async fn run(mut args: RewardArgs, config: &Config, shutdown: impl Future<Output = ()>) -> Result<RewardSummary> {
    let Some(annotator) = args.annotator.take() else { return label(args, config, shutdown).await };
    let source = annotator.clone();
    args.counters.report_health(Arc::new(move || source.health()));
    if !annotator.distills() {
        return label(args, config, shutdown).await;
    }
    let sharing = Sharing::start(annotator, &args.redis, &args.keys, &args.consumer, args.share.clone()).await?;
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let labeling = async move {
        let r = label(args, config, shutdown).await;
        let _ = done.send(());
        r
    };
    let sharing = sharing.run(config, async {
        let _ = finished.await;
    });
    let (mut summary, shared) = tokio::try_join!(labeling, sharing)?;
    summary.shared = shared;
    Ok(summary)
}

/// The labeling loop.
async fn label(args: RewardArgs, config: &Config, shutdown: impl Future<Output = ()>) -> Result<RewardSummary> {
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
            if !news.worker_id.is_empty() && news.worker_id != consumer.name() {
                // Registered again (the learner had declared it dead): it
                // consumes under its new id, so that if it dies now the others
                // take its entries over at once by that id; what the old name
                // still held comes along.
                let old = consumer.name().to_string();
                consumer = args.redis.consumer::<Trajectory>(&args.keys.sampled, REWARD_GROUP, &news.worker_id, None).await?;
                tracing::info!(old = %old, new = %news.worker_id, "registered again: consuming under the new worker id");
                taken_over.insert(old.clone());
                batch = Some(consumer.claim_from(&old, config).await?);
            }
            if let Some(dead) = news
                .dead_workers
                .iter()
                .find(|d| d.starts_with("reward-") && **d != consumer.name() && !taken_over.contains(*d))
                .filter(|_| batch.is_none())
            {
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
        args.health.beat();
        if batch.items.is_empty() {
            continue;
        }
        summary.reclaimed += batch.items.iter().filter(|d| d.reclaimed).count() as u64;
        let entries: Vec<String> = batch.items.iter().map(|d| d.entry.clone()).collect();
        args.counters.in_flight.store(entries.len() as u64, Relaxed);
        let labeling = futures::stream::iter(batch.items)
            .map(|d| label_one(args.labeler.clone(), d.item, args.attempts))
            .buffered(args.concurrency.max(1))
            .collect::<Vec<LabelResult>>();
        tokio::pin!(labeling);
        // The entries in hand stay this worker's while it labels them (a
        // slow judge can take longer than `redis.claim_idle_ms`): their idle
        // time is reset a few times within every claim_idle_ms.
        let every = Duration::from_millis((config.claim_idle_ms / 3).max(1));
        let mut keep = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let results = loop {
            tokio::select! {
                results = &mut labeling => break results,
                _ = keep.tick() => {
                    consumer.keep(&entries).await?;
                }
            }
        };
        let failed = results.iter().filter(|r| r.is_err()).count() as u64;
        producer.send(&results, config).await?;
        consumer.ack(&entries).await?;
        args.health.beat();
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
