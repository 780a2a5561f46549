//! The policy's weights at one version, as tensors.

use prism_core::PolicyVersion;
use std::sync::{Arc, Mutex};

/// The policy's weights at one version: named tensors, shared read-only between
/// the learner (which made them) and every rollout (which copies them in),
/// in-process or after a transport delivered them.
pub struct WeightSet {
    pub version: PolicyVersion,
    /// `(name, tensor)` pairs with Hugging Face parameter names. Behind a mutex
    /// only because `tch::Tensor` is `Send` but not `Sync`; readers copy out.
    pub tensors: Mutex<Vec<(String, tch::Tensor)>>,
    /// A LoRA policy's parts, beside the merged `tensors`: what a transport
    /// sends a rollout process instead of them (see [`LoraParts`]).
    pub lora: Option<LoraParts>,
}

/// A LoRA policy's version as its frozen base and this version's adapters:
/// `tensors` are the base with [`crate::lora::merge_named`] of the adapters.
/// Over the network the adapters alone move once the base is there (3.6 %
/// of SmolLM2-135M's bytes at rank 16 on every projection).
pub struct LoraParts {
    /// The adapters' scale, `alpha / rank`.
    pub scale: f64,
    /// Every base parameter (HF names), the adapted ones unmerged. Training
    /// never writes them (the base is frozen), so they are shared, not copied.
    pub base: Mutex<Vec<(String, tch::Tensor)>>,
    /// The adapters under their PEFT names, copied at this version.
    pub adapters: Mutex<Vec<(String, tch::Tensor)>>,
}

impl WeightSet {
    pub fn new(version: PolicyVersion, tensors: Vec<(String, tch::Tensor)>) -> Arc<Self> {
        Arc::new(Self { version, tensors: Mutex::new(tensors), lora: None })
    }

    /// A LoRA policy's version: the merged `tensors` and its parts.
    pub fn with_lora(version: PolicyVersion, tensors: Vec<(String, tch::Tensor)>, lora: LoraParts) -> Arc<Self> {
        Arc::new(Self { version, tensors: Mutex::new(tensors), lora: Some(lora) })
    }
}
