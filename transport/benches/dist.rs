//! Distributed transports, measured against their in-process reference in the
//! same run:
//!
//! 1. trajectories/s of 512-token trajectories through Redis Streams (encode,
//!    XADD with back-pressure, XREADGROUP, decode, XACK+XDEL) vs a bounded
//!    in-memory channel (what local mode uses); goal ≥ 5,000/s on loopback.
//!    Unsealed and sealed with a run token (a ChaCha20-Poly1305 tag on every entry, checked
//!    by the consumer), alternated over five rounds; the seal's cost is the
//!    ratio of the best rounds.
//! 2. weight transfer of a SmolLM2-135M-shaped set of tensors (random values)
//!    over the gRPC Weights stream on loopback (chunked, CRC-32 checked), and
//!    applying it to a VarStore by name; goal ≥ 1 GB/s. Fetched over one
//!    connection (the reference) and split over `grpc.weight_streams`.
//!
//! `cargo bench -p prism-transport --bench dist` (uses `PRISM_TEST_REDIS_URL` or
//! starts a private redis-server). `PRISM_BENCH_TRAJECTORIES` sets the count.

use anyhow::Result;
use prism_transport::redis::{self as rs, Redis, RunKeys};
use prism_transport::weights::{WeightBytes, WeightsClient};
use prism_transport::{control::Control, grpc, weights::Weights};
use prism_core::{FinishReason, GroupId, PolicyVersion, Prompt, PromptId, Trajectory, TrajectoryId};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

fn trajectory(id: u64, len: usize) -> Trajectory {
    let text: String = (0..len).map(|i| ["3*4=12\n", "7+12=19\n", "A:19\n"][i % 3].chars().next().unwrap_or('x')).collect();
    Trajectory {
        id: TrajectoryId(id),
        group: GroupId(id / 8),
        sample: (id % 8) as u32,
        group_size: 8,
        prompt: Prompt { id: PromptId(id / 8), task: "arithmetic".into(), problem: "7+3*4".into(), text: "Q:7+3*4\n".into(), reference: Some("19".into()) },
        policy_version: PolicyVersion(1),
        prompt_tokens: (0..64).collect(),
        tokens: (0..len as u32).map(|i| (i * 7919) % 49152).collect(),
        logprobs: (0..len).map(|i| -((i % 100) as f32) / 37.0).collect(),
        token_ends: (1..=len as u32).collect(),
        text,
        finish: FinishReason::Eos,
        generate_ms: 1000,
        version_changes: Vec::new(),
    }
}

/// A private redis-server (killed when dropped) and its folder.
struct Server(Option<std::process::Child>, #[allow(dead_code)] Option<tempfile::TempDir>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn redis_url() -> Result<(String, Server)> {
    if let Ok(url) = std::env::var("PRISM_TEST_REDIS_URL") {
        return Ok((url, Server(None, None)));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = tempfile::tempdir()?;
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((format!("redis://127.0.0.1:{port}"), Server(Some(child), Some(dir))))
}

async fn in_memory(items: &[Trajectory]) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Trajectory>(1024);
    let to_send = items.to_vec();
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for t in to_send {
            tx.send(t).await.expect("receiver alive");
        }
    });
    let mut n = 0;
    while let Some(t) = rx.recv().await {
        n += t.tokens.len().min(1);
    }
    producer.await.expect("producer");
    assert_eq!(n, items.len());
    items.len() as f64 / start.elapsed().as_secs_f64()
}

async fn through_redis(url: &str, items: &[Trajectory], seal: Option<rs::Seal>) -> Result<f64> {
    let cfg = rs::Config { url: url.into(), batch: 128, block_ms: 100, max_len: 4096, ..Default::default() };
    let keys = RunKeys::new("prism-bench", &format!("bench-{}", std::process::id()));
    let redis = Redis::connect(&cfg).await?.sealed(seal);
    let mut consumer = redis.consumer::<Trajectory>(&keys.sampled, rs::REWARD_GROUP, "bench", None).await?;
    let mut producer = redis.producer::<Trajectory>(&keys.sampled).await?;
    let to_send = items.to_vec();
    let pcfg = cfg.clone();
    let start = Instant::now();
    let p = tokio::spawn(async move {
        for chunk in to_send.chunks(pcfg.batch) {
            producer.send(chunk, &pcfg).await?;
        }
        anyhow::Ok(producer.backpressure_waits())
    });
    let mut received = 0;
    while received < items.len() {
        let batch = consumer.recv(&cfg).await?;
        anyhow::ensure!(batch.dropped.is_empty(), "entries dropped: {:?}", batch.dropped.first());
        received += batch.items.len();
        let entries: Vec<String> = batch.items.into_iter().map(|d| d.entry).collect();
        consumer.ack(&entries).await?;
    }
    let rate = items.len() as f64 / start.elapsed().as_secs_f64();
    let waits = p.await??;
    println!("  (producer waited at the cap {waits} times)");
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("DEL").arg(&keys.sampled).query_async(&mut conn).await?;
    Ok(rate)
}

