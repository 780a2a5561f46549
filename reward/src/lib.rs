//! prism-reward: turning a trajectory into a [`prism_core::RewardLabel`].
//!
//! Owns outcome verifiers ([`outcome`]), step segmentation ([`segment`]),
//! deterministic step verifiers ([`steps`], with the small expression parser in
//! [`expr`]), the generative PRM judge client for any OpenAI-compatible server
//! ([`judge`]), the ONI-style distilled reward model ([`distill`]), the assembly of
//! one trajectory's label ([`Labeler`]) and the ProcessBench evaluation of a judge
//! ([`processbench`]). `testkit` (feature `testkit`) holds the scripted,
//! fault-injecting and realistic OpenAI-compatible judge servers that tests
//! and benchmarks run on 127.0.0.1.
//!
//! Must not know about the learner, actors or transports: it is a plain async
//! library, callable and testable on its own.

// `string_enum!` (config enums read and written as fixed strings) comes
// from prism-core, shared with the learner's and the transport's sections.
#[macro_use]
extern crate prism_core;

pub mod config;
pub mod distill;
pub mod expr;
pub mod implicit;
pub mod judge;
pub mod labeler;
pub mod outcome;
pub mod processbench;
pub mod segment;
pub mod steps;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use config::Config;
pub use labeler::{Health, JudgedStep, LabelMeta, Labeler, LatencyMs, Metrics, QueueHealth};

/// Errors of the reward library. Labeling itself never fails (a trajectory
/// always gets a label); these come from construction and from I/O.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] prism_core::config::Invalid),
    #[error("judge template {name}: {reason}")]
    Template { name: String, reason: String },
    #[error("judge client: {0}")]
    Client(String),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}, item {item}: {reason}")]
    Data { path: String, item: usize, reason: String },
    #[error("implicit PRM: {0}")]
    Implicit(String),
    /// A reward model's saved state (in a checkpoint) cannot be written or read.
    #[error("{}: {reason}", path.display())]
    Saved { path: std::path::PathBuf, reason: String },
    #[error("reward model (tch): {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
