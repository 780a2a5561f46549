//! The learner on the real transformer (`builtin:tiny-arith`): gradient
//! accumulation through attention and padding, and checkpoints that
//! transformers loads.

mod common;

use common::*;
use prism_learner::{CheckpointMeta, Config, Learner, Policy};
use std::path::Path;
use std::process::Command;
use tch::Tensor;

/// See `tests/train.rs`: eps = 1 makes the first AdamW step linear in the gradient.
fn linear_adam(config: Config) -> Config {
    Config { lr: 0.05, eps: 1.0, weight_decay: 0.0, grad_clip: 0.0, ..config }
}

/// SFT pairs: the samples of two groups of three.
fn sft_pairs(seed: u64) -> Vec<prism_learner::TokenPair> {
    groups(seed, 2, 3)
        .into_iter()
        .flatten()
        .map(|lt| prism_learner::TokenPair { prompt: lt.trajectory.prompt_tokens, completion: lt.trajectory.tokens })
        .collect()
}

fn trained(config: &Config) -> Vec<(String, Vec<f32>)> {
    let mut learner = Learner::new(config.clone(), tiny_arith(3), Some(tiny_arith(3)), 0).unwrap();
    for step in 0..2 {
        learner.train_step(&groups(200 + step, 3, 4)).unwrap();
    }
    weights(learner.policy())
}

#[test]
fn gradient_accumulation_matches_the_full_batch_on_the_transformer() {
    // Rows of different prompt and completion lengths: micro-batches of 1 have no
    // padding, the whole batch pads most rows on the right.
    let base =
        linear_adam(Config { advantage: prism_learner::config::Estimator::TpGrpo, kl_coef: 0.05, entropy_coef: 0.01, ..Config::default() });
    let whole = trained(&Config { micro_batch_size: 12, ..base.clone() });
    let split = trained(&Config { micro_batch_size: 1, ..base.clone() });
    let moved = max_diff(&whole, &weights(&tiny_arith(3)));
    let diff = max_diff(&whole, &split);
    eprintln!("moved {moved}, micro-batch 1 vs 12: {diff}");
    assert!(moved > 1e-3);
    assert!(diff <= 1e-5, "{diff}");
}

#[test]
fn checkpoint_is_a_transformers_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut learner = Learner::new(Config { lr: 1e-2, ..Config::default() }, tiny_arith(5), None, 0).unwrap();
    learner.train_step(&groups(1, 2, 4)).unwrap();
    let meta =
        CheckpointMeta { step: 1, policy_version: 1, data_cursor: serde_json::Value::Null, config_hash: "x".into() };
    let path = learner.save_checkpoint(dir.path(), &meta).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json", "manifest.json", "optimizer.safetensors"] {
        assert!(path.join(file).is_file(), "{file} missing from {}", path.display());
    }

    let text = "Q:7+3*4-2\n3*4=12\n";
    let ids: Vec<i64> =
        learner.policy().tokenizer().unwrap().encode(text, false).unwrap().iter().map(|&t| t as i64).collect();
    let input = Tensor::from_slice(&ids).view([1, ids.len() as i64]);
    let ours = tch::no_grad(|| Policy::forward(learner.policy(), &input, None).unwrap());
    let ours: Vec<f32> = Vec::try_from(ours.view([-1])).unwrap();

    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d)
