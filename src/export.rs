//! `prism export`: any model prism can load (an HF or prism checkpoint folder,
//! a GGUF file, a builtin preset) written as a Hugging Face folder that
//! transformers and vLLM load.

use anyhow::Context;
use std::path::Path;

/// Loads `from` and writes it to `to`.
pub fn main(from: &str, to: &Path, model: &prism_model::Config, seed: u64) -> anyhow::Result<()> {
    let opts = prism_model::LoadOptions { device: prism_model::Device::Cpu, ..model.load_options(seed)? };
    let loaded = prism_model::load(from, &opts).with_context(|| format!("loading {from}"))?;
    loaded
        .model
        .save_hf_with(to, &loaded.tokenizer, &loaded.generation)
        .with_context(|| format!("writing {}", to.display()))?;
    let c = loaded.model.config();
    println!(
        "prism export: {from} -> {} ({}, {} layers, {} parameters, {})",
        to.display(),
        c.family.architecture(),
        c.num_layers,
        c.num_parameters(),
        model.dtype
    );
    Ok(())
}
