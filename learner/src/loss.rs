//! The policy loss and its statistics.
//!
//! Per token (verl's `compute_policy_loss`, with DAPO's clip-higher):
//! ```text
//! r     = exp(clamp(logp - logp_base, -20, 20))          logp_base: behaviour, or the
//!                                                        learner's own when is_cap > 0
//! pg    = max(-A r, -A clamp(r, 1 - clip_low, 1 + clip_high))     PPO (Schulman 2017),
//!                                                        DAPO (Yu et al. 2025, arXiv 2503.14476)
//! pg    = min(pg, -A c)   where A < 0                    dual clip (Ye et al. 2020, arXiv 1912.09729)
//! pg   *= min(pi_base / pi_behaviour, is_cap)            truncated IS (Yao et al. 2025, "Your
//!                                                        efficient RL framework secretly brings
//!                                                        you off-policy RL training")
//! loss  = pg + kl_coef KL(pi || pi_ref) - entropy_coef H(pi)
//! ```
//! aggregated over the mini-batch by `token_mean`, `seq_mean_token_mean` or
//! `seq_mean_token_sum_norm` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783).
//! Every aggregation divides by mini-batch totals, so summing the losses of its
//! micro-batches gives the mini-batch loss, and accumulated gradients equal the
//! gradient of the whole.

use crate::Result;
use crate::config::{Aggregation, Config, KlEstimator};
use tch::{Kind, Tensor};

/// The loss terms' settings, taken from [`Config`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    pub clip_low: f64,
    pub clip_high: f64,
    pub dual_clip: f64,
    pub is_cap: f64,
    pub aggregation: Aggregation,
    pub loss_norm_len: f64,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub entropy_coef: f64,
    pub temperature: f64,
}

impl From<&Config> for LossConfig {
    fn from(c: &Config) -> Self {
        Self {
            clip_low: c.clip_low,
            clip_high: c.clip_high,
            dual_clip: c.dual_clip,
            is_cap: c.is_cap,
            aggregation: c.aggregation(),
            loss_norm_len: c.loss_norm_len as f64,
            kl_coef: c.kl_coef,
            kl_estimator: c.kl_estimator(),
            entropy_coef: c.entropy_coef,
            temperature: c.temperature,
        }
    }
}

/// Mini-batch totals the aggregation divides by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Norm {
    /// Completion tokens in the mini-batch.
    pub tokens: f64,
    /// Sequences in the mini-batch.
    pub sequences: f64,
}

/// The per-token inputs of the loss, `[B, S]` each (see [`crate::batch::Batch`]).
pub struct TokenData<'a> {
    pub targets: &'a Tensor,
    pub mask: &'a Tensor,
    pub old_logprobs: &'a Tensor,
    pub advantages: &'a Tensor,
    pub prox_logprobs: Option<&'a Tensor>,
    pub ref_logprobs: Option<&'a Tensor>,
}

/// Sums over the tokens of one or more micro-batches; [`Sums::finish`] turns
/// them into the reported means.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sums {
    /// The aggregated loss (a sum over micro-batches is the mini-batch loss).
    pub loss: f64,
    pub tokens: f64,
    pub sequences: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub dual_clip: f64,
    pub approx_kl: f64,
    pub kl_ref: f64,
    pub entropy: f64,
    pub ratio: f64,
    pub ratio_max: f64,
    pub is_weight: f64,
}

impl Sums {
    /// How many of [`Sums::additive`]'s values there are.
    pub const ADDITIVE: usize = 11;

    /// The statistics that add up over micro-batches and ranks (all but
    /// `ratio_max`), in the order [`Sums::from_additive`] reads them.
    pub fn additive(&self) -> [f64; Self::ADDITIVE] {
        [
            self.loss,
            self.tokens,
            self.sequences,
            self.clip_low,
            self.clip_high,
            self.dual_clip,
            self.approx_kl,
            self.kl_ref,
            self.entropy,
            self.ratio,
            self.is_weight,
        ]
    }

    /// The sums from [`Sums::additive`]'s values and a `ratio_max`.
    pub fn from_additive(v: &[f64], ratio_max: f64) -> Self {
        Self {
            loss: v[0],
            tokens: v[1],
            sequences: v[2],
            clip_low: v[3],
            clip_high: v[4],
            dual_clip: v[5],
            approx_kl: v[6],
            kl_ref: v[7],
            entropy: v[8],
            ratio: v[9],
            is_weight: v[10],
            ratio_max,
        }
    }

