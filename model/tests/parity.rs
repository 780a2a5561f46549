//! The transformer against Hugging Face transformers (the reference, run from
//! `.venv` by model/tests/reference/*.py): tiny random Llama (GQA, linear RoPE
//! scaling, untied), Llama 3.1 (its RoPE scaling, tied), Qwen2 (q/k/v bias,
//! tied, sharded safetensors), Qwen3 (per-head q/k norms, a head dimension
//! of its own), Mistral (a sliding window shorter than the inputs), Gemma 2
//! (soft caps, sliding and full layers, GeGLU, norms around each block) and
//! Gemma 3 (q/k norms, a local RoPE base, linear scaling on the full layers)
//! logits in float32 and greedy continuations, and prism's HF export
//! reloaded by transformers.

mod common;
use common::*;
use prism_model::{LoadOptions, load};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

/// The folder tiny_hf.py wrote (once per test binary).
fn tiny_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        python("tiny_hf.py", &[dir.path().to_str().unwrap()], "");
        // Our loader wants a tokenizer; any valid one serves for logits.
        let tok = prism_model::builtin::tiny_arith_tokenizer().unwrap();
        for m in FAMILIES {
            tok.save(&dir.path().join(m)).unwrap();
        }
        dir
    })
    .path()
}

/// The tiny checkpoints tiny_hf.py writes, one per family or RoPE variant.
const FAMILIES: [&str; 7] = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"];

#[test]
fn tiny_llama_and_qwen_logits_match_transformers() {
    let dir = tiny_dir();
    let reference = read_safetensors(&dir.join("reference.safetensors"));
    let ids = &reference["ids"];
    let mask = &reference["mask"];
    for name in FAMILIES {
        let loaded = load(dir.join(name).to_str().unwrap(), &load_options()).unwrap();
        let model = &loaded.model;
        let c = model.config();
        match name {
            "qwen2" => assert!(c.qkv_bias && c.tie_word_embeddings && !c.qk_norm),
            "qwen3" => assert!(c.qk_norm && !c.qkv_bias && !c.tie_word_embeddings && c.head_dim == 24),
            "llama3" => assert!(matches!(c.rope_scaling, prism_model::RopeScaling::Llama3 { factor, .. } if factor == 8.0)),
            "mistral" => assert_eq!(c.sliding_window, Some(5)),
            "gemma2" => {
                let g = c.gemma.as_ref().expect("gemma");
                assert!(c.tie_word_embeddings && !c.qk_norm && c.sliding_window == Some(5));
                assert_eq!((g.attn_logit_softcapping, g.final_logit_softcapping, g.query_pre_attn_scalar), (Some(0.1), Some(0.5), 24.0));
                assert_eq!((g.sliding_layers.as_slice(), g.local_rope_theta), ([true, false].as_slice(), None));
            }
            "gemma3" => {
                let g = c.gemma.as_ref().expect("gemma");
                assert!(c.tie_word_embeddings && c.qk_norm && g.attn_logit_softcapping.is_none());
                assert_eq!((g.sliding_layers.as_slice(), g.local_rope_theta, c.rope_theta), ([true, false].as_slice(), Some(10000.0), 1e6));
                assert!(matches!(c.rope_scaling, prism_model::RopeScaling::Linear { factor } if factor == 2.0));
            }
            _ => {
                assert!(!c.tie_word_embeddings);
                assert!(matches!(c.rope_scaling, prism_model::RopeScaling::Linear { factor } if factor == 2.0));
            }
        }
        let held: i64 = model.var_store().variables().values().map(|t| t.numel() as i64).sum();
        assert_eq!(c.num_parameters() as i64, held, "{name}: the parameter count");
        let ours = tch::no_grad(|| model.forward(ids, None)).to_device(tch::Device::Cpu);
        let diff = max_abs_diff(&ours, &reference[&format!("{name}.logits")]);
        assert!(diff <= 1e-4, "{name}: max |logits - transformers| = {diff}");

        // Left padding: compare the real positions only.
        let ours = tch::no_grad(|| model.forward(ids, Some(mask))).to_device(tch::Device::Cpu);
        let theirs = &reference[&format!("{name}.logits_masked")];
        let real = mask.to_kind(Kind::Bool).unsqueeze(-1);
        let diff = max_abs_diff(&ours.masked_select(&real), &theirs.masked_select(&real));
        assert!(diff <= 1e-4, "{name} (left-padded): max |logits - transformers| = {diff}");
        assert!(ours.isfinite().all().int64_value(&[]) == 1, "{name}: padded positions must stay finite");

        // 32 greedy tokens through the engine (KV cache, decode path) equal transformers' generate.
        let prompt: Vec<u32> = Vec::<i64>::try_from(ids.get(0)).unwrap().into_iter().map(|t| t as u32).collect();
        let ours = prism_model::engine::generate(model, &[prompt], &prism_model::SamplingParams::greedy(32, Vec::new())).unwrap();
        let theirs: Vec<u32> = Vec::<i64>::try_from(&reference[&format!("{name}.greedy")]).unwrap().into_iter().map(|t| t as u32).collect();
        assert_eq!(theirs.len(), 32);
        assert_eq!(ours[0][0].tokens, theirs, "{name}: greedy continuation");
    }
}

