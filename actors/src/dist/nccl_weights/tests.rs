//! The broadcast protocol between the learner's Sender and rollout Receivers,
//! over the in-process collective (ranks as threads, every call bounded by a
//! timeout): NCCL itself needs one GPU per rank and is checked by
//! scripts/gpu-check.

use super::*;
use prism_learner::collective::Local;
use std::time::Instant;

/// Joins as `rank` of an in-process collective.
fn join(rank: Local) -> Join {
    Box::new(move || Ok(Box::new(rank) as Box<dyn Collective>))
}

/// `world` ranks of one process, failing a call after `timeout`.
fn hub(world: usize, timeout: Duration) -> std::vec::IntoIter<Local> {
    Local::group(world, timeout).into_iter()
}

fn weights(version: u64) -> Arc<WeightSet> {
    let v = version as f64;
    WeightSet::new(
        PolicyVersion(version),
        vec![
            ("model.b".into(), Tensor::full([3, 4], v, (Kind::Float, Device::Cpu))),
            ("model.a".into(), Tensor::arange(5, (Kind::Int64, Device::Cpu)) + version as i64),
        ],
    )
}

fn layout_of(set: &WeightSet) -> Layout {
    let t = set.tensors.lock().unwrap();
    layout(t.iter().map(|(n, t)| (n.as_str(), t)))
}

fn value(set: &WeightSet, name: &str) -> Tensor {
    set.tensors.lock().unwrap().iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).unwrap()
}

#[test]
fn every_rank_receives_the_newest_published_version() {
    let mut hub = hub(3, Duration::from_secs(10));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    let receivers: Vec<Receiver> = hub.map(|r| Receiver::spawn(join(r), layout_of(&weights(0)), Device::Cpu).unwrap()).collect();
    // The first version goes out as soon as every rank is there.
    sender.publish(weights(1)).unwrap();
    for r in &receivers {
        let got = r.wait_for(1, Duration::from_secs(10)).unwrap().expect("v1 arrives");
        assert_eq!(got.version.0, 1);
        assert_eq!(value(&got, "model.b"), Tensor::full([3, 4], 1.0, (Kind::Float, Device::Cpu)));
        assert_eq!(value(&got, "model.a"), Tensor::arange(5, (Kind::Int64, Device::Cpu)) + 1);
    }
    // Versions published faster than they are broadcast: the newest wins,
    // and ranks join one broadcast per announcement of something newer.
    for v in 2..=6 {
        sender.publish(weights(v)).unwrap();
        for r in &receivers {
            r.announce(v);
        }
    }
    assert!(sender.wait_broadcast(6, Duration::from_secs(10)).unwrap(), "v6 broadcast");
    for r in &receivers {
        let got = r.wait_for(6, Duration::from_secs(10)).unwrap().expect("v6 arrives");
        assert_eq!(value(&got, "model.b"), Tensor::full([3, 4], 6.0, (Kind::Float, Device::Cpu)));
        assert!(r.wait_for(7, Duration::ZERO).unwrap().is_none(), "nothing newer staged");
    }
}

#[test]
fn a_rollout_with_another_model_fails_naming_the_difference_and_the_learner_times_out() {
    let mut hub = hub(2, Duration::from_millis(300));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    let mut other = layout_of(&weights(0));
    other[0].1 = vec![6]; // model.a: 6 elements, not 5
    let receiver = Receiver::spawn(join(hub.next().unwrap()), other, Device::Cpu).unwrap();
    sender.publish(weights(1)).unwrap();
    let err = receiver.wait_for(1, Duration::from_secs(10)).err().expect("the header does not match").to_string();
    assert!(err.contains("the learner broadcasts 2 tensors of 88 bytes, this rollout's model has 2 of 96"), "{err}");
    // The learner's payload broadcast has no one to meet: it fails within the
    // timeout, and the next publish says so, naming rank and operation.
    let start = Instant::now();
    while sender.publish(weights(2)).is_ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "the sender never failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = sender.publish(weights(3)).err().unwrap().to_string();
    assert!(err.contains("rank 0/2: broadcast from rank 0 failed: not every rank joined within 300 ms"), "{err}");
}

#[test]
fn a_rollout_that_never_joins_fails_the_learner_within_the_timeout() {
    let mut hub = hub(2, Duration::from_millis(200));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    sender.publish(weights(1)).unwrap();
    let start = Instant::now();
    let err = loop {
        match sender.wait_broadcast(1, Duration::from_millis(50)) {
            Err(e) => break e.to_string(),
            Ok(done) => assert!(!done && start.elapsed() < Duration::from_secs(10), "no rank joined, yet v1 counted as sent"),
        }
    };
    assert!(err.contains("rank 0/2") && err.contains("within 200 ms (ranks that did not join: [1])"), "{err}");
}

