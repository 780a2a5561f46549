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

/// The order in which the trainable parameters are flattened into buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// By name: how checkpoints written before [`Order::Layers`] cut their
    /// state (a checkpoint that names no order).
    #[default]
    Names,
    /// The parameters outside the decoder layers first, then layer by layer
    /// (by name within one): a bucket holds neighbouring layers, so the
    /// streamed ZeRO-2 backward pass ([`ShardedAdamW::take_layer`]) finds at
    /// most one bucket waiting for a layer still to come.
    Layers,
}

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

/// The decoder layer a parameter named `name` belongs to: `N` of a
/// `layers.N.` in it (Hugging Face names, and PEFT's over them).
fn layer_of(name: &str) -> Option<usize> {
    name.match_indices("layers.").find_map(|(at, _)| {
        let (digits, rest) = name[at + 7..].split_at(name[at + 7..].find(|c: char| !c.is_ascii_digit())?);
        (!digits.is_empty() && rest.starts_with('.')).then(|| digits.parse().ok()).flatten()
    })
}

/// How the trainable parameters are cut into buckets and shared out among
/// `world` ranks: what a rank's share holds, and the way back.
pub struct Layout {
    /// The trainable parameters in bucket order.
    params: Vec<Tensor>,
    /// Where each of them is among the parameters in name order.
    by_name: Vec<usize>,
    order: Order,
    /// The decoder layer of each parameter (`layers.N.` in its name), if any.
    layers: Vec<Option<usize>>,
    world: usize,
    buckets: Vec<Bucket>,
    bucket_bytes: usize,
    /// Elements of one rank's share.
    share: i64,
}

impl Layout {
    /// The trainable variables of `vs` over `world` ranks, in buckets of
    /// about `bucket_bytes`, flattened in `order`. Allocates nothing.
    pub fn new(vs: &nn::VarStore, world: usize, bucket_bytes: usize, order: Order) -> Result<Self> {
        if world == 0 {
            return Err(Error::Collective("a world of 0 ranks".into()));
        }
        let mut named: Vec<(usize, Option<usize>, Tensor)> =
            named_variables(vs).into_iter().filter(|(_, v)| v.requires_grad()).enumerate().map(|(i, (n, v))| (i, layer_of(&n), v)).collect();
        if order == Order::Layers {
            // Stable: by name within a layer; outside the layers (None) first.
            named.sort_by_key(|(_, layer, _)| *layer);
        }
        let mut by_name = Vec::with_capacity(named.len());
        let mut layers = Vec::with_capacity(named.len());
        let mut params = Vec::with_capacity(named.len());
        for (i, layer, v) in named {
            by_name.push(i);
            layers.push(layer);
            params.push(v);
        }
        let numels: Vec<i64> = params.iter().map(|p| p.numel() as i64).collect();
        let buckets = buckets(&numels, bucket_bytes, world)?;
        let share = buckets.iter().map(|b| b.share).sum();
        Ok(Self { params, by_name, order, layers, world, buckets, bucket_bytes, share })
    }

    /// The order it flattens the parameters in.
    pub fn order(&self) -> Order {
        self.order
    }

    /// Elements of one rank's share.
    pub fn share_len(&self) -> usize {
        self.share as usize
    }

    /// The bucket size it was made with.
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// The trainable tensors of decoder layer `layer`, in name order.
    pub fn layer_params(&self, layer: usize) -> Vec<Tensor> {
        self.params.iter().zip(&self.layers).filter(|(_, l)| **l == Some(layer)).map(|(p, _)| p.shallow_clone()).collect()
    }

    /// The flattened bucket `b` of `f` of every parameter, as float32 on the
    /// parameters' device, padded to `world × share` elements.
    fn flat(&self, b: &Bucket, mut f: impl FnMut(usize) -> Tensor) -> Tensor {
        let device = self.params.first().map_or(tch::Device::Cpu, Tensor::device);
        let mut parts: Vec<Tensor> = b.params.clone().map(|i| f(i).to_kind(Kind::Float).to_device(device).flatten(0, -1)).collect();
        let padding = b.share * self.world as i64 - b.len;
        if padding > 0 {
            parts.push(Tensor::zeros([padding], (Kind::Float, device)));
        }
        Tensor::cat(&parts, 0)
    }

