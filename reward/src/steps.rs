//! Deterministic step verifiers ("code verification" without running code):
//!
//! - the arithmetic task's step checker (rule in CONVENTIONS.md): a step is
//!   right iff it parses as `a op b = c`, `a op b` equals `c`, and each operand
//!   is available — a number of the expression or a result of an earlier step,
//!   not yet consumed. Results of wrong steps become available too, so copying
//!   a wrong result forward is a right step. The answer line `A:<n>` is scored
//!   by the outcome rule (right iff `n` is the true value);
//! - GSM8K calculator annotations `<<expr=value>>`, evaluated by
//!   [`crate::expr`]: a step with annotations is right iff every one evaluates
//!   to its written value; a step without any gets no verdict.

use crate::config::StepVerifierKind;
use crate::outcome::numbers_match;
use prism_core::Prompt;
use regex::Regex;
use std::sync::LazyLock;

static ARITH_STEP: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$").expect("valid regex"));
static ARITH_ANSWER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\s*A:\s*(-?\d+)\s*$").expect("valid regex"));
static ANNOTATION: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"<<([^<>]*)>>").expect("valid regex"));

/// The step verifier for one trajectory's task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepVerifier {
    Arithmetic,
    /// GSM8K calculator annotations, values compared with this tolerance
    /// (relative above 1) or to the decimals written.
    Calculator {
        tolerance: f64,
    },
    None,
}

impl StepVerifier {
    /// The verifier `[reward] step_verifier` selects for `task`.
    pub fn for_task(kind: StepVerifierKind, task: &str, tolerance: f64) -> Self {
        match kind {
            StepVerifierKind::Auto if task == "arithmetic" => StepVerifier::Arithmetic,
            StepVerifierKind::Auto | StepVerifierKind::Calculator => StepVerifier::Calculator { tolerance },
            StepVerifierKind::Arithmetic => StepVerifier::Arithmetic,
            StepVerifierKind::None => StepVerifier::None,
        }
    }

    /// One verdict per step (1.0 right, 0.0 wrong, `None` when this verifier
    /// cannot tell).
    pub fn score(&self, prompt: &Prompt, steps: &[&str]) -> Vec<Option<f32>> {
        match *self {
            StepVerifier::Arithmetic => match arithmetic_expression(prompt) {
                Some(expr) => check_arithmetic(&expr, steps),
                None => vec![None; steps.len()],
            },
            StepVerifier::Calculator { tolerance } => {
                steps.iter().map(|s| check_calculator(s, tolerance).map(|ok| if ok { 1.0 } else { 0.0 })).collect()
            }
            StepVerifier::None => vec![None; steps.len()],
        }
    }
}

/// The expression of an arithmetic prompt: `problem`, or `text` after `Q:`.
fn arithmetic_expression(prompt: &Prompt) -> Option<String> {
    [&prompt.problem, &prompt.text].into_iter().find_map(|s| {
        let s = s.trim();
        let s = s.strip_prefix("Q:").unwrap_or(s).lines().next()?.trim();
        expression_numbers(s).map(|_| s.to_string())
    })
}

/// The numbers of an arithmetic expression (`7+3*4-2` → 7, 3, 4, 2; a `-`
/// at the start or after an operator is a sign).
pub fn expression_numbers(expr: &str) -> Option<Vec<i64>> {
    let mut numbers = Vec::new();
    let bytes: Vec<u8> = expr.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let mut i = 0;
    let mut expect_number = true;
    while i < bytes.len() {
        if expect_number {
            let start = i;
            if bytes[i] == b'-' {
                i += 1;
            }
            let digits = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if i == digits {
                return None;
            }
            numbers.push(std::str::from_utf8(&bytes[start..i]).ok()?.parse().ok()?);
            expect_number = false;
        } else {
            if !matches!(bytes[i], b'+' | b'-' | b'*') {
                return None;
            }
            i += 1;
            expect_number = true;
        }
    }
    (!numbers.is_empty() && !expect_number).then_some(numbers)
}

/// The arithmetic step checker over the steps of one completion of `expr`.
pub fn check_arithmetic(expr: &str, steps: &[&str]) -> Vec<Option<f32>> {
    let Some(mut available) = expression_numbers(expr) else {
        return vec![None; steps.len()];
    };
    let truth = crate::expr::eval(expr).ok().filter(|v| v.fract() == 0.0).map(|v| v as i64);
    fn take(x: i64, available: &mut Vec<i64>) -> bool {
        match available.iter().position(|&y| y == x) {
            Some(i) => {
                available.remove(i);
                true
            }
            None => false,
        }
    }
    steps
        .iter()
        .map(|step| {
            if let Some(c) = ARITH_STEP.captures(step) {
                let (Ok(a), Ok(b), Ok(result)) = (c[1].parse::<i64>(), c[3].parse::<i64>(), c[4].parse::<i64>()) else {
                    return Some(0.0);
                };
                let value = match &c[2] {
                    "+" => a.checked_add(b),
                    "-" => a.checked_sub(b),
                    _ => a.checked_mul(b),
                };
                let has_a = take(a, &mut available);
                let has_b = take(b, &mut available);
                available.push(result);
                Some(if value == Some(result) && has_a && has_b { 1.0 } else { 0.0 })
            } else if let Some(c) = ARITH_ANSWER.captures(step) {
                truth.map(|t| if c[1].parse::<i64>().ok() == Some(t) { 1.0 } else { 0.0 })
            } else {
                Some(0.0)
            }
        })
        .collect()
}

/// One `<<expr=value>>` annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Byte offset of `<<` in the text searched.
    pub at: usize,
    /// The calculation, e.g. `80000*1.5`.
    pub expr: String,
    /// The value written after the last `=`, e.g. `120000`.
    pub value: String,
}

/// The calculator annotations of `text`, in order.
pub fn annotations(text: &str) -> Vec<Annotation> {
    ANNOTATION
        .captures_iter(text)
        .map(|c| {
            let whole = c.get(0).expect("group 0 always matches");
            let inner = &c[1];
            let (expr, value) = inner.rsplit_once('=').unwrap_or((inner, ""));
            Annotation { at: whole.start(), expr: expr.trim().into(), value: value.trim().into() }
        })
        .collect()
}

/// Whether an annotation's calculation gives its written value: within
/// `tolerance` (relative above 1), or equal once rounded to the decimals the
/// value is written with (`<<10/3=3.33>>`). `Err` when either side does not parse.
pub fn check_annotation(a: &Annotation, tolerance: f64) -> Result<bool, crate::expr::ExprError> {
    let got = crate::expr::eval(&a.expr)?;
    let want = crate::expr::eval(&a.value)?;
    if numbers_match(got, want, tolerance) {
        return Ok(true);
    }
    let decimals = a.value.split_once('.').map_or(0, |(_, d)| d.len()) as i32;
    if decimals > 0 && !a.value.contains(['/', '*', '+', '(']) {
        let scale = 10f64.powi(decimals);
        return Ok(((got * scale).round() - want * scale).abs() < 1e-6);
    }
    Ok(false)
}

/// The calculator verdict of one step: `None` without annotations, else whether
/// every annotation checks (a malformed one does not).
pub fn check_calculator(step: &str, tolerance: f64) -> Option<bool> {
    let found = annotations(step);
    if found.is_empty() {
        return None;
    }
    Some(found.iter().all(|a| check_annotation(a, tolerance).unwrap_or(false)))
}

#[cfg(test)]
mod tests;
