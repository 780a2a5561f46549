//! What the learner needs from a model.

use crate::{Error, Result};
use prism_model::{LayerGrads, Tokens};
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor, nn};

/// A trainable causal language model.
///
/// Its parameters live in a `VarStore` whose variable names are the Hugging Face
/// names, so the store written as safetensors (plus `config.json` and the
/// tokenizer, which [`Policy::save_hf`] adds when the model knows them) is a
/// Hugging Face checkpoint.
pub trait Policy {
    /// Logits `[B, T, V]` (float32) for `input_ids` `[B, T]` (int64),
    /// differentiable. `attention_mask` `[B, T]` marks real tokens with 1; `None`
    /// means plain causal attention over positions `0..T`.
    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor>;

    /// The logits at positions `start..start + len` only, `[B, len, V]`
    /// (those a loss reads); a model may skip the output layer elsewhere. The
    /// default narrows [`Policy::forward`].
    fn forward_window(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, start: i64, len: i64) -> Result<Tensor> {
        Ok(self.forward(input_ids, attention_mask)?.f_narrow(1, start, len)?)
    }

    /// The hidden states of positions `start..start + len` that
    /// [`Policy::head`] turns into [`Policy::forward_window`]'s logits, for a
    /// loss that runs the output layer over a few positions at a time
    /// (`learner.logit_chunk`). The default splits nothing off: the logits
    /// themselves, and an identity head.
    fn hidden_window(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, start: i64, len: i64) -> Result<Tensor> {
        self.forward_window(input_ids, attention_mask, start, len)
    }

    /// The hidden states of the positions `tokens` reads: rows' window
    /// ([`Policy::hidden_window`]) or packed sequences' selected positions,
    /// which only a model whose [`Policy::packs`] is true takes.
    fn hidden(&self, tokens: Tokens) -> Result<Tensor> {
        match tokens {
            Tokens::Rows { ids, mask, window } => self.hidden_window(ids, mask, window.0, window.1),
            Tokens::Packed { .. } | Tokens::Shared { .. } => Err(Error::Model("this model takes padded rows only, not packed sequences".into())),
        }
    }

    /// Whether [`Policy::hidden`] takes packed sequences
    /// ([`Tokens::Packed`]): the learner then trains without padding
    /// (`learner.pack`).
    fn packs(&self) -> bool {
        false
    }

    /// The float32 logits `[B, n, V]` of hidden states `[B, n, ..]` from
    /// [`Policy::hidden_window`] (any `n` of its positions). Differentiable.
    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.shallow_clone())
    }

    /// [`Policy::hidden_window`] of rows that all begin with one `prompt`
    /// `[1, P]` and go on with `completions` `[B, C]` (right-padded), at the
    /// window `(P - 1, C)`, with the prompt computed once; `None` where the
    /// model cannot (the learner then runs the padded rows).
    fn hidden_shared_prompt(&self, _prompt: &Tensor, _completions: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The loss `loss_of(hidden)` of `tokens` (`hidden`: their
    /// [`Policy::hidden`], which [`Policy::head`] makes logits), backpropagated into the
    /// parameters' gradients with each decoder layer's activations recomputed
    /// in the backward pass instead of kept (`learner.checkpoint_activations`),
    /// where the model can; returns the loss, detached. The layers' forward
    /// computations run inside `scope` (the autocast span), backward passes
    /// outside it; `loss_of` runs outside it and runs its own forward
    /// computations (the head) in it. With a `sink`, the decoder layers'
    /// gradients go to it layer by layer ([`LayerGrads`]) where the model
    /// can, instead of into `.grad`. The default keeps the activations: a
    /// plain forward and backward, every gradient into `.grad`.
    fn forward_backward_checkpointed(
        &self,
        tokens: Tokens,
        scope: &dyn Fn(&mut dyn FnMut()),
        loss_of: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
        _sink: Option<&mut dyn LayerGrads>,
    ) -> Result<Tensor> {
        let mut hidden = None;
        scope(&mut || hidden = Some(self.hidden(tokens)));
        let hidden = hidden.ok_or_else(|| Error::Model("the scope did not run the forward pass".into()))??;
        let loss = loss_of(&hidden)?;
        loss.f_backward()?;
        Ok(loss.detach())
    }

    /// Whether [`Policy::forward_backward_checkpointed`] hands a sink every
    /// decoder layer's gradients (Hugging Face names: `layers.N.`).
    fn hands_over_layer_grads(&self) -> bool {
        false
    }

    /// The parameters.
    fn var_store(&self) -> &nn::VarStore;

    /// The variables the optimizer trains: [`Policy::var_store`]'s, or LoRA
    /// adapters of their own (`learner.lora`) over a frozen `var_store`.
    fn trainable(&self) -> &nn::VarStore {
        self.var_store()
    }

    /// Whether [`Policy::trainable`] is a store of adapters beside the frozen model.
    fn has_adapters(&self) -> bool {
        !std::ptr::eq(self.trainable(), self.var_store())
    }

    /// Switches [`Policy::trainable`]'s adapters off (the model then computes
    /// as its frozen base) or back on; no-op without adapters.
    fn set_adapters_enabled(&self, _on: bool) {}

    /// The weights rollouts run, under [`Policy::var_store`]'s names,
    /// detached: the parameters, or with adapters merged into them.
    fn published(&self) -> Vec<(String, Tensor)> {
        named_variables(self.var_store()).into_iter().map(|(n, t)| (n, t.detach())).collect()
    }

    /// With adapters: their scale and themselves under their PEFT names,
    /// copied ([`prism_model::lora::merge_named`] over the frozen
    /// [`Policy::var_store`] makes [`Policy::published`] of them); `None`
    /// without.
    fn published_adapters(&self) -> Option<(f64, Vec<(String, Tensor)>)> {
        None
    }

    /// The vocabulary size and the most positions one sequence may have,
    /// where the model knows them: inputs past either are refused before they
    /// reach the model (an embedding lookup past the vocabulary panics).
    fn limits(&self) -> Option<(usize, usize)> {
        None
    }

    /// Writes the model into `dir` as a Hugging Face folder. The default writes
    /// `model.safetensors` only.
    fn save_hf(&self, dir: &Path) -> Result<()> {
        write_safetensors(&named_variables(self.var_store()), &dir.join("model.safetensors"))
    }
}

/// The store's variables sorted by name.
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// A tensor's bytes on the CPU, ready for safetensors.
struct Bytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Bytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => return Err(Error::Batch(format!("cannot write a {other:?} tensor as safetensors"))),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Writes named tensors as a safetensors file with the `format: pt` metadata
/// that transformers checks for.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(tch::Device::Cpu).contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        bytes.push((name.clone(), Bytes { dtype: dtype_of(t.kind())?, shape, data }));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views = bytes.iter().map(|(n, b)| (n.as_str(), b));
    let encoded = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Checkpoint { path: path.to_path_buf(), reason: e.to_string() })?;
    std::fs::write(path, encoded).map_err(|e| Error::io(path, e))
}

