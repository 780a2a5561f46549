//! Every expected number here is a hand calculation written next to it.

use super::*;
use prism_core::{
    FinishReason, GroupId, PolicyVersion, Prompt, PromptId, RewardLabel, ScoreSource, Step, StepScore, Trajectory,
    TrajectoryId,
};

fn close(got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-5, "got {got:?}, want {want:?}");
    }
}

fn close64(got: &[f64], want: &[f64]) {
    close(&got.iter().map(|&x| x as f32).collect::<Vec<_>>(), want);
}

/// A labeled sample with `n` completion tokens, `outcome`, and steps given as
/// (token span, score).
fn sample(id: u64, n: usize, outcome: f32, steps: &[(Range<u32>, Option<f32>)]) -> LabeledTrajectory {
    LabeledTrajectory {
        trajectory: Trajectory {
            id: TrajectoryId(id),
            group: GroupId(0),
            sample: id as u32,
            group_size: 4,
            prompt: Prompt {
                id: PromptId(0),
                task: "arithmetic".into(),
                problem: String::new(),
                text: String::new(),
                reference: None,
            },
            policy_version: PolicyVersion(0),
            prompt_tokens: vec![1, 2],
            tokens: vec![5; n],
            logprobs: vec![-1.0; n],
            text: String::new(),
            token_ends: (1..=n as u32).collect(),
            finish: FinishReason::Eos,
            generate_ms: 0,
            version_changes: Vec::new(),
        },
        label: RewardLabel {
            outcome,
            outcome_source: ScoreSource::Verifier,
            answer: None,
            steps: steps
                .iter()
                .map(|(span, score)| StepScore {
                    step: Step { text: span.clone(), tokens: span.clone() },
                    score: *score,
                    source: ScoreSource::Verifier,
                })
                .collect(),
        },
    }
}

fn kept(g: GroupAdvantages) -> Vec<Vec<f32>> {
    match g {
        GroupAdvantages::Kept(a) => a,
        other => panic!("expected kept, got {other:?}"),
    }
}

#[test]
fn grpo_with_and_without_bessel() {
    // s = [1,0,0,1]: mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 0.5773503,
    // so A = ±0.5 / 0.5773503 = ±0.8660254; biased std = 0.5, A = ±1.
    close64(&grpo(&[1.0, 0.0, 0.0, 1.0], true, 1e-6), &[0.866024, -0.866024, -0.866024, 0.866024]);
    close64(&grpo(&[1.0, 0.0, 0.0, 1.0], false, 1e-6), &[0.999998, -0.999998, -0.999998, 0.999998]);
    // s = [1,0,0,0]: mean 0.25; unbiased std = sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5,
    // A = 0.75 / 0.5 = 1.5 and -0.25 / 0.5 = -0.5.
    close64(&grpo(&[1.0, 0.0, 0.0, 0.0], true, 1e-6), &[1.499997, -0.499999, -0.499999, -0.499999]);
    // All equal: std 0, numerator 0.
    close64(&grpo(&[1.0, 1.0, 1.0], true, 1e-6), &[0.0, 0.0, 0.0]);
    // A group of one has nothing to compare against.
    close64(&grpo(&[1.0], true, 1e-6), &[0.0]);
    close64(&grpo(&[1.0], false, 1e-6), &[0.0]);
}

#[test]
fn dr_grpo_and_rloo() {
    // mean 0.25: 1 - 0.25, 0 - 0.25.
    close64(&dr_grpo(&[1.0, 0.0, 0.0, 0.0]), &[0.75, -0.25, -0.25, -0.25]);
    // others' means: 0, 1/3, 1/3, 1/3.
    close64(&rloo(&[1.0, 0.0, 0.0, 0.0]), &[1.0, -1.0 / 3.0, -1.0 / 3.0, -1.0 / 3.0]);
    // others' means of [2, 4]: 4 and 2.
    close64(&rloo(&[2.0, 4.0]), &[-2.0, 2.0]);
    close64(&rloo(&[3.0]), &[0.0]);
    close64(&dr_grpo(&[3.0]), &[0.0]);
}

