//! Model configuration: the Hugging Face `config.json` as written on disk
//! ([`HfConfig`], optional fields) resolved into the runtime [`ModelConfig`]
//! (no options), plus `generation_config.json` ([`GenerationConfig`]).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Which family a checkpoint belongs to; decides the HF `architectures` and
/// `model_type` written back on save and the defaults of absent fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Llama and SmolLM (SmolLM2 is a Llama architecture).
    Llama,
    /// Mistral: Llama's layers, attention within a sliding window of
    /// `sliding_window` positions where the config sets one.
    Mistral,
    /// Qwen2: q/k/v projections carry a bias.
    Qwen2,
    /// Qwen3 (dense): RMSNorm of each query and key head before RoPE
    /// (`q_norm`, `k_norm`), no q/k/v bias, a head dimension of its own.
    Qwen3,
    /// Gemma 2: see [`Gemma`].
    Gemma2,
    /// Gemma 3 text models (`gemma3_text`): Gemma 2's layers without
    /// soft-capping by default, with Qwen3's q/k norms and a RoPE base of
    /// their own on the sliding layers.
    Gemma3,
}

impl Family {
    fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" | "smollm" | "smollm2" => Some(Family::Llama),
            "mistral" => Some(Family::Mistral),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "gemma2" => Some(Family::Gemma2),
            "gemma3_text" => Some(Family::Gemma3),
            _ => None,
        }
    }

    /// The `model_type` of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
        }
    }

    /// The `architectures[0]` of config.json.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Gemma 2 or 3.
    pub fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// What Gemma 2 and 3 (Gemma Team 2024, arXiv 2408.00118; 2025, arXiv
/// 2503.19786, as transformers implements them) change in the Llama layer.
/// Always: embeddings scaled by `sqrt(hidden_size)` (rounded to the weights'
/// type), RMSNorm weights stored as offsets from 1 (`x̂ · (1 + w)`, computed
/// in float32), a norm after attention and on both sides of the MLP
/// (`post_attention_layernorm` normalises the attention's output;
/// `pre_feedforward_layernorm`, `post_feedforward_layernorm`), GeGLU with
/// tanh-approximated GELU, and tied embeddings. Configured here:
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gemma {
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`, not
    /// `head_dim^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// Attention scores become `cap · tanh(score / cap)` before the mask
    /// (Gemma 2: 50).
    pub attn_logit_softcapping: Option<f64>,
    /// So do the logits (Gemma 2: 30).
    pub final_logit_softcapping: Option<f64>,
    /// Per layer: whether it attends within `sliding_window` only
    /// (`layer_types`; the others attend to every earlier position).
    pub sliding_layers: Vec<bool>,
    /// The RoPE base of the sliding layers, unscaled (Gemma 3: 10,000; the
    /// full layers take `rope_theta` and `rope_scaling`). `None`: the same.
    pub local_rope_theta: Option<f64>,
}

/// RoPE position scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions as they are.
    None,
    /// Positions divided by `factor` ("linear" / position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling ("llama3"): wavelengths longer
    /// than `original_max_position_embeddings / low_freq_factor` are divided by
    /// `factor`, shorter than `… / high_freq_factor` kept, and those between
    /// blended (Meta's Llama 3.1 release; transformers' `_compute_llama3_parameters`).
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5) as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HfRope {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
}