/// Reads every tensor of a safetensors file (on the CPU), by name.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let buffer = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    let st = safetensors::SafeTensors::deserialize(&buffer).map_err(|e| bad(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind =
            kind_of(view.dtype()).ok_or_else(|| bad(format!("tensor {name}: unsupported dtype {:?}", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
    Ok(out)
}

/// Copies `tensors` into the variables of `vs` with the same names. Every
/// variable must be present with its shape; no tensor may be left over.
pub fn load_into(vs: &nn::VarStore, mut tensors: HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let bad = |reason: String| Error::Checkpoint { path: path.to_path_buf(), reason };
    let _guard = tch::no_grad_guard();
    for (name, mut var) in named_variables(vs) {
        let src = tensors.remove(&name).ok_or_else(|| bad(format!("tensor {name} is missing")))?;
        if src.size() != var.size() {
            return Err(bad(format!("tensor {name} has shape {:?}, expected {:?}", src.size(), var.size())));
        }
        var.f_copy_(&src)?;
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(bad(format!("tensor {extra} is not a parameter of the model")));
    }
    Ok(())
}

/// The real model. Its `save_hf` writes a complete Hugging Face folder
/// (`config.json`, `generation_config.json`, safetensors and the tokenizer) when
/// the model carries its tokenizer, else the weights and `config.json`.
impl Policy for prism_model::Transformer {
    fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(prism_model::Transformer::forward(self, input_ids, attention_mask))
    }

    fn forward_backward_checkpointed(
        &self,
        tokens: Tokens,
        scope: &dyn Fn(&mut dyn FnMut()),
        loss_of: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
        sink: Option<&mut dyn LayerGrads>,
    ) -> Result<Tensor> {
        prism_model::Transformer::forward_backward_checkpointed(self, tokens, scope, loss_of, sink)
    }

    fn hands_over_layer_grads(&self) -> bool {
        true
    }

    fn hidden(&self, tokens: Tokens) -> Result<Tensor> {
        Ok(prism_model::Transformer::hidden(self, tokens))
    }

    fn packs(&self) -> bool {
        true
    }

    fn forward_window(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, start: i64, len: i64) -> Result<Tensor> {
        Ok(prism_model::Transformer::forward_window(self, input_ids, attention_mask, start, len))
    }

    fn hidden_window(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, start: i64, len: i64) -> Result<Tensor> {
        Ok(prism_model::Transformer::hidden_window(self, input_ids, attention_mask, start, len))
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(prism_model::Transformer::head_logits(self, hidden))
    }

    fn hidden_shared_prompt(&self, prompt: &Tensor, completions: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(prism_model::Transformer::hidden_shared_prompt(self, prompt, completions)))
    }

    fn var_store(&self) -> &nn::VarStore {
        prism_model::Transformer::var_store(self)
    }

    fn trainable(&self) -> &nn::VarStore {
        self.adapter_store().unwrap_or_else(|| prism_model::Transformer::var_store(self))
    }

    fn published(&self) -> Vec<(String, Tensor)> {
        self.merged_weights()
    }

    fn published_adapters(&self) -> Option<(f64, Vec<(String, Tensor)>)> {
        self.adapter_weights()
    }

    fn set_adapters_enabled(&self, on: bool) {
        prism_model::Transformer::set_adapters_enabled(self, on)
    }

    fn limits(&self) -> Option<(usize, usize)> {
        let c = self.config();
        Some((c.vocab_size, c.max_position_embeddings))
    }

    /// The model; with adapters, the frozen base and the adapter in PEFT's
    /// layout beside it (`adapter_config.json`, `adapter_model.safetensors`).
    fn save_hf(&self, dir: &Path) -> Result<()> {
        self.save_adapter(dir).map_err(|e| Error::Model(e.to_string()))?;
        match self.tokenizer() {
            Some(tokenizer) => {
                prism_model::Transformer::save_hf(self, dir, tokenizer).map_err(|e| Error::Model(e.to_string()))
            }
            None => {
                write_safetensors(&named_variables(self.var_store()), &dir.join("model.safetensors"))?;
                let path = dir.join("config.json");
                let json = serde_json::to_vec_pretty(&self.config().to_hf_json())
                    .map_err(|e| Error::Checkpoint { path: path.clone(), reason: e.to_string() })?;
                std::fs::write(&path, json).map_err(|e| Error::io(&path, e))
            }
        }
    }
}
