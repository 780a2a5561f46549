//! `[reward]`: how a trajectory is segmented, verified and given step scores.
//! The judge client (`[judge]`) and the distilled model (`[distill]`) have
//! their own sections: [`crate::judge::Config`], [`crate::distill::Config`].

use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};

/// `[reward]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Outcome verifier. Default `auto`: `arithmetic` for the arithmetic task,
    /// `numeric` for gsm8k, otherwise `boxed` falling back to `numeric`.
    pub outcome: OutcomeKind,
    /// Numeric answers match when `|got - want| <= tolerance * max(1, |want|)`.
    /// Default 1e-6.
    pub tolerance: f64,
    /// A regex whose first capture group (or whole match) is the final answer;
    /// used by `outcome = "regex"` and tried first by `numeric` and `boxed` when
    /// set. Default empty.
    pub answer_regex: String,
    /// Step segmentation. Default `auto`: `line` for arithmetic and gsm8k;
    /// otherwise `step_marker` when the text has `Step k:` markers, `blank_line`
    /// when it has blank lines, else `line`.
    pub segmentation: Segmentation,
    /// For `segmentation = "regex"`: a regex matching the separators between
    /// steps. Default empty.
    pub step_regex: String,
    /// Where step scores come from. Default `verifier`.
    pub process: Process,
    /// Deterministic step verifier. Default `auto`: `arithmetic` for the
    /// arithmetic task, `calculator` (GSM8K `<<expr=value>>`) otherwise.
    pub step_verifier: StepVerifierKind,
    /// With `process = "judge"`: what scores a step the judge did not (breaker
    /// open, failed call, unknown verdict, outside the annotation budget, past
    /// the deadline). `distilled` falls through to `verifier` until the distilled
    /// model has learned enough. Default `verifier`.
    pub fallback: Fallback,
    /// "One Token to Fool" guard: with the judge on, a completion with no
    /// extractable final answer or shorter than `min_chars` scores 0 on every
    /// step before any judge call. Default true.
    pub guard: bool,
    /// The guard's minimum completion length in characters (trimmed). Default 4.
    pub min_chars: u32,
    /// Overall deadline for labeling one trajectory, in ms; steps still waiting
    /// on the judge then take the fallback. Default 120000.
    pub deadline_ms: u64,
    /// With `process = "judge"`: how long a label may wait for the judge's
    /// verdicts, in ms (capped by `deadline_ms`). At 0 a label never waits: it
    /// is made at once by the fallback (the distilled model once it agrees
    /// with the judge well enough, else the verifiers), and the judge request
    /// goes to the background annotation queue, whose verdicts train the
    /// distilled model and fill the cache whenever they arrive (ONI). A large
    /// value blocks on the judge as a gate. Default: 0 when `distill.enabled`,
    /// else `deadline_ms`.
    pub judge_wait_ms: Option<u64>,
    /// Background annotation queue: most trajectories waiting for the judge.
    /// When full, the oldest waiting one is shed (and counted). Default 1024.
    pub annotation_queue: u32,
    /// Background annotation: trajectories being judged at once (each may make
    /// several judge calls, all bounded by `judge.concurrency`). Default 16.
    pub annotators: u32,
}

string_enum! {
    /// Outcome verifier choice.
    pub enum OutcomeKind {
        Auto = "auto",
        Arithmetic = "arithmetic",
        Numeric = "numeric",
        Boxed = "boxed",
        Regex = "regex",
        Contains = "contains",
    }
}

string_enum! {
    /// Step segmentation choice.
    pub enum Segmentation {
        Auto = "auto",
        Line = "line",
        BlankLine = "blank_line",
        StepMarker = "step_marker",
        Regex = "regex",
    }
}

string_enum! {
    /// Source of step scores.
    pub enum Process {
        /// Outcome only; `RewardLabel.steps` is empty.
        None = "none",
        /// Deterministic step verifiers.
        Verifier = "verifier",
        /// The judge, with `fallback` for what it does not score.
        Judge = "judge",
        /// The implicit PRM (`[implicit]`): a copy of the policy trained
        /// online on the verifiers' outcomes, whose log-likelihood ratio to
        /// the frozen policy scores each step. No judge server.
        Implicit = "implicit",
    }
}

string_enum! {
    /// Step verifier choice.
    pub enum StepVerifierKind {
        Auto = "auto",
        Arithmetic = "arithmetic",
        Calculator = "calculator",
        None = "none",
    }
}

string_enum! {
    /// What scores steps the judge did not.
    pub enum Fallback {
        Distilled = "distilled",
        Verifier = "verifier",
        None = "none",
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            outcome: OutcomeKind::Auto,
            tolerance: 1e-6,
            answer_regex: String::new(),
            segmentation: Segmentation::Auto,
            step_regex: String::new(),
            process: Process::Verifier,
            step_verifier: StepVerifierKind::Auto,
            fallback: Fallback::Verifier,
            guard: true,
            min_chars: 4,
            deadline_ms: 120_000,
            judge_wait_ms: None,
            annotation_queue: 1024,
            annotators: 16,
        }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(self.tolerance >= 0.0 && self.tolerance.is_finite()) {
            return Err(Invalid::new("reward.tolerance", self.tolerance, "must be a finite number >= 0"));
        }
        if !self.answer_regex.is_empty() {
            regex::Regex::new(&self.answer_regex)
                .map_err(|e| Invalid::new("reward.answer_regex", &self.answer_regex, format!("not a regex ({e})")))?;
        } else if self.outcome == OutcomeKind::Regex {
            return Err(Invalid::new("reward.answer_regex", "", "must be set when reward.outcome = \"regex\""));
        }
        if !self.step_regex.is_empty() {
            let re = regex::Regex::new(&self.step_regex)
                .map_err(|e| Invalid::new("reward.step_regex", &self.step_regex, format!("not a regex ({e})")))?;
            if re.is_match("") {
                return Err(Invalid::new("reward.step_regex", &self.step_regex, "must not match the empty string"));
            }
        } else if self.segmentation == Segmentation::Regex {
            return Err(Invalid::new("reward.step_regex", "", "must be set when reward.segmentation = \"regex\""));
        }
        check::positive("reward.deadline_ms", self.deadline_ms)?;
        check::positive("reward.annotation_queue", self.annotation_queue)?;
        check::positive("reward.annotators", self.annotators)?;
        Ok(())
    }

    /// `judge_wait_ms` resolved: its value, else 0 with a distilled model to
    /// train and `deadline_ms` without one; never more than `deadline_ms`.
    pub fn judge_wait(&self, distill_enabled: bool) -> std::time::Duration {
        let ms = self.judge_wait_ms.unwrap_or(if distill_enabled { 0 } else { self.deadline_ms });
        std::time::Duration::from_millis(ms.min(self.deadline_ms))
    }
}
