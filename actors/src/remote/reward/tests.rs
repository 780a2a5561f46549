use super::*;
use crate::backend::{BackendError, LabelFuture};
use prism_transport::assembly::{Assembled, Assembler};
use prism_transport::testing::{TestRedis, eventually, trajectory, unique, xadd, xlen};
use prism_core::{RewardLabel, ScoreSource, TrajectoryId};
use prism_reward::config::Process;
use prism_reward::testkit::{Reply, Request, TestServer, chat_text};
use prism_reward::{Labeler, distill, judge};
use std::collections::BTreeMap;

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
        annotator: None,
        share: Share::default(),
        health: Default::default(),
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

/// A reward worker the learner declared dead registers again (new worker id)
/// and consumes under its new id, bringing along what the old name held; so
/// when it dies after that, another worker told of its death takes its
/// entries over at once. (Before, it kept consuming under the old name, and
/// the takeover by the new id found nothing until `claim_idle_ms` passed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_registers_again_consumes_under_its_new_id() {
    let server = TestRedis::shared();
    let cfg = Config { url: server.url.clone(), batch: 8, block_ms: 100, claim_idle_ms: 60_000, ..Config::default() };
    let keys = RunKeys::new("prism", &unique("again"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let mut producer = redis.producer::<Trajectory>(&keys.sampled).await.unwrap();
    let (news, membership) = watch::channel(Membership { worker_id: "reward-1".into(), ..Default::default() });
    let mut a = args(&redis, &keys, "reward-1", FakeLabel { fail_on: None, hang: false }, Some(membership));
    // Labels the first four, hangs on the rest.
    struct HangPast(u64);
    impl Label for HangPast {
        fn label<'a>(&'a self, t: &'a Trajectory) -> LabelFuture<'a> {
            Box::pin(async move {
                if t.id.0 >= self.0 {
                    std::future::pending::<()>().await;
                }
                Ok(RewardLabel { outcome: 1.0, outcome_source: ScoreSource::Verifier, answer: None, steps: vec![] })
            })
        }
    }
    a.labeler = Arc::new(HangPast(100));
    let c = cfg.clone();
    let worker = tokio::spawn(async move { run(a, &c, std::future::pending()).await });
    producer.send(&(20..24).map(|i| trajectory(i, 4)).collect::<Vec<_>>(), &cfg).await.unwrap();
    eventually("the first four labeled", Duration::from_secs(10), async || (xlen(&server.url, &keys.labeled).await == 4).then_some(())).await;
    news.send_replace(Membership { worker_id: "reward-9".into(), ..Default::default() });
    let consumers = async || -> BTreeMap<String, u64> { redis.consumers(&keys.sampled, REWARD_GROUP).await.unwrap().into_iter().collect() };
    let now = eventually("it to read as reward-9", Duration::from_secs(10), async || {
        let c = consumers().await;
        c.contains_key("reward-9").then_some(c)
    })
    .await;
    assert!(!now.contains_key("reward-1"), "the old name is gone: {now:?}");
    producer.send(&(100..104).map(|i| trajectory(i, 4)).collect::<Vec<_>>(), &cfg).await.unwrap();
    eventually("the next four held under the new id", Duration::from_secs(10), async || (consumers().await.get("reward-9") == Some(&4)).then_some(())).await;
    worker.abort();
    let mut other = redis.consumer::<Trajectory>(&keys.sampled, REWARD_GROUP, "reward-2", None).await.unwrap();
    let b = other.claim_from("reward-9", &cfg).await.unwrap();
    assert_eq!(b.items.iter().map(|d| d.item.id.0).collect::<Vec<_>>(), vec![100, 101, 102, 103]);
}

/// Takes `delay` per trajectory and counts how often it labeled each.
struct SlowLabel {
    delay: Duration,
    calls: Arc<std::sync::Mutex<BTreeMap<u64, u32>>>,
}

impl Label for SlowLabel {
    fn label<'a>(&'a self, t: &'a Trajectory) -> LabelFuture<'a> {
        Box::pin(async move {
            *self.calls.lock().unwrap().entry(t.id.0).or_default() += 1;
            tokio::time::sleep(self.delay).await;
            Ok(RewardLabel { outcome: 1.0, outcome_source: ScoreSource::Verifier, answer: None, steps: vec![] })
        })
    }
}

/// Two live workers whose labelers are slower than `redis.claim_idle_ms` (a
/// batch takes 4 × 0.9 s and 4 × 0.3 s against 1 s) label every trajectory
/// once: the faster never takes over entries the slower is still working on
/// (before, the idle entries in hand were taken over and judged again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labeler_slower_than_claim_idle_labels_each_trajectory_once() {
    let server = TestRedis::shared();
    let cfg = Config { url: server.url.clone(), batch: 4, block_ms: 100, claim_idle_ms: 1_000, ..Config::default() };
    let keys = RunKeys::new("prism", &unique("slow"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let made: Vec<Trajectory> = (0..16).map(|i| trajectory(i, 4)).collect();
    redis.producer::<Trajectory>(&keys.sampled).await.unwrap().send(&made, &cfg).await.unwrap();
    let calls: Arc<std::sync::Mutex<BTreeMap<u64, u32>>> = Default::default();
    let (stop, stopped) = watch::channel(false);
    let workers: Vec<_> = [("reward-1", 900), ("reward-2", 300)]
        .into_iter()
        .map(|(name, ms)| {
            let mut a = args(&redis, &keys, name, FakeLabel { fail_on: None, hang: false }, None);
            a.labeler = Arc::new(SlowLabel { delay: Duration::from_millis(ms), calls: calls.clone() });
            a.concurrency = 1;
            let (c, mut stopped) = (cfg.clone(), stopped.clone());
            tokio::spawn(async move {
                run(a, &c, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
            })
        })
        .collect();
    eventually("all 16 labeled", Duration::from_secs(60), async || {
        (xlen(&server.url, &keys.labeled).await >= 16).then_some(())
    })
    .await;
    // Long enough for any entry taken over to be labeled a second time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send_replace(true);
    let mut reclaimed = 0;
    for w in workers {
        reclaimed += w.await.unwrap().unwrap().reclaimed;
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 16, "{calls:?}");
    assert!(calls.values().all(|&n| n == 1), "each trajectory labeled once: {calls:?}");
    assert_eq!(reclaimed, 0);
    assert_eq!(xlen(&server.url, &keys.labeled).await, 16);
}

/// A labeler whose judge (a loopback server) says Yes to every step, scoring in
/// the background and distilling.
fn judging_labeler() -> (TestServer, Arc<Labeler>) {
    let server = TestServer::start(|_: &Request| Reply::ok(chat_text(&["\\boxed{Yes}"])).into()).unwrap();
    let cfg = prism_reward::Config { process: Process::Judge, judge_wait_ms: Some(0), ..Default::default() };
    let judge = judge::Config {
        url: server.url(),
        timeout_ms: 5_000,
        backoff_ms: 1,
        backoff_max_ms: 5,
        canary_every: 0,
        top_logprobs: 0,
        ..Default::default()
    };
    let distill = distill::Config { enabled: true, buckets: 4096, ..Default::default() };
    (server, Arc::new(Labeler::new(&cfg, &judge, &distill).unwrap()))
}

/// Labels trajectory `id` (three steps, its own problem, so no verdict comes
/// from the cache) and waits until the judge's verdicts are in.
async fn judge_one(labeler: &Labeler, id: u64) {
    let (a, b) = (id + 2, 3 * id + 1);
    let completion = format!("{b}*2={}\n{a}+{}={}\nA:{}\n", 2 * b, 2 * b, a + 2 * b, a + 2 * b);
    let t = prism_reward::testkit::trajectory(id, "arithmetic", &format!("{a}+{b}*2"), None, &completion);
    labeler.label(&t).await;
    assert!(labeler.settled(Duration::from_secs(30)).await, "the background annotation settles");
}

fn distilled(labeler: &Labeler) -> u64 {
    labeler.metrics().distill.unwrap().labels
}

/// Two reward processes' sharing loops over one run: the steps either one's
/// judge scores reach the other's distilled model; neither learns its own
/// twice; malformed entries are counted and skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reward_process_learns_from_every_judged_step_and_its_own_once() {
    tch::set_num_threads(1);
    let server = TestRedis::shared();
    let cfg = Config { url: server.url.clone(), batch: 8, block_ms: 100, ..Config::default() };
    let keys = RunKeys::new("prism", &unique("judged"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let ((_judge_a, a), (_judge_b, b)) = (judging_labeler(), judging_labeler());
    // Small entries, often: several entries per process.
    let share = Share { every: Duration::from_millis(20), steps_per_entry: 2, keep: 1024 };
    let sharing_a = Sharing::start(a.clone(), &redis, &keys, "reward-1", share.clone()).await.unwrap();
    let sharing_b = Sharing::start(b.clone(), &redis, &keys, "reward-2", share).await.unwrap();
    let (stats_a, stats_b) = (sharing_a.stats(), sharing_b.stats());
    let (stop, stopped) = watch::channel(false);
    let spawn = |s: Sharing| {
        let (c, mut stopped) = (cfg.clone(), stopped.clone());
        tokio::spawn(async move {
            s.run(&c, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
        })
    };
    let (task_a, task_b) = (spawn(sharing_a), spawn(sharing_b));

    // A's judge scores 4 trajectories of 3 steps; B's judge scores nothing.
    for id in 0..4 {
        judge_one(&a, id).await;
    }
    let own_a = distilled(&a);
    assert_eq!(own_a, 12, "A's distilled model learned from its own judge's 12 verdicts");
    eventually("B to learn A's verdicts", Duration::from_secs(20), async || (distilled(&b) == own_a).then_some(())).await;
    // A has read back every entry on the stream (all its own) and skipped them.
    let entries = xlen(&server.url, &keys.judged).await;
    assert!(entries >= 6, "12 steps at most 2 per entry: {entries} entries");
    eventually("A to read its own entries back", Duration::from_secs(20), async || (stats_a.get().own == entries).then_some(())).await;
    assert_eq!(distilled(&a), own_a, "A did not learn its own verdicts again");
    assert_eq!((stats_a.get().published, stats_a.get().learned), (12, 0));

    // The other way: B's judge scores 2 trajectories, A learns them.
    for id in 10..12 {
        judge_one(&b, id).await;
    }
    eventually("A to learn B's verdicts", Duration::from_secs(20), async || (distilled(&a) == own_a + 6).then_some(())).await;
    assert_eq!(distilled(&b), own_a + 6);

    // Malformed entries are counted and skipped; the loop goes on.
    xadd(&server.url, &keys.judged, &[("w", b"reward-9"), ("p", b"\xff\xff not protobuf")]).await;
    xadd(&server.url, &keys.judged, &[("p", b"no sender")]).await;
    let nan = encode_judged("reward-9", &[JudgedStep { context: "1+1".into(), step: "1+1=2".into(), p: f32::NAN, check: None }]);
    xadd(&server.url, &keys.judged, &[("w", b"reward-9"), ("p", &nan)]).await;
    judge_one(&a, 20).await;
    eventually("B to learn past the malformed entries", Duration::from_secs(20), async || {
        (distilled(&b) == own_a + 9 && stats_b.get().malformed == 3).then_some(())
    })
    .await;

    stop.send_replace(true);
    let (sa, sb) = (task_a.await.unwrap().unwrap(), task_b.await.unwrap().unwrap());
    assert_eq!((sa.published, sa.learned, sa.malformed), (15, 6, 3), "{sa:?}");
    assert_eq!((sb.published, sb.learned, sb.malformed), (6, 15, 3), "{sb:?}");
}

/// The reward loop with a distilled labeler shares on the run's judged
/// stream; with a judge, its heartbeats carry the labeler's health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reward_loop_shares_judged_steps_and_reports_health() {
    tch::set_num_threads(1);
    let server = TestRedis::shared();
    let cfg = Config { url: server.url.clone(), batch: 8, block_ms: 100, ..Config::default() };
    let keys = RunKeys::new("prism", &unique("judged-loop"));
    let redis = Redis::connect(&cfg).await.unwrap();
    let (_judge, labeler) = judging_labeler();
    let (_other_judge, other) = judging_labeler();
    let mut a = args(&redis, &keys, "reward-1", FakeLabel { fail_on: None, hang: false }, None);
    a.annotator = Some(labeler.clone());
    a.share = Share { every: Duration::from_millis(20), ..Share::default() };
    let counters = a.counters.clone();
    // Another process reads the judged stream from before the loop starts.
    let peer = Sharing::start(other.clone(), &redis, &keys, "reward-2", Share::default()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let c = cfg.clone();
    let reward = tokio::spawn(async move {
        run(a, &c, async {
            let _ = stopped.await;
        })
        .await
    });
    let (stop_peer, peer_stopped) = tokio::sync::oneshot::channel::<()>();
    let c = cfg.clone();
    let peer = tokio::spawn(async move {
        peer.run(&c, async {
            let _ = peer_stopped.await;
        })
        .await
    });
    let health = eventually("the health source installed", Duration::from_secs(10), async || counters.health()).await;
    assert_eq!((health.judge_wait_ms, health.judge_trusted, health.distill_ready), (Some(0), Some(true), Some(false)));
    // The FakeLabel labels the stream's trajectories; the labeler's judge
    // scores one of its own, which the peer learns.
    judge_one(&labeler, 1).await;
    eventually("the peer to learn the loop's verdicts", Duration::from_secs(20), async || (distilled(&other) == 3).then_some(())).await;
    let _ = stop.send(());
    let summary = reward.await.unwrap().unwrap();
    assert_eq!(summary.shared.published, 3, "{summary:?}");
    let _ = stop_peer.send(());
    assert_eq!(peer.await.unwrap().unwrap().learned, 3);
}
