//! How much memory a learner rank needs: `prism plan`, before renting a
//! cluster. Per rank, for every `dist.shard` setting: the weights (in
//! `model.dtype`: float32, or bf16 trained through float32 master weights,
//! which are optimizer state), the reference model of a KL penalty, the
//! gradients, the optimizer state, the buffers of sharded updates, and the
//! peak of the activations of one micro-batch's forward and backward pass,
//! kept or recomputed per layer (`learner.checkpoint_activations`); and the
//! KV cache a rollout engine needs for a batch.
//!
//! The activation model counts the values autograd keeps per token and
//! layer in [`prism_model::Transformer`]'s training pass ([`saved_per_layer`])
//! and the vocabulary-sized tensors of the loss over the trained window
//! ([`LOGIT_COPIES`]), with the gradients in flight beside them
//! ([`TRANSIENT_FACTOR`], [`RECOMPUTED_FACTOR`]): the live bytes, which
//! match CPU steps within 5 % when glibc hands every freed block back
//! (`MALLOC_MMAP_THRESHOLD_=131072`). With glibc's default allocator the
//! process holds more: tensors up to its mmap threshold (which rises to 32
//! MiB) come from its heap, and a freed block there stays resident and is
//! split by smaller requests, so the next large ones grow the heap. That
//! free heap ([`RETAINED_HEAP`], [`retained_bytes`]) is what the plan missed
//! with activations recomputed on tiny configs (deep: 0.41 GB live, 0.97
//! GB resident) and with LoRA (SmolLM2-135M 8 × 256: 3.93 GB live, 6.27
//! resident); full training hid it because the gradients and AdamW's
//! moments, allocated after the first backward pass, take those blocks
//! ([`activations_beside`]). The factors are measured on CPU training steps
//! of random-weight models (`prism plan --measure`; `benches/plan.sh`
//! prints the plan beside the measured peak for SmolLM2-135M and tiny
//! configs at several shapes). Under CUDA's bf16 autocast the projections'
//! outputs take 2 bytes instead of 4 (derived, not measured here: no GPU),
//! and the plan counts the live bytes only: CUDA's caching allocator hands
//! freed blocks out again to requests of their size, and what it holds
//! beyond them is unmeasured.

use crate::optim::sharded::Stage;
use prism_model::ModelConfig;

/// Measured: live bytes of the kept layers' activations at the peak over
/// the values [`saved_per_layer`] counts (1.05 to 1.10 with every freed
/// block handed back): the gradients of the last layer's values, in flight
/// when its backward pass starts.
pub const TRANSIENT_FACTOR: f64 = 1.1;
/// Measured: live bytes of one recomputed layer at its peak over the values
/// it keeps (1.41 to 1.45 with every freed block handed back): its backward
/// pass holds their gradients, up to about half as much again, beside them.
pub const RECOMPUTED_FACTOR: f64 = 1.45;
/// Measured: free heap glibc keeps resident at the peak of two training
/// steps, as a share of the bytes of the values every layer keeps in one
/// pass (the resident peak less the live one, [`saved_per_layer`] × layers:
/// 0.25 to 0.81 on the configs of `benches/plan.sh`, kept or recomputed,
/// LoRA or not). Each layer's forward and backward pass frees blocks that
/// the next requests split, so the heap keeps growing by the largest ones.
pub const RETAINED_HEAP: f64 = 0.4;
/// Measured: vocabulary-sized float32 tensors per trained token at the peak
/// (the logits, their log-softmax and its gradient, entropy's temporaries;
/// 4.0 to 4.3 measured).
pub const LOGIT_COPIES: f64 = 4.1;

/// The shape of one micro-batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Tokens per sequence (prompt + completion).
    pub seq_len: u64,
    /// Trained tokens per sequence (the completion): the head runs on these only.
    pub window: u64,
    /// Sequences per forward/backward pass.
    pub micro_batch: u64,
    /// `learner.checkpoint_activations`.
    pub checkpoint_activations: bool,
    /// Projections under bf16 autocast (CUDA): their outputs take 2 bytes.
    pub bf16: bool,
    /// `learner.logit_chunk`: the loss's vocabulary-sized tensors are those
    /// of this many positions of each sequence (0: of the whole window).
    pub logit_chunk: u64,
}

