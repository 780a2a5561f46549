//! The built-in arithmetic task: expressions such as `7+3*4-2`, answered one
//! step per line in evaluation order, then `A:<answer>`.
//!
//! ```text
//! Q:7+3*4-2
//! 3*4=12
//! 7+12=19
//! 19-2=17
//! A:17
//! ```
//!
//! `*` is evaluated first (left to right), then `+` and `-` left to right. The
//! prompt is `Q:<expr>\n`; the completion is the steps and the answer line, each
//! ending in `\n`.
//!
//! Also here: the **flawed teacher** whose demonstrations seed the supervised warm
//! start. A fixed, seeded share of arithmetic facts `a op b` is always answered
//! wrong, the same way every time — the systematic errors imitation copies and
//! only RL with a step verifier can go past.

use crate::rng::{hash64, SplitMix64};
use prism_core::config::{check, Invalid};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// `[task.arithmetic]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Smallest and largest operand. Default `[1, 9]`.
    pub operands: [i64; 2],
    /// Fewest and most operators per expression. Default `[2, 3]`.
    pub operators: [usize; 2],
    /// Operators to draw from, a subset of `+-*`. Default `"+-*"`.
    pub ops: String,
    /// Number of fixed held-out problems for evaluation. Default 200.
    pub held_out: usize,
    /// Seed of the held-out set; fixed across runs so accuracies compare. Default 1234.
    pub held_out_seed: u64,
    /// Share of arithmetic facts the flawed teacher always gets wrong. Default 0.15.
    pub flaw_rate: f64,
    /// Seed choosing which facts are wrong and how. Default 7.
    pub flaw_seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            operands: [1, 9],
            operators: [2, 3],
            ops: "+-*".into(),
            held_out: 200,
            held_out_seed: 1234,
            flaw_rate: 0.15,
            flaw_seed: 7,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), Invalid> {
        let [lo, hi] = self.operands;
        if lo > hi || lo < 0 || hi > 9999 {
            return Err(Invalid::new("task.arithmetic.operands", self.operands, "must be [min, max] with 0 <= min <= max <= 9999"));
        }
        let [lo, hi] = self.operators;
        if lo == 0 || lo > hi || hi > 8 {
            return Err(Invalid::new("task.arithmetic.operators", self.operators, "must be [min, max] with 1 <= min <= max <= 8"));
        }
        if self.ops.is_empty() || !self.ops.chars().all(|c| "+-*".contains(c)) {
            return Err(Invalid::new("task.arithmetic.ops", &self.ops, "must be a non-empty subset of \"+-*\""));
        }
        check::in_range("task.arithmetic.flaw_rate", self.flaw_rate, 0.0, 1.0)
    }
}

/// An arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Add,
    Sub,
    Mul,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
        }
    }

    pub fn from_symbol(c: char) -> Option<Op> {
        match c {
            '+' => Some(Op::Add),
            '-' => Some(Op::Sub),
            '*' => Some(Op::Mul),
            _ => None,
        }
    }

    pub fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
        }
    }
}

/// An expression `n0 op0 n1 op1 n2 ...`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Expr {
    pub numbers: Vec<i64>,
    pub ops: Vec<Op>,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.numbers[0])?;
        for (op, n) in self.ops.iter().zip(&self.numbers[1..]) {
            write!(f, "{}{n}", op.symbol())?;
        }
        Ok(())
    }
}

/// One evaluation step `a op b = c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFact {
    pub a: i64,
    pub op: Op,
    pub b: i64,
    pub c: i64,
}

impl fmt::Display for StepFact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}={}", self.a, self.op.symbol(), self.b, self.c)
    }
}

/// Something that answers arithmetic facts: the truth, or a flawed teacher.
pub trait Facts {
    fn answer(&self, a: i64, op: Op, b: i64) -> i64;
}

/// Arithmetic as it is.
pub struct TrueFacts;

impl Facts for TrueFacts {
    fn answer(&self, a: i64, op: Op, b: i64) -> i64 {
        op.apply(a, b)
    }
}

/// A teacher that gets a fixed share of facts wrong, always the same way: whether
/// `a op b` is wrong, and by how much (±1 to ±3), is a hash of the fact and the seed.
#[derive(Debug, Clone, Copy)]
pub struct FlawedTeacher {
    pub rate: f64,
    pub seed: u64,
}

impl FlawedTeacher {
    /// Whether this teacher answers `a op b` wrong.
    pub fn is_flawed(&self, a: i64, op: Op, b: i64) -> bool {
        let h = self.fact_hash(a, op, b);
        ((h >> 11) as f64 / (1u64 << 53) as f64) < self.rate
    }

    fn fact_hash(&self, a: i64, op: Op, b: i64) -> u64 {
        hash64(&[self.seed, a as u64, op.symbol() as u64, b as u64])
    }
}

