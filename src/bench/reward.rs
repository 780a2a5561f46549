//! `prism bench reward`: labeling throughput against a loopback judge that
//! answers every request after a fixed delay. With `c` requests in flight and a
//! delay `d`, no client can exceed `c / d` requests per second; the benchmark
//! reports how close the labeler gets to that bound, and the CPU it spends.

use crate::config::Config;
use prism_reward::config::{Fallback, Process};
use prism_reward::testkit::{self, Reply, Scripted, TestServer, TokenSpec};
use prism_reward::{Labeler, judge};
use std::process::ExitCode;
use std::sync::Arc;

/// Options of `prism bench reward`.
#[derive(Debug, Clone, clap::Args)]
pub struct RewardArgs {
    #[command(flatten)]
    pub common: crate::config::ConfigArgs,
    /// Judge requests to time.
    #[arg(long, default_value_t = 3200)]
    pub requests: usize,
    /// Judge requests in flight (`judge.concurrency`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// How long the loopback judge takes to answer, ms.
    #[arg(long, default_value_t = 200)]
    pub delay_ms: u64,
    /// Steps per trajectory (one judge request each).
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
}
use std::time::{Duration, Instant};

pub fn reward(config: &Config, args: &RewardArgs) -> ExitCode {
    match run(config, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prism bench reward: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A GenPRM-style reply with logprobs at the verdict, as a real server sends.
fn reply_body() -> String {
    let tok = |t: &str, lp: f32, top: &[(&str, f32)]| TokenSpec {
        token: t.into(),
        logprob: lp,
        top: top.iter().map(|(s, l)| (s.to_string(), *l)).collect(),
    };
    testkit::chat_logprobs(&[vec![
        tok("The step restates the problem and computes correctly", -0.3, &[]),
        tok(". \\boxed{", -0.01, &[]),
        tok("Yes", -0.1, &[("Yes", -0.1), (" Yes", -2.5), ("No", -2.4)]),
        tok("}", 0.0, &[]),
    ]])
}

fn trajectory(id: u64, steps: usize) -> prism_core::Trajectory {
    let mut completion = String::new();
    for k in 1..=steps {
        if k < steps {
            completion.push_str(&format!("Step {k}: multiply {id} by {k} to get {}.\n", id * k as u64));
        } else {
            completion.push_str(&format!("Step {k}: so the answer is \\boxed{{{}}}.\n", id * k as u64));
        }
    }
    let answer = (id * steps as u64).to_string();
    testkit::trajectory(id, "bench", &format!("Problem {id}: what is {id} times {steps}?"), Some(&answer), &completion)
}

fn run(config: &Config, args: &RewardArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.steps > 0 && args.requests > 0 && args.concurrency > 0,
        "--steps, --requests and --concurrency must be > 0"
    );
    let body = reply_body();
    let delay = Duration::from_millis(args.delay_ms);
    let server = TestServer::start(move |_| Scripted { delay, reply: Reply::ok(body.clone()) })?;
    let judge_cfg = judge::Config {
        url: server.url(),
        concurrency: args.concurrency,
        canary_every: 0,
        samples: 1,
        template: judge::Style::Genprm,
        timeout_ms: config.judge.timeout_ms.max(args.delay_ms * 10),
        ..config.judge.clone()
    };
    let reward_cfg = prism_reward::Config {
        process: Process::Judge,
        fallback: Fallback::Verifier,
        deadline_ms: config.reward.deadline_ms.max(3_600_000),
        ..config.reward.clone()
    };
    let labeler = Arc::new(Labeler::new(&reward_cfg, &judge_cfg, &config.distill)?);
    let runtime = tokio::runtime::Runtime::new()?;
    let bound = args.concurrency as f64 / delay.as_secs_f64().max(1e-9);
    let trajectories = args.requests.div_ceil(args.steps) as u64;
    runtime.block_on(async {
        // Warm-up: open the connections, untimed.
        let warm = (args.concurrency as usize).div_ceil(args.steps) as u64;
        label_all(&labeler, 1_000_000_000..1_000_000_000 + warm, args.steps).await?;
        let requests_before = server.requests();
        let judged_before = labeler.metrics().sources.judge;
        let cpu_before = testkit::process_cpu_seconds();
        let started = Instant::now();
        label_all(&labeler, 0..trajectories, args.steps).await?;
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = testkit::process_cpu_seconds();
        let requests = server.requests() - requests_before;
        let m = labeler.metrics();
        let j = m.judge.clone().ok_or_else(|| anyhow::anyhow!("the labeler has no judge"))?;
        let server_stats = server.stop();
        let rate = requests as f64 / wall;
        println!(
            "reward bench: {requests} judge requests ({trajectories} trajectories x {} steps), {} in flight, judge answers after {} ms",
            args.steps, args.concurrency, args.delay_ms
        );
        println!(
            "throughput: {rate:.1} requests/s = {:.1}% of the {bound:.0} requests/s bound; {:.1} labels/s; wall {wall:.2} s",
            100.0 * rate / bound,
            trajectories as f64 / wall
        );
        match (cpu_before, cpu_after, server_stats.cpu_seconds) {
            (Some(a), Some(b), Some(server_cpu)) => {
                // The server's thread ran the whole time; its CPU during warm-up is
                // small and counted here, so the client figure is a lower bound.
                let client = (b - a - server_cpu).max(0.0);
                println!(
                    "cpu: client {client:.2} s ({:.1}% of one core, {:.0} us per request); loopback server {server_cpu:.2} s",
                    100.0 * client / wall,
                    1e6 * client / requests.max(1) as f64
                );
            }
            _ => println!("cpu: not measured (needs Linux /proc)"),
        }
        println!(
            "judge: latency p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms; {} failed calls, {} retries; steps scored by the judge {}",
            j.latency_ms_p50,
            j.latency_ms_p95,
            j.latency_ms_max,
            j.failed_calls,
            j.retries,
            m.sources.judge - judged_before
        );
        anyhow::ensure!(j.failed_calls == 0, "{} judge calls failed", j.failed_calls);
        Ok(())
    })
}

async fn label_all(labeler: &Arc<Labeler>, ids: std::ops::Range<u64>, steps: usize) -> anyhow::Result<()> {
    let tasks: Vec<_> = ids
        .map(|id| {
            let labeler = labeler.clone();
            tokio::spawn(async move { labeler.label(&trajectory(id, steps)).await })
        })
        .collect();
    for t in tasks {
        let label = t.await?;
        anyhow::ensure!(label.steps.len() == steps, "a trajectory got {} steps, expected {steps}", label.steps.len());
    }
    Ok(())
}
