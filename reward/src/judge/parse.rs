//! Reading judge replies: the OpenAI response shapes, the verdicts in the
//! text, and P(yes) from the verdict token's `top_logprobs`.
//!
//! Nothing here trusts the server: a reply cut off at `max_tokens` is marked
//! ([`Choice::truncated`]), logprobs that cannot be log-probabilities (above 0,
//! NaN, +inf) are refused ([`NotAProbability`]), and P(yes) is computed in log
//! space so that it is a finite number in [0, 1] or nothing at all.

use super::Api;
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

/// One choice of a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    /// The sampled tokens with their alternatives, when the server sent logprobs.
    pub tokens: Option<Vec<Token>>,
    /// Why the server stopped (`stop`, `length`, …), when it said.
    pub finish_reason: Option<String>,
}

impl Choice {
    /// The reply was cut off at `max_tokens` (`finish_reason = "length"`): its
    /// last `\boxed{}` may be text it was quoting, so it gives no verdict.
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

/// A sampled token, its logprob and the top alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// The choices of a `chat/completions` or `completions` response body.
pub fn choices(api: Api, body: &[u8]) -> Result<Vec<Choice>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let Some(list) = v.get("choices").and_then(Value::as_array) else {
        return Err("no `choices` array".into());
    };
    list.iter()
        .map(|c| match api {
            Api::Chat => {
                let text = match &c["message"]["content"] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => return Err(format!("`message.content` is {other}")),
                };
                let tokens = c["logprobs"]["content"].as_array().map(|items| {
                    items
                        .iter()
                        .map(|t| Token {
                            text: t["token"].as_str().unwrap_or("").to_string(),
                            logprob: t["logprob"].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                            top: t["top_logprobs"]
                                .as_array()
                                .map(|alts| {
                                    alts.iter()
                                        .filter_map(|a| {
                                            Some((a["token"].as_str()?.to_string(), a["logprob"].as_f64()? as f32))
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        })
                        .collect()
                });
                Ok(Choice { text, tokens, finish_reason: finish_reason(c) })
            }
            Api::Completions => {
                let text = c["text"].as_str().ok_or("no `text` in a choice")?.to_string();
                let lp = &c["logprobs"];
                let tokens = lp["tokens"].as_array().map(|toks| {
                    toks.iter()
                        .enumerate()
                        .map(|(i, t)| Token {
                            text: t.as_str().unwrap_or("").to_string(),
                            logprob: lp["token_logprobs"][i].as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                            top: lp["top_logprobs"][i]
                                .as_object()
                                .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32))).collect())
                                .unwrap_or_default(),
                        })
                        .collect()
                });
                Ok(Choice { text, tokens, finish_reason: finish_reason(c) })
            }
        })
        .collect()
}

fn finish_reason(choice: &Value) -> Option<String> {
    choice["finish_reason"].as_str().map(str::to_string)
}

/// A verdict found in a reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// The step is judged correct.
    pub positive: bool,
    /// Byte offset of the verdict word in the reply.
    pub at: usize,
    /// Which pair of words it was written with.
    pub words: Words,
}

/// A verdict vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Words {
    YesNo,
    CorrectIncorrect,
}

impl Words {
    fn pair(self) -> (&'static str, &'static str) {
        match self {
            Words::YesNo => ("yes", "no"),
            Words::CorrectIncorrect => ("correct", "incorrect"),
        }
    }
}

/// `\boxed{` then optionally `\text{`/`\textbf{`/`\mathrm{`, then a word.
static BOXED_WORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?([A-Za-z]*)").expect("valid regex")
});

/// A step header in a ThinkPRM reply: `Step i` at the start of a line (after
/// markdown decoration such as `**`, `#`, `-`, `>`), or `Step i:` / `Step i
/// \boxed` anywhere. A mention in prose ("as in Step 1, …", "from Step 1.")
/// is not a header.
static STEP_HEADER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?im)^[ \t>*#_-]*step\s*(\d+)\b|\bstep\s*(\d+)\s*(?:\*\*)?\s*(?::|\\boxed)").expect("valid regex")
});

fn classify(word: &str, at: usize) -> Option<Verdict> {
    let (positive, words) = match word.to_ascii_lowercase().as_str() {
        "yes" => (true, Words::YesNo),
        "no" => (false, Words::YesNo),
        "correct" => (true, Words::CorrectIncorrect),
        "incorrect" => (false, Words::CorrectIncorrect),
        _ => return None,
    };
    Some(Verdict { positive, at, words })
}

/// GenPRM style: the verdict in the last `\boxed{}` of the reply; `None` when
/// there is none or it is not yes/no (or correct/incorrect).
pub fn last_boxed_verdict(text: &str) -> Option<Verdict> {
    let c = BOXED_WORD.captures_iter(text).last()?;
    let m = c.get(1)?;
    classify(m.as_str(), m.start())
}