/// Bytes one learner rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RankBytes {
    pub weights: u64,
    /// The frozen reference model of `learner.kl_coef > 0`.
    pub reference: u64,
    pub gradients: u64,
    /// AdamW's moments, and the float32 master weights (of the share with
    /// sharding; of every parameter of a bf16 model without).
    pub optimizer: u64,
    /// A sharded update's flattened bucket, gathered bucket and gradient share.
    pub buffers: u64,
    /// The peak of one micro-batch's pass.
    pub activations: u64,
}

impl RankBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.reference + self.gradients + self.optimizer + self.buffers + self.activations
    }
}

/// Trainable parameters of `c` (every weight, biases and norms included).
pub fn parameters(c: &ModelConfig) -> u64 {
    let (d, v) = (c.hidden_size as u64, c.vocab_size as u64);
    v * d + c.num_layers as u64 * layer_parameters(c) + d + if c.tie_word_embeddings { 0 } else { v * d }
}

/// Parameters of one decoder layer of `c`.
pub fn layer_parameters(c: &ModelConfig) -> u64 {
    let u = |x: usize| x as u64;
    let (d, f) = (u(c.hidden_size), u(c.intermediate_size));
    let q = u(c.num_heads) * u(c.head_dim);
    let kv = u(c.num_kv_heads) * u(c.head_dim);
    let attention = d * q + 2 * d * kv + q * d + if c.qkv_bias { q + 2 * kv } else { 0 } + if c.o_bias { d } else { 0 };
    let mlp = 3 * d * f + if c.mlp_bias { 2 * f + d } else { 0 };
    let norms = if c.gemma.is_some() { 4 } else { 2 };
    attention + mlp + norms * d + if c.qk_norm { 2 * u(c.head_dim) } else { 0 }
}

/// Gradient bytes a rank holds for `p` trained parameters, `per_layer` of
/// them in each of `layers` decoder layers, `weight_bytes` each. Autograd
/// holds the whole gradient until the update, except with ZeRO-2 and the
/// layers recomputed (`streamed`): then the backward pass hands each layer's
/// gradients to the optimizer as it makes them, which reduce-scatters every
/// bucket whose parameters all have theirs and lets them go
/// ([`crate::optim::sharded::ShardedAdamW::take_layer`]). A rank then holds
/// the gradients outside the layers (embedding, head, final norm: in
/// `.grad`), the layer just handed over, and the part of the one bucket
/// that spans it and the next layer down, waiting for that one (buckets
/// follow the layers: [`crate::optim::sharded::Order::Layers`]). The
/// float32 share of the sum is one of the sharded update's buffers.
fn gradient_bytes(p: u64, per_layer: u64, layers: u64, stage: Option<Stage>, streamed: bool, bucket_bytes: u64, weight_bytes: u64) -> u64 {
    if stage != Some(Stage::Gradients) || !streamed {
        return weight_bytes * p;
    }
    let outside = p.saturating_sub(layers * per_layer);
    weight_bytes * (outside + per_layer + bucket_bytes / 4).min(p)
}

/// Values autograd keeps per token in one decoder layer's training pass:
/// `(float32 values, projection outputs)` — the latter in the autocast dtype.
///
/// - each RMSNorm: its input, the normalised input, the scaled output (3 d;
///   two norms: 6 d; Gemma's four: 12 d);
/// - attention: the rotated queries and keys and the values, kept by
///   scaled-dot-product attention with its output (flash attention keeps no
///   `T × T` matrix), and the output's copy the output projection keeps:
///   `(3 h + 2 kv) · head_dim`; with per-head q/k norms (Qwen3) their inputs
///   and outputs, `2 (h + kv) · head_dim` more;
/// - the SwiGLU MLP: gate, its SiLU, up, and their product (4 f).
pub fn saved_per_layer(c: &ModelConfig) -> (u64, u64) {
    let (d, f) = (c.hidden_size as u64, c.intermediate_size as u64);
    let (h, kv, hd) = (c.num_heads as u64, c.num_kv_heads as u64, c.head_dim as u64);
    let attention = (3 * h + 2 * kv) * hd + if c.qk_norm { 2 * (h + kv) * hd } else { 0 };
    let norms = if c.gemma.is_some() { 12 * d } else { 6 * d };
    (norms, attention + 4 * f)
}

