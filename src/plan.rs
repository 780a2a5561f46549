//! `prism plan`: the memory a learner rank needs for a model, for every
//! `dist.shard` setting, with activations kept and recomputed, and the KV
//! cache of a rollout engine; whether it fits a GPU. `--measure` runs real CPU
//! training steps of the model with random weights and prints the measured
//! peak beside the plan (see `prism_learner::plan`).

use anyhow::{Context, bail};
use clap::Args;
use prism_learner::optim::sharded::Stage;
use prism_learner::plan::{self, RankBytes, Shape};
use prism_model::ModelConfig;
use std::path::Path;

/// Options of `prism plan`.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// The model: a config.json, an HF folder, a .gguf file (its header only)
    /// or a builtin preset.
    #[arg(long)]
    pub model: String,
    /// Data-parallel learner ranks (`dist.learner_ranks`), one GPU each.
    #[arg(long, default_value_t = 1)]
    pub ranks: u64,
    /// Memory of one GPU, e.g. `80GB` (10^9 bytes), `80GiB`, `141GB`.
    #[arg(long, default_value = "80GB")]
    pub gpu_memory: String,
    /// Tokens per sequence (prompt + completion).
    #[arg(long, default_value_t = 1024)]
    pub seq_len: u64,
    /// Prompt tokens per sequence (not trained on; default a quarter).
    #[arg(long)]
    pub prompt_len: Option<u64>,
    /// Sequences per forward/backward pass (`learner.micro_batch_size`).
    #[arg(long, default_value_t = 8)]
    pub micro_batch: u64,
    /// Plan for `learner.checkpoint_activations` (the totals use recomputed activations).
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Plan for `learner.logit_chunk`: the loss over the vocabulary this many
    /// positions at a time (0: the whole window).
    #[arg(long, default_value_t = 0)]
    pub logit_chunk: u64,
    /// Plan LoRA adapters of this rank on every projection instead of
    /// training the whole model (`learner.lora`; with `--measure`, alpha 2R).
    #[arg(long)]
    pub lora: Option<u64>,
    /// A KL penalty's reference model is held too (`learner.kl_coef > 0`).
    #[arg(long)]
    pub reference: bool,
    /// `dist.nccl_bucket_mb` of the sharded updates.
    #[arg(long, default_value_t = 64)]
    pub bucket_mb: u64,
    /// Sequences a rollout engine decodes together (for its KV cache).
    #[arg(long, default_value_t = 64)]
    pub rollout_batch: u64,
    /// The learner's weights (`model.dtype`): `f32`, or `bf16` (weights,
    /// reference and gradients in bf16, float32 master weights in the
    /// optimizer state).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Plan the CPU learner (float32 activations) instead of CUDA's bf16 autocast.
    #[arg(long)]
    pub cpu: bool,
    /// Also train the model (random weights, on the CPU) for two steps at this
    /// shape and print the measured peak memory beside the plan (implies
    /// --cpu). With --ranks N, N in-process ranks train together, sharding as
    /// --shard, each its micro-batch, and the peak is set beside N ranks' plans.
    #[arg(long)]
    pub measure: bool,
    /// The `dist.shard` setting --measure trains N ranks with.
    #[arg(long, default_value = "none", value_parser = ["none", "optimizer", "gradients"])]
    pub shard: String,
    /// Torch threads of --measure (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub common: crate::config::ConfigArgs,
}

const GB: f64 = 1e9;

/// `80GB`, `80 GB`, `80GiB`, `512MB`, `512MiB` → bytes.
fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim().to_ascii_lowercase());
    let value: f64 = number.parse().with_context(|| format!("--gpu-memory {text:?}: not a number with a unit (e.g. 80GB)"))?;
    let scale = match unit.as_str() {
        "gb" | "g" => 1e9,
        "gib" => (1u64 << 30) as f64,
        "mb" | "m" => 1e6,
        "mib" => (1u64 << 20) as f64,
        "tb" => 1e12,
        _ => bail!("--gpu-memory {text:?}: the unit must be GB, GiB, MB, MiB or TB"),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes <= 0.0 || bytes > u64::MAX as f64 {
        bail!("--gpu-memory {text:?}: out of range");
    }
    Ok(bytes as u64)
}

/// The model's name and config, without loading its weights where it can.
fn model_config(source: &str) -> anyhow::Result<(String, ModelConfig)> {
    let path = Path::new(source);
    let name = prism_serve::default_name(source);
    if path.is_dir() || path.extension().is_some_and(|e| e == "json") {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let hf = prism_model::HfConfig::from_file(&file)?;
        return Ok((name, hf.resolve(&file)?));
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let file = prism_model::gguf::GgufFile::open(path)?;
        return Ok((name, file.model_config()?));
    }
    let loaded = prism_model::load(source, &prism_model::LoadOptions::default()).with_context(|| format!("--model {source}"))?;
    Ok((name, loaded.model.config().clone()))
}

