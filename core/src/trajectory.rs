//! Prompts and the trajectories sampled from them.

use crate::ids::{GroupId, PolicyVersion, PromptId, TrajectoryId};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// A problem handed to the rollout workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    pub id: PromptId,
    /// Which task produced it (selects the verifiers), e.g. `arithmetic`, `gsm8k`.
    pub task: String,
    /// The problem as the task states it; what a judge is shown.
    pub problem: String,
    /// The text the policy is conditioned on (the problem rendered with the task's
    /// prompt format or chat template).
    pub text: String,
    /// The reference answer, when the task has one.
    pub reference: Option<String>,
}

/// Why sampling stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled.
    Eos,
    /// A stop string was produced.
    Stop,
    /// `max_new_tokens` was reached.
    Length,
    /// Stopped at a step boundary because its partial solution scored below
    /// `rollout.reject_below` (early rejection).
    Rejected,
}

/// One sampled completion of a prompt, with what the learner needs to weigh it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub id: TrajectoryId,
    pub group: GroupId,
    /// Index of this sample within its group, `0..group_size`.
    pub sample: u32,
    pub group_size: u32,
    pub prompt: Prompt,
    /// The weights that sampled it.
    pub policy_version: PolicyVersion,
    pub prompt_tokens: Vec<u32>,
    /// The completion's token ids.
    pub tokens: Vec<u32>,
    /// Log-probability of each completion token under the distribution it was
    /// sampled from (the behaviour policy); same length as `tokens`.
    pub logprobs: Vec<f32>,
    /// The completion decoded to text.
    pub text: String,
    /// Byte offset in `text` where each token's text ends; same length as `tokens`.
    /// Maps text spans (steps) to token spans.
    pub token_ends: Vec<u32>,
    pub finish: FinishReason,
    /// Wall-clock milliseconds spent generating the group this sample belongs to.
    pub generate_ms: u64,
    /// Where newer weights took over during the generation
    /// (`rollout.inflight_updates`): `(i, v)` means tokens from index `i` on
    /// were sampled by version `v` (before the first, by `policy_version`);
    /// token indices increasing, versions above `policy_version` and
    /// increasing. Empty when one version sampled it all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub version_changes: Vec<(u32, PolicyVersion)>,
}

impl Trajectory {
    /// The version that sampled each completion token.
    pub fn token_versions(&self) -> impl Iterator<Item = PolicyVersion> + '_ {
        let mut changes = self.version_changes.iter().peekable();
        let mut version = self.policy_version;
        (0..self.tokens.len() as u32).map(move |i| {
            while let Some(&&(at, v)) = changes.peek() {
                if at > i {
                    break;
                }
                version = v;
                changes.next();
            }
            version
        })
    }

    /// The newest version that sampled any of its tokens.
    pub fn newest_version(&self) -> PolicyVersion {
        self.version_changes.last().map_or(self.policy_version, |&(_, v)| v.max(self.policy_version))
    }

    /// The token range `[first, last+1)` covering the bytes `text_span` of the
    /// completion: every token that overlaps the span.
    pub fn token_span(&self, text_span: &Range<u32>) -> Range<u32> {
        let mut start = None;
        let mut end = 0u32;
        let mut token_start = 0u32;
        for (i, &token_end) in self.token_ends.iter().enumerate() {
            let overlaps = token_end > text_span.start && token_start < text_span.end;
            if overlaps {
                start.get_or_insert(i as u32);
                end = i as u32 + 1;
            }
            token_start = token_end;
        }
        match start {
            Some(s) => s..end,
            None => end..end,
        }
    }
}

/// A segment of a completion that is judged as a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Byte range of the step in the completion text.
    pub text: Range<u32>,
    /// Token range of the step in the completion's tokens.
    pub tokens: Range<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trajectory(text: &str, token_ends: Vec<u32>) -> Trajectory {
        Trajectory {
            id: TrajectoryId(1),
            group: GroupId(1),
            sample: 0,
            group_size: 1,
            prompt: Prompt {
                id: PromptId(0),
                task: "t".into(),
                problem: String::new(),
                text: String::new(),
                reference: None,
            },
            policy_version: PolicyVersion(0),
            prompt_tokens: vec![],
            tokens: vec![0; token_ends.len()],
            logprobs: vec![0.0; token_ends.len()],
            text: text.into(),
            token_ends,
            finish: FinishReason::Eos,
            generate_ms: 0,
            version_changes: Vec::new(),
        }
    }

    #[test]
    fn each_token_has_the_version_that_sampled_it() {
        let mut t = trajectory("abcde", vec![1, 2, 3, 4, 5]);
        t.policy_version = PolicyVersion(3);
        assert_eq!(t.token_versions().map(|v| v.0).collect::<Vec<_>>(), vec![3; 5]);
        assert_eq!(t.newest_version(), PolicyVersion(3));
        t.version_changes = vec![(2, PolicyVersion(4)), (4, PolicyVersion(6))];
        assert_eq!(t.token_versions().map(|v| v.0).collect::<Vec<_>>(), vec![3, 3, 4, 4, 6]);
        assert_eq!(t.newest_version(), PolicyVersion(6));
        // Serialized only when there are changes; read back either way.
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains("version_changes"));
        assert_eq!(serde_json::from_str::<Trajectory>(&json).unwrap(), t);
        t.version_changes.clear();
        let json = serde_json::to_string(&t).unwrap();
        assert!(!json.contains("version_changes"));
        assert_eq!(serde_json::from_str::<Trajectory>(&json).unwrap(), t);
    }

    #[test]
    fn token_span_covers_overlapping_tokens() {
        // tokens: "3*4" "=12" "\n" "A:" "19"
        let t = trajectory("3*4=12\nA:19", vec![3, 6, 7, 9, 11]);
        assert_eq!(t.token_span(&(0..7)), 0..3);
        assert_eq!(t.token_span(&(7..11)), 3..5);
        // a span starting mid-token includes that token
        assert_eq!(t.token_span(&(4..6)), 1..2);
        // an empty or out-of-range span is empty
        assert_eq!(t.token_span(&(20..30)), 0..0);
    }
}

/// One prompt handed to a rollout worker, to be sampled G times as group `group`
/// by weights no older than `min_version`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub group: GroupId,
    pub prompt: Prompt,
    pub min_version: PolicyVersion,
}