/// Bytes of the values one decoder layer keeps in a pass of `s`.
fn layer_values(c: &ModelConfig, s: &Shape) -> f64 {
    let projection = if s.bf16 { 2.0 } else { 4.0 };
    let (full, proj) = saved_per_layer(c);
    (s.micro_batch * s.seq_len) as f64 * (full as f64 * 4.0 + proj as f64 * projection)
}

/// The peak bytes of one micro-batch's forward and backward pass: the live
/// bytes, and the free heap the allocator holds beside them
/// ([`retained_bytes`]) as if nothing else took it (see
/// [`activations_beside`]).
pub fn activation_bytes(c: &ModelConfig, s: &Shape) -> u64 {
    live_bytes(c, s) + retained_bytes(c, s)
}

/// The bytes of one micro-batch's pass that are live at its peak.
pub fn live_bytes(c: &ModelConfig, s: &Shape) -> u64 {
    let tokens = (s.micro_batch * s.seq_len) as f64;
    let positions = if s.logit_chunk > 0 { s.window.min(s.logit_chunk) } else { s.window };
    let trained = (s.micro_batch * positions) as f64;
    let layer = layer_values(c, s);
    let layers = c.num_layers as f64;
    let logits = trained * LOGIT_COPIES * c.vocab_size as f64 * 4.0;
    // Each layer's input (the residual stream, float32).
    let inputs = tokens * layers * c.hidden_size as f64 * 4.0;
    let live = if s.checkpoint_activations {
        // The loss runs, and lets its logits go, before the first layer is
        // recomputed: beside the layers' inputs, the larger of the two.
        inputs + logits.max(RECOMPUTED_FACTOR * layer)
    } else {
        // The loss runs with every layer's values kept.
        TRANSIENT_FACTOR * layers * layer + logits
    };
    live.ceil() as u64
}

/// Free heap the allocator keeps resident at the peak ([`RETAINED_HEAP`]
/// of the values every layer keeps in a pass, kept or recomputed: both free
/// every layer's blocks once a step). It stays resident into the next
/// step's loss, so it adds to the logits as much as to the layers.
/// CUDA plans (bf16 autocast) count none: its caching allocator hands
/// freed blocks out again to requests of their size, and what it holds
/// beyond the live bytes is not measured here (no GPU).
pub fn retained_bytes(c: &ModelConfig, s: &Shape) -> u64 {
    if s.bf16 {
        return 0;
    }
    (RETAINED_HEAP * c.num_layers as f64 * layer_values(c, s)).ceil() as u64
}

/// [`activation_bytes`] beside `state` bytes of gradients, optimizer state
/// and update buffers: those are allocated in the first step's backward
/// pass and update, into the blocks its activations freed, so the free heap
/// the allocator keeps counts only where it exceeds them.
pub fn activations_beside(c: &ModelConfig, s: &Shape, state: u64) -> u64 {
    live_bytes(c, s) + retained_bytes(c, s).saturating_sub(state)
}

/// What a learner rank holds for `c` with `ranks` ranks sharding as `stage`
/// (`None`: each rank holds the whole optimizer), flattening `bucket_bytes` at
/// a time, with a reference model when `reference`, its weights (and
/// gradients) taking `weight_bytes` each (4: float32, 2: bf16).
pub fn rank_bytes(c: &ModelConfig, s: &Shape, ranks: u64, stage: Option<Stage>, bucket_bytes: u64, reference: bool, weight_bytes: u64) -> RankBytes {
    let p = parameters(c);
    let (optimizer, buffers) = optimizer_bytes(p, ranks, stage, bucket_bytes, weight_bytes);
    let gradients = gradient_bytes(p, layer_parameters(c), c.num_layers as u64, stage, s.checkpoint_activations, bucket_bytes, weight_bytes);
    RankBytes {
        weights: weight_bytes * p,
        reference: if reference { weight_bytes * p } else { 0 },
        gradients,
        optimizer,
        buffers,
        activations: activations_beside(c, s, gradients + optimizer + buffers),
    }
}

