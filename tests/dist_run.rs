//! Distributed runs as real processes on loopback: one `prism learner`, two
//! `prism rollout` and two `prism reward` processes train the arithmetic task
//! through a real redis-server; one reward process is killed with SIGKILL mid
//! run; Redis itself is killed and restarted from its append-only file. Each
//! run must finish with its trajectory accounting balanced.

mod common;

use common::{free_port, prism, TestRedis};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A child process, killed when dropped; its output goes to `<dir>/<name>.log`.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// The test killed it on purpose.
    killed: bool,
}

impl Proc {
    fn spawn(dir: &Path, name: &str, role: &str, sets: &[String]) -> Self {
        Self::spawn_with(dir, name, &[role], sets)
    }

    /// `prism <args…> --set …`.
    fn spawn_with(dir: &Path, name: &str, args: &[&str], sets: &[String]) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = prism();
        cmd.args(args);
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        let child = cmd
            .current_dir(dir)
            .env("RUST_LOG", "warn,prism=info,prism_actors=info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("prism starts");
        Self { name: name.to_string(), child, log, killed: false }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself; its exit status, or a panic
    /// with its output after `limit`.
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {limit:?}:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Settings every process of one test run shares: a tiny task, fast heartbeats,
/// and names of its own in Redis.
/// Whether any `trace.jsonl` of a run under `runs` holds `text`.
fn traced(runs: &Path, text: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(runs) else { return false };
    entries.flatten().any(|e| std::fs::read_to_string(e.path().join("trace.jsonl")).is_ok_and(|t| t.contains(text)))
}

fn settings(dir: &Path, redis_url: &str, port: u16, steps: u64) -> Vec<String> {
    let run = format!("t{}", free_port());
    [
        format!("run.dir={}", dir.join("runs").display()),
        format!("redis.url={redis_url}"),
        format!("redis.prefix=prism-test-{run}"),
        format!("dist.run_id={run}"),
        format!("grpc.listen=127.0.0.1:{port}"),
        format!("grpc.learner=http://127.0.0.1:{port}"),
        "dist.health_listen=".into(),
        "dist.heartbeat_ms=200".into(),
        "dist.dead_after_ms=2000".into(),
        "redis.block_ms=200".into(),
        "redis.claim_idle_ms=3000".into(),
        "redis.retry_for_ms=30000".into(),
        "train.threads=1".into(),
        format!("train.steps={steps}"),
        "train.time_limit_s=0".into(),
        "train.batch_groups=2".into(),
        "train.eval_problems=8".into(),
        "train.eval_every=2".into(),
        "train.checkpoint_every=2".into(),
        "warmstart.steps=15".into(),
        "warmstart.batch=16".into(),
        "rollout.group_size=4".into(),
        "rollout.prompts_per_batch=2".into(),
        "rollout.max_new_tokens=24".into(),
        "learner.micro_batch_size=8".into(),
    ]
    .into()
}

struct Cluster {
    dir: tempfile::TempDir,
    learner: Proc,
    rollouts: Vec<Proc>,
    rewards: Vec<Proc>,
}

fn start(redis_url: &str, steps: u64) -> Cluster {
    start_with(redis_url, steps, &[])
}

/// [`start`] with `extra` settings for every process.
fn start_with(redis_url: &str, steps: u64, extra: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let mut sets = settings(dir.path(), redis_url, free_port(), steps);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let learner = Proc::spawn(dir.path(), "learner", "learner", &sets);
    let rollouts = (0..2).map(|i| Proc::spawn(dir.path(), &format!("rollout{i}"), "rollout", &sets)).collect();
    let rewards = (0..2).map(|i| Proc::spawn(dir.path(), &format!("reward{i}"), "reward", &sets)).collect();
    Cluster { dir, learner, rollouts, rewards }
}

impl Cluster {
    fn run_folder(&self) -> Option<PathBuf> {
        let entries = std::fs::read_dir(self.dir.path().join("runs")).ok()?;
        entries.map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap() != "cache")
    }

    /// The learner steps written to metrics.jsonl so far.
    fn steps(&self) -> u64 {
        let Some(run) = self.run_folder() else { return 0 };
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "step")
            .filter_map(|v| v["step"].as_u64())
            .max()
            .unwrap_or(0)
    }

