//! The train step on a tiny model: gradient accumulation, PPO layout, learning
//! direction, SFT, and checkpoint fallback.

mod common;

use common::*;
use prism_learner::{CheckpointMeta, Config, Learner, Policy, TokenPair};
use tch::Tensor;

/// eps = 1 makes AdamW's first step nearly linear in the gradient, so weights
/// after a step compare gradients (with eps = 1e-8 the first step is about
/// lr * sign(g), and the sign of a near-zero gradient component is noise).
fn linear_adam(config: Config) -> Config {
    Config { lr: 0.5, eps: 1.0, weight_decay: 0.0, grad_clip: 0.0, ..config }
}

fn trained(config: &Config, seed: u64, steps: u64) -> Vec<(String, Vec<f32>)> {
    let reference = (config.kl_coef > 0.0).then(|| TinyLm::new(7));
    let mut learner = Learner::new(config.clone(), TinyLm::new(7), reference, seed).unwrap();
    for step in 0..steps {
        let report = learner.train_step(&groups(100 + step, 3, 4)).unwrap();
        assert!(!report.updates.is_empty());
    }
    learner.policy().weights()
}

#[test]
fn gradient_accumulation_matches_the_full_batch() {
    for aggregation in ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] {
        let base = linear_adam(Config {
            aggregation: prism_learner::config::Aggregation::try_from(aggregation.to_string()).unwrap(),
            advantage: prism_learner::config::Estimator::TpGrpo,
            kl_coef: 0.05,
            entropy_coef: 0.01,
            is_cap: 2.0,
            loss_norm_len: 8,
            ..Config::default()
        });
        let whole = trained(&Config { micro_batch_size: 12, ..base.clone() }, 1, 2);
        let split = trained(&Config { micro_batch_size: 1, ..base.clone() }, 1, 2);
        let uneven = trained(&Config { micro_batch_size: 5, ..base.clone() }, 1, 2);
        let initial = TinyLm::new(7).weights();
        assert!(max_diff(&whole, &initial) > 1e-3, "{aggregation}: training must move the weights");
        eprintln!(
            "{aggregation}: moved {}, split {}, uneven {}",
            max_diff(&whole, &initial),
            max_diff(&whole, &split),
            max_diff(&whole, &uneven)
        );
        assert!(max_diff(&whole, &split) <= 1e-5, "{aggregation}: {}", max_diff(&whole, &split));
        assert!(max_diff(&whole, &uneven) <= 1e-5, "{aggregation}: {}", max_diff(&whole, &uneven));
    }
}

#[test]
fn ppo_epochs_and_mini_batches_make_that_many_updates() {
    let config = Config { ppo_epochs: 2, mini_batches: 3, lr: 1e-3, ..Config::default() };
    let mut learner = Learner::new(config, TinyLm::new(1), None, 0).unwrap();
    let report = learner.train_step(&groups(5, 3, 4)).unwrap();
    assert_eq!(report.sequences, 12);
    assert_eq!(report.updates.len(), 6);
    assert_eq!(report.updates.iter().map(|u| u.sequences).sum::<u64>(), 24);
    assert_eq!(report.updates.iter().map(|u| u.epoch).collect::<Vec<_>>(), vec![0, 0, 0, 1, 1, 1]);
    assert_eq!(report.updates.last().unwrap().update, 6);
    assert_eq!(learner.updates(), 6);
    // The first update is on-policy with respect to the behaviour log-probs given,
    // later ones see the moved policy: some ratio departs from where it started.
    let first = &report.updates[0];
    assert!(first.tokens > 0 && first.grad_norm > 0.0 && first.entropy > 0.0 && first.ratio_max >= first.ratio_mean);
}

