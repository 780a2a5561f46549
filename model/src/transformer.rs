//! The decoder-only transformer of the Llama / Mistral / Qwen2 / Qwen3 /
//! SmolLM / Gemma 2 / Gemma 3 family: RMSNorm, RoPE (with linear or Llama 3
//! scaling), grouped-query attention, SwiGLU MLP, optional q/k/v bias,
//! optional RMSNorm of each query and key head (Qwen3, Gemma 3), tied or
//! untied embeddings, sliding-window layers (Mistral, Gemma); and Gemma's
//! changes to the layer (see [`crate::config::Gemma`]).
//!
//! Parameters live in a [`VarStore`] under exactly the Hugging Face names, so the
//! store saved as safetensors is an HF checkpoint and weight sync is a copy of
//! named tensors. Two paths share the layers: [`Transformer::forward`] (full
//! sequence, differentiable) and [`Transformer::forward_cached`] (incremental,
//! with a pre-allocated [`KvCache`]) used by the engine.

use crate::config::{ModelConfig, RopeScaling};
use crate::lora::{Adapter, Lora};
use crate::{Dtype, Error, Result, Tokenizer};
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

/// q, k and v (and gate and up) are rows of one fused matrix: the HF-named
/// parameters are views of it, so training and weight loads, which write the
/// views in place, keep it current, while decoding runs one matrix product
/// where it would run three (or two).
struct Attention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// `[q_dim + 2 kv_dim, d]`, the storage of `q`, `k` and `v`.
    qkv: Tensor,
    o: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    qkv_bias: Option<Tensor>,
    o_bias: Option<Tensor>,
    /// Qwen3's per-head RMSNorm weights `[head_dim]` of queries and keys.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
}

struct Mlp {
    gate: Tensor,
    up: Tensor,
    /// `[2 f, d]`, the storage of `gate` and `up`.
    gate_up: Tensor,
    down: Tensor,
    biases: Option<[Tensor; 3]>,
    gate_up_bias: Option<Tensor>,
}

pub(crate) struct Layer {
    input_norm: Tensor,
    attn: Attention,
    /// `post_attention_layernorm`: the MLP's input norm, or Gemma's norm of
    /// the attention's output.
    post_norm: Tensor,
    /// Gemma's norms before and after the MLP.
    ff_norms: Option<[Tensor; 2]>,
    mlp: Mlp,
    /// Attends within the sliding window only.
    sliding: bool,
    /// LoRA adapters of the projections, in [`crate::lora::TARGETS`] order.
    pub(crate) lora: [Option<Adapter>; 7],
}

/// The model. Owns its [`VarStore`].
pub struct Transformer {
    pub(crate) vs: VarStore,
    config: ModelConfig,
    embed: Tensor,
    pub(crate) layers: Vec<Layer>,
    norm: Tensor,
    /// `lm_head.weight`, or the embedding when tied.
    lm_head: Tensor,
    /// cos/sin tables `[max_position_embeddings, head_dim]`, float32; the
    /// first half of `sin` negated (see [`apply_rope`]).
    cos: Tensor,
    sin: Tensor,
    /// The sliding layers' own tables (Gemma 3's local RoPE base).
    local_rope: Option<(Tensor, Tensor)>,
    tokenizer: Option<Tokenizer>,
    /// LoRA adapters over the frozen parameters, once attached.
    pub(crate) lora: Option<Lora>,
}

/// The RoPE tables at a call's positions, `[B, 1, T, head_dim]` in the
/// weights' type: every layer's, and the sliding layers' own where they differ.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    local: Option<(Tensor, Tensor)>,
}

impl Rope {
    fn of(&self, layer: &Layer) -> (&Tensor, &Tensor) {
        match (&self.local, layer.sliding) {
            (Some((cos, sin)), true) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }
}

/// Where [`Transformer::forward_backward_checkpointed`] hands each decoder
/// layer's parameter gradients, in place of their `.grad`.
pub trait LayerGrads {
    /// The tensors of decoder layer `layer` whose gradients it takes (each
    /// requires a gradient); empty for none.
    fn params(&self, layer: usize) -> Vec<Tensor>;
    /// Layer `layer`'s gradients, in the order of [`LayerGrads::params`]
    /// (undefined where a tensor got none this pass).
    fn take(&mut self, layer: usize, grads: Vec<Tensor>);
}

/// The tokens of a training pass and the positions whose hidden states it
/// reads.
#[derive(Clone, Copy)]
pub enum Tokens<'a> {
    /// Rows `[B, T]` (int64); `mask` `[B, T]` marks real tokens with 1
    /// (`None`: plain causal attention); the positions `window.0..window.0 +
    /// window.1` of every row, `[B, len, d]`.
    Rows { ids: &'a Tensor, mask: Option<&'a Tensor>, window: (i64, i64) },
    /// Sequences of lengths `lens` end to end in one row `ids` `[1, N]`
    /// (int64, `N` their sum), without padding: each has its own positions
    /// (from 0) and attends within itself alone. The positions `select` `[M]`
    /// (int64, indices into the `N`), `[1, M, d]`.
    Packed { ids: &'a Tensor, lens: &'a [i64], select: &'a Tensor },
    /// Completions of one prompt end to end after it, in one row `ids`
    /// `[1, N]`: the prompt's `prompt` tokens, then completions of lengths
    /// `lens`, without padding. Each completion continues the prompt (its
    /// positions from `prompt` on) and attends to the prompt and to itself,
    /// not to the other completions; the prompt runs once. The positions
    /// `select` `[M]`, `[1, M, d]`.
    Shared { ids: &'a Tensor, prompt: i64, lens: &'a [i64], select: &'a Tensor },
}

/// The masks of one call: the full layers', and the sliding layers'.
struct Masks {
    full: Mask,
    sliding: Mask,
}

impl Masks {
    fn of(&self, layer: &Layer) -> &Mask {
        if layer.sliding { &self.sliding } else { &self.full }
    }
}

fn var(p: &tch::nn::Path, name: &str, dims: &[i64], init: Init) -> Tensor {
    p.var(name, dims, init)
}

/// A zero tensor of `rows.sum()` rows (times `cols`, when given) in the store's
/// dtype and device, whose consecutive row blocks become the trainable
/// parameters `paths[i]/name`. Returns the whole tensor and the views.
fn fused(paths: &[&tch::nn::Path], name: &str, rows: &[i64], cols: Option<i64>) -> (Tensor, Vec<Tensor>) {
    let p = paths[0];
    let total: i64 = rows.iter().sum();
    let dims: Vec<i64> = std::iter::once(total).chain(cols).collect();
    let whole = Tensor::zeros(dims.as_slice(), (p.kind(), p.device()));
    let mut start = 0;
    let views = paths
        .iter()
        .zip(rows)
        .map(|(path, &n)| {
            let view = path.add(name, whole.narrow(0, start, n), true);
            start += n;
            view
        })
        .collect();
    (whole, views)
}

impl Layer {
    fn new(p: &tch::nn::Path, c: &ModelConfig, index: usize) -> Self {
        let (d, f) = (c.hidden_size as i64, c.intermediate_size as i64);
        // Gemma stores norm weights as offsets from 1.
        let unit = Init::Const(if c.gemma.is_some() { 0.0 } else { 1.0 });
        let q_dim = (c.num_heads * c.head_dim) as i64;
        let kv_dim = (c.num_kv_heads * c.head_dim) as i64;
        let zero = Init::Const(0.0);
        let a = p / "self_attn";
        let (qp, kp, vp) = (&a / "q_proj", &a / "k_proj", &a / "v_proj");
        let qkv_rows = [q_dim, kv_dim, kv_dim];
        let (qkv, w) = fused(&[&qp, &kp, &vp], "weight", &qkv_rows, Some(d));
        let [q, k, v] = <[Tensor; 3]>::try_from(w).expect("three views");
        let (qkv_bias, [q_bias, k_bias, v_bias]) = if c.qkv_bias {
            let (whole, b) = fused(&[&qp, &kp, &vp], "bias", &qkv_rows, None);
            let [qb, kb, vb] = <[Tensor; 3]>::try_from(b).expect("three views");
            (Some(whole), [Some(qb), Some(kb), Some(vb)])
        } else {
            (None, [None, None, None])
        };
        let attn = Attention {
            q,
            k,
            v,
            qkv,
            o: var(&(&a / "o_proj"), "weight", &[d, q_dim], zero),
            q_bias,
            k_bias,
            v_bias,
            qkv_bias,
            o_bias: c.o_bias.then(|| var(&(&a / "o_proj"), "bias", &[d], zero)),
            q_norm: c.qk_norm.then(|| var(&(&a / "q_norm"), "weight", &[c.head_dim as i64], unit)),
            k_norm: c.qk_norm.then(|| var(&(&a / "k_norm"), "weight", &[c.head_dim as i64], unit)),
        };
        let m = p / "mlp";
        let (gp, upp) = (&m / "gate_proj", &m / "up_proj");
        let (gate_up, w) = fused(&[&gp, &upp], "weight", &[f, f], Some(d));
        let [gate, up] = <[Tensor; 2]>::try_from(w).expect("two views");
        let (gate_up_bias, biases) = if c.mlp_bias {
            let (whole, b) = fused(&[&gp, &upp], "bias", &[f, f], None);
            let [gb, ub] = <[Tensor; 2]>::try_from(b).expect("two views");
            (Some(whole), Some([gb, ub, var(&(&m / "down_proj"), "bias", &[d], zero)]))
        } else {
            (None, None)
        };
        let mlp = Mlp { gate, up, gate_up, down: var(&(&m / "down_proj"), "weight", &[d, f], zero), biases, gate_up_bias };
        Layer {
            input_norm: var(&(p / "input_layernorm"), "weight", &[d], unit),
            attn,
            post_norm: var(&(p / "post_attention_layernorm"), "weight", &[d], unit),
            ff_norms: c.gemma.is_some().then(|| {
                [var(&(p / "pre_feedforward_layernorm"), "weight", &[d], unit), var(&(p / "post_feedforward_layernorm"), "weight", &[d], unit)]
            }),
            mlp,
            sliding: c.sliding_window.is_some() && c.gemma.as_ref().is_none_or(|g| g.sliding_layers.get(index).copied().unwrap_or(false)),
            lora: std::array::from_fn(|_| None),
        }
    }

    /// The weight of projection `target` ([`crate::lora::TARGETS`] order).
    pub(crate) fn projection(&self, target: usize) -> Tensor {
        let (a, m) = (&self.attn, &self.mlp);
        [&a.q, &a.k, &a.v, &a.o, &m.gate, &m.up, &m.down][target].shallow_clone()
    }
}

/// RMSNorm as transformers computes it: in float32, then cast back before the weight.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    if kind == Kind::Float {
        let var = x.square().mean_dim(-1, true, Kind::Float);
        return weight * (x * (var + eps).rsqrt());
    }
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    weight * (xf * (var + eps).rsqrt()).to_kind(kind)
}