/// Prefill then one token at a time through the KV cache gives the logits of a
/// full forward pass, with left padding in the batch; and still does after the
/// HF-named parameters are updated in place (as the optimizer and weight sync
/// do), which the decoding path's fused q/k/v and gate/up matrices must see.
#[test]
fn kv_cached_decode_equals_full_forward() {
    let dir = tiny_dir();
    let reference = read_safetensors(&dir.join("reference.safetensors"));
    let (ids, mask) = (&reference["ids"], &reference["mask"]);
    let compare = |model: &prism_model::Transformer, what: &str| {
        let full = tch::no_grad(|| model.forward(ids, Some(mask))).to_device(tch::Device::Cpu);
        let t = ids.size()[1];
        let prefill = 6;
        let mut cache = model.new_cache(2, t as usize);
        let mut parts = vec![tch::no_grad(|| {
            model.forward_cached(&ids.narrow(1, 0, prefill), Some(&mask.narrow(1, 0, prefill)), &mut cache, false)
        })
        .unwrap()];
        for i in prefill..t {
            parts.push(tch::no_grad(|| model.forward_cached(&ids.narrow(1, i, 1), None, &mut cache, false)).unwrap());
        }
        let cached = Tensor::cat(&parts, 1).to_device(tch::Device::Cpu);
        let real = mask.to_kind(Kind::Bool).unsqueeze(-1);
        let diff = max_abs_diff(&cached.masked_select(&real), &full.masked_select(&real));
        assert!(diff <= 1e-5, "{what}: cached vs full max diff {diff}");
        full
    };
    for name in FAMILIES {
        let loaded = load(dir.join(name).to_str().unwrap(), &load_options()).unwrap();
        let model = &loaded.model;
        let before = compare(model, name);
        tch::manual_seed(3);
        tch::no_grad(|| {
            for (_, mut p) in model.var_store().variables() {
                let _ = p.f_add_(&(p.randn_like() * 0.05)).unwrap();
            }
        });
        let after = compare(model, &format!("{name} after an in-place update"));
        assert!(max_abs_diff(&before, &after) > 1e-3, "{name}: the update must change the logits");
    }
}