    fn wait_for_step(&mut self, step: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.steps() < step {
            for p in std::iter::once(&mut self.learner).chain(self.rollouts.iter_mut()).chain(self.rewards.iter_mut()) {
                if let Some(status) = p.child.try_wait().unwrap() {
                    panic!("{} exited ({status}) before step {step}:\n{}", p.name, p.output());
                }
            }
            assert!(Instant::now() < deadline, "no step {step} within {limit:?}:\n{}", self.learner.output());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines each worker process printed, for a failure's message.
    fn workers_output(&self) -> String {
        let mut text = String::new();
        for p in self.rollouts.iter().chain(&self.rewards) {
            let out = p.output();
            let lines: Vec<&str> = out.lines().collect();
            text += &format!("--- {} (last {} lines)\n{}\n", p.name, lines.len().min(40), lines[lines.len().saturating_sub(40)..].join("\n"));
        }
        text
    }

    /// Waits for every process to finish by itself and returns summary.json.
    fn finish(&mut self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(240);
        while self.learner.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.learner.child.kill();
                panic!("{} did not exit within 240 s:\n{}\n{}", self.learner.name, self.learner.output(), self.workers_output());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = self.learner.wait(Duration::ZERO);
        let out = self.learner.output();
        assert!(status.success(), "learner failed ({status}):\n{out}");
        for p in self.rollouts.iter_mut().chain(self.rewards.iter_mut()) {
            if p.killed {
                continue;
            }
            let status = p.wait(Duration::from_secs(30));
            assert!(status.success(), "{} failed ({status}):\n{}", p.name, p.output());
        }
        let run = self.run_folder().expect("the learner made a run folder");
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap()
    }
}

fn assert_balanced(summary: &Value, steps: u64, learner: &str) {
    assert_eq!(summary["balanced"], true, "{summary}\n{learner}");
    assert_eq!(summary["final_step"], steps, "{summary}");
    let ledger = &summary["ledger"];
    let trained = ledger["trained"].as_u64().unwrap();
    // Every step trains 2 groups of 4.
    assert_eq!(trained, steps * 8, "{summary}");
    let made = ledger["made"].as_u64().unwrap();
    let dropped: u64 = ledger["dropped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    let in_flight: u64 = ledger["in_flight"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(made, trained + dropped + in_flight, "{summary}");
    assert!(learner.contains("trajectories: made"), "{learner}");
}

/// A rollout process's closing line, "rollout: G groups (T trajectories)
/// sampled, N weight versions pulled (B bytes), …", with its N and B.
fn rollout_line(p: &Proc) -> (String, u64, u64) {
    let out = p.output();
    let line = out.lines().find(|l| l.starts_with("rollout: ")).unwrap_or_else(|| panic!("{}:\n{out}", p.name)).to_string();
    let pulled = line.split(", ").nth(1).unwrap_or_else(|| panic!("{line}"));
    let pulls = pulled.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    let bytes = pulled.split('(').nth(1).and_then(|b| b.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    (line, pulls, bytes)
}

#[test]
fn learner_two_rollouts_and_two_rewards_train_and_balance() {
    let redis = TestRedis::start();
    let mut c = start(&redis.url, 4);
    let summary = c.finish();
    let learner = c.learner.output();
    assert_balanced(&summary, 4, &learner);
    // Both rollout processes sampled and pulled weights; both reward processes labeled.
    for p in &c.rollouts {
        let (line, pulls, _) = rollout_line(p);
        assert!(pulls >= 1, "{line}");
    }
    let labeled: u64 = c
        .rewards
        .iter()
        .map(|p| {
            let out = p.output();
            let line = out.lines().find(|l| l.starts_with("reward: ")).unwrap_or_else(|| panic!("{}:\n{out}", p.name));
            line["reward: ".len()..].split(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert!(labeled >= summary["ledger"]["trained"].as_u64().unwrap(), "{labeled} labeled: {summary}");
}

/// `line` without its ANSI colour codes (`ESC [ … m`).
fn without_colours(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A LoRA learner (`learner.lora`) sends each rollout process its frozen
/// base once and then each version's adapters alone, which the rollout
/// merges, between generations and (`rollout.inflight_updates`) between
/// decode steps: the run trains and balances, and the bytes a rollout
/// fetched are the base's plus a few percent of it per later version.
#[test]
fn a_lora_run_with_inflight_updates_sends_the_base_once_and_then_adapters_alone() {
    let redis = TestRedis::start();
    let extra = ["learner.lora.rank=4", "learner.lora.alpha=8", "learner.lr=1e-3", "rollout.inflight_updates=true", "learner.max_staleness=1"];
    let mut c = start_with(&redis.url, 4, &extra);
    let summary = c.finish();
    let learner = c.learner.output();
    assert_balanced(&summary, 4, &learner);
    for p in &c.rollouts {
        let (line, pulls, bytes) = rollout_line(p);
        let out = p.output();
        let fetched: Vec<String> = out.lines().filter(|l| l.contains("frozen base fetched")).map(without_colours).collect();
        assert_eq!(fetched.len(), 1, "{}: the base once:\n{out}", p.name);
        let base: u64 = fetched[0].split("bytes=").nth(1).and_then(|b| b.split(|c: char| !c.is_ascii_digit()).next()).unwrap().parse().unwrap();
        eprintln!("{}: {line}; the base {base} bytes", p.name);
        assert!(pulls >= 1, "{line}");
        assert!(bytes > base && bytes - base < pulls * base / 5, "{}: {bytes} bytes over {pulls} pulls with a base of {base}: {line}", p.name);
    }
}

#[test]
fn a_reward_process_killed_mid_run_is_survived_without_loss() {
    let redis = TestRedis::start();
    let mut c = start(&redis.url, 6);
    c.wait_for_step(2, Duration::from_secs(180));
    let victim = &mut c.rewards[0];
    victim.child.kill().unwrap(); // SIGKILL
    victim.child.wait().unwrap();
    victim.killed = true;
    let summary = c.finish();
    let learner = c.learner.output();
    assert_balanced(&summary, 6, &learner);
    assert!(learner.contains("marked dead"), "the killed worker is noticed:\n{learner}");
}

#[test]
fn a_redis_restart_mid_run_is_survived() {
    // A private server with an append-only file, killed and restarted on the
    // same port and folder.
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let args = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""];
    let mut server = common::redis_server(data.path(), port, &args);
    let url = format!("redis://127.0.0.1:{port}");
    let mut c = start(&url, 6);
    c.wait_for_step(2, Duration::from_secs(180));
    let _ = server.kill();
    let _ = server.wait();
    std::thread::sleep(Duration::from_secs(1));
    server = common::redis_server(data.path(), port, &args);
    let summary = c.finish();
    let _ = server.kill();
    let _ = server.wait();
    let learner = c.learner.output();
    assert_balanced(&summary, 6, &learner);
}

/// Waits for the learner's warm start to end (its first weights published,
/// read from its trace: per-version events stay off the console).
fn wait_for_first_weights(dir: &Path, learner: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !traced(&dir.join("runs"), "weights published") {
        assert!(Instant::now() < deadline, "the learner did not publish weights:\n{}", learner.output());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A worker the test plays: registered as `name` with the learner on `port`,
/// holding one prompt.
async fn fake_rollout(port: u16, name: &str) -> (prism_transport::control::ControlClient, String, prism_core::Assignment) {
    use prism_transport::{Error, control::{ControlClient, Role}, grpc};
    let cfg = grpc::Config { learner: format!("http://127.0.0.1:{port}"), connect_timeout_ms: 120_000, ..Default::default() };
    let mut control = ControlClient::connect(&cfg, None, None).await.unwrap();
    let worker = control.register(Role::Rollout, name, "cpu").await.unwrap().worker_id;
    loop {
        match control.get_work(&worker, 1, Duration::from_secs(1)).await {
            Ok(Some(mut w)) if !w.is_empty() => return (control, worker, w.swap_remove(0)),
            Ok(_) => {}
            // not handing out prompts for a moment more
            Err(Error::NotReady { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Samples `0..n` of assignment `a`'s group of 4, as a rollout would add them.
fn sampled(a: &prism_core::Assignment, n: u32) -> Vec<prism_core::Trajectory> {
    use prism_core::{FinishReason, Trajectory, TrajectoryId};
    (0..n)
        .map(|s| Trajectory {
            id: TrajectoryId(a.group.0 * 4 + s as u64),
            group: a.group,
            sample: s,
            group_size: 4,
            prompt: a.prompt.clone(),
            policy_version: a.min_version,
            prompt_tokens: vec![1, 2, 3],
            tokens: vec![4, 5, 6],
            logprobs: vec![-1.0; 3],
            token_ends: vec![1, 2, 3],
            text: "A:0\n".into(),
            finish: FinishReason::Eos,
            generate_ms: 1,
            version_changes: Vec::new(),
        })
        .collect()
}

/// The value of `key=` among `sets`.
fn setting<'a>(sets: &'a [String], key: &str) -> &'a str {
    sets.iter().find_map(|s| s.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("no {key} in {sets:?}"))
}

#[test]
fn trajectories_whose_delivery_report_is_lost_are_still_counted_as_made() {
    use prism_transport::redis as rs;
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut sets = settings(dir.path(), &redis.url, port, 4);
    // How long the learner waits at the end for workers to leave.
    sets.push("grpc.request_timeout_ms=3000".into());
    let learner = Proc::spawn(dir.path(), "learner", "learner", &sets);
    // A worker the test plays: it takes a prompt and adds its group to the
    // sampled stream, but its Delivered report never reaches the learner (it
    // sends none). It keeps heartbeating, so its prompt is not issued again,
    // and does not leave when the run ends.
    // Once the warm start is done, the learner hands out prompts.
    wait_for_first_weights(dir.path(), &learner);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let group = rt.block_on(async {
        let (mut control, worker, a) = fake_rollout(port, "cut-off").await;
        let rcfg = rs::Config { url: redis.url.clone(), ..Default::default() };
        let keys = rs::RunKeys::new(setting(&sets, "redis.prefix"), setting(&sets, "dist.run_id"));
        let conn = rs::Redis::connect(&rcfg).await.unwrap();
        conn.producer::<prism_core::Trajectory>(&keys.sampled).await.unwrap().send(&sampled(&a, 4), &rcfg).await.unwrap();
        tokio::spawn(async move {
            loop {
                let _ = control.heartbeat(&worker, 0, Default::default()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        a.group.0
    });
    let mut c = Cluster {
        rollouts: vec![Proc::spawn(dir.path(), "rollout0", "rollout", &sets)],
        rewards: vec![Proc::spawn(dir.path(), "reward0", "reward", &sets)],
        learner,
        dir,
    };
    let summary = c.finish();
    drop(rt);
    let out = c.learner.output();
    assert_balanced(&summary, 4, &out);
    assert!(out.contains("workers still alive at the end"), "the worker that stayed is noticed:\n{out}");
    assert!(out.contains("Delivered report never reached the learner"), "group {group} is reconciled:\n{out}");
}

/// The operator's crash: the learner is killed with SIGKILL three steps past
/// a checkpoint and started again with `--resume-latest` (what compose and
/// the Kubernetes manifests run), its workers left running.
/// The resumed learner issues the prompts past its checkpoint again under new
/// group ids, drops what its predecessor left in flight as superseded, and
/// reaches `train.steps` with a balanced ledger. (Before, the re-issued groups
/// kept their old ids, were skipped as already ingested, and no step trained.)
#[test]
fn a_learner_killed_past_a_checkpoint_resumes_and_finishes_balanced() {
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut sets = settings(dir.path(), &redis.url, free_port(), 12);
    sets.retain(|s| !s.starts_with("train.checkpoint_every=") && !s.starts_with("train.eval_every="));
    sets.extend(["train.checkpoint_every=4".to_string(), "train.eval_every=0".to_string()]);
    let mut c = Cluster {
        learner: Proc::spawn(dir.path(), "learner", "learner", &sets),
        rollouts: vec![Proc::spawn(dir.path(), "rollout0", "rollout", &sets)],
        rewards: vec![Proc::spawn(dir.path(), "reward0", "reward", &sets)],
        dir,
    };
    c.wait_for_step(7, Duration::from_secs(240));
    c.learner.child.kill().unwrap(); // SIGKILL
    c.learner.child.wait().unwrap();
    let killed_at = c.steps();
    let run = c.run_folder().unwrap();
    let first = c.learner.output();
    // As a restarted pod does: it finds the run by its dist.run_id.
    c.learner = Proc::spawn_with(c.dir.path(), "learner-resumed", &["learner", "--resume-latest"], &sets);
    let summary = c.finish();
    let out = c.learner.output();
    assert!(out.contains(&format!("resuming the latest run of dist.run_id {:?}: {}", setting(&sets, "dist.run_id"), run.display())), "{out}");
    assert!(out.contains("resumed from"), "{out}");
    let start = summary["start_step"].as_u64().unwrap();
    assert!((4..=killed_at).contains(&start) && start % 4 == 0, "resumed at {start}, killed at {killed_at}:\n{first}");
    assert_eq!(summary["balanced"], true, "{summary}\n{out}");
    assert_eq!(summary["final_step"], 12, "{summary}");
    assert_eq!(summary["ledger"]["trained"].as_u64().unwrap(), (12 - start) * 8, "{summary}");
    assert!(!out.contains("skipping a trajectory already ingested"), "{out}");
}

/// A garbage entry on each stream and a group with a member lost: the garbage
/// is dropped and counted, the group is dropped as incomplete once
/// `dist.group_timeout_ms` has passed (its credit returns), and the run
/// finishes balanced. (Before, the group held its credit forever.)
#[test]
fn garbage_entries_and_a_partial_group_are_dropped_counted_and_the_run_finishes() {
    use prism_transport::redis as rs;
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut sets = settings(dir.path(), &redis.url, port, 4);
    sets.push("dist.group_timeout_ms=3000".into());
    let learner = Proc::spawn(dir.path(), "learner", "learner", &sets);
    wait_for_first_weights(dir.path(), &learner);
    let keys = rs::RunKeys::new(setting(&sets, "redis.prefix"), setting(&sets, "dist.run_id"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A worker the test plays takes one prompt, adds three of its four
        // samples and a garbage entry to the sampled stream, reports all four
        // delivered and leaves.
        let (mut control, worker, a) = fake_rollout(port, "lossy").await;
        let rcfg = rs::Config { url: redis.url.clone(), ..Default::default() };
        let conn = rs::Redis::connect(&rcfg).await.unwrap();
        conn.producer::<prism_core::Trajectory>(&keys.sampled).await.unwrap().send(&sampled(&a, 3), &rcfg).await.unwrap();
        for stream in [&keys.sampled, &keys.labeled] {
            redis_command(&redis.url, &["XADD", stream, "*", "id", "77", "p", "garbage"]);
        }
        control.delivered(&worker, vec![a.group.0], 4, 12, 0.1).await.unwrap();
        control.shutdown(&worker, "done").await.unwrap();
    });
    let mut c = Cluster {
        rollouts: vec![Proc::spawn(dir.path(), "rollout0", "rollout", &sets)],
        rewards: vec![Proc::spawn(dir.path(), "reward0", "reward", &sets)],
        learner,
        dir,
    };
    let summary = c.finish();
    drop(rt);
    let out = c.learner.output();
    assert_balanced(&summary, 4, &out);
    let ledger = &summary["ledger"];
    // The partial group's 4; on a loaded machine a whole group may also
    // outwait the 3 s timeout and be dropped as incomplete, its late members
    // counted in that drop (the ledger balances either way).
    let incomplete = ledger["dropped"]["incomplete"].as_u64().unwrap_or(0);
    assert!(incomplete >= 4 && incomplete % 4 == 0, "{summary}");
    assert_eq!(ledger["undecodable_entries"], 1, "the labeled stream's garbage entry: {summary}");
    assert!(c.rewards[0].output().contains("dropping undecodable entry"), "{}", c.rewards[0].output());
}

/// Sends one command to the Redis at `url` (`redis://host:port`) and returns
/// its reply's first line.
fn redis_command(url: &str, args: &[&str]) -> String {
    use std::io::{BufRead, Write};
    let addr = url.trim_start_matches("redis://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request += &format!("${}\r\n{a}\r\n", a.len());
    }
    conn.write_all(request.as_bytes()).unwrap();
    let mut line = String::new();
    std::io::BufReader::new(conn).read_line(&mut line).unwrap();
    assert!(!line.starts_with('-'), "redis refused {args:?}: {line}");
    line
}
