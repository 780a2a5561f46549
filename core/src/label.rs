//! Reward labels: what the reward pool attaches to a trajectory.

use crate::trajectory::{Step, Trajectory};
use serde::{Deserialize, Serialize};

/// Where a score came from. Every score carries one, so a run can say how much
/// of its signal came from verifiers, the judge, its cache or the distilled model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreSource {
    /// A deterministic verifier (exact answer, numeric, step checker, calculator).
    Verifier,
    /// A live call to the judge model.
    Judge,
    /// The judge's answer for the same (model, template, problem, step prefix), cached.
    JudgeCache,
    /// The online-distilled reward model.
    Distilled,
    /// The implicit PRM (`reward.process = "implicit"`): σ of the step's
    /// log-likelihood-ratio reward.
    Implicit,
    /// A guard rejected the completion before any judge call (no final answer, too short).
    Guard,
    /// No source could score it (e.g. an unparseable verdict); the score is unknown.
    Unknown,
}

/// The score of one step: `Some(p)` with `p` = P(step is correct) in [0, 1], or
/// `None` when it could not be determined (never silently 0 or 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepScore {
    pub step: Step,
    pub score: Option<f32>,
    pub source: ScoreSource,
}

/// The reward of one trajectory: outcome plus, when a process judge is
/// configured, one score per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardLabel {
    /// Outcome score, 1.0 for a correct final answer and 0.0 otherwise for
    /// binary verifiers.
    pub outcome: f32,
    pub outcome_source: ScoreSource,
    /// The final answer extracted from the completion, if any.
    pub answer: Option<String>,
    /// Step scores in completion order; empty when no process reward is configured.
    pub steps: Vec<StepScore>,
}

/// A trajectory with its label: what the learner consumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabeledTrajectory {
    pub trajectory: Trajectory,
    pub label: RewardLabel,
}

/// A trajectory that could not be labeled, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelFailure {
    pub trajectory: Trajectory,
    pub error: String,
}

/// What a reward worker hands on for one trajectory: its label, or the
/// failure to label it (the learner counts it; the trajectory is not lost).
pub type LabelResult = Result<LabeledTrajectory, LabelFailure>;

/// Why a group was not trained on (counted in the ledger, by reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Sampled by weights more than `learner.max_staleness` versions old.
    Stale,
    /// Dynamic sampling: every advantage in the group is zero under the
    /// configured estimator, so training on it would change nothing but the
    /// KL and entropy terms.
    ZeroAdvantage,
    /// Labeling failed after every retry.
    RewardFailed,
    /// Some members never arrived labeled within `dist.group_timeout_ms` of
    /// the group's delivery (lost, or undecodable).
    Incomplete,
    /// Issued by an earlier learner of the run, which crashed; the resumed
    /// learner issues its prompts again under new group ids.
    Superseded,
    /// A trajectory the learner cannot train on: a token id past the
    /// vocabulary, more tokens than the model has positions, lengths that
    /// disagree, a value that is not finite.
    Invalid,
}

impl DropReason {
    /// `stale`, `zero_advantage`, `reward_failed`, `incomplete`,
    /// `superseded` or `invalid`, as metrics and the ledger name it.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Stale => "stale",
            DropReason::ZeroAdvantage => "zero_advantage",
            DropReason::RewardFailed => "reward_failed",
            DropReason::Incomplete => "incomplete",
            DropReason::Superseded => "superseded",
            DropReason::Invalid => "invalid",
        }
    }
}
