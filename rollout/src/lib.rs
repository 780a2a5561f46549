//! prism-rollout: where trajectories come from.
//!
//! Owns the tasks and datasets (the built-in arithmetic task, JSONL / GSM8K), the
//! prompt stream addressed by a resumable cursor, and group sampling: G
//! completions per prompt turned into [`prism_core::Trajectory`] values with
//! behaviour log-probs.
//!
//! Must not know about rewards, the learner, actors or transports.

pub mod arithmetic;
pub mod curriculum;
pub mod dataset;
mod rng;
pub mod sampler;
pub mod task;

pub use rng::{hash64, SplitMix64};
pub use task::Task;

use prism_core::config::{check, Invalid};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {reason}", path.display())]
    Dataset { path: PathBuf, line: usize, reason: String },
    #[error(transparent)]
    Model(#[from] prism_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `[rollout]`: how trajectories are sampled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Rollout workers (each holds a copy of the policy). Default 1.
    pub workers: usize,
    /// Samples per prompt (G). Default 8.
    pub group_size: usize,
    /// Prompts a worker takes and samples together in one batch. Default 16.
    pub prompts_per_batch: usize,
    /// Longest completion. Default 48.
    pub max_new_tokens: usize,
    /// Sampling temperature; the learner divides logits by the same value. Default 1.0.
    pub temperature: f64,
    /// Nucleus sampling mass; 1.0 = off. Default 1.0.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 = off. Default 0.
    pub top_k: usize,
    /// Extra stop strings (the model's eos tokens always stop). Default none.
    pub stop: Vec<String>,
    /// Early rejection (partial reward models): at every step boundary (a
    /// line break) a sample's newest step is scored by the cheap scorer (the
    /// distilled model once it agrees with the judge, else the step
    /// verifier); below this it stops there, finished as `rejected` (it is
    /// still labeled and trained on, as a failure), so decoding goes to the
    /// samples still in the running. 0 = off. Default 0.
    pub reject_below: f64,
    /// Continuous batching: at most this many samples decode at once; a
    /// waiting prompt's group joins the running batch once finished samples
    /// free a quarter of it (its prompt prefilled, its rows added in the
    /// decode loop), so the batch stays nearly full until the work runs out.
    /// The same samples as one batch. It pays where a decode step costs
    /// about the same at any batch (a large model on a GPU) and completion
    /// lengths vary; with `prompts_per_batch` above `max_batch_rows /
    /// group_size`. 0 = every prompt of a batch at once. Default 0.
    pub max_batch_rows: usize,
    /// In-flight weight updates: a generation asks for newly published
    /// weights before every decode step and samples on with them instead of
    /// finishing on the version it began with (the keys and values cached so
    /// far stay the old weights'); each trajectory records from which token
    /// each version sampled, the behaviour log-probs are per token anyway,
    /// and the lag metrics count tokens by version. One process only for
    /// now. Default false.
    pub inflight_updates: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            workers: 1,
            group_size: 8,
            prompts_per_batch: 16,
            max_new_tokens: 48,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            stop: Vec::new(),
            reject_below: 0.0,
            max_batch_rows: 0,
            inflight_updates: false,
        }
    }
}

impl Config {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        check::positive("rollout.workers", self.workers)?;
        check::positive("rollout.group_size", self.group_size)?;
        check::positive("rollout.prompts_per_batch", self.prompts_per_batch)?;
        check::positive("rollout.max_new_tokens", self.max_new_tokens)?;
        check::positive("rollout.temperature", self.temperature)?;
        check::in_range("rollout.reject_below", self.reject_below, 0.0, 1.0)?;
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Invalid::new("rollout.top_p", self.top_p, "must be in (0, 1]"));
        }
        Ok(())
    }
}