    /// Rank `rank`'s share of per-parameter tensors (`per_param[i]` shaped
    /// as parameter `i` in name order, e.g. a whole optimizer's moments), `[share_len]`.
    pub fn share_of(&self, per_param: &[Tensor], rank: usize) -> Tensor {
        self.share_with(|k| per_param[self.by_name[k]].shallow_clone(), rank)
    }

    /// Rank `rank`'s share of `f(k)` of the parameters in bucket order.
    fn share_with(&self, f: impl Fn(usize) -> Tensor, rank: usize) -> Tensor {
        let parts: Vec<Tensor> = self.buckets.iter().map(|b| self.flat(b, &f).narrow(0, rank as i64 * b.share, b.share)).collect();
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
        let mut out: Vec<Option<Tensor>> = (0..self.params.len()).map(|_| None).collect();
        for b in &self.buckets {
            let parts: Vec<Tensor> = shares.iter().map(|s| s.narrow(0, b.offset, b.share)).collect();
            let bucket = Tensor::cat(&parts, 0);
            let mut at = 0i64;
            for k in b.params.clone() {
                let p = &self.params[k];
                let n = p.numel() as i64;
                out[self.by_name[k]] = Some(bucket.narrow(0, at, n).view(p.size().as_slice()).copy());
                at += n;
            }
        }
        Ok(out.into_iter().map(|t| t.expect("every parameter is in a bucket")).collect())
    }
}

/// ZeRO-2 with the gradients streamed ([`ShardedAdamW::take_layer`]): each
/// micro-batch's gradients are reduce-scattered bucket by bucket as the
/// recomputing backward pass makes them, and summed into this rank's share.
struct Stream {
    /// Per bucket: the decoder layer after whose backward pass every one of
    /// its parameters has its gradient (the lowest of their layers: the pass
    /// goes from the last), or `None` when some parameter is in no layer:
    /// reduced at the end of the micro-batch.
    ready_at: Vec<Option<usize>>,
    /// The layers some bucket waits for, from the last.
    ready_layers: Vec<usize>,
    /// This micro-batch's gradients handed over and not yet reduced, per parameter.
    pending: Vec<Option<Tensor>>,
    /// The buckets reduced this micro-batch.
    reduced: Vec<bool>,
    /// This update's gradient share so far, `[share_len]` float32.
    grad: Option<Tensor>,
    /// The first failure in a layer's hand-over, reported at the micro-batch's end.
    error: Option<Error>,
    /// Gradient elements handed over and held now, and the most held at once.
    held: i64,
    peak_held: i64,
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
    stream: Stream,
}

