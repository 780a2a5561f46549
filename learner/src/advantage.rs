//! Advantage estimators: from the labels of one group (the G samples of one
//! prompt) to one advantage per completion token.
//!
//! Outcome estimators give every token of a sample the same value; the process
//! estimators (`process`, `tp_grpo`) vary it along the completion using the
//! step scores and the steps' token spans.

use crate::config::{Config, Estimator, FlawedPositive, ProcessNorm};
use crate::{Error, Result};
use prism_core::LabeledTrajectory;
use std::ops::Range;

/// What the estimator made of one group.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupAdvantages {
    /// One advantage per completion token, per sample, in group order.
    Kept(Vec<Vec<f32>>),
    /// The group carries no signal and is not trained on.
    Dropped(DropReason),
}

pub use prism_core::DropReason;

/// Advantages this close to zero count as zero (the group means of equal
/// scores can differ from them by a rounding error).
const ZERO_ADVANTAGE: f32 = 1e-6;

/// Token advantages for one group under `config`'s estimator.
pub fn estimate_group(group: &[LabeledTrajectory], config: &Config) -> Result<GroupAdvantages> {
    for lt in group {
        check_trajectory(lt)?;
    }
    let raw: Vec<f64> = group.iter().map(|lt| lt.label.outcome as f64).collect();
    let flawed = flawed_positives(group, config);
    let scores: Vec<f64> = group
        .iter()
        .zip(&raw)
        .zip(&flawed)
        .map(|((lt, &s), &flawed)| {
            s + if config.overlong_shaping { overlong_penalty(lt.trajectory.tokens.len(), config) } else { 0.0 }
                - if flawed { FAPO_PENALTY } else { 0.0 }
        })
        .collect();
    let lengths: Vec<usize> = group.iter().map(|lt| lt.trajectory.tokens.len()).collect();
    let per_sample =
        |adv: Vec<f64>| -> Vec<Vec<f32>> { adv.iter().zip(&lengths).map(|(&a, &n)| vec![a as f32; n]).collect() };
    let advantages = match config.estimator() {
        Estimator::Grpo => per_sample(grpo(&scores, config.std_unbiased, config.adv_eps)),
        Estimator::DrGrpo => per_sample(dr_grpo(&scores)),
        Estimator::Rloo => per_sample(rloo(&scores)),
        Estimator::Process => {
            let steps: Vec<Vec<(Range<u32>, Option<f64>)>> = group.iter().map(step_scores).collect();
            let outcome = grpo(&scores, config.std_unbiased, config.adv_eps);
            match config.process_norm {
                ProcessNorm::Group => process(
                    &steps,
                    &lengths,
                    &outcome,
                    config.process_outcome_weight,
                    config.std_unbiased,
                    config.adv_eps,
                ),
                ProcessNorm::Renorm => {
                    let correct: Vec<bool> = raw.iter().map(|&s| s >= config.tp_threshold).collect();
                    process_renorm(&steps, &lengths, &correct, &outcome, config.process_outcome_weight)
                }
            }
        }
        Estimator::TpGrpo => {
            let outcome = grpo(&scores, config.std_unbiased, config.adv_eps);
            let correct: Vec<bool> = raw.iter().map(|&s| s >= config.tp_threshold).collect();
            let acc = correct.iter().filter(|&&c| c).count() as f64 / group.len().max(1) as f64;
            let r_c = config.tp_alpha * acc;
            group
                .iter()
                .enumerate()
                .map(|(i, lt)| {
                    let verdicts: Vec<(Range<u32>, Option<bool>)> = step_scores(lt)
                        .into_iter()
                        .map(|(span, s)| (span, s.map(|s| s >= config.tp_threshold)))
                        .collect();
                    tp_grpo(lengths[i], &verdicts, correct[i], outcome[i], r_c)
                })
                .collect()
        }
    };
    // Dynamic sampling (DAPO, Yu et al. 2025, arXiv 2503.14476, eq. 11) drops
    // groups whose outcomes are all equal; with process rewards an all-correct
    // group still carries signal in its step scores, so the test is on the
    // advantages the estimator gave, not on the outcomes.
    if config.drop_uniform_groups && advantages.iter().flatten().all(|a| a.abs() <= ZERO_ADVANTAGE) {
        return Ok(GroupAdvantages::Dropped(DropReason::ZeroAdvantage));
    }
    Ok(GroupAdvantages::Kept(advantages))
}

/// FAPO's penalty on a flawed positive, on prism's 0/1 outcome scale. Ding et
/// al. 2025 ("FAPO: Flawed-Aware Policy Optimization", arXiv 2510.22543)
/// shape the ±1 verifiable reward as `R = R_RLVR - λ·[flawed positive]` with
/// λ = 1, which puts a flawed positive at 0, halfway between a correct (+1)
/// and a wrong (-1) answer. On a 0/1 scale (the same rewards under
/// `r' = (r + 1) / 2`, an affine map group normalisation does not see) that
/// is a penalty of one half. With `p` the share of clean correct answers and
/// `q` the share of wrong ones, a flawed positive's GRPO advantage has the
/// sign of `q - p`: positive while the group is mostly wrong (a useful
/// shortcut early on), negative once it is mostly right.
pub const FAPO_PENALTY: f64 = 0.5;

