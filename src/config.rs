//! The resolved configuration: every crate's section, composed.
//!
//! Layers, later wins: the built-in defaults (`configs/default.toml`, compiled
//! in) → `--config FILE` → environment variables `PRISM__SECTION__KEY=value` →
//! `--set section.key=value`. The `config` crate merges them; this module keeps
//! track of which layer set each key so that every error names the file, the
//! variable or the argument it came from.

use prism_core::config::Invalid;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Options every subcommand takes.
#[derive(Debug, Clone, clap::Args)]
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

/// `[train]`: what a `prism train` run does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// RL learner steps in total (a resumed run counts from its checkpoint). Default 1000.
    pub steps: u64,
    /// Stop RL after this many seconds of this process; 0 = no limit. Default 300.
    pub time_limit_s: f64,
    /// Prompts (groups of `rollout.group_size` samples) per learner step. Default 16.
    pub batch_groups: usize,
    /// Evaluate on the held-out problems every this many steps; 0 = at the start and end only. Default 10.
    pub eval_every: u64,
    /// Held-out problems per evaluation. Default 200.
    pub eval_problems: usize,
    /// Checkpoint every this many steps; 0 = at the end only. Default 25.
    pub checkpoint_every: u64,
    /// torch intra-op threads; 0 = torch's default (the core count). Default 0.
    pub threads: usize,
    /// `learner.mode = "sft"`: JSONL of `{"prompt", "completion"}` pairs to train on. Default "".
    pub sft_data: PathBuf,
    /// `learner.mode = "sft"`: pairs per step. Default 32.
    pub sft_batch: usize,
}

/// `[warmstart]`: supervised imitation of the task's (flawed) teacher before RL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmStartConfig {
    /// Warm start before RL (arithmetic task only). Default true.
    pub enabled: bool,
    /// SFT steps. Default 1200.
    pub steps: u64,
    /// Demonstrations per step. Default 64.
    pub batch: usize,
    /// Learning rate (constant, AdamW with the learner's other settings). Default 2e-3.
    pub lr: f64,
    /// Held-out accuracy (greedy, `train.eval_problems` problems) every this many
    /// SFT steps and at the end, logged (console and trace); 0 = none. Not part of the
    /// cache key. Default 200.
    pub eval_every: u64,
}

impl TrainConfig {
    pub fn validate(&self) -> std::result::Result<(), prism_core::config::Invalid> {
        use prism_core::config::{check, Invalid};
        check::positive("train.batch_groups", self.batch_groups)?;
        check::positive("train.eval_problems", self.eval_problems)?;
        check::positive("train.sft_batch", self.sft_batch)?;
        if self.time_limit_s < 0.0 {
            return Err(Invalid::new("train.time_limit_s", self.time_limit_s, "must be >= 0"));
        }
        Ok(())
    }
}

impl WarmStartConfig {
    pub fn validate(&self) -> std::result::Result<(), prism_core::config::Invalid> {
        prism_core::config::check::positive("warmstart.batch", self.batch)?;
        prism_core::config::check::positive("warmstart.lr", self.lr)
    }
}


/// The built-in defaults, compiled into the binary.
pub const DEFAULT_TOML: &str = include_str!("../configs/default.toml");

/// Exit code for configuration errors (`EX_CONFIG` from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

/// The whole configuration of a prism process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub log: LogConfig,
    pub redis: prism_transport::redis::Config,
    pub grpc: prism_transport::grpc::Config,
    pub dist: prism_transport::Config,
    pub model: prism_model::Config,
    pub serve: prism_serve::Config,
    pub learner: prism_learner::Config,
    /// `[reward]`: segmentation, verifiers, guard, fallback, deadline.
    pub reward: prism_reward::Config,
    /// `[judge]`: the OpenAI-compatible judge server and how it is called.
    pub judge: prism_reward::judge::Config,
    /// `[distill]`: the online-distilled reward model and the annotation budget.
    pub distill: prism_reward::distill::Config,
    /// `[implicit]`: the implicit PRM of `reward.process = "implicit"`.
    pub implicit: prism_reward::implicit::Config,
    /// `[task]`: the problems trained and evaluated on.
    pub task: prism_rollout::task::Config,
    /// `[rollout]`: how trajectories are sampled.
    pub rollout: prism_rollout::Config,
    /// `[pipeline]`: how the actors run.
    pub pipeline: prism_actors::Config,
    /// `[train]`: what `prism train` does.
    pub train: TrainConfig,
    /// `[warmstart]`: supervised imitation of the task's teacher before RL.
    pub warmstart: WarmStartConfig,
}