/// `config.json` of a Llama / Qwen2 / SmolLM checkpoint, as written by
/// transformers. Unknown fields are ignored (checkpoints carry many).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: Option<usize>,
    pub num_attention_heads: Option<usize>,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<HfRope>,
    /// Flat (one RoPE for every layer) or, Gemma 3, one per layer type
    /// (`full_attention`, `sliding_attention`).
    pub rope_parameters: Option<serde_json::Value>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub tie_word_embeddings: Option<bool>,
    pub hidden_act: Option<String>,
    /// Mistral's attention window (null: none), and Gemma's sliding layers'.
    pub sliding_window: Option<usize>,
    /// Gemma: the MLP's activation (transformers 4.4x writes it as hidden_act).
    pub hidden_activation: Option<String>,
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Gemma: `sliding_attention` or `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 before `layer_types`: every this-many-th layer is full.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3 before per-type `rope_parameters`: the sliding layers' RoPE base.
    pub rope_local_base_freq: Option<f64>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub pad_token_id: Option<serde_json::Value>,
}

/// The resolved architecture every layer is built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Bias on q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm of each query and key head before RoPE (Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Bias on the output projection and the MLP (rare; Llama `attention_bias`/`mlp_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Each query attends only the keys of the last `sliding_window` positions
    /// (itself included; Mistral).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Gemma 2 and 3's changes to the layer.
    #[serde(default)]
    pub gemma: Option<Gemma>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl ModelConfig {
    /// The weights the model holds (projections, embeddings and norms; the
    /// biases left out), counted with checked arithmetic: `None` when the
    /// count overflows. A file must hold at least this many values for the
    /// model to be made from it.
    pub fn weight_count(&self) -> Option<u64> {
        let u = |x: usize| u64::try_from(x).ok();
        let (v, d, f) = (u(self.vocab_size)?, u(self.hidden_size)?, u(self.intermediate_size)?);
        let q = u(self.num_heads)?.checked_mul(u(self.head_dim)?)?;
        let kv = u(self.num_kv_heads)?.checked_mul(u(self.head_dim)?)?;
        let attention = q.checked_add(kv.checked_mul(2)?)?.checked_add(q)?.checked_mul(d)?;
        let mlp = f.checked_mul(d)?.checked_mul(3)?;
        let norms = if self.gemma.is_some() { 4 } else { 2 };
        let layer = attention.checked_add(mlp)?.checked_add(d.checked_mul(norms)?)?;
        let layer = if self.qk_norm { layer.checked_add(u(self.head_dim)?.checked_mul(2)?)? } else { layer };
        let embeddings = v.checked_mul(d)?.checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        u(self.num_layers)?.checked_mul(layer)?.checked_add(embeddings)?.checked_add(d)
    }

    /// Checks the sizes a file's metadata gave before anything is allocated
    /// from them: no zero where the model divides, the weights within twice
    /// what the file holds (`available` values; a model a few tensors short
    /// is left to the load, which names the missing one) and the RoPE tables
    /// within 2^31 values. `origin` names the file.
    pub fn check_sizes(&self, available: u64, origin: &Path) -> Result<()> {
        let fail = |reason: String| Err(Error::Format { path: origin.into(), reason });
        for (name, value) in [
            ("vocab size", self.vocab_size),
            ("hidden size", self.hidden_size),
            ("intermediate size", self.intermediate_size),
            ("layers", self.num_layers),
            ("attention heads", self.num_heads),
            ("key/value heads", self.num_kv_heads),
            ("head dimension", self.head_dim),
            ("maximum positions", self.max_position_embeddings),
        ] {
            if value == 0 {
                return fail(format!("the model's {name} is 0"));
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return fail(format!("{} attention heads do not share out over {} key/value heads", self.num_heads, self.num_kv_heads));
        }
        match self.weight_count() {
            None => return fail("the model's sizes overflow when multiplied out".into()),
            Some(n) if n > available.saturating_mul(2).saturating_add(1 << 20) => {
                return fail(format!("the sizes describe a model of {n} weights, but the file holds {available} values"));
            }
            Some(_) => {}
        }
        if self.max_position_embeddings.checked_mul(self.head_dim).is_none_or(|n| n > 1 << 31) {
            return fail(format!(
                "{} positions of head dimension {} make RoPE tables past 2^31 values",
                self.max_position_embeddings, self.head_dim
            ));
        }
        Ok(())
    }
}

/// Token ids from a config value that may be a number, a list or null.
pub(crate) fn token_ids(value: &Option<serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        _ => Vec::new(),
    }
}

