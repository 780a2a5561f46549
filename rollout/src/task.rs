//! Tasks: where prompts come from, by index, reproducibly.

use crate::arithmetic::{self, Expr};
use crate::curriculum;
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
    pub adaptive: curriculum::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            kind: "arithmetic".into(),
            arithmetic: arithmetic::Config::default(),
            jsonl: dataset::Config::default(),
            adaptive: curriculum::Config::default(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> std::result::Result<(), Invalid> {
        check::one_of("task.kind", &self.kind, &["arithmetic", "jsonl"])?;
        self.arithmetic.validate()?;
        self.adaptive.validate()?;
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
        self.train_prompt_at(index, 0)
    }

    /// [`Task::train_prompt`] at a curriculum difficulty `level` (extra
    /// operators of arithmetic problems; datasets have no levels).
    pub fn train_prompt_at(&self, index: u64, level: u32) -> Prompt {
        match self {
            Task::Arithmetic { generator, seed } => arithmetic_prompt(index, &generator.train_harder(*seed, index, level)),
            Task::Jsonl { train, render, .. } => {
                let row = self.train_row(index).expect("datasets have rows");
                train.prompt(index, row as usize, render.as_ref())
            }
        }
    }

    /// The dataset row of training prompt `index` (`None` for generated
    /// problems).
    pub fn train_row(&self, index: u64) -> Option<u32> {
        match self {
            Task::Arithmetic { .. } => None,
            Task::Jsonl { train, seed, .. } => {
                let n = train.len() as u64;
                let epoch = index / n;
                Some(epoch_order(n, hash64(&[*seed, epoch]))[(index % n) as usize])
            }
        }
    }

    /// The seed of the training stream.
    pub fn seed(&self) -> u64 {
        match self {
            Task::Arithmetic { seed, .. } | Task::Jsonl { seed, .. } => *seed,
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

    /// Level 0 is the plain stream; each level adds one operator to every
    /// problem (default [2, 3] becomes [4, 5] at level 2), answers still right.
    #[test]
    fn a_curriculum_level_adds_operators() {
        let t = Task::new(&Config::default(), 3, Box::new(|q| q.to_string())).unwrap();
        for i in 0..200 {
            assert_eq!(t.train_prompt_at(i, 0), t.train_prompt(i));
            let p = t.train_prompt_at(i, 2);
            let e = Expr::parse(&p.problem).unwrap();
            assert!((4..=5).contains(&e.ops.len()), "{}", p.problem);
            assert_eq!(p.reference, Some(e.value().to_string()));
            let hardest = Expr::parse(&t.train_prompt_at(i, 7).problem).unwrap();
            assert_eq!(hardest.ops.len(), 8, "capped at 8 operators");
        }
        assert_eq!(t.train_row(5), None);
    }

    #[test]
    fn epoch_order_is_a_permutation() {
        let mut o = epoch_order(100, 9);
        assert_ne!(o, (0..100).collect::<Vec<_>>());
        o.sort();
        assert_eq!(o, (0..100).collect::<Vec<_>>());
    }
}
