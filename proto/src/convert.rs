//! Conversions between `prism.v1` messages and `prism-core` types: the only
//! place that knows both.
//!
//! Core → wire is infallible. Wire → core checks what protobuf cannot: required
//! sub-messages are present, enums are known, and the per-token arrays have the
//! same length.

use crate::v1;
use prism_core as core;
use prost::Message;

/// A message that does not describe a valid core value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConvertError {
    #[error("{message}: missing field `{field}`")]
    Missing { message: &'static str, field: &'static str },
    #[error("{message}: field `{field}` has unknown enum value {value}")]
    UnknownEnum { message: &'static str, field: &'static str, value: i32 },
    #[error("trajectory {id}: {field} has {got} entries but tokens has {want}")]
    LengthMismatch { id: u64, field: &'static str, got: usize, want: usize },
    #[error("{message}: cannot decode protobuf ({reason})")]
    Decode { message: &'static str, reason: String },
    #[error("trajectory {id}: {reason}")]
    Invalid { id: u64, reason: String },
}

/// Result alias of this crate.
pub type Result<T, E = ConvertError> = std::result::Result<T, E>;

impl From<&core::Prompt> for v1::Prompt {
    fn from(p: &core::Prompt) -> Self {
        Self {
            id: p.id.0,
            task: p.task.clone(),
            problem: p.problem.clone(),
            text: p.text.clone(),
            reference: p.reference.clone(),
        }
    }
}

impl From<v1::Prompt> for core::Prompt {
    fn from(p: v1::Prompt) -> Self {
        Self { id: core::PromptId(p.id), task: p.task, problem: p.problem, text: p.text, reference: p.reference }
    }
}

impl From<core::FinishReason> for v1::FinishReason {
    fn from(f: core::FinishReason) -> Self {
        match f {
            core::FinishReason::Eos => Self::Eos,
            core::FinishReason::Stop => Self::Stop,
            core::FinishReason::Length => Self::Length,
            core::FinishReason::Rejected => Self::Rejected,
        }
    }
}

fn finish_reason(value: i32) -> Result<core::FinishReason> {
    match v1::FinishReason::try_from(value) {
        Ok(v1::FinishReason::Eos) => Ok(core::FinishReason::Eos),
        Ok(v1::FinishReason::Stop) => Ok(core::FinishReason::Stop),
        Ok(v1::FinishReason::Length) => Ok(core::FinishReason::Length),
        Ok(v1::FinishReason::Rejected) => Ok(core::FinishReason::Rejected),
        _ => Err(ConvertError::UnknownEnum { message: "Trajectory", field: "finish", value }),
    }
}

impl From<core::ScoreSource> for v1::ScoreSource {
    fn from(s: core::ScoreSource) -> Self {
        match s {
            core::ScoreSource::Verifier => Self::Verifier,
            core::ScoreSource::Judge => Self::Judge,
            core::ScoreSource::JudgeCache => Self::JudgeCache,
            core::ScoreSource::Distilled => Self::Distilled,
            core::ScoreSource::Guard => Self::Guard,
            core::ScoreSource::Unknown => Self::Unknown,
            core::ScoreSource::Implicit => Self::Implicit,
        }
    }
}

fn score_source(message: &'static str, field: &'static str, value: i32) -> Result<core::ScoreSource> {
    Ok(match v1::ScoreSource::try_from(value) {
        Ok(v1::ScoreSource::Verifier) => core::ScoreSource::Verifier,
        Ok(v1::ScoreSource::Judge) => core::ScoreSource::Judge,
        Ok(v1::ScoreSource::JudgeCache) => core::ScoreSource::JudgeCache,
        Ok(v1::ScoreSource::Distilled) => core::ScoreSource::Distilled,
        Ok(v1::ScoreSource::Guard) => core::ScoreSource::Guard,
        Ok(v1::ScoreSource::Unknown) => core::ScoreSource::Unknown,
        Ok(v1::ScoreSource::Implicit) => core::ScoreSource::Implicit,
        _ => return Err(ConvertError::UnknownEnum { message, field, value }),
    })
}

fn span(r: &std::ops::Range<u32>) -> v1::Span {
    v1::Span { start: r.start, end: r.end }
}

impl From<&core::Step> for v1::Step {
    fn from(s: &core::Step) -> Self {
        Self { text: Some(span(&s.text)), tokens: Some(span(&s.tokens)) }
    }
}

impl TryFrom<v1::Step> for core::Step {
    type Error = ConvertError;
    fn try_from(s: v1::Step) -> Result<Self> {
        let text = s.text.ok_or(ConvertError::Missing { message: "Step", field: "text" })?;
        let tokens = s.tokens.ok_or(ConvertError::Missing { message: "Step", field: "tokens" })?;
        Ok(Self { text: text.start..text.end, tokens: tokens.start..tokens.end })
    }
}

/// A trajectory on the wire, with the transport's timings (`generate_ms` is
/// taken from the trajectory; the others are the caller's).
pub fn trajectory_to_wire(t: &core::Trajectory, mut timings: v1::Timings) -> v1::Trajectory {
    timings.generate_ms = t.generate_ms;
    v1::Trajectory {
        id: t.id.0,
        group: t.group.0,
        sample: t.sample,
        group_size: t.group_size,
        prompt: Some((&t.prompt).into()),
        policy_version: t.policy_version.0,
        prompt_tokens: t.prompt_tokens.clone(),
        tokens: t.tokens.clone(),
        logprobs: t.logprobs.clone(),
        text: t.text.clone(),
        token_ends: t.token_ends.clone(),
        finish: v1::FinishReason::from(t.finish) as i32,
        timings: Some(timings),
        version_changes: t.version_changes.iter().map(|&(token, v)| v1::VersionChange { token, version: v.0 }).collect(),
    }
}

impl From<&core::Trajectory> for v1::Trajectory {
    fn from(t: &core::Trajectory) -> Self {
        trajectory_to_wire(t, v1::Timings::default())
    }
}

impl TryFrom<v1::Trajectory> for core::Trajectory {
    type Error = ConvertError;
    fn try_from(t: v1::Trajectory) -> Result<Self> {
        let want = t.tokens.len();
        for (field, got) in [("logprobs", t.logprobs.len()), ("token_ends", t.token_ends.len())] {
            if got != want {
                return Err(ConvertError::LengthMismatch { id: t.id, field, got, want });
            }
        }
        let prompt = t.prompt.ok_or(ConvertError::Missing { message: "Trajectory", field: "prompt" })?;
        // Token indices within the completion and increasing; versions above
        // the first and increasing.
        let (mut token, mut version) = (0u32, t.policy_version);
        for (i, c) in t.version_changes.iter().enumerate() {
            if (i > 0 && c.token <= token) || c.token as usize > want || c.version <= version {
                return Err(ConvertError::Invalid {
                    id: t.id,
                    reason: format!(
                        "version change {i} (token {}, version {}) after token {token}, version {version} of {want} tokens",
                        c.token, c.version
                    ),
                });
            }
            (token, version) = (c.token, c.version);
        }
        let version_changes = t.version_changes.iter().map(|c| (c.token, core::PolicyVersion(c.version))).collect();
        Ok(Self {
            id: core::TrajectoryId(t.id),
            group: core::GroupId(t.group),
            sample: t.sample,
            group_size: t.group_size,
            prompt: prompt.into(),
            policy_version: core::PolicyVersion(t.policy_version),
            prompt_tokens: t.prompt_tokens,
            tokens: t.tokens,
            logprobs: t.logprobs,
            text: t.text,
            token_ends: t.token_ends,
            finish: finish_reason(t.finish)?,
            generate_ms: t.timings.map_or(0, |x| x.generate_ms),
            version_changes,
        })
    }
}

impl From<&core::RewardLabel> for v1::RewardLabel {
    fn from(l: &core::RewardLabel) -> Self {
        Self {
            outcome: l.outcome,
            outcome_source: v1::ScoreSource::from(l.outcome_source) as i32,
            answer: l.answer.clone(),
            steps: l
                .steps
                .iter()
                .map(|s| v1::StepScore {
                    step: Some((&s.step).into()),
                    score: s.score,
                    source: v1::ScoreSource::from(s.source) as i32,
                })
                .collect(),
        }
    }
}

impl TryFrom<v1::RewardLabel> for core::RewardLabel {
    type Error = ConvertError;
    fn try_from(l: v1::RewardLabel) -> Result<Self> {
        let steps = l
            .steps
            .into_iter()
            .map(|s| {
                Ok(core::StepScore {
                    step: s.step.ok_or(ConvertError::Missing { message: "StepScore", field: "step" })?.try_into()?,
                    score: s.score,
                    source: score_source("StepScore", "source", s.source)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            outcome: l.outcome,
            outcome_source: score_source("RewardLabel", "outcome_source", l.outcome_source)?,
            answer: l.answer,
            steps,
        })
    }
}

/// A labeled trajectory on the wire, with the transport's timings.
pub fn labeled_to_wire(l: &core::LabeledTrajectory, timings: v1::Timings) -> v1::LabeledTrajectory {
    v1::LabeledTrajectory {
        trajectory: Some(trajectory_to_wire(&l.trajectory, timings)),
        label: Some((&l.label).into()),
    }
}

impl From<&core::LabeledTrajectory> for v1::LabeledTrajectory {
    fn from(l: &core::LabeledTrajectory) -> Self {
        labeled_to_wire(l, v1::Timings::default())
    }
}

impl TryFrom<v1::LabeledTrajectory> for core::LabeledTrajectory {
    type Error = ConvertError;
    fn try_from(l: v1::LabeledTrajectory) -> Result<Self> {
        let trajectory =
            l.trajectory.ok_or(ConvertError::Missing { message: "LabeledTrajectory", field: "trajectory" })?;
        let label = l.label.ok_or(ConvertError::Missing { message: "LabeledTrajectory", field: "label" })?;
        Ok(Self { trajectory: trajectory.try_into()?, label: label.try_into()? })
    }
}

pub use prism_core::{LabelFailure, LabelResult};

/// A label result on the wire, with the transport's timings.
pub fn label_result_to_wire(r: &LabelResult, timings: v1::Timings) -> v1::LabelResult {
    match r {
        Ok(l) => v1::LabelResult {
            trajectory: Some(trajectory_to_wire(&l.trajectory, timings)),
            label: Some((&l.label).into()),
            error: String::new(),
        },
        Err(f) => v1::LabelResult {
            trajectory: Some(trajectory_to_wire(&f.trajectory, timings)),
            label: None,
            error: if f.error.is_empty() { "unknown error".into() } else { f.error.clone() },
        },
    }
}

/// A label result from the wire: a label when present, else the failure.
pub fn label_result_from_wire(r: v1::LabelResult) -> Result<LabelResult> {
    let trajectory: core::Trajectory =
        r.trajectory.ok_or(ConvertError::Missing { message: "LabelResult", field: "trajectory" })?.try_into()?;
    Ok(match r.label {
        Some(label) => Ok(core::LabeledTrajectory { trajectory, label: label.try_into()? }),
        None if !r.error.is_empty() => Err(LabelFailure { trajectory, error: r.error }),
        None => return Err(ConvertError::Missing { message: "LabelResult", field: "label (or error)" }),
    })
}

/// Decodes a protobuf message, naming it in the error.
pub fn decode<M: Message + Default>(message: &'static str, bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| ConvertError::Decode { message, reason: e.to_string() })
}

#[cfg(test)]
mod tests;
