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
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
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
    /// Most trajectories scored together in one forward pass (and learned
    /// from in one Adam step). Default 16.
    pub batch: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self { beta: 0.05, lr: 1e-6, batch: 16 }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        check::positive("implicit.beta", self.beta)?;
        check::positive("implicit.lr", self.lr)?;
        check::positive("implicit.batch", self.batch)?;
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
    /// Trajectories φ learned from.
    pub updates: u64,
    /// Moving average (0.95) over batches of their mean cross-entropy loss.
    pub loss: Option<f64>,
    /// Trajectories scored.
    pub scored: u64,
    /// Batches run (one forward pass of each model, at most one Adam step).
    pub batches: u64,
}

/// One trajectory to score and, given an outcome, learn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// The steps, in completion tokens.
    pub spans: Vec<Range<u32>>,
    /// The verifier's outcome (clamped to [0, 1]); `None` = score only.
    pub outcome: Option<f32>,
}

struct State {
    phi: Box<dyn TokenModel>,
    reference: Box<dyn TokenModel>,
    opt: nn::Optimizer,
    metrics: ImplicitMetrics,
}

/// Trajectories waiting for the next batch, and whether a drain is running.
#[derive(Default)]
struct Queue {
    waiting: Vec<(Item, oneshot::Sender<Result<Vec<f32>>>)>,
    draining: bool,
}

/// The implicit PRM: φ (trained) and the frozen reference.
pub struct ImplicitPrm {
    cfg: Config,
    state: Mutex<State>,
    queue: Mutex<Queue>,
}

impl ImplicitPrm {
    /// An implicit PRM over `phi`, trained, and `reference`, frozen (pass two
    /// copies of the policy to start every step reward at 0).
    pub fn new(cfg: &Config, phi: Box<dyn TokenModel>, mut reference: Box<dyn TokenModel>) -> Result<Self> {
        cfg.validate()?;
        freeze(reference.as_mut());
        let opt = nn::Adam::default().build(phi.var_store(), cfg.lr)?;
        let state = State { phi, reference, opt, metrics: ImplicitMetrics::default() };
        Ok(Self { cfg: cfg.clone(), state: Mutex::new(state), queue: Mutex::default() })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
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
        let loss = self.learn(&mut s, &[ratio], &[outcome])?;
        s.metrics.batches += 1;
        Ok(loss)
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
        let item = Item { prompt: prompt.to_vec(), completion: completion.to_vec(), spans: spans.to_vec(), outcome };
        self.score_batch(vec![item]).pop().expect("one result per item")
    }

