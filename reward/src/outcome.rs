//! Outcome verifiers: extract the final answer of a completion and compare it
//! with the reference.
//!
//! - `arithmetic`: the answer line `A:<n>` against the true value of the
//!   prompt's expression (the arithmetic task's rule, see CONVENTIONS.md);
//! - `numeric`: a number (GSM8K `#### 1,234`, `$`, commas, `%`, trailing `.0`,
//!   simple fractions) compared with a tolerance;
//! - `boxed`: the last `\boxed{…}`, normalised (spaces, `\frac`/`\dfrac`,
//!   `\left`/`\right`, `\text{}`), compared numerically when both sides are
//!   numbers and textually otherwise;
//! - `regex`: the configured answer regex, compared like `boxed`.

use crate::config::{Config, OutcomeKind};
use crate::{Error, Result};
use prism_core::{Prompt, ScoreSource};
use regex::Regex;
use std::sync::LazyLock;

/// What the outcome verifier says about one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// 1.0 when the answer matches the reference, 0.0 otherwise.
    pub score: f32,
    /// The final answer found in the completion, as written.
    pub answer: Option<String>,
    /// `Verifier`, or `Unknown` when there is no reference to compare with.
    pub source: ScoreSource,
}

/// The outcome verifier configured by `[reward]`.
#[derive(Debug, Clone)]
pub struct OutcomeVerifier {
    kind: OutcomeKind,
    tolerance: f64,
    regex: Option<Regex>,
}

static ARITH_ANSWER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^[ \t]*A:[ \t]*(-?\d+)[ \t]*\r?$").expect("valid regex"));
static HASHES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"####[ \t]*([^\n]+)").expect("valid regex"));
static ANSWER_IS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:final answer|the answer|answer)\s*(?:is|:)\s*:?\s*\$?(-?[\d,]*\.?\d+(?:/\d+)?)")
        .expect("valid regex")
});
static NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+").expect("valid regex"));

impl OutcomeVerifier {
    /// The verifier for `[reward]`'s `outcome`, `tolerance` and `answer_regex`.
    pub fn new(cfg: &Config) -> Result<Self> {
        let regex = if cfg.answer_regex.is_empty() {
            None
        } else {
            Some(Regex::new(&cfg.answer_regex).map_err(|e| {
                Error::Config(prism_core::config::Invalid::new("reward.answer_regex", &cfg.answer_regex, e.to_string()))
            })?)
        };
        Ok(Self { kind: cfg.outcome, tolerance: cfg.tolerance, regex })
    }

    fn kind_for(&self, task: &str) -> OutcomeKind {
        match (self.kind, task) {
            (OutcomeKind::Auto, "arithmetic") => OutcomeKind::Arithmetic,
            (OutcomeKind::Auto, "gsm8k") => OutcomeKind::Numeric,
            (OutcomeKind::Auto, _) => OutcomeKind::Boxed,
            (k, _) => k,
        }
    }

    /// The final answer of `completion` for a `task` prompt, as written.
    pub fn extract(&self, task: &str, completion: &str) -> Option<String> {
        let from_regex = || self.regex.as_ref().and_then(|re| regex_answer(re, completion));
        match self.kind_for(task) {
            OutcomeKind::Arithmetic => ARITH_ANSWER.captures_iter(completion).last().map(|c| c[1].to_string()),
            OutcomeKind::Regex => from_regex(),
            OutcomeKind::Contains => NUMBER.find_iter(completion).last().map(|m| m.as_str().to_string()),
            OutcomeKind::Numeric => from_regex().or_else(|| numeric_answer(completion)),
            OutcomeKind::Boxed | OutcomeKind::Auto => {
                from_regex().or_else(|| extract_boxed(completion)).or_else(|| numeric_answer(completion))
            }
        }
    }

