//! `prism bench train`: training throughput of the learner's step (forward,
//! GRPO clipped loss, backward, global-norm clipping, AdamW) next to the same
//! step written in PyTorch eager (`benches/train_step.py`, run from `.venv`) on
//! the same model, shapes and thread count, with the ratio.
//!
//! Both sides: one group of `batch` sequences of `seq_len` random tokens, the
//! last `seq_len - prompt_len` of them trained on, advantages ±1, token-mean
//! aggregation, micro-batches of `micro_batch` with gradient accumulation;
//! `warmup` untimed steps, then the median of `steps` timed ones.

use anyhow::{Context, bail};
use clap::Args;
use prism_learner::{Learner, bench};
use std::path::Path;

/// Options of `prism bench train`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Model to train (default: `model.source` of the config).
    #[arg(long)]
    pub model: Option<String>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (prompt + completion).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Prompt tokens per sequence (not trained on).
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Sequences per forward/backward (gradient accumulation over the rest).
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Timed steps (the median counts).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Torch intra-op threads for both sides (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Skip the PyTorch run.
    #[arg(long)]
    pub no_reference: bool,
    /// On the CPU: both sides under bf16 autocast (`learner.bf16_cpu`, and
    /// `torch.autocast("cpu", bfloat16)`), float32 weights. On CUDA both
    /// always run under bf16 autocast.
    #[arg(long)]
    pub bf16: bool,
    /// Train with `learner.checkpoint_activations` (each decoder layer
    /// recomputed in the backward pass).
    #[arg(long)]
    pub checkpoint_activations: bool,
    /// Train with `learner.logit_chunk` (the loss over the vocabulary this
    /// many positions at a time; 0: all at once).
    #[arg(long, default_value_t = 0)]
    pub logit_chunk: u32,
    /// Then train rank-R LoRA adapters (`learner.lora`, alpha 2R, every
    /// projection) over the same model, and compare with full fine-tuning.
    #[arg(long)]
    pub lora: Option<u32>,
    #[command(flatten)]
    pub common: crate::config::ConfigArgs,
}

/// The learner configuration both sides share (see benches/train_step.py).
fn learner_config(args: &TrainArgs, cuda: bool) -> prism_learner::Config {
    prism_learner::Config {
        mode: prism_learner::config::Mode::Rl,
        advantage: prism_learner::config::Estimator::Grpo,
        std_unbiased: false,
        drop_uniform_groups: false,
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: 3.0,
        aggregation: prism_learner::config::Aggregation::TokenMean,
        kl_coef: 0.0,
        entropy_coef: 0.0,
        lr: 1e-6,
        schedule: prism_learner::config::Schedule::Constant,
        weight_decay: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        grad_clip: 1.0,
        micro_batch_size: args.micro_batch as u32,
        ppo_epochs: 1,
        mini_batches: 1,
        bf16: cuda,
        bf16_cpu: args.bf16 && !cuda,
        checkpoint_activations: args.checkpoint_activations,
        logit_chunk: args.logit_chunk,
        ..prism_learner::Config::default()
    }
}

