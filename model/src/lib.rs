//! prism-model: the policy network and everything needed to run it.
//!
//! Owns the tch transformer (Llama / Qwen2 / SmolLM family), tokenizers and chat
//! templates, weight I/O (Hugging Face safetensors directories, GGUF files), and the
//! KV-cached batched sampling engine with teacher-forced scoring.
//!
//! Must not know about rewards, advantages, actors or transports: it turns token
//! ids into log-probabilities and samples, nothing more.
//!
//! Entry point: [`load`] an HF folder, a `.gguf` file or `builtin:tiny-arith`,
//! then [`engine::generate`] / [`engine::score`] on the [`Transformer`].

pub mod builtin;
pub mod chat;
pub mod config;
pub mod engine;
pub mod gguf;
pub mod hf;
pub mod lora;
mod cpu_kernels;
pub mod tokenizer;
pub mod transformer;
mod weight_set;

pub use config::{Family, GenerationConfig, HfConfig, ModelConfig, RopeScaling};
pub use engine::{Sample, SamplingParams};
pub use lora::LoraConfig;
pub use tokenizer::Tokenizer;
pub use transformer::{KvCache, LayerGrads, Tokens, Transformer};
pub use weight_set::{LoraParts, WeightSet};

use std::path::{Path, PathBuf};
use std::str::FromStr;
pub use tch::Device;

/// Everything that can go wrong loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {got:?}, expected {want:?}", path.display())]
    WrongShape { path: PathBuf, name: String, got: Vec<i64>, want: Vec<i64> },
    #[error("{}: tensor `{name}` has type {kind}, which prism cannot read (supported: {supported})", path.display())]
    UnsupportedType { path: PathBuf, name: String, kind: String, supported: &'static str },
    #[error("{}: tensor `{name}` needs bytes {start}..{end} but the file has {len} bytes (truncated file?)", path.display())]
    Truncated { path: PathBuf, name: String, start: u64, end: u64, len: u64 },
    #[error("model source {0:?} is neither a folder with config.json, a .gguf file nor a builtin (builtin:tiny-arith)")]
    UnknownSource(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("prompt of {prompt} tokens plus {new} new tokens exceeds the context length {max}")]
    ContextTooLong { prompt: usize, new: usize, max: usize },
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        let reason = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            _ => e.to_string(),
        };
        Error::Io { path: path.into(), reason }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), reason: reason.into() }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parameter precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    /// The tch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
            Dtype::F16 => tch::Kind::Half,
        }
    }

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

impl FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "float16" => Ok(Dtype::F16),
            _ => Err(Error::invalid("dtype", format!("{s:?} (expected f32, bf16 or f16)"))),
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Ok(Device::Cuda(n)),
            None => Err(Error::invalid("device", format!("{s:?} (expected cpu, cuda or cuda:N)"))),
        },
    }
}

/// How to load a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: Dtype,
    /// Seed of the random initialisation (builtin presets only).
    pub seed: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: Dtype::F32, seed: 0 }
    }
}

/// A model ready to run: weights, tokenizer and generation defaults.
pub struct Loaded {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub generation: GenerationConfig,
}

impl Loaded {
    /// Sets `model.chat_template_kwargs` on the tokenizer (and the model's
    /// copy of it): variables every chat prompt's template sees.
    pub fn with_chat_template_kwargs(mut self, kwargs: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        self.tokenizer.set_chat_template_kwargs(kwargs.clone())?;
        if self.model.tokenizer().is_some() {
            self.model.set_tokenizer(self.tokenizer.clone());
        }
        Ok(self)
    }
}

/// Loads `source`: a Hugging Face folder (config.json, safetensors, tokenizer),
/// a `.gguf` file, or a builtin preset such as `builtin:tiny-arith`.
pub fn load(source: &str, opts: &LoadOptions) -> Result<Loaded> {
    if let Some(name) = source.strip_prefix("builtin:") {
        return builtin::load(name, opts);
    }
    let path = Path::new(source);
    if path.is_dir() {
        return hf::load_dir(path, opts);
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return gguf::load_file(path, opts);
    }
    if !path.exists() {
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
    }
    Err(Error::UnknownSource(source.to_string()))
}

/// `[model]`: the policy model every command loads.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// An HF folder, a `.gguf` file or a builtin preset. Default `builtin:tiny-arith`.
    pub source: String,
    /// Parameter precision: `f32`, `bf16` or `f16`. The learner trains a
    /// bf16 or f16 model through float32 master weights (optimizer state).
    /// Default `f32`.
    pub dtype: String,
    /// `cpu`, `cuda` or `cuda:N`. Default `cpu`.
    pub device: String,
    /// Variables the chat template sees besides the messages, as
    /// transformers' `apply_chat_template(**kwargs)` passes them, e.g.
    /// `{ enable_thinking = false }` for Qwen3: rollouts, evaluation and
    /// `prism serve` render prompts with them. Default none.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Checks values that parse but cannot be used.
    pub fn validate(&self) -> std::result::Result<(), prism_core::config::Invalid> {
        use prism_core::config::Invalid;
        if self.source.is_empty() {
            return Err(Invalid::new("model.source", &self.source, "must not be empty"));
        }
        prism_core::config::check::one_of("model.dtype", &self.dtype, &["f32", "bf16", "f16"])?;
        parse_device(&self.device).map_err(|_| Invalid::new("model.device", &self.device, "expected cpu, cuda or cuda:N"))?;
        if let Some(k) = self.chat_template_kwargs.keys().find(|k| chat::RESERVED.contains(&k.as_str())) {
            return Err(Invalid::new("model.chat_template_kwargs", k, "is a variable prism sets itself"));
        }
        Ok(())
    }

    /// The load options this section describes, with `seed` for random initialisation.
    pub fn load_options(&self, seed: u64) -> Result<LoadOptions> {
        Ok(LoadOptions { device: parse_device(&self.device)?, dtype: self.dtype.parse()?, seed })
    }
}
