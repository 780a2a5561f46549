//! `prism bench judge-server`: the realistic judge
//! ([`prism_reward::testkit::realistic`]) as a standalone OpenAI-compatible
//! server, for benchmarks that point `judge.url` at it. It grades the
//! arithmetic task's steps with the step checker, flips verdicts, answers
//! after a log-normal latency through a fixed number of slots and fails a
//! share of calls.
//!
//! Prints its base URL on stdout, serves until Ctrl-C or SIGTERM, then prints
//! its counters as one JSON line. SIGUSR1 starts an outage (the listener is
//! closed and open connections are reset) or ends it (the same port is
//! listened on again), so a benchmark can take the judge down and bring it
//! back without losing its counters: `kill -USR1 <pid>`.

use crate::config::EXIT_CONFIG;
use anyhow::Context;
use prism_reward::testkit::realistic::{Config, RealisticJudge};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

/// Options of `prism bench judge-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct JudgeServerArgs {
    #[command(flatten)]
    pub common: crate::config::ConfigArgs,
    /// Address to listen on; only a loopback address unless `--allow-remote`.
    #[arg(long, default_value = "127.0.0.1:8011")]
    pub listen: SocketAddr,
    /// Listen on a non-loopback address (anyone who can reach it can use the judge).
    #[arg(long)]
    pub allow_remote: bool,
    /// Mean service time of a request, ms (queue wait comes on top).
    #[arg(long, default_value_t = Config::default().latency_mean_ms)]
    pub latency_ms: f64,
    /// Spread of the service time: sigma of its logarithm (0 = constant).
    #[arg(long, default_value_t = Config::default().latency_sigma)]
    pub latency_sigma: f64,
    /// Probability that a verdict is flipped.
    #[arg(long, default_value_t = Config::default().flip_p)]
    pub flip: f64,
    /// Requests served at once; the rest wait in a queue.
    #[arg(long, default_value_t = Config::default().concurrency)]
    pub concurrency: usize,
    /// Share of requests that fail (after their service time).
    #[arg(long, default_value_t = Config::default().fail_share)]
    pub fail: f64,
    /// Of the failures, the share answered with HTTP 500/503; the rest are connection resets.
    #[arg(long, default_value_t = Config::default().fail_status_share)]
    pub fail_status: f64,
    /// Probability that a content-free step (a canary) is accepted.
    #[arg(long, default_value_t = Config::default().canary_accept_p)]
    pub canary_accept: f64,
    /// Seed of the verdict flips, latencies and failures.
    #[arg(long, default_value_t = Config::default().seed)]
    pub seed: u64,
}

impl JudgeServerArgs {
    fn config(&self) -> Config {
        Config {
            listen: self.listen,
            latency_mean_ms: self.latency_ms,
            latency_sigma: self.latency_sigma,
            flip_p: self.flip,
            concurrency: self.concurrency,
            fail_share: self.fail,
            fail_status_share: self.fail_status,
            canary_accept_p: self.canary_accept,
            seed: self.seed,
            ..Config::default()
        }
    }
}

pub fn judge_server(args: &JudgeServerArgs) -> ExitCode {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        eprintln!(
            "prism bench judge-server: --listen {} is not a loopback address; pass --allow-remote to serve it",
            args.listen
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    let cfg = args.config();
    if let Err(e) = cfg.validate() {
        eprintln!("prism bench judge-server: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prism bench judge-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let listen = cfg.listen;
    let judge = RealisticJudge::start(cfg).with_context(|| format!("listening on {listen}"))?;
    println!("{}", judge.url());
    std::io::stdout().flush()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve_until_signalled(&judge))?;
    let stats = judge.stop();
    println!("{}", serde_json::to_string(&stats)?);
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM, toggling an outage at each SIGUSR1.
#[cfg(unix)]
async fn serve_until_signalled(judge: &RealisticJudge) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = usr1.recv() => {
                if judge.is_paused() {
                    judge.resume().context("resuming")?;
                    eprintln!("prism bench judge-server: outage over, listening on {} again", judge.addr());
                } else {
                    judge.pause().context("pausing")?;
                    eprintln!("prism bench judge-server: outage begun, connections refused (SIGUSR1 ends it)");
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn serve_until_signalled(_judge: &RealisticJudge) -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}
