//! Each loss term against a hand calculation written next to it.

use super::*;
use tch::Tensor;

fn t(v: &[f32], shape: &[i64]) -> Tensor {
    Tensor::from_slice(v).view(shape)
}

fn value(x: &Tensor) -> f64 {
    x.double_value(&[])
}

fn assert_close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-5, "got {got}, want {want}");
}

fn config(aggregation: Aggregation) -> LossConfig {
    LossConfig {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: 3.0,
        is_cap: 0.0,
        aggregation,
        loss_norm_len: 4.0,
        kl_coef: 0.0,
        kl_estimator: KlEstimator::K3,
        entropy_coef: 0.0,
        temperature: 1.0,
    }
}

/// Five tokens of one row, vocabulary 2, uniform logits: logp = -ln 2 for every
/// target; behaviour log-probs chosen so the ratios are 1.5, 0.5, 0.5, 5, 1.
struct Clipped {
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    old: Tensor,
    adv: Tensor,
}

fn clipped_case() -> Clipped {
    let ln2 = std::f32::consts::LN_2;
    let ratios = [1.5f32, 0.5, 0.5, 5.0, 1.0];
    let old: Vec<f32> = ratios.iter().map(|r| -ln2 - r.ln()).collect();
    Clipped {
        logits: Tensor::zeros([1, 5, 2], (Kind::Float, tch::Device::Cpu)),
        targets: Tensor::from_slice(&[0i64, 1, 0, 1, 0]).view([1, 5]),
        mask: Tensor::ones([1, 5], (Kind::Float, tch::Device::Cpu)),
        old: t(&old, &[1, 5]),
        adv: t(&[1.0, 1.0, -1.0, -1.0, -2.0], &[1, 5]),
    }
}

#[test]
fn ppo_clip_higher_and_dual_clip() {
    let c = clipped_case();
    let data = TokenData {
        targets: &c.targets,
        mask: &c.mask,
        old_logprobs: &c.old,
        advantages: &c.adv,
        prox_logprobs: None,
        ref_logprobs: None,
    };
    let norm = Norm { tokens: 5.0, sequences: 1.0 };
    // (A, r) -> max(-A r, -A clamp(r, 0.8, 1.28)):
    //   (+1, 1.5) -> max(-1.5, -1.28) = -1.28   (clipped high)
    //   (+1, 0.5) -> max(-0.5, -0.8)  = -0.5
    //   (-1, 0.5) -> max(0.5, 0.8)    =  0.8    (clipped low)
    //   (-1, 5)   -> max(5, 1.28)     =  5, dual clip min(5, 3) = 3
    //   (-2, 1)   -> 2
    // token mean with dual clip: (-1.28 - 0.5 + 0.8 + 3 + 2) / 5 = 0.804; without: 6.02 / 5.
    let (loss, sums) = policy_loss(&c.logits, &data, &config(Aggregation::TokenMean), norm).unwrap();
    assert_close(value(&loss), 0.804);
    assert_close(sums.loss, 0.804);
    let no_dual = LossConfig { dual_clip: 0.0, ..config(Aggregation::TokenMean) };
    let (loss, _) = policy_loss(&c.logits, &data, &no_dual, norm).unwrap();
    assert_close(value(&loss), 1.204);
    // Symmetric clip 0.2 / 0.2: token 1 becomes max(-1.5, -1.2) = -1.2 and token 4
    // min(max(5, 1.2), 3) = 3: (-1.2 - 0.5 + 0.8 + 3 + 2) / 5 = 0.82.
    let symmetric = LossConfig { clip_high: 0.2, ..config(Aggregation::TokenMean) };
    assert_close(value(&policy_loss(&c.logits, &data, &symmetric, norm).unwrap().0), 0.82);

    assert_eq!((sums.tokens, sums.sequences), (5.0, 1.0));
    assert_eq!((sums.clip_high, sums.clip_low, sums.dual_clip), (1.0, 1.0, 1.0));
    // Ratio mean (1.5 + 0.5 + 0.5 + 5 + 1) / 5 = 1.7, max 5.
    assert_close(sums.ratio / 5.0, 1.7);
    assert_close(sums.ratio_max, 5.0);
    // approx KL = mean(r - 1 - ln r) = (0.0945349 + 2 * 0.1931472 + 2.3905621 + 0) / 5.
    assert_close(sums.approx_kl / 5.0, 0.5742783);
    // Uniform over 2 tokens: entropy ln 2 everywhere.
    assert_close(sums.entropy / 5.0, std::f64::consts::LN_2);
}

