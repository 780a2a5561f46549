//! ONI-style online distillation of the judge into a small reward model
//! (after "Online Intrinsic Rewards" — Zheng et al. 2025 — which labels a
//! budgeted share of the data with an LLM and distils it online into a cheap
//! model that labels the rest).
//!
//! The model is a hashed n-gram MLP over the step text in context: the byte
//! n-grams (`1..=ngram_max`) of the step, and those of the last
//! `context_bytes` of the text before it in their own namespace, are hashed
//! into `buckets` embedding rows; their mean (scaled by 1/sqrt(count)) goes
//! through one ReLU layer to a logit. It is trained with binary cross-entropy
//! against the judge's P(yes) on every judged step, except a `holdout` share
//! kept aside to measure how often it agrees with the judge.
//!
//! Distilled scores are used only once the model has learned from `min_labels`
//! judged steps *and* agrees with the judge on at least `min_agreement` of the
//! held-out ones ([`Distiller::usable`]): a label count alone says nothing about
//! whether the model imitates the judge.
//!
//! The annotation budget ([`Budget`]) decides which groups the judge sees: a
//! fraction of them (by group id, so a group's trajectories are judged all or
//! none), and at most so many judge calls per second.

use crate::{Error, Result};
use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// `[distill]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Train the distilled model on the judge's labels. Default false.
    pub enabled: bool,
    /// Share of groups sent to the judge (chosen by a hash of the group id, so
    /// that every trajectory of a group gets its step scores from the same
    /// source); the rest get the fallback. Default 1.0.
    pub judge_fraction: f64,
    /// Most judge calls per second (token bucket, one second of burst); 0 =
    /// unlimited. Default 0.
    pub judge_calls_per_sec: f64,
    /// Hashed n-gram embedding rows. Default 65536.
    pub buckets: u32,
    /// Longest byte n-gram. Default 5.
    pub ngram_max: u32,
    /// Bytes of preceding text used as context. Default 64.
    pub context_bytes: u32,
    /// Embedding width. Default 64.
    pub dim: u32,
    /// Hidden layer width. Default 64.
    pub hidden: u32,
    /// Adam learning rate of the MLP. Default 0.003.
    pub lr: f64,
    /// Adagrad learning rate of the embedding rows (updated sparsely: only the
    /// rows a batch touches). Default 0.1.
    pub embed_lr: f64,
    /// Examples per optimizer step. Default 64.
    pub batch_size: u32,
    /// New training labels between training rounds. Default 16.
    pub train_every: u32,
    /// Optimizer steps per training round. Default 4.
    pub updates: u32,
    /// Most recent training labels kept for replay. Default 20000.
    pub buffer: u32,
    /// Share of judged steps held out to measure agreement. Default 0.1.
    pub holdout: f64,
    /// Training labels needed before distilled scores are used. Default 256.
    pub min_labels: u32,
    /// Agreement with the judge on held-out judged steps (correct vs wrong)
    /// needed before distilled scores are used. Default 0.75.
    pub min_agreement: f64,
    /// Held-out judged steps needed before the agreement counts. Default 32.
    pub min_held_out: u32,
    /// Consensus filtering (after Zhang et al. 2025, "The Lessons of
    /// Developing Process Reward Models in Mathematical Reasoning", arXiv
    /// 2501.07301, which keeps a step label only when two sources agree): a
    /// judged step is learned from only when the judge's verdict (P(yes) at
    /// least 0.5) agrees with an independent one where there is one: the step
    /// verifier's, or the outcome verifier's for the last step. Steps with no
    /// independent verdict are learned from as before. The keep rate is in
    /// the metrics. Default false.
    pub consensus: bool,
    /// `cpu` or `cuda`. Default `cpu`.
    pub device: String,
    /// Seed of the initial weights and the replay sampling. Default 0.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: false,
            judge_fraction: 1.0,
            judge_calls_per_sec: 0.0,
            buckets: 65_536,
            ngram_max: 5,
            context_bytes: 64,
            dim: 64,
            hidden: 64,
            lr: 3e-3,
            embed_lr: 0.1,
            batch_size: 64,
            train_every: 16,
            updates: 4,
            buffer: 20_000,
            holdout: 0.1,
            min_labels: 256,
            min_agreement: 0.75,
            min_held_out: 32,
            consensus: false,
            device: "cpu".into(),
            seed: 0,
        }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        check::in_range("distill.judge_fraction", self.judge_fraction, 0.0, 1.0)?;
        if !(self.judge_calls_per_sec >= 0.0 && self.judge_calls_per_sec.is_finite()) {
            return Err(Invalid::new("distill.judge_calls_per_sec", self.judge_calls_per_sec, "must be >= 0"));
        }
        check::positive("distill.buckets", self.buckets)?;
        check::in_range("distill.ngram_max", self.ngram_max, 1, 16)?;
        check::positive("distill.dim", self.dim)?;
        check::positive("distill.hidden", self.hidden)?;
        check::positive("distill.lr", self.lr)?;
        check::positive("distill.embed_lr", self.embed_lr)?;
        check::positive("distill.batch_size", self.batch_size)?;
        check::positive("distill.train_every", self.train_every)?;
        check::positive("distill.updates", self.updates)?;
        check::positive("distill.buffer", self.buffer)?;
        check::in_range("distill.holdout", self.holdout, 0.0, 0.9)?;
        check::in_range("distill.min_agreement", self.min_agreement, 0.0, 1.0)?;
        if self.holdout == 0.0 && self.min_agreement > 0.0 {
            return Err(Invalid::new(
                "distill.holdout",
                self.holdout,
                "must be > 0 when distill.min_agreement > 0 (agreement is measured on held-out judged steps)",
            ));
        }
        check::one_of("distill.device", &self.device, &["cpu", "cuda"])?;
        Ok(())
    }
}