ids = tok(sys.argv[2], add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
print(json.dumps({"ids": ids, "logits": logits.flatten().tolist()}))
"#;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = Command::new(python).args(["-c", script]).arg(&path).arg(text).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let their_ids: Vec<i64> = serde_json::from_value(theirs["ids"].clone()).unwrap();
    assert_eq!(their_ids, ids, "the checkpoint's tokenizer must tokenise as ours");
    let their_logits: Vec<f32> = serde_json::from_value(theirs["logits"].clone()).unwrap();
    let diff = ours.iter().zip(&their_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert_eq!(ours.len(), their_logits.len());
    assert!(diff <= 1e-4, "trained checkpoint logits differ from transformers' by {diff}");
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Every parameter's gradient, by name, then cleared.
fn take_grads(model: &prism_model::Transformer) -> Vec<(String, Vec<f32>)> {
    let mut named: Vec<(String, Tensor)> = model.var_store().variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
        .into_iter()
        .map(|(name, mut t)| {
            let g = t.grad();
            assert!(g.defined(), "{name} got no gradient");
            let values = Vec::<f32>::try_from(g.flatten(0, -1)).unwrap();
            t.zero_grad();
            (name, values)
        })
        .collect()
}

/// The gradients of a log-likelihood-like loss over the positions 3..21 of
/// `ids`, plain and with activation checkpointing; returns their largest
/// difference and the largest gradient.
fn checkpointed_vs_plain(model: &prism_model::Transformer, ids: &Tensor, mask: Option<&Tensor>) -> (f32, f32) {
    let (start, len) = (3, 18);
    let loss_of = |logits: &Tensor| -> prism_learner::Result<Tensor> {
        let logp = logits.log_softmax(-1, tch::Kind::Float);
        let targets = ids.roll([-1], [1]).narrow(1, start, len).unsqueeze(-1);
        Ok(-logp.gather(-1, &targets, false).mean(tch::Kind::Float) + logits.square().mean(tch::Kind::Float) * 1e-3)
    };
    let window = Policy::forward_window(model, ids, mask, start, len).unwrap();
    let full = Policy::forward(model, ids, mask).unwrap().narrow(1, start, len);
    assert!(max_abs(&window, &full) <= 1e-6, "the window's logits are the full pass's");
    let plain_loss = loss_of(&window).unwrap();
    plain_loss.backward();
    let plain = take_grads(model);
    let tokens = prism_model::Tokens::Rows { ids, mask, window: (start, len) };
    let loss = Policy::forward_backward_checkpointed(model, tokens, &|f| f(), &mut |h| loss_of(&Policy::head(model, h)?), None).unwrap();
    assert!((loss.double_value(&[]) - plain_loss.double_value(&[])).abs() < 1e-9, "the same loss");
    let checkpointed = take_grads(model);
    let largest = plain.iter().flat_map(|(_, v)| v.iter().map(|x| x.abs())).fold(0.0, f32::max);
    (max_diff(&plain, &checkpointed), largest)
}

/// `learner.checkpoint_activations`: recomputing each layer in the backward
/// pass gives every parameter the gradient of the plain backward pass (within
/// 1e-6), on tiny-arith (tied embeddings, grouped-query attention), with left
/// padding, and on a Qwen3-style model (q/k norms, untied) with a sliding
/// window shorter than the input.
#[test]
fn activation_checkpointing_gives_the_plain_gradients() {
    tch::manual_seed(0);
    let ids = Tensor::randint(16, [3, 24], (tch::Kind::Int64, tch::Device::Cpu));
    let mask = Tensor::ones([3, 24], (tch::Kind::Int64, tch::Device::Cpu));
    let _ = mask.narrow(1, 0, 5).get(1).fill_(0);

    let arith = tiny_arith(11);
    for (what, mask) in [("tiny-arith", None), ("tiny-arith, left-padded", Some(&mask))] {
        let (diff, largest) = checkpointed_vs_plain(&arith, &ids, mask);
        eprintln!("{what}: max |checkpointed - plain| = {diff} (largest gradient {largest})");
        assert!(largest > 1e-3, "{what}: the loss must reach the weights");
        assert!(diff <= 1e-6, "{what}: {diff}");
    }

    let config = prism_model::ModelConfig {
        family: prism_model::Family::Qwen3,
        qk_norm: true,
        head_dim: 24,
        tie_word_embeddings: false,
        sliding_window: Some(7),
        ..prism_model::builtin::tiny_arith_config()
    };
    let qwen3 = prism_model::Transformer::new(config, tch::Device::Cpu, prism_model::Dtype::F32, 5).unwrap();
    let (diff, largest) = checkpointed_vs_plain(&qwen3, &ids, None);
    eprintln!("qwen3-style, window 7: max |checkpointed - plain| = {diff} (largest gradient {largest})");
    assert!(largest > 1e-3 && diff <= 1e-6, "{diff}");

    // Gemma 3-style: sliding and full layers (each with its mask and RoPE
    // tables), norms around each block, q/k norms, soft caps; left-padded.
    let config = prism_model::ModelConfig {
        family: prism_model::Family::Gemma3,
        qk_norm: true,
        head_dim: 24,
        tie_word_embeddings: true,
        sliding_window: Some(7),
        gemma: Some(prism_model::config::Gemma {
            query_pre_attn_scalar: 20.0,
            attn_logit_softcapping: Some(5.0),
            final_logit_softcapping: Some(10.0),
            sliding_layers: vec![true, false, true, false],
            local_rope_theta: Some(100.0),
        }),
        ..prism_model::builtin::tiny_arith_config()
    };
    assert_eq!(config.num_layers, 4);
    let gemma = prism_model::Transformer::new(config, tch::Device::Cpu, prism_model::Dtype::F32, 5).unwrap();
    let (diff, largest) = checkpointed_vs_plain(&gemma, &ids, Some(&mask));
    eprintln!("gemma3-style, window 7, left-padded: max |checkpointed - plain| = {diff} (largest gradient {largest})");
    assert!(largest > 1e-3 && diff <= 1e-6, "{diff}");
}

/// Whole train steps with `learner.checkpoint_activations` end on the weights
/// of the plain ones (within 1e-6), in float32 and under CPU bf16 autocast.
#[test]
fn train_steps_with_activation_checkpointing_match_the_plain_ones() {
    let base = linear_adam(Config { advantage: prism_learner::config::Estimator::TpGrpo, kl_coef: 0.05, entropy_coef: 0.01, micro_batch_size: 4, ..Config::default() });
    let plain = trained(&base);
    let checkpointed = trained(&Config { checkpoint_activations: true, ..base.clone() });
    let moved = max_diff(&plain, &weights(&tiny_arith(3)));
    let diff = max_diff(&plain, &checkpointed);
    eprintln!("moved {moved}, checkpointed vs plain: {diff}");
    assert!(moved > 1e-3);
    assert!(diff <= 1e-6, "{diff}");
    // Under CPU bf16 autocast the recomputed layers run in bf16 as the first pass did.
    let plain = trained(&Config { bf16_cpu: true, ..base.clone() });
    let checkpointed = trained(&Config { bf16_cpu: true, checkpoint_activations: true, ..base });
    let diff = max_diff(&plain, &checkpointed);
    eprintln!("bf16 autocast, checkpointed vs plain: {diff}");
    assert!(diff <= 1e-6, "{diff}");
}

/// `learner.bf16_cpu`: a train step under CPU bf16 autocast (float32 master
/// weights) moves the weights as the float32 step does, within bf16's
/// precision: with eps = 1 the first AdamW step is linear in the gradient, so
/// the two updates are compared directly — cosine ≥ 0.99 and relative
/// distance ≤ 5% (bf16 keeps 8 bits of mantissa: about 0.4% per rounding).
#[test]
fn a_bf16_autocast_step_on_the_cpu_moves_the_weights_as_the_f32_step() {
    let base = linear_adam(Config { advantage: prism_learner::config::Estimator::Grpo, micro_batch_size: 4, ..Config::default() });
    let before = weights(&tiny_arith(3));
    let step = |config: Config| {
        let mut learner = Learner::new(config, tiny_arith(3), None, 0).unwrap();
        learner.train_step(&groups(300, 3, 4)).unwrap();
        weights(learner.policy())
    };
    let f32_step = step(base.clone());
    let bf16_step = step(Config { bf16_cpu: true, ..base });
    let delta = |after: &[(String, Vec<f32>)]| -> Vec<f64> {
        after.iter().zip(&before).flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y) as f64)).collect()
    };
    let (a, b) = (delta(&f32_step), delta(&bf16_step));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let distance = norm(&a.iter().zip(&b).map(|(x, y)| x - y).collect::<Vec<_>>()) / norm(&a);
    let cosine = dot / (norm(&a) * norm(&b));
    eprintln!("bf16 vs f32 update: cosine {cosine:.5}, relative distance {distance:.4}");
    assert!(norm(&a) > 1e-3, "the step must move the weights");
    assert!(distance > 0.0, "autocast must have run the step in bf16");
    assert!(cosine >= 0.99 && distance <= 0.05, "cosine {cosine}, distance {distance}");
}

