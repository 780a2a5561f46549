use super::*;
use crate::backend::{BackendError, LabelFuture};
use crate::dist::assembly::{Assembled, Assembler};
use crate::dist::testing::{TestRedis, eventually, trajectory, unique};
use prism_core::{RewardLabel, ScoreSource, TrajectoryId};
use std::collections::BTreeMap;
use std::time::Duration;

/// Outcome = sample parity; fails on `fail_on`; hangs forever when `hang`.
struct FakeLabel {
    fail_on: Option<TrajectoryId>,
    hang: bool,
}

impl Label for FakeLabel {
    fn label<'a>(&'a self, t: &'a Trajectory) -> LabelFuture<'a> {
        Box::pin(async move {
            if self.hang {
                std::future::pending::<()>().await;
            }
            if Some(t.id) == self.fail_on {
                return Err(BackendError::new("judge unreachable"));
            }
            if t.id.0 == 5 {
                panic!("injected labeler panic");
            }
            Ok(RewardLabel { outcome: (t.sample % 2) as f32, outcome_source: ScoreSource::Verifier, answer: None, steps: vec![] })
        })
    }
}

fn args(redis: &Redis, keys: &RunKeys, name: &str, label: FakeLabel, membership: Option<watch::Receiver<Membership>>) -> RewardArgs {
    RewardArgs {
        redis: redis.clone(),
        keys: keys.clone(),
        consumer: name.into(),
        labeler: Arc::new(label),
        concurrency: 4,
        attempts: 2,
        counters: Arc::new(Counters::default()),
        membership,
    }
}

/// 16 groups of 4 go through two reward workers, the first of which dies with
/// entries in hand (like `kill -9`); the learner's side ends with every group
/// trained or dropped with a reason, and no trajectory twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_reward_workers_entries_are_labeled_by_another_and_ingested_once() {
    let server = TestRedis::shared();
    let cfg = Config { url: server.url.clone(), batch: 8, block_ms: 100, claim_idle_ms: 60_000, ..Config::default() };
    let keys = RunKeys::new("prism", &unique("reward"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut producer = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    let made: Vec<Trajectory> = (0..64).map(|i| trajectory(i, 16)).collect(); // group = id / 4
    producer.send(&made, &cfg).await.unwrap();

    // reward-1 takes a batch and hangs on it; then it is killed.
    let hung = args(&redis, &keys, "reward-1", FakeLabel { fail_on: None, hang: true }, None);
    let c = cfg.clone();
    let first = tokio::spawn(async move { run(hung, &c, std::future::pending()).await });
    eventually("reward-1 to hold entries", Duration::from_secs(10), async || {
        let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
        (d.pending > 0).then_some(())
    })
    .await;
    first.abort();

    // reward-2 hears (from a heartbeat) that reward-1 is dead.
    let (news, membership) = watch::channel(Membership::default());
    news.send_replace(Membership { dead_workers: vec!["reward-1".into()], ..Default::default() });
    let a = args(&redis, &keys, "reward-2", FakeLabel { fail_on: Some(TrajectoryId(13)), hang: false }, Some(membership));
    let counters = a.counters.clone();
    let c = cfg.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(async move {
        run(a, &c, async {
            let _ = stopped.await;
        })
        .await
    });

    let mut assembler = Assembler::new(&redis, &keys, "learner").await.unwrap();
    let mut trained: BTreeMap<u64, usize> = BTreeMap::new();
    let mut dropped: BTreeMap<u64, String> = BTreeMap::new();
    eventually("all 16 groups resolved", Duration::from_secs(30), async || {
        for g in assembler.next(&cfg).await.unwrap() {
            match g {
                Assembled::Complete { group, trajectories, entries } => {
                    assert_eq!(trajectories.iter().map(|l| l.trajectory.sample).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
                    for l in &trajectories {
                        *trained.entry(l.trajectory.id.0).or_default() += 1;
                    }
                    assert!(group.0 < 16);
                    assembler.ack(&entries).await.unwrap();
                }
                Assembled::Failed { group, size, reason, entries } => {
                    assert_eq!(size, 4);
                    dropped.insert(group.0, reason);
                    assembler.ack(&entries).await.unwrap();
                }
            }
        }
        (trained.len() + 4 * dropped.len() >= 64).then_some(())
    })
    .await;
    let _ = stop.send(());
    let summary = second.await.unwrap().unwrap();
    assert!(summary.reclaimed >= 1, "reward-2 took over reward-1's entries: {summary:?}");
    assert!(trained.values().all(|&n| n == 1), "no trajectory trained twice");
    // trajectory 5 (group 1) panics the labeler and 13 (group 3) errors, on every try
    assert_eq!(dropped.keys().copied().collect::<Vec<_>>(), vec![1, 3], "{dropped:?}");
    assert!(dropped[&1].contains("labeling failed 2 times; last error: the labeler panicked"), "{dropped:?}");
    assert!(dropped[&3].contains("labeling failed 2 times; last error: judge unreachable"), "{dropped:?}");
    assert_eq!(trained.len() + 4 * dropped.len(), 64, "made = trained + dropped");
    assert_eq!(counters.processed.load(Relaxed) + counters.dropped.load(Relaxed), summary.labeled + summary.failed);
    let d = redis.depth(&keys.sampled, REWARD_GROUP).await.unwrap();
    assert_eq!((d.waiting, d.pending), (0, 0), "nothing left behind on the sampled stream");
}
