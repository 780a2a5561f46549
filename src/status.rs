//! `prism status`: asks a learner's Control service for the cluster's state and
//! prints it, one worker per line, grouped by role; under a reward worker with
//! a judge, a line of its reward health.

use crate::config::Config;
use prism_transport::control::{ClusterStatus, ControlClient, Role, WorkerState, WorkerStatus};
use prism_transport::grpc::Token;
use std::fmt::Write as _;
use std::process::ExitCode;

/// Exit code when the learner cannot be reached or refuses (`EX_UNAVAILABLE`).
const EXIT_UNAVAILABLE: u8 = 69;

pub fn run(config: &Config, learner: Option<&str>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("prism status: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let token = Token::from_config(&config.grpc)?;
        let mut client = ControlClient::connect(&config.grpc, learner, token.as_ref()).await?;
        client.status().await
    });
    match result {
        Ok(status) => {
            print!("{}", render(&status));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("prism status: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// The status as `prism status` prints it.
pub fn render(s: &ClusterStatus) -> String {
    let mut out = String::new();
    let dropped = if s.dropped.is_empty() {
        "none".to_string()
    } else {
        let mut d: Vec<_> = s.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
        d.sort();
        d.join(", ")
    };
    let _ = writeln!(
        out,
        "run {}: policy version {}, step {}/{}, trained {} trajectories, dropped {}{}",
        s.run_id,
        s.policy_version,
        s.step,
        s.total_steps,
        s.trajectories_trained,
        dropped,
        if s.shutting_down { " (shutting down)" } else { "" }
    );
    for q in &s.queues {
        let _ = writeln!(out, "queue {}: {} waiting, {} in flight", q.stream, q.waiting, q.pending);
    }
    for role in Role::ALL {
        let workers: Vec<&WorkerStatus> = s.workers.iter().filter(|w| w.role == role).collect();
        let name = match role {
            // Data-parallel ranks beside rank 0 (shown only when there are some).
            Role::Learner if workers.is_empty() => continue,
            Role::Learner => "learner rank",
            Role::Rollout => "rollout",
            Role::Reward => "reward",
        };
        let alive = workers.iter().filter(|w| w.state == WorkerState::Alive).count();
        let _ = writeln!(out, "{name} workers: {alive} alive of {}", workers.len());
        for w in workers {
            let c = w.counters;
            let state = w.state.name();
            let _ = writeln!(
                out,
                "  {:<18} {:<5} policy v{} (lag {}), {} done ({:.1}/s), {} in flight, {} dropped, seen {:.1} s ago  [{} {}]",
                w.worker_id,
                state,
                w.policy_version,
                w.lag,
                c.processed,
                w.throughput,
                c.in_flight,
                c.dropped,
                w.last_seen_ms as f64 / 1000.0,
                w.name,
                if w.nccl_rank > 0 { format!("{}, nccl rank {}", w.device, w.nccl_rank) } else { w.device.clone() }
            );
            if let Some(h) = &w.reward_health {
                let _ = writeln!(out, "    {}: {}", w.worker_id, reward_health(h));
            }
        }
    }
    out
}

/// A reward worker's health on one line, e.g. `judge p50 1480 ms p95 2900 ms |
/// queue 12/1024 shed 3 | canary fp 0.00 | judge trusted | distill agreement
/// 0.87 (ready)`; parts the worker did not report are left out.
pub fn reward_health(h: &prism_reward::Health) -> String {
    let mut parts = Vec::new();
    match (&h.judge_latency_ms, h.judge_wait_ms) {
        (Some(l), _) => parts.push(format!("judge p50 {:.0} ms p95 {:.0} ms", l.p50, l.p95)),
        (None, Some(_)) => parts.push("judge no verdicts yet".to_string()),
        (None, None) => {}
    }
    match (&h.annotation_queue, h.judge_wait_ms) {
        (Some(q), _) => parts.push(format!("queue {}/{} shed {}", q.depth, q.capacity, q.shed)),
        (None, Some(wait)) if wait > 0 => parts.push(format!("labels wait up to {wait} ms for the judge")),
        _ => {}
    }
    if let Some(rate) = h.canary_fp_rate {
        match h.canary_max_rate {
            Some(max) if rate > max => parts.push(format!("canary fp {rate:.2} (over {max:.2})")),
            _ => parts.push(format!("canary fp {rate:.2}")),
        }
    }
    match h.judge_trusted {
        Some(true) => parts.push("judge trusted".to_string()),
        Some(false) => parts.push("judge distrusted (fallback scores)".to_string()),
        None => {}
    }
    if h.distill_agreement.is_some() || h.distill_ready.is_some() {
        let agreement = h.distill_agreement.map_or_else(|| "-".to_string(), |a| format!("{a:.2}"));
        let ready = match (h.distill_ready, h.distill_min_agreement) {
            (Some(true), _) => " (ready)".to_string(),
            (Some(false), Some(min)) => format!(" (not ready, needs {min:.2})"),
            (Some(false), None) => " (not ready)".to_string(),
            (None, _) => String::new(),
        };
        parts.push(format!("distill agreement {agreement}{ready}"));
    }
    if let Some(refused) = h.judge_budget_refused.filter(|n| *n > 0) {
        parts.push(format!("budget refused {refused} groups"));
    }
    if parts.is_empty() { "no reward health reported".to_string() } else { parts.join(" | ") }
}
