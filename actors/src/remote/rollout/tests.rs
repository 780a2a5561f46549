//! The rollout loop with an NCCL broadcast rank, against a real learner's
//! Control service and Redis: the in-process collective stands in for NCCL
//! (ranks as threads), which needs one GPU per rank and is checked by
//! scripts/gpu-check.

use super::*;
use prism_learner::collective::Local;
use prism_transport::nccl_weights::{Join, Sender};
use prism_transport::nccl_weights::Collective;
use prism_core::GroupId;
use prism_transport::testing::{weight_layout as layout_of, weight_set as weights, weight_tensor as value};
use prism_transport::{control, testing};
use std::sync::Mutex;
use tch::Device;

fn join(rank: Local) -> Join {
    Box::new(move || Ok(Box::new(rank) as Box<dyn Collective>))
}

/// Hands out two prompts, publishing (and broadcasting) v2 before the second,
/// which needs it; then says the run stopped.
struct TwoSteps {
    sender: Sender,
    control: control::Control,
    issued: Mutex<u64>,
}

#[prism_transport::async_trait]
impl control::WorkSource for TwoSteps {
    async fn get_work(&self, _worker: &str, _max: usize, _wait: Duration) -> Option<Vec<Assignment>> {
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
        let prompt = testing::trajectory(0, 1).prompt;
        Some(vec![Assignment { group: GroupId(*issued), prompt, min_version: PolicyVersion(version) }])
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
                let mut t = testing::trajectory(a.group.0 * 4, 3);
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
    let config = prism_transport::Config { weights: prism_transport::WeightTransport::Nccl, nccl_rollouts: 1, heartbeat_ms: 100, dead_after_ms: 5000, ..Default::default() };
    let learner = testing::TestLearner::start(&config, prism_transport::grpc::Config::default(), None).await;
    let mut hub = Local::group(2, Duration::from_secs(10)).into_iter();
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    sender.publish(weights(1)).unwrap();
    learner.control.set_policy_version(1);
    learner.control.set_work_source(Arc::new(TwoSteps { sender, control: learner.control.clone(), issued: Mutex::new(0) }));

    let client = control::ControlClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), control::Role::Rollout, "gpu-box", "cuda:1", counters.clone()).await.unwrap();
    assert_eq!(membership.borrow().nccl_rank, 1);
    let receiver = Receiver::spawn(join(hub.next().unwrap()), layout_of(&weights(0)), Device::Cpu).unwrap();
    let redis_server = testing::TestRedis::shared();
    let redis_cfg = redis::Config { url: redis_server.url.clone(), ..Default::default() };
    let loaded = Arc::new(Mutex::new(Vec::new()));
    let args = RolloutArgs {
        control: client,
        weights: WeightsClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap(),
        redis: redis::Redis::connect(&redis_cfg).await.unwrap(),
        keys: redis::RunKeys::new("prism-test", &testing::unique("nccl-rollout")),
        generator: Box::new(Recorder(loaded.clone())),
        prompts_per_batch: 1,
        counters,
        membership,
        give_up_after: Duration::from_secs(5),
        broadcast: Some((Arc::new(receiver), Duration::from_secs(10))),
        health: Default::default(),
        inflight: false,
    };
    let summary = tokio::time::timeout(Duration::from_secs(60), run(args, &redis_cfg, std::future::pending())).await.expect("the rollout finishes").unwrap();
    heartbeats.abort();
    assert_eq!((summary.groups, summary.weight_broadcasts, summary.weight_pulls), (2, 2, 0), "{summary:?}");
    assert_eq!(*loaded.lock().unwrap(), vec![1.0, 2.0]);
}

/// Hands out one prompt per ask until the run stops; records who left.
struct OnePrompt {
    issued: Mutex<u64>,
    failed: Arc<Mutex<Vec<String>>>,
}

#[prism_transport::async_trait]
impl control::WorkSource for OnePrompt {
    async fn get_work(&self, _worker: &str, _max: usize, _wait: Duration) -> Option<Vec<Assignment>> {
        let mut issued = self.issued.lock().unwrap();
        *issued += 1;
        let prompt = testing::trajectory(0, 1).prompt;
        Some(vec![Assignment { group: GroupId(*issued), prompt, min_version: PolicyVersion(1) }])
    }
    fn delivered(&self, _: &str, _: &[u64], _: u64, _: u64, _: f64) {}
    fn worker_failed(&self, worker: &str) {
        self.failed.lock().unwrap().push(worker.to_string());
    }
}

/// Loads weights, then fails every generation.
struct Broken;