/// AdamW's state and the sharded update's buffers for `p` trained
/// parameters held in `weight_bytes` each, on one of `ranks` ranks.
fn optimizer_bytes(p: u64, ranks: u64, stage: Option<Stage>, bucket_bytes: u64, weight_bytes: u64) -> (u64, u64) {
    let share = p.div_ceil(ranks.max(1));
    let masters = if weight_bytes < 4 { 4 * p } else { 0 };
    match stage {
        None => (8 * p + masters, 0),
        // Moments and master weights of the share; a flattened bucket
        // (float32) and the gathered bucket (in the weights' type) at a
        // time, and the share's gradient.
        Some(_) => (12 * share, bucket_bytes.min(4 * p) * (4 + weight_bytes) / 4 + 4 * share),
    }
}

/// Parameters of LoRA adapters of rank `r` (Hu et al. 2021, arXiv
/// 2106.09685) on every linear projection of every layer (q, k, v, o, gate,
/// up, down; `A` is `r × in`, `B` is `out × r`).
pub fn lora_parameters(c: &ModelConfig, r: u64) -> u64 {
    let u = |x: usize| x as u64;
    let (d, f) = (u(c.hidden_size), u(c.intermediate_size));
    let q = u(c.num_heads) * u(c.head_dim);
    let kv = u(c.num_kv_heads) * u(c.head_dim);
    let per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d);
    u(c.num_layers) * r * per_layer
}

/// What a rank holds training LoRA adapters of rank `r` instead of the
/// whole model (`learner.lora`): the frozen base in its type (`weight_bytes`
/// a parameter, no gradients and no optimizer state; with the adapters off it
/// is the KL reference too, so no copy), and the adapters held as a whole
/// model's parameters would be ([`rank_bytes`]: in the weights' type, with
/// their gradients, AdamW moments and float32 masters when narrower, sharded
/// as `stage` says), and the activations of full training (the backward pass
/// still runs through every layer), beside the adapters' state: too small to
/// take the free heap the pass leaves, which then shows ([`activations_beside`]).
pub fn lora_rank_bytes(c: &ModelConfig, s: &Shape, ranks: u64, stage: Option<Stage>, bucket_bytes: u64, weight_bytes: u64, r: u64) -> RankBytes {
    let a = lora_parameters(c, r);
    let (optimizer, buffers) = optimizer_bytes(a, ranks, stage, bucket_bytes, weight_bytes);
    let gradients = gradient_bytes(a, a / (c.num_layers as u64).max(1), c.num_layers as u64, stage, s.checkpoint_activations, bucket_bytes, weight_bytes);
    RankBytes {
        weights: weight_bytes * (parameters(c) + a),
        reference: 0,
        gradients,
        optimizer,
        buffers,
        activations: activations_beside(c, s, gradients + optimizer + buffers),
    }
}

/// Bytes of a rollout engine's KV cache: keys and values of every layer for
/// `sequences` sequences of `tokens` positions, `value_bytes` each (2: bf16).
pub fn kv_cache_bytes(c: &ModelConfig, sequences: u64, tokens: u64, value_bytes: u64) -> u64 {
    2 * c.num_layers as u64 * c.num_kv_heads as u64 * c.head_dim as u64 * sequences * tokens * value_bytes
}