fn gb(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GB)
}

pub fn run(args: &PlanArgs, seed: u64) -> anyhow::Result<()> {
    let prompt_len = args.prompt_len.unwrap_or(args.seq_len / 4);
    if args.seq_len == 0 || args.micro_batch == 0 || args.ranks == 0 || prompt_len >= args.seq_len {
        bail!("--seq-len, --micro-batch and --ranks must be >= 1 and --prompt-len below --seq-len");
    }
    if args.lora == Some(0) {
        bail!("--lora 0: a LoRA rank is at least 1");
    }
    if args.measure && args.dtype != "f32" {
        bail!("--measure trains float32 weights on the CPU (its activation model is float32's); leave out --dtype {}", args.dtype);
    }
    let gpu = parse_bytes(&args.gpu_memory)?;
    let (name, c) = model_config(&args.model)?;
    let cpu = args.cpu || args.measure;
    let shape = Shape {
        seq_len: args.seq_len,
        window: args.seq_len - prompt_len,
        micro_batch: args.micro_batch,
        checkpoint_activations: args.checkpoint_activations,
        bf16: !cpu,
        logit_chunk: args.logit_chunk,
    };
    let p = plan::parameters(&c);
    let weight_bytes = if args.dtype == "bf16" { 2 } else { 4 };
    println!(
        "prism plan: {name}, {:.1}M parameters, {} learner rank{} of {} GB, micro-batch {} × {} tokens ({} trained), {} weights, {}",
        p as f64 / 1e6,
        args.ranks,
        if args.ranks == 1 { "" } else { "s" },
        gb(gpu),
        args.micro_batch,
        args.seq_len,
        shape.window,
        args.dtype,
        if cpu { "float32 (CPU learner)" } else { "bf16 autocast (CUDA learner)" }
    );
    let settings = [("none", None), ("optimizer", Some(Stage::Optimizer)), ("gradients", Some(Stage::Gradients))];
    let bucket = args.bucket_mb.saturating_mul(1 << 20);
    let plans: Vec<(RankBytes, RankBytes)> = settings
        .iter()
        .map(|(_, stage)| {
            let at = |checkpoint_activations| {
                let s = Shape { checkpoint_activations, ..shape };
                match args.lora {
                    Some(r) => plan::lora_rank_bytes(&c, &s, args.ranks, *stage, bucket, weight_bytes, r),
                    None => plan::rank_bytes(&c, &s, args.ranks, *stage, bucket, args.reference, weight_bytes),
                }
            };
            (at(false), at(true))
        })
        .collect();
    if let Some(r) = args.lora {
        println!(
            "LoRA rank {r} on every projection: {:.1}M adapter parameters beside the frozen base (learner.lora)",
            plan::lora_parameters(&c, r) as f64 / 1e6
        );
    }
    println!("{:<34}{:>12}{:>12}{:>12}", "per rank, GB (dist.shard =)", "none", "optimizer", "gradients");
    let row = |label: &str, f: &dyn Fn(&(RankBytes, RankBytes)) -> u64| {
        print!("{label:<34}");
        for plan in &plans {
            print!("{:>12}", gb(f(plan)));
        }
        println!();
    };
    let weights_label = format!("weights ({}{})", if weight_bytes == 2 { "bf16" } else { "float32" }, if args.lora.is_some() { " + adapters" } else { "" });
    row(&weights_label, &|(k, _)| k.weights);
    if args.reference && args.lora.is_none() {
        row("reference model", &|(k, _)| k.reference);
    }
    row("gradients, activations kept", &|(k, _)| k.gradients);
    row("gradients, recomputed", &|(_, r)| r.gradients);
    row("optimizer state", &|(k, _)| k.optimizer);
    row("sharded update buffers", &|(k, _)| k.buffers);
    row("activations, kept", &|(k, _)| k.activations);
    row("activations, recomputed per layer", &|(_, r)| r.activations);
    row("total, activations kept", &|(k, _)| k.total());
    row("total, recomputed", &|(_, r)| r.total());
    let chosen = |plan: &(RankBytes, RankBytes)| if args.checkpoint_activations { plan.1.total() } else { plan.0.total() };
    print!("{:<34}", format!("fits {} GB ({})", gb(gpu), if args.checkpoint_activations { "recomputed" } else { "kept" }));
    for plan in &plans {
        print!("{:>12}", if chosen(plan) <= gpu { "yes" } else { "no" });
    }
    println!();
    let weights = plan::rollout_weight_bytes(&c, 2);
    let kv = plan::kv_cache_bytes(&c, args.rollout_batch, args.seq_len, 2);
    println!(
        "rollout engine: {} GB of bf16 weights + {} GB of KV cache for {} × {} tokens = {} GB",
        gb(weights),
        gb(kv),
        args.rollout_batch,
        args.seq_len,
        gb(weights + kv)
    );
    if args.ranks > 1 {
        println!(
            "sharding divides the optimizer state; ZeRO-2 (gradients) frees each layer's gradients as the backward pass makes them only with \
             the layers recomputed (--checkpoint-activations): with activations kept, autograd holds them whole"
        );
    }
    if args.measure {
        let setting = settings.iter().position(|(name, _)| *name == args.shard).expect("clap checks --shard");
        measure(args, &c, &shape, prompt_len, settings[setting].1, &plans[setting], seed)?;
    }
    Ok(())
}