impl crate::backend::Generate for Broken {
    fn load_weights(&mut self, _: &WeightSet) -> crate::backend::BackendResult<()> {
        Ok(())
    }
    fn generate(&mut self, _: &[crate::backend::Assignment], _: PolicyVersion) -> crate::backend::BackendResult<Vec<Vec<prism_core::Trajectory>>> {
        Err(crate::backend::BackendError::new("out of memory"))
    }
}

/// A rollout process whose generation fails leaves the run at once (the
/// learner hears it left, so its prompts are issued again) and returns the
/// error, for its process supervisor to restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_generation_fails_leaves_the_run_and_returns_the_error() {
    let config = prism_transport::Config { heartbeat_ms: 100, dead_after_ms: 5000, ..Default::default() };
    let learner = testing::TestLearner::start(&config, prism_transport::grpc::Config::default(), None).await;
    learner.weights.publish(prism_transport::weights::WeightBytes::from_tensors(1, [("model.b", &tch::Tensor::zeros([1, 1], (tch::Kind::Float, Device::Cpu)))]).unwrap());
    learner.control.set_policy_version(1);
    let failed = Arc::new(Mutex::new(Vec::new()));
    learner.control.set_work_source(Arc::new(OnePrompt { issued: Mutex::new(0), failed: failed.clone() }));

    let client = control::ControlClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), control::Role::Rollout, "box", "cpu", counters.clone()).await.unwrap();
    let worker_id = membership.borrow().worker_id.clone();
    let redis_server = testing::TestRedis::shared();
    let redis_cfg = redis::Config { url: redis_server.url.clone(), ..Default::default() };
    let args = RolloutArgs {
        control: client,
        weights: WeightsClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap(),
        redis: redis::Redis::connect(&redis_cfg).await.unwrap(),
        keys: redis::RunKeys::new("prism-test", &testing::unique("failing-rollout")),
        generator: Box::new(Broken),
        prompts_per_batch: 1,
        counters,
        membership,
        give_up_after: Duration::from_secs(5),
        broadcast: None,
        health: Default::default(),
        inflight: false,
    };
    let result = tokio::time::timeout(Duration::from_secs(60), run(args, &redis_cfg, std::future::pending())).await.expect("the rollout returns");
    heartbeats.abort();
    let error = result.expect_err("a failed generation is the rollout's error").to_string();
    assert!(error.contains("generation") && error.contains("out of memory"), "{error}");
    assert_eq!(*failed.lock().unwrap(), vec![worker_id], "the learner heard the worker left");
}

/// Hands out one prompt needing `min_version`, then waits for the run to
/// stop (`then_none`: says at once that it stopped); records deliveries.
struct Scripted {
    min_version: u64,
    first_group: u64,
    then_none: bool,
    issued: Mutex<u64>,
    delivered: Arc<Mutex<Vec<(String, Vec<u64>)>>>,
}

#[prism_transport::async_trait]
impl control::WorkSource for Scripted {
    async fn get_work(&self, _worker: &str, _max: usize, wait: Duration) -> Option<Vec<Assignment>> {
        let issued = {
            let mut issued = self.issued.lock().unwrap();
            *issued += 1;
            *issued
        };
        if issued > 1 {
            if self.then_none {
                return None;
            }
            tokio::time::sleep(wait).await;
            return Some(Vec::new());
        }
        let prompt = testing::trajectory(0, 1).prompt;
        Some(vec![Assignment { group: GroupId(self.first_group), prompt, min_version: PolicyVersion(self.min_version) }])
    }
    fn delivered(&self, worker: &str, groups: &[u64], _: u64, _: u64, _: f64) {
        self.delivered.lock().unwrap().push((worker.to_string(), groups.to_vec()));
    }
    fn worker_failed(&self, _: &str) {}
}

fn publish(learner: &testing::TestLearner, version: u64) {
    let set = weights(version);
    let tensors = set.tensors.lock().unwrap();
    learner.weights.publish(prism_transport::weights::WeightBytes::from_tensors(version, tensors.iter().map(|(n, t)| (n.as_str(), t))).unwrap());
    learner.control.set_policy_version(version);
}