impl HfConfig {
    /// Reads and parses `path` (a config.json).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Format { path: path.into(), reason: e.to_string() })
    }

    /// The runtime config; `origin` names the file in errors.
    pub fn resolve(&self, origin: &Path) -> Result<ModelConfig> {
        let missing = |field: &str| Error::Format { path: origin.into(), reason: format!("missing field `{field}`") };
        let model_type = self.model_type.as_deref().unwrap_or("llama");
        let family = Family::from_model_type(model_type).ok_or_else(|| Error::Format {
            path: origin.into(),
            reason: format!("model_type {model_type:?} is not supported (llama, mistral, qwen2, qwen3, smollm, gemma2, gemma3_text)"),
        })?;
        if family.is_gemma() {
            let act = self.hidden_activation.as_ref().or(self.hidden_act.as_ref());
            if let Some(act) = act.filter(|a| !matches!(a.as_str(), "gelu_pytorch_tanh" | "gelu_tanh")) {
                return Err(Error::Format { path: origin.into(), reason: format!("hidden_activation {act:?} is not supported (gelu_pytorch_tanh)") });
            }
        } else if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(Error::Format { path: origin.into(), reason: format!("hidden_act {act:?} is not supported (silu)") });
            }
        }
        let hidden_size = self.hidden_size.ok_or_else(|| missing("hidden_size"))?;
        let num_heads = self.num_attention_heads.ok_or_else(|| missing("num_attention_heads"))?;
        let num_kv_heads = self.num_key_value_heads.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::Format {
                path: origin.into(),
                reason: format!("num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"),
            });
        }
        // transformers 5 writes `rope_parameters`, per layer type for Gemma 3.
        let parse_rope = |v: &serde_json::Value, field: &str| {
            serde_json::from_value::<HfRope>(v.clone()).map_err(|e| Error::Format { path: origin.into(), reason: format!("{field}: {e}") })
        };
        let per_type = self.rope_parameters.as_ref().and_then(|v| v.get("full_attention").map(|full| (full, v.get("sliding_attention"))));
        let (parameters, local) = match (per_type, &self.rope_parameters) {
            (Some((full, sliding)), _) => (
                Some(parse_rope(full, "rope_parameters.full_attention")?),
                sliding.map(|s| parse_rope(s, "rope_parameters.sliding_attention")).transpose()?,
            ),
            (None, Some(flat)) => (Some(parse_rope(flat, "rope_parameters")?), None),
            (None, None) => (None, None),
        };
        if let Some(kind) = local.as_ref().and_then(|l| l.rope_type.as_deref()).filter(|k| *k != "default") {
            return Err(Error::Format {
                path: origin.into(),
                reason: format!("rope_parameters.sliding_attention: rope type {kind:?} is not supported (default)"),
            });
        }
        let rope = parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self.rope_theta.or(rope.and_then(|r| r.rope_theta)).unwrap_or(10000.0);
        let rope_scaling = match rope.and_then(|r| r.rope_type.as_deref()) {
            None | Some("default") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: rope.and_then(|r| r.factor).ok_or_else(|| missing("rope_scaling.factor"))?,
            },
            Some("llama3") => {
                let field = |name: &str, v: Option<f64>| v.ok_or_else(|| missing(&format!("rope_scaling.{name}")));
                let r = rope.expect("a rope type was read from it");
                let scaling = RopeScaling::Llama3 {
                    factor: field("factor", r.factor)?,
                    low_freq_factor: field("low_freq_factor", r.low_freq_factor)?,
                    high_freq_factor: field("high_freq_factor", r.high_freq_factor)?,
                    // Absent, transformers takes the model's own maximum.
                    original_max_position_embeddings: field(
                        "original_max_position_embeddings",
                        r.original_max_position_embeddings.or(self.max_position_embeddings.map(|m| m as f64)),
                    )?,
                };
                if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = scaling {
                    let valid = [factor, low_freq_factor, high_freq_factor, original_max_position_embeddings].iter().all(|v| v.is_finite() && *v > 0.0);
                    if !valid || high_freq_factor <= low_freq_factor {
                        return Err(Error::Format {
                            path: origin.into(),
                            reason: format!(
                                "rope_scaling (llama3): factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor \
                                 {high_freq_factor}, original_max_position_embeddings {original_max_position_embeddings}: all must be \
                                 positive and high_freq_factor above low_freq_factor"
                            ),
                        });
                    }
                }
                scaling
            }
            Some(other) => {
                return Err(Error::Format {
                    path: origin.into(),
                    reason: format!("rope scaling type {other:?} is not supported (default, linear, llama3)"),
                });
            }
        };
        let bias = self.attention_bias.unwrap_or(false);
        let num_layers = self.num_hidden_layers.ok_or_else(|| missing("num_hidden_layers"))?;
        let head_dim = self.head_dim.unwrap_or(hidden_size / num_heads);
        let gemma = if family.is_gemma() {
            let sliding_layers = match (&self.layer_types, self.sliding_window_pattern) {
                (Some(types), _) => {
                    if types.len() != num_layers {
                        return Err(Error::Format {
                            path: origin.into(),
                            reason: format!("layer_types lists {} layers, num_hidden_layers is {num_layers}", types.len()),
                        });
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            "sliding_attention" => Ok(true),
                            "full_attention" => Ok(false),
                            other => Err(Error::Format {
                                path: origin.into(),
                                reason: format!("layer_types: {other:?} is not supported (sliding_attention, full_attention)"),
                            }),
                        })
                        .collect::<Result<Vec<bool>>>()?
                }
                // Gemma 3's older configs: every pattern-th layer is full.
                (None, Some(pattern)) if pattern > 0 => (0..num_layers).map(|i| (i + 1) % pattern != 0).collect(),
                // Gemma 2's: the layers alternate, the first one sliding.
                (None, _) if family == Family::Gemma2 => (0..num_layers).map(|i| i % 2 == 0).collect(),
                (None, _) => (0..num_layers).map(|i| (i + 1) % 6 != 0).collect(),
            };
            if self.sliding_window.is_none() && sliding_layers.iter().any(|s| *s) {
                return Err(missing("sliding_window"));
            }
            let local_rope_theta = match family {
                Family::Gemma3 => Some(local.as_ref().and_then(|l| l.rope_theta).or(self.rope_local_base_freq).unwrap_or(10_000.0)),
                _ => None,
            };
            Some(Gemma {
                query_pre_attn_scalar: self.query_pre_attn_scalar.unwrap_or(head_dim as f64),
                attn_logit_softcapping: self.attn_logit_softcapping,
                final_logit_softcapping: self.final_logit_softcapping,
                sliding_layers,
                local_rope_theta,
            })
        } else {
            None
        };
        if let Some(g) = &gemma {
            let caps = [g.attn_logit_softcapping, g.final_logit_softcapping];
            if !(g.query_pre_attn_scalar.is_finite() && g.query_pre_attn_scalar > 0.0) || caps.iter().flatten().any(|c| !(c.is_finite() && *c > 0.0)) {
                return Err(Error::Format {
                    path: origin.into(),
                    reason: format!(
                        "query_pre_attn_scalar {}, attn_logit_softcapping {:?}, final_logit_softcapping {:?}: each must be positive",
                        g.query_pre_attn_scalar, g.attn_logit_softcapping, g.final_logit_softcapping
                    ),
                });
            }
        }
        Ok(ModelConfig {
            family,
            vocab_size: self.vocab_size.ok_or_else(|| missing("vocab_size"))?,
            hidden_size,
            intermediate_size: self.intermediate_size.ok_or_else(|| missing("intermediate_size"))?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            qkv_bias: family == Family::Qwen2 || bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            o_bias: family != Family::Qwen2 && bias,
            mlp_bias: self.mlp_bias.unwrap_or(false),
            // Gemma ties them (its configs may not say so).
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(family.is_gemma()),
            sliding_window: match (family, self.sliding_window) {
                (Family::Mistral | Family::Gemma2 | Family::Gemma3, Some(0)) => {
                    return Err(Error::Format { path: origin.into(), reason: "sliding_window is 0".into() });
                }
                // Qwen's configs carry a window they do not use (`use_sliding_window: false`).
                (Family::Mistral | Family::Gemma2 | Family::Gemma3, window) => window,
                _ => None,
            },
            gemma,
            bos_token_id: token_ids(&self.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&self.eos_token_id),
            pad_token_id: token_ids(&self.pad_token_id).first().copied(),
        })
    }
}