#[test]
fn log_ratio_is_clamped_at_20() {
    // logp = -ln 2, behaviour -100: log ratio 99.3 is clamped to 20, r = e^20.
    // With A = +1 the clip makes the loss -1.28; with the dual clip off and A = -1 the
    // loss is e^20 (finite), not e^99.3.
    let logits = Tensor::zeros([1, 1, 2], (Kind::Float, tch::Device::Cpu));
    let targets = Tensor::from_slice(&[0i64]).view([1, 1]);
    let mask = Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu));
    let old = t(&[-100.0], &[1, 1]);
    let adv = t(&[-1.0], &[1, 1]);
    let data = TokenData {
        targets: &targets,
        mask: &mask,
        old_logprobs: &old,
        advantages: &adv,
        prox_logprobs: None,
        ref_logprobs: None,
    };
    let c = LossConfig { dual_clip: 0.0, ..config(Aggregation::TokenMean) };
    let (loss, sums) = policy_loss(&logits, &data, &c, Norm { tokens: 1.0, sequences: 1.0 }).unwrap();
    assert!((value(&loss) / 20f64.exp() - 1.0).abs() < 1e-5, "{}", value(&loss));
    assert!((sums.ratio_max / 20f64.exp() - 1.0).abs() < 1e-5);
}

#[test]
fn aggregations_divide_by_mini_batch_totals() {
    // Row 0: per-token values [1, 2, 3]; row 1: [4] then padding.
    let values = t(&[1.0, 2.0, 3.0, 4.0, 9.0, 9.0], &[2, 3]);
    let mask = t(&[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], &[2, 3]);
    let norm = Norm { tokens: 4.0, sequences: 2.0 };
    // token mean: 10 / 4.
    assert_close(value(&aggregate(&values, &mask, Aggregation::TokenMean, norm, 4.0)), 2.5);
    // sequence means 2 and 4, mean 3.
    assert_close(value(&aggregate(&values, &mask, Aggregation::SeqMeanTokenMean, norm, 4.0)), 3.0);
    // token sums 6 and 4 over L = 4: 1.5 and 1, mean 1.25.
    assert_close(value(&aggregate(&values, &mask, Aggregation::SeqMeanTokenSumNorm, norm, 4.0)), 1.25);
    // As one micro-batch of a mini-batch of 8 tokens and 4 sequences: 10 / 8, 6 / 4, 2.5 / 4.
    let bigger = Norm { tokens: 8.0, sequences: 4.0 };
    assert_close(value(&aggregate(&values, &mask, Aggregation::TokenMean, bigger, 4.0)), 1.25);
    assert_close(value(&aggregate(&values, &mask, Aggregation::SeqMeanTokenMean, bigger, 4.0)), 1.5);
    assert_close(value(&aggregate(&values, &mask, Aggregation::SeqMeanTokenSumNorm, bigger, 4.0)), 0.625);
}

#[test]
fn kl_estimators() {
    let logp = t(&[-1.0, -2.0], &[2]);
    let reference = t(&[-2.0, -1.0], &[2]);
    let get = |e| Vec::<f32>::try_from(kl_estimate(&logp, &reference, e)).unwrap();
    // k1 = logp - ref.
    assert_eq!(get(KlEstimator::K1), vec![1.0, -1.0]);
    // k2 = (logp - ref)^2 / 2.
    assert_eq!(get(KlEstimator::K2), vec![0.5, 0.5]);
    // k3 = e^(ref - logp) - (ref - logp) - 1: e^-1 + 1 - 1 = 0.3678794; e - 1 - 1 = 0.7182818.
    let k3 = get(KlEstimator::K3);
    assert_close(k3[0] as f64, 0.3678794);
    assert_close(k3[1] as f64, 0.7182818);
}

#[test]
fn entropy_and_temperature() {
    // p = (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351.
    let logits = t(&[3f32.ln(), 0.0], &[1, 1, 2]);
    let (_, log_probs) = token_logprobs(&logits, &Tensor::from_slice(&[0i64]).view([1, 1]), 1.0);
    assert_close(value(&entropy(&log_probs).view([-1]).get(0)), 0.5623351);
    // Logits (2, 0) at temperature 2 are (1, 0): log p(0) = 1 - ln(1 + e) = -0.3132617.
    let logits = t(&[2.0, 0.0], &[1, 1, 2]);
    let (logp, _) = token_logprobs(&logits, &Tensor::from_slice(&[0i64]).view([1, 1]), 2.0);
    assert_close(value(&logp.view([-1]).get(0)), -0.3132617);
}