/// A snapshot of the distilled model's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillMetrics {
    /// Judge labels received (training + held out).
    pub labels: u64,
    /// Of those, held out.
    pub held_out: u64,
    /// Optimizer steps taken.
    pub updates: u64,
    /// Distilled scores may be used: at least `min_labels` training labels and
    /// agreement at least `min_agreement` on at least `min_held_out` held-out
    /// steps.
    pub ready: bool,
    /// Share of the held-out judged steps (the latest, up to 1024) where the
    /// model and the judge agree on correct vs wrong (both thresholded at
    /// 0.5), as of the last training round; `None` before any.
    pub agreement: Option<f64>,
    /// The `min_agreement` gate, for plots.
    pub min_agreement: f64,
    /// Judge targets refused because they were not finite numbers.
    pub rejected: u64,
    /// Moving average of the training loss (BCE).
    pub loss: Option<f64>,
    /// Distilled scores handed out.
    pub scored: u64,
    /// `consensus`: judged steps learned from, and those dropped because the
    /// judge disagreed with the independent verdict.
    #[serde(default)]
    pub consensus_kept: u64,
    #[serde(default)]
    pub consensus_dropped: u64,
    /// `consensus_kept / (consensus_kept + consensus_dropped)`; `None` with
    /// `consensus` off or before any judged step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consensus_keep_rate: Option<f64>,
}

struct Example {
    features: Vec<i64>,
    target: f32,
}

struct State {
    _vs: nn::VarStore,
    /// Embedding rows, outside the VarStore: trained by sparse Adagrad with
    /// `adagrad` holding the squared-gradient sums, because a dense optimizer
    /// step over every row cost ~10 ms per batch on CPU.
    table: Tensor,
    adagrad: Tensor,
    hidden: nn::Linear,
    out: nn::Linear,
    opt: nn::Optimizer,
    train: VecDeque<Example>,
    holdout: VecDeque<Example>,
    new_since_round: u32,
    counters: Counters,
    rng: SplitMix,
}

/// What the model has seen and done: kept by checkpoints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counters {
    labels: u64,
    held_out: u64,
    trained_labels: u64,
    updates: u64,
    loss_ema: Option<f64>,
    scored: u64,
    rejected: u64,
    consensus_kept: u64,
    consensus_dropped: u64,
    /// Agreement on the held-out examples, measured after each training round.
    agreement: Option<f64>,
}