/// The model's RMSNorm: [`rms_norm`], or Gemma's (`x̂ · (1 + w)`, in
/// float32, cast back after the weight).
fn norm(x: &Tensor, weight: &Tensor, c: &ModelConfig) -> Tensor {
    if c.gemma.is_none() {
        return rms_norm(x, weight, c.rms_norm_eps);
    }
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    ((xf * (var + c.rms_norm_eps).rsqrt()) * (weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
}

/// Attention with Gemma 2's soft-capped scores, `cap · tanh(q·k · scale /
/// cap)`, before the mask, as transformers' eager attention computes it
/// (scaled dot-product attention has no soft cap): `[B, h, T, hd]`.
fn softcapped_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64, cap: f64) -> Tensor {
    let (h, hkv) = (q.size()[1], k.size()[1]);
    let (k, v) = if h != hkv {
        // Query head i reads key/value head i / (h / hkv), as repeat_kv pairs them.
        (k.repeat_interleave_self_int(h / hkv, 1, None), v.repeat_interleave_self_int(h / hkv, 1, None))
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let scores = q.matmul(&k.transpose(2, 3)) * scale;
    let scores = (scores / cap).tanh() * cap;
    let (t, s) = (q.size()[2], k.size()[2]);
    let allowed = match mask {
        Mask::Causal => Some(Tensor::ones([t, s], (Kind::Bool, q.device())).tril(s - t)),
        Mask::Explicit(m) => Some(m.shallow_clone()),
        Mask::None => None,
        Mask::Segments(_) => unreachable!("segments are split before attention"),
    };
    let scores = match allowed {
        Some(m) => scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
        None => scores,
    };
    scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
}

/// `x * cos + rotate_half(x) * sin`, the rotate-half RoPE convention of HF Llama,
/// where `rotate_half(x) = cat(-x2, x1)` for the halves x1, x2 of the head
/// dimension. With the sign folded into the table (`signed_sin = cat(-sin1,
/// sin2)`) it is `x * cos + roll(x, half) * signed_sin`: the same products
/// (negation is exact), in three operations instead of six.
fn apply_rope(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    (x * cos).addcmul(&x.roll([half], [3]), signed_sin)
}

fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    x.linear(w, b)
}

/// [`linear`], plus the LoRA adapter's output where the projection has one.
fn adapted(x: &Tensor, w: &Tensor, b: Option<&Tensor>, adapter: &Option<Adapter>) -> Tensor {
    match adapter {
        Some(adapter) if adapter.enabled() => linear(x, w, b) + adapter.apply(x),
        _ => linear(x, w, b),
    }
}

/// `res + y · wᵀ + b` over the last dimension of `y` (`res`, when given,
/// shaped like the result) in a decode step: the small-batch kernel where it
/// applies (see `cpu_kernels`), torch's product otherwise; with `res`, the sum
/// is the product's accumulator, saving a pass and an operation.
fn decode_product(y: &Tensor, w: &Tensor, b: Option<&Tensor>, res: Option<&Tensor>) -> Tensor {
    let mut size = y.size();
    let (k, n) = (size[size.len() - 1], w.size()[0]);
    let rows = y.reshape([-1, k]);
    let res = res.map(|r| r.reshape([-1, n]));
    let with_bias = |t: Tensor| match b {
        Some(b) => t + b,
        None => t,
    };
    let out = match (crate::cpu_kernels::linear(&rows, w, res.as_ref()), &res) {
        (Some(out), _) => with_bias(out),
        (None, Some(r)) => with_bias(r.addmm(&rows, &w.tr())),
        (None, None) => rows.linear(w, b),
    };
    *size.last_mut().expect("y has dimensions") = n;
    out.view(size.as_slice())
}

/// `x + adapted(y, w, b, adapter)`; with `fused` (decoding, no adapters), by [`decode_product`].
fn residual(x: &Tensor, y: &Tensor, w: &Tensor, b: Option<&Tensor>, adapter: &Option<Adapter>, fused: bool) -> Tensor {
    if fused { decode_product(y, w, b, Some(x)) } else { x + adapted(y, w, b, adapter) }
}

/// How the attention of one call is masked.
enum Mask {
    /// Plain causal attention over the call's own tokens (no cache, no padding).
    Causal,
    /// An explicit boolean mask `[B, 1, T, S]`, true = may attend.
    Explicit(Tensor),
    /// No mask: every query sees every key (one decode step, no padding).
    None,
    /// Sequences packed end to end (no padding): each segment of the call's
    /// positions, in order, attends within itself alone, by its own mask
    /// (`Causal`, or `Explicit` `[1, 1, L, L]` for a sliding window shorter
    /// than the segment).
    Segments(Vec<(i64, Mask)>),
}

impl Layer {
    /// One layer over `x` `[B, T, d]`. `cache` (keys, values, filled length)
    /// makes it incremental and selects the decoding path: the fused q/k/v and
    /// gate/up matrices (not differentiable into the HF-named parameters, which
    /// is why the full-sequence training path keeps them apart), and for a
    /// single new token attention with the query heads grouped by the key/value
    /// head they share, so no key or value is repeated.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        c: &ModelConfig,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Mask,
        cache: Option<(&mut Tensor, &mut Tensor, i64)>,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (h, hkv, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let a = &self.attn;
        let xn = norm(x, &self.input_norm, c);
        let decoding = cache.is_some();
        // Decoding runs the fused matrices, unless adapters ride on the
        // projections (a LoRA model decoding itself, e.g. to evaluate) or
        // autograd records (completions trained over a shared prompt's keys,
        // [`Transformer::hidden_shared_prompt`]): the fused matrices pass no
        // gradient to the HF-named parameters.
        let fused = decoding && self.lora.iter().all(Option::is_none) && !crate::cpu_kernels::grad_enabled();
        let ad = &self.lora;
        let (q, k, v) = if fused {
            let qkv = decode_product(&xn, &a.qkv, a.qkv_bias.as_ref(), None); // [B, T, (h + 2 hkv) hd]
            // q and k rotate together: one RoPE call over h + hkv heads.
            let qk = qkv.narrow(2, 0, (h + hkv) * hd).reshape([b, t, h + hkv, hd]).transpose(1, 2);
            let qk = match (&a.q_norm, &a.k_norm) {
                (Some(qn), Some(kn)) => {
                    // One norm over h + hkv heads, each with its weights: `[h + hkv, 1, hd]`.
                    let w = Tensor::cat(&[qn.expand([h, hd], false), kn.expand([hkv, hd], false)], 0).unsqueeze(1);
                    norm(&qk, &w, c)
                }
                _ => qk,
            };
            let qk = apply_rope(&qk, cos, sin);
            let v = qkv.narrow(2, (h + hkv) * hd, hkv * hd).reshape([b, t, hkv, hd]).transpose(1, 2);
            (qk.narrow(1, 0, h), qk.narrow(1, h, hkv), v)
        } else {
            let q = adapted(&xn, &a.q, a.q_bias.as_ref(), &ad[0]).view([b, t, h, hd]).transpose(1, 2);
            let k = adapted(&xn, &a.k, a.k_bias.as_ref(), &ad[1]).view([b, t, hkv, hd]).transpose(1, 2);
            let v = adapted(&xn, &a.v, a.v_bias.as_ref(), &ad[2]).view([b, t, hkv, hd]).transpose(1, 2);
            let (q, k) = match (&a.q_norm, &a.k_norm) {
                (Some(qn), Some(kn)) => (norm(&q, qn, c), norm(&k, kn, c)),
                _ => (q, k),
            };
            (apply_rope(&q, cos, sin), apply_rope(&k, cos, sin), v)
        };
        let (k, v) = match cache {
            Some((kc, vc, len)) => {
                kc.narrow(2, len, t).copy_(&k);
                vc.narrow(2, len, t).copy_(&v);
                (kc.narrow(2, 0, len + t), vc.narrow(2, 0, len + t))
            }
            None => (k, v),
        };
        let gqa = hkv != h;
        let scale = c.gemma.as_ref().map(|g| g.query_pre_attn_scalar.powf(-0.5));
        let cap = c.gemma.as_ref().and_then(|g| g.attn_logit_softcapping);
        // Attention of queries over keys under one mask, `[B, h, T, hd]`.
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask| match (cap, mask) {
            (Some(cap), _) => softcapped_attention(q, k, v, mask, scale.unwrap_or((hd as f64).powf(-0.5)), cap),
            (None, Mask::Causal) => Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, true, scale, gqa),
            (None, Mask::Explicit(m)) => Tensor::scaled_dot_product_attention(q, k, v, Some(m), 0.0, false, scale, gqa),
            (None, Mask::None) => Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, false, scale, gqa),
            (None, Mask::Segments(_)) => unreachable!("segments are split before attention"),
        };
        let y = if let Mask::Segments(segments) = mask {
            // Packed sequences: each attends within itself, none across.
            let lens: Vec<i64> = segments.iter().map(|(len, _)| *len).collect();
            let (qs, ks, vs) = (q.split_with_sizes(&lens, 2), k.split_with_sizes(&lens, 2), v.split_with_sizes(&lens, 2));
            let parts: Vec<Tensor> = segments.iter().enumerate().map(|(i, (_, m))| attend(&qs[i], &ks[i], &vs[i], m)).collect();
            Tensor::cat(&parts, 2).transpose(1, 2).reshape([b, t, h * hd])
        } else if cap.is_some() {
            attend(&q, &k, &v, mask).transpose(1, 2).reshape([b, t, h * hd])
        } else if decoding && t == 1 && !matches!(mask, Mask::Causal) {
            // [B, hkv, h / hkv, hd]: query head i reads key/value head i / (h / hkv),
            // as transformers' repeat_kv pairs them; the mask [B, 1, 1, S] broadcasts.
            let q = q.reshape([b, hkv, h / hkv, hd]);
            let m = match mask {
                Mask::Explicit(m) => Some(m),
                _ => None,
            };
            Tensor::scaled_dot_product_attention(&q, &k, &v, m, 0.0, false, scale, false).reshape([b, 1, h * hd])
        } else {
            attend(&q, &k, &v, mask).transpose(1, 2).reshape([b, t, h * hd])
        };
        let m = &self.mlp;
        let f = m.down.size()[1];
        let bias = |i: usize| m.biases.as_ref().map(|bs| &bs[i]);
        // SwiGLU, or Gemma's GeGLU (tanh-approximated GELU).
        let act = |g: Tensor| if c.gemma.is_some() { g.gelu("tanh") } else { g.silu() };
        let mlp = |xn: &Tensor| {
            if fused {
                let gu = decode_product(xn, &m.gate_up, m.gate_up_bias.as_ref(), None);
                act(gu.narrow(2, 0, f)) * gu.narrow(2, f, f)
            } else {
                act(adapted(xn, &m.gate, bias(0), &ad[4])) * adapted(xn, &m.up, bias(1), &ad[5])
            }
        };
        if let Some([pre_ff, post_ff]) = &self.ff_norms {
            // Gemma: each block's output normalised before it joins the residual stream.
            let project = |y: &Tensor, w: &Tensor, b: Option<&Tensor>, adapter: &Option<Adapter>| {
                if fused { decode_product(y, w, b, None) } else { adapted(y, w, b, adapter) }
            };
            let x = x + norm(&project(&y, &a.o, a.o_bias.as_ref(), &ad[3]), &self.post_norm, c);
            let hidden = mlp(&norm(&x, pre_ff, c));
            return &x + norm(&project(&hidden, &m.down, bias(2), &ad[6]), post_ff, c);
        }
        let x = residual(x, &y, &a.o, a.o_bias.as_ref(), &ad[3], fused);
        let xn = norm(&x, &self.post_norm, c);
        residual(&x, &mlp(&xn), &m.down, bias(2), &ad[6], fused)
    }
}