/// `learner.logit_chunk`: the loss over the vocabulary a few positions at a
/// time trains as the whole window at once (within 1e-6 after two steps,
/// with the same reported statistics), on the transformer (its head split
/// off) and on the tiny test model (an identity head), with and without
/// activation checkpointing, with the entropy bonus, a KL reference and a
/// temperature; and for SFT.
#[test]
fn a_loss_computed_a_few_positions_at_a_time_trains_as_the_whole_window() {
    let base = linear_adam(Config {
        advantage: prism_learner::config::Estimator::TpGrpo,
        kl_coef: 0.05,
        entropy_coef: 0.01,
        temperature: 0.8,
        micro_batch_size: 4,
        ..Config::default()
    });
    fn run<P: Policy>(config: &Config, make: &dyn Fn() -> P) -> (Vec<(String, Vec<f32>)>, Vec<prism_learner::TrainReport>) {
        let mut learner = Learner::new(config.clone(), make(), Some(make()), 0).unwrap();
        let reports = (0..2).map(|step| learner.train_step(&groups(200 + step, 3, 4)).unwrap()).collect();
        (weights(learner.policy()), reports)
    }
    for checkpoint_activations in [false, true] {
        let config = Config { checkpoint_activations, ..base.clone() };
        for (name, start, whole, chunked) in [
            ("tiny-arith", weights(&tiny_arith(3)), run(&config, &|| tiny_arith(3)), run(&Config { logit_chunk: 3, ..config.clone() }, &|| tiny_arith(3))),
            ("tiny", TinyLm::new(3).weights(), run(&config, &|| TinyLm::new(3)), run(&Config { logit_chunk: 2, ..config.clone() }, &|| TinyLm::new(3))),
        ] {
            let at = format!("{name}, checkpointed activations {checkpoint_activations}");
            let moved = max_diff(&whole.0, &start);
            let diff = max_diff(&whole.0, &chunked.0);
            eprintln!("{at}: moved {moved}, chunked vs whole {diff}");
            assert!(moved > 1e-3 && diff <= 1e-6, "{at}: moved {moved}, differs by {diff}");
            for (a, b) in whole.1.iter().flat_map(|r| &r.updates).zip(chunked.1.iter().flat_map(|r| &r.updates)) {
                for (what, x, y) in [("loss", a.loss, b.loss), ("entropy", a.entropy, b.entropy), ("kl_ref", a.kl_ref, b.kl_ref), ("grad_norm", a.grad_norm, b.grad_norm)] {
                    assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{at}: {what} {x} vs {y}");
                }
            }
        }
    }
    // SFT.
    let pairs = sft_pairs(7);
    let sft = |chunk: u32| {
        let mut learner = Learner::new(Config { logit_chunk: chunk, ..linear_adam(Config::default()) }, tiny_arith(3), None, 0).unwrap();
        let stats = learner.sft_step(&pairs).unwrap();
        (weights(learner.policy()), stats.loss)
    };
    let ((whole, whole_loss), (chunked, chunked_loss)) = (sft(0), sft(4));
    assert!(max_diff(&whole, &chunked) <= 1e-6 && (whole_loss - chunked_loss).abs() <= 1e-6, "SFT: {} {whole_loss} {chunked_loss}", max_diff(&whole, &chunked));
}

