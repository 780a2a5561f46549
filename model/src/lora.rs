//! LoRA adapters (Hu et al. 2021, arXiv 2106.09685): each adapted projection
//! `y = x Wᵀ` becomes `y = x Wᵀ + s · B A x` with `A` `[r, in]`, `B` `[out, r]`
//! and `s = alpha / r`, the base `W` frozen. `A` starts uniform in
//! `±1/sqrt(in)` (PEFT's default, Kaiming-uniform with a = sqrt(5)) and `B` at
//! zero, so an attached model computes what its base computes until trained.
//!
//! The adapters live in a store of their own (the variables an optimizer
//! steps), named as PEFT names them in `adapter_model.safetensors`
//! (`base_model.model.<module>.lora_A.weight`), so that store written with an
//! `adapter_config.json` is a PEFT adapter. Rollouts run merged weights
//! (`W + s B A`, [`crate::Transformer::merged_weights`]): their fused decode
//! path stays as it is and needs no adapter code.

use crate::{Error, Result, Transformer};
use prism_core::config::Invalid;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::path::Path;
use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};

/// The projections an adapter may target, as PEFT names them; the first four
/// are in `self_attn`, the rest in `mlp`.
pub const TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The module of a projection: `self_attn` or `mlp`.
fn module_of(target: usize) -> &'static str {
    if target < 4 { "self_attn" } else { "mlp" }
}

/// `[learner.lora]`: train rank-`rank` adapters on the `targets` projections
/// of every layer over a frozen base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// The adapters' rank r. Default 16.
    pub rank: u32,
    /// The adapters' output is scaled by `alpha / rank`. Default 32.
    pub alpha: f64,
    /// Dropout on the adapters' input while training (not on the base's).
    /// Default 0.
    pub dropout: f64,
    /// The projections adapted in every layer (`q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`). Default all of them.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 16, alpha: 32.0, dropout: 0.0, targets: TARGETS.iter().map(|t| t.to_string()).collect() }
    }
}

impl LoraConfig {
    /// Checks values that parse but cannot be used; keys are named under `prefix` (e.g. `learner.lora`).
    pub fn validate(&self, prefix: &str) -> std::result::Result<(), Invalid> {
        if self.rank == 0 {
            return Err(Invalid::new(format!("{prefix}.rank"), self.rank, "must be >= 1"));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Invalid::new(format!("{prefix}.alpha"), self.alpha, "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Invalid::new(format!("{prefix}.dropout"), self.dropout, "must be in [0, 1)"));
        }
        if self.targets.is_empty() {
            return Err(Invalid::new(format!("{prefix}.targets"), "[]", format!("must name at least one of {}", TARGETS.join(", "))));
        }
        for (i, t) in self.targets.iter().enumerate() {
            if !TARGETS.contains(&t.as_str()) {
                return Err(Invalid::new(format!("{prefix}.targets"), t, format!("is not a projection (known: {})", TARGETS.join(", "))));
            }
            if self.targets[..i].contains(t) {
                return Err(Invalid::new(format!("{prefix}.targets"), t, "is named twice"));
            }
        }
        Ok(())
    }

    /// The scale `alpha / rank` of the adapters' output.
    pub fn scale(&self) -> f64 {
        self.alpha / f64::from(self.rank)
    }

    fn targets_index(&self, target: usize) -> bool {
        self.targets.iter().any(|t| t == TARGETS[target])
    }
}

/// The adapter of one projection.
pub(crate) struct Adapter {
    /// Shared by a model's adapters: off, the model computes as its base
    /// (the KL reference of a LoRA run, without a copy of the base).
    enabled: Arc<AtomicBool>,
    /// `[r, in]`.
    a: Tensor,
    /// `[out, r]`.
    b: Tensor,
    scale: f64,
    dropout: f64,
}

impl Adapter {
    /// Whether the adapter is on (see [`Transformer::set_adapters_enabled`]).
    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// `s · B A x` for `x` `[.., in]`, dropout on `x` first in a training pass.
    pub(crate) fn apply(&self, x: &Tensor) -> Tensor {
        let x = if self.dropout > 0.0 && crate::cpu_kernels::grad_enabled() { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        // Scaled at rank r, not at the output's width (PEFT scales the output: equal up to rounding).
        (x.linear(&self.a, None::<&Tensor>) * self.scale).linear(&self.b, None::<&Tensor>)
    }

    /// `W + s B A` in `w`'s type (the product in float32).
    fn merge(&self, w: &Tensor) -> Tensor {
        let delta = self.b.detach().to_kind(Kind::Float).mm(&self.a.detach().to_kind(Kind::Float)) * self.scale;
        (w.detach().to_kind(Kind::Float) + delta).to_kind(w.kind())
    }
}

/// The adapters attached to a model.
pub(crate) struct Lora {
    pub(crate) vs: VarStore,
    pub(crate) config: LoraConfig,
    /// `base_model_name_or_path` of the written `adapter_config.json`.
    pub(crate) base: Option<String>,
    enabled: Arc<AtomicBool>,
}

/// The HF name of the base weight `layer`'s `target` adapts.
fn base_name(layer: usize, target: usize) -> String {
    format!("model.layers.{layer}.{}.{}.weight", module_of(target), TARGETS[target])
}

impl Transformer {
    /// Attaches fresh LoRA adapters (drawn from `seed`) to the `config.targets`
    /// projections of every layer and freezes every base parameter: from now
    /// on gradients reach the adapters only ([`Self::adapter_store`]).
    /// `base` is recorded as the adapter's `base_model_name_or_path`.
    pub fn attach_lora(&mut self, config: &LoraConfig, seed: u64, base: Option<String>) -> Result<()> {
        config.validate("lora").map_err(|e| Error::invalid("LoRA configuration", e.to_string()))?;
        if self.lora.is_some() {
            return Err(Error::invalid("LoRA configuration", "the model already carries adapters"));
        }
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut vs = VarStore::new(self.device());
        vs.set_kind(self.vs.kind());
        let r = i64::from(config.rank);
        let root = vs.root();
        let enabled = Arc::new(AtomicBool::new(true));
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for target in (0..TARGETS.len()).filter(|&t| config.targets_index(t)) {
                let w = layer.projection(target);
                let (out, inp) = (w.size()[0], w.size()[1]);
                let p = &root / "base_model" / "model" / "model" / "layers" / i / module_of(target) / TARGETS[target];
                let a = (&p / "lora_A").var("weight", &[r, inp], Init::Const(0.0));
                let b = (&p / "lora_B").var("weight", &[out, r], Init::Const(0.0));
                let bound = 1.0 / (inp as f64).sqrt();
                let values: Vec<f32> = (0..r * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
                tch::no_grad(|| a.shallow_clone().f_copy_(&Tensor::from_slice(&values).view([r, inp])))?;
                layer.lora[target] = Some(Adapter { enabled: enabled.clone(), a, b, scale: config.scale(), dropout: config.dropout });
            }
        }
        self.vs.freeze();
        self.lora = Some(Lora { vs, config: config.clone(), base, enabled });
        Ok(())
    }