#[test]
fn overlong_penalty_is_linear_in_the_buffer() {
    let config = Config { overlong_shaping: true, overlong_max_len: 100, overlong_buffer: 20, ..Config::default() };
    // Penalty starts at L_max - L_buf = 80 and reaches -factor at L_max.
    for (len, want) in [(70, 0.0), (80, 0.0), (90, -0.5), (100, -1.0)] {
        assert!((overlong_penalty(len, &config) - want).abs() < 1e-12, "len {len}");
    }
    let doubled = Config { overlong_factor: 2.0, ..config };
    assert!((overlong_penalty(90, &doubled) + 1.0).abs() < 1e-12);
}

#[test]
fn estimate_group_broadcasts_outcome_advantages_and_applies_shaping() {
    let group = vec![sample(0, 3, 1.0, &[]), sample(1, 2, 0.0, &[]), sample(2, 4, 0.0, &[]), sample(3, 1, 0.0, &[])];
    let a = kept(estimate_group(&group, &Config::default()).unwrap());
    close(&a[0], &[1.499997; 3]);
    close(&a[1], &[-0.499999; 2]);
    close(&a[3], &[-0.499999; 1]);

    let config = Config { advantage: crate::config::Estimator::DrGrpo, ..Config::default() };
    close(&kept(estimate_group(&group, &config).unwrap())[0], &[0.75; 3]);

    // Shaping with L_max = 4, L_buf = 2: lengths 3, 2, 4, 1 get -0.5, 0, -1, 0,
    // so scores [0.5, 0, -1, 0], mean -0.125; Dr. GRPO: [0.625, 0.125, -0.875, 0.125].
    let config = Config {
        advantage: crate::config::Estimator::DrGrpo,
        overlong_shaping: true,
        overlong_max_len: 4,
        overlong_buffer: 2,
        ..Config::default()
    };
    let a = kept(estimate_group(&group, &config).unwrap());
    close(&a[0], &[0.625; 3]);
    close(&a[1], &[0.125; 2]);
    close(&a[2], &[-0.875; 4]);
}

#[test]
fn dynamic_sampling_drops_uniform_groups() {
    let uniform = vec![sample(0, 2, 1.0, &[]), sample(1, 2, 1.0, &[])];
    let mixed = vec![sample(0, 2, 1.0, &[]), sample(1, 2, 0.0, &[])];
    let on = Config { drop_uniform_groups: true, ..Config::default() };
    assert_eq!(estimate_group(&uniform, &on).unwrap(), GroupAdvantages::Dropped(DropReason::ZeroAdvantage));
    assert!(matches!(estimate_group(&mixed, &on).unwrap(), GroupAdvantages::Kept(_)));
    // Off: kept, with zero advantages.
    close(&kept(estimate_group(&uniform, &Config::default()).unwrap())[0], &[0.0, 0.0]);
}

#[test]
fn dynamic_sampling_keeps_all_correct_groups_with_a_flawed_step_under_process_estimators() {
    // Two samples, both correct (outcome 1), 4 tokens, steps [0,2) and [2,4).
    // In the first, the second step is judged wrong: the outcomes are uniform
    // but the step scores are not, so the process estimators give it a
    // negative advantage there and the group must be kept.
    let flawed = vec![
        sample(0, 4, 1.0, &[(0..2, Some(1.0)), (2..4, Some(0.0))]),
        sample(1, 4, 1.0, &[(0..2, Some(1.0)), (2..4, Some(1.0))]),
    ];
    let clean = vec![
        sample(0, 4, 1.0, &[(0..2, Some(1.0)), (2..4, Some(1.0))]),
        sample(1, 4, 1.0, &[(0..2, Some(1.0)), (2..4, Some(1.0))]),
    ];
    for estimator in [crate::config::Estimator::Process, crate::config::Estimator::TpGrpo] {
        let on = Config { advantage: estimator, drop_uniform_groups: true, ..Config::default() };
        let a = kept(estimate_group(&flawed, &on).unwrap());
        assert!(a[0][2] < 0.0, "{estimator}: the wrong step is penalised: {a:?}");
        assert_eq!(
            estimate_group(&clean, &on).unwrap(),
            GroupAdvantages::Dropped(DropReason::ZeroAdvantage),
            "{estimator}: equal outcomes and equal step scores carry no signal"
        );
    }
    // An outcome-only estimator sees no difference between the two.
    let grpo = Config { drop_uniform_groups: true, ..Config::default() };
    assert_eq!(estimate_group(&flawed, &grpo).unwrap(), GroupAdvantages::Dropped(DropReason::ZeroAdvantage));
}

