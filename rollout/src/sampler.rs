//! Group sampling: G completions of each prompt, as trajectories carrying the
//! behaviour log-probs the learner's importance ratios need.

use crate::{hash64, Config, Result};
use prism_core::{GroupId, PolicyVersion, Prompt, Trajectory, TrajectoryId};
use prism_model::{engine, SamplingParams, Tokenizer, Transformer};
use std::time::Instant;

/// The token ids the policy is conditioned on for `prompt`; the same encoding
/// is used for sampling, supervised warm starts and evaluation.
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(&prompt.text, true)?)
}

/// Sampling settings of `config` for groups of `n`.
pub fn params(config: &Config, n: usize, eos: &[u32], seed: u64) -> SamplingParams {
    SamplingParams {
        n,
        temperature: config.temperature as f32,
        top_k: config.top_k,
        top_p: config.top_p as f32,
        max_new_tokens: config.max_new_tokens,
        stop: config.stop.clone(),
        eos: eos.to_vec(),
        seed,
    }
}

/// Decides at each step boundary (a line break) whether a partial completion
/// goes on: called with the index of its `(group, prompt)` in the work and
/// the completion's text so far; `true` rejects it (it stops there, finished
/// as `rejected`). Rollouts know nothing of how it decides.
pub type RejectStep<'a> = dyn FnMut(usize, &str) -> bool + 'a;

