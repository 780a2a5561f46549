//! Command-line interface: one binary, one subcommand per role or tool.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "prism", version, about = "Reinforcement learning for language models, with process rewards")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a policy in one process (the embedded default when no config is given).
    Train(TrainArgs),
    /// Run the learner role of a distributed run.
    Learner(TrainArgs),
    /// Run a data-parallel learner rank of a distributed run (dist.learner_ranks > 1, GPUs).
    LearnerRank(ConfigArgs),
    /// Run a rollout worker process of a distributed run.
    Rollout(ConfigArgs),
    /// Run a reward worker process of a distributed run.
    Reward(ConfigArgs),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(ServeArgs),
    /// Evaluate a checkpoint on a task, or a judge on ProcessBench.
    Eval(EvalArgs),
    /// Draw the plots and timeline of a run folder.
    Report(ReportArgs),
    /// Export a checkpoint or GGUF file as a Hugging Face model folder.
    Export(ExportArgs),
    /// Run a benchmark.
    Bench(BenchArgs),
    /// Check the installation: libtorch, CUDA, NCCL, Redis, threads.
    Doctor(ConfigArgs),
    /// Show a distributed run: workers by role, policy versions, queues, lag, throughput.
    Status(StatusArgs),
    /// The memory a learner rank needs for a model, per dist.shard setting, and whether it fits a GPU.
    Plan(crate::plan::PlanArgs),
}

pub use crate::config::ConfigArgs;

/// Options of `prism serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model to serve: HF folder, .gguf file or builtin preset (overrides `model.source`).
    #[arg(long)]
    pub model: Option<String>,
    /// Listen address (overrides `serve.addr`).
    #[arg(long)]
    pub addr: Option<String>,
    #[command(flatten)]
    pub common: ConfigArgs,
}

/// Options of `prism export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// A checkpoint or HF folder, a .gguf file, or a builtin preset.
    #[arg(long)]
    pub from: String,
    /// The folder to write (created if needed).
    #[arg(long)]
    pub to: PathBuf,
    #[command(flatten)]
    pub common: ConfigArgs,
}

/// `prism bench <what>`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// Generation throughput against transformers on the same workload.
    Generate(crate::bench::GenerateArgs),
    /// Training throughput against the same step in PyTorch eager.
    Train(crate::bench::train::TrainArgs),
    /// The rollout engine on the run's task: one batch at a time against continuous batching.
    Rollout(crate::bench::rollout::RolloutArgs),
    /// Labeling throughput against a loopback judge that answers after a fixed delay.
    Reward(crate::bench::reward::RewardArgs),
    /// A realistic OpenAI-compatible judge for benchmarks: grades arithmetic steps, flips
    /// verdicts, answers slowly through a few slots and fails some calls.
    JudgeServer(crate::bench::judge_server::JudgeServerArgs),
}

impl Command {
    /// The subcommand's name and its common options.
    pub fn parts(&self) -> (&'static str, &ConfigArgs) {
        match self {
            Command::Train(a) => ("train", &a.common),
            Command::Learner(a) => ("learner", &a.common),
            Command::LearnerRank(a) => ("learner-rank", a),
            Command::Rollout(a) => ("rollout", a),
            Command::Reward(a) => ("reward", a),
            Command::Serve(a) => ("serve", &a.common),
            Command::Eval(a) => ("eval", a.common()),
            Command::Report(a) => ("report", &a.common),
            Command::Export(a) => ("export", &a.common),
            Command::Bench(a) => match &a.what {
                BenchCommand::Generate(g) => ("bench", &g.common),
                BenchCommand::Train(t) => ("bench", &t.common),
                BenchCommand::Reward(r) => ("bench", &r.common),
                BenchCommand::Rollout(r) => ("bench", &r.common),
                BenchCommand::JudgeServer(j) => ("bench", &j.common),
            },
            Command::Doctor(a) => ("doctor", a),
            Command::Status(a) => ("status", &a.common),
            Command::Plan(a) => ("plan", &a.common),
        }
    }
}

/// `prism report RUN_DIR`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The run folder, e.g. `runs/20261126-091840-0ab1`.
    #[arg(value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// Where to write the plots and timeline (default `RUN_DIR/report`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `prism status [--learner ADDR]`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The learner's gRPC address, e.g. `http://127.0.0.1:50051` (default `grpc.learner`).
    #[arg(long, value_name = "ADDR")]
    pub learner: Option<String>,
}

/// `prism eval --checkpoint DIR` or `prism eval processbench ...`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub what: Option<EvalCommand>,
    #[command(flatten)]
    pub checkpoint: CheckpointEvalArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum EvalCommand {
    /// Score a judge on ProcessBench: can it find the first wrong step?
    Processbench(ProcessBenchArgs),
}

impl EvalArgs {
    pub fn common(&self) -> &ConfigArgs {
        match &self.what {
            Some(EvalCommand::Processbench(a)) => &a.common,
            None => &self.checkpoint.common,
        }
    }
}

/// `prism eval --checkpoint DIR [--task ...]`: held-out accuracy and pass@k of a policy.
#[derive(Debug, Clone, Args)]
pub struct CheckpointEvalArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// A checkpoint folder, a run folder (its newest intact checkpoint), an HF
    /// folder, a `.gguf` file or a builtin preset (default: `model.source`).
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// `arithmetic` (the held-out problems), `gsm8k` (GSM8K test from the data
    /// folder) or `jsonl` (`task.jsonl`). Default: `task.kind`.
    #[arg(long, value_name = "TASK")]
    pub task: Option<String>,
    /// Problems evaluated (default: `train.eval_problems`; all of GSM8K test with `--problems 0`).
    #[arg(long, value_name = "N")]
    pub problems: Option<usize>,
    /// Also sample K completions per problem (at `--temperature`) for pass@K.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub k: usize,
    /// Sampling temperature for pass@K.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Write one JSON line per problem (completions and labels) here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `prism eval processbench --judge URL --model NAME --data FILE`.
#[derive(Debug, Clone, Args)]
pub struct ProcessBenchArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// The judge's OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`
    /// (default: `judge.url`).
    #[arg(long, value_name = "URL")]
    pub judge: Option<String>,
    /// The judge's model name (default: `judge.model`).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// ProcessBench items: a JSON array or JSON lines, e.g. `../shared/data/processbench/gsm8k.json`.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Only the first N items.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// `genprm`, `thinkprm`, or a Jinja template file read with the `judge.template`
    /// style (default: `judge.template`, `judge.template_file`).
    #[arg(long, value_name = "NAME|FILE")]
    pub template: Option<String>,
    /// Where to write one JSON line per item (default
    /// `processbench-<data file stem>.jsonl` in the current folder).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Items judged at once (default: `judge.concurrency`); the judge's request
    /// limit applies on top.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
}

/// `prism train [--resume RUN_DIR]`.
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Continue a run from its newest intact checkpoint, with the configuration it
    /// recorded (unless `--config` is given; `--set` still applies, e.g.
    /// `--set train.steps=2000`).
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "resume_latest")]
    pub resume: Option<PathBuf>,
    /// Continue the newest run under `run.dir` of this `dist.run_id` that has a
    /// checkpoint (with this command's configuration), or start a new run if
    /// there is none: what a supervisor that restarts a crashed learner
    /// (Kubernetes, compose) runs.
    #[arg(long)]
    pub resume_latest: bool,
}