#[test]
fn the_signature_tells_names_shapes_and_dtypes_apart() {
    let base = layout_of(&weights(0));
    let mut renamed = base.clone();
    renamed[0].0 = "model.c".into();
    let mut retyped = base.clone();
    retyped[0].2 = Kind::Double; // same bytes as int64
    let (n, b, s) = describe(&base);
    for other in [renamed, retyped] {
        let (n2, b2, s2) = describe(&other);
        assert_eq!((n, b), (n2, b2));
        assert_ne!(s, s2);
    }
}

/// Hands out two prompts, publishing (and broadcasting) v2 before the second,
/// which needs it; then says the run stopped.
struct TwoSteps {
    sender: Sender,
    control: crate::dist::control::Control,
    issued: Mutex<u64>,
}

#[tonic::async_trait]
impl crate::dist::control::WorkSource for TwoSteps {
    async fn get_work(&self, _worker: &str, _max: usize, _wait: Duration) -> Option<Vec<prism_proto::v1::Assignment>> {
        let mut issued = self.issued.lock().unwrap();
        *issued += 1;
        let version = match *issued {
            1 => 1,
            2 => {
                self.sender.publish(weights(2)).unwrap();
                self.control.set_policy_version(2);
                2
            }
            _ => return None,
        };
        let prompt = crate::dist::testing::trajectory(0, 1).prompt;
        Some(vec![prism_proto::v1::Assignment { group: *issued, prompt: Some((&prompt).into()), min_version: version }])
    }
    fn delivered(&self, _: &str, _: &[u64], _: u64, _: u64, _: f64) {}
    fn worker_failed(&self, _: &str) {}
}

/// Remembers the `model.b` value of every weight set it loads.
struct Recorder(Arc<Mutex<Vec<f64>>>);

impl crate::backend::Generate for Recorder {
    fn load_weights(&mut self, w: &WeightSet) -> crate::backend::BackendResult<()> {
        self.0.lock().unwrap().push(value(w, "model.b").double_value(&[0, 0]));
        Ok(())
    }
    fn generate(&mut self, work: &[crate::backend::Assignment], version: PolicyVersion) -> crate::backend::BackendResult<Vec<Vec<prism_core::Trajectory>>> {
        Ok(work
            .iter()
            .map(|a| {
                let mut t = crate::dist::testing::trajectory(a.group.0 * 4, 3);
                t.policy_version = version;
                vec![t]
            })
            .collect())
    }
}

/// A rollout process's loop with a broadcast rank loads the versions the
/// learner broadcasts between generations, the one each prompt needs, and
/// pulls nothing over the Weights stream (on which nothing is published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_a_rank_loads_broadcast_weights_between_generations() {
    use crate::dist::{control, redis, rollout, testing};
    let config = crate::dist::Config { weights: "nccl".into(), nccl_rollouts: 1, heartbeat_ms: 100, dead_after_ms: 5000, ..Default::default() };
    let learner = testing::TestLearner::start(&config, crate::dist::grpc::Config::default(), None).await;
    let mut hub = hub(2, Duration::from_secs(10));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    sender.publish(weights(1)).unwrap();
    learner.control.set_policy_version(1);
    learner.control.set_work_source(Arc::new(TwoSteps { sender, control: learner.control.clone(), issued: Mutex::new(0) }));

    let client = control::ControlClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), prism_proto::v1::Role::Rollout, "gpu-box", "cuda:1", counters.clone()).await.unwrap();
    assert_eq!(membership.borrow().nccl_rank, 1);
    let receiver = Receiver::spawn(join(hub.next().unwrap()), layout_of(&weights(0)), Device::Cpu).unwrap();
    let redis_server = testing::TestRedis::shared();
    let redis_cfg = redis::Config { url: redis_server.url.clone(), ..Default::default() };
    let loaded = Arc::new(Mutex::new(Vec::new()));
    let args = rollout::RolloutArgs {
        control: client,
        weights: crate::dist::weights::WeightsClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap(),
        redis: redis::Redis::connect(&redis_cfg).await.unwrap(),
        keys: redis::RunKeys::new("prism-test", &testing::unique("nccl-rollout")),
        generator: Box::new(Recorder(loaded.clone())),
        prompts_per_batch: 1,
        counters,
        membership,
        give_up_after: Duration::from_secs(5),
        broadcast: Some((Arc::new(receiver), Duration::from_secs(10))),
    };
    let summary = tokio::time::timeout(Duration::from_secs(60), rollout::run(args, &redis_cfg, std::future::pending())).await.expect("the rollout finishes").unwrap();
    heartbeats.abort();
    assert_eq!((summary.groups, summary.weight_broadcasts, summary.weight_pulls), (2, 2, 0), "{summary:?}");
    assert_eq!(*loaded.lock().unwrap(), vec![1.0, 2.0]);
}