/// Keys and values of every layer for a batch of sequences, pre-allocated to
/// `capacity` positions so that a decode step writes in place.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// `[B, capacity]` bool: which cached positions hold real tokens.
    key_mask: Tensor,
    /// `[B]` int64: the position id the next real token of each row gets.
    next_pos: Tensor,
    /// True while no row has padding, so decode steps need no mask.
    dense: bool,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// Number of positions filled.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True before the first call.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of positions it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Batch size.
    pub fn batch(&self) -> usize {
        self.key_mask.size()[0] as usize
    }

    /// Keeps (and repeats) the rows `index` (int64 on any device), e.g.
    /// `[0,0,0,1,1,1]` to give each of two prefilled prompts three samples, or
    /// the rows still generating to shrink the batch.
    pub fn select_rows(&mut self, index: &[i64]) {
        let device = self.key_mask.device();
        let idx = Tensor::from_slice(index).to_device(device);
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.index_select(0, &idx);
        }
        self.key_mask = self.key_mask.index_select(0, &idx);
        self.next_pos = self.next_pos.index_select(0, &idx);
    }

    /// Appends `other`'s rows after this cache's (continuous batching: rows
    /// prefilled apart join rows already decoding). Both are right-aligned
    /// on the filled length, the shorter side's rows padded on the left
    /// (masked keys, as a left-padded prefill leaves them); columns that no
    /// row of a cache holds a real key in are dropped first. The result holds
    /// `room` more positions after the filled ones.
    pub fn append(&mut self, other: &KvCache, room: usize) {
        // The first column any row holds a real key in (the filled length when none does).
        let first = |c: &KvCache| -> i64 {
            let any = c.key_mask.narrow(1, 0, c.len).any_dim(0, false).to_device(Device::Cpu);
            Vec::<bool>::try_from(&any).ok().and_then(|v| v.iter().position(|&b| b)).map_or(c.len, |i| i as i64)
        };
        let (s1, s2) = (first(self), first(other));
        let (l1, l2) = (self.len - s1, other.len - s2);
        let len = l1.max(l2);
        let capacity = len + room as i64;
        let (b1, b2) = (self.batch() as i64, other.batch() as i64);
        // `mine` and `theirs` `[B, .., capacity, ..]` side by side along the rows,
        // each right-aligned at `len` along dimension `dim`.
        let join = |mine: &Tensor, theirs: &Tensor, dim: i64| {
            let mut size = mine.size();
            size[0] = b1 + b2;
            size[dim as usize] = capacity;
            let out = Tensor::zeros(size.as_slice(), (mine.kind(), mine.device()));
            out.narrow(0, 0, b1).narrow(dim, len - l1, l1).copy_(&mine.narrow(dim, s1, l1));
            out.narrow(0, b1, b2).narrow(dim, len - l2, l2).copy_(&theirs.narrow(dim, s2, l2));
            out
        };
        for (mine, theirs) in self.keys.iter_mut().zip(&other.keys).chain(self.values.iter_mut().zip(&other.values)) {
            *mine = join(mine, theirs, 2);
        }
        self.key_mask = join(&self.key_mask, &other.key_mask, 1);
        self.next_pos = Tensor::cat(&[&self.next_pos, &other.next_pos], 0);
        self.dense = self.dense && other.dense && l1 == l2 && s1 == 0 && s2 == 0;
        self.len = len;
        self.capacity = capacity;
    }
}

impl Transformer {
    /// A randomly initialised model (normal(0, 0.02) weights, unit norms) on
    /// `device` in `dtype`, drawn from `seed` independently of the device.
    pub fn new(config: ModelConfig, device: Device, dtype: Dtype, seed: u64) -> Result<Self> {
        let t = Self::empty(config, device, dtype)?;
        t.init_random(seed)?;
        Ok(t)
    }