#[test]
fn process_advantages_sum_the_steps_at_or_after_each_token() {
    // Sample A (6 tokens): steps [0,2) score 1, [2,4) score 0; tokens 4, 5 after the steps.
    // Sample B (5 tokens): step [0,3) score 1, step [3,4) unknown.
    // Known scores [1, 0, 1]: mean 2/3, unbiased std sqrt((1/9 + 4/9 + 1/9) / 2) = 0.5773503,
    // normalised [0.5773503, -1.1547005, 0.5773503].
    let group = vec![
        sample(0, 6, 1.0, &[(0..2, Some(1.0)), (2..4, Some(0.0))]),
        sample(1, 5, 0.0, &[(0..3, Some(1.0)), (3..4, None)]),
    ];
    let config = Config { advantage: crate::config::Estimator::Process, ..Config::default() };
    let a = kept(estimate_group(&group, &config).unwrap());
    // A: tokens 0,1 see both steps: 0.5773503 - 1.1547005; tokens 2,3 the second only.
    close(&a[0], &[-0.577350, -0.577350, -1.154700, -1.154700, 0.0, 0.0]);
    close(&a[1], &[0.577350, 0.577350, 0.577350, 0.0, 0.0]);

    // Plus 0.5 x the outcome advantage: outcomes [1, 0], unbiased std 0.7071068, A_o = ±0.7071068.
    let config = Config { process_outcome_weight: 0.5, ..config };
    let a = kept(estimate_group(&group, &config).unwrap());
    close(&a[0], &[-0.223797, -0.223797, -0.801147, -0.801147, 0.353553, 0.353553]);
    close(&a[1], &[0.223797, 0.223797, 0.223797, -0.353553, -0.353553]);
}

#[test]
fn tp_grpo_covers_every_case() {
    // Outcomes [1, 1, 0, 0]: acc_G = 0.5, r_c = 1.0 * 0.5; r_hat = ±0.8660254 (unbiased).
    let r = 0.866024;
    let group = vec![
        // Correct solution, 12 tokens: token 0 before the first step; steps [1,2) and [2,4)
        // correct (one thought, which also owns the separator token 4); [5,7) incorrect;
        // [7,9) unknown; tokens 9..12 the answer line.
        sample(0, 12, 1.0, &[(1..2, Some(0.9)), (2..4, Some(0.6)), (5..7, Some(0.1)), (7..9, None)]),
        // Correct solution without step labels: outcome-only.
        sample(1, 3, 1.0, &[]),
        // Incorrect solution, 10 tokens: [0,3) correct, [3,5) and [5,6) incorrect (one
        // thought), [6,8) correct, answer tokens 8, 9.
        sample(2, 10, 0.0, &[(0..3, Some(0.5)), (3..5, Some(0.2)), (5..6, Some(0.0)), (6..8, Some(1.0))]),
        // Incorrect, all steps incorrect.
        sample(3, 4, 0.0, &[(0..2, Some(0.0)), (2..3, Some(0.4))]),
    ];
    let config = Config { advantage: crate::config::Estimator::TpGrpo, ..Config::default() };
    let a = kept(estimate_group(&group, &config).unwrap());
    let penalised = r - 0.5;
    close(&a[0], &[r, r, r, r, r, penalised, penalised, r, r, r, r, r]);
    close(&a[1], &[r, r, r]);
    close(&a[2], &[0.0, 0.0, 0.0, -r, -r, -r, 0.0, 0.0, -r, -r]);
    close(&a[3], &[-r, -r, -r, -r]);

    // alpha scales the penalty: r_c = 2 * 0.5.
    let config = Config { tp_alpha: 2.0, ..config };
    let a = kept(estimate_group(&group, &config).unwrap());
    close(&a[0][5..7], &[r - 1.0, r - 1.0]);

    // acc_G = 0: every r_hat is 0, so TP-GRPO equals outcome-only GRPO (all zeros).
    let failed =
        vec![sample(0, 4, 0.0, &[(0..2, Some(1.0)), (2..4, Some(0.0))]), sample(1, 3, 0.0, &[(0..3, Some(0.0))])];
    let tp = kept(estimate_group(&failed, &Config { advantage: crate::config::Estimator::TpGrpo, ..Config::default() }).unwrap());
    let grpo = kept(estimate_group(&failed, &Config::default()).unwrap());
    assert_eq!(tp, grpo);
    close(&tp[0], &[0.0; 4]);
}

