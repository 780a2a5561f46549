//! The training-throughput benchmark's Rust half: full train steps (forward,
//! backward, clipping, AdamW) on a synthetic group of fixed shape.
//!
//! `prism bench train` runs it next to `benches/train_step.py`, the same step in
//! PyTorch eager on the same model, shapes and thread count.

use crate::policy::{Policy, named_variables};
use crate::train::Learner;
use crate::{Error, Result};
use prism_core::{
    FinishReason, GroupId, LabeledTrajectory, PolicyVersion, Prompt, PromptId, RewardLabel, ScoreSource, Trajectory,
    TrajectoryId,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// The shape of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spec {
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence (prompt + completion).
    pub seq_len: usize,
    /// Prompt tokens per sequence (the rest is completion, where the loss is).
    pub prompt_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (allocator and thread-pool warm-up).
    pub warmup: usize,
    /// Token ids are drawn from `[0, vocab)`.
    pub vocab: u32,
    pub seed: u64,
}

/// Timings of the timed steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    pub step_seconds: Vec<f64>,
    /// Tokens forwarded per step (`batch * seq_len`).
    pub tokens_per_step: usize,
    /// `tokens_per_step` over the median step time.
    pub tokens_per_s: f64,
}

impl Timing {
    /// From per-step seconds.
    pub fn new(step_seconds: Vec<f64>, tokens_per_step: usize) -> Self {
        let mut sorted = step_seconds.clone();
        sorted.sort_by(f64::total_cmp);
        let median = if sorted.is_empty() { f64::NAN } else { sorted[sorted.len() / 2] };
        Self { tokens_per_s: tokens_per_step as f64 / median, step_seconds, tokens_per_step }
    }
}

/// One group of `spec.batch` samples with random tokens, behaviour log-probs
/// near `-ln vocab`, and alternating outcomes (so every advantage is ±1 under GRPO
/// without Bessel's correction).
pub fn synthetic_group(spec: &Spec) -> Vec<LabeledTrajectory> {
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let completion_len = spec.seq_len - spec.prompt_len;
    let uniform_lp = -(spec.vocab as f32).ln();
    let prompt_tokens: Vec<u32> = (0..spec.prompt_len).map(|_| rng.random_range(0..spec.vocab)).collect();
    (0..spec.batch)
        .map(|i| {
            let tokens: Vec<u32> = (0..completion_len).map(|_| rng.random_range(0..spec.vocab)).collect();
            let logprobs = (0..completion_len).map(|_| uniform_lp + rng.random_range(-0.1f32..0.1)).collect();
            LabeledTrajectory {
                trajectory: Trajectory {
                    id: TrajectoryId(i as u64),
                    group: GroupId(0),
                    sample: i as u32,
                    group_size: spec.batch as u32,
                    prompt: Prompt {
                        id: PromptId(0),
                        task: "bench".into(),
                        problem: String::new(),
                        text: String::new(),
                        reference: None,
                    },
                    policy_version: PolicyVersion(0),
                    prompt_tokens: prompt_tokens.clone(),
                    token_ends: (1..=completion_len as u32).collect(),
                    tokens,
                    logprobs,
                    text: String::new(),
                    finish: FinishReason::Length,
                    generate_ms: 0,
                    version_changes: Vec::new(),
                },
                label: RewardLabel {
                    outcome: (i % 2) as f32,
                    outcome_source: ScoreSource::Verifier,
                    answer: None,
                    steps: Vec::new(),
                },
            }
        })
        .collect()
}

/// Runs `spec.warmup + spec.steps` train steps on the synthetic group and times
/// the last `spec.steps`.
pub fn run<P: Policy>(learner: &mut Learner<P>, spec: &Spec) -> Result<Timing> {
    if spec.prompt_len == 0 || spec.prompt_len >= spec.seq_len {
        return Err(Error::Batch(format!(
            "bench: prompt_len {} must be in 1..seq_len ({})",
            spec.prompt_len, spec.seq_len
        )));
    }
    let group = vec![synthetic_group(spec)];
    let device = learner.policy().var_store().device();
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut seconds = Vec::with_capacity(spec.steps);
    for step in 0..spec.warmup + spec.steps {
        sync();
        let start = Instant::now();
        let report = learner.train_step(&group)?;
        sync();
        if report.updates.iter().any(|u| u.skipped) {
            return Err(Error::Batch(format!("bench: step {step} had a non-finite gradient")));
        }
        if step >= spec.warmup {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(Timing::new(seconds, spec.batch * spec.seq_len))
}

/// Model FLOPs per trained token, PaLM's estimate (Chowdhery et al. 2022,
/// appendix B): `6 N + 12 L d T`, with `N` the parameters that multiply (all but
/// the input embedding; an untied or tied head counts once, `vocab x d`).
pub fn flops_per_token<P: Policy>(policy: &P, layers: usize, hidden: usize, vocab: usize, seq_len: usize) -> f64 {
    let vars = named_variables(policy.var_store());
    let total: i64 = vars.iter().map(|(_, t)| t.numel() as i64).sum();
    let embed: i64 = vars.iter().filter(|(n, _)| n == "model.embed_tokens.weight").map(|(_, t)| t.numel() as i64).sum();
    let untied_head = vars.iter().any(|(n, _)| n == "lm_head.weight");
    let matmul = total - embed + if untied_head { 0 } else { (vocab * hidden) as i64 };
    6.0 * matmul as f64 + 12.0 * (layers * hidden * seq_len) as f64
}

/// Hands freed heap memory back to the system (glibc); elsewhere nothing.
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases free memory of glibc's arenas.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// This process's resident memory peak over a span (Linux: `VmHWM`, reset
/// at the start through `/proc/self/clear_refs`).
pub struct Memory {
    start: Option<u64>,
}

impl Memory {
    fn status(field: &str) -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    }

    /// Starts a span. Memory freed before it (a previous run in the same
    /// process) is first handed back to the system where the allocator
    /// keeps it (glibc's `malloc_trim`), so that reusing it counts as growth.
    pub fn start() -> Self {
        trim();
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        Self { start: if reset { Self::status("VmRSS:") } else { None } }
    }

    /// Bytes the peak rose above the resident memory at the start.
    pub fn peak(&self) -> Option<u64> {
        Some(Self::status("VmHWM:")?.saturating_sub(self.start?))
    }
}
