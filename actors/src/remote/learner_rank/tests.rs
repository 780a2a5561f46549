//! A learner rank against a real Control service on loopback, with rank 0
//! played by the test and the ranks joined by the in-process collective (NCCL
//! itself needs a GPU per rank and is checked by scripts/gpu-check).

use super::*;
use prism_transport::control::{self, Role, WorkerState};
use prism_transport::grpc;
use prism_transport::testing::{TestLearner, eventually, labeled};
use prism_learner::Collective;
use prism_learner::collective::Local;
use std::sync::Mutex;
use tch::Tensor;

fn dist(learner_ranks: u64) -> prism_transport::Config {
    prism_transport::Config { learner_ranks, heartbeat_ms: 50, dead_after_ms: 400, ..Default::default() }
}

/// A number that differs when the groups, their order or their members differ.
fn fingerprint(groups: &[Vec<LabeledTrajectory>]) -> f64 {
    let mut f = 0.0;
    for (g, group) in groups.iter().enumerate() {
        for (i, t) in group.iter().enumerate() {
            f += ((g + 1) * 31 + i + 1) as f64 * t.trajectory.id.0 as f64 + t.trajectory.tokens.len() as f64;
        }
    }
    f
}

/// Sums `x` over the ranks.
fn summed(c: &Local, x: f64) -> f64 {
    let t = Tensor::from_slice(&[x]);
    c.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
    t.double_value(&[0])
}

/// Stands in for a rank's learner: each step meets rank 0 in an all-reduce of
/// the groups' fingerprint, as the real one meets it in the gradients'.
struct Fake {
    collective: Option<Local>,
    joined: Arc<Mutex<Option<(Vec<u8>, usize, u32)>>>,
    sums: Arc<Mutex<Vec<(f64, f64)>>>,
}

impl RankTrainer for Fake {
    fn join(&mut self, id: &NcclId, rank: usize) -> BackendResult<()> {
        *self.joined.lock().unwrap() = Some((id.id.clone(), rank, id.world_size));
        Ok(())
    }

    fn train(&mut self, groups: Vec<Vec<LabeledTrajectory>>) -> BackendResult<()> {
        let mine = fingerprint(&groups);
        let c = self.collective.as_ref().expect("joined");
        self.sums.lock().unwrap().push((mine, summed(c, mine)));
        Ok(())
    }

    fn checkpoint(&mut self) -> BackendResult<()> {
        // Meets rank 0 in one collective, as the real one sends its shares.
        let c = self.collective.as_ref().expect("joined");
        self.sums.lock().unwrap().push((-1.0, summed(c, -1.0)));
        Ok(())
    }
}

fn steps() -> Vec<Vec<Vec<LabeledTrajectory>>> {
    (0..3u64).map(|s| (0..2u64).map(|g| (0..4u64).map(|i| labeled(s * 100 + g * 10 + i, 5 + i as usize)).collect()).collect()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_rank_trains_every_step_rank_0_publishes_and_leaves_when_it_stops() {
    let l = TestLearner::start(&dist(2), grpc::Config::default(), None).await;
    let client = control::ControlClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), Role::Learner, "gpu-1", "cuda:1", counters.clone()).await.unwrap();
    assert_eq!(membership.borrow().nccl_rank, 1);
    assert!(membership.borrow().worker_id.starts_with("learner-"));

    let mut ranks = Local::group(2, Duration::from_secs(20)).into_iter();
    let rank0 = ranks.next().unwrap();
    let joined = Arc::new(Mutex::new(None));
    let sums = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake { collective: ranks.next(), joined: joined.clone(), sums: sums.clone() };
    let args = RankArgs {
        control: client.clone(),
        membership,
        counters: counters.clone(),
        trainer: Box::new(fake),
        poll: Duration::from_millis(300),
        health: Default::default(),
    };
    let rank = tokio::spawn(run(args, std::future::pending()));

    // Rank 0, as the learner role does it: the id first (the rank waits for
    // it), then each step's groups published before it trains on them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!rank.is_finished(), "the rank waits for the id");
    l.control.set_nccl_id(GROUP, vec![7; 128], 2);
    let control = l.control.clone();
    let rank0_sums = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for (s, groups) in steps().iter().enumerate() {
            control.publish_step(10 + s as u64, groups);
            let mine = fingerprint(groups);
            out.push((mine, summed(&rank0, mine)));
            if s == 1 {
                // A checkpoint after the second step: the rank meets rank 0 in it.
                control.publish_checkpoint();
                out.push((-1.0, summed(&rank0, -1.0)));
            }
        }
        control.stop_steps();
        out
    })
    .await
    .unwrap();

    let summary = tokio::time::timeout(Duration::from_secs(20), rank).await.expect("the rank stops").unwrap().unwrap();
    assert_eq!(summary, RankSummary { rank: 1, world: 2, steps: 3, trajectories: 24, version: 12, checkpoints: 1 });
    assert_eq!(*joined.lock().unwrap(), Some((vec![7; 128], 1, 2)));
    // Both ranks met in every step's collective with the same groups.
    let sums = sums.lock().unwrap().clone();
    assert_eq!(sums.len(), 4);
    for ((mine, total), (theirs, total0)) in sums.iter().zip(&rank0_sums) {
        assert_eq!(mine, theirs, "the rank trained on other groups than rank 0");
        assert_eq!((*total, *total0), (2.0 * mine, 2.0 * mine));
    }
    assert_eq!(counters.policy_version.load(Relaxed), 12);
    // It said goodbye, and status shows it as a learner rank that left.
    let status = l.control.status();
    let w = status.workers.iter().find(|w| w.role == Role::Learner).unwrap();
    assert_eq!((w.state, w.nccl_rank), (WorkerState::Left, 1));
    heartbeats.abort();
}