#[test]
fn uniform_groups_are_dropped_and_counted() {
    let mut all = groups(9, 3, 4);
    for (group, outcomes) in all.iter_mut().zip([[1.0, 0.0, 0.0, 0.0], [1.0; 4], [0.0, 1.0, 1.0, 0.0]]) {
        for (lt, outcome) in group.iter_mut().zip(outcomes) {
            lt.label.outcome = outcome;
        }
    }
    let config = Config { drop_uniform_groups: true, ..Config::default() };
    let mut learner = Learner::new(config, TinyLm::new(1), None, 0).unwrap();
    assert!(learner.admit(&all[0]).is_ok());
    assert_eq!(learner.admit(&all[1]), Err(prism_learner::advantage::DropReason::ZeroAdvantage));
    let report = learner.train_step(&all).unwrap();
    assert_eq!((report.groups, report.groups_dropped_uniform, report.sequences), (3, 1, 8));
    let summary = report.summary();
    assert_eq!((summary["groups_dropped_uniform"], summary["sequences"], summary["updates"]), (1.0, 8.0, 1.0));
    assert_eq!(summary["tokens"], report.updates[0].tokens as f64);
    // Nothing left: no update, no error.
    let report = learner.train_step(&[all[1].clone()]).unwrap();
    assert_eq!((report.groups_dropped_uniform, report.updates.len()), (1, 0));
}

/// Sum of the model's log-probs of `completion` after `prompt`.
fn sequence_logprob(model: &TinyLm, prompt: &[u32], completion: &[u32]) -> f64 {
    let ids: Vec<i64> = prompt.iter().chain(completion).map(|&t| t as i64).collect();
    let n = ids.len() as i64;
    let input = Tensor::from_slice(&ids).view([1, n]);
    let logits = tch::no_grad(|| model.forward(&input, None).unwrap());
    let lp = logits.log_softmax(-1, tch::Kind::Float);
    (0..completion.len()).map(|j| lp.double_value(&[0, (prompt.len() + j - 1) as i64, completion[j] as i64])).sum()
}

#[test]
fn rl_raises_the_rewarded_completion_and_lowers_the_other() {
    let prompt = vec![1u32, 2];
    let good = vec![3u32, 4, 5];
    let bad = vec![6u32, 7, 8];
    let mut learner = Learner::new(Config { lr: 0.02, ..Config::default() }, TinyLm::new(3), None, 0).unwrap();
    let before =
        (sequence_logprob(learner.policy(), &prompt, &good), sequence_logprob(learner.policy(), &prompt, &bad));
    for step in 0..15 {
        let model = learner.policy();
        let lp = |c: &[u32]| -> Vec<f32> {
            // Behaviour log-probs = the current policy's, as a synchronous rollout gives.
            let ids: Vec<i64> = prompt.iter().chain(c).map(|&t| t as i64).collect();
            let input = Tensor::from_slice(&ids).view([1, ids.len() as i64]);
            let logits = tch::no_grad(|| model.forward(&input, None).unwrap()).log_softmax(-1, tch::Kind::Float);
            (0..c.len()).map(|j| logits.double_value(&[0, (prompt.len() + j - 1) as i64, c[j] as i64]) as f32).collect()
        };
        let group = vec![
            labeled(1, step, 0, 2, prompt.clone(), good.clone(), lp(&good), 1.0, &[]),
            labeled(2, step, 1, 2, prompt.clone(), bad.clone(), lp(&bad), 0.0, &[]),
        ];
        learner.train_step(&[group]).unwrap();
    }
    let after = (sequence_logprob(learner.policy(), &prompt, &good), sequence_logprob(learner.policy(), &prompt, &bad));
    assert!(after.0 > before.0 + 1.0, "rewarded: {before:?} -> {after:?}");
    assert!(after.1 < before.1 - 1.0, "unrewarded: {before:?} -> {after:?}");
}

