use super::*;
use crate::testing::TestLearner;
use tch::nn::VarStore;
use tch::{Device, Kind};

/// Adds variable `name` (dotted, as Hugging Face names it) to `vs`.
fn add(vs: &VarStore, name: &str, shape: &[i64], init: tch::nn::Init) -> Tensor {
    let (dir, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let p = dir.split('.').filter(|s| !s.is_empty()).fold(vs.root(), |p, part| p / part);
    p.var(leaf, shape, init)
}

fn randn(vs: &VarStore, name: &str, shape: &[i64]) {
    let _ = add(vs, name, shape, tch::nn::Init::Randn { mean: 0.0, stdev: 1.0 });
}

fn zeros(vs: &VarStore, name: &str, shape: &[i64]) {
    let _ = add(vs, name, shape, tch::nn::Init::Const(0.0));
}

fn store(seed: i64) -> VarStore {
    tch::manual_seed(seed);
    let vs = VarStore::new(Device::Cpu);
    randn(&vs, "model.embed_tokens.weight", &[64, 16]);
    randn(&vs, "model.layers.0.self_attn.q_proj.weight", &[16, 16]);
    randn(&vs, "model.layers.0.self_attn.q_proj.bias", &[16]);
    let _ = add(&vs, "model.norm.weight", &[16], tch::nn::Init::Const(1.0));
    vs
}

fn equal(a: &VarStore, b: &VarStore) -> bool {
    let (a, b) = (a.variables(), b.variables());
    a.len() == b.len() && a.iter().all(|(k, t)| b.get(k).is_some_and(|u| t.equal(u)))
}

async fn learner() -> TestLearner {
    TestLearner::start(&Default::default(), crate::grpc::Config { chunk_bytes: 1024, ..Default::default() }, None).await
}

#[tokio::test]
async fn a_published_version_arrives_whole_and_applies_by_name() {
    let l = learner().await;
    let src = store(1);
    let set = WeightBytes::from_var_store(7, &src).unwrap();
    // 64*16*4 = 4096 bytes: the embedding alone spans four 1 KiB chunks
    assert_eq!(set.total_bytes(), (64 * 16 + 16 * 16 + 16 + 16) * 4);
    l.weights.publish(set.clone());
    let mut c = WeightsClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    assert_eq!(c.latest_version().await.unwrap(), 7);
    let got = c.fetch(0).await.unwrap();
    assert_eq!(got, set);
    let dst = store(2);
    assert!(!equal(&src, &dst));
    assert_eq!(c.pull_newer(0, &dst).await.unwrap(), Some(7));
    assert!(equal(&src, &dst));
    assert_eq!(c.pull_newer(7, &dst).await.unwrap(), None, "nothing newer");
}

#[tokio::test]
async fn dtypes_convert_when_applied() {
    let src = VarStore::new(Device::Cpu);
    let t = src.root().randn("w", &[3, 5], 0.0, 1.0);
    let set = WeightBytes::from_tensors(1, [("w", &t.to_kind(Kind::BFloat16))]).unwrap();
    assert_eq!((set.tensors[0].dtype, set.tensors[0].len()), (v1::DType::Bf16, 30));
    let dst = VarStore::new(Device::Cpu);
    let w = dst.root().zeros("w", &[3, 5]);
    set.apply_to(&dst).unwrap();
    // bf16 keeps 8 mantissa bits: relative error below 2^-8
    let err = (&w - &t).abs().max().double_value(&[]);
    assert!(err < t.abs().max().double_value(&[]) / 256.0 + 1e-6, "max error {err}");
}

#[test]
fn mismatched_names_or_shapes_are_refused_before_anything_is_copied() {
    let src = store(1);
    let set = WeightBytes::from_var_store(3, &src).unwrap();
    let other = VarStore::new(Device::Cpu);
    zeros(&other, "model.embed_tokens.weight", &[64, 8]);
    let err = set.apply_to(&other).unwrap_err().to_string();
    assert_eq!(err, "weights v3: tensor model.embed_tokens.weight: has shape [64, 16], the model's is [64, 8]");
    let bigger = store(2);
    zeros(&bigger, "lm_head.weight", &[64, 16]);
    let before = bigger.variables()["model.norm.weight"].copy();
    let err = set.apply_to(&bigger).unwrap_err().to_string();
    assert!(err.contains("lacks 1 of the model's variables") && err.contains("lm_head.weight"), "{err}");
    assert!(bigger.variables()["model.norm.weight"].equal(&before));
}

#[tokio::test]
async fn asking_for_a_version_not_held_or_before_any_is_an_error() {
    let l = learner().await;
    let mut c = WeightsClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    assert_eq!(c.latest_version().await.unwrap(), 0);
    assert!(c.fetch(0).await.unwrap_err().to_string().contains("no weights published yet"));
    l.weights.publish(WeightBytes::from_var_store(4, &store(1)).unwrap());
    let err = c.fetch(3).await.unwrap_err().to_string();
    assert!(err.contains("version 3 is not held; the newest is 4"), "{err}");
}

/// Serves `service` on a free loopback port; its address.
async fn serve(service: impl v1::weights_server::Weights) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WeightsServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A Weights server that flips one byte of one chunk on the way.
struct Corrupting(Weights);

#[tonic::async_trait]
impl v1::weights_server::Weights for Corrupting {
    async fn get_latest_version(&self, r: Request<v1::GetLatestVersionRequest>) -> Result<Response<v1::VersionInfo>, Status> {
        self.0.get_latest_version(r).await
    }
    type FetchStream = ChunkStream;
    async fn fetch(&self, r: Request<v1::FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        let inner = self.0.fetch(r).await?.into_inner();
        let mut i = 0;
        let stream = inner.map(move |c| {
            i += 1;
            c.map(|mut c| {
                if i == 3 {
                    let mut data = c.data.to_vec();
                    data[10] ^= 1;
                    c.data = data.into();
                }
                c
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tokio::test]
async fn a_corrupted_chunk_is_detected_by_its_checksum() {
    let weights = Weights::new(1024);
    weights.publish(WeightBytes::from_var_store(9, &store(1)).unwrap());
    let addr = serve(Corrupting(weights)).await;
    let mut c = WeightsClient::connect(&Default::default(), Some(&addr), None).await.unwrap();
    let err = c.fetch(0).await.unwrap_err().to_string();
    // sorted names: the embedding comes first; chunk 2 starts at byte 2048
    assert!(err.starts_with("weights v9: tensor model.embed_tokens.weight: chunk at byte 2048 has CRC-32"), "{err}");
}

#[tokio::test]
async fn the_weights_service_wants_the_token_too() {
    let l = TestLearner::start(&Default::default(), Default::default(), Some("tok")).await;
    let mut c = WeightsClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    let err = c.latest_version().await.unwrap_err().to_string();
    assert!(err.contains("GetLatestVersion refused") && err.contains("no bearer token"), "{err}");
}

#[tokio::test]
async fn a_fetch_split_over_any_number_of_connections_reassembles_the_same_set() {
    let l = learner().await;
    let set = WeightBytes::from_var_store(5, &store(3)).unwrap();
    l.weights.publish(set.clone());
    // 7 chunks of 1 KiB: 4 of the embedding, then one per small tensor. 3
    // streams cut inside the embedding; 20 leave some streams empty.
    for streams in [1, 2, 3, 7, 20] {
        let grpc = crate::grpc::Config { weight_streams: streams, ..l.grpc.clone() };
        let mut c = WeightsClient::connect(&grpc, Some(&l.addr), None).await.unwrap();
        assert_eq!(c.inners.len(), streams as usize);
        assert_eq!(c.fetch(0).await.unwrap(), set, "{streams} streams");
        assert_eq!(c.fetch(5).await.unwrap(), set, "{streams} streams, pinned");
    }
}

#[tokio::test]
async fn a_shard_that_is_not_one_is_refused() {
    let l = learner().await;
    l.weights.publish(WeightBytes::from_var_store(2, &store(1)).unwrap());
    let mut c = WeightsClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    let err = c.inners[0].fetch(v1::FetchWeightsRequest { version: 0, shard: 2, shards: 2, base: false }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("shard 2 of 2 is not a shard"), "{}", err.message());
}

/// A Weights server that publishes a newer version the first time a second
/// shard is asked for, as a learner finishing a step mid-fetch would.
struct Republishing(Weights, std::sync::atomic::AtomicBool);

#[tonic::async_trait]
impl v1::weights_server::Weights for Republishing {
    async fn get_latest_version(&self, r: Request<v1::GetLatestVersionRequest>) -> Result<Response<v1::VersionInfo>, Status> {
        self.0.get_latest_version(r).await
    }
    type FetchStream = ChunkStream;
    async fn fetch(&self, r: Request<v1::FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        if r.get_ref().shard == 1 && !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.0.publish(WeightBytes::from_var_store(12, &store(4)).unwrap());
        }
        self.0.fetch(r).await
    }
}

#[tokio::test]
async fn a_version_replaced_mid_fetch_is_fetched_again_as_the_newest() {
    let weights = Weights::new(1024);
    weights.publish(WeightBytes::from_var_store(11, &store(1)).unwrap());
    let addr = serve(Republishing(weights, Default::default())).await;
    let grpc = crate::grpc::Config { weight_streams: 2, ..Default::default() };
    let mut c = WeightsClient::connect(&grpc, Some(&addr), None).await.unwrap();
    let got = c.fetch(0).await.unwrap();
    assert_eq!(got, WeightBytes::from_var_store(12, &store(4)).unwrap());
    // Asked for by number, a version no longer held is an error, not another.
    let err = c.fetch(11).await.unwrap_err().to_string();
    assert!(err.contains("version 11 is not held; the newest is 12"), "{err}");
}

#[test]
fn streams_that_do_not_make_each_tensor_whole_are_refused() {
    let set = WeightBytes::from_var_store(6, &store(1)).unwrap();
    let published = Arc::new(Published::new(set.clone(), 1024));
    let stream = |shard: usize, shards: usize| Received { tag: Some((6, 4, Part::Whole)), chunks: published.clone().chunks(shard, shards).collect() };
    assert_eq!(assemble(6, vec![stream(0, 3), stream(1, 3), stream(2, 3)]).unwrap(), set);
    // out of shard order: the second run's continuation of the embedding comes first
    let err = assemble(6, vec![stream(1, 3), stream(0, 3), stream(2, 3)]).unwrap_err().to_string();
    assert!(err.contains("chunk at byte 2048 arrived where byte 0 was expected") || err.contains("out of order"), "{err}");
    // a run missing
    let err = assemble(6, vec![stream(0, 3), stream(2, 3)]).unwrap_err().to_string();
    assert_eq!(err, "weights v6: tensor model.embed_tokens.weight: only 2048 of its 4096 bytes arrived");
    // a run twice
    let err = assemble(6, vec![stream(0, 2), stream(0, 2), stream(1, 2)]).unwrap_err().to_string();
    assert!(err.contains("model.embed_tokens.weight"), "{err}");
    // versions mixed across streams
    let mut other = stream(1, 2);
    other.tag = Some((7, 4, Part::Whole));
    let err = assemble(6, vec![stream(0, 2), other]).unwrap_err().to_string();
    assert!(err.contains("the streams of one fetch carried versions 6 and 7"), "{err}");
}

/// A LoRA policy's versions: the frozen base published once and fetched
/// once, then each version's adapters alone, tagged with the base's id and
/// the scale, over any number of connections; a whole version after them
/// is whole again; asking for a base that is not held, or with a version,
/// is refused; an adapters set cannot be applied as if whole.
#[tokio::test]
async fn a_lora_policy_sends_its_base_once_and_then_its_adapters_alone() {
    let l = learner().await;
    let mut c = WeightsClient::connect(&l.grpc, Some(&l.addr), None).await.unwrap();
    let err = c.fetch_base().await.unwrap_err().to_string();
    assert!(err.contains("no frozen base is held"), "{err}");

    let base = WeightBytes::from_var_store(0, &store(1)).unwrap();
    let id = base_id(&base.tensors);
    assert_ne!(id, 0);
    assert_eq!(id, base_id(&WeightBytes::from_var_store(0, &store(1)).unwrap().tensors), "the same base, the same id");
    assert_ne!(id, base_id(&WeightBytes::from_var_store(0, &store(2)).unwrap().tensors), "another base, another id");
    l.weights.publish_base(base.clone().with_part(Part::Base { id }));
    assert_eq!(l.weights.base_id(), id);

    let adapters_of = |version: u64| {
        let vs = VarStore::new(Device::Cpu);
        randn(&vs, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", &[2, 16]);
        randn(&vs, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", &[16, 2]);
        WeightBytes::from_var_store(version, &vs).unwrap().with_part(Part::Adapters { base: id, scale: 4.0 })
    };
    // Version 0 (a warm start's) too: adapters, not the base.
    for version in [0, 5, 6] {
        let adapters = adapters_of(version);
        assert!(adapters.total_bytes() * 4 < base.total_bytes(), "{} against {}", adapters.total_bytes(), base.total_bytes());
        l.weights.publish(adapters.clone());
        for streams in [1, 3] {
            let mut c = WeightsClient::connect(&crate::grpc::Config { weight_streams: streams, ..l.grpc.clone() }, Some(&l.addr), None).await.unwrap();
            assert_eq!(c.fetch(0).await.unwrap(), adapters, "{streams} streams");
            assert_eq!(c.fetch_base().await.unwrap(), base.clone().with_part(Part::Base { id }), "{streams} streams");
        }
        let err = adapters.apply_to(&store(1)).unwrap_err().to_string();
        assert!(err.contains("merge the adapters"), "{err}");
    }
    l.weights.publish(WeightBytes::from_var_store(7, &store(3)).unwrap());
    assert_eq!(c.fetch(0).await.unwrap().part, Part::Whole);

    let err = c.inners[0].fetch(v1::FetchWeightsRequest { version: 7, base: true, ..Default::default() }).await.unwrap_err();
    assert!(err.message().contains("a base has no version"), "{err}");
}
