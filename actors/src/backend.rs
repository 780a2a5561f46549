//! What the actors need from the libraries, as three narrow traits.
//!
//! The actors own concurrency, supervision and accounting; the work itself —
//! sampling, labeling, training — is done by implementations of [`Generate`],
//! [`Label`] and [`Train`]. The binary plugs in the real ones (model, reward,
//! learner); tests plug in small fakes, including ones that fail on purpose.

use prism_core::{LabeledTrajectory, PolicyVersion, RewardLabel, Trajectory};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// An error from a backend; the actor that got it fails, and its supervisor decides.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl BackendError {
    pub fn new(e: impl std::fmt::Display) -> Self {
        Self(e.to_string())
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

pub use prism_model::WeightSet;

pub use prism_core::Assignment;

/// Samples groups of completions. Runs on a blocking thread.
pub trait Generate: Send + 'static {
    /// Copies `weights` into the policy (between generations).
    fn load_weights(&mut self, weights: &WeightSet) -> BackendResult<()>;
    /// Samples each assignment's group (G trajectories each, ids derived from the
    /// group id) with the currently loaded weights, tagged `version`.
    fn generate(&mut self, work: &[Assignment], version: PolicyVersion) -> BackendResult<Vec<Vec<Trajectory>>>;
    /// [`Generate::generate`], where `newer` may be asked between decode
    /// steps for weights published since (`rollout.inflight_updates`): the
    /// backend loads them and samples on with them, and each trajectory
    /// records where ([`Trajectory::version_changes`]). Returns the groups
    /// and the version loaded at the end. The default ignores `newer`.
    fn generate_inflight(
        &mut self,
        work: &[Assignment],
        version: PolicyVersion,
        _newer: &mut NewerWeights<'_>,
    ) -> BackendResult<(Vec<Vec<Trajectory>>, PolicyVersion)> {
        Ok((self.generate(work, version)?, version))
    }
}

/// Weights published after `held`, if any (answers at once, without waiting).
pub type NewerWeights<'a> = dyn FnMut(PolicyVersion) -> Option<Arc<WeightSet>> + Send + 'a;

/// Boxed future returned by [`Label::label`].
pub type LabelFuture<'a> = Pin<Box<dyn Future<Output = BackendResult<RewardLabel>> + Send + 'a>>;

/// Labels one trajectory. Shared by all reward workers, so `&self`.
pub trait Label: Send + Sync + 'static {
    fn label<'a>(&'a self, trajectory: &'a Trajectory) -> LabelFuture<'a>;

    /// Reward health now (judge latency, annotation queue, canary rate,
    /// distiller agreement …) as JSON fields for each learner step's metrics
    /// row; `None` when there is nothing to report.
    fn health(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        None
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// Trajectories the step trained on.
    pub trajectories: usize,
    /// Scalar statistics (loss, kl, entropy, clip fractions, grad norm, ...).
    pub stats: BTreeMap<String, f64>,
}

/// Held-out evaluation of the current policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalReport {
    /// Share of problems answered correctly (greedy).
    pub accuracy: f64,
    /// Share of steps judged correct, when the task has steps.
    pub step_accuracy: Option<f64>,
    pub problems: usize,
}

pub use prism_core::DropReason;

/// Trains the policy. Runs on a blocking thread.
pub trait Train: Send + 'static {
    /// The version of the current weights (number of steps taken).
    fn version(&self) -> PolicyVersion;
    /// The current weights, copied, for the rollout workers.
    fn weights(&self) -> BackendResult<Arc<WeightSet>>;
    /// Whether a complete group is used, or dropped and why (e.g. zero variance).
    fn admit(&self, group: &[LabeledTrajectory]) -> Result<(), DropReason>;
    /// One optimizer step on `groups`, with `lags[i]` = how many versions behind
    /// the weights that sampled `groups[i]` were (for importance weighting).
    fn train(&mut self, groups: Vec<Vec<LabeledTrajectory>>, lags: &[u64]) -> BackendResult<StepReport>;
    /// Greedy evaluation on the task's held-out problems.
    fn evaluate(&mut self) -> BackendResult<EvalReport>;
    /// Writes a checkpoint holding everything needed to continue, including
    /// where the prompt source stands (given here).
    fn checkpoint(&mut self, position: &SourcePosition) -> BackendResult<()>;
}

/// Where the prompt source stands: what a checkpoint keeps of it (as its
/// `data_cursor`) so that a resumed run hands out the same prompts.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SourcePosition {
    /// Index of the next fresh prompt.
    pub prompt_cursor: u64,
    /// The curriculum (`task.adaptive`); absent in older checkpoints.
    #[serde(default)]
    pub curriculum: prism_rollout::curriculum::State,
}

/// Makes a fresh backend: how a supervisor restarts a failed worker.
pub type Factory<T> = Arc<dyn Fn() -> BackendResult<T> + Send + Sync>;
