//! Metrics: the run's ledger, `metrics.jsonl`, and the live progress snapshot.
//!
//! Every trajectory is counted when made, and again when it is trained on,
//! dropped (with the reason), or found in flight at shutdown; the [`Ledger`]
//! says whether those add up.

use crate::backend::{DropReason, EvalReport, Label, StepReport};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Where each trajectory ended up.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ledger {
    pub made: u64,
    pub trained: u64,
    pub dropped: BTreeMap<String, u64>,
    pub in_flight: BTreeMap<String, u64>,
    /// Stream entries that did not decode (garbage, or written by another
    /// version): acknowledged and dropped. They name no trajectory, so they
    /// are outside the balance; the groups they belonged to are dropped as
    /// `incomplete`.
    pub undecodable_entries: u64,
    /// Trajectories stopped early at a step boundary (`rollout.reject_below`)
    /// and their tokens. They are made and then trained on or dropped like
    /// any other, so they are inside the balance, not beside it.
    pub rejected: u64,
    pub rejected_tokens: u64,
}

impl Ledger {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    pub fn in_flight_total(&self) -> u64 {
        self.in_flight.values().sum()
    }

    /// made = trained + dropped + in flight.
    pub fn balanced(&self) -> bool {
        self.made == self.trained + self.dropped_total() + self.in_flight_total()
    }
}

impl std::fmt::Display for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |m: &BTreeMap<String, u64>| {
            if m.is_empty() { "none".to_string() } else { m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ") }
        };
        write!(
            f,
            "made {} = trained {} + dropped {} ({}) + in flight {} ({}){}{}{}",
            self.made,
            self.trained,
            self.dropped_total(),
            list(&self.dropped),
            self.in_flight_total(),
            list(&self.in_flight),
            if self.undecodable_entries > 0 { format!("; {} undecodable entries dropped", self.undecodable_entries) } else { String::new() },
            if self.rejected > 0 { format!("; {} rejected early ({} tokens)", self.rejected, self.rejected_tokens) } else { String::new() },
            if self.balanced() { "" } else { "  — DOES NOT BALANCE" }
        )
    }
}

/// How many of `trajectories` were rejected early, and their tokens.
pub fn rejected<'a>(trajectories: impl Iterator<Item = &'a prism_core::Trajectory>) -> (u64, u64) {
    trajectories
        .filter(|t| t.finish == prism_core::FinishReason::Rejected)
        .fold((0, 0), |(n, tokens), t| (n + 1, tokens + t.tokens.len() as u64))
}

/// The live view the progress line draws.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub reward: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub step_accuracy: Option<f64>,
    pub mean_lag: Option<f64>,
    /// Share of the last step's step scores that came from the judge (live or
    /// cached), when a judge is configured.
    pub judge_share: Option<f64>,
    /// Share of the last step's step scores that came from the distilled
    /// model, when there is one.
    pub distilled_share: Option<f64>,
    /// The distilled model's agreement with the judge on held-out steps.
    pub distill_agreement: Option<f64>,
    /// False while the canary gate has turned judge scores off.
    pub judge_trusted: Option<bool>,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub ledger: Ledger,
}

/// One learner step, as the learner actor saw it.
#[derive(Debug, Clone)]
pub struct StepEvent {
    pub version: u64,
    pub report: StepReport,
    /// Versions behind, one per trained group.
    pub lags: Vec<u64>,
    /// Mean outcome score of the trained samples.
    pub reward: f64,
    /// Share of the trained samples whose outcome was correct (score ≥ 0.5).
    pub accuracy: f64,
    /// Share of scored steps judged correct, when steps were scored.
    pub step_accuracy: Option<f64>,
    /// Step scores of the trained samples by source (`judge`, `cache`,
    /// `distilled`, `verifier`, `guard`, `unknown`).
    pub sources: BTreeMap<&'static str, u64>,
    /// Seconds the learner spent training (not waiting).
    pub train_s: f64,
    /// Seconds the learner waited for labeled groups before this step.
    pub wait_s: f64,
    /// The prompt source's curriculum after this step's groups retired.
    pub curriculum: Option<prism_rollout::curriculum::State>,
    /// Trained completion tokens by how many versions behind the learner the
    /// version that sampled each was (with in-flight weight updates one
    /// trajectory's tokens can have several).
    pub token_lags: BTreeMap<u64, u64>,
}

/// Versions behind `current`, per completion token of `trajectories`:
/// lag → tokens.
pub fn token_lags<'a>(trajectories: impl Iterator<Item = &'a prism_core::Trajectory>, current: prism_core::PolicyVersion) -> BTreeMap<u64, u64> {
    let mut lags = BTreeMap::new();
    for t in trajectories {
        for v in t.token_versions() {
            *lags.entry(v.lag_behind(current)).or_default() += 1;
        }
    }
    lags
}

