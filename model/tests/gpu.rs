//! The model on CUDA against the same model on the CPU (itself checked against
//! transformers by tests/parity.rs and tests/smollm.rs). Skipped, saying so,
//! where CUDA is unavailable; scripts/gpu-check runs them with
//! `PRISM_REQUIRE_CUDA=1`, which turns the skip into a failure.
//!
//! Tolerances: float32 on CUDA within 1e-4 of the CPU logits (cuBLAS does not
//! use TF32 for float32 matmuls unless asked); bf16 weights within 0.1 of the
//! float32 CPU logits (bf16 keeps 8 bits of mantissa, ~0.4% per value); how
//! many bf16 greedy tokens agree is printed, not asserted (random tiny models
//! have near-tied logits).

mod common;
use prism_model::config::{Family, ModelConfig, RopeScaling};
use prism_model::engine::{self, SamplingParams};
use prism_model::{Device, Dtype, LoadOptions, Transformer, load};
use tch::Tensor;

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        return Some(Device::Cuda(0));
    }
    assert!(std::env::var_os("PRISM_REQUIRE_CUDA").is_none(), "PRISM_REQUIRE_CUDA is set but CUDA is not available");
    eprintln!("skipped: CUDA is not available (scripts/gpu-check runs this on a GPU machine)");
    None
}

/// A Qwen2-style model with q/k/v bias, linear RoPE scaling and untied embeddings.
fn qwen_like() -> ModelConfig {
    ModelConfig {
        family: Family::Qwen2,
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 160,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        rope_scaling: RopeScaling::Linear { factor: 2.0 },
        qkv_bias: true,
        qk_norm: false,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: false,
        sliding_window: None,
        gemma: None,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    }
}

fn models(device: Device, dtype: Dtype) -> Vec<(String, Transformer)> {
    let arith = load("builtin:tiny-arith", &LoadOptions { device, dtype, seed: 3 }).unwrap();
    let mut out = vec![("tiny-arith".to_string(), arith.model)];
    let mut qwen = Transformer::new(qwen_like(), device, dtype, 3).unwrap();
    qwen.set_tokenizer(prism_model::builtin::tiny_arith_tokenizer().unwrap());
    out.push(("qwen-like".to_string(), qwen));
    if let Some(gguf) = std::env::var_os("PRISM_SMOLLM_GGUF") {
        let m = load(gguf.to_str().unwrap(), &LoadOptions { device, dtype, seed: 0 }).unwrap();
        out.push(("smollm2".to_string(), m.model));
    }
    out
}

fn input() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[4i64, 5, 11, 8, 14, 10, 15, 9, 13, 21, 6, 7, 4, 5, 16, 17]).view([2, 8]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1]).view([2, 8]);
    (ids, mask)
}

#[test]
fn cuda_logits_match_cpu_in_f32_and_bf16() {
    let Some(gpu) = cuda() else { return };
    let (ids, mask) = input();
    let real = mask.to_kind(tch::Kind::Bool).unsqueeze(-1);
    let cpu = models(Device::Cpu, Dtype::F32);
    for (dtype, tol) in [(Dtype::F32, 1e-4), (Dtype::Bf16, 0.1)] {
        for ((name, on_cpu), (_, on_gpu)) in cpu.iter().zip(models(gpu, dtype)) {
            let a = tch::no_grad(|| on_cpu.forward(&ids, Some(&mask)));
            let b = tch::no_grad(|| on_gpu.forward(&ids, Some(&mask))).to_device(Device::Cpu);
            let diff = common::max_abs_diff(&a.masked_select(&real), &b.masked_select(&real));
            println!("{name} {}: max |cuda - cpu f32| = {diff:.2e} (tolerance {tol:.0e})", dtype.name());
            assert!(diff <= tol, "{name} {}: {diff}", dtype.name());
        }
    }
}

#[test]
fn cuda_engine_matches_cpu() {
    let Some(gpu) = cuda() else { return };
    let prompts = vec![vec![4u32, 5, 11, 8, 14], vec![4, 5, 9, 21]];
    let cpu = models(Device::Cpu, Dtype::F32);
    for ((name, on_cpu), (_, on_gpu)) in cpu.iter().zip(models(gpu, Dtype::F32)) {
        let greedy = SamplingParams::greedy(16, vec![]);
        let a = engine::generate(on_cpu, &prompts, &greedy).unwrap();
        let b = engine::generate(&on_gpu, &prompts, &greedy).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x[0].tokens, y[0].tokens, "{name}: greedy tokens on cuda");
        }
        let sampled = SamplingParams { n: 4, temperature: 1.0, top_p: 0.9, max_new_tokens: 12, seed: 5, ..Default::default() };
        let c = engine::generate(&on_gpu, &prompts, &sampled).unwrap();
        assert_eq!(c, engine::generate(&on_gpu, &prompts, &sampled).unwrap(), "{name}: a seed reproduces cuda samples");
        println!("{name}: cuda greedy = cpu greedy; seeded cuda sampling reproducible");
    }
    for ((name, on_cpu), (_, on_gpu)) in cpu.iter().zip(models(gpu, Dtype::Bf16)) {
        let greedy = SamplingParams::greedy(8, vec![]);
        let a = engine::generate(on_cpu, &prompts[..1], &greedy).unwrap();
        let b = engine::generate(&on_gpu, &prompts[..1], &greedy).unwrap();
        let same = a[0][0].tokens.iter().zip(&b[0][0].tokens).take_while(|(x, y)| x == y).count();
        println!("{name} bf16: first {same} of 8 greedy tokens equal the f32 cpu ones");
    }
}
