//! JSONL question/answer datasets (GSM8K and anything shaped like it).

use crate::{Error, Result};
use prism_core::config::Invalid;
use prism_core::{Prompt, PromptId};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[task.jsonl]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Training file, one JSON object per line. Default empty (required when
    /// `task.kind = "jsonl"`).
    pub train: PathBuf,
    /// Evaluation file; the training file when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<PathBuf>,
    /// Field holding the question. Default `question`.
    pub question_field: String,
    /// Field holding the reference answer. Default `answer`.
    pub answer_field: String,
    /// The reference is the text after the last occurrence of this marker in the
    /// answer field (GSM8K writes `#### 72`); empty = the whole field. Default `####`.
    pub answer_marker: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            train: PathBuf::new(),
            eval: None,
            question_field: "question".into(),
            answer_field: "answer".into(),
            answer_marker: "####".into(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        if self.train.as_os_str().is_empty() {
            return Err(Invalid::new("task.jsonl.train", &self.train, "is required when task.kind = \"jsonl\""));
        }
        Ok(())
    }
}

/// One question with its reference answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub question: String,
    pub reference: String,
}

/// A loaded JSONL dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub rows: Vec<Row>,
}

impl Dataset {
    /// Reads every line; a line that is not a JSON object with the configured
    /// string fields is an error naming the file, the line and the field.
    pub fn load(path: &Path, config: &Config) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| Error::Dataset { path: path.to_path_buf(), line: i + 1, reason };
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
            let field = |name: &str| -> Result<String> {
                value
                    .get(name)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("field `{name}` is missing or not a string")))
            };
            let question = field(&config.question_field)?;
            let answer = field(&config.answer_field)?;
            let reference = if config.answer_marker.is_empty() {
                answer.trim().to_string()
            } else {
                match answer.rsplit_once(&config.answer_marker) {
                    Some((_, r)) => r.trim().to_string(),
                    None => return Err(bad(format!("field `{}` has no `{}` marker", config.answer_field, config.answer_marker))),
                }
            };
            rows.push(Row { question, reference });
        }
        if rows.is_empty() {
            return Err(Error::Dataset { path: path.to_path_buf(), line: 0, reason: "no rows".into() });
        }
        Ok(Self { path: path.to_path_buf(), rows })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub(crate) fn prompt(&self, index: u64, row: usize, render: &(dyn Fn(&str) -> String + Send + Sync)) -> Prompt {
        let r = &self.rows[row];
        Prompt {
            id: PromptId(index),
            task: "jsonl".into(),
            problem: r.question.clone(),
            text: render(&r.question),
            reference: Some(r.reference.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::data_dir;

    #[test]
    fn gsm8k_loads_with_references() {
        let path = data_dir().join("gsm8k/test.jsonl");
        let d = Dataset::load(&path, &Config::default()).unwrap();
        assert_eq!(d.len(), 1319, "GSM8K test has 1319 problems");
        assert!(d.rows[0].question.starts_with("Janet"));
        assert_eq!(d.rows[0].reference, "18");
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"question\":\"a\",\"answer\":\"#### 1\"}\n{\"question\":\"b\"}\n").unwrap();
        let e = Dataset::load(&p, &Config::default()).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: field `answer` is missing or not a string", p.display()));
        std::fs::write(&p, "{\"question\":\"a\",\"answer\":\"1\"}\n").unwrap();
        let e = Dataset::load(&p, &Config::default()).unwrap_err().to_string();
        assert!(e.ends_with(":1: field `answer` has no `####` marker"), "{e}");
        std::fs::write(&p, "{oops\n").unwrap();
        assert!(Dataset::load(&p, &Config::default()).unwrap_err().to_string().contains(":1: not JSON"));
    }
}
