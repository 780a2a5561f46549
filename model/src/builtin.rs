//! Built-in presets: small models made from a seed, with a real
//! `tokenizer.json`, for tests and for the arithmetic task.
//!
//! `builtin:tiny-arith`: a Llama-style model (d = 128, 4 layers, 4 heads with 2
//! key/value heads, SwiGLU 384, tied embeddings, about 0.79M parameters) over a
//! character vocabulary: `<pad>`, `<bos>`, `<eos>`, `<unk>`, then the
//! characters of `Q:A=+-*0123456789` and newline.

use crate::config::{Family, GenerationConfig, ModelConfig, RopeScaling};
use crate::{Error, LoadOptions, Loaded, Result, Tokenizer, Transformer};
use std::path::Path;

/// Names of the presets `load("builtin:<name>")` accepts.
pub const PRESETS: &[&str] = &["tiny-arith"];

/// The special tokens of tiny-arith, in id order.
pub const TINY_ARITH_SPECIALS: [&str; 4] = ["<pad>", "<bos>", "<eos>", "<unk>"];
/// The characters of tiny-arith after the special tokens, in id order.
pub const TINY_ARITH_CHARS: &str = "Q:A=+-*0123456789\n";

/// The `tokenizer.json` of tiny-arith: every character is one token (BPE with
/// no merges, so no pre-tokenizer is needed), decoded by concatenation (`Fuse`).
pub fn tiny_arith_tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in TINY_ARITH_SPECIALS.iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
        added.push(serde_json::json!({
            "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true,
        }));
    }
    for (i, c) in TINY_ARITH_CHARS.chars().enumerate() {
        vocab.insert(c.to_string(), (TINY_ARITH_SPECIALS.len() + i).into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": [],
        },
    })
    .to_string()
}

/// The tiny-arith tokenizer.
pub fn tiny_arith_tokenizer() -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_json(&tiny_arith_tokenizer_json(), Path::new("builtin:tiny-arith"))?;
    tok.pad_token = Some("<pad>".into());
    tok.bos_token = Some("<bos>".into());
    tok.eos_token = Some("<eos>".into());
    tok.unk_token = Some("<unk>".into());
    Ok(tok)
}

/// The tiny-arith architecture.
pub fn tiny_arith_config() -> ModelConfig {
    ModelConfig {
        family: Family::Llama,
        vocab_size: TINY_ARITH_SPECIALS.len() + TINY_ARITH_CHARS.chars().count(),
        hidden_size: 128,
        intermediate_size: 384,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        max_position_embeddings: 512,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        qkv_bias: false,
        qk_norm: false,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: true,
        sliding_window: None,
        gemma: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
    }
}

/// Builds preset `name` with weights drawn from `opts.seed`.
pub fn load(name: &str, opts: &LoadOptions) -> Result<Loaded> {
    match name {
        "tiny-arith" => {
            let tokenizer = tiny_arith_tokenizer()?;
            let config = tiny_arith_config();
            let generation = GenerationConfig {
                eos_token_ids: config.eos_token_ids.clone(),
                bos_token_id: config.bos_token_id,
                pad_token_id: config.pad_token_id,
                ..Default::default()
            };
            let mut model = Transformer::new(config, opts.device, opts.dtype, opts.seed)?;
            model.set_tokenizer(tokenizer.clone());
            Ok(Loaded { model, tokenizer, generation })
        }
        _ => Err(Error::invalid("builtin model", format!("{name:?} (known: {})", PRESETS.join(", ")))),
    }
}