    /// Scores every item with φ as it is, then takes one Adam step on the mean
    /// cross-entropy of the items that carry an outcome: one padded forward
    /// pass of each model for the whole batch. A bad item gets its own error
    /// and is left out of the batch; the others go on.
    pub fn score_batch(&self, items: Vec<Item>) -> Vec<Result<Vec<f32>>> {
        let mut results: Vec<Option<Result<Vec<f32>>>> = items.iter().map(|_| None).collect();
        let mut s = self.state();
        let vocab = s.phi.vocab_size().min(s.reference.vocab_size());
        let mut rows = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match check(item, vocab) {
                Ok(()) if item.completion.is_empty() => results[i] = Some(sum_spans(&[], &item.spans)),
                Ok(()) => rows.push(i),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !rows.is_empty() {
            let batch: Vec<&Item> = rows.iter().map(|&i| &items[i]).collect();
            match self.run_batch(&mut s, &batch) {
                Ok(rewards) => {
                    for (&i, r) in rows.iter().zip(rewards) {
                        results[i] = Some(Ok(r));
                    }
                }
                Err(e) => {
                    for &i in &rows {
                        results[i] = Some(Err(Error::Implicit(e.to_string())));
                    }
                }
            }
        }
        results.into_iter().map(|r| r.expect("every item answered")).collect()
    }

    /// Scores `item` in the next batch: trajectories that arrive while a
    /// batch runs wait and go together into the one after it (at most
    /// `implicit.batch`), so concurrent labels share forward passes and φ
    /// takes one Adam step per batch.
    pub async fn score(self: &Arc<Self>, item: Item) -> Result<Vec<f32>> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.queue();
            q.waiting.push((item, tx));
            !std::mem::replace(&mut q.draining, true)
        };
        if lead {
            let me = Arc::clone(self);
            tokio::task::spawn_blocking(move || me.drain());
        }
        rx.await.map_err(|_| Error::Implicit("the implicit PRM's batch stopped before answering".into()))?
    }

    /// Runs batches until nobody waits. A panic in libtorch fails that
    /// batch's items, not the queue.
    fn drain(&self) {
        loop {
            let waiting = {
                let mut q = self.queue();
                if q.waiting.is_empty() {
                    q.draining = false;
                    return;
                }
                let n = q.waiting.len().min(self.cfg.batch as usize);
                q.waiting.drain(..n).collect::<Vec<_>>()
            };
            let (items, replies): (Vec<Item>, Vec<_>) = waiting.into_iter().unzip();
            let n = items.len();
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.score_batch(items)))
                .unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("a panic");
                    (0..n).map(|_| Err(Error::Implicit(format!("batch failed: {why}")))).collect()
                });
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
    }

    /// Step rewards of every row (φ as it is), then one Adam step on the rows
    /// with an outcome.
    fn run_batch(&self, s: &mut State, items: &[&Item]) -> Result<Vec<Vec<f32>>> {
        let ratios = log_ratios(s, items)?;
        let mut rewards = Vec::with_capacity(items.len());
        for (item, ratio) in items.iter().zip(&ratios) {
            let tokens = Vec::<f32>::try_from((ratio.detach() * self.cfg.beta).to_device(tch::Device::Cpu))?;
            rewards.push(sum_spans(&tokens, &item.spans)?);
        }
        s.metrics.scored += items.len() as u64;
        s.metrics.batches += 1;
        let (labeled, outcomes): (Vec<Tensor>, Vec<f32>) = items
            .iter()
            .zip(ratios)
            .filter_map(|(item, ratio)| item.outcome.map(|o| (ratio, o)))
            .unzip();
        if !labeled.is_empty() {
            self.learn(s, &labeled, &outcomes)?;
        }
        Ok(rewards)
    }

    /// One Adam step on the mean over `ratios` (one trajectory each) of the
    /// cross-entropy between σ(β Σ ratio) and its outcome; returns that loss.
    fn learn(&self, s: &mut State, ratios: &[Tensor], outcomes: &[f32]) -> Result<f64> {
        if let Some(bad) = outcomes.iter().find(|o| !o.is_finite()) {
            return Err(Error::Implicit(format!("outcome {bad} is not finite")));
        }
        let rewards = Tensor::stack(&ratios.iter().map(|r| r.sum(Kind::Float)).collect::<Vec<_>>(), 0) * self.cfg.beta;
        let targets: Vec<f32> = outcomes.iter().map(|o| o.clamp(0.0, 1.0)).collect();
        let target = Tensor::from_slice(&targets).to_device(rewards.device());
        let loss = rewards.binary_cross_entropy_with_logits::<Tensor>(&target, None, None, Reduction::Mean);
        s.opt.zero_grad();
        loss.backward();
        s.opt.step();
        let loss = loss.double_value(&[]);
        let m = &mut s.metrics;
        m.updates += outcomes.len() as u64;
        m.loss = Some(m.loss.map_or(loss, |l| 0.95 * l + 0.05 * loss));
        Ok(loss)
    }

    pub fn metrics(&self) -> ImplicitMetrics {
        self.state().metrics.clone()
    }

    /// Writes φ's and the reference's weights and the metrics into `dir`, for
    /// a checkpoint (Adam's moments restart on resume).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let s = self.state();
        for (file, model) in [(SAVED_PHI, &s.phi), (SAVED_REFERENCE, &s.reference)] {
            let path = dir.join(file);
            let named: Vec<(String, Tensor)> =
                model.var_store().variables().into_iter().map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu))).collect();
            Tensor::write_safetensors(&named, &path).map_err(|e| Error::Saved { path: path.clone(), reason: e.to_string() })?;
        }
        let path = dir.join(SAVED_METRICS);
        let json = serde_json::to_vec_pretty(&s.metrics).map_err(|e| Error::Saved { path: path.clone(), reason: e.to_string() })?;
        std::fs::write(&path, json).map_err(|e| Error::Saved { path, reason: e.to_string() })
    }

    /// Continues φ from what [`ImplicitPrm::save`] wrote into `dir`:
    /// `Ok(false)` when `dir` holds none; an error naming the file when a
    /// tensor is missing or of another shape.
    pub fn load(&self, dir: &Path) -> Result<bool> {
        let path = dir.join(SAVED_PHI);
        if !path.exists() {
            return Ok(false);
        }
        let bad = |path: &Path, reason: String| Error::Saved { path: path.to_path_buf(), reason };
        let mut s = self.state();
        // Both files are read and checked before either model changes.
        let mut loads = Vec::new();
        for (file, model) in [(SAVED_PHI, &s.phi), (SAVED_REFERENCE, &s.reference)] {
            let path = dir.join(file);
            let saved: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(&path).map_err(|e| bad(&path, e.to_string()))?.into_iter().collect();
            let variables = model.var_store().variables();
            for (name, into) in &variables {
                let from = saved.get(name).ok_or_else(|| bad(&path, format!("no tensor {name:?}")))?;
                if from.size() != into.size() {
                    return Err(bad(&path, format!("{name}: shape {:?}, the model has {:?}", from.size(), into.size())));
                }
            }
            loads.push((variables, saved));
        }
        tch::no_grad(|| {
            for (variables, saved) in &loads {
                for (name, into) in variables {
                    into.shallow_clone().copy_(&saved[name]);
                }
            }
        });
        let metrics_path = dir.join(SAVED_METRICS);
        if let Ok(text) = std::fs::read(&metrics_path) {
            s.metrics = serde_json::from_slice(&text).map_err(|e| bad(&metrics_path, e.to_string()))?;
        }
        Ok(true)
    }
}

