//! AdamW sharded over data-parallel ranks: ZeRO stages 1 and 2 (Rajbhandari
//! et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
//! Parameter Models", arXiv 1910.02054).
//!
//! The trainable parameters, in name order, are one flat vector padded to a
//! multiple of the world size; rank `r` owns elements `r·s .. (r+1)·s` of it
//! (`s` = padded length / world; a rank past the last parameter owns padding
//! only). Each rank keeps the AdamW moments and float32 master weights of its
//! share alone, so optimizer state costs 1/N per rank. One update:
//!
//! 1. gradients summed over ranks: reduce-scattered into each rank's share
//!    (stage 2, [`Stage::Gradients`]), or all-reduced whole and sliced
//!    (stage 1, [`Stage::Optimizer`]);
//! 2. the global gradient norm from every share's sum of squares, and the
//!    shares clipped as `torch.nn.utils.clip_grad_norm_` does;
//! 3. AdamW on the share ([`AdamWConfig::update`], as [`super::AdamW::step`]);
//! 4. the updated shares all-gathered and copied into every parameter.

use super::{AdamWConfig, clip_coefficient};
use crate::collective::Collective;
use crate::policy::named_variables;
use crate::{Error, Result};
use tch::{Kind, Tensor, nn};

/// What the ranks shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// ZeRO-1: optimizer state and master weights; gradients all-reduced.
    Optimizer,
    /// ZeRO-2: also the gradients, reduce-scattered.
    Gradients,
}

/// AdamW over this rank's share of the flattened parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    stage: Stage,
    params: Vec<Tensor>,
    rank: usize,
    world: usize,
    /// Elements per rank.
    share: i64,
    /// This rank's float32 master weights and moments, `[share]`.
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: u64,
}

impl ShardedAdamW {
    /// Rank `rank` of `world` over the trainable variables of `vs` (every
    /// rank holds the same values), with zero state.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig, stage: Stage, rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Collective(format!("rank {rank} of a world of {world}")));
        }
        let params: Vec<Tensor> = named_variables(vs).into_iter().map(|(_, v)| v).filter(Tensor::requires_grad).collect();
        let total = params.iter().try_fold(0i64, |n, p| n.checked_add(p.numel() as i64));
        let total = total.ok_or_else(|| Error::Collective("the parameters' element count overflows".into()))?;
        let share = ((total as u64).div_ceil(world as u64) as i64).max(1);
        let device = vs.device();
        let mut sharded = Self {
            config,
            stage,
            rank,
            world,
            share,
            master: Tensor::zeros([share], (Kind::Float, device)),
            exp_avg: Tensor::zeros([share], (Kind::Float, device)),
            exp_avg_sq: Tensor::zeros([share], (Kind::Float, device)),
            params,
            steps: 0,
        };
        let values = tch::no_grad(|| sharded.flat(|p| p.shallow_clone()));
        sharded.master = tch::no_grad(|| sharded.mine(&values).copy());
        Ok(sharded)
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Elements of the flattened parameters this rank keeps state for.
    pub fn share_len(&self) -> usize {
        self.share as usize
    }

    /// `f` of every parameter, flattened in order into one float32 vector
    /// padded with zeros to `world × share` elements.
    fn flat(&self, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        let device = self.master.device();
        let mut parts: Vec<Tensor> = self.params.iter().map(|p| f(p).to_kind(Kind::Float).flatten(0, -1)).collect();
        let total: i64 = parts.iter().map(|t| t.numel() as i64).sum();
        let padding = self.share * self.world as i64 - total;
        if padding > 0 {
            parts.push(Tensor::zeros([padding], (Kind::Float, device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// This rank's share of a flat vector.
    fn mine(&self, flat: &Tensor) -> Tensor {
        flat.narrow(0, self.rank as i64 * self.share, self.share)
    }

    /// One update from this rank's gradients (summed over the ranks here; a
    /// parameter without a gradient counts zeros), clipped to the global norm
    /// `max_norm` when it is positive, at learning rate `lr`. Returns the
    /// global gradient norm before clipping and whether the update ran: a
    /// non-finite norm skips it on every rank alike.
    pub fn step(&mut self, dp: &dyn Collective, lr: f64, max_norm: f64) -> Result<(f64, bool)> {
        if dp.world() != self.world || dp.rank() != self.rank {
            return Err(Error::Collective(format!(
                "the optimizer is rank {} of {}, the collective rank {} of {}",
                self.rank,
                self.world,
                dp.rank(),
                dp.world()
            )));
        }
        let _guard = tch::no_grad_guard();
        let grads = self.flat(|p| {
            let g = p.grad();
            if g.defined() { g } else { p.zeros_like() }
        });
        let grad = match self.stage {
            Stage::Gradients => {
                let share = Tensor::zeros([self.share], (Kind::Float, grads.device()));
                dp.reduce_scatter_sum(&grads, &share)?;
                share
            }
            Stage::Optimizer => {
                dp.all_reduce_sum(std::slice::from_ref(&grads))?;
                self.mine(&grads).copy()
            }
        };
        let squares = grad.square().sum(Kind::Float).reshape([1]);
        dp.all_reduce_sum(std::slice::from_ref(&squares))?;
        let norm = squares.f_double_value(&[0])?.sqrt();
        if !norm.is_finite() {
            return Ok((norm, false));
        }
        let coef = clip_coefficient(max_norm, norm);
        let grad = if max_norm > 0.0 && coef < 1.0 { grad * coef } else { grad };
        self.steps += 1;
        self.config.update(&mut self.master, &mut self.exp_avg, &mut self.exp_avg_sq, &grad, lr, self.steps)?;
        // Every rank's updated share, back into every parameter.
        let whole = Tensor::zeros([self.share * self.world as i64], (Kind::Float, self.master.device()));
        dp.all_gather(&self.master, &whole)?;
        let mut at = 0i64;
        for p in &self.params {
            let n = p.numel() as i64;
            p.shallow_clone().f_copy_(&whole.narrow(0, at, n).view(p.size().as_slice()).to_kind(p.kind()))?;
            at += n;
        }
        Ok((norm, true))
    }
}

#[cfg(test)]
mod tests;
