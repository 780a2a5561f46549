//! The distributed-mode commands of the `prism` binary against a learner's
//! Control service started in this test on a loopback port.

mod common;

use common::{free_port, prism, stderr, stdout};
use prism_transport::control::{Control, ControlClient, Role, WorkerCounters};
use prism_transport::grpc::{self, Token};
use prism_transport::weights::Weights;
use std::process::Output;

struct Learner {
    addr: String,
    control: Control,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn learner(token: Option<&str>) -> Learner {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let control = Control::new("status-test", &Default::default());
    let weights = Weights::new(1 << 20);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let token = token.map(|t| Token::new(t).unwrap());
    let c = control.clone();
    tokio::spawn(async move {
        grpc::serve(listener, &grpc::Config::default(), token, &c, &weights, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Learner { addr, control, _stop: stop }
}

async fn run(args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || prism().args(&args).envs(env).output().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_workers_by_role_with_versions_lag_and_queues() {
    let l = learner(None).await;
    l.control.set_policy_version(4);
    l.control.set_progress(4, 10, 96);
    l.control.record_dropped("zero_advantage", 8);
    l.control.set_queues(vec![prism_transport::redis::QueueDepth { stream: "prism:r:sampled".into(), waiting: 3, pending: 8 }]);
    let mut c = ControlClient::connect(&grpc::Config::default(), Some(&l.addr), None).await.unwrap();
    let r = c.register(Role::Rollout, "host-a", "cuda:0").await.unwrap();
    c.heartbeat(&r.worker_id, 3, WorkerCounters { processed: 64, in_flight: 8, dropped: 0 }).await.unwrap();
    c.register(Role::Reward, "host-b", "cpu").await.unwrap();

    let out = run(vec!["status".into(), "--learner".into(), l.addr.clone()], vec![]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "run status-test: policy version 4, step 4/10, trained 96 trajectories, dropped zero_advantage 8");
    assert_eq!(lines[1], "queue prism:r:sampled: 3 waiting, 8 in flight");
    assert_eq!(lines[2], "rollout workers: 1 alive of 1");
    assert!(lines[3].trim_start().starts_with(&format!("{:<18} alive policy v3 (lag 1), 64 done (", r.worker_id)), "{text}");
    assert!(lines[3].ends_with("[host-a cuda:0]"), "{text}");
    assert_eq!(lines[4], "reward workers: 1 alive of 1");
    assert!(lines[5].contains("reward-2-") && lines[5].contains("policy v0 (lag 4)"), "{text}");
}

/// Under each reward worker with a judge, `prism status` prints its reward
/// health from its latest heartbeat; a worker without a judge has no such line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_each_reward_workers_health() {
    let l = learner(None).await;
    let mut c = ControlClient::connect(&grpc::Config::default(), Some(&l.addr), None).await.unwrap();
    let healthy = prism_reward::Health {
        judge_wait_ms: Some(0),
        judge_latency_ms: Some(prism_reward::LatencyMs { p50: 1480.2, p95: 2900.0 }),
        annotation_queue: Some(prism_reward::QueueHealth { depth: 12, capacity: 1024, shed: 3, ..Default::default() }),
        canary_fp_rate: Some(0.0),
        canary_max_rate: Some(0.05),
        judge_trusted: Some(true),
        distill_agreement: Some(0.871),
        distill_min_agreement: Some(0.75),
        distill_ready: Some(true),
        judge_budget_refused: Some(0),
        ..Default::default()
    };
    let distrusted = prism_reward::Health {
        judge_latency_ms: None,
        canary_fp_rate: Some(0.12),
        judge_trusted: Some(false),
        distill_agreement: None,
        distill_ready: Some(false),
        judge_budget_refused: Some(2),
        ..healthy.clone()
    };
    let a = c.register(Role::Reward, "judge-a", "cpu").await.unwrap().worker_id;
    c.heartbeat_with_health(&a, 0, Default::default(), Some(&healthy)).await.unwrap();
    let b = c.register(Role::Reward, "judge-b", "cpu").await.unwrap().worker_id;
    c.heartbeat_with_health(&b, 0, Default::default(), Some(&distrusted)).await.unwrap();
    let plain = c.register(Role::Reward, "verifiers", "cpu").await.unwrap().worker_id;
    c.heartbeat(&plain, 0, Default::default()).await.unwrap();

    let out = run(vec!["status".into(), "--learner".into(), l.addr.clone()], vec![]).await;
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    let health = |id: &str| text.lines().map(str::trim_start).find(|l| l.starts_with(&format!("{id}: "))).map(str::to_string);
    assert_eq!(
        health(&a),
        Some(format!(
            "{a}: judge p50 1480 ms p95 2900 ms | queue 12/1024 shed 3 | canary fp 0.00 | judge trusted | distill agreement 0.87 (ready)"
        )),
        "{text}"
    );
    assert_eq!(
        health(&b),
        Some(format!(
            "{b}: judge no verdicts yet | queue 12/1024 shed 3 | canary fp 0.12 (over 0.05) | judge distrusted (fallback scores) | \
             distill agreement - (not ready, needs 0.75) | budget refused 2 groups"
        )),
        "{text}"
    );
    assert_eq!(health(&plain), None, "{text}");
    // Each health line follows its worker's line.
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| l.trim_start().starts_with(&format!("{a} "))).unwrap();
    assert!(lines[at + 1].trim_start().starts_with(&format!("{a}: judge")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_the_token_is_refused_with_a_clear_error() {
    let l = learner(Some("tok-123")).await;
    let out = run(vec!["status".into(), "--learner".into(), l.addr.clone()], vec![]).await;
    assert_eq!(out.status.code(), Some(69));
    let err = stderr(&out);
    assert!(err.contains(&format!("{}: GetStatus refused", l.addr)) && err.contains("no bearer token"), "{err}");
    // with the token from the environment it works, and the token is never printed
    let out = run(vec!["status".into(), "--learner".into(), l.addr.clone()], vec![("PRISM_TOKEN", "tok-123".into())]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("tok-123"));
    let out =
        run(vec!["status".into(), "--learner".into(), l.addr.clone(), "--print-config".into()], vec![("PRISM_TOKEN", "tok-123".into())])
            .await;
    assert!(!stdout(&out).contains("tok-123") && stdout(&out).contains("token_env = \"PRISM_TOKEN\""));
    // a token file wins over the variable
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "wrong\n").unwrap();
    let set = format!("grpc.token_file={}", file.display());
    let out =
        run(vec!["status".into(), "--learner".into(), l.addr.clone(), "--set".into(), set], vec![("PRISM_TOKEN", "tok-123".into())]).await;
    assert!(stderr(&out).contains("wrong bearer token"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_learner_is_named_in_the_error() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    let out =
        run(vec!["status".into(), "--learner".into(), addr.clone(), "--set".into(), "grpc.connect_timeout_ms=500".into()], vec![]).await;
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr(&out).starts_with(&format!("prism status: learner at {addr} did not answer within 500 ms")), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_wrong_token_is_refused_with_a_clear_error() {
    let l = learner(Some("tok-123")).await;
    for role in ["rollout", "reward"] {
        let args = vec![role.to_string(), "--set".into(), format!("grpc.learner={}", l.addr), "--set".into(), "dist.health_listen=".into()];
        let out = run(args, vec![("PRISM_TOKEN", "not-the-token".into())]).await;
        assert!(!out.status.success(), "{role} joined with a wrong token");
        let err = stderr(&out);
        assert!(err.contains(&format!("{}: Register refused", l.addr)) && err.contains("wrong bearer token"), "{role}: {err}");
        assert!(!err.contains("not-the-token") && !err.contains("tok-123"), "{role} printed a secret: {err}");
    }
    assert!(l.control.status().workers.is_empty(), "nobody joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_learner_does_not_answer_fails_within_the_connect_timeout() {
    let addr = format!("http://127.0.0.1:{}", free_port());
    for role in ["rollout", "reward"] {
        let args = vec![
            role.to_string(),
            "--set".into(),
            format!("grpc.learner={addr}"),
            "--set".into(),
            "grpc.connect_timeout_ms=500".into(),
            "--set".into(),
            "dist.health_listen=".into(),
        ];
        let started = std::time::Instant::now();
        let out = run(args, vec![]).await;
        let took = started.elapsed();
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&format!("learner at {addr} did not answer within 500 ms")), "{role}: {}", stderr(&out));
        // Model loading included; the connect itself gives up after 500 ms.
        assert!(took < std::time::Duration::from_secs(20), "{role} took {took:?}");
    }
}

/// Runs `role` with `setting` on the CPU model: it must exit 1 with every
/// `on_cpu` text in its stderr. Where CUDA is absent it runs again with
/// `model.device = cuda`: exit 1, naming `on_cuda` and NCCL or CUDA missing.
async fn refused_without_a_gpu(role: &str, setting: &str, on_cpu: &[&str], on_cuda: &str) {
    // On loopback: a learner beyond it refuses to start without a token.
    let args = vec![
        role.to_string(),
        "--set".into(),
        setting.into(),
        "--set".into(),
        "dist.health_listen=".into(),
        "--set".into(),
        "grpc.listen=127.0.0.1:50051".into(),
    ];
    let out = run(args.clone(), vec![]).await;
    assert_eq!(out.status.code(), Some(1), "{role}");
    let err = stderr(&out);
    for want in on_cpu {
        assert!(err.contains(want), "{role}: want {want:?} in {err}");
    }
    if tch::Cuda::is_available() {
        return;
    }
    let mut args = args;
    args.extend(["--set".into(), "model.device=cuda".into()]);
    let out = run(args, vec![]).await;
    assert_eq!(out.status.code(), Some(1), "{role}");
    let err = stderr(&out);
    assert!(err.contains(on_cuda) && (err.contains("NCCL unavailable") || err.contains("CUDA")), "{role}: {err}");
}

/// NCCL weights need a CUDA model and a machine with NCCL: elsewhere both
/// roles stop before they start anything, saying which (the broadcast itself
/// is checked on GPUs by scripts/gpu-check and, in-process, by the
/// nccl_weights tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_refuse_nccl_weights_without_a_gpu_saying_why() {
    for role in ["learner", "rollout"] {
        refused_without_a_gpu(
            role,
            "dist.weights=nccl",
            &["but model.device = \"cpu\"", "dist.weights = \"grpc\""],
            "dist.weights = \"nccl\"",
        )
        .await;
    }
}

/// Data-parallel learner ranks all-reduce gradients by NCCL: without a GPU
/// rank 0 and a learner rank stop before they start anything, saying why; a
/// learner rank of a run with one learner says there is no rank to join. (The
/// ranks' arithmetic is checked in-process by the learner's data_parallel
/// tests, the protocol by the learner_rank tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_refuse_data_parallel_learners_without_a_gpu_saying_why() {
    for role in ["learner", "learner-rank"] {
        let on_cpu = ["dist.learner_ranks = 2 runs NCCL collectives between GPUs, but model.device = \"cpu\"", "dist.learner_ranks = 1"];
        refused_without_a_gpu(role, "dist.learner_ranks=2", &on_cpu, "dist.learner_ranks = 2").await;
    }
    let out = run(vec!["learner-rank".into(), "--set".into(), "dist.health_listen=".into()], vec![]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("dist.learner_ranks = 1: this run trains on one learner"), "{}", stderr(&out));
}

/// A learner listening where other hosts can reach it, with no token, refuses
/// to start (exit 64), saying how to set a token or opt out; with
/// `grpc.insecure = true` it goes on (here to the Redis it cannot reach),
/// warning that it serves without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_reachable_from_other_hosts_refuses_to_start_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["learner", "--set"].iter().map(|s| s.to_string()).collect();
        a.push(format!("grpc.listen=0.0.0.0:{}", free_port()));
        a.extend(["--set".into(), format!("run.dir={}", dir.path().join("runs").display())]);
        a.extend(["--set".into(), "redis.url=redis://127.0.0.1:1".into(), "--set".into(), "redis.connect_timeout_ms=200".into()]);
        a.extend(["--set".into(), "dist.health_listen=".into()]);
        for e in extra {
            a.extend(["--set".into(), e.to_string()]);
        }
        a
    };
    let out = run(args(&[]), vec![("PRISM_TOKEN", String::new())]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for needle in ["grpc.listen", "PRISM_TOKEN", "grpc.insecure = true", "127.0.0.1"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert!(!dir.path().join("runs").exists(), "nothing started");

    let out = run(args(&["grpc.insecure=true"]), vec![("PRISM_TOKEN", String::new())]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("grpc.insecure = true") && err.contains("without a token"), "{err}");
    assert!(err.contains("redis"), "it went on, to Redis: {err}");

    // With a token it goes on too.
    let out = run(args(&[]), vec![("PRISM_TOKEN", "s3cret-token".into())]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("without a token") && err.contains("redis"), "{err}");
}
