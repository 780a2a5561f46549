//! `[learner]`: the objective, the optimizer and the step layout.

use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};

/// The learner's configuration section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `rl` (policy-gradient updates on labeled groups) or `sft` (cross-entropy on
    /// prompt/completion pairs). Default `rl`.
    pub mode: Mode,

    /// Advantage estimator: `grpo`, `dr_grpo`, `rloo`, `process`, `tp_grpo`.
    /// Default `grpo`.
    pub advantage: Estimator,
    /// Group std with Bessel's correction (n-1), as verl does. Default true.
    pub std_unbiased: bool,
    /// Added to the group std before dividing. Default 1e-6.
    pub adv_eps: f64,
    /// `process`: weight of the outcome (GRPO) advantage added to every token's
    /// process advantage. Default 0.0 (pure DeepSeekMath process supervision).
    pub process_outcome_weight: f64,
    /// `tp_grpo`: a step (or an outcome) scoring at least this is correct. Default 0.5.
    pub tp_threshold: f64,
    /// `tp_grpo`: `r_c = tp_alpha * acc_G`, the penalty on incorrect thoughts of a
    /// correct solution. Default 1.0.
    pub tp_alpha: f64,
    /// `process`: how step scores become token credit. `group` normalises
    /// every known step score over the group's and sums the steps from each
    /// token on (DeepSeekMath); `renorm` calibrates each step against the
    /// outcome (`score + correct - 1`, so a wrong answer earns no positive
    /// process credit) and gives each token the worst such value from its
    /// step on (min-form, so extra steps cannot raise a trajectory's credit).
    /// Default `group`.
    pub process_norm: ProcessNorm,
    /// `fapo`: a correct trajectory (outcome at least `tp_threshold`) with a
    /// step scored below `tp_threshold` is a flawed positive and its outcome
    /// is lowered by one half before the group statistics (FAPO), so it is
    /// reinforced while the group is mostly wrong and pushed down once the
    /// group is mostly right. Works with every estimator; dynamic sampling
    /// sees the shaped outcomes. Default `none`.
    pub flawed_positive: FlawedPositive,
    /// Dynamic sampling (after DAPO): drop groups in which every advantage is
    /// zero under the configured estimator (they carry no signal), counted in
    /// the step report. With an outcome-only estimator that is a group whose
    /// outcomes are all equal; with `process` or `tp_grpo` an all-correct group
    /// with a step judged wrong is kept. Default false.
    pub drop_uniform_groups: bool,
    /// DAPO overlong shaping: add `min(-(len - (overlong_max_len - overlong_buffer))
    /// / overlong_buffer * overlong_factor, 0)` to the outcome. Default false.
    pub overlong_shaping: bool,
    /// Overlong shaping: `L_max`, the completion token budget. Default 512.
    pub overlong_max_len: u32,
    /// Overlong shaping: `L_buf`, the soft-penalty zone before `L_max`. Default 128.
    pub overlong_buffer: u32,
    /// Overlong shaping: penalty at `L_max`. Default 1.0.
    pub overlong_factor: f64,

    /// PPO clip below: ratios under `1 - clip_low` stop helping. Default 0.2.
    pub clip_low: f64,
    /// PPO clip above (DAPO clip-higher): ratios over `1 + clip_high` stop helping.
    /// Default 0.28.
    pub clip_high: f64,
    /// Dual clip `c` (> 1) bounding the loss of negative-advantage tokens at
    /// `-c * A`; 0 disables it. Default 3.0.
    pub dual_clip: f64,
    /// Truncated importance sampling: when > 0, the ratio is taken against the
    /// learner's own log-probs at the start of the step and each token is weighted
    /// by `min(pi_learner / pi_behaviour, is_cap)`; 0 takes the ratio against the
    /// behaviour log-probs directly. Default 0.0.
    pub is_cap: f64,
    /// Loss aggregation: `token_mean`, `seq_mean_token_mean`,
    /// `seq_mean_token_sum_norm`. Default `token_mean`.
    pub aggregation: Aggregation,
    /// `seq_mean_token_sum_norm`: the constant each sequence's token sum is divided
    /// by (Dr. GRPO uses the generation budget). Default 512.
    pub loss_norm_len: u32,
    /// Weight of the KL penalty to the frozen reference model; 0 disables it (and
    /// no reference is kept). Default 0.0.
    pub kl_coef: f64,
    /// KL estimator: `k1`, `k2` or `k3` (Schulman's low-variance one). Default `k3`.
    pub kl_estimator: KlEstimator,
    /// Weight of the entropy bonus; 0 disables it. Default 0.0.
    pub entropy_coef: f64,
    /// Logits are divided by this before the softmax, to match the rollout's
    /// sampling temperature. Default 1.0.
    pub temperature: f64,

    /// Peak learning rate. Default 1e-6.
    pub lr: f64,
    /// `constant` or `cosine` (linear warmup then cosine decay). Default `constant`.
    pub schedule: Schedule,
    /// Optimizer steps of linear warmup from 0 to `lr`. Default 0.
    pub warmup_steps: u64,
    /// `cosine`: the step at which the decay reaches `min_lr_ratio * lr`. Default 1000.
    pub total_steps: u64,
    /// `cosine`: the floor of the decay as a fraction of `lr`. Default 0.0.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay. Default 0.01.
    pub weight_decay: f64,
    /// AdamW beta1. Default 0.9.
    pub beta1: f64,
    /// AdamW beta2. Default 0.999.
    pub beta2: f64,
    /// AdamW epsilon. Default 1e-8.
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping. Default 1.0.
    pub grad_clip: f64,
    /// Sequences per forward/backward; gradients are accumulated over the
    /// mini-batch. Default 4.
    pub micro_batch_size: u32,
    /// Passes over each batch. Default 1.
    pub ppo_epochs: u32,
    /// Optimizer steps per pass (the batch is shuffled and split). Default 1.
    pub mini_batches: u32,
    /// Run the forward and backward under bf16 autocast when the model is on CUDA
    /// (weights and optimizer state stay float32). Default true.
    pub bf16: bool,
    /// Run the forward and backward under bf16 autocast on the CPU too
    /// (weights and optimizer state stay float32): the matrix products use the
    /// CPU's bf16 units where it has them (AVX512-BF16, AMX). Changes results
    /// at bf16 precision, so off by default. Default false.
    pub bf16_cpu: bool,
    /// Recompute each decoder layer's activations in the backward pass
    /// instead of keeping them all from the forward pass: memory for one
    /// layer's activations (plus each layer's input) at the cost of a second
    /// forward pass. Gradients are the same. Default false.
    pub checkpoint_activations: bool,
    /// Compute the loss's log-probs and entropies over the vocabulary this
    /// many positions (of every sequence of a micro-batch) at a time, so its
    /// vocabulary-sized tensors are those of a chunk, not of every trained
    /// token; the output layer runs twice. 0 = the whole window at once.
    /// Same loss and gradients. Default 0.
    pub logit_chunk: u32,
    /// Rows of a micro-batch that share their prompt (a group's samples)
    /// run it once: the prompt's pass, then the completions attending to its
    /// keys and values, instead of the prompt once per row. The update's rows
    /// are put in micro-batches by prompt first. With `pack`, the prompt and
    /// the completions run as one sequence without padding, each completion
    /// attending to the prompt and itself (also with
    /// `checkpoint_activations`); without it, the completions padded over
    /// the prompt's keys (not with `checkpoint_activations`). Same loss and
    /// gradients (up to the order of sums). Default false.
    pub share_prompts: bool,
    /// Train on a micro-batch's rows end to end, without padding: each row
    /// keeps its own positions and attends within itself, and the output
    /// layer runs at completion positions only. Same loss and gradients as
    /// the padded rows (up to the order of sums); with `share_prompts`, rows
    /// of one prompt run it once in the packing. Default true.
    pub pack: bool,
    /// `[learner.lora]`: train LoRA adapters (`rank`, `alpha`, `dropout`,
    /// `targets`) over the frozen model instead of the whole model; the
    /// optimizer holds state for the adapters only, rollouts run merged
    /// weights, checkpoints add the adapter in PEFT's layout. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<prism_model::LoraConfig>,
    /// Checkpoints kept in a run's `checkpoints/` folder. Default 3.
    pub keep_checkpoints: u32,

    /// Most policy versions a group's samples may lag behind the learner when it
    /// trains on them; 0 = synchronous (on-policy). Default 0.
    pub max_staleness: u64,
    /// A group older than `max_staleness`: `drop` it (counted), or train on it
    /// with `importance_weight` (truncated at `is_cap`, which must be >= 1). Default `drop`.
    pub stale_groups: StaleGroups,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Rl,
            advantage: Estimator::Grpo,
            std_unbiased: true,
            adv_eps: 1e-6,
            process_outcome_weight: 0.0,
            tp_threshold: 0.5,
            tp_alpha: 1.0,
            process_norm: ProcessNorm::Group,
            flawed_positive: FlawedPositive::None,
            drop_uniform_groups: false,
            overlong_shaping: false,
            overlong_max_len: 512,
            overlong_buffer: 128,
            overlong_factor: 1.0,
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: 3.0,
            is_cap: 0.0,
            aggregation: Aggregation::TokenMean,
            loss_norm_len: 512,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            temperature: 1.0,
            lr: 1e-6,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            total_steps: 1000,
            min_lr_ratio: 0.0,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            micro_batch_size: 4,
            ppo_epochs: 1,
            mini_batches: 1,
            bf16: true,
            bf16_cpu: false,
            checkpoint_activations: false,
            logit_chunk: 0,
            share_prompts: false,
            pack: true,
            lora: None,
            keep_checkpoints: 3,
            max_staleness: 0,
            stale_groups: StaleGroups::Drop,
        }
    }
}