/// The learner is killed while a rollout waits for the weights its work needs
/// (v5, announced, not yet published), and comes back from an older
/// checkpoint (v1) on the same address: the rollout waits out the restart,
/// registers again, drops the work the old learner gave (the new one never
/// heard of it), and samples the new learner's work with its weights.
/// (Before, the rollout failed on the first refused fetch, or after waiting
/// for a v5 the restarted learner never serves.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_its_learner_restarting_from_an_older_checkpoint() {
    let config = prism_transport::Config { heartbeat_ms: 100, dead_after_ms: 5000, ..Default::default() };
    let old = testing::TestLearner::start(&config, prism_transport::grpc::Config::default(), None).await;
    publish(&old, 3);
    old.control.set_policy_version(5);
    let old_delivered = Arc::new(Mutex::new(Vec::new()));
    let old_work = Arc::new(Scripted { min_version: 5, first_group: 1, then_none: false, issued: Mutex::new(0), delivered: old_delivered.clone() });
    old.control.set_work_source(old_work.clone());
    let port: u16 = old.addr.rsplit(':').next().unwrap().parse().unwrap();

    let client = control::ControlClient::connect(&old.grpc, Some(&old.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), control::Role::Rollout, "box", "cpu", counters.clone()).await.unwrap();
    let first_id = membership.borrow().worker_id.clone();
    let redis_server = testing::TestRedis::shared();
    let redis_cfg = redis::Config { url: redis_server.url.clone(), ..Default::default() };
    let loaded = Arc::new(Mutex::new(Vec::new()));
    let args = RolloutArgs {
        control: client,
        weights: WeightsClient::connect(&old.grpc, Some(&old.addr), None).await.unwrap(),
        redis: redis::Redis::connect(&redis_cfg).await.unwrap(),
        keys: redis::RunKeys::new("prism-test", &testing::unique("restarted-learner")),
        generator: Box::new(Recorder(loaded.clone())),
        prompts_per_batch: 1,
        counters,
        membership: membership.clone(),
        give_up_after: Duration::from_secs(20),
        broadcast: None,
        health: Default::default(),
        inflight: false,
    };
    let rollout = tokio::spawn({
        let redis_cfg = redis_cfg.clone();
        async move { run(args, &redis_cfg, std::future::pending()).await }
    });
    // The rollout holds group 1 and waits for v5.
    let deadline = Instant::now() + Duration::from_secs(20);
    while *old_work.issued.lock().unwrap() == 0 {
        assert!(Instant::now() < deadline, "the rollout never asked for work");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grpc = old.grpc.clone();
    drop(old);
    // Down for a second: fetches and heartbeats are refused meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let new = testing::TestLearner::start_at(port, &config, grpc, None).await;
    publish(&new, 1);
    let new_delivered = Arc::new(Mutex::new(Vec::new()));
    new.control.set_work_source(Arc::new(Scripted { min_version: 1, first_group: 100, then_none: true, issued: Mutex::new(0), delivered: new_delivered.clone() }));

    let summary = tokio::time::timeout(Duration::from_secs(60), rollout).await.expect("the rollout finishes").unwrap().unwrap();
    heartbeats.abort();
    let second_id = membership.borrow().worker_id.clone();
    assert_ne!(first_id, second_id, "the rollout registered again");
    assert_eq!(*new_delivered.lock().unwrap(), vec![(second_id, vec![100])], "the new learner's group, under the new id");
    assert!(old_delivered.lock().unwrap().is_empty());
    assert_eq!((summary.groups, summary.weight_pulls), (1, 1), "{summary:?}");
    assert_eq!(*loaded.lock().unwrap(), vec![1.0], "sampled with the restarted learner's v1");
}

/// Hands out one prompt needing v1, then publishes v2's adapters and hands
/// out one needing v2, then says the run stopped.
struct LoraSteps {
    learner: Arc<testing::TestLearner>,
    v2: Mutex<Option<prism_transport::weights::WeightBytes>>,
    issued: Mutex<u64>,
}

#[prism_transport::async_trait]
impl control::WorkSource for LoraSteps {
    async fn get_work(&self, _worker: &str, _max: usize, _wait: Duration) -> Option<Vec<Assignment>> {
        let issued = {
            let mut issued = self.issued.lock().unwrap();
            *issued += 1;
            *issued
        };
        let version = match issued {
            1 => 1,
            2 => {
                self.learner.weights.publish(self.v2.lock().unwrap().take().unwrap());
                self.learner.control.set_policy_version(2);
                2
            }
            _ => return None,
        };
        let prompt = testing::trajectory(0, 1).prompt;
        Some(vec![Assignment { group: GroupId(issued), prompt, min_version: PolicyVersion(version) }])
    }
    fn delivered(&self, _: &str, _: &[u64], _: u64, _: u64, _: f64) {}
    fn worker_failed(&self, _: &str) {}
}

/// Weight sets as loaded, in order.
type Loaded = Arc<Mutex<Vec<Vec<(String, tch::Tensor)>>>>;