#[test]
fn sft_learns_the_completions() {
    let pairs = vec![
        TokenPair { prompt: vec![1, 2], completion: vec![9, 10, 11] },
        TokenPair { prompt: vec![3], completion: vec![12, 13] },
    ];
    let config = Config { mode: prism_learner::config::Mode::Sft, lr: 0.05, micro_batch_size: 1, ..Config::default() };
    let mut learner = Learner::new(config, TinyLm::new(4), None, 0).unwrap();
    let first = learner.sft_step(&pairs).unwrap();
    assert_eq!((first.tokens, first.sequences), (5, 2));
    // Uniform-ish start: NLL near ln 16 = 2.77 per token.
    assert!(first.loss > 2.0, "{}", first.loss);
    let mut last = first.clone();
    for _ in 0..60 {
        last = learner.sft_step(&pairs).unwrap();
    }
    assert!(last.loss < 0.3 * first.loss, "{} -> {}", first.loss, last.loss);
    // Prompt tokens are context only: their log-prob is not what was trained.
    let completion_lp = sequence_logprob(learner.policy(), &[1, 2], &[9, 10, 11]);
    assert!(completion_lp > -1.5, "{completion_lp}");
}

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        step,
        policy_version: step,
        data_cursor: serde_json::json!({ "next": step * 10 }),
        config_hash: "h".into(),
    }
}

#[test]
fn a_corrupted_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config { lr: 1e-2, ..Config::default() };
    let mut learner = Learner::new(config.clone(), TinyLm::new(5), None, 0).unwrap();
    learner.train_step(&groups(1, 2, 4)).unwrap();
    learner.save_checkpoint(dir.path(), &meta(1)).unwrap();
    let at_one = learner.policy().weights();
    learner.train_step(&groups(2, 2, 4)).unwrap();
    let newest = learner.save_checkpoint(dir.path(), &meta(2)).unwrap();
    assert_ne!(learner.policy().weights(), at_one);

    let model = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&model, bytes).unwrap();

    let mut fresh = Learner::new(config.clone(), TinyLm::new(6), None, 0).unwrap();
    let restored = fresh.resume(dir.path()).unwrap().expect("a checkpoint");
    assert!(restored.path.ends_with("step-00000001"), "{}", restored.path.display());
    assert_eq!(restored.meta, meta(1));
    assert_eq!(restored.rejected.len(), 1);
    let why = restored.rejected[0].to_string();
    assert!(why.contains("step-00000002") && why.contains("model.safetensors") && why.contains("sha256"), "{why}");
    assert_eq!(fresh.policy().weights(), at_one);
    assert_eq!(fresh.updates(), 1);

    // Truncate the survivor too: nothing usable is an error naming both.
    let optimizer = restored.path.join("optimizer.safetensors");
    let len = std::fs::metadata(&optimizer).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&optimizer).unwrap().set_len(len / 2).unwrap();
    let err = Learner::new(config, TinyLm::new(6), None, 0).unwrap().resume(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("step-00000002") && err.contains("step-00000001") && err.contains("optimizer.safetensors"),
        "{err}"
    );

    // An empty folder is simply no checkpoint.
    let empty = tempfile::tempdir().unwrap();
    let mut l = Learner::new(Config::default(), TinyLm::new(6), None, 0).unwrap();
    assert!(l.resume(empty.path()).unwrap().is_none());
}

#[test]
fn bench_times_full_train_steps() {
    use prism_learner::bench;
    let spec = bench::Spec { batch: 4, seq_len: 8, prompt_len: 2, steps: 2, warmup: 1, vocab: VOCAB as u32, seed: 0 };
    let group = bench::synthetic_group(&spec);
    assert_eq!(group.len(), 4);
    assert!(group.iter().all(|lt| lt.trajectory.prompt_tokens.len() == 2 && lt.trajectory.tokens.len() == 6));
    let mut learner = Learner::new(Config::default(), TinyLm::new(0), None, 0).unwrap();
    let timing = bench::run(&mut learner, &spec).unwrap();
    assert_eq!((timing.step_seconds.len(), timing.tokens_per_step), (2, 32));
    assert!(timing.tokens_per_s > 0.0);
    assert_eq!(learner.updates(), 3);
    // 392 parameters, 128 of them the input embedding (the head is untied):
    // 6 * 264 + 12 * 1 layer * 8 hidden * 8 tokens.
    assert_eq!(bench::flops_per_token(learner.policy(), 1, 8, 16, 8), 2352.0);
}