#[test]
fn tp_grpo_merges_only_equal_known_verdicts() {
    // Correct solution; steps correct, unknown, incorrect are three thoughts. The gap
    // token 2 belongs to the unknown thought before it, so it keeps r_hat; only the
    // incorrect thought's token 3 is penalised.
    let a = tp_grpo(5, &[(0..1, Some(true)), (1..2, None), (3..4, Some(false))], true, 1.0, 0.25);
    close(&a, &[1.0, 1.0, 1.0, 0.75, 1.0]);
    // Incorrect solution with a gap between two correct steps inside one thought: the gap is 0.
    let a = tp_grpo(6, &[(0..2, Some(true)), (3..4, Some(true)), (4..5, Some(false))], false, -1.0, 0.5);
    close(&a, &[0.0, 0.0, 0.0, 0.0, -1.0, -1.0]);
}

#[test]
fn malformed_trajectories_are_named() {
    let mut bad = sample(7, 3, 1.0, &[(0..5, Some(1.0))]);
    let err = estimate_group(std::slice::from_ref(&bad), &Config::default()).unwrap_err().to_string();
    assert!(err.contains("trajectory 7") && err.contains("0..5"), "{err}");
    bad.label.steps.clear();
    bad.trajectory.logprobs.pop();
    let err = estimate_group(&[bad], &Config::default()).unwrap_err().to_string();
    assert!(err.contains("3 tokens but 2 behaviour logprobs"), "{err}");
}

fn fapo() -> Config {
    Config { flawed_positive: crate::config::FlawedPositive::Fapo, ..Config::default() }
}

#[test]
fn a_flawed_positive_is_a_correct_answer_with_a_step_below_the_threshold() {
    let group = vec![
        sample(0, 4, 1.0, &[(0..2, Some(0.9)), (2..4, Some(0.2))]), // flawed positive
        sample(1, 4, 1.0, &[(0..2, Some(0.9)), (2..4, None)]),      // unknown is not wrong
        sample(2, 4, 0.0, &[(0..2, Some(0.1))]),                    // a wrong answer is a negative
        sample(3, 4, 1.0, &[]),                                     // no steps, nothing flawed
    ];
    assert_eq!(flawed_positives(&group, &fapo()), [true, false, false, false]);
    assert_eq!(flawed_positives(&group, &Config::default()), [false; 4], "off by default");
}

