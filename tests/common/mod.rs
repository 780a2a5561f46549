//! Helpers shared by the end-to-end tests of the `prism` binary.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn prism() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prism"));
    // Tests set what they need; nothing leaks in from the developer's shell.
    for (k, _) in std::env::vars() {
        if k.starts_with("PRISM__") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs `prism args...` in `dir` and returns its output.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    prism().args(args).current_dir(dir).output().expect("prism runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Redis server for the test: the suite's (`PRISM_TEST_REDIS_URL`, started by
/// scripts/test) or, under a plain `cargo test`, a private redis-server on a free
/// loopback port, stopped when dropped.
pub struct TestRedis {
    pub url: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl TestRedis {
    pub fn start() -> Self {
        if let Ok(url) = std::env::var("PRISM_TEST_REDIS_URL") {
            return Self { url, child: None, _dir: None };
        }
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let child = redis_server(dir.path(), port, &["--save", "", "--appendonly", "no"]);
        Self { url: format!("redis://127.0.0.1:{port}"), child: Some(child), _dir: Some(dir) }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The SmolLM2-135M-Instruct GGUF scripts/setup fetches (`PRISM_SMOLLM_GGUF`
/// overrides). Under CI its absence fails the test; elsewhere it is skipped
/// with the reason printed.
pub fn smollm_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PRISM_SMOLLM_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.exists() {
        return Some(path);
    }
    let reason = format!("{} is missing: run scripts/setup", path.display());
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("skipped: {reason}");
    None
}

/// A redis-server on `port` with its files in `dir` and `args` (e.g. AOF),
/// once it accepts connections. The caller kills it.
pub fn redis_server(dir: &Path, port: u16, args: &[&str]) -> Child {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir", &dir.to_string_lossy()])
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/setup installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
