//! `prism bench generate`: prefill and decode throughput of the engine, next to
//! transformers' `generate` on the same workload with the same thread count
//! (benches/reference/generate.py, run from `.venv`), and the memory-bandwidth
//! bound of batch-1 decoding.
//!
//! Method, both sides: greedy decoding of `batch` prompts of `prompt_len`
//! random token ids for exactly `new_tokens` tokens (no eos); best of `repeat`
//! runs of a 1-token generation (≈ prefill) and of the full generation, over
//! `rounds` alternations of prism and transformers; decode tokens/s =
//! batch × (new_tokens − 1) / (full − prefill).

pub mod judge_server;
pub mod reward;
pub mod rollout;
pub mod train;

use anyhow::{Context, bail};
use clap::Args;
use prism_model::engine::{self, SamplingParams};
use rand::{RngExt, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `prism bench generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Model to run (default: `model.source` of the config).
    #[arg(long)]
    pub model: Option<String>,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Tokens per prompt.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Torch intra-op threads for both sides (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed runs per measurement (the best counts).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Rounds of prism then transformers; each side's best over all rounds
    /// counts, so a neighbour's load that comes and goes weighs on both.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Skip the transformers run.
    #[arg(long)]
    pub no_reference: bool,
    #[command(flatten)]
    pub common: crate::config::ConfigArgs,
}

struct Timing {
    prefill_s: f64,
    total_s: f64,
}

impl Timing {
    fn prefill_tps(&self, a: &GenerateArgs) -> f64 {
        (a.batch * a.prompt_len) as f64 / self.prefill_s
    }
    fn decode_tps(&self, a: &GenerateArgs) -> f64 {
        (a.batch * (a.new_tokens - 1)) as f64 / (self.total_s - self.prefill_s).max(1e-9)
    }
}

fn best(repeat: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Bytes per second of a `threads`-way memcpy of a 256 MiB buffer, counting
/// bytes read and written.
fn copy_bandwidth(threads: usize) -> f64 {
    let size = 256 << 20;
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let chunk = size.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * size as f64 / best
}

/// What both benchmarks start with: torch's thread count (`threads`, else all
/// cores), and the model `model` (else `model.source`) loaded as configured.
fn load_model(
    model: Option<&str>,
    threads: Option<usize>,
    model_cfg: &prism_model::Config,
    seed: u64,
) -> anyhow::Result<(usize, String, prism_model::Loaded)> {
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    tch::set_num_threads(threads as i32);
    let source = model.map_or_else(|| model_cfg.source.clone(), str::to_string);
    let opts = model_cfg.load_options(seed)?;
    let loaded = prism_model::load(&source, &opts).with_context(|| format!("loading {source}"))?;
    Ok((threads, source, loaded))
}

pub fn generate(args: &GenerateArgs, model_cfg: &prism_model::Config, seed: u64) -> anyhow::Result<()> {
    if args.new_tokens < 2 || args.batch == 0 || args.prompt_len == 0 {
        bail!("--batch and --prompt-len must be >= 1 and --new-tokens >= 2");
    }
    let (threads, source, loaded) = load_model(args.model.as_deref(), args.threads, model_cfg, seed)?;
    let config = loaded.model.config().clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| (0..args.prompt_len).map(|_| rng.random_range(0..config.vocab_size as u32)).collect())
        .collect();
    let run = |new: usize| -> anyhow::Result<()> {
        let out = engine::generate(&loaded.model, &prompts, &SamplingParams::greedy(new, vec![]))?;
        anyhow::ensure!(out.iter().all(|g| g[0].tokens.len() == new), "a sample ended early");
        Ok(())
    };
    run(4)?;
    let mut ours = Timing { prefill_s: f64::INFINITY, total_s: f64::INFINITY };
    let mut reference: Option<(Timing, String)> = None;
    for _ in 0..args.rounds.max(1) {
        ours.prefill_s = ours.prefill_s.min(best(args.repeat, || run(1))?);
        ours.total_s = ours.total_s.min(best(args.repeat, || run(args.new_tokens))?);
        if !args.no_reference {
            let (t, version) = self::reference(args, &source, &loaded, &prompts, threads, model_cfg)?;
            let r = reference.get_or_insert((Timing { prefill_s: f64::INFINITY, total_s: f64::INFINITY }, version));
            r.0.prefill_s = r.0.prefill_s.min(t.prefill_s);
            r.0.total_s = r.0.total_s.min(t.total_s);
        }
    }

    let device = &model_cfg.device;
    println!(
        "prism bench generate: {} ({} parameters, {}, {device}, {threads} threads), batch {}, prompt {}, new tokens {}, best of {} x {} runs",
        prism_serve::default_name(&source),
        config.num_parameters(),
        model_cfg.dtype,
        args.batch,
        args.prompt_len,
        args.new_tokens,
        args.rounds.max(1),
        args.repeat
    );
    println!("{:<22}{:>16}{:>16}", "", "prefill tok/s", "decode tok/s");
    println!("{:<22}{:>16.1}{:>16.1}", "prism", ours.prefill_tps(args), ours.decode_tps(args));
    if let Some((r, version)) = &reference {
        println!("{:<22}{:>16.1}{:>16.1}", format!("transformers (torch {version})"), r.prefill_tps(args), r.decode_tps(args));
        println!(
            "{:<22}{:>15.2}x{:>15.2}x",
            "prism / transformers",
            ours.prefill_tps(args) / r.prefill_tps(args),
            ours.decode_tps(args) / r.decode_tps(args)
        );
    }
    if device == "cpu" {
        let bandwidth = copy_bandwidth(threads);
        let elt = match model_cfg.dtype.as_str() {
            "f32" => 4,
            _ => 2,
        };
        // A decode step reads every weight once; with tied embeddings the
        // embedding matrix is read once, as the output projection.
        let bytes = (config.num_parameters() * elt) as f64;
        let bound = bandwidth / bytes;
        let per_step = ours.decode_tps(args) / args.batch as f64;
        println!(
            "memory: copy bandwidth {:.1} GB/s ({threads} threads, read+write); {:.0} MB of weights per decode step \
             -> bound {:.1} steps/s; prism makes {:.1} steps/s = {:.0}% of the bound",
            bandwidth / 1e9,
            bytes / 1e6,
            bound,
            per_step,
            100.0 * per_step / bound
        );
    }
    Ok(())
}

/// Runs the transformers side; returns its timing and torch version.
fn reference(
    args: &GenerateArgs,
    source: &str,
    loaded: &prism_model::Loaded,
    prompts: &[Vec<u32>],
    threads: usize,
    model_cfg: &prism_model::Config,
) -> anyhow::Result<(Timing, String)> {
    let repo = repo_root();
    let python = python(&repo);
    let script = repo.join("benches/reference/generate.py");
    // transformers reads HF folders and GGUF files; anything else goes through an export.
    let tmp;
    let model_path = if Path::new(source).is_dir() || source.ends_with(".gguf") {
        source.to_string()
    } else {
        tmp = std::env::temp_dir().join(format!("prism-bench-{}", std::process::id()));
        loaded.model.save_hf_with(&tmp, &loaded.tokenizer, &loaded.generation)?;
        tmp.to_string_lossy().into_owned()
    };
    let request = serde_json::json!({
        "prompts": prompts, "new_tokens": args.new_tokens, "device": model_cfg.device, "dtype": model_cfg.dtype,
    });
    let mut child = std::process::Command::new(&python)
        .arg(&script)
        .args([&model_path, &threads.to_string(), &args.repeat.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {} {}", python.display(), script.display()))?;
    use std::io::Write;
    child.stdin.take().context("python stdin")?.write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if model_path != source {
        let _ = std::fs::remove_dir_all(&model_path);
    }
    if !out.status.success() {
        bail!("the transformers reference failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading the reference's JSON")?;
    let get = |k: &str| v[k].as_f64().with_context(|| format!("reference output lacks {k}"));
    Ok((Timing { prefill_s: get("prefill_s")?, total_s: get("total_s")? }, v["torch"].as_str().unwrap_or("?").to_string()))
}

/// Where the reference runs: `PRISM_PYTHON`, else the repository's
/// `.venv/bin/python`, else `python3`.
fn python(repo: &Path) -> PathBuf {
    let venv = repo.join(".venv/bin/python");
    match std::env::var_os("PRISM_PYTHON") {
        Some(p) => PathBuf::from(p),
        None if venv.exists() => venv,
        None => PathBuf::from("python3"),
    }
}

/// The repository (for `.venv` and the reference script): `PRISM_REPO`, else
/// the current folder or the one above the binary's `target/`.
fn repo_root() -> PathBuf {
    if let Some(r) = std::env::var_os("PRISM_REPO") {
        return PathBuf::from(r);
    }
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("benches/reference/generate.py").exists() {
        return cwd;
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.ancestors().find(|a| a.join("benches/reference/generate.py").exists()).map(Path::to_path_buf))
        .unwrap_or(cwd)
}