/// Held-out examples kept for the agreement metric (the most recent).
const HOLDOUT_KEEP: usize = 1024;

/// The distilled reward model. All methods block (tch); call them from
/// `spawn_blocking` in async code.
pub struct Distiller {
    cfg: Config,
    device: Device,
    state: Mutex<State>,
}

impl Distiller {
    /// A freshly initialised model for `[distill]`.
    pub fn new(cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let device = match cfg.device.as_str() {
            "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
            "cuda" => return Err(Error::Config(Invalid::new("distill.device", "cuda", "CUDA is not available"))),
            _ => Device::Cpu,
        };
        let mut rng = SplitMix(cfg.seed ^ 0x6a09_e667_f3bc_c908);
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let (buckets, dim, hidden) = (cfg.buckets as i64, cfg.dim as i64, cfg.hidden as i64);
        let normal = |rng: &mut SplitMix, n: i64, std: f64| -> Tensor {
            let v: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
            Tensor::from_slice(&v)
        };
        let table = normal(&mut rng, buckets * dim, 0.1).view([buckets, dim]).to_device(device);
        let adagrad = Tensor::zeros([buckets, dim], (Kind::Float, device));
        let linear = |name: &str, i: i64, o: i64, rng: &mut SplitMix| -> nn::Linear {
            let p = &root / name;
            let ws = p.var_copy("weight", &normal(rng, o * i, (2.0 / i as f64).sqrt()).view([o, i]));
            let bs = p.var_copy("bias", &Tensor::zeros([o], (Kind::Float, Device::Cpu)));
            nn::Linear { ws, bs: Some(bs) }
        };
        let hidden_layer = linear("hidden", dim, hidden, &mut rng);
        let out = linear("out", hidden, 1, &mut rng);
        let opt = nn::Adam::default().build(&vs, cfg.lr)?;
        Ok(Self {
            cfg: cfg.clone(),
            device,
            state: Mutex::new(State {
                _vs: vs,
                table,
                adagrad,
                hidden: hidden_layer,
                out,
                opt,
                train: VecDeque::new(),
                holdout: VecDeque::new(),
                new_since_round: 0,
                counters: Counters::default(),
                rng,
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The hashed features of `step` after `context` (the text before it).
    pub fn features(&self, context: &str, step: &str) -> Vec<i64> {
        let mut out = Vec::new();
        let context = context.as_bytes();
        let tail = &context[context.len().saturating_sub(self.cfg.context_bytes as usize)..];
        for (namespace, bytes) in [(0u8, step.as_bytes()), (1u8, tail)] {
            for n in 1..=self.cfg.ngram_max as usize {
                for gram in bytes.windows(n) {
                    out.push((fnv(namespace, gram) % self.cfg.buckets as u64) as i64);
                }
            }
        }
        out
    }

    /// Learns from the judge's P(yes) = `p_judge` for `step` after `context`;
    /// trains a round every `train_every` new training labels (and measures
    /// the agreement after it). A target that is not a finite number in [0, 1]
    /// is refused (counted) and never learned from.
    pub fn observe(&self, context: &str, step: &str, p_judge: f32) -> Result<()> {
        if !(p_judge.is_finite() && (0.0..=1.0).contains(&p_judge)) {
            self.state().counters.rejected += 1;
            return Err(Error::Client(format!("distilled model: judge target {p_judge} is not a probability")));
        }
        let features = self.features(context, step);
        let mut s = self.state();
        let before = (s.counters.labels as f64 * self.cfg.holdout).floor();
        s.counters.labels += 1;
        let example = Example { features, target: p_judge.clamp(0.0, 1.0) };
        if (s.counters.labels as f64 * self.cfg.holdout).floor() > before {
            s.counters.held_out += 1;
            if s.holdout.len() == HOLDOUT_KEEP {
                s.holdout.pop_front();
            }
            s.holdout.push_back(example);
            return Ok(());
        }
        if s.train.len() == self.cfg.buffer as usize {
            s.train.pop_front();
        }
        s.train.push_back(example);
        s.counters.trained_labels += 1;
        s.new_since_round += 1;
        if s.new_since_round >= self.cfg.train_every {
            s.new_since_round = 0;
            for _ in 0..self.cfg.updates {
                self.train_step(&mut s)?;
            }
            s.counters.agreement = self.agreement(&s);
        }
        Ok(())
    }

    /// [`Distiller::observe`] behind the `consensus` filter: with it on, a
    /// step whose judge verdict (`p_judge >= 0.5`) disagrees with `check`,
    /// the independent verdict, is dropped (counted) and `Ok(false)` returned.
    pub fn observe_checked(&self, context: &str, step: &str, p_judge: f32, check: Option<bool>) -> Result<bool> {
        if self.cfg.consensus {
            let agrees = check.is_none_or(|c| (p_judge >= 0.5) == c);
            if !agrees {
                self.state().counters.consensus_dropped += 1;
                return Ok(false);
            }
            self.observe(context, step, p_judge)?;
            self.state().counters.consensus_kept += 1;
            return Ok(true);
        }
        self.observe(context, step, p_judge).map(|()| true)
    }

    /// Agreement of the model with the judge on the held-out examples.
    fn agreement(&self, s: &State) -> Option<f64> {
        if s.holdout.is_empty() {
            return None;
        }
        let batch: Vec<&[i64]> = s.holdout.iter().map(|e| e.features.as_slice()).collect();
        let p = self.predict(s, &batch).ok()?;
        let agree = p.iter().zip(&s.holdout).filter(|(p, e)| (**p >= 0.5) == (e.target >= 0.5)).count();
        Some(agree as f64 / p.len() as f64)
    }

    fn gate(&self, s: &State) -> bool {
        s.counters.trained_labels >= self.cfg.min_labels as u64
            && (self.cfg.min_agreement <= 0.0
                || (s.holdout.len() >= self.cfg.min_held_out as usize
                    && s.counters.agreement.is_some_and(|a| a >= self.cfg.min_agreement)))
    }

    fn train_step(&self, s: &mut State) -> Result<()> {
        let n = s.train.len();
        if n == 0 {
            return Ok(());
        }
        let picks: Vec<usize> = (0..self.cfg.batch_size).map(|_| (s.rng.next() % n as u64) as usize).collect();
        let batch: Vec<&[i64]> = picks.iter().map(|&i| s.train[i].features.as_slice()).collect();
        let targets: Vec<f32> = picks.iter().map(|&i| s.train[i].target).collect();
        let bag = Bag::new(&batch, self.device);
        let rows = s.table.f_index_select(0, &bag.rows)?.set_requires_grad(true);
        let logits = self.head(s, &bag, &rows)?;
        let target = Tensor::from_slice(&targets).to_device(self.device);
        let loss = logits.binary_cross_entropy_with_logits::<Tensor>(&target, None, None, Reduction::Mean);
        s.opt.zero_grad();
        loss.backward();
        s.opt.step();
        {
            let _guard = tch::no_grad_guard();
            let grad = rows.grad();
            let acc = s.adagrad.f_index_select(0, &bag.rows)? + grad.square();
            let _ = s.adagrad.f_index_copy_(0, &bag.rows, &acc)?;
            let step = grad / (acc.sqrt() + 1e-8) * (-self.cfg.embed_lr);
            let _ = s.table.f_index_add_(0, &bag.rows, &step)?;
        }
        let l = loss.double_value(&[]);
        s.counters.loss_ema = Some(s.counters.loss_ema.map_or(l, |e| 0.95 * e + 0.05 * l));
        s.counters.updates += 1;
        Ok(())
    }

    /// Logits of a batch given its gathered embedding rows.
    fn head(&self, s: &State, bag: &Bag, rows: &Tensor) -> Result<Tensor> {
        let dim = self.cfg.dim as i64;
        let per_feature = rows.f_index_select(0, &bag.slots)?;
        let sum =
            Tensor::f_zeros([bag.len, dim], (Kind::Float, self.device))?.f_index_add(0, &bag.owner, &per_feature)?;
        let h = s.hidden.forward(&(sum * &bag.scale)).relu();
        Ok(s.out.forward(&h).squeeze_dim(-1))
    }

    fn forward(&self, s: &State, batch: &[&[i64]]) -> Result<Tensor> {
        let bag = Bag::new(batch, self.device);
        let rows = s.table.f_index_select(0, &bag.rows)?;
        self.head(s, &bag, &rows)
    }

    fn predict(&self, s: &State, batch: &[&[i64]]) -> Result<Vec<f32>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let _guard = tch::no_grad_guard();
        let p = self.forward(s, batch)?.sigmoid().to_device(Device::Cpu);
        Ok(Vec::<f32>::try_from(&p)?)
    }

    /// Whether distilled scores may be used: enough labels learned from, and
    /// enough agreement with the judge on held-out judged steps.
    pub fn ready(&self) -> bool {
        self.gate(&self.state())
    }

    /// Distilled P(yes) for each `(context, step)`; `None` for all until ready.
    pub fn score(&self, items: &[(&str, &str)]) -> Result<Vec<Option<f32>>> {
        let features: Vec<Vec<i64>> = items.iter().map(|(c, s)| self.features(c, s)).collect();
        let mut s = self.state();
        if !self.gate(&s) {
            return Ok(vec![None; items.len()]);
        }
        let batch: Vec<&[i64]> = features.iter().map(Vec::as_slice).collect();
        let p = self.predict(&s, &batch)?;
        s.counters.scored += p.len() as u64;
        Ok(p.into_iter().map(|p| p.is_finite().then_some(p)).collect())
    }

    /// A snapshot. The agreement is the one measured after the last training
    /// round, or now when held-out steps arrived since (cheap: at most 1024
    /// examples).
    pub fn metrics(&self) -> DistillMetrics {
        let mut s = self.state();
        if s.counters.agreement.is_none() && !s.holdout.is_empty() {
            s.counters.agreement = self.agreement(&s);
        }
        DistillMetrics {
            labels: s.counters.labels,
            held_out: s.counters.held_out,
            updates: s.counters.updates,
            ready: self.gate(&s),
            agreement: s.counters.agreement,
            min_agreement: self.cfg.min_agreement,
            rejected: s.counters.rejected,
            loss: s.counters.loss_ema,
            scored: s.counters.scored,
            consensus_kept: s.counters.consensus_kept,
            consensus_dropped: s.counters.consensus_dropped,
            consensus_keep_rate: (self.cfg.consensus && s.counters.consensus_kept + s.counters.consensus_dropped > 0)
                .then(|| s.counters.consensus_kept as f64 / (s.counters.consensus_kept + s.counters.consensus_dropped) as f64),
        }
    }
}

/// The distilled model's tensors in a checkpoint folder.
pub const SAVED_TENSORS: &str = "distill.safetensors";
/// Its counters and settings in a checkpoint folder.
pub const SAVED_STATE: &str = "distill.json";
const SAVED_FORMAT: u32 = 1;

/// What [`Distiller::save`] writes beside the tensors.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    format: u32,
    /// The shape settings; a model of another shape cannot be loaded.
    buckets: u32,
    dim: u32,
    hidden: u32,
    #[serde(flatten)]
    counters: Counters,
    rng: u64,
}

impl Distiller {
    /// Writes the model (embedding table and its Adagrad sums, the two dense
    /// layers), the held-out judged steps and the counters into `dir`, for a
    /// checkpoint. Not kept: the training buffer (it refills from the next
    /// judged steps) and Adam's moments of the dense layers (they restart).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let s = self.state();
        let (mut features, mut offsets, mut targets) = (Vec::new(), vec![0i64], Vec::new());
        for e in &s.holdout {
            features.extend_from_slice(&e.features);
            offsets.push(features.len() as i64);
            targets.push(e.target);
        }
        let tensors = [
            ("table", s.table.shallow_clone()),
            ("adagrad", s.adagrad.shallow_clone()),
            ("hidden.weight", s.hidden.ws.shallow_clone()),
            ("hidden.bias", s.hidden.bs.as_ref().expect("bias").shallow_clone()),
            ("out.weight", s.out.ws.shallow_clone()),
            ("out.bias", s.out.bs.as_ref().expect("bias").shallow_clone()),
            ("holdout.features", Tensor::from_slice(&features)),
            ("holdout.offsets", Tensor::from_slice(&offsets)),
            ("holdout.targets", Tensor::from_slice(&targets)),
        ];
        let path = dir.join(SAVED_TENSORS);
        let cpu: Vec<(&str, Tensor)> = tensors.iter().map(|(n, t)| (*n, t.detach().to_device(Device::Cpu))).collect();
        Tensor::write_safetensors(&cpu, &path).map_err(|e| Error::Saved { path: path.clone(), reason: e.to_string() })?;
        let saved = Saved {
            format: SAVED_FORMAT,
            buckets: self.cfg.buckets,
            dim: self.cfg.dim,
            hidden: self.cfg.hidden,
            counters: s.counters.clone(),
            rng: s.rng.0,
        };
        let path = dir.join(SAVED_STATE);
        let json = serde_json::to_vec_pretty(&saved).map_err(|e| Error::Saved { path: path.clone(), reason: e.to_string() })?;
        std::fs::write(&path, json).map_err(|e| Error::Saved { path, reason: e.to_string() })
    }

    /// Continues from what [`Distiller::save`] wrote into `dir`: `Ok(false)`
    /// when `dir` holds none (a checkpoint of a run without distillation);
    /// an error naming the file when it is unreadable or of another shape.
    pub fn load(&self, dir: &Path) -> Result<bool> {
        let (state_path, tensors_path) = (dir.join(SAVED_STATE), dir.join(SAVED_TENSORS));
        if !state_path.exists() {
            return Ok(false);
        }
        let bad = |path: &Path, reason: String| Error::Saved { path: path.to_path_buf(), reason };
        let text = std::fs::read(&state_path).map_err(|e| bad(&state_path, e.to_string()))?;
        let saved: Saved = serde_json::from_slice(&text).map_err(|e| bad(&state_path, e.to_string()))?;
        if saved.format != SAVED_FORMAT {
            return Err(bad(&state_path, format!("format {} (this build reads {SAVED_FORMAT})", saved.format)));
        }
        let shape = (saved.buckets, saved.dim, saved.hidden);
        let want = (self.cfg.buckets, self.cfg.dim, self.cfg.hidden);
        if shape != want {
            return Err(bad(
                &state_path,
                format!("saved with distill.buckets, dim, hidden = {shape:?}; this run has {want:?}"),
            ));
        }
        let tensors: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&tensors_path)
            .map_err(|e| bad(&tensors_path, e.to_string()))?
            .into_iter()
            .collect();
        let get = |name: &str| tensors.get(name).ok_or_else(|| bad(&tensors_path, format!("no tensor {name:?}")));
        let (features, offsets, targets) = (get("holdout.features")?, get("holdout.offsets")?, get("holdout.targets")?);
        let features = Vec::<i64>::try_from(features).map_err(|e| bad(&tensors_path, e.to_string()))?;
        let offsets = Vec::<i64>::try_from(offsets).map_err(|e| bad(&tensors_path, e.to_string()))?;
        let targets = Vec::<f32>::try_from(targets).map_err(|e| bad(&tensors_path, e.to_string()))?;
        let buckets = i64::from(self.cfg.buckets);
        let mut holdout = VecDeque::with_capacity(targets.len());
        for (k, &target) in targets.iter().enumerate() {
            let (a, b) = (offsets.get(k).copied(), offsets.get(k + 1).copied());
            let range = a.zip(b).filter(|&(a, b)| 0 <= a && a <= b && b as usize <= features.len());
            let Some((a, b)) = range else {
                return Err(bad(&tensors_path, format!("held-out example {k}: offsets outside the features")));
            };
            let f = features[a as usize..b as usize].to_vec();
            if f.iter().any(|&x| !(0..buckets).contains(&x)) || !(0.0..=1.0).contains(&target) {
                return Err(bad(&tensors_path, format!("held-out example {k}: a feature or target out of range")));
            }
            holdout.push_back(Example { features: f, target });
        }
        let mut s = self.state();
        {
            let _guard = tch::no_grad_guard();
            let hidden_bias = s.hidden.bs.as_ref().expect("bias").shallow_clone();
            let out_bias = s.out.bs.as_ref().expect("bias").shallow_clone();
            for (name, mut into) in [
                ("table", s.table.shallow_clone()),
                ("adagrad", s.adagrad.shallow_clone()),
                ("hidden.weight", s.hidden.ws.shallow_clone()),
                ("hidden.bias", hidden_bias),
                ("out.weight", s.out.ws.shallow_clone()),
                ("out.bias", out_bias),
            ] {
                let from = get(name)?;
                if from.size() != into.size() {
                    return Err(bad(&tensors_path, format!("{name}: shape {:?}, the model has {:?}", from.size(), into.size())));
                }
                into.copy_(from);
            }
        }
        s.holdout = holdout;
        s.counters = saved.counters;
        s.rng = SplitMix(saved.rng);
        s.train.clear();
        s.new_since_round = 0;
        Ok(true)
    }
}

/// A batch of feature lists as index tensors: the distinct embedding `rows`
/// it touches, each feature's slot among them, the example each feature
/// belongs to, and each example's 1/sqrt(feature count).
struct Bag {
    len: i64,
    rows: Tensor,
    slots: Tensor,
    owner: Tensor,
    scale: Tensor,
}

impl Bag {
    fn new(batch: &[&[i64]], device: Device) -> Self {
        let mut slot_of = std::collections::HashMap::new();
        let (mut rows, mut slots, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        let mut scale = Vec::with_capacity(batch.len());
        for (b, features) in batch.iter().enumerate() {
            for &f in *features {
                let slot = *slot_of.entry(f).or_insert_with(|| {
                    rows.push(f);
                    rows.len() as i64 - 1
                });
                slots.push(slot);
                owner.push(b as i64);
            }
            scale.push(1.0 / (features.len().max(1) as f32).sqrt());
        }
        let t = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        Bag {
            len: batch.len() as i64,
            rows: t(&rows),
            slots: t(&slots),
            owner: t(&owner),
            scale: Tensor::from_slice(&scale).to_device(device).unsqueeze(1),
        }
    }
}

/// The annotation budget: which trajectories the judge labels.
#[derive(Debug)]
pub struct Budget {
    fraction: f64,
    rate: f64,
    tokens: f64,
    refilled: Instant,
    /// Groups refused by the fraction or the rate.
    pub refused: u64,
}

impl Budget {
    pub fn new(cfg: &Config) -> Self {
        let burst = cfg.judge_calls_per_sec.max(1.0);
        Self {
            fraction: cfg.judge_fraction,
            rate: cfg.judge_calls_per_sec,
            tokens: burst,
            refilled: Instant::now(),
            refused: 0,
        }
    }

    /// May the judge label group `id` (all its trajectories), costing `calls`
    /// judge calls?
    pub fn admit(&mut self, id: u64, calls: u64, now: Instant) -> bool {
        let selected = self.fraction >= 1.0 || (fnv(2, &id.to_le_bytes()) as f64 / u64::MAX as f64) < self.fraction;
        if !selected {
            self.refused += 1;
            return false;
        }
        if self.rate <= 0.0 {
            return true;
        }
        let burst = self.rate.max(1.0);
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * self.rate).min(burst);
        self.refilled = now;
        // A trajectory costing more than the burst is admitted when the bucket is full.
        let cost = (calls as f64).min(burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}

/// FNV-1a over a namespace byte, the length and the bytes.
fn fnv(namespace: u8, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in [namespace, bytes.len() as u8].into_iter().chain(bytes.iter().copied()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64 (Steele, Lea, Flood 2014): small, seedable, good enough for
/// initial weights and replay sampling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Box–Muller.
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[cfg(test)]
mod tests;
