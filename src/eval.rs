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
        cfg.url,
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
