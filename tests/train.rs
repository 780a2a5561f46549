//! `prism train` end to end on a tiny configuration: the run folder, balanced
//! accounting, the warm-start cache, resume, Ctrl-C, and `prism report`.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Small enough to finish in seconds on 2 cores.
const TINY: &[&str] = &[
    "--set", "warmstart.steps=15",
    "--set", "warmstart.batch=16",
    "--set", "train.batch_groups=2",
    "--set", "rollout.group_size=4",
    "--set", "rollout.prompts_per_batch=2",
    "--set", "rollout.max_new_tokens=24",
    "--set", "train.eval_problems=8",
    "--set", "train.eval_every=2",
    "--set", "train.checkpoint_every=2",
    "--set", "learner.micro_batch_size=8",
    "--set", "train.time_limit_s=0",
];

fn train(dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "--set"];
    let run_dir = format!("run.dir={}", dir.join("runs").display());
    args.push(&run_dir);
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    prism().args(&args).current_dir(dir).output().expect("prism train runs")
}

fn run_folders(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join("runs")) else { return Vec::new() };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "cache")
        .collect();
    v.sort();
    v
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}:{}: {e}: {l}", path.display(), i + 1)))
        .collect()
}

fn steps(metrics: &[Value]) -> Vec<u64> {
    metrics.iter().filter(|m| m["kind"] == "step").map(|m| m["step"].as_u64().unwrap()).collect()
}