/// Two train steps of `c` with random weights at `shape`, on the CPU, by
/// `args.ranks` in-process ranks sharding as `stage`; the peak above the
/// loaded models beside the ranks' planned gradients, optimizer state,
/// sharded-update buffers and activations.
fn measure(args: &PlanArgs, c: &ModelConfig, shape: &Shape, prompt_len: u64, stage: Option<Stage>, plan: &(RankBytes, RankBytes), seed: u64) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    tch::set_num_threads(threads as i32);
    let lora = args.lora.map(|r| -> anyhow::Result<prism_model::LoraConfig> {
        let rank = u32::try_from(r).context("--lora")?;
        Ok(prism_model::LoraConfig { rank, alpha: 2.0 * f64::from(rank), ..Default::default() })
    });
    let lora = lora.transpose()?;
    let world = usize::try_from(args.ranks).context("--ranks")?;
    if stage.is_some() && world < 2 {
        bail!("--measure --shard {}: sharding needs --ranks 2 or more", args.shard);
    }
    let config = prism_learner::Config {
        advantage: prism_learner::config::Estimator::Grpo,
        std_unbiased: false,
        drop_uniform_groups: false,
        aggregation: prism_learner::config::Aggregation::TokenMean,
        kl_coef: 0.0,
        entropy_coef: 0.0,
        lr: 1e-6,
        micro_batch_size: args.micro_batch as u32,
        ppo_epochs: 1,
        mini_batches: 1,
        checkpoint_activations: shape.checkpoint_activations,
        logit_chunk: u32::try_from(shape.logit_chunk).context("--logit-chunk")?,
        lora: lora.clone(),
        ..prism_learner::Config::default()
    };
    let mut learners = Vec::with_capacity(world);
    for _ in 0..world {
        let mut model = prism_model::Transformer::new(c.clone(), tch::Device::Cpu, prism_model::Dtype::F32, seed)?;
        if let Some(l) = &lora {
            model.attach_lora(l, seed, None)?;
        }
        learners.push(prism_learner::Learner::new(config.clone(), model, None, seed)?);
    }
    // Each rank trains its micro-batch of the group's rows.
    let spec = prism_learner::bench::Spec {
        batch: args.micro_batch as usize * world,
        seq_len: args.seq_len as usize,
        prompt_len: prompt_len as usize,
        steps: 1,
        warmup: 1,
        vocab: c.vocab_size as u32,
        seed,
    };
    let memory = prism_learner::bench::Memory::start();
    if world == 1 {
        prism_learner::bench::run(&mut learners[0], &spec)?;
    } else {
        let sharding = stage.map(|stage| prism_learner::optim::sharded::Sharding { stage, bucket_bytes: args.bucket_mb.saturating_mul(1 << 20) as usize });
        let group = prism_learner::collective::Local::group(world, std::time::Duration::from_secs(3600));
        std::thread::scope(|s| -> anyhow::Result<()> {
            let ranks: Vec<_> = learners
                .iter_mut()
                .zip(group)
                .map(|(learner, collective)| {
                    let spec = &spec;
                    s.spawn(move || -> anyhow::Result<()> {
                        learner.join_data_parallel(Box::new(collective), sharding)?;
                        prism_learner::bench::run(learner, spec)?;
                        Ok(())
                    })
                })
                .collect();
            for rank in ranks {
                rank.join().map_err(|_| anyhow::anyhow!("--measure: a rank panicked"))??;
            }
            Ok(())
        })?;
    }
    let Some(measured) = memory.peak() else { bail!("--measure: this system does not report a peak resident size (/proc/self/status)") };
    let plan = if shape.checkpoint_activations { plan.1 } else { plan.0 };
    let planned = (plan.gradients + plan.optimizer + plan.buffers + plan.activations) * args.ranks;
    let ranks = if world == 1 { String::new() } else { format!(" of {world} ranks (dist.shard = {})", args.shard) };
    println!(
        "measured: {} GB peak above the loaded model{ranks} over two CPU steps; planned gradients + optimizer + buffers + activations {} GB ({:+.1}%)",
        gb(measured),
        gb(planned),
        (planned as f64 / measured as f64 - 1.0) * 100.0
    );
    Ok(())
}