    fn build(vs: &VarStore, config: ModelConfig) -> Result<Self> {
        let c = &config;
        if c.head_dim % 2 != 0 {
            return Err(Error::invalid("model config", format!("head_dim {} must be even for RoPE", c.head_dim)));
        }
        let root = vs.root();
        let model = &root / "model";
        let (v, d) = (c.vocab_size as i64, c.hidden_size as i64);
        let embed = var(&(&model / "embed_tokens"), "weight", &[v, d], Init::Const(0.0));
        let layers = (0..c.num_layers).map(|i| Layer::new(&(&model / "layers" / i), c, i)).collect();
        let norm = var(&(&model / "norm"), "weight", &[d], Init::Const(if c.gemma.is_some() { 0.0 } else { 1.0 }));
        let lm_head = if c.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            var(&(&root / "lm_head"), "weight", &[v, d], Init::Const(0.0))
        };
        let (cos, sin) = rope_tables(c, c.rope_theta, c.rope_scaling, vs.device());
        let local_rope = c.gemma.as_ref().and_then(|g| g.local_rope_theta).map(|theta| rope_tables(c, theta, RopeScaling::None, vs.device()));
        Ok(Self {
            vs: VarStore::new(vs.device()),
            config,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            local_rope,
            tokenizer: None,
            lora: None,
        })
    }

    /// Fills every parameter from `seed`: normal(0, 0.02) for matrices, ones for
    /// norms, zeros for biases. Generated on the CPU with ChaCha so the same seed
    /// gives the same model on every device.
    fn init_random(&self, seed: u64) -> Result<()> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut named: Vec<(String, Tensor)> = self.vs_variables();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| {
            for (name, mut t) in named {
                let n = t.numel();
                let values: Vec<f32> = if name.ends_with("norm.weight") {
                    // Gemma's norm weights are offsets from 1.
                    vec![if self.config.gemma.is_some() { 0.0 } else { 1.0 }; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    (0..n)
                        .map(|_| {
                            // Box-Muller from two uniforms in (0, 1].
                            let u1: f64 = 1.0 - rng.random::<f64>();
                            let u2: f64 = rng.random::<f64>();
                            (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                        })
                        .collect()
                };
                let src = Tensor::from_slice(&values).view(t.size().as_slice());
                t.f_copy_(&src)?;
            }
            Ok(())
        })
    }

    fn vs_variables(&self) -> Vec<(String, Tensor)> {
        self.vs.variables().into_iter().collect()
    }

    /// A model with zero weights, to be filled by a loader through
    /// [`Transformer::set_parameter`].
    pub(crate) fn empty(config: ModelConfig, device: Device, dtype: Dtype) -> Result<Self> {
        let mut vs = VarStore::new(device);
        // Before any variable exists: the fused q/k/v and gate/up storages are
        // made in this dtype, and must never be converted afterwards (a
        // conversion would give each view storage of its own).
        vs.set_kind(dtype.kind());
        let mut t = tch::no_grad(|| Self::build(&vs, config))?;
        t.vs = vs;
        Ok(t)
    }

    /// The HF names of every parameter, sorted.
    pub fn parameter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.vs.variables().into_keys().collect();
        names.sort();
        names
    }

    /// Copies `value` into parameter `name` (casting dtype, moving device).
    /// `origin` names the file in errors.
    pub(crate) fn set_parameter(&self, name: &str, value: &Tensor, origin: &std::path::Path) -> Result<()> {
        let mut var = self.vs.variables().remove(name).ok_or_else(|| Error::invalid("parameter", name))?;
        if var.size() != value.size() {
            return Err(Error::WrongShape { path: origin.into(), name: name.into(), got: value.size(), want: var.size() });
        }
        tch::no_grad(|| var.f_copy_(value))?;
        Ok(())
    }

    /// The runtime configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parameters, under Hugging Face names.
    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    /// The device the parameters live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The tokenizer loaded with the model, used by the engine to decode text.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }

    /// Attaches the tokenizer the engine decodes with.
    pub fn set_tokenizer(&mut self, tokenizer: Tokenizer) {
        self.tokenizer = Some(tokenizer);
    }

    /// Copies every parameter of `other` (same architecture) into this model,
    /// casting dtype and moving device as needed.
    pub fn copy_weights_from(&mut self, other: &Transformer) -> Result<()> {
        self.load_named(other.vs.variables())
    }

    /// Copies named parameters (Hugging Face names, e.g. published by a learner)
    /// into this model, casting dtype and moving device as needed. Every
    /// parameter of this model must be given, with its shape. The values are
    /// copied in place, so this may run between the decode steps of a
    /// generation (in-flight weight updates, [`crate::engine::Refresh`]).
    pub fn load_named(&self, theirs: impl IntoIterator<Item = (String, Tensor)>) -> Result<()> {
        let theirs: std::collections::HashMap<String, Tensor> = theirs.into_iter().collect();
        let ours = self.vs.variables();
        if theirs.len() != ours.len() {
            return Err(Error::invalid(
                "weights",
                format!("source has {} parameters, this model {}", theirs.len(), ours.len()),
            ));
        }
        tch::no_grad(|| {
            for (name, mut dst) in ours {
                let src = theirs.get(&name).ok_or_else(|| Error::invalid("weights", format!("source lacks `{name}`")))?;
                if src.size() != dst.size() {
                    return Err(Error::invalid(
                        "weights",
                        format!("`{name}` has shape {:?} in the source, {:?} here", src.size(), dst.size()),
                    ));
                }
                dst.f_copy_(src)?;
            }
            Ok(())
        })
    }

    fn embed_and_rope(&self, input_ids: &Tensor, positions: &Tensor) -> (Tensor, Rope) {
        let x = Tensor::embedding(&self.embed, input_ids, -1, false, false);
        let kind = x.kind();
        // Gemma scales the embeddings by sqrt(hidden_size), rounded to their type.
        let x = if self.config.gemma.is_some() {
            let scale = Tensor::from((self.config.hidden_size as f64).sqrt() as f32).to_kind(kind).to_device(x.device());
            x * scale
        } else {
            x
        };
        // [B, 1, T, head_dim], broadcast over heads.
        let at = |table: &Tensor| {
            table.index_select(0, &positions.flatten(0, -1)).view([positions.size()[0], 1, positions.size()[1], -1]).to_kind(kind)
        };
        let local = self.local_rope.as_ref().map(|(cos, sin)| (at(cos), at(sin)));
        (x, Rope { cos: at(&self.cos), sin: at(&self.sin), local })
    }

    fn head(&self, x: &Tensor, decoding: bool) -> Tensor {
        let x = norm(x, &self.norm, &self.config);
        let logits = if decoding { decode_product(&x, &self.lm_head, None, None) } else { x.linear(&self.lm_head, None::<&Tensor>) };
        let logits = logits.to_kind(Kind::Float);
        match self.config.gemma.as_ref().and_then(|g| g.final_logit_softcapping) {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// Logits `[B, T, V]` (float32 whatever the weights' dtype) for `input_ids`
    /// `[B, T]` (int64). `attention_mask` `[B, T]` marks real tokens with 1;
    /// padding may be on either side. Differentiable.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        let t = input_ids.size()[1];
        self.forward_window(input_ids, attention_mask, 0, t)
    }

    /// [`Self::forward`]'s logits at positions `start..start + len` only,
    /// `[B, len, V]`: the output layer (a vocabulary-wide product per
    /// position) runs on those positions alone, e.g. a trainer's completion
    /// tokens. Differentiable.
    pub fn forward_window(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, start: i64, len: i64) -> Tensor {
        self.head(&self.hidden_window(input_ids, attention_mask, start, len), false)
    }

    /// The last layer's output at positions `start..start + len`, `[B, len,
    /// d]`, which [`Self::head_logits`] turns into [`Self::forward_window`]'s
    /// logits (a loss may run the head over a few positions at a time).
    /// Differentiable.
    pub fn hidden_window(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>, start: i64, len: i64) -> Tensor {
        self.hidden(Tokens::Rows { ids: input_ids, mask: attention_mask, window: (start, len) })
    }

    /// The last layer's output at the positions `tokens` reads (see
    /// [`Tokens`]), which [`Self::head_logits`] makes logits. Differentiable.
    pub fn hidden(&self, tokens: Tokens) -> Tensor {
        let (mut x, rope, masks) = self.prepare_tokens(tokens);
        for layer in &self.layers {
            let (cos, sin) = rope.of(layer);
            x = layer.forward(&x, &self.config, cos, sin, masks.of(layer), None);
        }
        pick(&x, tokens)
    }

    /// The hidden states of completions `[B, C]` (int64, right-padded) that
    /// all continue one `prompt` `[1, P]`, at the positions whose logits
    /// predict the completion tokens (`P - 1 .. P + C - 1`, `[B, C, d]`):
    /// what [`Self::hidden_window`] gives for the padded rows `prompt +
    /// completion` and the window `(P - 1, C)`, with the prompt computed once
    /// instead of once a row (a GRPO group's samples share their prompt).
    /// Each layer runs the prompt, then the completions attending to the
    /// prompt's keys and values and their own. Differentiable.
    pub fn hidden_shared_prompt(&self, prompt: &Tensor, completions: &Tensor) -> Tensor {
        let c = &self.config;
        let device = self.device();
        let (p, (b, t)) = (prompt.size()[1], (completions.size()[0], completions.size()[1]));
        let (hkv, hd) = (c.num_kv_heads as i64, c.head_dim as i64);
        let (mut xp, rope_p, masks_p) = self.prepare(prompt, None);
        let positions = (Tensor::arange(t, (Kind::Int64, device)) + p).unsqueeze(0).expand([b, t], false);
        let (mut xc, rope_c) = self.embed_and_rope(&completions.to_device(device), &positions);
        let mask = |window: Option<usize>| Mask::Explicit(causal(t, p, window, device).unsqueeze(0).unsqueeze(0));
        let masks_c = Masks { full: mask(None), sliding: mask(c.sliding_window) };
        let kind = xp.kind();
        for layer in &self.layers {
            // The prompt's keys and values, written by its pass (autograd records the writes).
            let (mut kp, mut vp) = (Tensor::zeros([1, hkv, p, hd], (kind, device)), Tensor::zeros([1, hkv, p, hd], (kind, device)));
            let (cos, sin) = rope_p.of(layer);
            xp = layer.forward(&xp, c, cos, sin, masks_p.of(layer), Some((&mut kp, &mut vp, 0)));
            // Every completion row reads them (their gradients add up), then its own.
            let room = Tensor::zeros([b, hkv, t, hd], (kind, device));
            let mut kc = Tensor::cat(&[kp.expand([b, hkv, p, hd], false), room.shallow_clone()], 2);
            let mut vc = Tensor::cat(&[vp.expand([b, hkv, p, hd], false), room], 2);
            let (cos, sin) = rope_c.of(layer);
            xc = layer.forward(&xc, c, cos, sin, masks_c.of(layer), Some((&mut kc, &mut vc, p)));
        }
        let d = xp.size()[2];
        Tensor::cat(&[xp.narrow(1, p - 1, 1).expand([b, 1, d], false), xc.narrow(1, 0, t - 1)], 1)
    }

    /// Float32 logits `[B, T, V]` of hidden states `[B, T, d]` from
    /// [`Self::hidden_window`]: the final norm, the output layer, Gemma's soft cap.
    pub fn head_logits(&self, hidden: &Tensor) -> Tensor {
        self.head(hidden, false)
    }

    /// [`Self::hidden`] of `tokens` and the backward pass of
    /// `loss_of(hidden)` in one ([`Self::head_logits`] makes `hidden`
    /// logits), with activation checkpointing: the layers run forward without keeping their
    /// activations, only each layer's input; the backward pass recomputes one
    /// layer at a time from its input and carries the gradient down. The
    /// parameters' gradients accumulate as `loss.backward()` would leave them
    /// (the same operations, so equal up to the order of a few float sums);
    /// memory holds one layer's activations instead of every layer's.
    ///
    /// Every forward computation of the layers runs inside `scope` (e.g. an
    /// autocast span) and every backward pass outside it, as a plain forward
    /// in `scope` followed by `loss.backward()` would; `loss_of` runs outside
    /// it, and runs its own forward computations (the head) in it. Returns
    /// the loss, detached.
    ///
    /// With a `sink`, each decoder layer's gradients with respect to
    /// `sink.params(layer)` are handed to it as the layer's backward pass
    /// makes them, layer by layer from the last, instead of accumulating in
    /// those tensors' `.grad` (the head's and the embedding's still do): the
    /// sink can sum them over data-parallel ranks and let them go, so no
    /// more than a layer's gradients need be held (ZeRO-2). `take` is called
    /// for every layer, in that order, even where it has no parameters.
    pub fn forward_backward_checkpointed<E: From<tch::TchError>>(
        &self,
        tokens: Tokens,
        scope: &dyn Fn(&mut dyn FnMut()),
        loss_of: impl FnOnce(&Tensor) -> std::result::Result<Tensor, E>,
        mut sink: Option<&mut dyn LayerGrads>,
    ) -> std::result::Result<Tensor, E> {
        let in_scope = |f: &mut dyn FnMut() -> Tensor| {
            let mut out = None;
            scope(&mut || out = Some(f()));
            out.expect("the scope runs what it is given")
        };
        let (x0, rope, masks) = {
            let mut prepared = None;
            scope(&mut || prepared = Some(self.prepare_tokens(tokens)));
            prepared.expect("the scope runs what it is given")
        };
        // Forward: each layer's input, kept without a graph.
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = x0.detach();
        tch::no_grad(|| {
            for layer in &self.layers {
                let (cos, sin) = rope.of(layer);
                let next = in_scope(&mut || layer.forward(&x, &self.config, cos, sin, masks.of(layer), None));
                inputs.push(std::mem::replace(&mut x, next));
            }
        });
        // The loss of the window, with the last hidden state as a leaf
        // (outside the scope: the loss runs its own forward computations in it).
        let hidden = x.set_requires_grad(true);
        let loss = loss_of(&pick(&hidden, tokens))?;
        loss.f_backward()?;
        let mut grad = hidden.grad();
        drop(hidden);
        // Backward: one layer at a time, recomputed from its input.
        for (index, (layer, input)) in self.layers.iter().zip(inputs).enumerate().rev() {
            let input = input.set_requires_grad(true);
            let (cos, sin) = rope.of(layer);
            let output = in_scope(&mut || layer.forward(&input, &self.config, cos, sin, masks.of(layer), None));
            // d/d(output) of sum(output * grad) is grad: the layer's backward with `grad` flowing in.
            let root = (output * &grad).sum(output_kind(&grad));
            match sink.as_deref_mut() {
                // The layer's parameter gradients go to the sink, not into `.grad`.
                Some(sink) => {
                    let params = sink.params(index);
                    let mut wrt: Vec<&Tensor> = vec![&input];
                    wrt.extend(params.iter());
                    let mut grads = Tensor::f_run_backward(&[root], &wrt, false, false)?;
                    grad = grads.remove(0);
                    sink.take(index, grads);
                }
                None => {
                    root.f_backward()?;
                    grad = input.grad();
                }
            }
        }
        // Into the embedding.
        if x0.requires_grad() {
            (&x0 * &grad).sum(output_kind(&grad)).f_backward()?;
        }
        Ok(loss.detach())
    }

    /// [`Self::prepare`] of rows, or of packed sequences: each with its
    /// own positions from 0 and attention within itself.
    fn prepare_tokens(&self, tokens: Tokens) -> (Tensor, Rope, Masks) {
        let (ids, lens) = match tokens {
            Tokens::Rows { ids, mask, .. } => return self.prepare(ids, mask),
            Tokens::Packed { ids, lens, .. } => (ids, lens),
            Tokens::Shared { ids, prompt, lens, .. } => return self.prepare_shared(ids, prompt, lens),
        };
        let device = self.device();
        let segments = |window: Option<usize>| {
            let masks = lens.iter().map(|&len| match window {
                Some(w) if len > w as i64 => (len, Mask::Explicit(causal(len, 0, window, device).unsqueeze(0).unsqueeze(0))),
                _ => (len, Mask::Causal),
            });
            Mask::Segments(masks.collect())
        };
        let masks = Masks { full: segments(None), sliding: segments(self.config.sliding_window) };
        let positions: Vec<Tensor> = lens.iter().map(|&len| Tensor::arange(len, (Kind::Int64, device))).collect();
        let (x, rope) = self.embed_and_rope(&ids.to_device(device), &Tensor::cat(&positions, 0).unsqueeze(0));
        (x, rope, masks)
    }

    /// [`Self::prepare_tokens`] of [`Tokens::Shared`]: positions from 0
    /// through the prompt and on from it in each completion; a query sees
    /// the keys at or before it in its own segment and the prompt's (within
    /// a sliding window, by position).
    fn prepare_shared(&self, ids: &Tensor, prompt: i64, lens: &[i64]) -> (Tensor, Rope, Masks) {
        let device = self.device();
        let (mut segment, mut position) = (vec![0i64; prompt as usize], (0..prompt).collect::<Vec<i64>>());
        for (i, &len) in lens.iter().enumerate() {
            segment.extend(std::iter::repeat_n(i as i64 + 1, len as usize));
            position.extend(prompt..prompt + len);
        }
        let n = position.len() as i64;
        let (segment, position) = (Tensor::from_slice(&segment).to_device(device), Tensor::from_slice(&position).to_device(device));
        let index = Tensor::arange(n, (Kind::Int64, device));
        let (q, k) = (|t: &Tensor| t.unsqueeze(1), |t: &Tensor| t.unsqueeze(0));
        let visible = k(&index).le_tensor(&q(&index)).logical_and(&k(&segment).eq_tensor(&q(&segment)).logical_or(&k(&segment).eq(0)));
        let mask = |window: Option<usize>| {
            let allowed = match window {
                Some(w) => visible.logical_and(&(q(&position) - k(&position)).lt(w as i64)),
                None => visible.shallow_clone(),
            };
            Mask::Explicit(allowed.unsqueeze(0).unsqueeze(0))
        };
        let masks = Masks { full: mask(None), sliding: mask(self.config.sliding_window) };
        let (x, rope) = self.embed_and_rope(&ids.to_device(device), &position.unsqueeze(0));
        (x, rope, masks)
    }

    /// The embedded inputs, the RoPE tables at their positions and the
    /// attention masks of a full-sequence pass.
    fn prepare(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> (Tensor, Rope, Masks) {
        let device = self.device();
        let input_ids = input_ids.to_device(device);
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        let m = attention_mask.map(|m| m.to_device(device).to_kind(Kind::Bool));
        let mask = |window: Option<usize>| match &m {
            None if window.is_some_and(|w| t > w as i64) => Mask::Explicit(causal(t, 0, window, device).unsqueeze(0).unsqueeze(0)),
            None => Mask::Causal,
            Some(m) => {
                let eye = Tensor::eye(t, (Kind::Bool, device));
                // A padded query sees itself, so no row of the softmax is empty (NaN).
                let full = causal(t, 0, window, device).unsqueeze(0).logical_and(&m.unsqueeze(1)).logical_or(&eye.unsqueeze(0));
                Mask::Explicit(full.unsqueeze(1))
            }
        };
        let masks = Masks { full: mask(None), sliding: mask(self.config.sliding_window) };
        let positions = match &m {
            None => Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false),
            Some(m) => (m.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0),
        };
        let (x, rope) = self.embed_and_rope(&input_ids, &positions);
        (x, rope, masks)
    }

    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let c = &self.config;
        let device = self.device();
        let kind = self.embed.kind();
        let shape = [batch as i64, c.num_kv_heads as i64, capacity as i64, c.head_dim as i64];
        KvCache {
            keys: (0..c.num_layers).map(|_| Tensor::zeros(shape, (kind, device))).collect(),
            values: (0..c.num_layers).map(|_| Tensor::zeros(shape, (kind, device))).collect(),
            key_mask: Tensor::zeros([batch as i64, capacity as i64], (Kind::Bool, device)),
            next_pos: Tensor::zeros([batch as i64], (Kind::Int64, device)),
            dense: true,
            len: 0,
            capacity: capacity as i64,
        }
    }

    /// Runs `input_ids` `[B, T]` after what `cache` holds and appends their keys
    /// and values. `attention_mask` `[B, T]` marks real tokens (left padding of
    /// prompts); `None` means all real. Returns float32 logits `[B, T, V]`, or
    /// `[B, 1, V]` for the last position only when `last_only`.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        Ok(self.cached_step(input_ids, attention_mask, cache, last_only, true)?.0)
    }

    /// [`Self::forward_cached`], with the fused decode kernel allowed or not;
    /// also says whether it ran.
    fn cached_step(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
        last_only: bool,
        allow_fused: bool,
    ) -> Result<(Tensor, bool)> {
        let device = self.device();
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        if b != cache.batch() as i64 {
            return Err(Error::invalid("cache", format!("batch {b} but the cache holds {}", cache.batch())));
        }
        if cache.len + t > cache.capacity {
            return Err(Error::invalid(
                "cache",
                format!("{} + {t} positions exceed its capacity {}", cache.len, cache.capacity),
            ));
        }
        let input_ids = input_ids.to_device(device);
        let m = match attention_mask {
            Some(m) => m.to_device(device).to_kind(Kind::Bool),
            None => Tensor::ones([b, t], (Kind::Bool, device)),
        };
        if attention_mask.is_some() && !bool::try_from(m.all())? {
            cache.dense = false;
        }
        let steps = m.to_kind(Kind::Int64).cumsum(1, Kind::Int64);
        let positions = (cache.next_pos.unsqueeze(1) + &steps - 1).clamp_min(0);
        cache.next_pos = &cache.next_pos + steps.select(1, t - 1);
        let len = cache.len;
        cache.key_mask.narrow(1, len, t).copy_(&m);
        let total = len + t;
        let (mut x, rope) = self.embed_and_rope(&input_ids, &positions);
        // Keys beyond the sliding window need the explicit mask (and the torch path).
        let windowed = self.config.sliding_window.is_some_and(|w| total > w as i64);
        if t == 1
            && allow_fused
            && !windowed
            && let Some(y) = self.decode_fused(&x, &rope.cos, &rope.sin, cache)
        {
            cache.len = total;
            return Ok((self.head(&y, true), true));
        }
        let mask = |window: Option<usize>| {
            let windowed = window.is_some_and(|w| total > w as i64);
            if t == 1 && cache.dense && !windowed {
                Mask::None
            } else if len == 0 && cache.dense && !windowed {
                Mask::Causal
            } else {
                let keys = cache.key_mask.narrow(1, 0, total); // [B, S]
                let q_idx = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1) + len; // [T, 1]
                let k_idx = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0); // [1, S]
                let diag = k_idx.eq_tensor(&q_idx);
                let allowed = causal(t, len, window, device).unsqueeze(0).logical_and(&keys.unsqueeze(1)); // [B, T, S]
                Mask::Explicit(allowed.logical_or(&diag.unsqueeze(0)).unsqueeze(1))
            }
        };
        let masks = Masks { full: mask(None), sliding: mask(self.config.sliding_window) };
        for (i, layer) in self.layers.iter().enumerate() {
            let (kc, vc) = (&mut cache.keys[i], &mut cache.values[i]);
            // Split borrows: keys and values are separate vectors.
            let (cos, sin) = rope.of(layer);
            x = layer.forward(&x, &self.config, cos, sin, masks.of(layer), Some((kc, vc, len)));
        }
        cache.len = total;
        if last_only {
            x = x.narrow(1, t - 1, 1);
        }
        Ok((self.head(&x, true), false))
    }

    /// Every layer of a decode step (one new token per row) by the fused CPU
    /// kernel (see `cpu_kernels`), writing the new keys and values at
    /// `cache.len` (which the caller advances); `None` where it does not apply.
    fn decode_fused(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, cache: &KvCache) -> Option<Tensor> {
        let c = &self.config;
        if c.qk_norm || c.gemma.is_some() || self.lora.is_some() {
            // The kernel has no per-head norm of queries and keys, nor Gemma's layer, nor adapters.
            return None;
        }
        let key_mask = (!cache.dense).then_some(&cache.key_mask);
        let mut x = x.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let (a, m) = (&layer.attn, &layer.mlp);
            let weights = crate::cpu_kernels::LayerWeights {
                input_norm: &layer.input_norm,
                qkv: &a.qkv,
                qkv_bias: a.qkv_bias.as_ref(),
                o: &a.o,
                o_bias: a.o_bias.as_ref(),
                post_norm: &layer.post_norm,
                gate_up: &m.gate_up,
                gate_up_bias: m.gate_up_bias.as_ref(),
                down: &m.down,
                down_bias: m.biases.as_ref().map(|b| &b[2]),
            };
            let step = crate::cpu_kernels::DecodeStep {
                heads: c.num_heads as i64,
                kv_heads: c.num_kv_heads as i64,
                head_dim: c.head_dim as i64,
                eps: c.rms_norm_eps,
                x: &x,
                cos,
                sin,
                keys: &cache.keys[i],
                values: &cache.values[i],
                len: cache.len,
                key_mask,
            };
            // A layer that declines leaves the torch path to redo the step; the
            // keys and values written so far at `len` are the ones it writes.
            x = crate::cpu_kernels::decode_layer(&weights, &step)?;
        }
        Some(x)
    }
}