/// A group with a token id past the vocabulary (a forged or corrupted entry),
/// one longer than the model's positions, or with a logprob that is not
/// finite is refused at admission with `invalid`, and never reaches the model
/// (before, its embedding lookup panicked the train thread).
#[test]
fn a_trajectory_the_model_cannot_take_is_refused_not_a_panic() {
    use prism_learner::advantage::DropReason;
    let model = tiny_arith(3);
    let (vocab, positions) = model.limits().unwrap();
    let mut learner = Learner::new(Config::default(), model, None, 0).unwrap();
    let good = groups(4, 1, 4).remove(0);
    let fits = |g: &[prism_core::LabeledTrajectory]| {
        g.iter().flat_map(|l| l.trajectory.prompt_tokens.iter().chain(&l.trajectory.tokens)).all(|id| (*id as usize) < vocab)
    };
    assert!(fits(&good));
    assert_eq!(learner.admit(&good), Ok(()));
    let mut past_vocab = good.clone();
    past_vocab[2].trajectory.tokens[0] = vocab as u32;
    let mut huge_id = good.clone();
    huge_id[0].trajectory.prompt_tokens[0] = u32::MAX;
    let mut too_long = good.clone();
    too_long[1].trajectory.tokens = vec![1; positions];
    too_long[1].trajectory.logprobs = vec![-1.0; positions];
    let mut nan = good.clone();
    nan[3].trajectory.logprobs[0] = f32::NAN;
    let mut mismatched = good.clone();
    mismatched[0].trajectory.logprobs.pop();
    for bad in [&past_vocab, &huge_id, &too_long, &nan, &mismatched] {
        assert_eq!(learner.admit(bad), Err(DropReason::Invalid));
    }
    // What is admitted trains.
    let report = learner.train_step(&[good]).unwrap();
    assert_eq!(report.groups, 1);
}

/// A bf16 model (`model.dtype = "bf16"`) trains at a small learning rate
/// as the same model in float32 does: its updates (1e-4 a step) are under
/// bf16's spacing for most weights (2^-9 near 0.3), so they must accumulate
/// in float32 master weights. Applied to the bf16 weights, they round away
/// and only weights near zero move.
#[test]
fn a_bf16_model_learns_at_a_small_learning_rate_as_float32_does() {
    let config = Config { lr: 1e-4, grad_clip: 0.0, weight_decay: 0.0, ..Config::default() };
    let start = TinyLm::bf16(7).weights();
    let run = |policy: TinyLm| {
        let mut learner = Learner::new(config.clone(), policy, None, 3).unwrap();
        for step in 0..40 {
            learner.train_step(&groups(300 + step, 3, 4)).unwrap();
        }
        learner.policy().weights()
    };
    // The float32 model starts from the same (bf16-rounded) values.
    let float = TinyLm::new(7);
    tch::no_grad(|| {
        for (mut v, (_, s)) in prism_learner::policy::named_variables(float.var_store()).into_iter().map(|(_, v)| v).zip(&start) {
            v.copy_(&Tensor::from_slice(s).view(v.size().as_slice()));
        }
    });
    let f32_end = run(float);
    let bf16_end = run(TinyLm::bf16(7));
    let (mut moved_f32, mut moved_bf16, mut agree, mut both) = (0.0f64, 0.0f64, 0usize, 0usize);
    for (((_, s), (_, a)), (_, b)) in start.iter().zip(&f32_end).zip(&bf16_end) {
        for ((s, a), b) in s.iter().zip(a).zip(b) {
            let (da, db) = (f64::from(a - s), f64::from(b - s));
            moved_f32 += da.abs();
            moved_bf16 += db.abs();
            if da != 0.0 && db != 0.0 {
                both += 1;
                agree += usize::from(da.signum() == db.signum());
            }
        }
    }
    let ratio = moved_bf16 / moved_f32;
    assert!((0.7..1.3).contains(&ratio), "the bf16 model moved {moved_bf16:.4} in all, the float32 one {moved_f32:.4} (ratio {ratio:.3})");
    assert!(agree as f64 >= 0.9 * both as f64, "{agree} of {both} weights moved the same way");
}