/// Which samples of `group` are flawed positives under `learner.flawed_positive`:
/// a correct outcome (at least `tp_threshold`) with a known step score below
/// `tp_threshold`. All false when the switch is off.
pub fn flawed_positives(group: &[LabeledTrajectory], config: &Config) -> Vec<bool> {
    group
        .iter()
        .map(|lt| {
            config.flawed_positive == FlawedPositive::Fapo
                && lt.label.outcome as f64 >= config.tp_threshold
                && lt.label.steps.iter().any(|s| s.score.is_some_and(|p| (p as f64) < config.tp_threshold))
        })
        .collect()
}

pub(crate) fn check_trajectory(lt: &LabeledTrajectory) -> Result<()> {
    let t = &lt.trajectory;
    let fail = |reason: String| Err(Error::Trajectory { trajectory: t.id.0, reason });
    if t.tokens.len() != t.logprobs.len() {
        return fail(format!("{} tokens but {} behaviour logprobs", t.tokens.len(), t.logprobs.len()));
    }
    if !lt.label.outcome.is_finite() {
        return fail(format!("outcome {} is not finite", lt.label.outcome));
    }
    for s in &lt.label.steps {
        let span = &s.step.tokens;
        if span.start > span.end || span.end as usize > t.tokens.len() {
            return fail(format!("step token span {span:?} outside the {} completion tokens", t.tokens.len()));
        }
    }
    Ok(())
}

fn step_scores(lt: &LabeledTrajectory) -> Vec<(Range<u32>, Option<f64>)> {
    lt.label.steps.iter().map(|s| (s.step.tokens.clone(), s.score.map(f64::from))).collect()
}