impl ShardedAdamW {
    /// Rank `rank` of `world` over the trainable variables of `vs` (every
    /// rank holds the same values), in buckets of about `bucket_bytes`, with
    /// zero state.
    pub fn new(vs: &nn::VarStore, config: AdamWConfig, stage: Stage, rank: usize, world: usize, bucket_bytes: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(Error::Collective(format!("rank {rank} of a world of {world}")));
        }
        let layout = Layout::new(vs, world, bucket_bytes, Order::Layers)?;
        let zeros = || Tensor::zeros([layout.share], (Kind::Float, vs.device()));
        let (exp_avg, exp_avg_sq) = (zeros(), zeros());
        let master = tch::no_grad(|| layout.share_with(|k| layout.params[k].shallow_clone(), rank));
        let ready_at: Vec<Option<usize>> =
            layout.buckets.iter().map(|b| layout.layers[b.params.clone()].iter().copied().collect::<Option<Vec<usize>>>()?.into_iter().min()).collect();
        let mut ready_layers: Vec<usize> = ready_at.iter().flatten().copied().collect();
        ready_layers.sort_unstable_by(|a, b| b.cmp(a));
        ready_layers.dedup();
        let stream = Stream {
            ready_at,
            ready_layers,
            pending: (0..layout.params.len()).map(|_| None).collect(),
            reduced: vec![false; layout.buckets.len()],
            grad: None,
            error: None,
            held: 0,
            peak_held: 0,
        };
        Ok(Self { config, stage, rank, layout, master, exp_avg, exp_avg_sq, steps: 0, stream })
    }

    /// The most gradient elements handed over by [`ShardedAdamW::take_layer`]
    /// and held at once, waiting for their buckets, since it was made.
    pub fn peak_streamed(&self) -> usize {
        self.stream.peak_held as usize
    }

    /// The elements of the largest bucket.
    pub fn largest_bucket(&self) -> usize {
        self.layout.buckets.iter().map(|b| b.len).max().unwrap_or(0) as usize
    }

    /// Whether the gradients can be streamed: ZeRO-2.
    pub fn streams(&self) -> bool {
        self.stage == Stage::Gradients
    }

    /// Decoder layer `layer`'s gradients of this micro-batch (for
    /// [`Layout::layer_params`], undefined for none), from a recomputing
    /// backward pass that goes from the last layer to the first and hands
    /// over every layer: each bucket whose parameters all have theirs is
    /// reduce-scattered into this rank's gradient share, and the gradients
    /// it held are let go. Every rank hands over the same layers in the same
    /// order ([`ShardedAdamW::idle_micro_batch`] where it has no rows). A
    /// failure is kept for [`ShardedAdamW::finish_micro_batch`].
    pub fn take_layer(&mut self, dp: &dyn Collective, layer: usize, grads: Vec<Tensor>) {
        let indices: Vec<usize> = (0..self.layout.params.len()).filter(|&i| self.layout.layers[i] == Some(layer)).collect();
        for (i, g) in indices.into_iter().zip(grads) {
            if g.defined() {
                if self.stream.pending[i].is_none() {
                    self.stream.held += g.numel() as i64;
                }
                let slot = &mut self.stream.pending[i];
                *slot = Some(match slot.take() {
                    Some(sum) => sum + g,
                    None => g,
                });
            }
        }
        self.stream.peak_held = self.stream.peak_held.max(self.stream.held);
        if self.stream.error.is_none()
            && let Err(e) = self.reduce_ready(dp, Some(layer))
        {
            self.stream.error = Some(e);
        }
    }

    /// Reduce-scatters the buckets not yet reduced this micro-batch that are
    /// ready at `layer` (`None`: all of them), in bucket order.
    fn reduce_ready(&mut self, dp: &dyn Collective, layer: Option<usize>) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let device = self.master.device();
        for (k, b) in self.layout.buckets.iter().enumerate() {
            if self.stream.reduced[k] || layer.is_some_and(|l| self.stream.ready_at[k] != Some(l)) {
                continue;
            }
            let pending = &mut self.stream.pending;
            let params = &self.layout.params;
            // What the backward pass handed over, and what reached `.grad`.
            let held = &mut self.stream.held;
            let flat = self.layout.flat(b, |i| {
                let g = params[i].grad();
                let handed = pending[i].take();
                if let Some(h) = &handed {
                    *held -= h.numel() as i64;
                }
                match (handed, g.defined()) {
                    (Some(p), true) => p.to_kind(Kind::Float) + g.to_kind(Kind::Float),
                    (Some(p), false) => p,
                    (None, true) => g,
                    (None, false) => params[i].zeros_like(),
                }
            });
            let share = Tensor::zeros([b.share], (Kind::Float, device));
            dp.reduce_scatter_sum(&flat, &share)?;
            drop(flat);
            let grad = self.stream.grad.get_or_insert_with(|| Tensor::zeros([self.layout.share], (Kind::Float, device)));
            let _ = grad.narrow(0, b.offset, b.share).f_add_(&share)?;
            self.stream.reduced[k] = true;
        }
        Ok(())
    }

    /// Ends a streamed micro-batch: the buckets left (those with parameters
    /// outside the decoder layers, whose gradients are in `.grad`) are
    /// reduce-scattered too, and every gradient is cleared for the next.
    pub fn finish_micro_batch(&mut self, dp: &dyn Collective) -> Result<()> {
        let outcome = match self.stream.error.take() {
            Some(e) => Err(e),
            None => self.reduce_ready(dp, None),
        };
        for p in &mut self.stream.pending {
            *p = None;
        }
        self.stream.held = 0;
        self.stream.reduced.fill(false);
        for p in &self.layout.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
        outcome
    }

    /// A streamed micro-batch of no rows, on a rank that has fewer of them
    /// than another: the same collectives, with zeros.
    pub fn idle_micro_batch(&mut self, dp: &dyn Collective) -> Result<()> {
        for layer in self.stream.ready_layers.clone() {
            self.reduce_ready(dp, Some(layer))?;
        }
        self.finish_micro_batch(dp)
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
        let streamed = self.stream.grad.take();
        let grad = match &streamed {
            Some(g) => g.shallow_clone(),
            None => Tensor::zeros([self.share_len() as i64], (Kind::Float, device)),
        };
        let layout = &self.layout;
        for b in layout.buckets.iter().filter(|_| streamed.is_none()) {
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