impl Facts for FlawedTeacher {
    fn answer(&self, a: i64, op: Op, b: i64) -> i64 {
        let truth = op.apply(a, b);
        if !self.is_flawed(a, op, b) {
            return truth;
        }
        let h = hash64(&[self.fact_hash(a, op, b), 0x5eed]);
        let magnitude = 1 + (h % 3) as i64;
        if h & 8 == 0 { truth + magnitude } else { truth - magnitude }
    }
}

impl Expr {
    /// The exact value.
    pub fn value(&self) -> i64 {
        self.solve(&TrueFacts).last().map_or(self.numbers[0], |s| s.c)
    }

    /// The steps in evaluation order, each answered by `facts` and the (possibly
    /// wrong) result carried forward.
    pub fn solve(&self, facts: &dyn Facts) -> Vec<StepFact> {
        let mut numbers = self.numbers.clone();
        let mut ops = self.ops.clone();
        let mut steps = Vec::with_capacity(ops.len());
        while let Some(i) = ops.iter().position(|&o| o == Op::Mul) {
            let (a, b) = (numbers[i], numbers[i + 1]);
            let c = facts.answer(a, Op::Mul, b);
            steps.push(StepFact { a, op: Op::Mul, b, c });
            numbers.splice(i..=i + 1, [c]);
            ops.remove(i);
        }
        while !ops.is_empty() {
            let (a, op, b) = (numbers[0], ops[0], numbers[1]);
            let c = facts.answer(a, op, b);
            steps.push(StepFact { a, op, b, c });
            numbers.splice(0..=1, [c]);
            ops.remove(0);
        }
        steps
    }

    /// The prompt text: `Q:<expr>\n`.
    pub fn prompt(&self) -> String {
        format!("Q:{self}\n")
    }

    /// The completion text for `facts`: one step per line, then `A:<answer>\n`.
    pub fn completion(&self, facts: &dyn Facts) -> String {
        let steps = self.solve(facts);
        let answer = steps.last().map_or(self.numbers[0], |s| s.c);
        let mut out = String::new();
        for s in &steps {
            out.push_str(&format!("{s}\n"));
        }
        out.push_str(&format!("A:{answer}\n"));
        out
    }

    /// Parses `7+3*4-2` (as shown after `Q:`); numbers are non-negative literals.
    pub fn parse(text: &str) -> Option<Expr> {
        let mut numbers = Vec::new();
        let mut ops = Vec::new();
        let mut digits = String::new();
        for c in text.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
            } else {
                numbers.push(digits.parse().ok()?);
                digits.clear();
                ops.push(Op::from_symbol(c)?);
            }
        }
        numbers.push(digits.parse().ok()?);
        (numbers.len() == ops.len() + 1).then_some(Expr { numbers, ops })
    }
}

/// Draws expressions: the training stream (by index, from the run seed) and the
/// fixed held-out set (from `held_out_seed`), kept disjoint.
#[derive(Debug, Clone)]
pub struct Generator {
    config: Config,
    ops: Vec<Op>,
    held_out: Vec<Expr>,
    held_out_set: HashSet<Expr>,
}

impl Generator {
    pub fn new(config: Config) -> Self {
        let ops = config.ops.chars().filter_map(Op::from_symbol).collect();
        let mut g = Self { config, ops, held_out: Vec::new(), held_out_set: HashSet::new() };
        let mut rng = SplitMix64::new(hash64(&[g.config.held_out_seed, 0x4e1d]));
        let mut attempts = 0;
        while g.held_out.len() < g.config.held_out && attempts < 100 * g.config.held_out.max(1) {
            attempts += 1;
            let e = g.draw(&mut rng, 0);
            if g.held_out_set.insert(e.clone()) {
                g.held_out.push(e);
            }
        }
        g
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The fixed held-out problems.
    pub fn held_out(&self) -> &[Expr] {
        &self.held_out
    }

    /// Training problem number `index` of the stream seeded by `seed`; never a
    /// held-out problem.
    pub fn train(&self, seed: u64, index: u64) -> Expr {
        self.train_harder(seed, index, 0)
    }

    /// [`Generator::train`] with `extra` more operators (at most 8 in all):
    /// the curriculum's difficulty level. `extra = 0` is `train`.
    pub fn train_harder(&self, seed: u64, index: u64, extra: u32) -> Expr {
        let mut rng = SplitMix64::new(hash64(&[seed, index, 0x7a41]));
        loop {
            let e = self.draw(&mut rng, extra as usize);
            if !self.held_out_set.contains(&e) {
                return e;
            }
        }
    }

    fn draw(&self, rng: &mut SplitMix64, extra: usize) -> Expr {
        let [lo, hi] = self.config.operators.map(|n| (n + extra).min(8));
        let n_ops = rng.range(lo as u64, hi as u64) as usize;
        let [a, b] = self.config.operands;
        let numbers = (0..=n_ops).map(|_| a + rng.range(0, (b - a) as u64) as i64).collect();
        let ops = (0..n_ops).map(|_| self.ops[rng.range(0, self.ops.len() as u64 - 1) as usize]).collect();
        Expr { numbers, ops }
    }
}

#[cfg(test)]
mod tests;
