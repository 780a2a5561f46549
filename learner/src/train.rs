//! The learner: advantages, micro-batched forward/backward with gradient
//! accumulation, clipping, AdamW, PPO epochs and mini-batches, SFT, and
//! checkpoints with exact resume.

use crate::advantage::{DropReason, GroupAdvantages, estimate_group, flawed_positives};
use crate::autocast;
use crate::batch::{Batch, Packing, Row};
use crate::checkpoint::{self, CheckpointMeta, Restored};
use crate::collective::{Collective, describe, shard};
use crate::config::Config;
use crate::loss::{LossConfig, Norm, Sums, TokenData, logprobs_and_entropy, policy_loss_of, sft_loss_of, token_logprobs};
use crate::optim::sharded::{Layout, Order, ShardedAdamW, Sharding, Stage};
use crate::optim::{AdamW, AdamWConfig, lr_at};
use crate::policy::{Policy, load_into, named_variables, read_safetensors, write_safetensors};
use crate::sft::TokenPair;
use crate::{Error, Result};
use prism_core::LabeledTrajectory;
use prism_model::{LayerGrads, Tokens};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// What one optimizer update did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UpdateStats {
    /// Optimizer steps taken, this one included.
    pub update: u64,
    /// PPO epoch of this update within its batch (0-based).
    pub epoch: u32,
    /// Learning rate used.
    pub lr: f64,
    /// The aggregated loss.
    pub loss: f64,
    /// Fraction of tokens where the low clip was active (A < 0, r < 1 - clip_low).
    pub clip_frac_low: f64,
    /// Fraction of tokens where the high clip was active (A > 0, r > 1 + clip_high).
    pub clip_frac_high: f64,
    /// Fraction of tokens bounded by the dual clip.
    pub dual_clip_frac: f64,
    /// Token mean of `r - 1 - ln r` (k3 of the base policy vs the current one).
    pub approx_kl: f64,
    /// Token mean of the KL estimate to the reference (0 without one).
    pub kl_ref: f64,
    /// Token mean entropy of the current policy.
    pub entropy: f64,
    pub ratio_mean: f64,
    pub ratio_max: f64,
    /// Token mean truncated importance weight (0 when `is_cap` is off).
    pub is_weight_mean: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: u64,
    pub sequences: u64,
    /// The gradient was not finite and the update was skipped.
    pub skipped: bool,
}

impl UpdateStats {
    fn from_sums(s: &Sums) -> Self {
        let per_token = |x: f64| if s.tokens > 0.0 { x / s.tokens } else { 0.0 };
        Self {
            loss: s.loss,
            clip_frac_low: per_token(s.clip_low),
            clip_frac_high: per_token(s.clip_high),
            dual_clip_frac: per_token(s.dual_clip),
            approx_kl: per_token(s.approx_kl),
            kl_ref: per_token(s.kl_ref),
            entropy: per_token(s.entropy),
            ratio_mean: per_token(s.ratio),
            ratio_max: s.ratio_max,
            is_weight_mean: per_token(s.is_weight),
            tokens: s.tokens as u64,
            sequences: s.sequences as u64,
            ..Self::default()
        }
    }
}

impl UpdateStats {
    /// The statistics by name, as metrics want them.
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        let pairs = [
            ("loss", self.loss),
            ("lr", self.lr),
            ("clip_frac_low", self.clip_frac_low),
            ("clip_frac_high", self.clip_frac_high),
            ("dual_clip_frac", self.dual_clip_frac),
            ("approx_kl", self.approx_kl),
            ("kl_ref", self.kl_ref),
            ("entropy", self.entropy),
            ("ratio_mean", self.ratio_mean),
            ("ratio_max", self.ratio_max),
            ("is_weight_mean", self.is_weight_mean),
            ("grad_norm", self.grad_norm),
            ("tokens", self.tokens as f64),
            ("sequences", self.sequences as f64),
            ("skipped", self.skipped as u8 as f64),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// What one [`Learner::train_step`] did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrainReport {
    /// Groups handed in.
    pub groups: usize,
    /// Groups dropped by dynamic sampling because all outcomes were equal.
    pub groups_dropped_uniform: usize,
    /// Samples shaped as flawed positives (`learner.flawed_positive = "fapo"`).
    pub flawed_positives: usize,
    /// Sequences trained on.
    pub sequences: usize,
    /// One entry per optimizer update (`ppo_epochs * mini_batches` when there
    /// was anything to train on).
    pub updates: Vec<UpdateStats>,
}

impl TrainReport {
    /// One set of statistics for the whole step: token-weighted means over its
    /// updates, the maximum ratio, summed tokens and skips, the last learning
    /// rate, and the group counts.
    pub fn summary(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let tokens: f64 = self.updates.iter().map(|u| u.tokens as f64).sum();
        if tokens > 0.0 {
            let weighted =
                |f: fn(&UpdateStats) -> f64| self.updates.iter().map(|u| f(u) * u.tokens as f64).sum::<f64>() / tokens;
            let n = self.updates.len() as f64;
            out.insert("loss".into(), self.updates.iter().map(|u| u.loss).sum::<f64>() / n);
            out.insert("grad_norm".into(), self.updates.iter().map(|u| u.grad_norm).sum::<f64>() / n);
            out.insert("clip_frac_low".into(), weighted(|u| u.clip_frac_low));
            out.insert("clip_frac_high".into(), weighted(|u| u.clip_frac_high));
            out.insert("dual_clip_frac".into(), weighted(|u| u.dual_clip_frac));
            out.insert("approx_kl".into(), weighted(|u| u.approx_kl));
            out.insert("kl_ref".into(), weighted(|u| u.kl_ref));
            out.insert("entropy".into(), weighted(|u| u.entropy));
            out.insert("ratio_mean".into(), weighted(|u| u.ratio_mean));
            out.insert("is_weight_mean".into(), weighted(|u| u.is_weight_mean));
            out.insert("ratio_max".into(), self.updates.iter().map(|u| u.ratio_max).fold(0.0, f64::max));
            out.insert("lr".into(), self.updates.last().map_or(0.0, |u| u.lr));
            out.insert("skipped_updates".into(), self.updates.iter().filter(|u| u.skipped).count() as f64);
        }
        out.insert("tokens".into(), tokens);
        out.insert("updates".into(), self.updates.len() as f64);
        out.insert("sequences".into(), self.sequences as f64);
        out.insert("groups".into(), self.groups as f64);
        out.insert("groups_dropped_uniform".into(), self.groups_dropped_uniform as f64);
        out.insert("flawed_positives".into(), self.flawed_positives as f64);
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Objective {
    Policy,
    Sft,
}

#[derive(Debug, Serialize, Deserialize)]
struct RngState {
    seed: String,
    stream: u64,
    word_pos: String,
}

/// `state.json` of a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: u32,
    meta: CheckpointMeta,
    learner_config_hash: String,
    optimizer_steps: u64,
    rng: RngState,
    /// The optimizer state is in one file per rank (sharded ranks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shards: Option<ShardLayout>,
}

/// How a sharded checkpoint's optimizer files cut the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ShardLayout {
    world: usize,
    bucket_bytes: usize,
    /// Absent in checkpoints written before the layer order: by name.
    #[serde(default)]
    order: Order,
}

/// Rank `rank`'s optimizer file of a checkpoint written by `world` sharded ranks.
fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-{rank:05}-of-{world:05}.safetensors")
}