    /// Adds another micro-batch's sums.
    pub fn add(&mut self, o: &Sums) {
        self.loss += o.loss;
        self.tokens += o.tokens;
        self.sequences += o.sequences;
        self.clip_low += o.clip_low;
        self.clip_high += o.clip_high;
        self.dual_clip += o.dual_clip;
        self.approx_kl += o.approx_kl;
        self.kl_ref += o.kl_ref;
        self.entropy += o.entropy;
        self.ratio += o.ratio;
        self.ratio_max = self.ratio_max.max(o.ratio_max);
        self.is_weight += o.is_weight;
    }
}

/// Log-probabilities of `targets` under `logits / temperature`, `[B, S]`, and
/// the log-softmax they came from.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> (Tensor, Tensor) {
    let scaled = if temperature == 1.0 { logits.shallow_clone() } else { logits / temperature };
    let log_probs = scaled.log_softmax(-1, Kind::Float);
    let taken = log_probs.gather(-1, &targets.unsqueeze(-1), false).squeeze_dim(-1);
    (taken, log_probs)
}

/// The targets' log-probs under `logits / temperature` and each position's
/// entropy, `[B, S]` each; the entropy differentiable only when
/// `entropy_grad` (a loss with an entropy bonus), else a statistic.
pub fn logprobs_and_entropy(logits: &Tensor, targets: &Tensor, temperature: f64, entropy_grad: bool) -> (Tensor, Tensor) {
    let (logp, log_probs) = token_logprobs(logits, targets, temperature);
    let ent = if entropy_grad { entropy(&log_probs) } else { tch::no_grad(|| entropy(&log_probs.detach())) };
    (logp, ent)
}

/// Entropy of each position's distribution, `[B, S]`.
pub fn entropy(log_probs: &Tensor) -> Tensor {
    -(log_probs.exp() * log_probs).sum_dim_intlist(-1, false, Kind::Float)
}

/// Per-token KL estimate of `KL(pi || pi_ref)` from sampled tokens (Schulman,
/// "Approximating KL divergence", 2020; clamps as in verl's `kl_penalty`).
pub fn kl_estimate(logp: &Tensor, ref_logp: &Tensor, estimator: KlEstimator) -> Tensor {
    match estimator {
        KlEstimator::K1 => logp - ref_logp,
        KlEstimator::K2 => (logp - ref_logp).square() * 0.5,
        KlEstimator::K3 => {
            let kl = (ref_logp - logp).clamp(-20.0, 20.0);
            (kl.exp() - &kl - 1.0).clamp(-10.0, 10.0)
        }
    }
}

/// Aggregates per-token values `[B, S]` under `mask` by mini-batch totals.
pub fn aggregate(values: &Tensor, mask: &Tensor, aggregation: Aggregation, norm: Norm, loss_norm_len: f64) -> Tensor {
    let masked = values * mask;
    match aggregation {
        Aggregation::TokenMean => masked.sum(Kind::Float) / norm.tokens,
        Aggregation::SeqMeanTokenMean => {
            let per_row = masked.sum_dim_intlist(-1, false, Kind::Float)
                / mask.sum_dim_intlist(-1, false, Kind::Float).clamp_min(1.0);
            per_row.sum(Kind::Float) / norm.sequences
        }
        Aggregation::SeqMeanTokenSumNorm => masked.sum(Kind::Float) / loss_norm_len / norm.sequences,
    }
}

/// The loss of one micro-batch given its logits window `[B, S, V]`, and its sums.
pub fn policy_loss(logits: &Tensor, data: &TokenData, c: &LossConfig, norm: Norm) -> Result<(Tensor, Sums)> {
    let (logp, ent) = logprobs_and_entropy(logits, data.targets, c.temperature, c.entropy_coef > 0.0);
    policy_loss_of(&logp, &ent, data, c, norm)
}