#[test]
fn fapo_keeps_an_all_correct_group_that_holds_a_flawed_positive() {
    let group = vec![
        sample(0, 2, 1.0, &[(0..2, Some(0.2))]),
        sample(1, 2, 1.0, &[(0..2, Some(0.9))]),
        sample(2, 2, 1.0, &[(0..2, Some(0.9))]),
        sample(3, 2, 1.0, &[(0..2, Some(0.9))]),
    ];
    let dynamic = Config { drop_uniform_groups: true, ..Config::default() };
    assert_eq!(estimate_group(&group, &dynamic).unwrap(), GroupAdvantages::Dropped(DropReason::ZeroAdvantage));
    // Shaped outcomes [0.5, 1, 1, 1]: mean 0.875, deviations [-0.375, 0.125 x3],
    // unbiased variance (0.140625 + 3 * 0.015625) / 3 = 0.0625, std 0.25.
    let a = kept(estimate_group(&group, &Config { drop_uniform_groups: true, ..fapo() }).unwrap());
    close(&a[0], &[-1.5; 2]);
    close(&a[1], &[0.5; 2]);
}

#[test]
fn a_flawed_positive_is_reinforced_in_a_mostly_wrong_group_and_pushed_down_in_a_mostly_right_one() {
    // One flawed positive, k clean correct answers, 3 - k wrong ones; accuracy
    // (the flawed positive counted as correct) is (k + 1) / 4. Dr. GRPO on the
    // shaped outcomes [0.5, 1 x k, 0 x (3 - k)]: A = 0.5 - (0.5 + k) / 4.
    let cfg = Config { advantage: crate::config::Estimator::DrGrpo, ..fapo() };
    let grpo = fapo();
    for (k, want) in [(0, 0.375), (1, 0.125), (2, -0.125), (3, -0.375)] {
        let mut group = vec![sample(0, 2, 1.0, &[(0..2, Some(0.0))])];
        for i in 0..3 {
            group.push(sample(i + 1, 2, if i < k { 1.0 } else { 0.0 }, &[(0..2, Some(1.0))]));
        }
        close(&kept(estimate_group(&group, &cfg).unwrap())[0], &[want; 2]);
        // GRPO divides by the group std: the same sign.
        let a = kept(estimate_group(&group, &grpo).unwrap())[0][0];
        assert_eq!(a > 0.0, (k + 1) as f64 / 4.0 <= 0.5, "k = {k}: {a}");
        // Without FAPO the flawed positive is rewarded like any correct answer.
        assert!(kept(estimate_group(&group, &Config::default()).unwrap())[0][0] > 0.0 || k == 3);
    }
}

fn renorm(outcome_weight: f64) -> Config {
    Config {
        advantage: crate::config::Estimator::Process,
        process_norm: crate::config::ProcessNorm::Renorm,
        process_outcome_weight: outcome_weight,
        ..Config::default()
    }
}

#[test]
fn renorm_calibrates_each_step_against_the_outcome_and_takes_the_worst_from_each_token_on() {
    let group = vec![
        // Correct: steps 0.9 and 0.4 give 0.9 and 0.4; tokens before the 0.4 step's
        // end get 0.4; the answer tokens after the last step get 0.
        sample(0, 6, 1.0, &[(0..2, Some(0.9)), (2..4, Some(0.4))]),
        // Wrong: steps 1.0 and 0.7 give 0.0 and -0.3.
        sample(1, 4, 0.0, &[(0..2, Some(1.0)), (2..3, Some(0.7))]),
    ];
    let a = kept(estimate_group(&group, &renorm(0.0)).unwrap());
    close(&a[0], &[0.4, 0.4, 0.4, 0.4, 0.0, 0.0]);
    close(&a[1], &[-0.3, -0.3, -0.3, 0.0]);
    // Plus the outcome advantage (GRPO of [1, 0]: ±0.707105).
    let a = kept(estimate_group(&group, &renorm(1.0)).unwrap());
    close(&a[1], &[-1.007105, -1.007105, -1.007105, -0.707105]);
}

/// A deterministic stream of numbers in [0, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn random_group(rng: &mut Lcg) -> Vec<LabeledTrajectory> {
    (0..4)
        .map(|i| {
            let n_steps = 1 + (rng.next() * 4.0) as u32;
            let steps: Vec<(Range<u32>, Option<f32>)> = (0..n_steps)
                .map(|k| (k * 3..k * 3 + 3, if rng.next() < 0.1 { None } else { Some(rng.next() as f32) }))
                .collect();
            let outcome = if rng.next() < 0.5 { 1.0 } else { 0.0 };
            sample(i, (n_steps * 3 + 2) as usize, outcome, &steps)
        })
        .collect()
}