/// Keeps a copy of every weight set it loads.
struct Keeper(Loaded);

impl crate::backend::Generate for Keeper {
    fn load_weights(&mut self, w: &WeightSet) -> crate::backend::BackendResult<()> {
        let tensors = w.tensors.lock().unwrap().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        self.0.lock().unwrap().push(tensors);
        Ok(())
    }
    fn generate(&mut self, work: &[crate::backend::Assignment], version: PolicyVersion) -> crate::backend::BackendResult<Vec<Vec<prism_core::Trajectory>>> {
        Recorder(Arc::default()).generate(work, version)
    }
}

/// A LoRA learner's versions reach a rollout process as the frozen base,
/// fetched once, and each version's adapters alone: what the rollout loads
/// is the learner's merged weights bit for bit, and the bytes it fetched
/// are the base's once plus two adapter sets (not two whole models).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_rollout_fetches_the_base_once_then_adapters_and_loads_the_merged_weights() {
    use prism_transport::weights::{Part, WeightBytes, base_id};
    let mut model = prism_model::Transformer::new(prism_model::builtin::tiny_arith_config(), Device::Cpu, prism_model::Dtype::F32, 3).unwrap();
    let lora = prism_model::LoraConfig { rank: 4, alpha: 8.0, ..Default::default() };
    model.attach_lora(&lora, 9, None).unwrap();
    // A version: the adapters' B drawn anew (as training moves them), its
    // adapters' bytes and the merged weights it stands for.
    let version = |v: u64| {
        tch::no_grad(|| {
            tch::manual_seed(v as i64);
            for (name, t) in model.adapter_store().unwrap().variables() {
                if name.contains("lora_B") {
                    t.shallow_clone().copy_(&(t.randn_like() * 0.05));
                }
            }
        });
        let (scale, adapters) = model.adapter_weights().unwrap();
        let bytes = WeightBytes::from_tensors(v, adapters.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
        (bytes, scale, model.merged_weights())
    };
    let mut vars: Vec<(String, tch::Tensor)> = model.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let base = WeightBytes::from_tensors(0, vars.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
    let id = base_id(&base.tensors);
    let (v1, scale, merged1) = version(1);
    let (v2, _, merged2) = version(2);
    assert!(!merged1.iter().zip(&merged2).all(|(a, b)| a.1.equal(&b.1)), "the versions differ");
    let total = base.total_bytes() + v1.total_bytes() + v2.total_bytes();
    assert!(v1.total_bytes() * 5 < base.total_bytes(), "{} adapter bytes against {}", v1.total_bytes(), base.total_bytes());

    let config = prism_transport::Config { heartbeat_ms: 100, dead_after_ms: 5000, ..Default::default() };
    let learner = Arc::new(testing::TestLearner::start(&config, prism_transport::grpc::Config::default(), None).await);
    learner.weights.publish_base(base.with_part(Part::Base { id }));
    learner.weights.publish(v1.with_part(Part::Adapters { base: id, scale }));
    learner.control.set_policy_version(1);
    let v2 = v2.with_part(Part::Adapters { base: id, scale });
    learner.control.set_work_source(Arc::new(LoraSteps { learner: learner.clone(), v2: Mutex::new(Some(v2)), issued: Mutex::new(0) }));

    let client = control::ControlClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), control::Role::Rollout, "box", "cpu", counters.clone()).await.unwrap();
    let redis_server = testing::TestRedis::shared();
    let redis_cfg = redis::Config { url: redis_server.url.clone(), ..Default::default() };
    let loaded = Arc::new(Mutex::new(Vec::new()));
    let args = RolloutArgs {
        control: client,
        weights: WeightsClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap(),
        redis: redis::Redis::connect(&redis_cfg).await.unwrap(),
        keys: redis::RunKeys::new("prism-test", &testing::unique("lora-rollout")),
        generator: Box::new(Keeper(loaded.clone())),
        prompts_per_batch: 1,
        counters,
        membership,
        give_up_after: Duration::from_secs(5),
        broadcast: None,
        health: Default::default(),
        inflight: false,
    };
    let summary = tokio::time::timeout(Duration::from_secs(60), run(args, &redis_cfg, std::future::pending())).await.expect("the rollout finishes").unwrap();
    heartbeats.abort();
    assert_eq!((summary.groups, summary.weight_pulls), (2, 2), "{summary:?}");
    assert_eq!(summary.weight_bytes, total, "the base once and two adapter sets: {summary:?}");
    let loaded = loaded.lock().unwrap();
    assert_eq!(loaded.len(), 2);
    for (got, want) in loaded.iter().zip([&merged1, &merged2]) {
        assert_eq!(got.len(), want.len());
        for ((name, t), (want_name, w)) in got.iter().zip(want.iter()) {
            assert_eq!(name, want_name);
            assert!(t.equal(w), "{name} differs from the learner's merged weights");
        }
    }
}