#[test]
fn kl_and_entropy_terms_enter_the_loss() {
    // One token, uniform logits over 2: logp = -ln 2 = behaviour, r = 1, A = 1: pg = -1.
    // Reference one nat lower: k3 = e^-1 + 1 - 1 = 0.3678794, times 0.1.
    // Entropy ln 2 times 0.01.  Loss = -1 + 0.03678794 - 0.00693147 = -0.97014353.
    let ln2 = std::f32::consts::LN_2;
    let logits = Tensor::zeros([1, 1, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let targets = Tensor::from_slice(&[0i64]).view([1, 1]);
    let mask = Tensor::ones([1, 1], (Kind::Float, tch::Device::Cpu));
    let old = t(&[-ln2], &[1, 1]);
    let reference = t(&[-ln2 - 1.0], &[1, 1]);
    let adv = t(&[1.0], &[1, 1]);
    let data = TokenData {
        targets: &targets,
        mask: &mask,
        old_logprobs: &old,
        advantages: &adv,
        prox_logprobs: None,
        ref_logprobs: Some(&reference),
    };
    let c = LossConfig { kl_coef: 0.1, entropy_coef: 0.01, ..config(Aggregation::TokenMean) };
    let (loss, sums) = policy_loss(&logits, &data, &c, Norm { tokens: 1.0, sequences: 1.0 }).unwrap();
    assert_close(value(&loss), -0.97014353);
    assert_close(sums.kl_ref, 0.3678794);
    // The entropy bonus has a gradient (it pushes towards uniform, which it already is,
    // so its part is 0); the pg part: d(-r)/dz0 = -(1 - p0) = -0.5, d/dz1 = +0.5;
    // k3 part: 0.1 * (1 - e^(ref - logp)) * dlogp/dz = 0.1 * 0.6321206 * (0.5, -0.5).
    loss.backward();
    let g = Vec::<f32>::try_from(logits.grad().view([-1])).unwrap();
    assert_close(g[0] as f64, -0.5 + 0.03160603);
    assert_close(g[1] as f64, 0.5 - 0.03160603);
}

#[test]
fn truncated_importance_weights() {
    // Two tokens with logp = -ln 2 = proximal; behaviour such that pi_prox / pi_behaviour
    // is 3 and 0.5. Cap 2: weights 2 and 0.5. Ratios against the proximal policy are 1,
    // A = 1: pg = -1 each, weighted -2 and -0.5; token mean -1.25.
    let ln2 = std::f32::consts::LN_2;
    let logits = Tensor::zeros([1, 2, 2], (Kind::Float, tch::Device::Cpu));
    let targets = Tensor::from_slice(&[0i64, 1]).view([1, 2]);
    let mask = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu));
    let prox = t(&[-ln2, -ln2], &[1, 2]);
    let old = t(&[-ln2 - 3f32.ln(), -ln2 - 0.5f32.ln()], &[1, 2]);
    let adv = t(&[1.0, 1.0], &[1, 2]);
    let data = TokenData {
        targets: &targets,
        mask: &mask,
        old_logprobs: &old,
        advantages: &adv,
        prox_logprobs: Some(&prox),
        ref_logprobs: None,
    };
    let c = LossConfig { is_cap: 2.0, ..config(Aggregation::TokenMean) };
    let (loss, sums) = policy_loss(&logits, &data, &c, Norm { tokens: 2.0, sequences: 1.0 }).unwrap();
    assert_close(value(&loss), -1.25);
    assert_close(sums.is_weight / 2.0, 1.25);
    assert_close(sums.ratio / 2.0, 1.0);
}

#[test]
fn sft_loss_is_the_mean_nll_of_completion_tokens() {
    // Two scored tokens under uniform logits over 4: NLL ln 4 each; the masked third
    // token does not count. Over a mini-batch of 4 tokens: 2 ln 4 / 4.
    let logits = Tensor::zeros([1, 3, 4], (Kind::Float, tch::Device::Cpu));
    let targets = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
    let mask = t(&[1.0, 1.0, 0.0], &[1, 3]);
    let (loss, sums) = sft_loss(&logits, &targets, &mask, Norm { tokens: 2.0, sequences: 1.0 }).unwrap();
    assert_close(value(&loss), 4f64.ln());
    assert_eq!(sums.tokens, 2.0);
    let (loss, _) = sft_loss(&logits, &targets, &mask, Norm { tokens: 4.0, sequences: 2.0 }).unwrap();
    assert_close(value(&loss), 4f64.ln() / 2.0);
}
