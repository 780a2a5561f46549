//! AdamW sharded over data-parallel ranks: ZeRO stages 1 and 2 (Rajbhandari
//! et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
//! Parameter Models", arXiv 1910.02054).
//!
//! The trainable parameters, in name order, are cut into buckets of whole
//! parameters of about `bucket_bytes` (as float32; a parameter larger than
//! that is a bucket of its own). Each bucket, flattened, is padded to a
//! multiple of the world size and shared out: rank `r` owns elements
//! `r·s .. (r+1)·s` of it (`s` = padded length / world; a rank past a
//! bucket's last element owns padding only). A rank's *share* is its part of
//! every bucket, in bucket order. It keeps the AdamW moments and float32
//! master weights of its share alone, so optimizer state costs 1/N per rank,
//! and no step holds more than one bucket flattened. One update:
//!
//! 1. gradients summed over ranks, bucket by bucket: reduce-scattered into
//!    each rank's share (stage 2, [`Stage::Gradients`]), or all-reduced whole
//!    and sliced (stage 1, [`Stage::Optimizer`]);
//! 2. the global gradient norm from every share's sum of squares, and the
//!    shares clipped as `torch.nn.utils.clip_grad_norm_` does;
//! 3. AdamW on the share ([`AdamWConfig::update`], as [`super::AdamW::step`]);
//! 4. the updated shares all-gathered, bucket by bucket, into every
//!    parameter, in the parameters' type (bf16 models move half the bytes).
//!
//! The master weights are the parameters' values at the start, or the
//! masters rank 0 holds (a bf16 model resumed: [`super::AdamW`]'s masters).

use super::{AdamWConfig, clip_coefficient};
use crate::collective::Collective;
use crate::policy::named_variables;
use crate::{Error, Result};
use std::ops::Range;
use tch::{Kind, Tensor, nn};

/// What the ranks shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// ZeRO-1: optimizer state and master weights; gradients all-reduced.
    Optimizer,
    /// ZeRO-2: also the gradients, reduce-scattered.
    Gradients,
}

/// How data-parallel ranks shard the optimizer (`dist.shard` other than
/// "none"; see [`crate::Learner::join_data_parallel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    pub stage: Stage,
    /// Parameters are flattened together up to this many bytes (as float32).
    pub bucket_bytes: usize,
}

/// Consecutive parameters flattened together.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bucket {
    /// Indices into the parameters.
    params: Range<usize>,
    /// Elements of those parameters.
    len: i64,
    /// Elements per rank (the bucket padded to a multiple of the world, divided).
    share: i64,
    /// Where this bucket's part starts in a rank's share.
    offset: i64,
}

/// The buckets of parameters with `numels` elements, for `world` ranks.
fn buckets(numels: &[i64], bucket_bytes: usize, world: usize) -> Result<Vec<Bucket>> {
    let overflow = || Error::Collective("the parameters' element count overflows".into());
    let cap = (bucket_bytes / 4).max(1) as i64;
    let mut out: Vec<Bucket> = Vec::new();
    let mut offset = 0i64;
    let mut start = 0usize;
    let mut len = 0i64;
    let close = |out: &mut Vec<Bucket>, offset: &mut i64, params: Range<usize>, len: i64| -> Result<()> {
        let share = ((len as u64).div_ceil(world as u64) as i64).max(1);
        out.push(Bucket { params, len, share, offset: *offset });
        *offset = offset.checked_add(share).ok_or_else(overflow)?;
        Ok(())
    };
    for (i, &n) in numels.iter().enumerate() {
        if i > start && len.checked_add(n).ok_or_else(overflow)? > cap {
            close(&mut out, &mut offset, start..i, len)?;
            (start, len) = (i, 0);
        }
        len = len.checked_add(n).ok_or_else(overflow)?;
    }
    if numels.is_empty() || start < numels.len() {
        close(&mut out, &mut offset, start..numels.len(), len)?;
    }
    Ok(out)
}

/// How the trainable parameters are cut into buckets and shared out among
/// `world` ranks: what a rank's share holds, and the way back.
pub struct Layout {
    params: Vec<Tensor>,
    world: usize,
    buckets: Vec<Bucket>,
    bucket_bytes: usize,
    /// Elements of one rank's share.
    share: i64,
}