pub fn train(args: &TrainArgs, model_cfg: &prism_model::Config, seed: u64) -> anyhow::Result<()> {
    if args.batch == 0 || args.micro_batch == 0 || args.steps == 0 || args.prompt_len == 0 || args.prompt_len >= args.seq_len {
        bail!("--batch, --micro-batch and --steps must be >= 1 and --prompt-len in 1..--seq-len");
    }
    if args.lora == Some(0) {
        bail!("--lora 0: a LoRA rank is at least 1");
    }
    let (threads, source, loaded) = super::load_model(args.model.as_deref(), args.threads, model_cfg, seed)?;
    let config = loaded.model.config().clone();
    let cuda = model_cfg.device.starts_with("cuda");
    let spec = bench::Spec {
        batch: args.batch,
        seq_len: args.seq_len,
        prompt_len: args.prompt_len,
        steps: args.steps,
        warmup: args.warmup,
        vocab: config.vocab_size as u32,
        seed,
    };
    // The reference runs first, while this process holds only the model.
    let reference = if args.no_reference { None } else { Some(reference(args, &source, &loaded, threads, model_cfg, seed)?) };

    let prism_model::Loaded { model, .. } = loaded;
    let mut learner = Learner::new(learner_config(args, cuda), model, None, seed)?;
    let memory = bench::Memory::start();
    let ours = bench::run(&mut learner, &spec)?;
    let peak = memory.peak();
    let flops = bench::flops_per_token(learner.policy(), config.num_layers, config.hidden_size, config.vocab_size, args.seq_len);
    drop(learner);
    // LoRA over a fresh copy of the same model, after the full run's memory is freed.
    let lora = match args.lora {
        Some(rank) => {
            let mut model = super::load_model(args.model.as_deref(), args.threads, model_cfg, seed)?.2.model;
            let lora = prism_model::LoraConfig { rank, alpha: 2.0 * f64::from(rank), ..Default::default() };
            model.attach_lora(&lora, seed, None)?;
            let adapters: i64 = model.adapter_store().map_or(0, |vs| vs.variables().values().map(|t| t.numel() as i64).sum());
            let config = prism_learner::Config { lora: Some(lora), ..learner_config(args, cuda) };
            let mut learner = Learner::new(config, model, None, seed)?;
            let memory = bench::Memory::start();
            let timing = bench::run(&mut learner, &spec)?;
            Some((rank, adapters, timing, memory.peak()))
        }
        None => None,
    };

    println!(
        "prism bench train: {} ({} parameters, {}{}, {threads} threads), batch {} x {} tokens ({} prompt), micro-batch {}, {} timed steps",
        prism_serve::default_name(&source),
        config.num_parameters(),
        model_cfg.device,
        if cuda || args.bf16 { ", bf16 autocast" } else { ", f32" },
        args.batch,
        args.seq_len,
        args.prompt_len,
        args.micro_batch,
        args.steps
    );
    let gflops = |tps: f64| tps * flops / 1e9;
    println!("{:<26}{:>14}{:>14}{:>14}", "", "tokens/s", "step s", "GFLOP/s");
    let median = |t: &[f64]| {
        let mut s = t.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    println!("{:<26}{:>14.1}{:>14.3}{:>14.1}", "prism", ours.tokens_per_s, median(&ours.step_seconds), gflops(ours.tokens_per_s));
    if !cuda && !args.bf16 {
        // The machine's own rate on the step's largest products (the MLP's), same threads.
        let (m, k, n) = ((args.micro_batch * args.seq_len) as i64, config.hidden_size as i64, config.intermediate_size as i64);
        let rate = matmul_rate(m, k, n);
        println!(
            "{:<26}{:>42.1}   prism at {:.0}% of it",
            format!("f32 matmul {m}x{k}x{n}"),
            rate,
            100.0 * gflops(ours.tokens_per_s) / rate
        );
    }
    if let Some(r) = &reference {
        println!(
            "{:<26}{:>14.1}{:>14.3}{:>14.1}",
            format!("pytorch eager (torch {})", r.torch),
            r.tokens_per_s,
            median(&r.step_seconds),
            gflops(r.tokens_per_s)
        );
        println!("{:<26}{:>13.2}x", "prism / pytorch", ours.tokens_per_s / r.tokens_per_s);
    }
    if let Some((rank, _, timing, _)) = &lora {
        // Its GFLOP/s would need another count: no weight gradients of the base.
        println!("{:<26}{:>14.1}{:>14.3}{:>14}", format!("prism LoRA r={rank}"), timing.tokens_per_s, median(&timing.step_seconds), "-");
        println!("{:<26}{:>13.2}x", "LoRA / full", timing.tokens_per_s / ours.tokens_per_s);
    }
    match peak {
        Some(bytes) if !cuda => println!(
            "prism peak memory of the steps: {:.2} GiB above the loaded model (activations {})",
            bytes as f64 / (1u64 << 30) as f64,
            if args.checkpoint_activations { "recomputed per layer" } else { "kept" }
        ),
        _ => {}
    }
    if let Some((rank, adapters, _, Some(bytes))) = &lora
        && !cuda
    {
        println!(
            "prism LoRA r={rank} ({:.2}M adapter parameters): peak memory of the steps {:.2} GiB above the loaded model",
            *adapters as f64 / 1e6,
            *bytes as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// GFLOP/s of torch's float32 product `[m, k] x [k, n]` on the CPU, the
/// best of 10 after a warm-up.
fn matmul_rate(m: i64, k: i64, n: i64) -> f64 {
    let a = tch::Tensor::randn([m, k], (tch::Kind::Float, tch::Device::Cpu));
    let b = tch::Tensor::randn([k, n], (tch::Kind::Float, tch::Device::Cpu));
    let _ = a.matmul(&b);
    let best = (0..10)
        .map(|_| {
            let start = std::time::Instant::now();
            let _ = a.matmul(&b);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (m * k * n) as f64 / best / 1e9
}

struct Reference {
    tokens_per_s: f64,
    step_seconds: Vec<f64>,
    torch: String,
}

/// Runs benches/train_step.py on the same model and shapes.
fn reference(
    args: &TrainArgs,
    source: &str,
    loaded: &prism_model::Loaded,
    threads: usize,
    model_cfg: &prism_model::Config,
    seed: u64,
) -> anyhow::Result<Reference> {
    let repo = super::repo_root();
    let python = super::python(&repo);
    let script = repo.join("benches/train_step.py");
    // transformers reads HF folders and GGUF files (given as folder + file name);
    // anything else goes through an export.
    let mut tmp = None;
    let mut model_args: Vec<String> = Vec::new();
    if Path::new(source).is_dir() {
        model_args.extend(["--model".into(), source.into()]);
    } else if source.ends_with(".gguf") {
        let p = Path::new(source);
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let file = p.file_name().context("GGUF path has no file name")?;
        model_args.extend(["--model".into(), dir.to_string_lossy().into(), "--gguf".into(), file.to_string_lossy().into()]);
    } else {
        let dir = std::env::temp_dir().join(format!("prism-bench-train-{}", std::process::id()));
        loaded.model.save_hf_with(&dir, &loaded.tokenizer, &loaded.generation)?;
        model_args.extend(["--model".into(), dir.to_string_lossy().into()]);
        tmp = Some(dir);
    }
    let device = if model_cfg.device.starts_with("cuda") { "cuda" } else { "cpu" };
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script).arg("run").args(&model_args).args([
        "--batch".to_string(),
        args.batch.to_string(),
        "--seq-len".into(),
        args.seq_len.to_string(),
        "--prompt-len".into(),
        args.prompt_len.to_string(),
        "--micro-batch".into(),
        args.micro_batch.to_string(),
        "--steps".into(),
        args.steps.to_string(),
        "--warmup".into(),
        args.warmup.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--device".into(),
        device.into(),
        "--seed".into(),
        seed.to_string(),
    ]);
    if device == "cuda" || args.bf16 {
        cmd.arg("--bf16");
    }
    let out = cmd.output().with_context(|| format!("starting {} {}", python.display(), script.display()));
    if let Some(dir) = &tmp {
        let _ = std::fs::remove_dir_all(dir);
    }
    let out = out?;
    if !out.status.success() {
        bail!("the PyTorch reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let line = line.lines().rev().find(|l| l.starts_with('{')).context("the PyTorch reference printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(line).context("reading the reference's JSON")?;
    let tokens_per_s = v["tokens_per_s"].as_f64().context("reference output lacks tokens_per_s")?;
    let step_seconds: Vec<f64> = v["step_seconds"].as_array().into_iter().flatten().filter_map(|s| s.as_f64()).collect();
    if step_seconds.is_empty() {
        bail!("reference output lacks step_seconds");
    }
    Ok(Reference { tokens_per_s, step_seconds, torch: v["torch"].as_str().unwrap_or("?").to_string() })
}
