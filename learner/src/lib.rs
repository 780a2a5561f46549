//! prism-learner: turning labeled groups into optimizer steps.
//!
//! Owns advantage estimators (GRPO, Dr. GRPO, RLOO, process, TP-GRPO), policy
//! losses (PPO clip with clip-higher, dual clip, truncated importance weights, KL,
//! entropy), the optimizer and schedules, the train step, SFT, and checkpoints
//! with exact resume.
//!
//! The model is anything implementing [`Policy`]: a forward pass to logits and a
//! `VarStore` whose variable names are the Hugging Face names.
//!
//! Must not know about actors, transports or where trajectories came from.

pub mod advantage;
pub mod autocast;
pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod chunked;
pub mod collective;
pub mod config;
pub mod loss;
pub mod optim;
pub mod plan;
pub mod policy;
pub mod sft;
pub mod train;
pub mod warmstart;

pub use advantage::{GroupAdvantages, estimate_group};
pub use checkpoint::{Checkpoint, CheckpointMeta, Rejected, Restored};
pub use collective::Collective;
pub use config::Config;
pub use policy::Policy;
pub use sft::TokenPair;
pub use train::{Learner, TrainReport, UpdateStats};

use std::path::PathBuf;

/// Everything that can go wrong in the learner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("no usable checkpoint in {dir}{}", rejected_list(.rejected))]
    NoCheckpoint { dir: PathBuf, rejected: Vec<Rejected> },
    #[error("trajectory {trajectory}: {reason}")]
    Trajectory { trajectory: u64, reason: String },
    #[error("batch: {0}")]
    Batch(String),
    #[error("model: {0}")]
    Model(String),
    /// A collective between ranks failed; the message names the rank and the operation.
    #[error("{0}")]
    Collective(String),
}

fn rejected_list(rejected: &[Rejected]) -> String {
    if rejected.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
        format!(" (rejected: {})", names.join("; "))
    }
}

/// The learner's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
