//! prism-actors: the running system.
//!
//! Owns the ractor actors that wrap the libraries (prompt source, rollout
//! workers, reward pool, learner, weight sync, metrics), the supervision tree,
//! staleness control, the bounded in-memory channels between them, and the
//! roles of a distributed run ([`remote`]), which do the same jobs fed by
//! `prism-transport` instead of channels (a rollout process runs the same
//! [`rollout_worker::RolloutWorker`], with [`rollout_worker::Ports`] on the
//! transport).
//!
//! ```text
//! Supervisor ─┬─ Metrics            ledger, metrics.jsonl, progress
//!             ├─ WeightSync         newest weights, pulled between generations
//!             ├─ PromptSource       prompts by credit; cursor; leases
//!             ├─ RewardPool ─┬─ RewardWorker × M   (restarted by the pool)
//!             │              └─ ...
//!             ├─ Learner            staleness, train, publish, eval, checkpoint
//!             └─ RolloutWorker × N  (restarted by the supervisor)
//! ```
//!
//! Data flows PromptSource → RolloutWorker → RewardPool → Learner, every hop
//! pulled by the stage after it and bounded, so a slow stage slows the stages
//! before it instead of growing memory. The work itself is done through three
//! traits ([`backend::Generate`], [`backend::Label`], [`backend::Train`]),
//! which [`adapters`] implements with the libraries for every mode; the
//! libraries know nothing of this crate.
//!
//! Must not know the wire format (`prism-proto`) or the transports' crates
//! (tonic, redis, cudarc, axum): the remote roles talk through
//! `prism-transport`'s types only.

pub mod adapters;
pub mod backend;
pub mod error;
pub mod learner;
pub mod metrics;
pub mod remote;
pub mod restart;
pub mod reward_pool;
pub mod rollout_worker;
pub mod source;
pub mod supervisor;
pub mod weight_sync;

pub use error::Error;
pub use backend::{Assignment, BackendError, DropReason, EvalReport, Generate, Label, StepReport, Train, WeightSet};
pub use learner::{Finish, LearnerPlan, StalePolicy};
pub use metrics::{Ledger, Progress};
pub use supervisor::{run, PipelineSpec, Summary};

use prism_core::config::{check, Invalid};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[pipeline]`: how the actors run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Concurrent reward workers (M). Default 4.
    pub reward_workers: usize,
    /// Tries to label one trajectory before its group is dropped. Default 3.
    pub reward_attempts: u32,
    /// Most groups the reward pool holds; 0 = the learner's batch × (1 + max_staleness). Default 0.
    pub pool_capacity_groups: usize,
    /// Restarts of one actor allowed within `restart_window_s` before the run fails. Default 5.
    pub restart_limit: usize,
    /// Default 60.
    pub restart_window_s: f64,
    /// First restart backoff; doubles per restart in the window. Default 200.
    pub restart_backoff_ms: u64,
    /// Default 10000.
    pub restart_backoff_max_ms: u64,
    /// How long a stopping run waits for its actors before giving up. Default 120.
    pub shutdown_timeout_s: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            reward_workers: 4,
            reward_attempts: 3,
            pool_capacity_groups: 0,
            restart_limit: 5,
            restart_window_s: 60.0,
            restart_backoff_ms: 200,
            restart_backoff_max_ms: 10_000,
            shutdown_timeout_s: 120.0,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), Invalid> {
        check::positive("pipeline.reward_workers", self.reward_workers)?;
        check::positive("pipeline.reward_attempts", self.reward_attempts)?;
        check::positive("pipeline.restart_window_s", self.restart_window_s)?;
        check::positive("pipeline.shutdown_timeout_s", self.shutdown_timeout_s)?;
        Ok(())
    }

    pub fn restart_policy(&self) -> restart::RestartPolicy {
        restart::RestartPolicy::new(
            self.restart_limit,
            Duration::from_secs_f64(self.restart_window_s),
            Duration::from_millis(self.restart_backoff_ms),
            Duration::from_millis(self.restart_backoff_max_ms.max(self.restart_backoff_ms)),
        )
    }
}