/// Samples `config.group_size` completions for each `(group, prompt)` with the
/// model's current weights, tagged `version`. Trajectory ids are
/// `group * G + sample`, unique within a run because group ids are. With
/// `reject`, a completion it rejects at a step boundary stops there. With
/// `refresh` (`rollout.inflight_updates`), newer weights may take over
/// between decode steps ([`engine::Refresh`]); each trajectory records
/// where ([`Trajectory::version_changes`]).
#[allow(clippy::too_many_arguments)]
pub fn sample_groups(
    model: &Transformer,
    tokenizer: &Tokenizer,
    work: &[(GroupId, &Prompt)],
    config: &Config,
    eos: &[u32],
    version: PolicyVersion,
    seed: u64,
    reject: Option<&mut RejectStep<'_>>,
    refresh: Option<&mut engine::Refresh<'_>>,
) -> Result<Vec<Vec<Trajectory>>> {
    let g = config.group_size;
    let prompts: Vec<Vec<u32>> = work.iter().map(|(_, p)| encode_prompt(tokenizer, p)).collect::<Result<_>>()?;
    let seed = hash64(&[seed, work.first().map_or(0, |(id, _)| id.0), version.0]);
    let started = Instant::now();
    let params = params(config, g, eos, seed);
    let mut at_step = reject.map(|reject| {
        move |request: usize, _sample: usize, tokens: &[u32]| {
            // A completion that cannot be decoded is let through: the labeler reports it.
            tokenizer.decode(tokens, true).is_ok_and(|text| reject(request, &text))
        }
    });
    let at_step = at_step.as_mut().map(|f| f as &mut engine::StepHook<'_>);
    let samples = match refresh {
        None => engine::generate_batched(model, &prompts, &params, config.max_batch_rows, at_step)?,
        Some(refresh) => engine::generate_refreshed(model, &prompts, &params, config.max_batch_rows, at_step, refresh)?,
    };
    let generate_ms = started.elapsed().as_millis() as u64;
    Ok(work
        .iter()
        .zip(prompts)
        .zip(samples)
        .map(|(((group, prompt), prompt_tokens), samples)| {
            samples
                .into_iter()
                .enumerate()
                .map(|(i, s)| Trajectory {
                    id: TrajectoryId(group.0 * g as u64 + i as u64),
                    group: *group,
                    sample: i as u32,
                    group_size: g as u32,
                    prompt: (*prompt).clone(),
                    policy_version: version,
                    prompt_tokens: prompt_tokens.clone(),
                    tokens: s.tokens,
                    logprobs: s.logprobs,
                    text: s.text,
                    token_ends: s.token_ends,
                    finish: s.finish,
                    generate_ms,
                    version_changes: s.versions.iter().filter(|&&(_, v)| v > version.0).map(|&(at, v)| (at, PolicyVersion(v))).collect(),
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{self, Task};
    use prism_model::LoadOptions;

    #[test]
    fn groups_are_sampled_tagged_and_consistent() {
        let loaded = prism_model::load("builtin:tiny-arith", &LoadOptions::default()).unwrap();
        let task = Task::new(&task::Config::default(), 0, Box::new(|q| q.to_string())).unwrap();
        let prompts: Vec<Prompt> = (0..3).map(|i| task.train_prompt(i)).collect();
        let work: Vec<(GroupId, &Prompt)> = prompts.iter().enumerate().map(|(i, p)| (GroupId(10 + i as u64), p)).collect();
        let config = Config { group_size: 4, max_new_tokens: 12, ..Config::default() };
        let eos = loaded.generation.eos_token_ids.clone();
        let groups =
            sample_groups(&loaded.model, &loaded.tokenizer, &work, &config, &eos, PolicyVersion(7), 1, None, None).unwrap();
        assert_eq!(groups.len(), 3);
        for (gi, group) in groups.iter().enumerate() {
            assert_eq!(group.len(), 4);
            for (s, t) in group.iter().enumerate() {
                assert_eq!(t.id, TrajectoryId((10 + gi as u64) * 4 + s as u64));
                assert_eq!(t.group, GroupId(10 + gi as u64));
                assert_eq!(t.policy_version, PolicyVersion(7));
                assert_eq!(t.prompt, prompts[gi]);
                assert_eq!(t.tokens.len(), t.logprobs.len());
                assert_eq!(t.tokens.len(), t.token_ends.len());
                assert!(t.tokens.len() <= 12);
                assert!(t.logprobs.iter().all(|l| *l <= 0.0 && l.is_finite()));
                assert_eq!(t.prompt_tokens, encode_prompt(&loaded.tokenizer, &prompts[gi]).unwrap());
            }
        }
        // An untrained model's samples differ within a group.
        assert!(groups[0].iter().any(|t| t.tokens != groups[0][0].tokens));
        assert!(groups.iter().flatten().all(|t| t.version_changes.is_empty()));
        // Newer weights after the second decode step (version 9): every
        // trajectory still running records that tokens 2.. are version 9's.
        let other = prism_model::load("builtin:tiny-arith", &LoadOptions { seed: 5, ..Default::default() }).unwrap();
        let mut calls = 0;
        let mut refresh = || {
            calls += 1;
            (calls == 2).then(|| {
                loaded.model.load_named(other.model.var_store().variables()).unwrap();
                9
            })
        };
        let groups =
            sample_groups(&loaded.model, &loaded.tokenizer, &work, &config, &eos, PolicyVersion(7), 1, None, Some(&mut refresh)).unwrap();
        for t in groups.iter().flatten().filter(|t| t.tokens.len() > 2) {
            assert_eq!(t.version_changes, vec![(2, PolicyVersion(9))]);
            let versions: Vec<u64> = t.token_versions().map(|v| v.0).collect();
            assert_eq!(&versions[..3], &[7, 7, 9]);
        }
        assert!(groups.iter().flatten().any(|t| t.tokens.len() > 2));
    }

    /// A step hook that rejects every partial completion at its second line
    /// break: those samples stop right there, finished as rejected, and are
    /// the same tokens as the unhooked samples up to that point (same seeds);
    /// the others are untouched.
    #[test]
    fn a_rejected_sample_stops_at_that_step_boundary() {
        let loaded = prism_model::load("builtin:tiny-arith", &LoadOptions::default()).unwrap();
        let task = Task::new(&task::Config::default(), 0, Box::new(|q| q.to_string())).unwrap();
        let prompts: Vec<Prompt> = (0..4).map(|i| task.train_prompt(i)).collect();
        let work: Vec<(GroupId, &Prompt)> = prompts.iter().enumerate().map(|(i, p)| (GroupId(i as u64), p)).collect();
        let config = Config { group_size: 8, max_new_tokens: 40, ..Config::default() };
        let eos = loaded.generation.eos_token_ids.clone();
        let (m, tok) = (&loaded.model, &loaded.tokenizer);
        let plain = sample_groups(m, tok, &work, &config, &eos, PolicyVersion(1), 3, None, None).unwrap();
        let mut asked = 0;
        let mut reject = |i: usize, text: &str| {
            assert!(i < work.len());
            assert!(text.contains('\n'), "asked only after a line break: {text:?}");
            asked += 1;
            text.matches('\n').count() >= 2
        };
        let hooked = sample_groups(m, tok, &work, &config, &eos, PolicyVersion(1), 3, Some(&mut reject), None).unwrap();
        assert!(asked > 0, "the hook was asked at step boundaries");
        let mut rejected = 0;
        for (a, b) in plain.iter().flatten().zip(hooked.iter().flatten()) {
            if b.finish == prism_core::FinishReason::Rejected {
                rejected += 1;
                assert!(b.text.matches('\n').count() >= 2, "{:?}", b.text);
                assert!(tok.token_text(*b.tokens.last().unwrap()).contains('\n'), "stopped on the line break's token");
                let before = tok.decode(&b.tokens[..b.tokens.len() - 1], true).unwrap();
                assert!(before.matches('\n').count() < 2, "at the first boundary that qualifies: {:?}", b.text);
                assert_eq!(b.tokens[..], a.tokens[..b.tokens.len()], "a prefix of the unhooked sample");
                assert!(b.tokens.len() < a.tokens.len());
            } else {
                assert_eq!(a.tokens, b.tokens, "a sample the hook let through is untouched");
            }
        }
        assert!(rejected > 0, "no sample reached two line breaks: {:?}", plain[0][0].text);
    }
}