    /// Checks `completion` against `prompt`'s reference (for the arithmetic task,
    /// the true value of its expression).
    pub fn verify(&self, prompt: &Prompt, completion: &str) -> Outcome {
        let answer = self.extract(&prompt.task, completion);
        let kind = self.kind_for(&prompt.task);
        let reference = match kind {
            OutcomeKind::Arithmetic => arithmetic_value(prompt).map(|v| v.to_string()),
            _ => prompt.reference.as_deref().map(reference_answer),
        };
        let Some(reference) = reference else {
            return Outcome { score: 0.0, answer, source: ScoreSource::Unknown };
        };
        let correct = match (&answer, kind) {
            (None, _) => false,
            (Some(a), OutcomeKind::Arithmetic) => a.trim().parse::<i64>().ok() == reference.parse::<i64>().ok(),
            // Any number of the completion (TRL's "the right integer appears" reward).
            (Some(_), OutcomeKind::Contains) => parse_number(&reference).is_some_and(|want| {
                NUMBER.find_iter(completion).any(|m| parse_number(m.as_str()).is_some_and(|got| numbers_match(got, want, self.tolerance)))
            }),
            (Some(a), OutcomeKind::Numeric) => match (parse_number(a), parse_number(&reference)) {
                (Some(x), Some(y)) => numbers_match(x, y, self.tolerance),
                _ => normalize(a) == normalize(&reference),
            },
            (Some(a), _) => answers_match(a, &reference, self.tolerance),
        };
        Outcome { score: if correct { 1.0 } else { 0.0 }, answer, source: ScoreSource::Verifier }
    }
}

fn regex_answer(re: &Regex, text: &str) -> Option<String> {
    let caps = re.captures_iter(text).last()?;
    let m = caps.get(1).or_else(|| caps.get(0))?;
    Some(m.as_str().trim().to_string())
}

/// GSM8K-style references carry their answer after `####`; others are the answer.
fn reference_answer(reference: &str) -> String {
    match HASHES.captures_iter(reference).last() {
        Some(c) => c[1].trim().to_string(),
        None => reference.trim().to_string(),
    }
}

/// `#### x`, else "the answer is x", else `\boxed{x}`, else the last number.
fn numeric_answer(text: &str) -> Option<String> {
    if let Some(c) = HASHES.captures_iter(text).last() {
        return Some(c[1].trim().to_string());
    }
    if let Some(c) = ANSWER_IS.captures_iter(text).last() {
        return Some(c[1].to_string());
    }
    if let Some(b) = extract_boxed(text) {
        return Some(b);
    }
    NUMBER.find_iter(text).last().map(|m| m.as_str().to_string())
}

/// The true value of an arithmetic prompt: its reference when given, else its
/// expression (`problem`, or `text` after `Q:`) evaluated.
fn arithmetic_value(prompt: &Prompt) -> Option<i64> {
    if let Some(r) = &prompt.reference
        && let Ok(v) = r.trim().parse::<i64>()
    {
        return Some(v);
    }
    for source in [&prompt.problem, &prompt.text] {
        let expr = source.trim();
        let expr = expr.strip_prefix("Q:").unwrap_or(expr).lines().next().unwrap_or("").trim();
        if let Ok(v) = crate::expr::eval(expr)
            && v.fract() == 0.0
            && v.abs() < 9.0e15
        {
            return Some(v as i64);
        }
    }
    None
}

/// The content of the last `\boxed{…}` (or `\fbox{…}`), braces balanced.
pub fn extract_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed", "\\fbox"].iter().filter_map(|k| text.rfind(k).map(|i| i + k.len())).max()?;
    let rest = text[start..].trim_start();
    if let Some(body) = rest.strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(body[..i].trim().to_string());
                    }
                }
                _ => {}
            }
        }
        None
    } else {
        // `\boxed 5`: the next token.
        rest.split(|c: char| c.is_whitespace() || c == '$').next().filter(|s| !s.is_empty()).map(str::to_string)
    }
}