#[test]
fn under_renorm_a_wrong_answer_earns_no_positive_process_credit() {
    let mut rng = Lcg(42);
    let mut group_norm_rewarded_a_wrong_answer = false;
    for _ in 0..500 {
        let group = random_group(&mut rng);
        for weight in [0.0, 1.0] {
            let a = kept(estimate_group(&group, &renorm(weight)).unwrap());
            for (lt, adv) in group.iter().zip(&a) {
                if lt.label.outcome < 0.5 {
                    assert!(adv.iter().all(|&x| x <= 1e-6), "wrong answer credited: {adv:?}");
                }
            }
        }
        let group_norm = Config { advantage: crate::config::Estimator::Process, ..Config::default() };
        let a = kept(estimate_group(&group, &group_norm).unwrap());
        group_norm_rewarded_a_wrong_answer |=
            group.iter().zip(&a).any(|(lt, adv)| lt.label.outcome < 0.5 && adv.iter().any(|&x| x > 0.1));
    }
    assert!(group_norm_rewarded_a_wrong_answer, "the property is not trivial: group normalisation breaks it");
}

#[test]
fn under_renorm_filler_steps_cannot_raise_a_trajectorys_credit() {
    // A trajectory's credit is that of its first token (every step ends at or after it).
    let total = |steps: &[(Range<u32>, Option<f32>)], outcome: f32, cfg: &Config| {
        let n = steps.last().map_or(0, |s| s.0.end) as usize + 2;
        let group = vec![sample(0, n, outcome, steps), sample(1, 4, 1.0 - outcome, &[(0..2, Some(0.5))])];
        kept(estimate_group(&group, cfg).unwrap())[0][0]
    };
    let group_norm = Config { advantage: crate::config::Estimator::Process, ..Config::default() };
    let mut rng = Lcg(7);
    let mut summed_credit_rose = false;
    for _ in 0..200 {
        let outcome = if rng.next() < 0.5 { 1.0 } else { 0.0 };
        let base: Vec<(Range<u32>, Option<f32>)> =
            (0..2).map(|k| (k * 3..k * 3 + 3, Some(rng.next() as f32))).collect();
        // Filler: well-scored steps inserted before the real ones.
        let fillers = 1 + (rng.next() * 3.0) as u32;
        let mut padded: Vec<(Range<u32>, Option<f32>)> = (0..fillers).map(|k| (k * 3..k * 3 + 3, Some(1.0))).collect();
        padded.extend(base.iter().map(|(r, s)| (r.start + fillers * 3..r.end + fillers * 3, *s)));
        for weight in [0.0, 1.0] {
            let cfg = renorm(weight);
            assert!(total(&padded, outcome, &cfg) <= total(&base, outcome, &cfg) + 1e-6);
        }
        summed_credit_rose |= total(&padded, outcome, &group_norm) > total(&base, outcome, &group_norm) + 0.1;
    }
    assert!(summed_credit_rose, "the property is not trivial: summed credit rises with filler");
}

/// The implicit PRM with φ equal to the reference scores every step 0.5 (σ of
/// a zero reward): under `process` with the outcome weighted 1, the
/// advantages are GRPO's.
#[test]
fn equal_step_scores_leave_process_advantages_equal_to_grpo() {
    let group = vec![
        sample(0, 4, 1.0, &[(0..2, Some(0.5)), (2..4, Some(0.5))]),
        sample(1, 3, 0.0, &[(0..3, Some(0.5))]),
        sample(2, 5, 1.0, &[(0..1, Some(0.5)), (1..5, Some(0.5))]),
    ];
    let process = Config { advantage: crate::config::Estimator::Process, process_outcome_weight: 1.0, ..Config::default() };
    assert_eq!(kept(estimate_group(&group, &process).unwrap()), kept(estimate_group(&group, &Config::default()).unwrap()));
}