pub enum MetricsMsg {
    /// A rollout worker produced trajectories.
    TrajectoriesMade { count: u64, tokens: u64, generate_s: f64 },
    /// Trajectories stopped early by rollout.reject_below, and their tokens.
    Rejected { trajectories: u64, tokens: u64 },
    /// The reward pool labeled trajectories.
    Labeled { count: u64, label_s: f64 },
    Dropped { reason: DropReason, trajectories: u64 },
    StepCompleted(Box<StepEvent>),
    Evaluated { version: u64, eval: EvalReport },
    /// Stream entries that did not decode were dropped.
    Undecodable { entries: u64 },
    /// What a stage still held when the run stopped.
    InFlightAtShutdown { stage: &'static str, trajectories: u64 },
    ActorRestarted { actor: String, error: String },
    GetLedger(RpcReplyPort<Ledger>),
    /// Flush and reply (end of run).
    Flush(RpcReplyPort<()>),
}

pub struct Metrics;

pub struct MetricsArgs {
    /// `metrics.jsonl` to append to; none for runs without a folder.
    pub path: Option<PathBuf>,
    pub progress: watch::Sender<Progress>,
    /// The labeler whose reward health each step row carries (a local run's;
    /// none where labeling happens in other processes).
    pub labeler: Option<Arc<dyn Label>>,
}

pub struct MetricsState {
    file: Option<std::io::BufWriter<std::fs::File>>,
    progress: watch::Sender<Progress>,
    ledger: Ledger,
    started: Instant,
    tokens: u64,
    generate_s: f64,
    labeled: u64,
    label_s: f64,
    restarts: u64,
    labeler: Option<Arc<dyn Label>>,
    last: Progress,
    /// Retired and uniform groups at the previous step row.
    retired_before: (u64, u64),
}

impl MetricsState {
    fn write(&mut self, value: serde_json::Value) {
        if let Some(f) = &mut self.file {
            if let Err(e) = writeln!(f, "{value}").and_then(|_| f.flush()) {
                tracing::warn!(error = %e, "cannot write metrics.jsonl");
            }
        }
    }

    fn publish(&mut self) {
        self.last.ledger = self.ledger.clone();
        self.last.elapsed_s = self.started.elapsed().as_secs_f64();
        self.last.tokens_per_s = self.tokens as f64 / self.last.elapsed_s.max(1e-9);
        let _ = self.progress.send(self.last.clone());
    }
}

impl Actor for Metrics {
    type Msg = MetricsMsg;
    type State = MetricsState;
    type Arguments = MetricsArgs;

