//! Tasks: where prompts come from, by index, reproducibly.

use crate::arithmetic::{self, Expr};
use crate::dataset::{self, Dataset};
use crate::rng::{hash64, SplitMix64};
use crate::Result;
use prism_core::config::{check, Invalid};
use prism_core::{Prompt, PromptId};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[task]`: which task trains and evaluates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `arithmetic` (built in) or `jsonl` (question/answer lines, e.g. GSM8K). Default `arithmetic`.
    pub kind: String,
    pub arithmetic: arithmetic::Config,
    pub jsonl: dataset::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self { kind: "arithmetic".into(), arithmetic: arithmetic::Config::default(), jsonl: dataset::Config::default() }
    }
}

impl Config {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        check::one_of("task.kind", &self.kind, &["arithmetic", "jsonl"])?;
        self.arithmetic.validate()?;
        if self.kind == "jsonl" {
            self.jsonl.validate()?;
        }
        Ok(())
    }
}

/// Renders a problem into the text the policy sees (e.g. through a chat template).
pub type Render = dyn Fn(&str) -> String + Send + Sync;

/// A source of problems: a training stream addressed by index and a fixed
/// evaluation set.
pub enum Task {
    Arithmetic { generator: arithmetic::Generator, seed: u64 },
    Jsonl { train: Dataset, eval: Option<Dataset>, seed: u64, render: Box<Render> },
}

impl Task {
    /// Builds the task of `config`; `render` formats JSONL questions (arithmetic
    /// prompts have their own fixed format).
    pub fn new(config: &Config, seed: u64, render: Box<Render>) -> Result<Self> {
        Ok(match config.kind.as_str() {
            "jsonl" => Task::Jsonl {
                train: Dataset::load(&config.jsonl.train, &config.jsonl)?,
                eval: match &config.jsonl.eval {
                    Some(p) => Some(Dataset::load(p, &config.jsonl)?),
                    None => None,
                },
                seed,
                render,
            },
            _ => Task::Arithmetic { generator: arithmetic::Generator::new(config.arithmetic.clone()), seed },
        })
    }

    /// The task's name, as recorded in each prompt (selects the verifiers).
    pub fn name(&self) -> &'static str {
        match self {
            Task::Arithmetic { .. } => "arithmetic",
            Task::Jsonl { .. } => "jsonl",
        }
    }

    /// Training prompt number `index` (the prompt cursor). Datasets are visited in a
    /// fresh seeded order each epoch.
    pub fn train_prompt(&self, index: u64) -> Prompt {
        match self {
            Task::Arithmetic { generator, seed } => arithmetic_prompt(index, &generator.train(*seed, index)),
            Task::Jsonl { train, seed, render, .. } => {
                let n = train.len() as u64;
                let epoch = index / n;
                let row = epoch_order(n, hash64(&[*seed, epoch]))[(index % n) as usize];
                train.prompt(index, row as usize, render.as_ref())
            }
        }
    }

    /// The fixed evaluation set, at most `limit` prompts.
    pub fn eval_prompts(&self, limit: usize) -> Vec<Prompt> {
        match self {
            Task::Arithmetic { generator, .. } => generator
                .held_out()
                .iter()
                .take(limit)
                .enumerate()
                .map(|(i, e)| arithmetic_prompt(i as u64, e))
                .collect(),
            Task::Jsonl { eval, train, render, .. } => {
                let data = eval.as_ref().unwrap_or(train);
                (0..data.len().min(limit)).map(|i| data.prompt(i as u64, i, render.as_ref())).collect()
            }
        }
    }
}

fn arithmetic_prompt(index: u64, e: &Expr) -> Prompt {
    Prompt {
        id: PromptId(index),
        task: "arithmetic".into(),
        problem: e.to_string(),
        text: e.prompt(),
        reference: Some(e.value().to_string()),
    }
}

/// A permutation of `0..n` (Fisher–Yates with a seeded generator).
fn epoch_order(n: u64, seed: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..order.len()).rev() {
        let j = rng.range(0, i as u64) as usize;
        order.swap(i, j);
    }
    order
}

/// Where data files live by default: `PRISM_DATA_DIR`, else `../shared/data`
/// beside the repository.
pub fn data_dir() -> PathBuf {
    std::env::var_os("PRISM_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_prompts_are_reproducible_and_answered() {
        let t = Task::new(&Config::default(), 3, Box::new(|q| q.to_string())).unwrap();
        let p = t.train_prompt(10);
        assert_eq!(p, t.train_prompt(10));
        assert_eq!(p.text, format!("Q:{}\n", p.problem));
        let e = Expr::parse(&p.problem).unwrap();
        assert_eq!(p.reference.as_deref(), Some(e.value().to_string().as_str()));
        assert_eq!(t.eval_prompts(1000).len(), 200);
        assert_eq!(t.eval_prompts(5).len(), 5);
    }

    #[test]
    fn epoch_order_is_a_permutation() {
        let mut o = epoch_order(100, 9);
        assert_ne!(o, (0..100).collect::<Vec<_>>());
        o.sort();
        assert_eq!(o, (0..100).collect::<Vec<_>>());
    }
}
