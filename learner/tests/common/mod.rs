//! A tiny causal LM for the learner's tests, and synthetic labeled groups.
#![allow(dead_code)]

use prism_core::{
    FinishReason, GroupId, LabeledTrajectory, PolicyVersion, Prompt, PromptId, RewardLabel, ScoreSource, Step,
    StepScore, Trajectory, TrajectoryId,
};
use prism_learner::{Policy, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor, nn, nn::Module};

pub const VOCAB: i64 = 16;
const HIDDEN: i64 = 8;

/// Embedding, a causal running-mean mixer, a tanh layer and an untied head, with
/// Hugging Face style names. Pads after a sequence cannot change its logits.
pub struct TinyLm {
    vs: nn::VarStore,
    embed: nn::Embedding,
    up: nn::Linear,
    mix: nn::Linear,
    head: nn::Linear,
}

impl TinyLm {
    /// Weights drawn uniformly from [-0.5, 0.5) by a ChaCha generator seeded with
    /// `seed` (not torch's global generator, which parallel tests would share).
    pub fn new(seed: u64) -> Self {
        Self::on(seed, Device::Cpu)
    }

    /// The same weights as [`TinyLm::new`], on `device`.
    pub fn on(seed: u64, device: Device) -> Self {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let model = &root / "model";
        let embed = nn::embedding(&model / "embed_tokens", VOCAB, HIDDEN, Default::default());
        let layer = &model / "layers" / 0;
        let up = nn::linear(&layer / "mlp" / "up_proj", HIDDEN, HIDDEN, Default::default());
        let mix = nn::linear(
            &layer / "self_attn" / "o_proj",
            HIDDEN,
            HIDDEN,
            nn::LinearConfig { bias: false, ..Default::default() },
        );
        let head = nn::linear(&root / "lm_head", HIDDEN, VOCAB, nn::LinearConfig { bias: false, ..Default::default() });
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        tch::no_grad(|| {
            for (_, mut var) in prism_learner::policy::named_variables(&vs) {
                let values: Vec<f32> = (0..var.numel()).map(|_| rng.random_range(-0.5f32..0.5)).collect();
                var.copy_(&Tensor::from_slice(&values).view(var.size().as_slice()));
            }
        });
        vs.set_device(device);
        Self { vs, embed, up, mix, head }
    }

    /// [`TinyLm::new`]'s weights rounded to bf16, held in bf16 (a model
    /// loaded with `model.dtype = "bf16"`).
    pub fn bf16(seed: u64) -> Self {
        let mut m = Self::new(seed);
        m.vs.bfloat16();
        m
    }

    /// Every parameter's values, by name.
    pub fn weights(&self) -> Vec<(String, Vec<f32>)> {
        weights(self)
    }
}

/// Every parameter's values of `policy`, by name, as float32 on the CPU.
pub fn weights(policy: &impl Policy) -> Vec<(String, Vec<f32>)> {
    prism_learner::policy::named_variables(policy.var_store())
        .into_iter()
        .map(|(n, t)| {
            let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            (n, Vec::<f32>::try_from(t.view([-1])).unwrap())
        })
        .collect()
}

/// `builtin:tiny-arith` (a 0.79M-parameter Llama) initialised from `seed`, with
/// its tokenizer attached.
pub fn tiny_arith(seed: u64) -> prism_model::Transformer {
    let opts = prism_model::LoadOptions { seed, ..Default::default() };
    let model = prism_model::load("builtin:tiny-arith", &opts).unwrap().model;
    assert!(model.tokenizer().is_some());
    model
}

impl Policy for TinyLm {
    fn forward(&self, input_ids: &Tensor, _attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let x = self.embed.forward(input_ids);
        let t = x.size()[1];
        let positions = Tensor::arange_start(1, t + 1, (Kind::Float, x.device())).view([1, t, 1]);
        let running_mean = (x.cumsum(1, Kind::Float) / positions).to_kind(x.kind());
        let h = (self.up.forward(&x) + self.mix.forward(&running_mean)).tanh();
        Ok(self.head.forward(&h).to_kind(Kind::Float))
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
}

/// The largest absolute difference between two weight sets.
pub fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
        })
        .fold(0.0, f32::max)
}

/// `n_groups` groups of `size` samples with random prompts, completions (some of
/// different lengths), behaviour log-probs near the model's, outcomes and steps;
/// the same for the same `seed`.
pub fn groups(seed: u64, n_groups: usize, size: usize) -> Vec<Vec<LabeledTrajectory>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut id = 0u64;
    (0..n_groups)
        .map(|g| {
            let prompt_len = rng.random_range(1..5usize);
            let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.random_range(0..VOCAB as u32)).collect();
            (0..size)
                .map(|s| {
                    let n = rng.random_range(2..9usize);
                    let tokens: Vec<u32> = (0..n).map(|_| rng.random_range(0..VOCAB as u32)).collect();
                    let logprobs: Vec<f32> = (0..n).map(|_| -2.8 + rng.random_range(-0.3f32..0.3)).collect();
                    let outcome = if rng.random_bool(0.5) { 1.0 } else { 0.0 };
                    let half = (n / 2) as u32;
                    let steps = vec![
                        (0..half, Some(rng.random_range(0.0f32..1.0))),
                        (half..n as u32 - 1, Some(rng.random_range(0.0f32..1.0))),
                    ];
                    id += 1;
                    labeled(id, g as u64, s as u32, size as u32, prompt.clone(), tokens, logprobs, outcome, &steps)
                })
                .collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub fn labeled(
    id: u64,
    group: u64,
    sample: u32,
    group_size: u32,
    prompt_tokens: Vec<u32>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    outcome: f32,
    steps: &[(std::ops::Range<u32>, Option<f32>)],
) -> LabeledTrajectory {
    let n = tokens.len() as u32;
    LabeledTrajectory {
        trajectory: Trajectory {
            id: TrajectoryId(id),
            group: GroupId(group),
            sample,
            group_size,
            prompt: Prompt {
                id: PromptId(group),
                task: "synthetic".into(),
                problem: String::new(),
                text: String::new(),
                reference: None,
            },
            policy_version: PolicyVersion(0),
            prompt_tokens,
            tokens,
            logprobs,
            text: String::new(),
            token_ends: (1..=n).collect(),
            finish: FinishReason::Eos,
            generate_ms: 0,
            version_changes: Vec::new(),
        },
        label: RewardLabel {
            outcome,
            outcome_source: ScoreSource::Verifier,
            answer: None,
            steps: steps
                .iter()
                .map(|(span, score)| StepScore {
                    step: Step { text: span.clone(), tokens: span.clone() },
                    score: *score,
                    source: ScoreSource::Verifier,
                })
                .collect(),
        },
    }
}