/// Normalises a LaTeX-ish answer for comparison: no spaces, `$`, `\left`,
/// `\right`, `\!`, `\,`; `\text{x}`/`\mathrm{x}`/`\textbf{x}` → `x`;
/// `\dfrac`/`\tfrac` → `\frac`; `\frac{a}{b}` and `\frac ab` → `a/b`; a trailing
/// `.` and `^\circ`, `\%` and `%` removed.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("$", ""),
    ] {
        s = s.replace(from, to);
    }
    for cmd in ["\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\mbox"] {
        s = unwrap_command(&s, cmd);
    }
    s.retain(|c| !c.is_whitespace());
    s = rewrite_fracs(&s);
    let s = s.trim_end_matches('.');
    s.to_string()
}

/// `\cmd{x}` → `x` everywhere.
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        let after = &rest[i + cmd.len()..];
        let after_ws = after.trim_start();
        match after_ws.strip_prefix('{').and_then(|b| balanced(b).map(|end| (b, end))) {
            Some((body, end)) if !after.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                out.push_str(&rest[..i]);
                out.push_str(&body[..end]);
                rest = &body[end + 1..];
            }
            _ => {
                out.push_str(&rest[..i + cmd.len()]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Index of the `}` closing a group whose `{` came just before `s`.
fn balanced(s: &str) -> Option<usize> {
    let mut depth = 1usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// One argument of `\frac`: `{…}` or a single character.
fn frac_arg(s: &str) -> Option<(&str, &str)> {
    if let Some(b) = s.strip_prefix('{') {
        let end = balanced(b)?;
        Some((&b[..end], &b[end + 1..]))
    } else {
        let c = s.chars().next()?;
        Some((&s[..c.len_utf8()], &s[c.len_utf8()..]))
    }
}

/// `\frac{a}{b}` → `a/b` (parenthesised when a part is not a plain token).
fn rewrite_fracs(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\\frac") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 5..];
        match frac_arg(after).and_then(|(num, r)| frac_arg(r).map(|(den, r)| (num, den, r))) {
            Some((num, den, r)) => {
                let wrap = |x: &str| {
                    let x = rewrite_fracs(x);
                    if x.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') { x } else { format!("({x})") }
                };
                out.push_str(&format!("{}/{}", wrap(num), wrap(den)));
                rest = r;
            }
            None => {
                out.push_str("\\frac");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A number written in `s`: `1,234`, `$5`, `-3.50`, `12.0`, `50%`, `3/4`,
/// `\frac{3}{4}`, `\$5`; `None` when `s` is not one number.
pub fn parse_number(s: &str) -> Option<f64> {
    let n = normalize(s);
    let n = n.replace(',', "");
    if let Ok(v) = n.parse::<f64>() {
        return v.is_finite().then_some(v);
    }
    // A simple fraction, possibly parenthesised parts and a sign: -3/4, (1)/(2).
    let (num, den) = n.split_once('/')?;
    let strip = |x: &str| x.trim_start_matches('(').trim_end_matches(')').to_string();
    let (num, den) = (strip(num), strip(den));
    let (sign, num) = match num.strip_prefix('-') {
        Some(rest) => (-1.0, rest.to_string()),
        None => (1.0, num),
    };
    let (a, b) = (num.parse::<f64>().ok()?, den.parse::<f64>().ok()?);
    (b != 0.0).then(|| sign * a / b)
}

/// `|got - want| <= tol * max(1, |want|)`.
pub fn numbers_match(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1.0)
}

/// Two answers agree: numerically when both are numbers, else as normalised text.
pub fn answers_match(got: &str, want: &str, tol: f64) -> bool {
    match (parse_number(got), parse_number(want)) {
        (Some(x), Some(y)) => numbers_match(x, y, tol),
        _ => {
            let (a, b) = (normalize(got), normalize(want));
            !a.is_empty() && a == b
        }
    }
}

#[cfg(test)]
mod tests;