impl ModelConfig {
    /// The config.json transformers reads back to the same architecture.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        let obj = v.as_object_mut().expect("a JSON object");
        match self.rope_scaling {
            RopeScaling::None => {
                obj.insert("rope_scaling".into(), serde_json::Value::Null);
            }
            RopeScaling::Linear { factor } => {
                obj.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "type": "linear", "factor": factor}));
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                obj.insert(
                    "rope_scaling".into(),
                    serde_json::json!({
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low_freq_factor,
                        "high_freq_factor": high_freq_factor,
                        "original_max_position_embeddings": original_max_position_embeddings,
                    }),
                );
            }
        }
        if self.family == Family::Qwen3 {
            obj.insert("attention_bias".into(), self.qkv_bias.into());
        }
        if let Some(g) = &self.gemma {
            obj.remove("hidden_act");
            obj.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
            obj.insert("attention_bias".into(), false.into());
            // transformers' config class takes an integer here.
            let scalar = g.query_pre_attn_scalar;
            obj.insert("query_pre_attn_scalar".into(), if scalar.fract() == 0.0 && scalar < 1e15 { (scalar as i64).into() } else { scalar.into() });
            obj.insert("attn_logit_softcapping".into(), g.attn_logit_softcapping.into());
            obj.insert("final_logit_softcapping".into(), g.final_logit_softcapping.into());
            obj.insert("sliding_window".into(), self.sliding_window.into());
            let types: Vec<&str> = g.sliding_layers.iter().map(|s| if *s { "sliding_attention" } else { "full_attention" }).collect();
            obj.insert("layer_types".into(), types.into());
            if let Some(local) = g.local_rope_theta {
                // Per layer type: the full layers' RoPE (with its scaling), the sliding layers' base.
                let mut full = match obj.remove("rope_scaling") {
                    Some(serde_json::Value::Object(m)) => m,
                    _ => serde_json::json!({"rope_type": "default"}).as_object().expect("an object").clone(),
                };
                full.remove("type");
                full.insert("rope_theta".into(), self.rope_theta.into());
                obj.remove("rope_theta");
                obj.insert(
                    "rope_parameters".into(),
                    serde_json::json!({"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": local}}),
                );
            }
        }
        if self.family == Family::Mistral {
            obj.insert("sliding_window".into(), self.sliding_window.into());
        }
        if self.family == Family::Llama {
            obj.insert("attention_bias".into(), self.o_bias.into());
            obj.insert("mlp_bias".into(), self.mlp_bias.into());
        }
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        if let Some(p) = self.pad_token_id {
            obj.insert("pad_token_id".into(), p.into());
        }
        v
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (d, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = d * q + 2 * d * kv + q * d + if self.qkv_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * d * f;
        let norms = if self.gemma.is_some() { 4 } else { 2 };
        let layer = attn + mlp + norms * d + if self.qk_norm { 2 * self.head_dim } else { 0 };
        v * d + self.num_layers * layer + d + if self.tie_word_embeddings { 0 } else { v * d }
    }
}