const STATE_FORMAT: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Holds the policy and everything needed to train it and to resume exactly.
pub struct Learner<P: Policy> {
    config: Config,
    loss: LossConfig,
    policy: P,
    reference: Option<P>,
    optimizer: AdamW,
    /// All of the learner's randomness (mini-batch shuffling) comes from here;
    /// its state is in every checkpoint.
    rng: ChaCha8Rng,
    /// The other data-parallel ranks, once joined (see [`Learner::join_data_parallel`]).
    dp: Option<Box<dyn Collective>>,
    /// This rank's share of the optimizer, when the ranks shard it (then
    /// `optimizer` holds no moments, only the parameter list and step count).
    sharded: Option<ShardedAdamW>,
}

impl<P: Policy> Learner<P> {
    /// A learner for `policy` with fresh optimizer state. `reference` is the
    /// frozen model of the KL penalty, required when `learner.kl_coef > 0`
    /// unless the policy trains LoRA adapters: then its base (the adapters
    /// switched off) is the reference, and `reference` must be `None`.
    pub fn new(config: Config, policy: P, reference: Option<P>, seed: u64) -> Result<Self> {
        config.validate().map_err(|e| Error::Batch(e.to_string()))?;
        if config.kl_coef > 0.0 && reference.is_none() && !policy.has_adapters() {
            return Err(Error::Model("learner.kl_coef > 0 needs a reference model".into()));
        }
        if reference.is_some() && policy.has_adapters() {
            return Err(Error::Model("a LoRA policy's reference is its own frozen base: pass no reference model".into()));
        }
        if config.lora.is_some() != policy.has_adapters() {
            return Err(Error::Model(if policy.has_adapters() {
                "the policy carries LoRA adapters but learner.lora is not set".into()
            } else {
                "learner.lora is set but the policy carries no adapters (attach them before making the learner)".into()
            }));
        }
        let optimizer = AdamW::new(policy.trainable(), AdamWConfig::from(&config));
        Ok(Self {
            loss: LossConfig::from(&config),
            config,
            policy,
            reference,
            optimizer,
            rng: ChaCha8Rng::seed_from_u64(seed),
            dp: None,
            sharded: None,
        })
    }

    /// Trains from now on as one of `collective`'s data-parallel ranks, which
    /// must all call this at the same point. Rank 0's policy, reference model,
    /// optimizer state and randomness are copied to every rank first (so rank 0
    /// alone may have resumed or warm-started), after checking that every rank
    /// holds the same model. Then each rank takes the same `train_step` calls
    /// with the same groups: every update's rows are shared out among the
    /// ranks, each computes the gradient of its share normalised by the whole
    /// update's totals, and the gradients are summed, so every rank takes the
    /// update one learner would take on all the rows, and the weights stay
    /// equal. Statistics are those of the whole update on every rank.
    ///
    /// With `sharding` (ZeRO stage 1 or 2, see [`ShardedAdamW`]) each rank
    /// keeps the optimizer state of its share of the parameters only: rank 0
    /// hands each rank its share of the state it holds. Such ranks write
    /// checkpoints together: rank 0 calls [`Learner::save_checkpoint`], every
    /// other rank [`Learner::send_checkpoint_shares`] at the same point.
    pub fn join_data_parallel(&mut self, collective: Box<dyn Collective>, sharding: Option<Sharding>) -> Result<()> {
        let (rank, world) = (collective.rank(), collective.world());
        if world == 0 || rank >= world {
            return Err(Error::Collective(format!("data-parallel learner: rank {rank} of {world} ranks")));
        }
        if self.dp.is_some() {
            return Err(Error::Collective(format!("data-parallel learner rank {rank}: it already joined")));
        }
        self.dp = Some(collective);
        self.receive_rank0_state(sharding)?;
        tracing::info!(rank, world, shard = ?sharding.map(|s| s.stage), "learner joined data-parallel training");
        Ok(())
    }

    /// The sharded optimizer of a rank that joined with `dist.shard`.
    pub fn sharded_optimizer(&self) -> Option<&ShardedAdamW> {
        self.sharded.as_ref()
    }

    /// This learner's data-parallel rank and the number of ranks (0 of 1 alone).
    pub fn rank(&self) -> (usize, usize) {
        self.dp.as_ref().map_or((0, 1), |c| (c.rank(), c.world()))
    }

