//! The loss, its gradients and the optimizer against a PyTorch reference
//! (`tests/reference/reference.py`, run with the repository's `.venv`) on the
//! same tensors.

mod common;

use common::TinyLm;
use prism_learner::config::{Aggregation, KlEstimator};
use prism_learner::loss::{LossConfig, Norm, TokenData, policy_loss, token_logprobs};
use prism_learner::optim::{AdamW, AdamWConfig};
use prism_learner::policy::{read_safetensors, write_safetensors};
use prism_learner::{CheckpointMeta, Config, Learner};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor, nn};

fn python() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = repo.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup", python.display());
    python
}

fn reference(args: &[&Path], mode: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/reference.py");
    let out = Command::new(python()).arg(script).arg(mode).args(args).output().unwrap();
    assert!(out.status.success(), "reference.py {mode} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn uniform(rng: &mut ChaCha8Rng, shape: &[i64], lo: f32, hi: f32) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_slice(&v).view(shape)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn case(aggregation: &str, edit: impl FnOnce(&mut LossConfig)) -> LossConfig {
    let mut c = LossConfig {
        clip_low: 0.2,
        clip_high: 0.28,
        dual_clip: 3.0,
        is_cap: 0.0,
        aggregation: match aggregation {
            "token_mean" => Aggregation::TokenMean,
            "seq_mean_token_mean" => Aggregation::SeqMeanTokenMean,
            _ => Aggregation::SeqMeanTokenSumNorm,
        },
        loss_norm_len: 5.0,
        kl_coef: 0.0,
        kl_estimator: KlEstimator::K3,
        entropy_coef: 0.0,
        temperature: 1.0,
    };
    edit(&mut c);
    c
}

fn case_json(c: &LossConfig, norm: Norm) -> serde_json::Value {
    serde_json::json!({
        "clip_low": c.clip_low, "clip_high": c.clip_high, "dual_clip": c.dual_clip, "is_cap": c.is_cap,
        "aggregation": match c.aggregation {
            Aggregation::TokenMean => "token_mean",
            Aggregation::SeqMeanTokenMean => "seq_mean_token_mean",
            Aggregation::SeqMeanTokenSumNorm => "seq_mean_token_sum_norm",
        },
        "loss_norm_len": c.loss_norm_len, "kl_coef": c.kl_coef,
        "kl_estimator": match c.kl_estimator { KlEstimator::K1 => "k1", KlEstimator::K2 => "k2", KlEstimator::K3 => "k3" },
        "entropy_coef": c.entropy_coef, "temperature": c.temperature,
        "norm_tokens": norm.tokens, "norm_sequences": norm.sequences,
    })
}

#[test]
fn loss_and_gradients_match_pytorch() {
    let (b, s, v) = (3i64, 6i64, 11i64);
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let logits = uniform(&mut rng, &[b, s, v], -3.0, 3.0);
    let targets = Tensor::from_slice(&(0..b * s).map(|_| rng.random_range(0..v)).collect::<Vec<i64>>()).view([b, s]);
    // Row 0 full, row 1 starts one later and ends early (different prompt and
    // completion lengths), row 2 a single token.
    let mask =
        Tensor::from_slice(&[1f32, 1., 1., 1., 1., 1., 0., 1., 1., 1., 0., 0., 0., 0., 0., 1., 0., 0.]).view([b, s]);
    let (logp, _) = token_logprobs(&logits, &targets, 1.0);
    // Behaviour log-probs off by up to ±0.6 nats (ratios 0.55..1.8, both clips
    // active somewhere) and, for a few tokens, 2.5 nats (ratio 12: dual clip).
    let old = &logp + uniform(&mut rng, &[b, s], -0.6, 0.6);
    let _ = old.narrow(1, 0, 2).f_sub_scalar_(2.5).unwrap();
    let advantages = uniform(&mut rng, &[b, s], -2.0, 2.0);
    let prox = &logp + uniform(&mut rng, &[b, s], -0.4, 0.4);
    let reference_lp = &logp + uniform(&mut rng, &[b, s], -0.8, 0.8);

    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs.safetensors");
    let named = |n: &str, t: &Tensor| (n.to_string(), t.shallow_clone());
    write_safetensors(
        &[
            named("logits", &logits),
            named("targets", &targets),
            named("mask", &mask),
            named("old_logprobs", &old),
            named("advantages", &advantages),
            named("prox_logprobs", &prox),
            named("ref_logprobs", &reference_lp),
        ],
        &inputs,
    )
    .unwrap();

    let full = Norm { tokens: 10.0, sequences: 3.0 };
    // As one micro-batch of a larger mini-batch.
    let part = Norm { tokens: 25.0, sequences: 7.0 };
    let cases: Vec<(LossConfig, Norm)> = vec![
        (case("token_mean", |_| {}), full),
        (case("token_mean", |c| c.dual_clip = 0.0), full),
        (case("token_mean", |c| c.clip_high = 0.2), full),
        (case("token_mean", |c| c.is_cap = 1.5), full),
        (
            case("token_mean", |c| {
                c.kl_coef = 0.1;
                c.kl_estimator = KlEstimator::K1
            }),
            full,
        ),
        (
            case("token_mean", |c| {
                c.kl_coef = 0.1;
                c.kl_estimator = KlEstimator::K2
            }),
            full,
        ),
        (
            case("token_mean", |c| {
                c.kl_coef = 0.1;
                c.kl_estimator = KlEstimator::K3
            }),
            full,
        ),
        (case("token_mean", |c| c.entropy_coef = 0.02), full),
        (case("token_mean", |c| c.temperature = 0.7), full),
        (
            case("seq_mean_token_mean", |c| {
                c.kl_coef = 0.05;
                c.entropy_coef = 0.01;
                c.is_cap = 2.0
            }),
            full,
        ),
        (
            case("seq_mean_token_sum_norm", |c| {
                c.kl_coef = 0.05;
                c.entropy_coef = 0.01
            }),
            full,
        ),
        (
            case("token_mean", |c| {
                c.kl_coef = 0.05;
                c.entropy_coef = 0.01;
                c.is_cap = 2.0
            }),
            part,
        ),
        (case("seq_mean_token_mean", |_| {}), part),
        (case("seq_mean_token_sum_norm", |_| {}), part),
    ];
    let cases_path = dir.path().join("cases.json");
    let json: Vec<serde_json::Value> = cases.iter().map(|(c, n)| case_json(c, *n)).collect();
    std::fs::write(&cases_path, serde_json::to_vec(&json).unwrap()).unwrap();
    let outputs = dir.path().join("outputs.safetensors");
    reference(&[&inputs, &cases_path, &outputs], "loss");
    let want = read_safetensors(&outputs).unwrap();

    let mut saw_dual = false;
    for (i, (c, norm)) in cases.iter().enumerate() {
        let x = logits.detach().set_requires_grad(true);
        let data = TokenData {
            targets: &targets,
            mask: &mask,
            old_logprobs: &old,
            advantages: &advantages,
            prox_logprobs: Some(&prox),
            ref_logprobs: Some(&reference_lp),
        };
        let (loss, sums) = policy_loss(&x, &data, c, *norm).unwrap();
        loss.backward();
        saw_dual |= sums.dual_clip > 0.0 && sums.clip_low > 0.0 && sums.clip_high > 0.0;
        let loss_diff = (loss.double_value(&[]) - want[&format!("loss.{i}")].double_value(&[0])).abs();
        let grad_diff = max_abs_diff(&x.grad(), &want[&format!("grad.{i}")]);
        assert!(loss_diff <= 1e-5, "case {i} {c:?}: loss differs by {loss_diff}");
        assert!(grad_diff <= 1e-5, "case {i} {c:?}: gradient differs by {grad_diff}");
        assert!(x.grad().abs().max().double_value(&[]) > 1e-3, "case {i}: the gradient must not vanish");
    }
    assert!(saw_dual, "the inputs must exercise the low, high and dual clips");
}

#[test]
fn adamw_with_clipping_matches_torch_optim() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let shapes: [(&str, Vec<i64>); 2] = [("a", vec![4, 3]), ("b", vec![5])];
    let vs = nn::VarStore::new(Device::Cpu);
    let mut inputs = Vec::new();
    let mut vars = HashMap::new();
    for (name, shape) in &shapes {
        let init = uniform(&mut rng, shape, -1.0, 1.0);
        vars.insert(*name, vs.root().var_copy(name, &init));
        inputs.push((format!("param.{name}"), init));
    }
    let lrs = [1e-2, 5e-3, 2e-3];
    let mut grads = Vec::new();
    for k in 0..lrs.len() {
        let mut step = HashMap::new();
        for (name, shape) in &shapes {
            let g = uniform(&mut rng, shape, -0.5, 0.5);
            inputs.push((format!("grad.{k}.{name}"), g.shallow_clone()));
            step.insert(*name, g);
        }
        grads.push(step);
    }
    let (beta1, beta2, eps, weight_decay, max_norm) = (0.9, 0.95, 1e-8, 0.1, 0.8);
    let dir = tempfile::tempdir().unwrap();
    let input_path = dir.path().join("adamw_in.safetensors");
    write_safetensors(&inputs, &input_path).unwrap();
    let spec = serde_json::json!({
        "names": ["a", "b"], "lrs": lrs, "beta1": beta1, "beta2": beta2, "eps": eps,
        "weight_decay": weight_decay, "max_norm": max_norm,
    });
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let output_path = dir.path().join("adamw_out.safetensors");
    reference(&[&input_path, &spec_path, &output_path], "adamw");
    let want = read_safetensors(&output_path).unwrap();

    let mut opt = AdamW::new(&vs, AdamWConfig { beta1, beta2, eps, weight_decay });
    let mut clipped = 0;
    for (k, lr) in lrs.iter().enumerate() {
        opt.zero_grad();
        let loss = shapes
            .iter()
            .map(|(n, _)| (&vars[n] * &grads[k][n]).sum(Kind::Float))
            .fold(Tensor::from(0f32), |a, x| a + x);
        loss.backward();
        let norm = opt.clip_grad_norm(max_norm).unwrap();
        assert!((norm - want["norms"].double_value(&[k as i64])).abs() < 1e-6);
        clipped += (norm > max_norm) as usize;
        opt.step(*lr).unwrap();
    }
    assert!(clipped > 0, "clipping must be exercised");
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    for (name, _) in &shapes {
        let d = max_abs_diff(&vars[name], &want[&format!("param.{name}")]);
        assert!(d <= 1e-6, "param {name} differs by {d}");
        for s in ["exp_avg", "exp_avg_sq"] {
            let key = format!("{s}.{name}");
            let d = max_abs_diff(&state[&key], &want[&key]);
            assert!(d <= 1e-7, "{key} differs by {d}");
        }
    }
}

#[test]
fn checkpoint_model_is_a_pytorch_safetensors_file_with_hf_names() {
    let dir = tempfile::tempdir().unwrap();
    let learner = Learner::new(Config::default(), TinyLm::new(1), None, 0).unwrap();
    let meta =
        CheckpointMeta { step: 1, policy_version: 1, data_cursor: serde_json::Value::Null, config_hash: String::new() };
    let path = learner.save_checkpoint(dir.path(), &meta).unwrap();
    let printed = reference(&[&path.join("model.safetensors")], "hf");
    let got: serde_json::Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(got["format"], "pt");
    let names: Vec<String> = learner.policy().weights().into_iter().map(|(n, _)| n).collect();
    assert_eq!(got["names"], serde_json::json!(names));
    assert!(names.contains(&"model.embed_tokens.weight".to_string()) && names.contains(&"lm_head.weight".to_string()));
}