prism_core::string_enum! {
    /// `rl` (policy-gradient updates on labeled groups) or `sft`.
    pub enum Mode { Rl = "rl", Sft = "sft" }
}

prism_core::string_enum! {
    /// The advantage estimators.
    pub enum Estimator { Grpo = "grpo", DrGrpo = "dr_grpo", Rloo = "rloo", Process = "process", TpGrpo = "tp_grpo" }
}

prism_core::string_enum! {
    /// How the `process` estimator turns step scores into token credit.
    pub enum ProcessNorm { Group = "group", Renorm = "renorm" }
}

prism_core::string_enum! {
    /// Reward shaping of flawed positives (correct answers reached through a
    /// step judged wrong).
    pub enum FlawedPositive { None = "none", Fapo = "fapo" }
}

prism_core::string_enum! {
    /// How per-token losses become one number.
    pub enum Aggregation {
        TokenMean = "token_mean",
        SeqMeanTokenMean = "seq_mean_token_mean",
        SeqMeanTokenSumNorm = "seq_mean_token_sum_norm",
    }
}

prism_core::string_enum! {
    /// KL estimators (Schulman, "Approximating KL divergence", 2020).
    pub enum KlEstimator { K1 = "k1", K2 = "k2", K3 = "k3" }
}

prism_core::string_enum! {
    /// Learning-rate schedules.
    pub enum Schedule { Constant = "constant", Cosine = "cosine" }
}