/// The kind a sum of `t` is taken in: float32 for float32 and lower precisions
/// (the gradient's surrogate loss), float64 as it is.
/// The positions of the last layer's output `x` that `tokens` reads.
fn pick(x: &Tensor, tokens: Tokens) -> Tensor {
    match tokens {
        Tokens::Rows { window: (start, len), .. } => x.narrow(1, start, len),
        Tokens::Packed { select, .. } | Tokens::Shared { select, .. } => x.index_select(1, &select.to_device(x.device())),
    }
}

fn output_kind(t: &Tensor) -> Kind {
    if t.kind() == Kind::Double { Kind::Double } else { Kind::Float }
}

/// Which keys each of `t` queries after `len` cached positions may attend,
/// `[t, len + t]`: those at or before it and, with a sliding `window`,
/// within the window (counted in cache positions, as transformers counts them).
fn causal(t: i64, len: i64, window: Option<usize>, device: Device) -> Tensor {
    let q_idx = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(1) + len; // [T, 1]
    let k_idx = Tensor::arange(len + t, (Kind::Int64, device)).unsqueeze(0); // [1, S]
    let causal = k_idx.le_tensor(&q_idx);
    match window {
        Some(w) => causal.logical_and(&k_idx.gt_tensor(&(q_idx - w as i64))),
        None => causal,
    }
}