    async fn pre_start(&self, _myself: ActorRef<MetricsMsg>, args: MetricsArgs) -> Result<MetricsState, ActorProcessingErr> {
        let file = match &args.path {
            Some(p) => Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| format!("{}: {e}", p.display()))?,
            )),
            None => None,
        };
        Ok(MetricsState {
            file,
            progress: args.progress,
            ledger: Ledger::default(),
            started: Instant::now(),
            tokens: 0,
            generate_s: 0.0,
            labeled: 0,
            label_s: 0.0,
            restarts: 0,
            retired_before: (0, 0),
            labeler: args.labeler,
            last: Progress::default(),
        })
    }

    async fn handle(&self, _myself: ActorRef<MetricsMsg>, msg: MetricsMsg, state: &mut MetricsState) -> Result<(), ActorProcessingErr> {
        match msg {
            MetricsMsg::TrajectoriesMade { count, tokens, generate_s } => {
                state.ledger.made += count;
                state.tokens += tokens;
                state.generate_s += generate_s;
                state.publish();
            }
            MetricsMsg::Rejected { trajectories, tokens } => {
                state.ledger.rejected += trajectories;
                state.ledger.rejected_tokens += tokens;
            }
            MetricsMsg::Labeled { count, label_s } => {
                state.labeled += count;
                state.label_s += label_s;
            }
            MetricsMsg::Dropped { reason, trajectories } => {
                *state.ledger.dropped.entry(reason.as_str().to_string()).or_default() += trajectories;
                tracing::debug!(reason = reason.as_str(), trajectories, "dropped");
            }
            MetricsMsg::StepCompleted(e) => {
                state.ledger.trained += e.report.trajectories as u64;
                let mean_lag = if e.lags.is_empty() { 0.0 } else { e.lags.iter().sum::<u64>() as f64 / e.lags.len() as f64 };
                let mut lag_hist = BTreeMap::new();
                for l in &e.lags {
                    *lag_hist.entry(l.to_string()).or_insert(0u64) += 1;
                }
                state.last.step = e.version;
                state.last.reward = Some(e.reward);
                state.last.step_accuracy = e.step_accuracy;
                state.last.mean_lag = Some(mean_lag);
                let token_lag_mean = {
                    let tokens: u64 = e.token_lags.values().sum();
                    e.token_lags.iter().map(|(lag, n)| lag * n).sum::<u64>() as f64 / tokens.max(1) as f64
                };
                let elapsed = state.started.elapsed().as_secs_f64();
                let mut line = serde_json::json!({
                    "kind": "step",
                    "step": e.version,
                    "time_s": elapsed,
                    "reward": e.reward,
                    "train_accuracy": e.accuracy,
                    "step_accuracy": e.step_accuracy,
                    "trajectories": e.report.trajectories,
                    "lag_mean": mean_lag,
                    "lag_max": e.lags.iter().copied().max().unwrap_or(0),
                    "lag_hist": lag_hist,
                    "token_lag_mean": token_lag_mean,
                    "token_lag_hist": e.token_lags.iter().map(|(lag, n)| (lag.to_string(), *n)).collect::<BTreeMap<String, u64>>(),
                    "train_s": e.train_s,
                    "wait_s": e.wait_s,
                    "made": state.ledger.made,
                    "trained": state.ledger.trained,
                    "dropped": state.ledger.dropped,
                    "rejected": state.ledger.rejected,
                    "rejected_tokens": state.ledger.rejected_tokens,
                    "rollout_tokens_per_s": state.tokens as f64 / elapsed.max(1e-9),
                    "rollout_busy_s": state.generate_s,
                    "reward_busy_s": state.label_s,
                    "trained_per_s": state.ledger.trained as f64 / elapsed.max(1e-9),
                    "restarts": state.restarts,
                });
                for (k, v) in &e.report.stats {
                    line[k.as_str()] = serde_json::json!(v);
                }
                if let Some(c) = &e.curriculum {
                    // Groups retired since the last row (trained or dropped
                    // with a known pass rate), and the share all pass or all
                    // fail: the rollout work GRPO cannot use.
                    let groups = c.groups.saturating_sub(state.retired_before.0);
                    let uniform = c.uniform_groups.saturating_sub(state.retired_before.1);
                    state.retired_before = (c.groups, c.uniform_groups);
                    line["retired_groups"] = serde_json::json!(groups);
                    line["uniform_share"] = serde_json::json!((groups > 0).then(|| uniform as f64 / groups as f64));
                    line["skipped_prompts"] = serde_json::json!(c.skipped);
                    line["difficulty"] = serde_json::json!(c.level);
                }
                if !e.sources.is_empty() {
                    line["reward_sources"] = serde_json::json!(e.sources);
                }
                if let Some(health) = state.labeler.as_ref().and_then(|l| l.health()) {
                    let judged = e.sources.get("judge").copied().unwrap_or(0) + e.sources.get("cache").copied().unwrap_or(0);
                    let scored: u64 = e.sources.values().sum();
                    state.last.judge_share =
                        (scored > 0 && health.contains_key("judge_trusted")).then(|| judged as f64 / scored as f64);
                    let distilled = e.sources.get("distilled").copied().unwrap_or(0);
                    state.last.distilled_share =
                        (scored > 0 && health.contains_key("distill_ready")).then(|| distilled as f64 / scored as f64);
                    state.last.distill_agreement = health.get("distill_agreement").and_then(|v| v.as_f64());
                    state.last.judge_trusted = health.get("judge_trusted").and_then(|v| v.as_bool());
                    for (k, v) in health {
                        line[k.as_str()] = v;
                    }
                }
                tracing::info!(step = e.version, reward = e.reward, lag = mean_lag, "learner step");
                state.write(line);
                state.publish();
            }
            MetricsMsg::Evaluated { version, eval } => {
                state.last.eval_accuracy = Some(eval.accuracy);
                let elapsed = state.started.elapsed().as_secs_f64();
                state.write(serde_json::json!({
                    "kind": "eval",
                    "step": version,
                    "time_s": elapsed,
                    "eval_accuracy": eval.accuracy,
                    "eval_step_accuracy": eval.step_accuracy,
                    "eval_problems": eval.problems,
                }));
                tracing::info!(step = version, accuracy = eval.accuracy, "evaluation");
                state.publish();
            }
            MetricsMsg::Undecodable { entries } => {
                state.ledger.undecodable_entries += entries;
            }
            MetricsMsg::InFlightAtShutdown { stage, trajectories } => {
                *state.ledger.in_flight.entry(stage.to_string()).or_default() += trajectories;
            }
            MetricsMsg::ActorRestarted { actor, error } => {
                state.restarts += 1;
                state.write(serde_json::json!({
                    "kind": "restart",
                    "time_s": state.started.elapsed().as_secs_f64(),
                    "actor": actor,
                    "error": error,
                }));
            }
            MetricsMsg::GetLedger(reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(state.ledger.clone());
                }
            }
            MetricsMsg::Flush(reply) => {
                state.publish();
                if let Some(f) = &mut state.file {
                    let _ = f.flush();
                }
                if !reply.is_closed() {
                    let _ = reply.send(());
                }
            }
        }
        Ok(())
    }
}