/// `[run]`: where a run writes and how it is seeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Folder holding one sub-folder per run. Default `runs`.
    pub dir: PathBuf,
    /// Seed for everything random in a run. Default 0.
    pub seed: u64,
}

/// `[log]`: console and trace-file filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Console filter; `RUST_LOG` overrides it. Default `warn,prism=info`.
    pub console: String,
    /// Filter for `trace.jsonl` in the run folder. Default `info`.
    pub trace: String,
    /// OTLP/HTTP (protobuf) endpoint of an OpenTelemetry trace collector,
    /// e.g. `http://otel-collector:4318/v1/traces`: every role exports its
    /// spans there, as service `prism-<role>` with `prism.run_id`; empty =
    /// none. Default empty.
    pub otlp_endpoint: String,
    /// Filter for the spans exported to `otlp_endpoint`. Default `info`.
    pub otlp: String,
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (key, filter) in [("log.console", &self.log.console), ("log.trace", &self.log.trace), ("log.otlp", &self.log.otlp)] {
            tracing_subscriber::EnvFilter::builder()
                .parse(filter)
                .map_err(|e| Invalid::new(key, filter, format!("not a tracing filter ({e})")))?;
        }
        let otlp = &self.log.otlp_endpoint;
        if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
            return Err(Invalid::new("log.otlp_endpoint", otlp, "must be an http:// or https:// URL, or empty"));
        }
        self.redis.validate()?;
        self.grpc.validate()?;
        self.dist.validate()?;
        self.model.validate()?;
        self.serve.validate()?;
        if self.run.dir.as_os_str().is_empty() {
            return Err(Invalid::new("run.dir", &self.run.dir, "must not be empty"));
        }
        self.learner.validate()?;
        self.reward.validate()?;
        self.judge.validate()?;
        self.distill.validate()?;
        self.implicit.validate()?;
        self.task.validate()?;
        self.rollout.validate()?;
        self.pipeline.validate()?;
        self.train.validate()?;
        self.warmstart.validate()?;
        if self.learner.temperature != self.rollout.temperature {
            return Err(Invalid::new(
                "learner.temperature",
                self.learner.temperature,
                format!("must equal rollout.temperature ({}): the learner's log-probs must match the sampler's", self.rollout.temperature),
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, as `--print-config` shows it and the run folder
    /// records it. Secrets never appear here: sections hold references to them
    /// (an env var or file name), not the secrets themselves; a password
    /// written into `redis.url` or `judge.url` is shown as `***` (a resumed
    /// run then needs it from `redis.password_env`).
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.redis.url = prism_transport::redis::redact_url(&self.redis.url);
        shown.judge.url = prism_transport::redis::redact_url(&self.judge.url);
        toml::to_string(&shown).expect("a Config always serialises to TOML")
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Defaults,
    File(PathBuf),
    Env(String),
    Set(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Defaults => write!(f, "built-in defaults (configs/default.toml)"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Set(arg) => write!(f, "--set {arg}"),
        }
    }
}

/// A configuration that cannot be used. Each renders as one line naming the
/// file, variable or argument, the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: cannot read it: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("config file {}, line {line}, column {column}: TOML syntax error: {message}", path.display())]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{origin}: malformed override {arg:?}: {reason}")]
    BadOverride { origin: Origin, arg: String, reason: String },
    #[error("{origin}: unknown key `{key}`{}", known_hint(.known))]
    UnknownKey { origin: Origin, key: String, known: Vec<String> },
    #[error("{origin}: `{key}`: {message}")]
    WrongType { origin: Origin, key: String, message: String },
    #[error("{origin}: {invalid}")]
    Invalid { origin: Origin, invalid: Invalid },
}

fn known_hint(known: &[String]) -> String {
    if known.is_empty() { String::new() } else { format!(" (expected one of: {})", known.join(", ")) }
}

/// What the command line and environment contribute on top of the defaults.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// `PRISM__SECTION__KEY` variables, as (name, value).
    pub env: Vec<(String, String)>,
    /// `--set section.key=value` arguments, in order.
    pub sets: Vec<String>,
}

impl Layers {
    /// The layers given by `--config`, `--set` and this process's environment.
    pub fn from_process(file: Option<PathBuf>, sets: Vec<String>) -> Self {
        let env = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        Self { file, env, sets }
    }
}

const ENV_PREFIX: &str = "PRISM__";

