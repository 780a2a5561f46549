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
    Train(ConfigArgs),
    /// Run the learner role of a distributed run.
    Learner(ConfigArgs),
    /// Run a rollout worker process of a distributed run.
    Rollout(ConfigArgs),
    /// Run a reward worker process of a distributed run.
    Reward(ConfigArgs),
    /// Serve a model over an OpenAI-compatible HTTP API.
    Serve(ConfigArgs),
    /// Evaluate a checkpoint on a task, or a judge on ProcessBench.
    Eval(ConfigArgs),
    /// Draw the plots and timeline of a run folder.
    Report(ReportArgs),
    /// Export a checkpoint or GGUF file as a Hugging Face model folder.
    Export(ConfigArgs),
    /// Run a benchmark.
    Bench(ConfigArgs),
    /// Check the installation: libtorch, CUDA, NCCL, Redis, threads.
    Doctor(ConfigArgs),
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// A TOML config file layered over the built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set learner.lr=5e-5` (repeatable; applied last).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl Command {
    /// The subcommand's name and its common options.
    pub fn parts(&self) -> (&'static str, &ConfigArgs) {
        match self {
            Command::Train(a) => ("train", a),
            Command::Learner(a) => ("learner", a),
            Command::Rollout(a) => ("rollout", a),
            Command::Reward(a) => ("reward", a),
            Command::Serve(a) => ("serve", a),
            Command::Eval(a) => ("eval", a),
            Command::Report(a) => ("report", &a.common),
            Command::Export(a) => ("export", a),
            Command::Bench(a) => ("bench", a),
            Command::Doctor(a) => ("doctor", a),
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