/// SmolLM2-135M's parameter shapes (config.json: vocab 49152, hidden 576,
/// intermediate 1536, 30 layers, 9 heads, 3 KV heads of 64, tied embeddings).
fn smollm2_135m() -> Vec<(String, Vec<i64>)> {
    let (v, h, i, kv) = (49152, 576, 1536, 3 * 64);
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..30 {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj.weight", vec![h, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    shapes
}

async fn weights(kind: Kind) -> Result<()> {
    let shapes = smollm2_135m();
    let tensors: Vec<(String, Tensor)> = shapes.iter().map(|(n, s)| (n.clone(), Tensor::randn(s.as_slice(), (kind, Device::Cpu)))).collect();
    let params: i64 = shapes.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    let set = WeightBytes::from_tensors(1, tensors.iter().map(|(n, t)| (n.as_str(), t)))?;
    let bytes = set.total_bytes() as f64;
    let chunk_bytes = std::env::var("PRISM_BENCH_CHUNK").ok().and_then(|v| v.parse().ok()).unwrap_or(grpc::Config::default().chunk_bytes);
    let gcfg = grpc::Config { chunk_bytes, ..Default::default() };
    let service = Weights::new(gcfg.chunk_bytes);
    service.publish(set);
    let control = Control::new("bench", &Default::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (c, w, g) = (control.clone(), service.clone(), gcfg.clone());
    let server = tokio::spawn(async move {
        grpc::serve(listener, &g, None, &c, &w, async {
            let _ = stopped.await;
        })
        .await
    });
    // A store to apply into, as a rollout process holds it.
    let mut vs = tch::nn::VarStore::new(Device::Cpu);
    for (n, s) in &shapes {
        let (dir, leaf) = n.rsplit_once('.').unwrap_or(("", n));
        let path = dir.split('.').fold(vs.root(), |p, part| p / part);
        let _ = path.var(leaf, s, tch::nn::Init::Const(0.0));
    }
    vs.set_kind(kind);
    // One connection (the reference) and the configured split, alternated.
    let default_streams = gcfg.weight_streams;
    let mut clients = Vec::new();
    for streams in [1, default_streams] {
        let cfg = grpc::Config { weight_streams: streams, ..gcfg.clone() };
        clients.push((streams, WeightsClient::connect(&cfg, Some(&addr), None).await?, f64::MAX, f64::MAX));
    }
    for round in 0..5 {
        for (streams, client, fetch_best, apply_best) in &mut clients {
            let start = Instant::now();
            let got = client.fetch(0).await?;
            let fetched = start.elapsed().as_secs_f64();
            got.apply_to(&vs)?;
            let total = start.elapsed().as_secs_f64();
            println!("  round {round}, {streams} stream(s): fetch {fetched:.3} s, then apply {:.3} s", total - fetched);
            *fetch_best = fetch_best.min(fetched);
            *apply_best = apply_best.min(total);
        }
        let check = &vs.variables()["model.layers.7.mlp.up_proj.weight"];
        anyhow::ensure!(check.equal(&tensors.iter().find(|(n, _)| n == "model.layers.7.mlp.up_proj.weight").expect("exists").1), "applied weights differ");
        // so the next round's check sees that round's apply
        let _ = tch::no_grad(|| vs.variables()["model.layers.7.mlp.up_proj.weight"].shallow_clone().zero_());
    }
    for (streams, _, fetch_best, apply_best) in &clients {
        println!(
            "weights {kind:?}: {params} parameters, {:.1} MB, chunks of {chunk_bytes} B, {streams} stream(s); gRPC fetch {:.3} s = {:.2} GB/s; fetch + apply to VarStore {:.3} s = {:.2} GB/s (goal >= 1 GB/s)",
            bytes / 1e6,
            fetch_best,
            bytes / fetch_best / 1e9,
            apply_best,
            bytes / apply_best / 1e9
        );
    }
    println!("  {default_streams} streams / 1 stream: fetch {:.2}x", clients[0].2 / clients[1].2);
    let _ = stop.send(());
    server.await??;
    Ok(())
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let n: usize = std::env::var("PRISM_BENCH_TRAJECTORIES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        let items: Vec<Trajectory> = (0..n as u64).map(|i| trajectory(i, 512)).collect();
        let bytes = prism_transport::redis::Entry::encode(&items[0]).len();
        println!("trajectories: {n} of 512 tokens ({bytes} bytes each on the wire)");
        let (url, _server) = redis_url()?;
        let mem = in_memory(&items).await;
        let seal = rs::Seal::new(&grpc::Token::new("bench-run-token")?);
        let (mut red, mut sealed) = (0f64, 0f64);
        for _ in 0..5 {
            red = red.max(through_redis(&url, &items, None).await?);
            sealed = sealed.max(through_redis(&url, &items, Some(seal.clone())).await?);
        }
        println!("  in-memory channel: {mem:.0} trajectories/s");
        println!("  redis streams:     {red:.0} trajectories/s (goal >= 5000/s); redis / in-memory = {:.4}", red / mem);
        println!("  sealed entries:    {sealed:.0} trajectories/s; sealed / unsealed = {:.3} (goal >= 0.90)", sealed / red);
        let kinds = std::env::var("PRISM_BENCH_KINDS").unwrap_or_else(|_| "f32,bf16".into());
        for k in kinds.split(',') {
            weights(if k == "bf16" { Kind::BFloat16 } else { Kind::Float }).await?;
        }
        Ok(())
    })
}