prism_core::string_enum! {
    /// What becomes of a group older than `learner.max_staleness`.
    pub enum StaleGroups { Drop = "drop", ImportanceWeight = "importance_weight" }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        check::positive("learner.adv_eps", self.adv_eps)?;
        check::in_range("learner.tp_threshold", self.tp_threshold, 0.0, 1.0)?;
        non_negative("learner.tp_alpha", self.tp_alpha)?;
        non_negative("learner.process_outcome_weight", self.process_outcome_weight)?;
        if self.overlong_shaping {
            check::positive("learner.overlong_buffer", self.overlong_buffer)?;
            if self.overlong_buffer > self.overlong_max_len {
                return Err(Invalid::new(
                    "learner.overlong_buffer",
                    self.overlong_buffer,
                    format!("must be <= learner.overlong_max_len ({})", self.overlong_max_len),
                ));
            }
            non_negative("learner.overlong_factor", self.overlong_factor)?;
        }
        check::in_range("learner.clip_low", self.clip_low, 0.0, 1.0)?;
        non_negative("learner.clip_high", self.clip_high)?;
        if self.dual_clip != 0.0 && self.dual_clip <= 1.0 || self.dual_clip < 0.0 {
            return Err(Invalid::new("learner.dual_clip", self.dual_clip, "must be 0 (off) or > 1"));
        }
        if self.is_cap != 0.0 && self.is_cap < 1.0 || self.is_cap < 0.0 {
            return Err(Invalid::new("learner.is_cap", self.is_cap, "must be 0 (off) or >= 1"));
        }
        check::positive("learner.loss_norm_len", self.loss_norm_len)?;
        non_negative("learner.kl_coef", self.kl_coef)?;
        non_negative("learner.entropy_coef", self.entropy_coef)?;
        check::positive("learner.temperature", self.temperature)?;
        check::positive("learner.lr", self.lr)?;
        if self.schedule == Schedule::Cosine && self.total_steps <= self.warmup_steps {
            return Err(Invalid::new(
                "learner.total_steps",
                self.total_steps,
                format!("must be > learner.warmup_steps ({}) for the cosine schedule", self.warmup_steps),
            ));
        }
        check::in_range("learner.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)?;
        non_negative("learner.weight_decay", self.weight_decay)?;
        for (key, beta) in [("learner.beta1", self.beta1), ("learner.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Invalid::new(key, beta, "must be in [0, 1)"));
            }
        }
        check::positive("learner.eps", self.eps)?;
        non_negative("learner.grad_clip", self.grad_clip)?;
        check::positive("learner.micro_batch_size", self.micro_batch_size)?;
        check::positive("learner.ppo_epochs", self.ppo_epochs)?;
        check::positive("learner.mini_batches", self.mini_batches)?;
        check::positive("learner.keep_checkpoints", self.keep_checkpoints)?;
        if let Some(lora) = &self.lora {
            lora.validate("learner.lora")?;
            if lora.dropout > 0.0 && self.checkpoint_activations {
                // The recomputed layer would draw other dropout masks than the forward pass did.
                return Err(Invalid::new(
                    "learner.lora.dropout",
                    lora.dropout,
                    "must be 0 with learner.checkpoint_activations (a recomputed layer would draw new dropout masks)",
                ));
            }
        }
        if self.stale_groups == StaleGroups::ImportanceWeight && self.is_cap < 1.0 {
            return Err(Invalid::new(
                "learner.stale_groups",
                self.stale_groups.as_str(),
                "needs truncated importance weights: set learner.is_cap >= 1",
            ));
        }
        Ok(())
    }

    /// The advantage estimator.
    pub fn estimator(&self) -> Estimator {
        self.advantage
    }

    /// The loss aggregation.
    pub fn aggregation(&self) -> Aggregation {
        self.aggregation
    }

    /// The KL estimator.
    pub fn kl_estimator(&self) -> KlEstimator {
        self.kl_estimator
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Whether the step is supervised fine-tuning.
    pub fn is_sft(&self) -> bool {
        self.mode == Mode::Sft
    }
}

fn non_negative(key: &str, value: f64) -> Result<(), Invalid> {
    if value >= 0.0 && value.is_finite() { Ok(()) } else { Err(Invalid::new(key, value, "must be >= 0")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_wrong_choice_lists_the_accepted_ones() {
        let e = Estimator::try_from("ppo".to_string()).unwrap_err();
        assert!(e.contains("\"ppo\"") && e.contains("tp_grpo"), "{e}");
        let e: Result<Config, _> = serde_json::from_value(serde_json::json!({ "advantage": "ppo" }));
        assert!(e.unwrap_err().to_string().contains("dr_grpo"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(fn(&mut Config), &str)> = vec![
            (|c| c.dual_clip = 0.5, "learner.dual_clip"),
            (|c| c.is_cap = 0.5, "learner.is_cap"),
            (|c| c.beta2 = 1.0, "learner.beta2"),
            (|c| c.micro_batch_size = 0, "learner.micro_batch_size"),
            (|c| c.lr = 0.0, "learner.lr"),
            (
                |c| {
                    c.schedule = Schedule::Cosine;
                    c.warmup_steps = 10;
                    c.total_steps = 10;
                },
                "learner.total_steps",
            ),
            (
                |c| {
                    c.overlong_shaping = true;
                    c.overlong_buffer = 600;
                },
                "learner.overlong_buffer",
            ),
        ];
        for (edit, key) in cases {
            let mut c = Config::default();
            edit(&mut c);
            assert_eq!(c.validate().unwrap_err().key, key);
        }
    }
}
