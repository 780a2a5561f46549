//! Supervised fine-tuning data: (prompt, completion) pairs.
//!
//! The loss is the cross-entropy of the completion tokens given the prompt
//! (prompt tokens are context only); [`crate::Learner::sft_step`] trains on
//! tokenised pairs with the same micro-batching, clipping and optimizer as RL.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One tokenised training pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPair {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

/// One line of an SFT JSONL file: `{"prompt": "...", "completion": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextPair {
    pub prompt: String,
    pub completion: String,
}

/// Reads a JSONL file of [`TextPair`]s; blank lines are skipped, a bad line is
/// reported with its number.
pub fn read_jsonl(path: &Path) -> Result<Vec<TextPair>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Batch(format!("{}, line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pairs_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sft.jsonl");
        std::fs::write(&path, "{\"prompt\":\"Q:1+2\\n\",\"completion\":\"1+2=3\\nA:3\\n\"}\n\n{\"prompt\":\"x\"}\n")
            .unwrap();
        let err = read_jsonl(&path).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("completion"), "{err}");
        std::fs::write(&path, "{\"prompt\":\"Q:1+2\\n\",\"completion\":\"1+2=3\\nA:3\\n\"}\n").unwrap();
        let pairs = read_jsonl(&path).unwrap();
        assert_eq!(pairs, vec![TextPair { prompt: "Q:1+2\n".into(), completion: "1+2=3\nA:3\n".into() }]);
    }
}