/// `generation_config.json`: what ends a generation and the model's sampling defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Token ids that end a sample.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
}

#[derive(Deserialize)]
struct HfGenerationConfig {
    eos_token_id: Option<serde_json::Value>,
    bos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
}

impl GenerationConfig {
    /// Reads `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let hf: HfGenerationConfig =
            serde_json::from_str(&text).map_err(|e| Error::Format { path: path.into(), reason: e.to_string() })?;
        Ok(Self {
            eos_token_ids: token_ids(&hf.eos_token_id),
            bos_token_id: token_ids(&hf.bos_token_id).first().copied(),
            pad_token_id: token_ids(&hf.pad_token_id).first().copied(),
            temperature: hf.temperature,
            top_p: hf.top_p,
            top_k: hf.top_k,
        })
    }

    /// The JSON transformers reads.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({});
        let obj = v.as_object_mut().expect("a JSON object");
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
        if let Some(p) = self.pad_token_id {
            obj.insert("pad_token_id".into(), p.into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(json: serde_json::Value) -> Result<ModelConfig> {
        let hf: HfConfig = serde_json::from_value(json).unwrap();
        hf.resolve(Path::new("config.json"))
    }

    fn gemma(model_type: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "sliding_window": 4, "query_pre_attn_scalar": 16
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    /// Configs written before `layer_types` and per-type `rope_parameters`
    /// (transformers 4.4x, as Gemma 2 and Gemma 3 1B shipped): Gemma 2's
    /// layers alternate; Gemma 3's sliding_window_pattern and
    /// rope_local_base_freq give the full layers and the local base.
    #[test]
    fn older_gemma_configs_resolve_as_transformers_reads_them() {
        let c = resolve(gemma("gemma2", serde_json::json!({"hidden_act": "gelu_pytorch_tanh", "attn_logit_softcapping": 50.0}))).unwrap();
        let g = c.gemma.unwrap();
        assert_eq!(g.sliding_layers, [true, false, true, false, true, false, true]);
        assert_eq!((g.attn_logit_softcapping, g.local_rope_theta, c.tie_word_embeddings), (Some(50.0), None, true));
        let c = resolve(gemma(
            "gemma3_text",
            serde_json::json!({"sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                               "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
        ))
        .unwrap();
        let g = c.gemma.as_ref().unwrap();
        assert_eq!(g.sliding_layers, [true, true, false, true, true, false, true]);
        assert_eq!((g.local_rope_theta, c.rope_theta, c.qk_norm), (Some(1e4), 1e6, true));
        assert!(matches!(c.rope_scaling, RopeScaling::Linear { factor } if factor == 8.0));
        // And back: the per-type RoPE transformers 5 writes, which resolves the same.
        let again = resolve(c.to_hf_json()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn gemma_configs_that_cannot_be_built_are_refused_by_field() {
        let cases = [
            (serde_json::json!({"hidden_activation": "relu"}), "hidden_activation \"relu\""),
            (serde_json::json!({"layer_types": ["sliding_attention"]}), "layer_types lists 1 layers"),
            (serde_json::json!({"sliding_window": null}), "sliding_window"),
            (serde_json::json!({"final_logit_softcapping": 0.0}), "final_logit_softcapping"),
            (serde_json::json!({"query_pre_attn_scalar": -1.0}), "query_pre_attn_scalar"),
            (serde_json::json!({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "yarn"}}}), "sliding_attention"),
        ];
        for (extra, want) in cases {
            let e = resolve(gemma("gemma3_text", extra.clone())).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("config.json"), "{extra}: {e}");
        }
    }
}