#[tokio::test]
async fn learner_ranks_are_handed_out_once_and_a_missing_one_is_reported() {
    let l = TestLearner::start(&dist(3), grpc::Config::default(), None).await;
    let mut c = control::ControlClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    let a = c.register(Role::Learner, "a", "cuda:1").await.unwrap();
    let b = c.register(Role::Learner, "b", "cuda:2").await.unwrap();
    assert_eq!((a.nccl_rank, b.nccl_rank), (1, 2));
    let e = c.register(Role::Learner, "c", "cuda:3").await.unwrap_err().to_string();
    assert!(e.contains("every data-parallel learner rank") && e.contains("dist.learner_ranks = 3"), "{e}");
    // Registering again keeps the rank held, once its holder is declared
    // dead (not while it lives).
    assert!(c.register_again(Role::Learner, "a", "cuda:1", 1).await.is_err(), "rank 1 is alive");
    eventually("a declared dead", Duration::from_secs(10), async || {
        c.heartbeat(&b.worker_id, 0, Default::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = l.control.status();
        (s.workers.iter().find(|w| w.worker_id == a.worker_id).unwrap().state == WorkerState::Dead).then_some(())
    })
    .await;
    let again = c.register_again(Role::Learner, "a", "cuda:1", 1).await.unwrap();
    assert_eq!(again.nccl_rank, 1);
    // Only learner ranks may ask for steps.
    let reward = c.register(Role::Reward, "r", "cpu").await.unwrap();
    let e = c.get_step(&reward.worker_id, 0, Duration::ZERO).await.unwrap_err().to_string();
    assert!(e.contains("not a learner rank"), "{e}");
    // A step not published yet: nothing, after the wait.
    assert_eq!(c.get_step(&b.worker_id, 0, Duration::from_millis(50)).await.unwrap(), StepPoll::Waiting);
    // A rank asking for a step rank 0 has moved past cannot catch up.
    l.control.publish_step(1, &[vec![labeled(1, 3)]]);
    l.control.publish_step(2, &[vec![labeled(2, 3)]]);
    let e = c.get_step(&b.worker_id, 0, Duration::ZERO).await.unwrap_err().to_string();
    assert!(e.contains("step 0 is gone (rank 0 is at step 1)"), "{e}");
    let StepPoll::Ready(step) = c.get_step(&b.worker_id, 1, Duration::ZERO).await.unwrap() else { panic!("step 1 is published") };
    assert_eq!((step.index, step.version, step.groups.len()), (1, 2, 1));
    // Rank 1's first worker goes silent, but its registration again keeps
    // heartbeating: rank 1 is still held.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(800) {
        for id in [&again.worker_id, &b.worker_id] {
            c.heartbeat(id, 0, Default::default()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = l.control.status();
    assert_eq!(status.workers.iter().find(|w| w.worker_id == a.worker_id).unwrap().state, WorkerState::Dead);
    assert!(l.control.lost_learner_ranks().is_empty(), "{:?}", l.control.lost_learner_ranks());
    // Then every rank goes silent: rank 0 hears which it would wait for.
    let lost = eventually("silent learner ranks reported", Duration::from_secs(10), async || {
        let lost = l.control.lost_learner_ranks();
        (lost.len() == 2).then_some(lost)
    })
    .await;
    assert_eq!(lost, vec![(1, again.worker_id.clone()), (2, b.worker_id.clone())]);
}

/// Rank 0's trainer: meets the learner rank in each step's all-reduce.
struct Rank0 {
    collective: Local,
    version: u64,
    sums: Arc<Mutex<Vec<(f64, f64)>>>,
}

impl crate::backend::Train for Rank0 {
    fn version(&self) -> prism_core::PolicyVersion {
        prism_core::PolicyVersion(self.version)
    }
    fn weights(&self) -> BackendResult<Arc<crate::backend::WeightSet>> {
        let w = Tensor::from_slice(&[self.version as f32]);
        Ok(crate::backend::WeightSet::new(prism_core::PolicyVersion(self.version), vec![("model.w".into(), w)]))
    }
    fn admit(&self, _: &[LabeledTrajectory]) -> Result<(), crate::backend::DropReason> {
        Ok(())
    }
    fn train(&mut self, groups: Vec<Vec<LabeledTrajectory>>, _: &[u64]) -> BackendResult<crate::backend::StepReport> {
        let mine = fingerprint(&groups);
        self.sums.lock().unwrap().push((mine, summed(&self.collective, mine)));
        self.version += 1;
        Ok(crate::backend::StepReport { trajectories: groups.iter().map(Vec::len).sum(), ..Default::default() })
    }
    fn evaluate(&mut self) -> BackendResult<crate::backend::EvalReport> {
        Ok(Default::default())
    }
    fn checkpoint(&mut self, _: &crate::backend::SourcePosition) -> BackendResult<()> {
        Ok(())
    }
}

/// The learner role's own loop with `learner_ranks = 2`: it publishes every
/// step's groups before training on them, the rank trains the same groups in
/// the same order, and the rank leaves when the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learner_loop_hands_each_step_to_the_learner_ranks() {
    use prism_transport::redis::{self, Redis, RunKeys};
    use prism_transport::testing::{TestRedis, unique};
    let config = prism_transport::Config { dead_after_ms: 5000, ..dist(2) };
    let l = TestLearner::start(&config, grpc::Config::default(), None).await;
    let server = TestRedis::shared();
    let redis_cfg = redis::Config { url: server.url.clone(), block_ms: 100, ..Default::default() };
    let redis = Redis::connect(&redis_cfg).await.unwrap();
    let keys = RunKeys::new("prism-test", &unique("learner-ranks"));
    // Six complete groups of four on the labeled stream, as reward workers leave them.
    let labels: Vec<prism_core::LabelResult> = (0..24)
        .map(|i| {
            let mut t = labeled(i, 3 + (i % 5) as usize);
            t.trajectory.policy_version = prism_core::PolicyVersion(0);
            Ok(t)
        })
        .collect();
    redis.producer::<prism_core::LabelResult>(&keys.labeled).await.unwrap().send(&labels, &redis_cfg).await.unwrap();

    let mut ranks = Local::group(2, Duration::from_secs(20)).into_iter();
    let rank0_sums = Arc::new(Mutex::new(Vec::new()));
    let trainer = Rank0 { collective: ranks.next().unwrap(), version: 0, sums: rank0_sums.clone() };

    let client = control::ControlClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), Role::Learner, "gpu-1", "cuda:1", counters.clone()).await.unwrap();
    let sums = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake { collective: ranks.next(), joined: Default::default(), sums: sums.clone() };
    l.control.set_nccl_id(GROUP, vec![1; 128], 2);
    let rank = tokio::spawn(run(
        RankArgs { control: client, membership, counters, trainer: Box::new(fake), poll: Duration::from_millis(300), health: Default::default() },
        std::future::pending(),
    ));

    let task_config = prism_rollout::task::Config::default();
    let role = crate::remote::learner::LearnerRole {
        trainer: Box::new(trainer),
        plan: crate::learner::LearnerPlan {
            batch_groups: 2,
            max_staleness: 4,
            stale: crate::learner::StalePolicy::Drop,
            max_steps: 3,
            time_limit: None,
            eval_every: 0,
            checkpoint_every: 0,
        },
        task: Arc::new(prism_rollout::Task::new(&task_config, 0, Box::new(|q: &str| q.to_string())).unwrap()),
        cursor: 0,
        curriculum: prism_rollout::curriculum::Curriculum::new(&task_config.adaptive, 0, None),
        first_group: 0,
        group_timeout: None,
        control: l.control.clone(),
        weights: l.weights.clone(),
        redis,
        keys,
        metrics_path: None,
        progress: tokio::sync::watch::channel(Default::default()).0,
        drain: Duration::from_secs(5),
        broadcast: None,
        learner_ranks: 2,
        health: Default::default(),
    };
    let summary = tokio::time::timeout(Duration::from_secs(60), crate::remote::learner::run(role, &redis_cfg, std::future::pending()))
        .await
        .expect("the learner finishes")
        .unwrap();
    assert_eq!(summary.finish, crate::learner::Finish::MaxSteps);
    let rank = tokio::time::timeout(Duration::from_secs(20), rank).await.expect("the rank stops").unwrap().unwrap();
    assert_eq!(rank, RankSummary { rank: 1, world: 2, steps: 3, trajectories: 24, version: 3, checkpoints: 0 });
    let (theirs, mine) = (rank0_sums.lock().unwrap().clone(), sums.lock().unwrap().clone());
    assert_eq!(theirs.len(), 3);
    assert_eq!(theirs, mine, "rank 0 and the learner rank trained different groups");
    for (fp, total) in mine {
        assert_eq!(total, 2.0 * fp);
    }
    heartbeats.abort();
}
