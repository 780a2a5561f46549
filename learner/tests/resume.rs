//! Exact resume across processes: 4 steps straight equal, bit for bit, 2 steps
//! in one process, a checkpoint, and 2 more in a new process that resumes —
//! with the tiny test model and with the real transformer (`builtin:tiny-arith`),
//! in float32 and in bf16 (trained through float32 master weights, which the
//! checkpoint must keep).

mod common;

use common::*;
use prism_learner::{CheckpointMeta, Config, Learner, Policy};
use std::path::{Path, PathBuf};
use std::process::Command;

const DIR_ENV: &str = "PRISM_LEARNER_RESUME_DIR";
const PHASE_ENV: &str = "PRISM_LEARNER_RESUME_PHASE";
const MODEL_ENV: &str = "PRISM_LEARNER_RESUME_MODEL";

/// Everything that carries state across steps is on: the cosine schedule with
/// warmup, shuffled mini-batches (the RNG), PPO epochs, AdamW moments, truncated
/// IS and a KL reference.
fn config() -> Config {
    Config {
        lr: 1e-2,
        schedule: prism_learner::config::Schedule::Cosine,
        warmup_steps: 2,
        total_steps: 20,
        mini_batches: 2,
        ppo_epochs: 2,
        micro_batch_size: 3,
        is_cap: 2.0,
        kl_coef: 0.05,
        entropy_coef: 0.01,
        advantage: prism_learner::config::Estimator::TpGrpo,
        ..Config::default()
    }
}

/// Which model a run uses: `tiny` (tests/common's TinyLm) or `tiny-arith`,
/// in float32 or bf16.
trait Model: Policy + Sized {
    fn make(seed: u64, bf16: bool) -> Self;
}

impl Model for TinyLm {
    fn make(seed: u64, bf16: bool) -> Self {
        if bf16 { TinyLm::bf16(seed) } else { TinyLm::new(seed) }
    }
}

impl Model for prism_model::Transformer {
    fn make(seed: u64, bf16: bool) -> Self {
        if !bf16 {
            return tiny_arith(seed);
        }
        let opts = prism_model::LoadOptions { seed, dtype: prism_model::Dtype::Bf16, ..Default::default() };
        prism_model::load("builtin:tiny-arith", &opts).unwrap().model
    }
}

/// A learner whose starting weights come from `seed`; the reference is always the
/// same initial model (the caller rebuilds it on resume, it is not checkpointed).
fn learner<M: Model>(seed: u64, bf16: bool) -> Learner<M> {
    Learner::new(config(), M::make(seed, bf16), Some(M::make(11, bf16)), 42).unwrap()
}

fn train<M: Model>(learner: &mut Learner<M>, steps: std::ops::Range<u64>) {
    for step in steps {
        learner.train_step(&groups(1000 + step, 3, 4)).unwrap();
    }
}

fn bits(weights: &[(String, Vec<f32>)]) -> Vec<(String, Vec<u32>)> {
    weights.iter().map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
}

fn run_child(dir: &Path, model: &str, phase: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "resume_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .env(MODEL_ENV, model)
        .env(PHASE_ENV, phase)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child {model} {phase} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn resume_identity<M: Model>(name: &str) {
    let bf16 = name.ends_with("-bf16");
    let dir = tempfile::tempdir().unwrap();
    let mut straight = learner::<M>(11, bf16);
    train(&mut straight, 0..4);
    let want = bits(&weights(straight.policy()));

    run_child(dir.path(), name, "first");
    run_child(dir.path(), name, "second");
    let got: Vec<(String, Vec<f32>)> =
        serde_json::from_slice(&std::fs::read(dir.path().join("final.json")).unwrap()).unwrap();
    let got = bits(&got);
    assert_eq!(got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        let differing = g.iter().zip(w).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{name}: {differing} of {} values differ after resume", w.len());
    }
    // And training did move the weights, so the comparison means something.
    assert_ne!(want, bits(&weights(&M::make(11, bf16))));
}

#[test]
fn resume_is_bit_identical_across_processes() {
    resume_identity::<TinyLm>("tiny");
}

#[test]
fn resume_is_bit_identical_across_processes_with_the_transformer() {
    resume_identity::<prism_model::Transformer>("tiny-arith");
}

/// A bf16 model resumes bit for bit only if the checkpoint keeps its
/// float32 master weights (its bf16 values are them rounded).
#[test]
fn a_bf16_model_resumes_bit_identically_across_processes() {
    resume_identity::<TinyLm>("tiny-bf16");
    resume_identity::<prism_model::Transformer>("tiny-arith-bf16");
}

fn child<M: Model>(dir: &Path, phase: &str, bf16: bool) {
    let checkpoints = dir.join("checkpoints");
    match phase {
        "first" => {
            let mut l = learner::<M>(11, bf16);
            train(&mut l, 0..2);
            let meta = CheckpointMeta {
                step: 2,
                policy_version: 2,
                data_cursor: serde_json::json!({ "next_step": 2 }),
                config_hash: prism_learner::checkpoint::config_hash(&config()),
            };
            l.save_checkpoint(&checkpoints, &meta).unwrap();
        }
        "second" => {
            // Different starting weights: everything must come from the checkpoint.
            let mut l = learner::<M>(99, bf16);
            let restored = l.resume(&checkpoints).unwrap().expect("the first process wrote a checkpoint");
            assert!(restored.rejected.is_empty());
            assert_eq!(restored.meta.config_hash, prism_learner::checkpoint::config_hash(&config()));
            let next = restored.meta.data_cursor["next_step"].as_u64().unwrap();
            train(&mut l, next..4);
            std::fs::write(dir.join("final.json"), serde_json::to_vec(&weights(l.policy())).unwrap()).unwrap();
        }
        other => panic!("unknown phase {other}"),
    }
}

/// The two halves, each in its own process (started by the tests above).
#[test]
#[ignore = "run as a child process by the resume_is_bit_identical_* tests"]
fn resume_child() {
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("run by resume_is_bit_identical_across_processes"));
    let phase = std::env::var(PHASE_ENV).unwrap();
    let model = std::env::var(MODEL_ENV).unwrap();
    let bf16 = model.ends_with("-bf16");
    match model.trim_end_matches("-bf16") {
        "tiny" => child::<TinyLm>(&dir, &phase, bf16),
        "tiny-arith" => child::<prism_model::Transformer>(&dir, &phase, bf16),
        other => panic!("unknown model {other}"),
    }
}