/// DAPO overlong reward shaping (Yu et al. 2025, arXiv 2503.14476, eq. 13, soft
/// part): `min(-(len - (L_max - L_buf)) / L_buf * factor, 0)`.
pub fn overlong_penalty(len: usize, config: &Config) -> f64 {
    let start = config.overlong_max_len as f64 - config.overlong_buffer as f64;
    (-(len as f64 - start) / config.overlong_buffer as f64 * config.overlong_factor).min(0.0)
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Standard deviation, with Bessel's correction when `unbiased`; `None` when it
/// is undefined (no values, or one value with the correction).
fn std(xs: &[f64], unbiased: bool) -> Option<f64> {
    let n = xs.len();
    let dof = if unbiased { n.checked_sub(1)? } else { n };
    if dof == 0 {
        return None;
    }
    let m = mean(xs);
    Some((xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / dof as f64).sqrt())
}

/// `(x - mean) / (std + eps)` over `xs`; zeros for a set of one (nothing to
/// compare against).
fn normalise(xs: &[f64], unbiased: bool, eps: f64) -> Vec<f64> {
    if xs.len() < 2 {
        return vec![0.0; xs.len()];
    }
    let m = mean(xs);
    let s = std(xs, unbiased).unwrap_or(0.0);
    xs.iter().map(|x| (x - m) / (s + eps)).collect()
}

/// GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, §4.1.2):
/// `A_i = (s_i - mean(s)) / (std(s) + eps)`; a group of one has A = 0.
pub fn grpo(scores: &[f64], unbiased: bool, eps: f64) -> Vec<f64> {
    normalise(scores, unbiased, eps)
}

/// Dr. GRPO (Liu et al. 2025, arXiv 2503.20783): `A_i = s_i - mean(s)`, no std.
pub fn dr_grpo(scores: &[f64]) -> Vec<f64> {
    let m = mean(scores);
    scores.iter().map(|s| s - m).collect()
}

/// RLOO (Ahmadian et al. 2024, arXiv 2402.14740): `A_i = s_i - mean of the
/// others`; a group of one has A = 0.
pub fn rloo(scores: &[f64]) -> Vec<f64> {
    let n = scores.len();
    if n < 2 {
        return vec![0.0; n];
    }
    let total: f64 = scores.iter().sum();
    scores.iter().map(|s| s - (total - s) / (n - 1) as f64).collect()
}

/// Process supervision (DeepSeekMath §4.1.3): every known step score in the
/// group is normalised over all of the group's known step scores; a token's
/// advantage is the sum of the normalised scores of the steps ending at or after
/// it, plus `outcome_weight` times the sample's outcome advantage. Steps with an
/// unknown score contribute nothing.
pub fn process(
    steps: &[Vec<(Range<u32>, Option<f64>)>],
    lengths: &[usize],
    outcome: &[f64],
    outcome_weight: f64,
    unbiased: bool,
    eps: f64,
) -> Vec<Vec<f32>> {
    let all: Vec<f64> = steps.iter().flatten().filter_map(|(_, s)| *s).collect();
    let normalised = normalise(&all, unbiased, eps);
    let mut next = normalised.into_iter();
    steps
        .iter()
        .zip(lengths)
        .zip(outcome)
        .map(|((steps, &n), &a_o)| {
            // Sum of normalised rewards of steps whose last token is at index >= t:
            // add each step's reward to every token up to and including its last.
            let mut adv = vec![outcome_weight * a_o; n];
            for (span, score) in steps {
                if score.is_none() {
                    continue;
                }
                let r = next.next().unwrap_or(0.0);
                for a in adv.iter_mut().take(span.end as usize) {
                    *a += r;
                }
            }
            adv.into_iter().map(|a| a as f32).collect()
        })
        .collect()
}

/// Process credit calibrated against the outcome (`learner.process_norm =
/// "renorm"`). Each known step score `s` in [0, 1] becomes `s + o - 1` with
/// `o` 1 for a correct answer and 0 for a wrong one (ReNorm, Xu et al. 2025,
/// "Hybrid Reward Normalization for Process-supervised Non-verifiable Agentic
/// Tasks", arXiv 2509.25598): in [0, 1] for a correct answer, in [-1, 0] for
/// a wrong one, so a wrong answer never earns net positive process credit.
/// A token's credit is the smallest calibrated value among the steps that
/// end at or after it (min-form credit assignment, Cheng et al. 2025, "Stop
/// Summation", arXiv 2504.15275), 0 past the last scored step: adding steps,
/// however well scored, cannot raise a trajectory's credit (summed credit
/// can, which is how a policy games a process reward by padding). Plus
/// `outcome_weight` times the sample's outcome advantage, as in [`process`].
pub fn process_renorm(
    steps: &[Vec<(Range<u32>, Option<f64>)>],
    lengths: &[usize],
    correct: &[bool],
    outcome: &[f64],
    outcome_weight: f64,
) -> Vec<Vec<f32>> {
    steps
        .iter()
        .zip(lengths)
        .zip(correct.iter().zip(outcome))
        .map(|((steps, &n), (&correct, &a_o))| {
            let o = if correct { 1.0 } else { 0.0 };
            let mut credit = vec![f64::INFINITY; n];
            for (span, score) in steps {
                let Some(s) = score else { continue };
                let r = s.clamp(0.0, 1.0) + o - 1.0;
                for c in credit.iter_mut().take(span.end as usize) {
                    *c = c.min(r);
                }
            }
            credit
                .into_iter()
                .map(|c| (outcome_weight * a_o + if c.is_finite() { c } else { 0.0 }) as f32)
                .collect()
        })
        .collect()
}

/// TP-GRPO thought-level advantages for one sample (He et al. 2025, "Good
/// Learners Think Their Thinking", arXiv 2507.23317).
///
/// Consecutive steps with the same verdict form a thought; a thought covers its
/// tokens up to the start of the next thought (so separators between steps
/// belong to the thought before them). With `r_hat` the sample's group-normalised
/// outcome and `r_c = alpha * acc_G`:
/// - correct solution: correct thoughts `r_hat`, incorrect thoughts `r_hat - r_c`;
/// - incorrect solution: incorrect thoughts `r_hat`, correct thoughts `0`;
/// - steps of unknown verdict, tokens before the first step and after the last
///   (the answer line): `r_hat`.
pub fn tp_grpo(
    n_tokens: usize,
    verdicts: &[(Range<u32>, Option<bool>)],
    correct_solution: bool,
    r_hat: f64,
    r_c: f64,
) -> Vec<f32> {
    let mut adv = vec![r_hat; n_tokens];
    // Thoughts as (token start, token end of the last step, verdict).
    let mut thoughts: Vec<(usize, usize, Option<bool>)> = Vec::new();
    for (span, verdict) in verdicts {
        let (start, end) = (span.start as usize, span.end as usize);
        match thoughts.last_mut() {
            Some(last) if last.2 == *verdict && verdict.is_some() => last.1 = end.max(last.1),
            _ => thoughts.push((start, end, *verdict)),
        }
    }
    for (k, &(start, end, verdict)) in thoughts.iter().enumerate() {
        let until = thoughts.get(k + 1).map_or(end, |next| next.0.max(end));
        let value = match (correct_solution, verdict) {
            (_, None) => r_hat,
            (true, Some(true)) => r_hat,
            (true, Some(false)) => r_hat - r_c,
            (false, Some(false)) => r_hat,
            (false, Some(true)) => 0.0,
        };
        for a in adv.iter_mut().take(until.min(n_tokens)).skip(start) {
            *a = value;
        }
    }
    adv.into_iter().map(|a| a as f32).collect()
}

#[cfg(test)]
mod tests;