impl Layout {
    /// The trainable variables of `vs` over `world` ranks, in buckets of
    /// about `bucket_bytes`. Allocates nothing.
    pub fn new(vs: &nn::VarStore, world: usize, bucket_bytes: usize) -> Result<Self> {
        if world == 0 {
            return Err(Error::Collective("a world of 0 ranks".into()));
        }
        let params: Vec<Tensor> = named_variables(vs).into_iter().map(|(_, v)| v).filter(Tensor::requires_grad).collect();
        let numels: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
        let buckets = buckets(&numels, bucket_bytes, world)?;
        let share = buckets.iter().map(|b| b.share).sum();
        Ok(Self { params, world, buckets, bucket_bytes, share })
    }

    /// Elements of one rank's share.
    pub fn share_len(&self) -> usize {
        self.share as usize
    }

    /// The bucket size it was made with.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// The flattened bucket `b` of `f` of every parameter, as float32 on the
    /// parameters' device, padded to `world × share` elements.
    fn flat(&self, b: &Bucket, f: impl Fn(usize) -> Tensor) -> Tensor {
        let device = self.params.first().map_or(tch::Device::Cpu, Tensor::device);
        let mut parts: Vec<Tensor> = b.params.clone().map(|i| f(i).to_kind(Kind::Float).to_device(device).flatten(0, -1)).collect();
        let padding = b.share * self.world as i64 - b.len;
        if padding > 0 {
            parts.push(Tensor::zeros([padding], (Kind::Float, device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// Rank `rank`'s share of per-parameter tensors (`per_param[i]` shaped
    /// as parameter `i`, e.g. a whole optimizer's moments), `[share_len]`.
    pub fn share_of(&self, per_param: &[Tensor], rank: usize) -> Tensor {
        let parts: Vec<Tensor> =
            self.buckets.iter().map(|b| self.flat(b, |i| per_param[i].shallow_clone()).narrow(0, rank as i64 * b.share, b.share)).collect();
        Tensor::cat(&parts, 0)
    }

    /// The per-parameter tensors whose shares are `shares` (one per rank,
    /// in rank order): the inverse of [`Layout::share_of`].
    pub fn whole_of(&self, shares: &[Tensor]) -> Result<Vec<Tensor>> {
        if shares.len() != self.world || shares.iter().any(|s| s.size() != [self.share]) {
            return Err(Error::Collective(format!(
                "{} shares of shapes {:?} for {} ranks of {} elements each",
                shares.len(),
                shares.iter().map(Tensor::size).collect::<Vec<_>>(),
                self.world,
                self.share
            )));
        }
        let mut out = Vec::with_capacity(self.params.len());
        for b in &self.buckets {
            let parts: Vec<Tensor> = shares.iter().map(|s| s.narrow(0, b.offset, b.share)).collect();
            let bucket = Tensor::cat(&parts, 0);
            let mut at = 0i64;
            for p in &self.params[b.params.clone()] {
                let n = p.numel() as i64;
                out.push(bucket.narrow(0, at, n).view(p.size().as_slice()).copy());
                at += n;
            }
        }
        Ok(out)
    }
}

/// AdamW over this rank's share of the flattened parameters.
pub struct ShardedAdamW {
    config: AdamWConfig,
    stage: Stage,
    rank: usize,
    layout: Layout,
    /// This rank's float32 master weights and moments, `[share_len]`.
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: u64,
}

impl ShardedAdamW {
    /// Rank `rank` of `world` over the trainable variables of `vs` (every
    /// rank holds the same values), in buckets of about `bucket_bytes`, with
    /// zero state.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig, stage: Stage, rank: usize, world: usize, bucket_bytes: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Collective(format!("rank {rank} of a world of {world}")));
        }
        let layout = Layout::new(vs, world, bucket_bytes)?;
        let zeros = || Tensor::zeros([layout.share], (Kind::Float, vs.device()));
        let (exp_avg, exp_avg_sq) = (zeros(), zeros());
        let values: Vec<Tensor> = layout.params.iter().map(Tensor::shallow_clone).collect();
        let master = tch::no_grad(|| layout.share_of(&values, rank));
        Ok(Self { config, stage, rank, layout, master, exp_avg, exp_avg_sq, steps: 0 })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub(crate) fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// How the parameters are shared out.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// This rank and the world.
    pub fn rank(&self) -> (usize, usize) {
        (self.rank, self.layout.world)
    }

    /// Elements of the flattened parameters this rank keeps state for.
    pub fn share_len(&self) -> usize {
        self.layout.share_len()
    }

    /// This rank's moments, `[share_len]` each: `exp_avg`, `exp_avg_sq`.
    pub fn moments(&self) -> [&Tensor; 2] {
        [&self.exp_avg, &self.exp_avg_sq]
    }

    /// This rank's float32 master weights, `[share_len]`.
    pub fn master(&self) -> &Tensor {
        &self.master
    }

    /// Whether some parameter is narrower than float32: its master weights
    /// are more than its values, and a checkpoint keeps them.
    pub fn has_masters(&self) -> bool {
        self.layout.params.iter().any(|p| p.kind() != Kind::Float)
    }

    /// Takes `exp_avg`, `exp_avg_sq` and, when given, the master weights
    /// (this rank's share of each) after `steps` steps.
    pub fn set_state(&mut self, exp_avg: &Tensor, exp_avg_sq: &Tensor, master: Option<&Tensor>, steps: u64) -> Result<()> {
        for (name, src) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)].into_iter().chain(master.map(|m| ("master", m))) {
            if src.size() != self.exp_avg.size() {
                return Err(Error::Collective(format!(
                    "rank {}: a share of {name} of shape {:?}, expected {:?}",
                    self.rank,
                    src.size(),
                    self.exp_avg.size()
                )));
            }
        }
        tch::no_grad(|| -> Result<()> {
            self.exp_avg.f_copy_(exp_avg)?;
            self.exp_avg_sq.f_copy_(exp_avg_sq)?;
            if let Some(m) = master {
                self.master.f_copy_(m)?;
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }

    /// One update from this rank's gradients (summed over the ranks here; a
    /// parameter without a gradient counts zeros), clipped to the global norm
    /// `max_norm` when it is positive, at learning rate `lr`. Returns the
    /// global gradient norm before clipping and whether the update ran: a
    /// non-finite norm skips it on every rank alike.
    pub fn step(&mut self, dp: &dyn Collective, lr: f64, max_norm: f64) -> Result<(f64, bool)> {
        let (rank, world) = self.rank();
        if dp.world() != world || dp.rank() != rank {
            return Err(Error::Collective(format!(
                "the optimizer is rank {} of {}, the collective rank {} of {}",
                rank,
                world,
                dp.rank(),
                dp.world()
            )));
        }
        let _guard = tch::no_grad_guard();
        let device = self.master.device();
        let grad = Tensor::zeros([self.share_len() as i64], (Kind::Float, device));
        let layout = &self.layout;
        for b in &layout.buckets {
            let flat = layout.flat(b, |i| {
                let g = layout.params[i].grad();
                if g.defined() { g } else { layout.params[i].zeros_like() }
            });
            let mine = match self.stage {
                Stage::Gradients => {
                    let share = Tensor::zeros([b.share], (Kind::Float, device));
                    dp.reduce_scatter_sum(&flat, &share)?;
                    share
                }
                Stage::Optimizer => {
                    dp.all_reduce_sum(std::slice::from_ref(&flat))?;
                    flat.narrow(0, rank as i64 * b.share, b.share)
                }
            };
            grad.narrow(0, b.offset, b.share).f_copy_(&mine)?;
        }
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
        // Every rank's updated share, back into every parameter, in the
        // parameters' type (float32 where a bucket mixes types).
        for b in &self.layout.buckets {
            let params = &self.layout.params[b.params.clone()];
            let kind = params.first().map_or(Kind::Float, Tensor::kind);
            let kind = if params.iter().all(|p| p.kind() == kind) { kind } else { Kind::Float };
            let whole = Tensor::zeros([b.share * world as i64], (kind, device));
            dp.all_gather(&self.master.narrow(0, b.offset, b.share).to_kind(kind), &whole)?;
            let mut at = 0i64;
            for p in params {
                let n = p.numel() as i64;
                p.shallow_clone().f_copy_(&whole.narrow(0, at, n).view(p.size().as_slice()))?;
                at += n;
            }
        }
        Ok((norm, true))
    }
}

#[cfg(test)]
mod tests;