    /// Switches the adapters off (the model computes as its frozen base,
    /// e.g. a LoRA run's KL reference) or back on. No-op without adapters.
    pub fn set_adapters_enabled(&self, on: bool) {
        if let Some(lora) = &self.lora {
            lora.enabled.store(on, Ordering::Relaxed);
        }
    }

    /// The adapters' store (PEFT names), when adapters are attached.
    pub fn adapter_store(&self) -> Option<&VarStore> {
        self.lora.as_ref().map(|l| &l.vs)
    }

    /// Every parameter under its HF name, with the adapters merged into the
    /// weights they adapt (`W + s B A`, new tensors), detached: the model a
    /// rollout runs or an export writes. Without adapters, the parameters
    /// themselves (detached).
    pub fn merged_weights(&self) -> Vec<(String, Tensor)> {
        let mut merged: HashMap<String, Tensor> = HashMap::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for (target, adapter) in layer.lora.iter().enumerate() {
                if let Some(adapter) = adapter {
                    merged.insert(base_name(i, target), tch::no_grad(|| adapter.merge(&layer.projection(target))));
                }
            }
        }
        let mut named: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().map(|(n, t)| { let m = merged.remove(&n); (n, m.unwrap_or_else(|| t.detach())) }).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Writes the adapters as PEFT does: `adapter_model.safetensors` and
    /// `adapter_config.json` in `dir`. Nothing without adapters.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let Some(lora) = &self.lora else { return Ok(()) };
        crate::hf::write_safetensors(&crate::hf::on_cpu_by_name(&lora.vs), &dir.join(ADAPTER_WEIGHTS))?;
        let c = &lora.config;
        // The keys PEFT 0.22's LoraConfig reads; the rest keep its defaults.
        let json = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": lora.base,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": c.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "inference_mode": true,
        });
        let path = dir.join(ADAPTER_CONFIG);
        std::fs::write(&path, serde_json::to_string_pretty(&json).expect("JSON serialises") + "\n").map_err(|e| Error::io(&path, e))
    }

    /// Merges the PEFT LoRA adapter in `dir` (`adapter_config.json`,
    /// `adapter_model.safetensors`) into the weights. Refuses adapters it
    /// cannot merge exactly (DoRA, rsLoRA, biases, fan-in-fan-out, other
    /// PEFT types, a module or shape this model lacks), naming the file.
    pub fn merge_adapter(&mut self, dir: &Path) -> Result<()> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let bad = |path: &Path, reason: String| Error::Format { path: path.to_path_buf(), reason };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&config_path, e.to_string()))?;
        let field = |key: &str| json.get(key).filter(|v| !v.is_null());
        if field("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
            return Err(bad(&config_path, format!("peft_type {}: prism merges LORA adapters only", json["peft_type"])));
        }
        for key in ["use_dora", "use_rslora", "fan_in_fan_out"] {
            if field(key).and_then(|v| v.as_bool()).unwrap_or(false) {
                return Err(bad(&config_path, format!("{key} = true: prism merges plain LoRA adapters only")));
            }
        }
        if let Some(b) = field("bias").and_then(|v| v.as_str()).filter(|b| *b != "none") {
            return Err(bad(&config_path, format!("bias = {b:?}: prism merges adapters without biases only")));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if field(key).and_then(|v| v.as_object()).is_some_and(|m| !m.is_empty()) {
                return Err(bad(&config_path, format!("{key}: prism merges adapters of one rank and alpha only")));
            }
        }
        let r = field("r").and_then(|v| v.as_u64()).filter(|&r| r > 0).ok_or_else(|| bad(&config_path, format!("r {}: expected a rank >= 1", json["r"])))?;
        let alpha = field("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0);
        let scale = alpha / r as f64;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let tensors = crate::hf::read_safetensors_file(&weights_path)?;
        let ours = self.vs.variables();
        let merged = merge_named(&ours, tensors, scale, Some(r as i64), &weights_path)?;
        for (name, w) in merged {
            tch::no_grad(|| ours[&name].shallow_clone().f_copy_(&w))?;
        }
        Ok(())
    }

    /// The adapters under their PEFT names (`base_model.model.<module>.lora_A.weight`,
    /// `…lora_B.weight`), copied, and their scale `alpha / rank`; `None`
    /// without adapters. With the frozen base, [`merge_named`] makes
    /// [`Self::merged_weights`] of them (a rollout receiving only these).
    pub fn adapter_weights(&self) -> Option<(f64, Vec<(String, Tensor)>)> {
        let lora = self.lora.as_ref()?;
        let mut named: Vec<(String, Tensor)> = lora.vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Some((lora.config.scale(), named))
    }
}