/// RoPE tables as transformers builds them: `inv_freq = 1 / theta^(2i/d)` in
/// float32, angles `position * inv_freq` (positions divided by the linear
/// factor), duplicated to the full head dimension; sin with its first half
/// negated, as [`apply_rope`] takes it.
fn rope_tables(c: &ModelConfig, theta: f64, scaling: RopeScaling, device: Device) -> (Tensor, Tensor) {
    let d = c.head_dim as i64;
    let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float) / d as f64;
    let inv_freq = Tensor::from(theta as f32).pow(&exponents).reciprocal();
    let inv_freq = match scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            // Llama 3.1: long wavelengths (low frequencies) slowed by `factor`,
            // short ones kept, the band between blended linearly in old / wavelength.
            let wavelen = inv_freq.reciprocal() * std::f64::consts::TAU;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            let slowed = inv_freq.where_self(&wavelen.le(low_wavelen), &(&inv_freq / factor));
            let smooth = ((wavelen.reciprocal() * old) - low_freq_factor) / (high_freq_factor - low_freq_factor);
            let blended = (smooth.ones_like() - &smooth) * &slowed / factor + &smooth * &slowed;
            let medium = wavelen.ge(high_wavelen).logical_and(&wavelen.le(low_wavelen));
            blended.where_self(&medium, &slowed)
        }
    };
    let positions = Tensor::arange(c.max_position_embeddings as i64, (Kind::Float, Device::Cpu));
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], 1);
    let sin = emb.sin();
    let signed_sin = Tensor::cat(&[sin.narrow(1, 0, d / 2).neg(), sin.narrow(1, d / 2, d / 2)], 1);
    (emb.cos().to_device(device), signed_sin.to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small model with grouped-query attention, q/k norms, biases and a
    /// sliding window of 7.
    fn small_config() -> ModelConfig {
        ModelConfig {
            hidden_size: 48,
            intermediate_size: 80,
            num_layers: 3,
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 8,
            qkv_bias: true,
            qk_norm: true,
            sliding_window: Some(7),
            ..crate::builtin::tiny_arith_config()
        }
    }

    fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    /// Completions over a shared prompt (computed once) give the padded
    /// rows' hidden states at the completion positions, and the same
    /// gradients: with grouped-query attention, q/k norms, biases and a
    /// sliding window shorter than the rows.
    #[test]
    fn a_shared_prompt_pass_equals_the_padded_rows() {
        let model = Transformer::new(small_config(), Device::Cpu, Dtype::F32, 5).unwrap();
        let prompt = [3i64, 7, 9, 11, 4];
        let completions: [&[i64]; 3] = [&[5, 6, 2, 8, 9, 10], &[12, 13], &[1, 2, 3, 4]];
        let (p, c) = (prompt.len() as i64, 6i64);
        let padded: Vec<i64> = completions.iter().flat_map(|r| prompt.iter().chain(r.iter()).copied().chain(std::iter::repeat(0)).take((p + c) as usize)).collect();
        let padded = Tensor::from_slice(&padded).view([3, p + c]);
        let comps = padded.narrow(1, p, c);
        // Only positions before each row's padding count.
        let real: Vec<f32> = completions.iter().flat_map(|r| (0..c).map(move |j| if j < r.len() as i64 { 1.0 } else { 0.0 })).collect();
        let real = Tensor::from_slice(&real).view([3, c, 1]);
        tch::manual_seed(3);
        let weights = Tensor::randn([3, c, 48], (Kind::Float, Device::Cpu)) * &real;
        let run = |hidden: Tensor| {
            for (_, t) in model.vs.variables() {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            (&hidden * &weights).sum(Kind::Float).backward();
            let mut grads: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| {
                // The head's parameters get none: the hidden states stop before it.
                let g = t.grad();
                (n, if g.defined() { g.copy() } else { t.zeros_like() })
            }).collect();
            grads.sort_by(|a, b| a.0.cmp(&b.0));
            (hidden.detach() * &real, grads)
        };
        let (want, want_grads) = run(model.hidden_window(&padded, None, p - 1, c));
        let (got, got_grads) = run(model.hidden_shared_prompt(&Tensor::from_slice(&prompt).view([1, p]), &comps));
        let diff = relative_diff(&got, &want);
        assert!(diff < 1e-5, "hidden states differ by {diff} (relative)");
        for ((name, g), (_, w)) in got_grads.iter().zip(&want_grads) {
            let d = (g - w).abs().max().double_value(&[]);
            assert!(d < 1e-5, "{name}: gradients differ by {d}");
        }
    }

    /// Rows packed end to end give each row's own hidden states at its
    /// completion positions, and the same gradients as the rows one at a
    /// time: with GQA, q/k norms, biases and a sliding window shorter than
    /// some rows; and Gemma 2's soft-capped attention with sliding layers.
    /// A [`LayerGrads`] that keeps every layer's gradients by name.
    struct Collect<'a> {
        vs: &'a VarStore,
        got: Vec<(usize, Vec<(String, Tensor)>)>,
    }

    impl Collect<'_> {
        fn named(&self, layer: usize) -> Vec<(String, Tensor)> {
            let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().filter(|(n, _)| n.contains(&format!("layers.{layer}."))).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named
        }
    }

    impl LayerGrads for Collect<'_> {
        fn params(&self, layer: usize) -> Vec<Tensor> {
            self.named(layer).into_iter().map(|(_, t)| t).collect()
        }

        fn take(&mut self, layer: usize, grads: Vec<Tensor>) {
            let names = self.named(layer).into_iter().map(|(n, _)| n);
            self.got.push((layer, names.zip(grads).collect()));
        }
    }

    #[test]
    fn packed_rows_equal_each_row_alone() {
        let llama = small_config();
        let gemma = ModelConfig {
            gemma: Some(crate::config::Gemma {
                query_pre_attn_scalar: 8.0,
                attn_logit_softcapping: Some(5.0),
                final_logit_softcapping: Some(3.0),
                sliding_layers: vec![true, false, true],
                local_rope_theta: None,
            }),
            qkv_bias: false,
            qk_norm: false,
            tie_word_embeddings: true,
            ..llama.clone()
        };
        let rows: [(&[i64], usize); 3] = [(&[3, 7, 9, 11, 4, 5, 6, 2, 8, 9, 10], 5), (&[1, 12, 13], 1), (&[2, 4, 6, 8, 1, 2, 3, 4], 4)];
        for config in [llama, gemma] {
            let model = Transformer::new(config, Device::Cpu, Dtype::F32, 5).unwrap();
            let zero_grads = || {
                for (_, t) in model.vs.variables() {
                    let mut g = t.grad();
                    if g.defined() {
                        let _ = g.zero_();
                    }
                }
            };
            let grads = || {
                let mut grads: Vec<(String, Tensor)> = model.vs.variables().into_iter().map(|(n, t)| {
                    let g = t.grad();
                    (n, if g.defined() { g.copy() } else { t.zeros_like() })
                }).collect();
                grads.sort_by(|a, b| a.0.cmp(&b.0));
                grads
            };
            // Every parameter's gradient within 1e-5 of the reference's largest.
            let same_grads = |got: &[(String, Tensor)], want: &[(String, Tensor)], what: &str| {
                for ((name, g), (_, w)) in got.iter().zip(want) {
                    let d = (g - w).abs().max().double_value(&[]) / (w.abs().max().double_value(&[]) + 1e-30);
                    assert!(d < 1e-5, "{what} {name}: gradients differ by {d} (relative)");
                }
            };
            tch::manual_seed(3);
            let weights: Vec<Tensor> = rows.iter().map(|(ids, p)| Tensor::randn([1, (ids.len() - p) as i64, 48], (Kind::Float, Device::Cpu))).collect();
            // Each row alone, its completion-predicting window.
            zero_grads();
            let mut want = Vec::new();
            for ((ids, p), w) in rows.iter().zip(&weights) {
                let t = Tensor::from_slice(ids).view([1, ids.len() as i64]);
                let hidden = model.hidden_window(&t, None, *p as i64 - 1, (ids.len() - p) as i64);
                (&hidden * w).sum(Kind::Float).backward();
                want.push(hidden.detach());
            }
            let want_grads = grads();
            // Packed.
            zero_grads();
            let ids: Vec<i64> = rows.iter().flat_map(|(ids, _)| ids.iter().copied()).collect();
            let lens: Vec<i64> = rows.iter().map(|(ids, _)| ids.len() as i64).collect();
            let mut select = Vec::new();
            let mut at = 0i64;
            for (ids, p) in &rows {
                select.extend((*p as i64 - 1..ids.len() as i64 - 1).map(|j| at + j));
                at += ids.len() as i64;
            }
            let (ids, select) = (Tensor::from_slice(&ids).view([1, at]), Tensor::from_slice(&select));
            let got = model.hidden(Tokens::Packed { ids: &ids, lens: &lens, select: &select });
            (&got * Tensor::cat(&weights, 1)).sum(Kind::Float).backward();
            let diff = relative_diff(&got.detach(), &Tensor::cat(&want, 1));
            assert!(diff < 1e-5, "hidden states differ by {diff} (relative)");
            same_grads(&grads(), &want_grads, "packed");
            // One prompt's completions after it, the prompt once: each row alone's.
            let prompt = [3i64, 7, 9, 11, 4];
            let completions: [&[i64]; 3] = [&[5, 6, 2, 8, 9, 10], &[12, 13], &[1, 2, 3, 4]];
            tch::manual_seed(4);
            let shared_weights: Vec<Tensor> = completions.iter().map(|c| Tensor::randn([1, c.len() as i64, 48], (Kind::Float, Device::Cpu))).collect();
            zero_grads();
            let mut want_shared = Vec::new();
            for (c, w) in completions.iter().zip(&shared_weights) {
                let row: Vec<i64> = prompt.iter().chain(c.iter()).copied().collect();
                let t = Tensor::from_slice(&row).view([1, row.len() as i64]);
                let hidden = model.hidden_window(&t, None, prompt.len() as i64 - 1, c.len() as i64);
                (&hidden * w).sum(Kind::Float).backward();
                want_shared.push(hidden.detach());
            }
            let want_shared_grads = grads();
            zero_grads();
            let shared_ids: Vec<i64> = prompt.iter().chain(completions.iter().flat_map(|c| c.iter())).copied().collect();
            let shared_lens: Vec<i64> = completions.iter().map(|c| c.len() as i64).collect();
            let mut shared_select = Vec::new();
            let mut at = prompt.len() as i64;
            for c in &completions {
                // The first token is predicted from the prompt's last position, the rest from the completion's own.
                shared_select.push(prompt.len() as i64 - 1);
                shared_select.extend(at..at + c.len() as i64 - 1);
                at += c.len() as i64;
            }
            let (sids, ssel) = (Tensor::from_slice(&shared_ids).view([1, at]), Tensor::from_slice(&shared_select));
            let got = model.hidden(Tokens::Shared { ids: &sids, prompt: prompt.len() as i64, lens: &shared_lens, select: &ssel });
            (&got * Tensor::cat(&shared_weights, 1)).sum(Kind::Float).backward();
            let diff = relative_diff(&got.detach(), &Tensor::cat(&want_shared, 1));
            assert!(diff < 1e-5, "shared prompt: hidden states differ by {diff} (relative)");
            same_grads(&grads(), &want_shared_grads, "shared prompt");
            // Checkpointed, packed: the same gradients.
            zero_grads();
            let w = Tensor::cat(&weights, 1);
            let tokens = Tokens::Packed { ids: &ids, lens: &lens, select: &select };
            let _ = model.forward_backward_checkpointed::<tch::TchError>(tokens, &|f| f(), |h| Ok((h * &w).sum(Kind::Float)), None).unwrap();
            same_grads(&grads(), &want_grads, "checkpointed");
            // With a sink: each layer's gradients handed over, in order from
            // the last layer, none left in the layers' `.grad`.
            zero_grads();
            let mut sink = Collect { vs: &model.vs, got: Vec::new() };
            let _ = model.forward_backward_checkpointed::<tch::TchError>(tokens, &|f| f(), |h| Ok((h * &w).sum(Kind::Float)), Some(&mut sink)).unwrap();
            let layers = model.layers.len();
            assert_eq!(sink.got.iter().map(|(l, _)| *l).collect::<Vec<_>>(), (0..layers).rev().collect::<Vec<_>>());
            let mut handed: Vec<(String, Tensor)> = Vec::new();
            for (_, named) in sink.got {
                handed.extend(named);
            }
            assert!(handed.len() > 4 * layers, "{} gradients handed over", handed.len());
            let mut got = grads();
            for (name, g) in &handed {
                let slot = got.iter_mut().find(|(n, _)| n == name).expect("a variable");
                assert_eq!(slot.1.abs().max().double_value(&[]), 0.0, "{name}: the layer's gradient also went to .grad");
                slot.1 = g.shallow_clone();
            }
            same_grads(&got, &want_grads, "checkpointed, through a sink");
        }
    }

    /// The fused decode kernel against the torch path on the same model: GQA,
    /// every optional bias, a batch of three with and without left padding,
    /// several steps (the keys and values it writes are those later steps read).
    #[test]
    fn fused_decode_step_equals_the_torch_path() {
        fused_decode_equals_torch(Dtype::F32);
    }

    /// The same in bfloat16, where the kernel rounds where torch's bf16 path
    /// does but sums in float32 in its own order (and keeps softmax's and the
    /// products' float32 stretches its own way): neither bf16 path is the
    /// other's to 1e-5, so both are held to the float32 model they round.
    /// The kernel's logits and cached keys and values, summed over the steps
    /// and layers, must be no further from it than torch's (up to 1.5×;
    /// measured 0.87–0.96× in six runs on these peaked weights, with a single
    /// step or layer anywhere from 0.6× to 1.8×).
    #[test]
    fn fused_bf16_decode_step_is_as_close_to_float32_as_torch_bf16() {
        fused_decode_equals_torch(Dtype::Bf16);
    }

    fn fused_decode_equals_torch(dtype: Dtype) {
        if !crate::cpu_kernels::decode_layer_enabled() {
            eprintln!("skipped: the fused decode kernel is not available on this machine");
            return;
        }
        let config = ModelConfig {
            hidden_size: 48,
            intermediate_size: 80,
            num_layers: 3,
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 10,
            qkv_bias: true,
            o_bias: true,
            mlp_bias: true,
            tie_word_embeddings: false,
            rope_scaling: RopeScaling::Linear { factor: 2.0 },
            ..crate::builtin::tiny_arith_config()
        };
        let reference = Transformer::new(config.clone(), Device::Cpu, Dtype::F32, 11).unwrap();
        let _guard = tch::no_grad_guard();
        // Random biases (they start at zero), and weights large enough for
        // peaked attention, so that a wrong mask or scale shows.
        tch::manual_seed(5);
        for (name, mut p) in reference.var_store().variables() {
            if name.ends_with("bias") {
                let _ = p.f_add_(&(p.randn_like() * 0.1)).unwrap();
            } else if !name.contains("norm") {
                let _ = p.f_mul_scalar_(10.0).unwrap();
            }
        }
        let mut model = Transformer::new(config, Device::Cpu, dtype, 11).unwrap();
        model.copy_weights_from(&reference).unwrap();
        let vocab = model.config().vocab_size as i64;
        let ids = Tensor::randint(vocab, [3, 7], (Kind::Int64, Device::Cpu));
        let padding = Tensor::from_slice2(&[[1i64, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]);
        // Relative errors from float32 summed over steps and layers (bf16).
        let (mut sum_fused, mut sum_torch) = (0f64, 0f64);
        for mask in [Some(&padding), None] {
            let (mut fused, mut plain) = (model.new_cache(3, 16), model.new_cache(3, 16));
            let mut exact = reference.new_cache(3, 16);
            let _prefill = model.cached_step(&ids, mask, &mut fused, true, true).unwrap();
            let _prefill = model.cached_step(&ids, mask, &mut plain, true, false).unwrap();
            let _prefill = reference.cached_step(&ids, mask, &mut exact, true, false).unwrap();
            assert_eq!(fused.dense, mask.is_none());
            for step in 0..6 {
                let next = Tensor::randint(vocab, [3, 1], (Kind::Int64, Device::Cpu));
                let (a, took) = model.cached_step(&next, None, &mut fused, true, true).unwrap();
                let (b, _) = model.cached_step(&next, None, &mut plain, true, false).unwrap();
                let (want, _) = reference.cached_step(&next, None, &mut exact, true, false).unwrap();
                assert!(took, "step {step}: the fused kernel declined");
                let padded = mask.is_some();
                if dtype == Dtype::F32 {
                    let diff = relative_diff(&a, &b);
                    assert!(diff < 1e-5, "padded {padded}, step {step}: fused vs torch logits differ by {diff} (relative)");
                } else {
                    let (fused_err, torch_err) = (relative_diff(&a, &want), relative_diff(&b, &want));
                    eprintln!("padded {padded}, step {step}: from float32, fused bf16 {fused_err:.2e}, torch bf16 {torch_err:.2e}");
                    sum_fused += fused_err;
                    sum_torch += torch_err;
                }
            }
            for i in 0..3 {
                let diff = |a: &KvCache, b: &KvCache| relative_diff(&a.keys[i], &b.keys[i]).max(relative_diff(&a.values[i], &b.values[i]));
                if dtype == Dtype::F32 {
                    let diff = diff(&fused, &plain);
                    assert!(diff < 1e-5, "layer {i}: cached keys/values differ by {diff} (relative)");
                } else {
                    let (fused_err, torch_err) = (diff(&fused, &exact), diff(&plain, &exact));
                    eprintln!("layer {i}: cached keys/values from float32, fused bf16 {fused_err:.2e}, torch bf16 {torch_err:.2e}");
                    sum_fused += fused_err;
                    sum_torch += torch_err;
                }
            }
        }
        if dtype != Dtype::F32 {
            eprintln!("summed relative errors from float32: fused bf16 {sum_fused:.2e}, torch bf16 {sum_torch:.2e}");
            assert!(sum_torch > 0.0, "the bf16 model computed in float32");
            assert!(sum_fused <= 1.5 * sum_torch, "fused bf16 {sum_fused:.2e} from float32, torch bf16 {sum_torch:.2e}");
        }
    }
}