/// φ's weights in a checkpoint folder.
pub const SAVED_PHI: &str = "implicit_phi.safetensors";
/// The frozen reference's weights (the policy where RL started, which a
/// resumed run no longer holds).
pub const SAVED_REFERENCE: &str = "implicit_ref.safetensors";
const SAVED_METRICS: &str = "implicit.json";

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

/// Refuses what no model can score: no context, a token outside the
/// vocabulary, a step outside the completion.
fn check(item: &Item, vocab: usize) -> Result<()> {
    if item.prompt.is_empty() {
        return Err(Error::Implicit("empty prompt (the first completion token needs a context)".into()));
    }
    if let Some(bad) = item.prompt.iter().chain(&item.completion).find(|&&t| t as usize >= vocab) {
        return Err(Error::Implicit(format!("token id {bad} is outside the vocabulary of {vocab}")));
    }
    if let Some(o) = item.outcome.filter(|o| !o.is_finite()) {
        return Err(Error::Implicit(format!("outcome {o} is not finite")));
    }
    let len = item.completion.len() as u32;
    if let Some(span) = item.spans.iter().find(|s| s.start > s.end || s.end > len) {
        return Err(Error::Implicit(format!("step span {span:?} outside the {len} completion tokens")));
    }
    Ok(())
}

/// `log π_φ − log π_ref` per completion token, differentiable in φ.
fn log_ratio(s: &State, prompt: &[u32], completion: &[u32]) -> Result<Tensor> {
    let item = Item { prompt: prompt.to_vec(), completion: completion.to_vec(), spans: Vec::new(), outcome: None };
    check(&item, s.phi.vocab_size().min(s.reference.vocab_size()))?;
    if completion.is_empty() {
        return Ok(Tensor::zeros([0], (Kind::Float, s.phi.var_store().device())));
    }
    Ok(log_ratios(s, &[&item])?.pop().expect("one row"))
}

/// `log π_φ − log π_ref` per completion token of each item (checked, with a
/// completion), differentiable in φ: prompt and completion of every row are
/// laid end to end and padded on the right to the longest row, so each model
/// runs once. The models are causal, so a row's padding never reaches its
/// tokens.
fn log_ratios(s: &State, items: &[&Item]) -> Result<Vec<Tensor>> {
    let device = s.phi.var_store().device();
    let width = items
        .iter()
        .map(|it| it.prompt.len().checked_add(it.completion.len()))
        .try_fold(0usize, |w, n| n.map(|n| w.max(n)))
        .ok_or_else(|| Error::Implicit("sequence length overflows".into()))?;
    let mut ids = vec![0i64; items.len() * width];
    for (row, it) in ids.chunks_mut(width).zip(items) {
        for (slot, &t) in row.iter_mut().zip(it.prompt.iter().chain(&it.completion)) {
            *slot = i64::from(t);
        }
    }
    let (b, w) = (items.len() as i64, width as i64);
    let input = Tensor::from_slice(&ids).view([b, w]).to_device(device);
    // Log-probability of each next token: position j predicts token j + 1.
    let next = input.narrow(1, 1, w - 1).unsqueeze(-1);
    let logp = |logits: Tensor| logits.narrow(1, 0, w - 1).log_softmax(-1, Kind::Float).gather(2, &next, false).squeeze_dim(-1);
    let reference = tch::no_grad(|| logp(s.reference.logits(&input)));
    let ratio = logp(s.phi.logits(&input)) - reference;
    Ok(items
        .iter()
        .enumerate()
        .map(|(i, it)| ratio.get(i as i64).narrow(0, it.prompt.len() as i64 - 1, it.completion.len() as i64))
        .collect())
}

#[cfg(test)]
mod tests;
