//! The broadcast protocol between the learner's Sender and rollout Receivers,
//! over an in-process collective (threads meeting at a barrier with a
//! timeout): NCCL itself needs one GPU per rank and is checked by
//! scripts/gpu-check.

use super::*;
use std::time::Instant;

/// Ranks of one process meeting for each broadcast.
struct Hub {
    world: usize,
    timeout: Duration,
    state: Mutex<HubState>,
    cv: Condvar,
}

#[derive(Default)]
struct HubState {
    generation: u64,
    arrived: usize,
    payload: Vec<Tensor>,
}

struct Rank {
    hub: Arc<Hub>,
    rank: usize,
}

impl Hub {
    fn new(world: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self { world, timeout, state: Mutex::new(HubState::default()), cv: Condvar::new() })
    }

    fn join(hub: &Arc<Self>, rank: usize) -> Join {
        let hub = hub.clone();
        Box::new(move || Ok(Box::new(Rank { hub, rank }) as Box<dyn Collective>))
    }

    /// Every rank arrives (or the caller times out, like NCCL under our deadline).
    fn barrier(&self, rank: usize, op: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let mut s = self.state.lock().unwrap();
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(());
        }
        while s.generation == generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.arrived -= 1;
                return Err(Error::NcclTimeout { rank, world: self.world, op: op.into(), timeout_ms: self.timeout.as_millis() as u64 });
            }
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
        Ok(())
    }
}

impl Collective for Rank {
    fn world(&self) -> usize {
        self.hub.world
    }
    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        let op = format!("broadcast from rank {root}");
        if self.rank == root {
            self.hub.state.lock().unwrap().payload = tensors.iter().map(Tensor::copy).collect();
        }
        self.hub.barrier(self.rank, &op)?; // the payload is in place
        if self.rank != root {
            let s = self.hub.state.lock().unwrap();
            if s.payload.len() != tensors.len() {
                return Err(Error::Nccl { rank: self.rank, world: self.hub.world, op, reason: "tensor count differs".into() });
            }
            for (dst, src) in tensors.iter().zip(&s.payload) {
                let mut dst = dst.shallow_clone();
                dst.f_copy_(src).map_err(|e| Error::Nccl { rank: self.rank, world: self.hub.world, op: op.clone(), reason: e.to_string() })?;
            }
        }
        self.hub.barrier(self.rank, &op) // every rank has copied
    }
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
    let hub = Hub::new(3, Duration::from_secs(10));
    let sender = Sender::spawn(Hub::join(&hub, 0)).unwrap();
    let receivers: Vec<Receiver> =
        (1..3).map(|r| Receiver::spawn(Hub::join(&hub, r), layout_of(&weights(0)), Device::Cpu).unwrap()).collect();
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
    let hub = Hub::new(2, Duration::from_millis(300));
    let sender = Sender::spawn(Hub::join(&hub, 0)).unwrap();
    let mut other = layout_of(&weights(0));
    other[0].1 = vec![6]; // model.a: 6 elements, not 5
    let receiver = Receiver::spawn(Hub::join(&hub, 1), other, Device::Cpu).unwrap();
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
    assert!(err.contains("NCCL rank 0/2: broadcast from rank 0 did not complete within 300 ms"), "{err}");
}

#[test]
fn a_rollout_that_never_joins_fails_the_learner_within_the_timeout() {
    let hub = Hub::new(2, Duration::from_millis(200));
    let sender = Sender::spawn(Hub::join(&hub, 0)).unwrap();
    sender.publish(weights(1)).unwrap();
    let start = Instant::now();
    let err = loop {
        match sender.wait_broadcast(1, Duration::from_millis(50)) {
            Err(e) => break e.to_string(),
            Ok(done) => assert!(!done && start.elapsed() < Duration::from_secs(10), "no rank joined, yet v1 counted as sent"),
        }
    };
    assert!(err.contains("rank 0/2") && err.contains("did not complete within 200 ms"), "{err}");
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
    let hub = Hub::new(2, Duration::from_secs(10));
    let sender = Sender::spawn(Hub::join(&hub, 0)).unwrap();
    sender.publish(weights(1)).unwrap();
    learner.control.set_policy_version(1);
    learner.control.set_work_source(Arc::new(TwoSteps { sender, control: learner.control.clone(), issued: Mutex::new(0) }));

    let client = control::ControlClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), prism_proto::v1::Role::Rollout, "gpu-box", "cuda:1", counters.clone()).await.unwrap();
    assert_eq!(membership.borrow().nccl_rank, 1);
    let receiver = Receiver::spawn(Hub::join(&hub, 1), layout_of(&weights(0)), Device::Cpu).unwrap();
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