/// Polls `newer` between "decode steps", as the engine's refresh does, until
/// a newer version comes; remembers each version's `model.b` it loaded.
struct PollsInFlight {
    loaded: Arc<Mutex<Vec<f64>>>,
    generating: Arc<std::sync::atomic::AtomicBool>,
}

impl crate::backend::Generate for PollsInFlight {
    fn load_weights(&mut self, w: &WeightSet) -> crate::backend::BackendResult<()> {
        self.loaded.lock().unwrap().push(value(w, "model.b").double_value(&[0, 0]));
        Ok(())
    }
    fn generate(&mut self, work: &[crate::backend::Assignment], version: PolicyVersion) -> crate::backend::BackendResult<Vec<Vec<prism_core::Trajectory>>> {
        Recorder(Arc::default()).generate(work, version)
    }
    fn generate_inflight(
        &mut self,
        work: &[crate::backend::Assignment],
        version: PolicyVersion,
        newer: &mut crate::backend::NewerWeights<'_>,
    ) -> crate::backend::BackendResult<(Vec<Vec<prism_core::Trajectory>>, PolicyVersion)> {
        self.generating.store(true, Relaxed);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(w) = newer(version) {
                self.loaded.lock().unwrap().push(value(&w, "model.b").double_value(&[0, 0]));
                return Ok((self.generate(work, version)?, w.version));
            }
            if Instant::now() > deadline {
                return Err(crate::backend::BackendError::new("no newer weights arrived in flight"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// With in-flight updates a rollout process fetches a version announced
/// while it generates (v2, published mid-generation) and hands it to the
/// generation between decode steps: the generation loads v1 first, then v2
/// in flight, and the worker holds v2 after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_with_inflight_updates_loads_a_version_announced_mid_generation() {
    let config = prism_transport::Config { heartbeat_ms: 100, dead_after_ms: 5000, ..Default::default() };
    let learner = testing::TestLearner::start(&config, prism_transport::grpc::Config::default(), None).await;
    publish(&learner, 1);
    let delivered = Arc::new(Mutex::new(Vec::new()));
    learner.control.set_work_source(Arc::new(Scripted { min_version: 1, first_group: 1, then_none: true, issued: Mutex::new(0), delivered: delivered.clone() }));
    let client = control::ControlClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap();
    let counters = Arc::new(control::Counters::default());
    let (membership, heartbeats) = control::join(client.clone(), control::Role::Rollout, "box", "cpu", counters.clone()).await.unwrap();
    let redis_server = testing::TestRedis::shared();
    let redis_cfg = redis::Config { url: redis_server.url.clone(), ..Default::default() };
    let (loaded, generating) = (Arc::new(Mutex::new(Vec::new())), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let args = RolloutArgs {
        control: client,
        weights: WeightsClient::connect(&learner.grpc, Some(&learner.addr), None).await.unwrap(),
        redis: redis::Redis::connect(&redis_cfg).await.unwrap(),
        keys: redis::RunKeys::new("prism-test", &testing::unique("inflight-rollout")),
        generator: Box::new(PollsInFlight { loaded: loaded.clone(), generating: generating.clone() }),
        prompts_per_batch: 1,
        counters: counters.clone(),
        membership,
        give_up_after: Duration::from_secs(5),
        broadcast: None,
        health: Default::default(),
        inflight: true,
    };
    let rollout = tokio::spawn({
        let redis_cfg = redis_cfg.clone();
        async move { run(args, &redis_cfg, std::future::pending()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !generating.load(Relaxed) {
        assert!(Instant::now() < deadline, "the rollout never generated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&learner, 2);
    let summary = tokio::time::timeout(Duration::from_secs(60), rollout).await.expect("the rollout finishes").unwrap().unwrap();
    heartbeats.abort();
    assert_eq!(*loaded.lock().unwrap(), vec![1.0, 2.0], "v1, then v2 in flight");
    assert_eq!((summary.groups, summary.weight_pulls), (1, 2), "{summary:?}");
    assert_eq!(counters.policy_version.load(Relaxed), 2, "the worker holds v2");
    assert_eq!(delivered.lock().unwrap().len(), 1);
}