/// Bytes a rollout engine holds for the weights in `value_bytes` each.
pub fn rollout_weight_bytes(c: &ModelConfig, value_bytes: u64) -> u64 {
    parameters(c) * value_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "tie_word_embeddings": true
        });
        let hf: prism_model::config::HfConfig = serde_json::from_value(json).unwrap();
        hf.resolve(std::path::Path::new("config.json")).unwrap()
    }

    /// SmolLM2-135M's parameter count, as its safetensors hold it.
    #[test]
    fn parameters_count_every_weight() {
        assert_eq!(parameters(&smollm2()), 134_515_008);
    }

    #[test]
    fn sharding_divides_the_optimizer_and_streamed_zero2_the_gradients() {
        let c = smollm2();
        let s = Shape { seq_len: 256, window: 192, micro_batch: 8, checkpoint_activations: false, bf16: false, logit_chunk: 0 };
        let whole = rank_bytes(&c, &s, 4, None, 64 << 20, false, 4);
        let sharded = rank_bytes(&c, &s, 4, Some(Stage::Optimizer), 64 << 20, false, 4);
        let p = parameters(&c);
        assert_eq!((whole.optimizer, whole.gradients, whole.buffers), (8 * p, 4 * p, 0));
        assert_eq!(sharded.optimizer, 12 * p.div_ceil(4));
        assert_eq!(sharded.gradients, whole.gradients);
        assert!(sharded.total() < whole.total());
        // bf16 weights and gradients; float32 masters beside the moments.
        let bf16 = rank_bytes(&c, &s, 4, None, 64 << 20, true, 2);
        assert_eq!((bf16.weights, bf16.reference, bf16.gradients, bf16.optimizer), (2 * p, 2 * p, 2 * p, 12 * p));
        let bf16_sharded = rank_bytes(&c, &s, 4, Some(Stage::Gradients), 64 << 20, true, 2);
        assert_eq!((bf16_sharded.weights, bf16_sharded.optimizer), (2 * p, 12 * p.div_ceil(4)));
        let checkpointed = Shape { checkpoint_activations: true, ..s };
        // The live bytes: the free heap the allocator keeps is of the same
        // order either way (measured), so it is left out of the comparison.
        assert!(live_bytes(&c, &checkpointed) < live_bytes(&c, &s) / 3);
        // ZeRO-2 with recomputed layers: the gradients of the embedding
        // (576 × 49152) and the final norm, one layer's (3.54M parameters)
        // and a bucket's worth (64 MB as float32: 16.8M) waiting.
        let layer = layer_parameters(&c);
        assert_eq!(layer, 3_540_096);
        assert_eq!(rank_bytes(&c, &checkpointed, 4, Some(Stage::Optimizer), 64 << 20, false, 4).gradients, 4 * p);
        assert_eq!(rank_bytes(&c, &s, 4, Some(Stage::Gradients), 64 << 20, false, 4).gradients, 4 * p);
        let streamed = rank_bytes(&c, &checkpointed, 4, Some(Stage::Gradients), 64 << 20, false, 4);
        assert_eq!(streamed.gradients, 4 * (576 * 49152 + 576 + layer + (16 << 20)));
        // The loss a chunk of 32 positions at a time: the logits' share shrinks by 192 / 32.
        let chunked = Shape { logit_chunk: 32, ..s };
        let logits = |s: &Shape| (LOGIT_COPIES * 49152.0 * 4.0 * (8 * s.window.min(if s.logit_chunk > 0 { s.logit_chunk } else { s.window })) as f64) as u64;
        assert_eq!(activation_bytes(&c, &s) - activation_bytes(&c, &chunked), logits(&s) - logits(&chunked));
    }

    /// SmolLM2-135M's rank-16 adapters on all seven projections: 30 layers ×
    /// 16 × (2 × 576 + 2 × (576 + 192) + 2 × 576 + 2 × (576 + 1536) + 2112).
    #[test]
    fn lora_counts_the_adapters_and_keeps_the_base_frozen() {
        let c = smollm2();
        assert_eq!(lora_parameters(&c, 16), 30 * 16 * (2 * 576 + 2 * 768 + 2 * 576 + 2 * 2112 + 2112));
        let s = Shape { seq_len: 256, window: 192, micro_batch: 8, checkpoint_activations: false, bf16: false, logit_chunk: 0 };
        let lora = lora_rank_bytes(&c, &s, 1, None, 64 << 20, 2, 16);
        let a = lora_parameters(&c, 16);
        // bf16: the adapters in bf16, their gradients too, moments and masters in float32.
        assert_eq!((lora.weights, lora.reference, lora.gradients, lora.optimizer), (2 * (parameters(&c) + a), 0, 2 * a, 12 * a));
        // The adapters' state is too small to fill the heap the pass frees:
        // the free heap the allocator keeps shows, as it does measured.
        assert_eq!(lora.activations, activations_beside(&c, &s, lora.gradients + lora.optimizer + lora.buffers));
        assert!(lora.activations > live_bytes(&c, &s) + retained_bytes(&c, &s) / 2);
    }

    #[test]
    fn the_kv_cache_counts_keys_and_values_of_every_layer() {
        // 2 × 30 layers × 3 heads × 64 × 16 sequences × 1024 tokens × 2 bytes.
        assert_eq!(kv_cache_bytes(&smollm2(), 16, 1024, 2), 2 * 30 * 3 * 64 * 16 * 1024 * 2);
    }
}
