//! The real-model example, `configs/gsm8k-smollm2.toml`, run for two steps with
//! tiny settings: SmolLM2-135M-Instruct on GSM8K prompts rendered by its chat
//! template, the numeric verifier, and a judge served by `prism serve` (the
//! tiny built-in model, so its verdicts are mostly unreadable and the fallback
//! path is exercised too).

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

#[test]
fn gsm8k_smollm2_config_trains_two_steps() {
    let Some(gguf) = smollm_gguf() else { return };
    let mut judge = prism()
        .args(["serve", "--model", "builtin:tiny-arith", "--addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(judge.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).unwrap_or_else(|| panic!("no address in {line:?}")).trim().to_string();

    let dir = tempfile::tempdir().unwrap();
    let sets = [
        format!("model.source={}", gguf.display()),
        format!("task.jsonl.train={}", repo().join("../shared/data/gsm8k/train.jsonl").display()),
        format!("task.jsonl.eval={}", repo().join("../shared/data/gsm8k/test.jsonl").display()),
        format!("judge.url=http://{addr}/v1"),
        format!("run.dir={}", dir.path().join("runs").display()),
        "judge.model=tiny-arith".into(),
        "judge.max_tokens=8".into(),
        "train.steps=2".into(),
        "train.batch_groups=1".into(),
        "train.eval_problems=2".into(),
        "train.eval_every=0".into(),
        "rollout.group_size=2".into(),
        "rollout.prompts_per_batch=1".into(),
        "rollout.max_new_tokens=12".into(),
        "learner.micro_batch_size=2".into(),
        // With 12 tokens nothing is solved; keep uniform groups so steps happen.
        "learner.drop_uniform_groups=false".into(),
    ];
    let mut args = vec!["train".to_string(), "--config".into(), repo().join("configs/gsm8k-smollm2.toml").display().to_string()];
    for s in &sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    let out = prism().args(&args).current_dir(dir.path()).output().unwrap();
    let _ = judge.kill();
    let _ = judge.wait();
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let run = std::fs::read_dir(dir.path().join("runs")).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("summary.json").exists()).unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["balanced"], true, "{summary}");
    assert_eq!(summary["final_step"], 2);
    assert_eq!(summary["ledger"]["trained"], 4);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"kind\":\"step\"")).count(), 2);
    assert!(run.join("checkpoints/step-00000002/model.safetensors").is_file());
}
