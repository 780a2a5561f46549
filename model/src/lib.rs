//! prism-model: the policy network and everything needed to run it.
//!
//! Owns the tch transformer (Llama / Qwen2 / SmolLM family), tokenizers and chat
//! templates, weight I/O (Hugging Face safetensors directories, GGUF files), and the
//! KV-cached batched sampling engine with teacher-forced scoring.
//!
//! Must not know about rewards, advantages, actors or transports: it turns token
//! ids into log-probabilities and samples, nothing more.
