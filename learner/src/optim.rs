//! AdamW with its state in plain named tensors (so a checkpoint holds it
//! exactly), global-norm gradient clipping, and learning-rate schedules.

pub mod sharded;

use crate::config::{Config, Schedule};
use crate::policy::named_variables;
use crate::{Error, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor, nn};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// One AdamW update of `value`, in place, from `grad` (float32) and the
    /// moments `exp_avg`, `exp_avg_sq` (float32, updated too), at optimizer
    /// step `step` (1-based) and learning rate `lr`: decay, moments,
    /// bias-corrected step, in `torch.optim.AdamW`'s single-tensor order.
    pub(crate) fn update(&self, value: &mut Tensor, exp_avg: &mut Tensor, exp_avg_sq: &mut Tensor, grad: &Tensor, lr: f64, step: u64) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = *self;
        let t = step as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        if fused_cpu(value, exp_avg, exp_avg_sq, grad, |p, m, v, g| {
            // The torch ops below, element by element in one pass (float32 scalars, as torch applies them).
            let (decay, b1c, b2, b2c) = ((1.0 - lr * weight_decay) as f32, (1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
            let (b2s, eps, neg_step) = (bias2_sqrt as f32, eps as f32, (-step_size) as f32);
            for i in 0..p.len() {
                if weight_decay != 0.0 {
                    p[i] *= decay;
                }
                m[i] += b1c * (g[i] - m[i]);
                v[i] = v[i] * b2 + (g[i] * b2c) * g[i];
                let denom = v[i].sqrt() / b2s + eps;
                p[i] += (m[i] / denom) * neg_step;
            }
        }) {
            return Ok(());
        }
        if weight_decay != 0.0 {
            let _ = value.f_mul_scalar_(1.0 - lr * weight_decay)?;
        }
        let _ = exp_avg.f_lerp_(grad, 1.0 - beta1)?;
        let _ = exp_avg_sq.f_mul_scalar_(beta2)?;
        let _ = exp_avg_sq.f_addcmul_(&(grad * (1.0 - beta2)), grad)?;
        let denom = (exp_avg_sq.sqrt() / bias2_sqrt) + eps;
        let update = (&*exp_avg / denom) * (-step_size);
        let _ = value.f_add_(&update.to_kind(value.kind()))?;
        Ok(())
    }
}

