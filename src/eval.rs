//! `prism eval processbench`: a judge's ProcessBench score, with a progress
//! bar, concurrent requests and one JSON line of predictions per item.

use crate::cli::ProcessBenchArgs;
use crate::config::{Config, EXIT_CONFIG};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prism_reward::judge::{self, Judge, Style};
use prism_reward::processbench::{self, Prediction};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The judge configuration with the command line's overrides.
fn judge_config(config: &Config, args: &ProcessBenchArgs) -> judge::Config {
    let mut cfg = config.judge.clone();
    if let Some(url) = &args.judge {
        cfg.url = url.clone();
    }
    if let Some(model) = &args.model {
        cfg.model = model.clone();
    }
    match args.template.as_deref() {
        None => {}
        Some(name) => match Style::try_from(name.to_string()) {
            Ok(style) => {
                cfg.template = style;
                cfg.template_file = String::new();
            }
            Err(_) => cfg.template_file = name.to_string(),
        },
    }
    cfg
}

pub fn processbench(config: &Config, args: &ProcessBenchArgs) -> ExitCode {
    let cfg = judge_config(config, args);
    if let Err(invalid) = cfg.validate() {
        eprintln!("prism eval processbench: {invalid}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let items = match processbench::load(&args.data, args.limit) {
        Ok(items) => items,
        Err(e) => {
            eprintln!("prism eval processbench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let judge = match Judge::new(&cfg) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("prism eval processbench: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let out_path = args.out.clone().unwrap_or_else(|| {
        let stem = args.data.file_stem().map_or("data".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from(format!("processbench-{stem}.jsonl"))
    });
    let mut out = match std::fs::File::create(&out_path) {
        Ok(f) => std::io::BufWriter::new(f),
        Err(e) => {
            eprintln!("prism eval processbench: {}: {e}", out_path.display());
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("prism eval processbench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let concurrency = args.concurrency.unwrap_or(cfg.concurrency as usize).max(1);
    let mut progress = Progress::new(items.len());
    let mut write_error = None;
    let predictions = runtime.block_on(processbench::evaluate(&judge, &items, concurrency, |p: &Prediction| {
        progress.item(p);
        let line = serde_json::to_string(p).unwrap_or_default();
        if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
            write_error.get_or_insert(e);
        }
    }));
    progress.finish();
    if let Some(e) = write_error {
        eprintln!("prism eval processbench: {}: {e}", out_path.display());
        return ExitCode::FAILURE;
    }
    let r = processbench::report(&predictions);
    let m = judge.metrics();
    println!(
        "processbench {}: {} items ({} erroneous, {} all-correct); judge {} at {}, template {}",
        args.data.display(),
        r.items,
        r.erroneous,
        r.all_correct,
        cfg.model,
        prism_transport::redis::redact_url(&cfg.url),
        judge.template().name()
    );
    println!("erroneous accuracy: {:.1}%", r.erroneous_accuracy);
    println!("correct accuracy: {:.1}%", r.correct_accuracy);
    println!("F1: {:.1}", r.f1);
    println!("unknown steps: {}, failed steps: {}", r.unknown_steps, r.failed_steps);
    println!(
        "judge: {} calls, {} attempts, {} retries, {} timeouts, {} cache hits, {} verdicts ({} from logprobs), {} unknown verdicts, {} replies with logprobs ({} not spelling their text), breaker opened {} times, latency p50 {:.0} ms p95 {:.0} ms",
        m.calls,
        m.attempts,
        m.retries,
        m.timeouts,
        m.cache_hits,
        m.verdicts,
        m.logprob_verdicts,
        m.unknown_verdicts,
        m.logprob_replies,
        m.logprob_mismatches,
        m.breaker_opens,
        m.latency_ms_p50,
        m.latency_ms_p95
    );
    if let Some(fpr) = m.canary_fpr {
        println!("canary false-positive rate: {:.1}% of {}", fpr * 100.0, m.canaries);
    }
    println!("predictions: {}", out_path.display());
    ExitCode::SUCCESS
}

/// A bar on a terminal; otherwise a plain line every 10% of the items (and at
/// most one every 5 s beyond that).
struct Progress {
    total: usize,
    done: usize,
    right: usize,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    next_tenth: usize,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} items | {msg} | {elapsed_precise} ETA {eta}")
                    .expect("valid template"),
            );
            b
        });
        Self { total, done: 0, right: 0, bar, started: Instant::now(), last_line: Instant::now(), next_tenth: 1 }
    }

    fn item(&mut self, p: &Prediction) {
        self.done += 1;
        self.right += p.correct as usize;
        let msg = format!("{:.1}% right so far", 100.0 * self.right as f64 / self.done as f64);
        match &self.bar {
            Some(b) => {
                b.set_position(self.done as u64);
                b.set_message(msg);
            }
            None => {
                let tenth = self.done * 10 >= self.next_tenth * self.total;
                if tenth || self.last_line.elapsed() >= Duration::from_secs(5) {
                    while self.done * 10 >= self.next_tenth * self.total && self.next_tenth <= 10 {
                        self.next_tenth += 1;
                    }
                    eprintln!(
                        "processbench: {}/{} items, {msg}, {:.0} s",
                        self.done,
                        self.total,
                        self.started.elapsed().as_secs_f64()
                    );
                    self.last_line = Instant::now();
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// `prism eval --checkpoint DIR`: greedy held-out accuracy (and step accuracy),
/// plus pass@k from `k` sampled completions per problem when `k > 1`.
pub fn checkpoint(config: &Config, args: &crate::cli::CheckpointEvalArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use prism_actors::adapters::{summarize, Evaluator};
    let source = match &args.checkpoint {
        None => config.model.source.clone(),
        Some(path) => resolve_checkpoint(path)?.to_string_lossy().into_owned(),
    };
    let mut config = config.clone();
    match args.task.as_deref() {
        None => {}
        Some("arithmetic") => config.task.kind = "arithmetic".into(),
        Some("jsonl") => config.task.kind = "jsonl".into(),
        Some("gsm8k") => {
            config.task.kind = "jsonl".into();
            config.task.jsonl.train = prism_rollout::task::data_dir().join("gsm8k/test.jsonl");
            config.task.jsonl.eval = None;
        }
        Some(other) => anyhow::bail!("--task {other:?}: expected arithmetic, gsm8k or jsonl"),
    }
    config.task.validate().map_err(anyhow::Error::msg)?;
    let problems = match args.problems {
        Some(0) => usize::MAX,
        Some(n) => n,
        None => config.train.eval_problems,
    };
    let loaded = prism_model::load(&source, &config.model.load_options(config.run.seed)?)
        .with_context(|| format!("loading {source}"))?
        .with_chat_template_kwargs(&config.model.chat_template_kwargs)
        .context("model.chat_template_kwargs")?;
    let tok = loaded.tokenizer.clone();
    let render = move |q: &str| {
        tok.apply_chat_template(&[prism_model::chat::ChatMessage::new("user", q)], true).unwrap_or_else(|_| q.to_string())
    };
    let task = prism_rollout::Task::new(&config.task, config.run.seed, Box::new(render))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut reward = config.reward.clone();
    reward.process = prism_reward::config::Process::Verifier;
    let labeler = prism_reward::Labeler::new(&reward, &config.judge, &prism_reward::distill::Config::default())?;
    let eos = loaded.generation.eos_token_ids.clone();
    let evaluator = Evaluator {
        prompts: task.eval_prompts(problems),
        labeler: std::sync::Arc::new(labeler),
        max_new_tokens: config.rollout.max_new_tokens,
        eos: eos.clone(),
        batch: 64,
        runtime: runtime.handle().clone(),
    };
    let started = Instant::now();
    let greedy = prism_model::SamplingParams::greedy(config.rollout.max_new_tokens, eos.clone());
    let graded = evaluator.grade(&loaded.model, &loaded.tokenizer, &greedy).map_err(anyhow::Error::msg)?;
    let (report, _) = summarize(&graded, 1);
    println!("model: {source}");
    println!("task: {} ({} problems)", task.name(), report.problems);
    println!("accuracy (greedy): {:.1}%", report.accuracy * 100.0);
    if let Some(s) = report.step_accuracy {
        println!("step accuracy (greedy): {:.1}%", s * 100.0);
    }
    let mut sampled = None;
    if args.k > 1 {
        let params = prism_model::SamplingParams {
            n: args.k,
            temperature: args.temperature,
            max_new_tokens: config.rollout.max_new_tokens,
            eos,
            seed: config.run.seed,
            ..Default::default()
        };
        let graded = evaluator.grade(&loaded.model, &loaded.tokenizer, &params).map_err(anyhow::Error::msg)?;
        let (_, pass) = summarize(&graded, args.k);
        println!("pass@{} (temperature {}): {:.1}%", args.k, args.temperature, pass * 100.0);
        sampled = Some(graded);
    }
    println!("time: {:.1} s", started.elapsed().as_secs_f64());
    if let Some(out) = &args.out {
        let mut f = std::io::BufWriter::new(std::fs::File::create(out).with_context(|| format!("{}: cannot create", out.display()))?);
        for (i, g) in graded.iter().enumerate() {
            let samples = sampled.as_ref().map(|s| &s[i].samples);
            writeln!(
                f,
                "{}",
                serde_json::json!({
                    "problem": g.prompt.problem,
                    "reference": g.prompt.reference,
                    "greedy": g.samples.first().map(|(text, label)| serde_json::json!({"text": text, "label": label})),
                    "samples": samples.map(|s| s.iter().map(|(text, label)| serde_json::json!({"text": text, "outcome": label.outcome})).collect::<Vec<_>>()),
                })
            )?;
        }
        println!("predictions: {}", out.display());
    }
    Ok(())
}

/// A run folder means its newest intact checkpoint; anything else is a model source.
fn resolve_checkpoint(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    let checkpoints = path.join("checkpoints");
    if checkpoints.is_dir() {
        let (found, rejected) = prism_learner::checkpoint::latest_intact(&checkpoints)?;
        for r in rejected {
            eprintln!("prism eval: skipped damaged checkpoint {r}");
        }
        return found.map(|c| c.path).ok_or_else(|| anyhow::anyhow!("{}: no intact checkpoint", checkpoints.display()));
    }
    Ok(path.to_path_buf())
}
