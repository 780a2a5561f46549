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
}

impl WeightSet {
    pub fn new(version: PolicyVersion, tensors: Vec<(String, tch::Tensor)>) -> Arc<Self> {
        Arc::new(Self { version, tensors: Mutex::new(tensors) })
    }
}
