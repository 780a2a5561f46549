//! Implicit process rewards (Yuan et al. 2024, "Free Process Rewards without
//! Process Labels", arXiv 2412.01981; used online by PRIME, Cui et al. 2025,
//! arXiv 2502.01456).
//!
//! A language model π_φ trained as an outcome reward model whose reward is
//! parameterised as a log-likelihood ratio, `r_φ(y) = β Σ_t log π_φ(y_t|y_<t) /
//! π_ref(y_t|y_<t)`, gives process rewards for free: the reward of a step is the
//! same sum over the step's tokens. φ starts as a copy of the policy (π_ref
//! stays frozen there), so every step reward starts at 0; it is trained online
//! with binary cross-entropy between σ(r_φ(y)) and the verifier's outcome of
//! each labeled trajectory. A step's score (what the estimators read as
//! P(step correct)) is σ(step reward): above one half when the step raised the
//! implicit value, below when it lowered it.
//!
//! Every method blocks (tch); call them from `spawn_blocking` in async code.

use crate::{Error, Result};
use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Mutex;
use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Reduction, Tensor};

/// `[implicit]`: the implicit PRM of `reward.process = "implicit"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// β in `r = β Σ log(π_φ / π_ref)`. Default 0.05 (PRIME).
    pub beta: f64,
    /// Adam learning rate of φ. Default 1e-6 (PRIME, for 7B models; small
    /// models want more).
    pub lr: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self { beta: 0.05, lr: 1e-6 }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        check::positive("implicit.beta", self.beta)?;
        check::positive("implicit.lr", self.lr)?;
        Ok(())
    }
}

/// A causal language model the implicit PRM can score and train.
pub trait TokenModel: Send {
    /// Logits `[B, T, V]` (float32) for `input_ids` `[B, T]`; differentiable.
    fn logits(&self, input_ids: &Tensor) -> Tensor;
    /// The trainable variables.
    fn var_store(&self) -> &nn::VarStore;
    /// Token ids must be below this.
    fn vocab_size(&self) -> usize;
}

impl TokenModel for prism_model::Transformer {
    fn logits(&self, input_ids: &Tensor) -> Tensor {
        self.forward(input_ids, None)
    }

    fn var_store(&self) -> &nn::VarStore {
        prism_model::Transformer::var_store(self)
    }

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
}

/// The implicit PRM's state, for the metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImplicitMetrics {
    /// Trajectories φ learned from (one Adam step each).
    pub updates: u64,
    /// Moving average (0.95) of the cross-entropy loss.
    pub loss: Option<f64>,
    /// Trajectories scored.
    pub scored: u64,
}

struct State {
    phi: Box<dyn TokenModel>,
    reference: Box<dyn TokenModel>,
    opt: nn::Optimizer,
    metrics: ImplicitMetrics,
}

/// The implicit PRM: φ (trained) and the frozen reference.
pub struct ImplicitPrm {
    cfg: Config,
    state: Mutex<State>,
}