/// `learner.share_prompts` unpacked: a group's rows run their prompt once
/// (and are micro-batched by prompt), and the update is the padded rows' one.
/// Micro-batches of 3 from groups of 4 leave single rows (the padded path)
/// beside shared ones, and two shuffled mini-batches mix the groups.
#[test]
fn shared_prompt_passes_train_as_the_padded_rows() {
    let base = linear_adam(Config {
        pack: false,
        advantage: prism_learner::config::Estimator::TpGrpo,
        kl_coef: 0.05,
        entropy_coef: 0.01,
        micro_batch_size: 3,
        mini_batches: 2,
        ..Config::default()
    });
    let plain = trained(&base);
    let shared = trained(&Config { share_prompts: true, ..base.clone() });
    let moved = max_diff(&plain, &weights(&tiny_arith(3)));
    let diff = max_diff(&shared, &plain);
    eprintln!("moved {moved}, shared prompts vs padded rows: {diff}");
    assert!(moved > 1e-3);
    assert!(diff <= 1e-5, "{diff}");
}

/// `learner.pack`: a micro-batch's rows end to end without padding train as
/// the padded rows do (policy loss with KL to a packed-scored reference, an
/// entropy bonus, uneven micro-batches, two mini-batches), also with
/// recomputed layers and chunked logits, and in SFT.
#[test]
fn packed_rows_train_as_the_padded_rows() {
    let base = linear_adam(Config {
        advantage: prism_learner::config::Estimator::TpGrpo,
        kl_coef: 0.05,
        entropy_coef: 0.01,
        micro_batch_size: 5,
        mini_batches: 2,
        pack: false,
        ..Config::default()
    });
    let padded = trained(&base);
    let moved = max_diff(&padded, &weights(&tiny_arith(3)));
    assert!(moved > 1e-3);
    for (name, config) in [
        ("packed", Config { pack: true, ..base.clone() }),
        ("packed, recomputed layers, chunked logits", Config { pack: true, checkpoint_activations: true, logit_chunk: 3, ..base.clone() }),
        ("packed over shared prompts", Config { pack: true, share_prompts: true, ..base.clone() }),
        ("packed over shared prompts, recomputed layers", Config { pack: true, share_prompts: true, checkpoint_activations: true, ..base.clone() }),
    ] {
        let diff = max_diff(&trained(&config), &padded);
        eprintln!("moved {moved}, {name} vs padded rows: {diff}");
        assert!(diff <= 1e-5, "{name}: {diff}");
    }
    let pairs = sft_pairs(9);
    let sft = |pack: bool| {
        let mut learner = Learner::new(Config { pack, micro_batch_size: 4, ..linear_adam(Config::default()) }, tiny_arith(3), None, 0).unwrap();
        let stats = learner.sft_step(&pairs).unwrap();
        (weights(learner.policy()), stats.loss)
    };
    let ((a, a_loss), (b, b_loss)) = (sft(false), sft(true));
    assert!(max_diff(&a, &b) <= 1e-6 && (a_loss - b_loss).abs() <= 1e-6, "SFT: {} {a_loss} {b_loss}", max_diff(&a, &b));
}