/// [`policy_loss`] from the targets' log-probs `logp` and the entropies
/// `ent` of the positions, `[B, S]` each (differentiable as far as the loss
/// needs: `ent` only when `entropy_coef > 0`): what a loss over the
/// vocabulary in chunks computes first (see [`crate::chunked`]).
pub fn policy_loss_of(logp: &Tensor, ent: &Tensor, data: &TokenData, c: &LossConfig, norm: Norm) -> Result<(Tensor, Sums)> {
    let mask = data.mask;
    let adv = data.advantages;
    let base = data.prox_logprobs.filter(|_| c.is_cap > 0.0).unwrap_or(data.old_logprobs);
    let log_ratio = (logp - base).clamp(-20.0, 20.0);
    let ratio = log_ratio.exp();
    let neg_adv = -adv;
    let pg1 = &neg_adv * &ratio;
    let pg2 = &neg_adv * ratio.clamp(1.0 - c.clip_low, 1.0 + c.clip_high);
    let clipped = pg1.maximum(&pg2);
    let negative = adv.lt(0.0);
    let (mut pg, dual_active) = if c.dual_clip > 0.0 {
        let pg3 = &neg_adv * c.dual_clip;
        let active = pg3.lt_tensor(&clipped).logical_and(&negative);
        (clipped.minimum(&pg3).where_self(&negative, &clipped), Some(active))
    } else {
        (clipped, None)
    };
    let mut is_weight = None;
    if c.is_cap > 0.0 {
        if let Some(prox) = data.prox_logprobs {
            let w = (prox - data.old_logprobs).clamp(-20.0, 20.0).exp().clamp_max(c.is_cap);
            pg = &pg * &w;
            is_weight = Some(w);
        }
    }
    let mut per_token = pg;
    let mut kl_ref = None;
    if c.kl_coef > 0.0 {
        if let Some(reference) = data.ref_logprobs {
            let kl = kl_estimate(logp, reference, c.kl_estimator);
            per_token = per_token + &kl * c.kl_coef;
            kl_ref = Some(kl);
        }
    }
    if c.entropy_coef > 0.0 {
        per_token = per_token - ent * c.entropy_coef;
    }
    let loss = aggregate(&per_token, mask, c.aggregation, norm, c.loss_norm_len);

    // Every statistic in one tensor, read back with one device sync.
    let sums = tch::no_grad(|| -> Result<Sums> {
        let sum = |t: &Tensor| (t.to_kind(Kind::Double) * mask).sum(Kind::Double);
        let zero = || Tensor::zeros([], (Kind::Double, mask.device()));
        let positive = adv.gt(0.0);
        let high = ratio.gt(1.0 + c.clip_high).logical_and(&positive);
        let low = ratio.lt(1.0 - c.clip_low).logical_and(&negative);
        let ratio_d = ratio.detach();
        let values = Tensor::stack(
            &[
                loss.detach().to_kind(Kind::Double),
                mask.sum(Kind::Double),
                mask.sum_dim_intlist(-1, false, Kind::Float).gt(0.0).sum(Kind::Double),
                sum(&low),
                sum(&high),
                dual_active.as_ref().map_or_else(zero, sum),
                // Schulman's k3 between the base policy and the current one.
                sum(&((&ratio_d - 1.0) - log_ratio.detach())),
                kl_ref.as_ref().map_or_else(zero, |k| sum(&k.detach())),
                sum(&ent.detach()),
                sum(&ratio_d),
                is_weight.as_ref().map_or_else(zero, sum),
                // Ratios are positive, so the masked max is the max of ratio * mask.
                (&ratio_d * mask).max().to_kind(Kind::Double),
            ],
            0,
        );
        let v = Vec::<f64>::try_from(values.to_device(tch::Device::Cpu))?;
        Ok(Sums::from_additive(&v, v[Sums::ADDITIVE]))
    })?;
    Ok((loss, sums))
}

/// SFT: mean negative log-likelihood of the completion tokens over the
/// mini-batch's tokens (logits at temperature 1).
pub fn sft_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor, norm: Norm) -> Result<(Tensor, Sums)> {
    let (logp, ent) = logprobs_and_entropy(logits, targets, 1.0, false);
    sft_loss_of(&logp, &ent, mask, norm)
}

/// [`sft_loss`] from the targets' log-probs and the positions' entropies
/// (statistics only), `[B, S]` each.
pub fn sft_loss_of(logp: &Tensor, ent: &Tensor, mask: &Tensor, norm: Norm) -> Result<(Tensor, Sums)> {
    let loss = aggregate(&(-logp), mask, Aggregation::TokenMean, norm, 1.0);
    let sums = tch::no_grad(|| -> Result<Sums> {
        let ent = ent.detach();
        let values = Tensor::stack(
            &[
                loss.detach().to_kind(Kind::Double),
                mask.sum(Kind::Double),
                mask.sum_dim_intlist(-1, false, Kind::Float).gt(0.0).sum(Kind::Double),
                (ent.to_kind(Kind::Double) * mask).sum(Kind::Double),
            ],
            0,
        );
        let v = Vec::<f64>::try_from(values.to_device(tch::Device::Cpu))?;
        Ok(Sums { loss: v[0], tokens: v[1], sequences: v[2], entropy: v[3], ..Sums::default() })
    })?;
    Ok((loss, sums))
}

#[cfg(test)]
mod tests;
