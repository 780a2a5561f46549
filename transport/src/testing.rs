//! Test helpers: Redis servers, ports, polling, sample trajectories.

use prism_core::{FinishReason, GroupId, LabeledTrajectory, PolicyVersion, Prompt, PromptId, RewardLabel, ScoreSource, Trajectory, TrajectoryId};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The suite's Redis (`PRISM_TEST_REDIS_URL`) or a private one, stopped when dropped.
pub struct TestRedis {
    pub url: String,
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl TestRedis {
    /// The suite's server when there is one, else a private one.
    pub fn shared() -> Self {
        if let Ok(url) = std::env::var("PRISM_TEST_REDIS_URL") {
            return Self { url, port: 0, child: None, dir: tempfile::tempdir().unwrap() };
        }
        Self::private(&[])
    }

    /// A private redis-server with extra arguments (e.g. AOF, a password).
    pub fn private(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut me = Self { url: format!("redis://127.0.0.1:{port}"), port, child: None, dir };
        me.start(extra);
        me
    }

    /// (Re)starts the private server on the same port and folder.
    pub fn start(&mut self, extra: &[&str]) {
        let child = redis_server(self.dir.path(), self.port, extra);
        self.child = Some(child);
        wait_for_port(self.port);
    }

    /// Kills the private server (SIGKILL, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn redis_server(dir: &Path, port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(extra)
        .current_dir(dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/setup installs it)")
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `f` returns `Some`, polling; panics with `what` after `limit`.
pub async fn eventually<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A unique run id, so tests sharing one Redis do not see each other's keys.
pub fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test-{name}-{}-{n}", std::process::id())
}

/// A trajectory with `len` completion tokens.
pub fn trajectory(id: u64, len: usize) -> Trajectory {
    let text: String = (0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    Trajectory {
        id: TrajectoryId(id),
        group: GroupId(id / 4),
        sample: (id % 4) as u32,
        group_size: 4,
        prompt: Prompt { id: PromptId(id / 4), task: "arithmetic".into(), problem: "7+3*4".into(), text: "Q:7+3*4\n".into(), reference: Some("19".into()) },
        policy_version: PolicyVersion(3),
        prompt_tokens: vec![11, 12, 13, 14, 15, 16, 17, 18],
        tokens: (0..len as u32).map(|i| 100 + i % 5000).collect(),
        logprobs: (0..len).map(|i| -(i as f32) / 100.0).collect(),
        token_ends: (1..=len as u32).collect(),
        text,
        finish: FinishReason::Eos,
        generate_ms: 7,
        version_changes: Vec::new(),
    }
}

/// `trajectory(id, len)` with an outcome label.
pub fn labeled(id: u64, len: usize) -> LabeledTrajectory {
    LabeledTrajectory {
        trajectory: trajectory(id, len),
        label: RewardLabel { outcome: (id % 2) as f32, outcome_source: ScoreSource::Verifier, answer: Some("19".into()), steps: vec![] },
    }
}

/// A learner's gRPC services on a loopback port, stopped when dropped.
pub struct TestLearner {
    pub addr: String,
    pub control: crate::control::Control,
    pub weights: crate::weights::Weights,
    pub grpc: crate::grpc::Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestLearner {
    pub async fn start(dist: &crate::Config, grpc: crate::grpc::Config, token: Option<&str>) -> Self {
        Self::start_at(0, dist, grpc, token).await
    }

    /// On loopback port `port` (0: any free one); a learner restarted in
    /// place starts where the one before it was stopped.
    pub async fn start_at(port: u16, dist: &crate::Config, grpc: crate::grpc::Config, token: Option<&str>) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let scheme = if grpc.tls_cert.is_empty() { "http" } else { "https" };
        let host = if grpc.tls_cert.is_empty() { "127.0.0.1" } else { "localhost" };
        let addr = format!("{scheme}://{host}:{port}");
        let control = crate::control::Control::new("test-run", dist);
        let weights = crate::weights::Weights::new(grpc.chunk_bytes);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let token = token.map(|t| crate::grpc::Token::new(t).unwrap());
        let (c, w, g) = (control.clone(), weights.clone(), grpc.clone());
        tokio::spawn(async move {
            crate::grpc::serve(listener, &g, token, &c, &w, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self { addr, control, weights, grpc: crate::grpc::Config { learner: String::new(), ..grpc }, stop: Some(stop) }
    }
}

impl Drop for TestLearner {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Adds an entry of `fields` to `stream` with a plain `XADD`, bypassing the
/// transport (to plant malformed or foreign entries).
pub async fn xadd(url: &str, stream: &str, fields: &[(&str, &[u8])]) {
    let mut conn = ::redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut cmd = ::redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query_async(&mut conn).await.unwrap();
}

/// The length of `stream`, asked with a plain `XLEN`.
pub async fn xlen(url: &str, stream: &str) -> u64 {
    let mut conn = ::redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("XLEN").arg(stream).query_async(&mut conn).await.unwrap()
}

/// A two-tensor weight set whose values tell `version`: `model.b`, 3×4 of
/// `version` (f32), and `model.a`, `0..5 + version` (i64).
pub fn weight_set(version: u64) -> std::sync::Arc<prism_model::WeightSet> {
    use tch::{Device, Kind, Tensor};
    prism_model::WeightSet::new(
        PolicyVersion(version),
        vec![
            ("model.b".into(), Tensor::full([3, 4], version as f64, (Kind::Float, Device::Cpu))),
            ("model.a".into(), Tensor::arange(5, (Kind::Int64, Device::Cpu)) + version as i64),
        ],
    )
}

/// The broadcast layout of `set`.
pub fn weight_layout(set: &prism_model::WeightSet) -> crate::nccl_weights::Layout {
    let t = set.tensors.lock().unwrap();
    crate::nccl_weights::layout(t.iter().map(|(n, t)| (n.as_str(), t)))
}

/// The tensor `name` of `set`.
pub fn weight_tensor(set: &prism_model::WeightSet, name: &str) -> tch::Tensor {
    set.tensors.lock().unwrap().iter().find(|(n, _)| n == name).map(|(_, t)| t.shallow_clone()).unwrap()
}