/// One override: a dotted key and its value.
struct Override {
    key: String,
    value: toml::Value,
    origin: Origin,
}

/// Resolves the configuration from the defaults and `layers`.
pub fn load(layers: &Layers) -> Result<Config, ConfigError> {
    let file = match &layers.file {
        Some(path) => Some((path.clone(), read_file(path)?)),
        None => None,
    };
    let mut overrides = Vec::new();
    for (name, value) in &layers.env {
        let key = name[ENV_PREFIX.len()..].to_ascii_lowercase().replace("__", ".");
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(ConfigError::BadOverride {
                origin: Origin::Env(name.clone()),
                arg: format!("{name}={value}"),
                reason: "expected PRISM__SECTION__KEY".into(),
            });
        }
        overrides.push(Override { key, value: parse_value(value), origin: Origin::Env(name.clone()) });
    }
    for arg in &layers.sets {
        let origin = Origin::Set(arg.clone());
        let Some((key, value)) = arg.split_once('=') else {
            return Err(ConfigError::BadOverride { origin, arg: arg.clone(), reason: "expected section.key=value".into() });
        };
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(ConfigError::BadOverride { origin, arg: arg.clone(), reason: "expected section.key=value".into() });
        }
        overrides.push(Override { key: key.to_string(), value: parse_value(value.trim()), origin });
    }

    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
    if let Some((_, table)) = &file {
        builder = builder.add_source(config::File::from_str(&table.to_string(), config::FileFormat::Toml));
    }
    for o in &overrides {
        builder = builder.set_override(o.key.as_str(), to_config_value(&o.value)).map_err(|e| ConfigError::BadOverride {
            origin: o.origin.clone(),
            arg: o.key.clone(),
            reason: e.to_string(),
        })?;
    }
    let merged = builder.build().map_err(|e| ConfigError::BadOverride {
        origin: overrides.last().map(|o| o.origin.clone()).unwrap_or(Origin::Defaults),
        arg: String::new(),
        reason: e.to_string(),
    })?;

    let origin_of = |key: &str| -> Origin {
        let related = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}."));
        if let Some(o) = overrides.iter().rev().find(|o| related(&o.key, key)) {
            return o.origin.clone();
        }
        if let Some((path, table)) = &file {
            if lookup(table, key).is_some() {
                return Origin::File(path.clone());
            }
        }
        Origin::Defaults
    };

    let config: Config = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        if let Some((field, known)) = parse_unknown_field(&strip_origin(&message)) {
            let key = if path == "." || path.is_empty() {
                field
            } else if path.ends_with(&field) {
                path
            } else {
                format!("{path}.{field}")
            };
            let origin = origin_of(&key);
            ConfigError::UnknownKey { origin, key, known }
        } else {
            let origin = origin_of(&path);
            ConfigError::WrongType { origin, key: path, message: strip_origin(&message) }
        }
    })?;
    config.validate().map_err(|invalid| ConfigError::Invalid { origin: origin_of(&invalid.key), invalid })?;
    Ok(config)
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            _ => e.to_string(),
        },
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
        ConfigError::Syntax { path: path.to_path_buf(), line, column, message: e.message().trim().replace('\n', " ") }
    })
}

/// 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// An override's value: TOML when it parses as a TOML value (`7`, `1e-5`,
/// `true`, `"x"`, `[1, 2]`), else the raw text as a string (`redis://host`).
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn to_config_value(v: &toml::Value) -> config::Value {
    use config::ValueKind;
    let kind = match v {
        toml::Value::String(s) => ValueKind::String(s.clone()),
        toml::Value::Integer(i) => ValueKind::I64(*i),
        toml::Value::Float(f) => ValueKind::Float(*f),
        toml::Value::Boolean(b) => ValueKind::Boolean(*b),
        toml::Value::Datetime(d) => ValueKind::String(d.to_string()),
        toml::Value::Array(a) => ValueKind::Array(a.iter().map(to_config_value).collect()),
        toml::Value::Table(t) => ValueKind::Table(t.iter().map(|(k, v)| (k.clone(), to_config_value(v))).collect()),
    };
    config::Value::new(None, kind)
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// serde's message for `deny_unknown_fields`: "unknown field `x`, expected one
/// of `a`, `b`" (or "expected `a`", or "there are no fields").
fn parse_unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let known = rest.split('`').skip(1).step_by(2).map(str::to_string).collect();
    Some((field.to_string(), known))
}

/// The config crate appends " for key `x` in origin"; we name the origin ourselves.
fn strip_origin(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests;