/// Runs `kernel(value, exp_avg, exp_avg_sq, grad)` over the four tensors'
/// float32 elements on the CPU, split across torch's intra-op threads, and
/// returns true; false (nothing run) unless all four are contiguous float32
/// CPU tensors of one size with distinct storage. One pass where the torch
/// ops make about ten over each parameter's state (on SmolLM2-135M an
/// update took 0.64–0.96 s in those ops against 0.075 s in torch's own
/// fused kernel, which tch does not expose).
fn fused_cpu(
    value: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    grad: &Tensor,
    kernel: impl Fn(&mut [f32], &mut [f32], &mut [f32], &[f32]) + Sync,
) -> bool {
    let all = [value, exp_avg, exp_avg_sq, grad];
    let n = value.numel();
    if all.iter().any(|t| t.device() != tch::Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() || t.numel() != n) {
        return false;
    }
    let ptrs: Vec<usize> = all.iter().map(|t| t.data_ptr() as usize).collect();
    if (0..4).any(|i| (i + 1..4).any(|j| ptrs[i] == ptrs[j])) || ptrs.contains(&0) {
        return false;
    }
    // SAFETY: four distinct contiguous float32 CPU buffers of `n` elements
    // each (checked above), alive for the call; no other code touches them
    // meanwhile (the caller holds the optimizer, autograd is not running).
    let (p, m, v, g) = unsafe {
        (
            std::slice::from_raw_parts_mut(ptrs[0] as *mut f32, n),
            std::slice::from_raw_parts_mut(ptrs[1] as *mut f32, n),
            std::slice::from_raw_parts_mut(ptrs[2] as *mut f32, n),
            std::slice::from_raw_parts(ptrs[3] as *const f32, n),
        )
    };
    let threads = (tch::get_num_threads().max(1) as usize).min(n.div_ceil(1 << 16));
    if threads <= 1 {
        kernel(p, m, v, g);
        return true;
    }
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let parts = p.chunks_mut(chunk).zip(m.chunks_mut(chunk)).zip(v.chunks_mut(chunk)).zip(g.chunks(chunk));
        for (((p, m), v), g) in parts {
            let kernel = &kernel;
            scope.spawn(move || kernel(p, m, v, g));
        }
    });
    true
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales gradients of global
/// norm `norm` by to bring it to at most `max_norm`: `max / (norm + 1e-6)`,
/// capped at 1.
pub(crate) fn clip_coefficient(max_norm: f64, norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

impl From<&Config> for AdamWConfig {
    fn from(c: &Config) -> Self {
        Self { beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: c.weight_decay }
    }
}

struct Param {
    name: String,
    value: Tensor,
    /// The float32 values the updates apply to when `value` is of a
    /// narrower type (a bf16 or f16 model), which `value` then copies after
    /// each update: at lr 1e-6 an update is far below bf16's resolution
    /// (8 bits of mantissa), so applied to `value` itself it would round away.
    /// Undefined for float32 parameters (`value` is its own master).
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl Param {
    /// Narrower than float32: trained through a master.
    fn narrow(&self) -> bool {
        self.value.kind() != Kind::Float
    }
}

/// AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101), update order as
/// `torch.optim.AdamW` (single-tensor path): decay, moments, bias-corrected step.
///
/// Parameters held in bf16 or f16 are trained through float32 master
/// weights (mixed precision as Micikevicius et al. 2018, arXiv 1710.03740,
/// without loss scaling, which bf16's range does not need): the gradients
/// stay in the parameters' type, the update is applied to the masters, and
/// the parameters are the masters rounded. The masters are optimizer state:
/// checkpointed (`master.<param>`) and sharded like the moments.
///
/// Its moments take memory only once used: they are made (zeros, beside
/// their parameters) by the first step, and restored state waits where it
/// was read (host memory) until then, so that a data-parallel rank that
/// shards them ([`sharded::ShardedAdamW`]) never holds them whole.
pub struct AdamW {
    config: AdamWConfig,
    params: Vec<Param>,
    steps: u64,
}

impl AdamW {
    /// An optimizer over the trainable variables of `vs`, with zero state.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig) -> Self {
        let params = named_variables(vs)
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .map(|(name, value)| Param { master: Tensor::new(), exp_avg: Tensor::new(), exp_avg_sq: Tensor::new(), name, value })
            .collect();
        Self { config, params, steps: 0 }
    }

    /// The moments, made (zeros) where not yet used and moved beside their
    /// parameters; so are the master weights of narrow parameters (their
    /// values in float32).
    pub(crate) fn materialize(&mut self) -> Result<()> {
        for p in &mut self.params {
            if p.narrow() {
                if !p.master.defined() {
                    p.master = p.value.detach().to_kind(Kind::Float);
                } else if p.master.device() != p.value.device() {
                    p.master = p.master.f_to_device(p.value.device())?;
                }
            }
            for m in [&mut p.exp_avg, &mut p.exp_avg_sq] {
                if !m.defined() {
                    *m = Tensor::zeros_like(&p.value).to_kind(Kind::Float);
                } else if m.device() != p.value.device() {
                    *m = m.f_to_device(p.value.device())?;
                }
            }
        }
        Ok(())
    }

    /// Whether any moment was used or restored.
    pub(crate) fn has_state(&self) -> bool {
        self.params.iter().any(|p| p.exp_avg.defined())
    }

    /// The moments per parameter (`exp_avg`, `exp_avg_sq`), zeros where not
    /// yet used, wherever they are.
    pub(crate) fn moments(&self) -> (Vec<Tensor>, Vec<Tensor>) {
        let or_zeros = |m: &Tensor, p: &Tensor| if m.defined() { m.shallow_clone() } else { Tensor::zeros_like(p).to_kind(Kind::Float) };
        self.params.iter().map(|p| (or_zeros(&p.exp_avg, &p.value), or_zeros(&p.exp_avg_sq, &p.value))).unzip()
    }

    /// The float32 master weights per parameter, wherever they are: a
    /// narrow parameter's master (its value in float32 where not yet made),
    /// a float32 parameter's value.
    pub(crate) fn masters(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|p| if p.master.defined() { p.master.shallow_clone() } else { p.value.detach().to_kind(Kind::Float) })
            .collect()
    }

    /// Whether some parameter is narrower than float32 (has a master).
    pub(crate) fn has_masters(&self) -> bool {
        self.params.iter().any(Param::narrow)
    }

    /// Frees the moments and masters (a rank that keeps its share of them elsewhere).
    pub(crate) fn release_state(&mut self) {
        for p in &mut self.params {
            (p.master, p.exp_avg, p.exp_avg_sq) = (Tensor::new(), Tensor::new(), Tensor::new());
        }
    }

    /// Takes moments per parameter (as [`AdamW::moments`] gives them), and
    /// master weights (as [`AdamW::masters`] gives them; those of float32
    /// parameters are not kept), after `steps` steps; they stay where they
    /// are until the next step.
    pub(crate) fn set_moments(&mut self, exp_avg: Vec<Tensor>, exp_avg_sq: Vec<Tensor>, masters: Option<Vec<Tensor>>, steps: u64) {
        for ((p, a), b) in self.params.iter_mut().zip(exp_avg).zip(exp_avg_sq) {
            (p.exp_avg, p.exp_avg_sq) = (a, b);
        }
        for (p, m) in self.params.iter_mut().zip(masters.into_iter().flatten()) {
            if p.narrow() {
                p.master = m;
            }
        }
        self.steps = steps;
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The trainable parameters, in name order.
    pub fn parameters(&self) -> Vec<&Tensor> {
        self.params.iter().map(|p| &p.value).collect()
    }

    /// Sets the number of steps taken (a data-parallel rank taking rank 0's).
    pub(crate) fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// Clears the gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.value.zero_grad();
        }
    }

    fn grads(&self) -> Vec<Tensor> {
        self.params.iter().map(|p| p.value.grad()).filter(|g| g.defined()).collect()
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> Result<f64> {
        tch::no_grad(|| {
            let norms: Vec<Tensor> = self.grads().iter().map(|g| g.to_kind(Kind::Float).norm()).collect();
            if norms.is_empty() {
                return Ok(0.0);
            }
            Ok(Tensor::stack(&norms, 0).norm().f_double_value(&[])?)
        })
    }

    /// Scales the gradients so their global norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does (coefficient `max / (norm + 1e-6)`,
    /// capped at 1). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        let coef = clip_coefficient(max_norm, norm);
        if coef < 1.0 {
            tch::no_grad(|| {
                for mut g in self.grads() {
                    let _ = g.f_mul_scalar_(coef)?;
                }
                Ok::<_, Error>(())
            })?;
        }
        Ok(norm)
    }

    /// One AdamW update at learning rate `lr`; parameters without a gradient are
    /// left alone.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.materialize()?;
        self.steps += 1;
        let (config, step) = (self.config, self.steps);
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.value.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = grad.to_kind(Kind::Float);
                if p.master.defined() {
                    config.update(&mut p.master, &mut p.exp_avg, &mut p.exp_avg_sq, &grad, lr, step)?;
                    let _ = p.value.f_copy_(&p.master)?;
                } else {
                    config.update(&mut p.value, &mut p.exp_avg, &mut p.exp_avg_sq, &grad, lr, step)?;
                }
            }
            Ok::<_, Error>(())
        })
    }

    /// The state as named tensors: `exp_avg.<param>` and `exp_avg_sq.<param>`
    /// (zeros where not yet used), and `master.<param>` for each parameter
    /// narrower than float32.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let (avg, sq) = self.moments();
        let masters = self.masters();
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(avg.into_iter().zip(sq))
            .flat_map(|(p, (a, b))| [(format!("exp_avg.{}", p.name), a), (format!("exp_avg_sq.{}", p.name), b)])
            .collect();
        out.extend(
            self.params.iter().zip(masters).filter(|(p, _)| p.narrow()).map(|(p, m)| (format!("master.{}", p.name), m)),
        );
        out
    }

    /// Restores the state written by [`AdamW::state_tensors`] after `steps` steps.
    pub fn load_state(
        &mut self,
        mut tensors: HashMap<String, Tensor>,
        steps: u64,
        origin: &std::path::Path,
    ) -> Result<()> {
        let bad = |reason: String| Error::Checkpoint { path: origin.to_path_buf(), reason };
        tch::no_grad(|| {
            for p in &mut self.params {
                let narrow = p.narrow();
                let mut slots = vec![("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)];
                if narrow {
                    slots.push(("master", &mut p.master));
                }
                for (prefix, dst) in slots {
                    let name = format!("{prefix}.{}", p.name);
                    let src =
                        tensors.remove(&name).ok_or_else(|| {
                        let why = if prefix == "master" { " (the model is narrower than float32, so it needs its master weights: was the checkpoint written by a float32 model?)" } else { "" };
                        bad(format!("optimizer tensor {name} is missing{why}"))
                    })?;
                    if src.size() != p.value.size() {
                        return Err(bad(format!(
                            "optimizer tensor {name} has shape {:?}, expected {:?}",
                            src.size(),
                            p.value.size()
                        )));
                    }
                    *dst = src.f_to_kind(Kind::Float)?;
                }
            }
            if let Some(extra) = tensors.keys().min() {
                return Err(bad(format!("optimizer tensor {extra} matches no parameter")));
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }
}

/// The learning rate of optimizer step `step` (0-based), as the `transformers`
/// schedules `get_constant_schedule_with_warmup` and
/// `get_cosine_schedule_with_warmup` (with a floor `min_lr_ratio`) compute it.
pub fn lr_at(config: &Config, step: u64) -> f64 {
    let warmup = config.warmup_steps;
    if step < warmup {
        return config.lr * step as f64 / warmup.max(1) as f64;
    }
    match config.schedule() {
        Schedule::Constant => config.lr,
        Schedule::Cosine => {
            let span = config.total_steps.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
            config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)
        }
    }
}

#[cfg(test)]
mod tests;