#[test]
fn a_tiny_run_writes_its_folder_balances_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), &["--set", "train.steps=3"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{}\n{}", text, stderr(&out));
    let runs = run_folders(dir.path());
    assert_eq!(runs.len(), 1);
    let run = &runs[0];

    // The folder: resolved config, JSON-lines trace, metrics, checkpoints, summary.
    let config: toml::Table = std::fs::read_to_string(run.join("config.toml")).unwrap().parse().unwrap();
    assert_eq!(config["train"]["steps"].as_integer(), Some(3));
    let trace = json_lines(&run.join("trace.jsonl"));
    assert!(trace.iter().any(|e| e["span"]["name"] == "train" && e["fields"]["message"] == "close"), "train spans recorded");
    assert!(trace.iter().any(|e| e["span"]["name"] == "generate"), "rollout spans recorded");
    let metrics = json_lines(&run.join("metrics.jsonl"));
    assert_eq!(steps(&metrics), vec![1, 2, 3]);
    let evals: Vec<u64> = metrics.iter().filter(|m| m["kind"] == "eval").map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![0, 2, 3], "start, every 2 steps, end");
    assert!(run.join("checkpoints/step-00000003/model.safetensors").is_file());
    assert!(run.join("checkpoints/step-00000002/model.safetensors").is_file());
    let summary: Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["balanced"], true, "{summary}");
    assert_eq!(summary["finish"], "MaxSteps");
    assert_eq!(summary["ledger"]["trained"], 3 * 2 * 4);
    // What the user reads.
    assert!(text.contains("held-out accuracy (8 problems, greedy):"), "{text}");
    assert!(text.contains("warm start"), "{text}");
    assert!(text.contains("trajectories: made "), "{text}");
    assert!(text.contains(&format!("run folder: {}", run.display())), "{text}");

    // Resume: continues from step 3 to 5 in the same folder.
    let out = prism()
        .args(["train", "--resume", run.to_str().unwrap(), "--set", "train.steps=5"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("resumed from"), "{}", stdout(&out));
    assert_eq!(run_folders(dir.path()).len(), 1, "no new run folder");
    let metrics = json_lines(&run.join("metrics.jsonl"));
    assert_eq!(steps(&metrics), vec![1, 2, 3, 4, 5]);
    let summary: Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["start_step"], 3);
    assert_eq!(summary["balanced"], true);
    assert!(run.join("checkpoints/step-00000005").is_dir());

    // A second run reuses the cached warm start.
    let out = train(dir.path(), &["--set", "train.steps=1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second = run_folders(dir.path()).pop().unwrap();
    let trace = std::fs::read_to_string(second.join("trace.jsonl")).unwrap();
    assert!(trace.contains("warm start loaded from cache"), "the second run skips the warm start");
    // The first run's trace, kept (appended to, not replaced) by its resumption.
    let first = std::fs::read_to_string(run.join("trace.jsonl")).unwrap();
    assert!(first.contains("warm start evaluated"), "the warm start's held-out accuracy is logged");
    assert_eq!(first.matches("\"message\":\"run folder\"").count(), 2, "both sessions traced");

    // A longer warm start continues the cached one: 5 more steps, not 20.
    let out = train(dir.path(), &["--set", "train.steps=1", "--set", "warmstart.steps=20"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("from step 15"), "{}", stdout(&out));
    let third = run_folders(dir.path()).pop().unwrap();
    let trained = json_lines(&third.join("trace.jsonl"))
        .into_iter()
        .find(|e| e["fields"]["message"] == "warm start trained")
        .expect("the third run trains its warm start");
    assert_eq!(trained["fields"]["steps"], 5, "{trained}");

    // And the report draws it.
    let out = prism().args(["report", run.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for f in ["reward.png", "reward.svg", "accuracy.png", "lag.svg", "throughput.png", "timeline.json"] {
        let p = run.join("report").join(f);
        assert!(std::fs::metadata(&p).map(|m| m.len() > 0).unwrap_or(false), "{} missing or empty", p.display());
    }
    let timeline: Value = serde_json::from_slice(&std::fs::read(run.join("report/timeline.json")).unwrap()).unwrap();
    let names: Vec<&str> = timeline["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    for stage in ["generate", "label", "train", "evaluate", "checkpoint"] {
        assert!(names.contains(&stage), "timeline has {stage}: {names:?}");
    }
}

#[test]
fn ctrl_c_stops_cleanly_with_a_final_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["train".to_string(), "--set".into(), format!("run.dir={}", dir.path().join("runs").display())];
    args.extend(TINY.iter().map(|s| s.to_string()));
    args.extend(["--set".into(), "train.steps=100000".into(), "--set".into(), "train.checkpoint_every=0".into()]);
    let mut child = prism()
        .args(&args)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until two steps are trained.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let trained = run_folders(dir.path())
            .first()
            .map(|r| r.join("metrics.jsonl"))
            .filter(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).unwrap().lines().filter(|l| l.contains("\"kind\":\"step\"")).count())
            .unwrap_or(0);
        if trained >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no training progress");
        assert!(child.try_wait().unwrap().is_none(), "prism train exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let run = run_folders(dir.path()).pop().unwrap();
    let summary: Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["finish"], "Interrupted");
    assert_eq!(summary["balanced"], true, "{summary}");
    let last = *steps(&json_lines(&run.join("metrics.jsonl"))).last().unwrap();
    assert!(run.join(format!("checkpoints/step-{last:08}/model.safetensors")).is_file(), "final checkpoint at step {last}");
}

/// The reward models a run trains online are checkpointed with the policy:
/// with the implicit PRM, the checkpoint holds φ and its reference (in the
/// manifest), and a resumed run continues φ (its update count goes on from
/// where it stopped instead of restarting at 0).
#[test]
fn the_implicit_prm_is_checkpointed_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let implicit = ["--set", "reward.process=implicit", "--set", "implicit.beta=0.5", "--set", "implicit.lr=1e-3"];
    let out = train(dir.path(), &[&["--set", "train.steps=2"][..], &implicit[..]].concat());
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let run = run_folders(dir.path()).pop().unwrap();
    let checkpoint = run.join("checkpoints/step-00000002");
    let manifest: Value = serde_json::from_slice(&std::fs::read(checkpoint.join("manifest.json")).unwrap()).unwrap();
    for file in ["implicit_phi.safetensors", "implicit_ref.safetensors", "implicit.json"] {
        assert!(manifest["files"][file].is_object(), "{file} not in the manifest: {manifest}");
    }
    let updates = |metrics: &[Value], step: u64| {
        metrics.iter().find(|m| m["kind"] == "step" && m["step"] == step).map(|m| m["implicit_updates"].as_u64().unwrap()).unwrap()
    };
    let before = updates(&json_lines(&run.join("metrics.jsonl")), 2);
    assert!(before > 0);
    let out = prism()
        .args([&["train", "--resume", run.to_str().unwrap(), "--set", "train.steps=3"][..], &implicit[..]].concat())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("resumed the implicit PRM from"), "{}", stdout(&out));
    let after = updates(&json_lines(&run.join("metrics.jsonl")), 3);
    assert!(after > before, "φ's updates continue from {before}, got {after}");
}