/// ThinkPRM style: the verdict of each of `n` steps; `None` for steps without
/// one. Verdicts are read in order of appearance: each `\boxed{}` holding a
/// verdict word belongs to the most recent [`STEP_HEADER`] before it (with
/// prose between them, as real ThinkPRM output has), and the last verdict
/// written for a step wins. A reply without any header gives its verdicts to
/// steps 1, 2, … in order. Verdicts before the first header, for steps outside
/// 1..=n, or beyond the n-th without headers are ignored, as are boxes that
/// hold no verdict word (a number the judge recomputed).
pub fn step_verdicts(text: &str, n: usize) -> Vec<Option<Verdict>> {
    let headers: Vec<(usize, Option<usize>)> = STEP_HEADER
        .captures_iter(text)
        .filter_map(|c| {
            let at = c.get(0)?.start();
            let number = c.get(1).or_else(|| c.get(2))?.as_str().parse::<usize>().ok();
            Some((at, number))
        })
        .collect();
    let verdicts = BOXED_WORD.captures_iter(text).filter_map(|c| {
        let word = c.get(1)?;
        Some((c.get(0)?.start(), classify(word.as_str(), word.start())?))
    });
    let mut out = vec![None; n];
    for (k, (at, verdict)) in verdicts.enumerate() {
        let step = if headers.is_empty() {
            Some(k + 1)
        } else {
            // The latest header starting before this box (a header written
            // as `Step i \boxed{…}` starts before its own box).
            let before = headers.partition_point(|(h, _)| *h < at);
            before.checked_sub(1).and_then(|i| headers[i].1)
        };
        if let Some(i) = step.filter(|i| (1..=n).contains(i)) {
            out[i - 1] = Some(verdict);
        }
    }
    out
}

/// The text the tokens spell (for most servers, the reply itself; a token that
/// holds part of a multi-byte character may be reported lossily, and then it
/// is not).
pub fn spelled(tokens: &[Token]) -> String {
    tokens.iter().map(|t| t.text.as_str()).collect()
}

/// A logprob that cannot be one (above 0, NaN, +inf), or a P(yes) that is not
/// a finite number in [0, 1]: the reply's verdict is then unknown.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotAProbability(pub f64);

/// How far above 0 a logprob may be and still be read as 0: servers compute
/// log-softmax in low precision and may round the top token's logprob up to a
/// hair above 0. Anything above this is not a log-probability.
const LOGPROB_ROUNDING: f64 = 1e-3;

/// log(Σ exp(x)) with the maximum subtracted, so that no term overflows or
/// underflows to nothing; -inf for an empty or all -inf list.
fn log_sum_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + xs.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// P(yes) for a verdict found at byte `verdict.at` of the text the `tokens`
/// spell ([`spelled`]), from the alternatives at the verdict token's
/// position: the probability mass of alternatives reading as the positive word
/// against that of the negative one (a token may carry a leading space, ` Yes`
/// and `Yes` both count, and may be a prefix, `in` for `incorrect`). When one
/// side has no listed alternative, its mass is taken as that of the smallest
/// listed logprob, an upper bound.
///
/// The masses are compared in log space (log-sum-exp with the maximum
/// subtracted), so logprobs of -800 still give a ratio. `Ok(None)` when there
/// are no alternatives or nothing at that position reads as either word;
/// `Err` when a logprob at that position is not a log-probability (above 0
/// beyond rounding, NaN, +inf — a logprob of 800 would overflow `exp`) or the
/// result is not a finite number in [0, 1].
pub fn p_yes(tokens: &[Token], verdict: &Verdict) -> Result<Option<f32>, NotAProbability> {
    let mut start = 0usize;
    let mut found = None;
    for (i, t) in tokens.iter().enumerate() {
        let end = start + t.text.len();
        if verdict.at >= start && verdict.at < end {
            found = Some((i, verdict.at - start));
            break;
        }
        start = end;
    }
    let Some((i, offset)) = found else { return Ok(None) };
    let token = &tokens[i];
    if token.top.is_empty() {
        return Ok(None);
    }
    let mut candidates: Vec<(&str, f64)> = token.top.iter().map(|(s, lp)| (s.as_str(), *lp as f64)).collect();
    if !candidates.iter().any(|(s, _)| *s == token.text) {
        candidates.push((&token.text, token.logprob as f64));
    }
    if let Some(&(_, bad)) = candidates.iter().find(|(_, lp)| lp.is_nan() || *lp > LOGPROB_ROUNDING) {
        return Err(NotAProbability(bad));
    }
    let Some(before) = token.text.get(..offset).map(str::trim) else { return Ok(None) };
    let (yes, no) = verdict.words.pair();
    let (mut yes_lps, mut no_lps) = (Vec::new(), Vec::new());
    for (alt, lp) in &candidates {
        let Some(rest) = alt.trim_start().strip_prefix(before) else { continue };
        let rest = rest.trim_start().to_ascii_lowercase();
        let rest: String = rest.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
        if rest.is_empty() {
            continue;
        }
        let reads_as = |w: &str| w.starts_with(&rest) || rest.starts_with(w);
        let (is_yes, is_no) = (reads_as(yes), reads_as(no));
        if is_yes && !is_no {
            yes_lps.push(lp.min(0.0));
        } else if is_no && !is_yes {
            no_lps.push(lp.min(0.0));
        }
    }
    if yes_lps.is_empty() && no_lps.is_empty() {
        return Ok(None);
    }
    let floor = token.top.iter().map(|(_, lp)| (*lp as f64).min(0.0)).fold(f64::INFINITY, f64::min);
    let log_yes = if yes_lps.is_empty() { floor } else { log_sum_exp(&yes_lps) };
    let log_no = if no_lps.is_empty() { floor } else { log_sum_exp(&no_lps) };
    // yes / (yes + no) = 1 / (1 + exp(log_no - log_yes)): exp may give +inf
    // (then 0) or 0 (then 1), never NaN unless both sides are -inf.
    let p = 1.0 / (1.0 + (log_no - log_yes).exp());
    if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
        return Err(NotAProbability(p));
    }
    Ok(Some(p as f32))
}
