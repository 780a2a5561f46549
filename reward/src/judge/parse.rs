//! Reading judge replies: the OpenAI response shapes, the verdicts in the
//! text, and P(yes) from the verdict token's `top_logprobs`.

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
                Ok(Choice { text, tokens })
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
                Ok(Choice { text, tokens })
            }
        })
        .collect()
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
static STEP_BOXED_WORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)step\s*(\d+)\s*[:.]?\s*\\boxed\s*\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?([A-Za-z]*)")
        .expect("valid regex")
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

/// ThinkPRM style: the verdict of each of `n` steps (`Step i: \boxed{…}`, the
/// last one written for a step wins); `None` for steps without one.
pub fn step_verdicts(text: &str, n: usize) -> Vec<Option<Verdict>> {
    let mut out = vec![None; n];
    for c in STEP_BOXED_WORD.captures_iter(text) {
        let (Some(i), Some(m)) = (c[1].parse::<usize>().ok(), c.get(2)) else { continue };
        if (1..=n).contains(&i) {
            out[i - 1] = classify(m.as_str(), m.start());
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

/// P(yes) for a verdict found at byte `verdict.at` of the text the `tokens`
/// spell ([`spelled`]), from the alternatives at the verdict token's
/// position: the probability mass of alternatives reading as the positive word
/// against that of the negative one (a token may carry a leading space, ` Yes`
/// and `Yes` both count, and may be a prefix, `in` for `incorrect`). When one
/// side has no listed alternative, its mass is taken as that of the smallest
/// listed logprob, an upper bound. `None` when there are no alternatives or
/// nothing at that position reads as either word.
pub fn p_yes(tokens: &[Token], verdict: &Verdict) -> Option<f32> {
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
    let (i, offset) = found?;
    let token = &tokens[i];
    if token.top.is_empty() {
        return None;
    }
    let before = token.text.get(..offset)?.trim();
    let (yes, no) = verdict.words.pair();
    let mut candidates: Vec<(&str, f32)> = token.top.iter().map(|(s, lp)| (s.as_str(), *lp)).collect();
    if !candidates.iter().any(|(s, _)| *s == token.text) {
        candidates.push((&token.text, token.logprob));
    }
    let (mut yes_mass, mut no_mass) = (0f64, 0f64);
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
            yes_mass += (*lp as f64).exp();
        } else if is_no && !is_yes {
            no_mass += (*lp as f64).exp();
        }
    }
    if yes_mass == 0.0 && no_mass == 0.0 {
        return None;
    }
    let floor = token.top.iter().map(|(_, lp)| *lp).fold(f32::INFINITY, f32::min) as f64;
    if yes_mass == 0.0 {
        yes_mass = floor.exp();
    }
    if no_mass == 0.0 {
        no_mass = floor.exp();
    }
    Some((yes_mass / (yes_mass + no_mass)) as f32)
}