/// The weights `adapters` (PEFT names, every `lora_A` with its `lora_B`)
/// adapt in `weights` (HF names), merged: `(name, W + scale · B A)` in `W`'s
/// dtype and device, the product in float32 (as [`Transformer::merged_weights`]
/// computes it, so the two are equal). `rank`, when known, is every A's row
/// count. `source` (a file, or what sent them) names bad adapters in the
/// errors: a tensor that is not an A with its B, a module `weights` lacks, a
/// wrong shape.
pub fn merge_named(
    weights: &HashMap<String, Tensor>,
    mut adapters: HashMap<String, Tensor>,
    scale: f64,
    rank: Option<i64>,
    source: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| Error::Format { path: source.to_path_buf(), reason };
    let mut merged = Vec::new();
    while let Some(a_name) = adapters.keys().filter(|k| k.ends_with(".lora_A.weight")).min().cloned() {
        let a = adapters.remove(&a_name).expect("present");
        let module = a_name
            .strip_prefix("base_model.model.")
            .and_then(|m| m.strip_suffix(".lora_A.weight"))
            .ok_or_else(|| bad(format!("tensor `{a_name}` is not named base_model.model.<module>.lora_A.weight")))?;
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        let b = adapters.remove(&b_name).ok_or_else(|| Error::MissingTensor { path: source.to_path_buf(), name: b_name.clone() })?;
        let w_name = format!("{module}.weight");
        let w = weights.get(&w_name).ok_or_else(|| bad(format!("`{a_name}` adapts `{w_name}`, which this model does not have")))?;
        if w.dim() != 2 || a.dim() != 2 {
            return Err(bad(format!("`{a_name}` or `{w_name}` is not a matrix")));
        }
        let (out, inp) = (w.size()[0], w.size()[1]);
        let r = rank.unwrap_or(a.size()[0]);
        for (name, t, want) in [(&a_name, &a, [r, inp]), (&b_name, &b, [out, r])] {
            if t.size() != want {
                return Err(Error::WrongShape { path: source.to_path_buf(), name: name.clone(), got: t.size(), want: want.to_vec() });
            }
        }
        let adapter = Adapter { enabled: Arc::new(AtomicBool::new(true)), a: a.to_device(w.device()), b: b.to_device(w.device()), scale, dropout: 0.0 };
        merged.push((w_name, tch::no_grad(|| adapter.merge(w))));
    }
    if let Some(extra) = adapters.keys().min() {
        return Err(bad(format!("tensor `{extra}` is not a LoRA A matrix with its B")));
    }
    if merged.is_empty() {
        return Err(bad("holds no LoRA adapters".into()));
    }
    Ok(merged)
}

/// The adapter's weights file, as PEFT names it.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter's configuration file, as PEFT names it.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

#[cfg(test)]
mod tests;