    /// Every rank's policy, reference, optimizer state, step count and RNG
    /// become rank 0's (with `sharding`, each rank's share of its optimizer state).
    fn receive_rank0_state(&mut self, sharding: Option<Sharding>) -> Result<()> {
        let dp = self.dp.as_ref().expect("joined");
        let device = self.policy.var_store().device();
        let mut tensors: Vec<(String, Tensor)> = named_variables(self.policy.var_store());
        if self.policy.has_adapters() {
            tensors.extend(named_variables(self.policy.trainable()));
        }
        if let Some(r) = &self.reference {
            tensors.extend(named_variables(r.var_store()).into_iter().map(|(n, t)| (format!("reference.{n}"), t)));
        }
        if sharding.is_none() {
            self.optimizer.materialize()?;
            tensors.extend(self.optimizer.state_tensors());
        }
        let (count, bytes, signature) = describe(tensors.iter().map(|(n, t)| (n.as_str(), t.size(), t.kind())));
        let seed = self.rng.get_seed();
        let word = |i: usize| i64::from_le_bytes(seed[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        let pos = self.rng.get_word_pos();
        // The ranks must also train alike: the same [learner] settings.
        let settings = checkpoint::config_hash(&self.config);
        let settings = u64::from_str_radix(&settings[..16], 16).unwrap_or_default() as i64;
        let mine = [
            count,
            bytes,
            signature,
            settings,
            self.optimizer.steps() as i64,
            word(0),
            word(1),
            word(2),
            word(3),
            self.rng.get_stream() as i64,
            (pos >> 64) as i64,
            pos as i64,
            i64::from(self.optimizer.has_state()),
            sharding.map_or(0, |s| match s.stage {
                Stage::Optimizer => 1,
                Stage::Gradients => 2,
            }),
            sharding.map_or(0, |s| s.bucket_bytes as i64),
        ];
        let header = Tensor::from_slice(&mine).to_device(device);
        dp.broadcast(std::slice::from_ref(&header), 0)?;
        let h = Vec::<i64>::try_from(header.to_device(tch::Device::Cpu))?;
        if h[..3] != mine[..3] {
            return Err(Error::Collective(format!(
                "data-parallel learner rank {} holds {count} tensors ({bytes} bytes) of policy, reference and optimizer state; rank 0 holds {} ({} bytes){}: \
                 every learner rank must load the same model with the same [learner] settings",
                dp.rank(),
                h[0],
                h[1],
                if h[..2] == mine[..2] { " with other names, shapes or dtypes" } else { "" }
            )));
        }
        if h[3] != mine[3] {
            return Err(Error::Collective(format!(
                "data-parallel learner rank {}: its [learner] settings differ from rank 0's: every rank must run the same config",
                dp.rank()
            )));
        }
        if h[13..] != mine[13..] {
            return Err(Error::Collective(format!(
                "data-parallel learner rank {}: its sharding ({sharding:?}) differs from rank 0's: every rank must run the same dist.shard \
                 and dist.nccl_bucket_mb",
                dp.rank()
            )));
        }
        let values: Vec<Tensor> = tensors.into_iter().map(|(_, t)| t).collect();
        {
            let _guard = tch::no_grad_guard();
            dp.broadcast(&values, 0)?;
        }
        self.optimizer.set_steps(h[4] as u64);
        let mut seed = [0u8; 32];
        for i in 0..4 {
            seed[8 * i..8 * i + 8].copy_from_slice(&h[5 + i].to_le_bytes());
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(h[9] as u64);
        rng.set_word_pos(((h[10] as u64 as u128) << 64) | h[11] as u64 as u128);
        self.rng = rng;
        if let Some(sharding) = sharding {
            let steps = h[4] as u64;
            let (rank, world) = (dp.rank(), dp.world());
            let mut opt = ShardedAdamW::new(self.policy.trainable(), AdamWConfig::from(&self.config), sharding.stage, rank, world, sharding.bucket_bytes)?;
            opt.set_steps(steps);
            if h[12] != 0 {
                // Rank 0 hands each rank its share of the state it holds, one
                // rank at a time: the moments, and the master weights of a
                // model narrower than float32 (its values are them rounded).
                let masters = opt.has_masters();
                let whole = (rank == 0).then(|| (self.optimizer.moments(), self.optimizer.masters()));
                let _guard = tch::no_grad_guard();
                for r in 0..world {
                    let mut state: Vec<Tensor> = match &whole {
                        Some(((avg, sq), master)) => {
                            let layout = opt.layout();
                            let mut state = vec![layout.share_of(avg, r), layout.share_of(sq, r)];
                            if masters {
                                state.push(layout.share_of(master, r));
                            }
                            state
                        }
                        None => (0..2 + usize::from(masters)).map(|_| Tensor::zeros([opt.share_len() as i64], (Kind::Float, device))).collect(),
                    };
                    dp.broadcast(&state, 0)?;
                    if r == rank {
                        let master = masters.then(|| state.pop().expect("three"));
                        opt.set_state(&state[0], &state[1], master.as_ref(), steps)?;
                    }
                }
            }
            self.optimizer.release_state();
            self.sharded = Some(opt);
        }
        Ok(())
    }

    /// Sums the gradients (unless the optimizer is sharded: it sums them
    /// itself) and the update's statistics over the ranks.
    fn all_reduce_gradients(&self, sums: &mut Sums) -> Result<()> {
        let Some(dp) = &self.dp else { return Ok(()) };
        if self.sharded.is_none() {
            self.all_reduce_grads(dp.as_ref())?;
        }
        // The sums add up; ratio_max is gathered (one slot per rank) and maxed.
        let (rank, world) = (dp.rank(), dp.world());
        let fields = Sums::ADDITIVE;
        let mut slots = sums.additive().to_vec();
        slots.resize(fields + world, 0.0);
        slots[fields + rank] = sums.ratio_max;
        let device = self.policy.var_store().device();
        let t = Tensor::from_slice(&slots).to_device(device);
        dp.all_reduce_sum(std::slice::from_ref(&t))?;
        let v = Vec::<f64>::try_from(t.to_device(tch::Device::Cpu))?;
        *sums = Sums::from_additive(&v, v[fields..].iter().copied().fold(0.0, f64::max));
        Ok(())
    }

    fn all_reduce_grads(&self, dp: &dyn Collective) -> Result<()> {
        let params = self.optimizer.parameters();
        let missing: Vec<&Tensor> = params.iter().copied().filter(|p| !p.grad().defined()).collect();
        if !missing.is_empty() {
            // A rank whose share of the update was empty has no gradients yet:
            // it contributes zeros.
            let zero = missing.iter().map(|p| p.sum(Kind::Float) * 0.0).reduce(|a, b| a + b).expect("not empty");
            zero.f_backward()?;
        }
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        dp.all_reduce_sum(&grads)?;
        Ok(())
    }

    /// The policy being trained.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Gives the policy back (e.g. after a supervised warm start).
    pub fn into_policy(self) -> P {
        self.policy
    }

    /// The policy, mutably (e.g. to load weights into it).
    pub fn policy_mut(&mut self) -> &mut P {
        &mut self.policy
    }

    /// Whether `group` would be trained on: `Err` with the reason when dynamic
    /// sampling (`learner.drop_uniform_groups`) would drop it (every advantage
    /// zero). A group the estimator cannot take (a malformed label) is
    /// admitted here and reported by [`Learner::train_step`].
    pub fn admit(&self, group: &[LabeledTrajectory]) -> std::result::Result<(), DropReason> {
        for lt in group {
            if let Err(reason) = self.check_input(lt) {
                tracing::warn!(trajectory_id = lt.trajectory.id.0, group = lt.trajectory.group.0, %reason, "dropping a group the learner cannot train on");
                return Err(DropReason::Invalid);
            }
        }
        if !self.config.drop_uniform_groups {
            return Ok(());
        }
        match estimate_group(group, &self.config) {
            Ok(GroupAdvantages::Dropped(reason)) => Err(reason),
            _ => Ok(()),
        }
    }

    /// Why the learner cannot train on `lt`, if it cannot: lengths that
    /// disagree, values that are not finite, token ids past the vocabulary,
    /// more tokens than the model's positions.
    fn check_input(&self, lt: &LabeledTrajectory) -> std::result::Result<(), String> {
        crate::advantage::check_trajectory(lt).map_err(|e| e.to_string())?;
        let t = &lt.trajectory;
        if t.prompt_tokens.is_empty() && !t.tokens.is_empty() {
            return Err("no prompt tokens".into());
        }
        if let Some(l) = t.logprobs.iter().find(|l| !l.is_finite()) {
            return Err(format!("behaviour logprob {l} is not finite"));
        }
        if let Some((vocab, positions)) = self.policy.limits() {
            if let Some(id) = t.prompt_tokens.iter().chain(&t.tokens).find(|id| **id as usize >= vocab) {
                return Err(format!("token id {id} is past the model's vocabulary of {vocab}"));
            }
            let len = t.prompt_tokens.len() + t.tokens.len();
            if len > positions {
                return Err(format!("{len} tokens are more than the model's {positions} positions"));
            }
        }
        Ok(())
    }

    /// Optimizer updates taken so far (what the schedule counts).
    pub fn updates(&self) -> u64 {
        self.optimizer.steps()
    }

    /// Trains on labeled groups: advantages per group, then `ppo_epochs` passes,
    /// each shuffled (when `mini_batches > 1`) and split into `mini_batches`
    /// optimizer updates.
    pub fn train_step(&mut self, groups: &[Vec<LabeledTrajectory>]) -> Result<TrainReport> {
        let mut report = TrainReport { groups: groups.len(), ..TrainReport::default() };
        let mut rows = Vec::new();
        for group in groups {
            report.flawed_positives += flawed_positives(group, &self.config).iter().filter(|&&f| f).count();
            match estimate_group(group, &self.config)? {
                GroupAdvantages::Dropped(_) => report.groups_dropped_uniform += 1,
                GroupAdvantages::Kept(advantages) => {
                    for (lt, advantages) in group.iter().zip(advantages) {
                        let t = &lt.trajectory;
                        if t.tokens.is_empty() {
                            continue;
                        }
                        if t.prompt_tokens.is_empty() {
                            return Err(Error::Trajectory { trajectory: t.id.0, reason: "no prompt tokens".into() });
                        }
                        rows.push(Row {
                            prompt: t.prompt_tokens.clone(),
                            completion: t.tokens.clone(),
                            old_logprobs: t.logprobs.clone(),
                            advantages,
                            prox_logprobs: None,
                            ref_logprobs: None,
                        });
                    }
                }
            }
        }
        if report.groups_dropped_uniform > 0 {
            tracing::debug!(
                dropped = report.groups_dropped_uniform,
                groups = report.groups,
                "dynamic sampling dropped groups whose advantages are all zero"
            );
        }
        report.sequences = rows.len();
        if rows.is_empty() {
            return Ok(report);
        }
        if self.config.is_cap > 0.0 {
            let prox = self.score(&self.policy, &rows)?;
            for (row, lp) in rows.iter_mut().zip(prox) {
                row.prox_logprobs = Some(lp);
            }
        }
        if self.config.kl_coef > 0.0 {
            let lps = match &self.reference {
                Some(reference) => self.score(reference, &rows),
                None if self.policy.has_adapters() => {
                    // The frozen base is the reference: the adapters off.
                    self.policy.set_adapters_enabled(false);
                    let lps = self.score(&self.policy, &rows);
                    self.policy.set_adapters_enabled(true);
                    lps
                }
                None => Err(Error::Model("no reference model".into())),
            }?;
            for (row, lp) in rows.iter_mut().zip(lps) {
                row.ref_logprobs = Some(lp);
            }
        }
        let n = rows.len();
        let parts = (self.config.mini_batches as usize).min(n);
        for epoch in 0..self.config.ppo_epochs {
            let mut order: Vec<usize> = (0..n).collect();
            if parts > 1 {
                order.shuffle(&mut self.rng);
            }
            for k in 0..parts {
                let chunk = &order[k * n / parts..(k + 1) * n / parts];
                let mut stats = self.update(&rows, chunk, Objective::Policy)?;
                stats.epoch = epoch;
                report.updates.push(stats);
            }
        }
        Ok(report)
    }

    /// One SFT update on `pairs`: cross-entropy of the completion tokens,
    /// averaged over all of them, micro-batched like RL.
    pub fn sft_step(&mut self, pairs: &[TokenPair]) -> Result<UpdateStats> {
        let rows: Vec<Row> = pairs
            .iter()
            .filter(|p| !p.completion.is_empty())
            .map(|p| Row { prompt: p.prompt.clone(), completion: p.completion.clone(), ..Row::default() })
            .collect();
        if rows.is_empty() {
            return Err(Error::Batch("no SFT pair has completion tokens".into()));
        }
        let order: Vec<usize> = (0..rows.len()).collect();
        self.update(&rows, &order, Objective::Sft)
    }

    /// Log-probs of each row's completion under `model`, without gradients.
    fn score(&self, model: &P, rows: &[Row]) -> Result<Vec<Vec<f32>>> {
        let device = model.var_store().device();
        let (rank, world) = self.rank();
        let mine = shard(rows.len(), rank, world);
        let mut out = Vec::with_capacity(rows.len());
        let _guard = tch::no_grad_guard();
        let pack = self.config.pack && model.packs();
        for chunk in rows[mine.clone()].chunks(self.config.micro_batch_size as usize) {
            let refs: Vec<&Row> = chunk.iter().collect();
            let batch = Batch::new(&refs, device)?;
            let packing = if pack { Some(Packing::of(&refs, &batch, device, self.config.share_prompts && one_prompt(&refs))?) } else { None };
            let logp = autocast::bf16(self.config.bf16, self.config.bf16_cpu, device, || -> Result<Tensor> {
                if let Some(p) = &packing {
                    let logits = model.head(&model.hidden(p.tokens())?)?;
                    return Ok(p.spread(&token_logprobs(&logits, &p.targets, self.config.temperature).0));
                }
                let window = model.forward_window(&batch.input_ids, None, batch.offset, batch.window())?;
                Ok(token_logprobs(&window, &batch.targets, self.config.temperature).0)
            })?;
            out.extend(batch.unpad(&logp)?);
        }
        let Some(dp) = &self.dp else { return Ok(out) };
        // Every rank needs every row's: each fills its share of one flat
        // buffer, zeros elsewhere, and the sum over ranks is all of them.
        let lengths: Vec<usize> = rows.iter().map(|r| r.completion.len()).collect();
        let start: usize = lengths[..mine.start].iter().sum();
        let mut flat = vec![0f32; lengths.iter().sum()];
        let mut at = start;
        for lp in &out {
            flat[at..at + lp.len()].copy_from_slice(lp);
            at += lp.len();
        }
        let t = Tensor::from_slice(&flat).to_device(device);
        dp.all_reduce_sum(std::slice::from_ref(&t))?;
        let flat = Vec::<f32>::try_from(t.to_device(tch::Device::Cpu))?;
        let mut at = 0;
        Ok(lengths
            .iter()
            .map(|&n| {
                at += n;
                flat[at - n..at].to_vec()
            })
            .collect())
    }

    /// One optimizer update on `rows[indices]`, accumulating gradients over
    /// micro-batches; every micro-batch's loss is normalised by the totals of
    /// the whole update so the sum of their gradients is the full gradient.
    fn update(&mut self, rows: &[Row], indices: &[usize], objective: Objective) -> Result<UpdateStats> {
        let device = self.policy.var_store().device();
        let norm = Norm {
            tokens: indices.iter().map(|&i| rows[i].completion.len() as f64).sum(),
            sequences: indices.len() as f64,
        };
        self.optimizer.zero_grad();
        let mut sums = Sums::default();
        let (rank, world) = self.rank();
        let pack = self.config.pack && self.policy.packs();
        // Packed, a shared prompt is one more packing (recomputed layers too);
        // padded, its own pass (without them).
        let share = self.config.share_prompts && (pack || !self.config.checkpoint_activations);
        // Rank `r`'s micro-batches: with shared prompts, the rows of one prompt together.
        let micro_batches = |r: usize| -> Vec<Vec<usize>> {
            let mine = &indices[shard(indices.len(), r, world)];
            let runs = if share { by_prompt(rows, mine) } else { vec![mine.to_vec()] };
            runs.iter().flat_map(|run| run.chunks(self.config.micro_batch_size as usize).map(<[usize]>::to_vec)).collect()
        };
        let mine = micro_batches(rank);
        // ZeRO-2 with recomputed layers: each micro-batch's gradients are
        // reduce-scattered layer by layer as the backward pass makes them, so
        // every rank runs as many micro-batches as the rank with the most.
        let stream = self.config.checkpoint_activations && self.policy.hands_over_layer_grads() && self.sharded.as_ref().is_some_and(ShardedAdamW::streams);
        let rounds = if stream { (0..world).map(|r| micro_batches(r).len()).max().unwrap_or(0) } else { mine.len() };
        for round in 0..rounds {
            let Some(micro) = mine.get(round) else {
                if let (Some(opt), Some(dp)) = (&mut self.sharded, &self.dp) {
                    opt.idle_micro_batch(dp.as_ref())?;
                }
                continue;
            };
            let refs: Vec<&Row> = micro.iter().map(|&i| &rows[i]).collect();
            let batch = Batch::new(&refs, device)?;
            let shared = share && one_prompt(&refs);
            // Without padding, the model reads the rows end to end and the
            // head runs at their completion positions, `[1, M]`; the loss
            // reads those in the batch's `[B, S]` layout.
            let packing = if pack { Some(Packing::of(&refs, &batch, device, shared)?) } else { None };
            let head_targets = packing.as_ref().map_or(&batch.targets, |p| &p.targets);
            let tokens = match &packing {
                Some(p) => p.tokens(),
                None => Tokens::Rows { ids: &batch.input_ids, mask: None, window: (batch.offset, batch.window()) },
            };
            // The loss from the targets' log-probs and the positions' entropies.
            let loss_from = |logp: &Tensor, ent: &Tensor| -> Result<(Tensor, Sums)> {
                let (logp, ent) = match &packing {
                    Some(p) => (p.spread(logp), p.spread(ent)),
                    None => (logp.shallow_clone(), ent.shallow_clone()),
                };
                let (logp, ent) = (&logp, &ent);
                match objective {
                    Objective::Policy => {
                        let data = TokenData {
                            targets: &batch.targets,
                            mask: &batch.mask,
                            old_logprobs: &batch.old_logprobs,
                            advantages: &batch.advantages,
                            prox_logprobs: batch.prox_logprobs.as_ref(),
                            ref_logprobs: batch.ref_logprobs.as_ref(),
                        };
                        policy_loss_of(logp, ent, &data, &self.loss, norm)
                    }
                    Objective::Sft => sft_loss_of(logp, ent, &batch.mask, norm),
                }
            };
            let temperature = if objective == Objective::Sft { 1.0 } else { self.loss.temperature };
            let entropy_grad = objective == Objective::Policy && self.loss.entropy_coef > 0.0;
            let chunk = i64::from(self.config.logit_chunk);
            let policy = &self.policy;
            // Forward computations run in the autocast span, backward passes outside it.
            let (bf16, bf16_cpu) = (self.config.bf16, self.config.bf16_cpu);
            let scope = |f: &mut dyn FnMut()| autocast::bf16(bf16, bf16_cpu, device, f);
            // The loss of the window's hidden states (the completion tokens
            // only): a chunk of positions at a time with `learner.logit_chunk`
            // (then a surrogate to backpropagate), else all at once.
            let loss_of = |hidden: &Tensor| -> Result<(Tensor, Sums)> {
                if chunk > 0 {
                    return crate::chunked::loss(hidden, &|h| policy.head(h), &scope, head_targets, temperature, chunk, entropy_grad, &mut |l, e| loss_from(l, e));
                }
                let mut out = None;
                scope(&mut || {
                    out = Some(policy.head(hidden).and_then(|logits| {
                        let (logp, ent) = logprobs_and_entropy(&logits, head_targets, temperature, entropy_grad);
                        loss_from(&logp, &ent)
                    }))
                });
                out.ok_or_else(|| Error::Model("the scope did not run the loss".into()))?
            };
            let s = if self.config.checkpoint_activations {
                let mut sums = None;
                let mut sink = match (stream, &mut self.sharded, &self.dp) {
                    (true, Some(opt), Some(dp)) => Some(Streamer { opt, dp: dp.as_ref() }),
                    _ => None,
                };
                let _loss = self.policy.forward_backward_checkpointed(
                    tokens,
                    &scope,
                    &mut |hidden| {
                        let (loss, s) = loss_of(hidden)?;
                        sums = Some(s);
                        Ok(loss)
                    },
                    sink.as_mut().map(|s| s as &mut dyn LayerGrads),
                )?;
                if let Some(Streamer { opt, dp }) = sink {
                    opt.finish_micro_batch(dp)?;
                }
                sums.ok_or_else(|| Error::Model("the checkpointed pass computed no loss".into()))?
            } else {
                let hidden = autocast::bf16(bf16, bf16_cpu, device, || {
                    // The rows share their prompt: it is the first row's first P tokens.
                    let p = refs[0].prompt.len() as i64;
                    let once = match shared && packing.is_none() {
                        true => self.policy.hidden_shared_prompt(&batch.input_ids.narrow(0, 0, 1).narrow(1, 0, p), &batch.input_ids.narrow(1, p, batch.window()))?,
                        false => None,
                    };
                    match once {
                        Some(hidden) => Ok(hidden),
                        None => self.policy.hidden(tokens),
                    }
                })?;
                let (loss, s) = loss_of(&hidden)?;
                loss.f_backward()?;
                s
            };
            sums.add(&s);
        }
        self.all_reduce_gradients(&mut sums)?;
        let lr = lr_at(&self.config, self.optimizer.steps());
        let mut stats = UpdateStats::from_sums(&sums);
        let (grad_norm, ran) = match (&mut self.sharded, &self.dp) {
            (Some(opt), Some(dp)) => {
                let (norm, ran) = opt.step(dp.as_ref(), lr, self.config.grad_clip)?;
                self.optimizer.set_steps(opt.steps());
                (norm, ran)
            }
            _ => {
                let grad_norm = if self.config.grad_clip > 0.0 {
                    self.optimizer.clip_grad_norm(self.config.grad_clip)?
                } else {
                    self.optimizer.grad_norm()?
                };
                if grad_norm.is_finite() {
                    self.optimizer.step(lr)?;
                }
                (grad_norm, grad_norm.is_finite())
            }
        };
        if !ran {
            tracing::warn!(grad_norm, update = self.optimizer.steps() + 1, "non-finite gradient: update skipped");
            stats.skipped = true;
        }
        self.optimizer.zero_grad();
        stats.update = self.optimizer.steps();
        stats.lr = lr;
        stats.grad_norm = grad_norm;
        Ok(stats)
    }

    /// Writes a checkpoint of the policy, optimizer, schedule position and RNG,
    /// with the caller's `meta`, into `dir/step-<meta.step>`; keeps the newest
    /// `learner.keep_checkpoints`. Returns its folder.
    pub fn save_checkpoint(&self, dir: &Path, meta: &CheckpointMeta) -> Result<PathBuf> {
        self.save_checkpoint_with(dir, meta, &|_| Ok(()))
    }

    /// [`Learner::save_checkpoint`], with `extra` writing more files into the
    /// checkpoint folder before it is sealed (the state of reward models
    /// trained beside the policy): they are in the manifest and checked on
    /// resume like the rest.
    pub fn save_checkpoint_with(
        &self,
        dir: &Path,
        meta: &CheckpointMeta,
        extra: &dyn Fn(&Path) -> std::result::Result<(), String>,
    ) -> Result<PathBuf> {
        if let Some(opt) = &self.sharded {
            let (rank, _) = opt.rank();
            if rank != 0 {
                return Err(Error::Collective(format!(
                    "sharded learner rank {rank}: rank 0 writes the checkpoint; the other ranks call send_checkpoint_shares"
                )));
            }
        }
        let state = State {
            format: STATE_FORMAT,
            meta: meta.clone(),
            learner_config_hash: checkpoint::config_hash(&self.config),
            optimizer_steps: self.optimizer.steps(),
            rng: RngState {
                seed: self.rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
                stream: self.rng.get_stream(),
                word_pos: self.rng.get_word_pos().to_string(),
            },
            shards: self.sharded.as_ref().map(|opt| ShardLayout { world: opt.rank().1, bucket_bytes: self.bucket_bytes(), order: opt.layout().order() }),
        };
        let keep = self.config.keep_checkpoints as usize;
        checkpoint::write_atomic(dir, meta.step, keep, |tmp| {
            // The shares first: the other ranks are waiting to send them.
            if self.sharded.is_some() {
                self.exchange_shares(Some(tmp))?;
            }
            self.policy.save_hf(tmp)?;
            if !tmp.join(MODEL_FILE).is_file() {
                return Err(Error::Checkpoint {
                    path: tmp.to_path_buf(),
                    reason: format!("the model wrote no {MODEL_FILE}"),
                });
            }
            if self.sharded.is_none() {
                write_safetensors(&self.optimizer.state_tensors(), &tmp.join(OPTIMIZER_FILE))?;
            }
            let json = serde_json::to_vec_pretty(&state)
                .map_err(|e| Error::Checkpoint { path: tmp.join(STATE_FILE), reason: e.to_string() })?;
            std::fs::write(tmp.join(STATE_FILE), json).map_err(|e| Error::io(tmp.join(STATE_FILE), e))?;
            extra(tmp).map_err(|reason| Error::Checkpoint { path: tmp.to_path_buf(), reason })
        })
    }

    /// A sharded rank other than 0: sends rank 0 its optimizer shares for the
    /// checkpoint rank 0 is writing ([`Learner::save_checkpoint`], called at
    /// the same point).
    pub fn send_checkpoint_shares(&self) -> Result<()> {
        match &self.sharded {
            Some(opt) if opt.rank().0 != 0 => self.exchange_shares(None),
            Some(_) => Err(Error::Collective("sharded learner rank 0 writes the checkpoint (save_checkpoint)".into())),
            None => Err(Error::Collective("this learner's optimizer is not sharded: rank 0 holds all of it".into())),
        }
    }

    /// The bucket size of the sharded optimizer (0 when not sharded).
    fn bucket_bytes(&self) -> usize {
        self.sharded.as_ref().map_or(0, |opt| opt.layout().bucket_bytes())
    }

    /// Every rank's shares of the moments reach rank 0, one rank at a time
    /// (so no rank holds more than one share beside its own); rank 0 writes
    /// each into `dir` as it arrives. A write that fails does not stop the
    /// exchange (the other ranks would wait for it): its error is returned after.
    fn exchange_shares(&self, dir: Option<&Path>) -> Result<()> {
        let (Some(opt), Some(dp)) = (&self.sharded, &self.dp) else { return Ok(()) };
        let (rank, world) = opt.rank();
        let _guard = tch::no_grad_guard();
        let mut failed = None;
        let [avg, sq] = opt.moments();
        let mut mine = vec![("exp_avg", avg), ("exp_avg_sq", sq)];
        if opt.has_masters() {
            mine.push(("master", opt.master()));
        }
        for r in 0..world {
            let state: Vec<Tensor> = mine.iter().map(|(_, t)| if r == rank { t.shallow_clone() } else { t.zeros_like() }).collect();
            dp.broadcast(&state, r)?;
            if let (Some(dir), None) = (dir, &failed) {
                let tensors: Vec<(String, Tensor)> = mine.iter().zip(&state).map(|((name, _), t)| (name.to_string(), t.to_device(tch::Device::Cpu))).collect();
                failed = write_safetensors(&tensors, &dir.join(shard_file(r, world))).err();
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// The whole optimizer moments (and master weights, for a model
    /// narrower than float32) of a checkpoint written by `layout`'s sharded
    /// ranks, put back together from its per-rank files.
    fn consolidate(&self, path: &Path, layout: ShardLayout) -> Result<(Vec<Tensor>, Vec<Tensor>, Option<Vec<Tensor>>)> {
        let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
        if layout.world == 0 {
            return Err(bad(format!("{STATE_FILE}: shards of a world of 0 ranks")));
        }
        // How the ranks that wrote it shared the parameters out.
        let writer = Layout::new(self.policy.trainable(), layout.world, layout.bucket_bytes, layout.order)?;
        let masters = self.optimizer.has_masters();
        let (mut avg, mut sq, mut master) = (Vec::with_capacity(layout.world), Vec::with_capacity(layout.world), Vec::new());
        for r in 0..layout.world {
            let file = path.join(shard_file(r, layout.world));
            let mut t = read_safetensors(&file)?;
            let mut slots = vec![("exp_avg", &mut avg), ("exp_avg_sq", &mut sq)];
            if masters {
                slots.push(("master", &mut master));
            }
            for (name, into) in slots {
                let share = t.remove(name).ok_or_else(|| {
                    let why = if name == "master" { " (the model is narrower than float32, so it needs the master weights: was it written by a float32 model?)" } else { "" };
                    bad(format!("{}: no tensor {name}{why}", file.display()))
                })?;
                if share.size() != [writer.share_len() as i64] {
                    return Err(bad(format!(
                        "{}: {name} has shape {:?}, expected [{}] (the share of {} ranks in buckets of {} bytes)",
                        file.display(),
                        share.size(),
                        writer.share_len(),
                        layout.world,
                        layout.bucket_bytes
                    )));
                }
                into.push(share.to_kind(Kind::Float));
            }
        }
        let master = if masters { Some(writer.whole_of(&master)?) } else { None };
        Ok((writer.whole_of(&avg)?, writer.whole_of(&sq)?, master))
    }

    /// Restores the newest intact checkpoint in `dir`; damaged newer ones are
    /// skipped and listed in [`Restored::rejected`]. `Ok(None)` when `dir` holds
    /// no checkpoint at all; an error when it holds only damaged ones.
    pub fn resume(&mut self, dir: &Path) -> Result<Option<Restored>> {
        if self.dp.is_some() {
            return Err(Error::Collective("a data-parallel rank resumes before it joins (rank 0 then hands the others its state)".into()));
        }
        let (found, rejected) = checkpoint::latest_intact(dir)?;
        let Some(found) = found else {
            return if rejected.is_empty() {
                Ok(None)
            } else {
                Err(Error::NoCheckpoint { dir: dir.to_path_buf(), rejected })
            };
        };
        let path = found.path;
        let bad = |reason: String| Error::Checkpoint { path: path.clone(), reason };
        let text = std::fs::read(path.join(STATE_FILE)).map_err(|e| Error::io(path.join(STATE_FILE), e))?;
        let state: State = serde_json::from_slice(&text).map_err(|e| bad(format!("{STATE_FILE}: {e}")))?;
        if state.format != STATE_FORMAT {
            return Err(bad(format!("{STATE_FILE}: format {} (this build reads {STATE_FORMAT})", state.format)));
        }
        let learner_hash = checkpoint::config_hash(&self.config);
        if state.learner_config_hash != learner_hash {
            tracing::warn!(checkpoint = %path.display(), "the [learner] configuration differs from the checkpoint's");
        }
        let model_path = path.join(MODEL_FILE);
        load_into(self.policy.var_store(), read_safetensors(&model_path)?, &model_path)?;
        if self.policy.has_adapters() {
            let adapter_path = path.join(prism_model::lora::ADAPTER_WEIGHTS);
            if !adapter_path.is_file() {
                return Err(bad(format!(
                    "{}: no LoRA adapter, but learner.lora is set (was it written by a run that trained the whole model?)",
                    prism_model::lora::ADAPTER_WEIGHTS
                )));
            }
            load_into(self.policy.trainable(), read_safetensors(&adapter_path)?, &adapter_path)?;
        }
        match state.shards {
            // Written by sharded ranks: put back together whole, whatever
            // the number of ranks resuming (rank 0 shares it out on joining).
            Some(layout) => {
                let (avg, sq, master) = self.consolidate(&path, layout)?;
                self.optimizer.set_moments(avg, sq, master, state.optimizer_steps);
            }
            None => {
                let optimizer_path = path.join(OPTIMIZER_FILE);
                self.optimizer.load_state(read_safetensors(&optimizer_path)?, state.optimizer_steps, &optimizer_path)?;
            }
        }
        let seed = parse_seed(&state.rng.seed)
            .ok_or_else(|| bad(format!("{STATE_FILE}: bad rng seed {:?}", state.rng.seed)))?;
        let word_pos: u128 = state
            .rng
            .word_pos
            .parse()
            .map_err(|_| bad(format!("{STATE_FILE}: bad rng word_pos {:?}", state.rng.word_pos)))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(state.rng.stream);
        rng.set_word_pos(word_pos);
        self.rng = rng;
        tracing::info!(checkpoint = %path.display(), step = state.meta.step, "resumed");
        Ok(Some(Restored { path, meta: state.meta, rejected }))
    }
}

/// Whether `rows` are more than one, all with one prompt.
fn one_prompt(rows: &[&Row]) -> bool {
    rows.len() > 1 && rows.iter().all(|r| r.prompt == rows[0].prompt)
}

/// ZeRO-2's gradients streamed out of the recomputing backward pass: each
/// decoder layer's, reduce-scattered into this rank's share as it is made.
struct Streamer<'a> {
    opt: &'a mut ShardedAdamW,
    dp: &'a dyn Collective,
}

impl LayerGrads for Streamer<'_> {
    fn params(&self, layer: usize) -> Vec<Tensor> {
        self.opt.layout().layer_params(layer)
    }

    fn take(&mut self, layer: usize, grads: Vec<Tensor>) {
        self.opt.take_layer(self.dp, layer, grads);
    }
}

/// `indices` in runs of rows with the same prompt, each run in the order its
/// rows come, the runs in the order of their first row.
fn by_prompt(rows: &[Row], indices: &[usize]) -> Vec<Vec<usize>> {
    let mut runs: Vec<Vec<usize>> = Vec::new();
    let mut run_of: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    for &i in indices {
        let r = *run_of.entry(rows[i].prompt.as_slice()).or_insert_with(|| {
            runs.push(Vec::new());
            runs.len() - 1
        });
        runs[r].push(i);
    }
    runs
}

fn parse_seed(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut seed = [0u8; 32];
    for (i, b) in seed.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(seed)
}