impl ImplicitPrm {
    /// An implicit PRM over `phi`, trained, and `reference`, frozen (pass two
    /// copies of the policy to start every step reward at 0).
    pub fn new(cfg: &Config, phi: Box<dyn TokenModel>, mut reference: Box<dyn TokenModel>) -> Result<Self> {
        cfg.validate()?;
        freeze(reference.as_mut());
        let opt = nn::Adam::default().build(phi.var_store(), cfg.lr)?;
        Ok(Self { cfg: cfg.clone(), state: Mutex::new(State { phi, reference, opt, metrics: ImplicitMetrics::default() }) })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `β (log π_φ − log π_ref)` of each token of `completion` after `prompt`.
    pub fn token_rewards(&self, prompt: &[u32], completion: &[u32]) -> Result<Vec<f32>> {
        let s = self.state();
        tch::no_grad(|| {
            let ratio = log_ratio(&s, prompt, completion)?;
            Ok(Vec::<f32>::try_from((ratio * self.cfg.beta).to_device(tch::Device::Cpu))?)
        })
    }

    /// The reward of each step (`spans` in completion tokens): the sum of its
    /// tokens' rewards. Counts one scored trajectory.
    pub fn step_rewards(&self, prompt: &[u32], completion: &[u32], spans: &[Range<u32>]) -> Result<Vec<f32>> {
        let tokens = self.token_rewards(prompt, completion)?;
        self.state().metrics.scored += 1;
        sum_spans(&tokens, spans)
    }

    /// One Adam step of φ on the cross-entropy between `σ(β Σ log(π_φ/π_ref))`
    /// over the whole completion and `outcome` (clamped to [0, 1]); returns the
    /// loss before the step.
    pub fn update(&self, prompt: &[u32], completion: &[u32], outcome: f32) -> Result<f64> {
        let mut s = self.state();
        let ratio = log_ratio(&s, prompt, completion)?;
        self.learn(&mut s, &ratio, outcome)
    }

    /// [`ImplicitPrm::step_rewards`] with φ as it is, then, given an
    /// `outcome`, [`ImplicitPrm::update`] on it — from one forward pass of
    /// each model instead of two.
    pub fn score_and_update(
        &self,
        prompt: &[u32],
        completion: &[u32],
        spans: &[Range<u32>],
        outcome: Option<f32>,
    ) -> Result<Vec<f32>> {
        let mut s = self.state();
        let ratio = log_ratio(&s, prompt, completion)?;
        let tokens = Vec::<f32>::try_from((ratio.detach() * self.cfg.beta).to_device(tch::Device::Cpu))?;
        let rewards = sum_spans(&tokens, spans)?;
        s.metrics.scored += 1;
        if let Some(o) = outcome {
            self.learn(&mut s, &ratio, o)?;
        }
        Ok(rewards)
    }

    fn learn(&self, s: &mut State, ratio: &Tensor, outcome: f32) -> Result<f64> {
        if !outcome.is_finite() {
            return Err(Error::Implicit(format!("outcome {outcome} is not finite")));
        }
        let reward = ratio.sum(Kind::Float) * self.cfg.beta;
        let target = Tensor::from(outcome.clamp(0.0, 1.0)).to_device(reward.device());
        let loss = reward.binary_cross_entropy_with_logits::<Tensor>(&target, None, None, Reduction::Mean);
        s.opt.zero_grad();
        loss.backward();
        s.opt.step();
        let loss = loss.double_value(&[]);
        let m = &mut s.metrics;
        m.updates += 1;
        m.loss = Some(m.loss.map_or(loss, |l| 0.95 * l + 0.05 * loss));
        Ok(loss)
    }

    pub fn metrics(&self) -> ImplicitMetrics {
        self.state().metrics.clone()
    }
}

/// The sum of `tokens` over each span.
fn sum_spans(tokens: &[f32], spans: &[Range<u32>]) -> Result<Vec<f32>> {
    spans
        .iter()
        .map(|span| {
            let (start, end) = (span.start as usize, span.end as usize);
            if start > end || end > tokens.len() {
                return Err(Error::Implicit(format!("step span {span:?} outside the {} completion tokens", tokens.len())));
            }
            Ok(tokens[start..end].iter().sum())
        })
        .collect()
}

fn freeze(model: &mut dyn TokenModel) {
    for (_, t) in model.var_store().variables() {
        let _ = t.shallow_clone().set_requires_grad(false);
    }
}

/// `log π_φ − log π_ref` per completion token, differentiable in φ.
fn log_ratio(s: &State, prompt: &[u32], completion: &[u32]) -> Result<Tensor> {
    if prompt.is_empty() {
        return Err(Error::Implicit("empty prompt (the first completion token needs a context)".into()));
    }
    let device = s.phi.var_store().device();
    if completion.is_empty() {
        return Ok(Tensor::zeros([0], (Kind::Float, device)));
    }
    let vocab = s.phi.vocab_size().min(s.reference.vocab_size());
    if let Some(bad) = prompt.iter().chain(completion).find(|&&t| t as usize >= vocab) {
        return Err(Error::Implicit(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    let ids: Vec<i64> = prompt.iter().chain(completion).map(|&t| i64::from(t)).collect();
    let (p, c) = (prompt.len() as i64, completion.len() as i64);
    let input = Tensor::from_slice(&ids).view([1, p + c]).to_device(device);
    let target = Tensor::from_slice(&ids[prompt.len()..]).view([1, c, 1]).to_device(device);
    let logp = |logits: Tensor| logits.narrow(1, p - 1, c).log_softmax(-1, Kind::Float).gather(2, &target, false).view([c]);
    let reference = tch::no_grad(|| logp(s.reference.logits(&input)));
    Ok(logp(s.phi.logits(&input)) - reference)
}

#[cfg(test)]
mod tests;