/// A model written by `save_hf` loads in transformers with the same logits and
/// the same tokenizer: prism's tiny-arith preset (Llama), and the Qwen2, Qwen3,
/// Llama 3.1, Mistral, Gemma 2 and Gemma 3 above (logits).
#[test]
fn export_reloads_in_transformers() {
    let out = tempfile::tempdir().unwrap();
    let arith = load("builtin:tiny-arith", &LoadOptions { seed: 7, ..load_options() }).unwrap();
    let arith_dir = out.path().join("arith");
    arith.model.save_hf_with(&arith_dir, &arith.tokenizer, &arith.generation).unwrap();
    let mut exported = vec![(arith, arith_dir, "LlamaForCausalLM")];
    for (name, class) in
        [
            ("qwen2", "Qwen2ForCausalLM"),
            ("qwen3", "Qwen3ForCausalLM"),
            ("llama3", "LlamaForCausalLM"),
            ("mistral", "MistralForCausalLM"),
            ("gemma2", "Gemma2ForCausalLM"),
            ("gemma3", "Gemma3ForCausalLM"),
        ]
    {
        let loaded = load(tiny_dir().join(name).to_str().unwrap(), &load_options()).unwrap();
        let dir = out.path().join(name);
        loaded.model.save_hf(&dir, &loaded.tokenizer).unwrap();
        exported.push((loaded, dir, class));
    }
    let arith = &exported[0].0;

    let texts = ["Q:7+3*4-2\n", "3*4=12\n7+12=19\n19-2=17\nA:17\n<eos>", "Q:-5+2\nA:-3"];
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| arith.tokenizer.encode(t, true).unwrap()).collect();
    let batch: Vec<i64> = ids[0].iter().map(|&t| t as i64).collect();
    let request = serde_json::json!({"ids": [batch.clone()], "texts": texts});
    let dirs: Vec<&str> = exported.iter().map(|(_, dir, _)| dir.to_str().unwrap()).collect();
    let got: serde_json::Value = serde_json::from_str(&python("check_export.py", &dirs, &request.to_string())).unwrap();
    let input = Tensor::from_slice(&batch).unsqueeze(0);
    for (i, (loaded, _, class)) in exported.iter().enumerate() {
        let r = &got[i];
        assert_eq!(r["class"], *class);
        let theirs: Vec<f32> = r["logits"][0].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32)).collect();
        let ours = tch::no_grad(|| loaded.model.forward(&input, None)).to_device(tch::Device::Cpu);
        let theirs = Tensor::from_slice(&theirs).view(ours.size().as_slice());
        let diff = max_abs_diff(&ours, &theirs);
        assert!(diff <= 1e-4, "{class}: reloaded logits differ by {diff}");
        if i > 0 {
            // Logits only: transformers rebuilds a Qwen folder's tokenizer as
            // byte-level BPE whatever tokenizer.json says (the character
            // vocabulary is not one), and the tokenizer is not what these test.
            continue;
        }
        for (j, text) in texts.iter().enumerate() {
            let theirs: Vec<u32> = serde_json::from_value(r["texts"][j].clone()).unwrap();
            assert_eq!(theirs, ids[j], "{class}: token ids of {text:?}");
            assert_eq!(r["decoded"][j], *text, "{class}: decoding {text:?}");
        }
    }
}

/// A Qwen3 GGUF file laid out as llama.cpp writes the architecture (its
/// metadata keys and `blk.N.attn_q_norm` / `attn_k_norm` names, q/k rows not
/// permuted), made from the tiny Qwen3 above by qwen3_gguf.py, loads to the
/// same model: the configuration read from its metadata, and logits equal to
/// the HF folder's and within 1e-4 of transformers'.
#[test]
fn a_qwen3_gguf_loads_as_its_hf_folder() {
    let dir = tiny_dir();
    let gguf = dir.join("qwen3.gguf");
    python("qwen3_gguf.py", &[dir.join("qwen3").to_str().unwrap(), gguf.to_str().unwrap()], "");
    let from_gguf = load(gguf.to_str().unwrap(), &load_options()).unwrap();
    let from_hf = load(dir.join("qwen3").to_str().unwrap(), &load_options()).unwrap();
    let (g, h) = (from_gguf.model.config(), from_hf.model.config());
    assert_eq!(g.family, prism_model::Family::Qwen3);
    assert!(g.qk_norm && !g.qkv_bias && !g.tie_word_embeddings);
    assert_eq!((g.head_dim, g.num_heads, g.num_kv_heads, g.rope_theta), (h.head_dim, h.num_heads, h.num_kv_heads, h.rope_theta));
    let reference = read_safetensors(&dir.join("reference.safetensors"));
    let ids = &reference["ids"];
    let ours = tch::no_grad(|| from_gguf.model.forward(ids, None)).to_device(tch::Device::Cpu);
    let hf = tch::no_grad(|| from_hf.model.forward(ids, None)).to_device(tch::Device::Cpu);
    assert!(max_abs_diff(&ours, &hf) <= 1e-6, "GGUF vs HF folder: {}", max_abs_diff(&ours, &hf));
    let diff = max_abs_diff(&ours, &reference["qwen3.logits"]);
    assert!(diff <= 1e-4, "GGUF vs transformers: {diff}");
}
