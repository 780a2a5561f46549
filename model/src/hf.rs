//! Hugging Face folders: `config.json`, `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`), the tokenizer files and
//! `generation_config.json`; read into a [`Transformer`], and written back so
//! that transformers (and vLLM) load what prism trained.

use crate::config::{GenerationConfig, HfConfig};
use crate::{Dtype, Error, LoadOptions, Loaded, Result, Tokenizer, Transformer};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Loads an HF model folder.
pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let config_path = dir.join("config.json");
    let hf = HfConfig::from_file(&config_path)?;
    let config = hf.resolve(&config_path)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let gen_path = dir.join("generation_config.json");
    let mut generation =
        if gen_path.exists() { GenerationConfig::from_file(&gen_path)? } else { GenerationConfig::default() };
    if generation.eos_token_ids.is_empty() {
        generation.eos_token_ids = config.eos_token_ids.clone();
    }
    if generation.eos_token_ids.is_empty() {
        generation.eos_token_ids.extend(tokenizer.eos_id());
    }
    let files = safetensors_files(dir)?;
    // config.json's sizes are checked against what the files hold before the
    // model is allocated from them.
    config.check_sizes(values_in(&files)?, &config_path)?;
    let mut model = Transformer::empty(config, opts.device, opts.dtype)?;
    load_safetensors(&model, &files)?;
    // A LoRA checkpoint: the base, and a PEFT adapter beside it to merge.
    if dir.join(crate::lora::ADAPTER_CONFIG).exists() {
        model.merge_adapter(dir)?;
    }
    model.set_tokenizer(tokenizer.clone());
    Ok(Loaded { model, tokenizer, generation })
}

/// The safetensors files of a folder: the shards named by the index, or `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Format { path: index.clone(), reason: e.to_string() })?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Format {
            path: index.clone(),
            reason: "no `weight_map` object".into(),
        })?;
        let mut files = Vec::new();
        for f in map.values() {
            let name = f.as_str().ok_or_else(|| Error::Format { path: index.clone(), reason: format!("shard {f} is not a file name") })?;
            // A shard is a file of the folder: no path that leads elsewhere.
            let plain = Path::new(name).components().count() == 1
                && matches!(Path::new(name).components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                return Err(Error::Format { path: index.clone(), reason: format!("shard {name:?} is not a file of the model folder") });
            }
            files.push(dir.join(name));
        }
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::Io { path: dir.into(), reason: "no model.safetensors or model.safetensors.index.json".into() })
}

/// How many values the tensors of `files` hold in all, from their headers
/// (the safetensors crate checks each header against its file).
fn values_in(files: &[PathBuf]) -> Result<u64> {
    let mut total = 0u64;
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: as in load_safetensors.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::Format { path: path.clone(), reason: format!("not a safetensors file: {e}") })?;
        for (_, view) in st.tensors() {
            let n = view.shape().iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
            total = total.saturating_add(n.unwrap_or(u64::MAX));
        }
    }
    Ok(total)
}

/// Every tensor of one safetensors file, by name, on the CPU.
pub(crate) fn read_safetensors_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: as in load_safetensors.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| Error::Format { path: path.into(), reason: format!("not a safetensors file: {e}") })?;
    st.tensors().into_iter().map(|(name, view)| Ok((name.clone(), view_to_tensor(&view, path, &name)?))).collect()
}

/// A tensor of a safetensors file as a CPU tensor of its own dtype.
fn view_to_tensor(view: &safetensors::tensor::TensorView, path: &Path, name: &str) -> Result<Tensor> {
    let kind = match view.dtype() {
        StDtype::F32 => Kind::Float,
        StDtype::F16 => Kind::Half,
        StDtype::BF16 => Kind::BFloat16,
        StDtype::F64 => Kind::Double,
        other => {
            return Err(Error::UnsupportedType {
                path: path.into(),
                name: name.into(),
                kind: format!("{other:?}"),
                supported: "F32, F16, BF16, F64",
            });
        }
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

/// Fills every parameter of `model` from `files`; names the file and tensor
/// of any missing or misshapen weight.
pub(crate) fn load_safetensors(model: &Transformer, files: &[PathBuf]) -> Result<()> {
    let mut wanted: BTreeMap<String, bool> = model.parameter_names().into_iter().map(|n| (n, false)).collect();
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and lives only while we copy out of it;
        // a checkpoint being rewritten underneath us is outside what we support.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::Format { path: path.clone(), reason: format!("not a safetensors file: {e}") })?;
        for (name, view) in st.tensors() {
            let Some(done) = wanted.get_mut(&name) else { continue };
            let t = view_to_tensor(&view, path, &name)?;
            model.set_parameter(&name, &t, path)?;
            *done = true;
        }
    }
    if let Some((name, _)) = wanted.iter().find(|(_, done)| !**done) {
        let path = if files.len() == 1 { files[0].clone() } else { files[0].parent().unwrap_or(Path::new(".")).into() };
        return Err(Error::MissingTensor { path, name: name.clone() });
    }
    Ok(())
}

impl Transformer {
    /// Writes an HF folder: `config.json`, `model.safetensors` (float32, or the
    /// model's dtype), `generation_config.json` and the tokenizer files, which
    /// `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(dir)` load.
    pub fn save_hf(&self, dir: &Path, tokenizer: &Tokenizer) -> Result<()> {
        self.save_hf_with(dir, tokenizer, &GenerationConfig::default())
    }

    /// [`Transformer::save_hf`] with explicit generation settings.
    pub fn save_hf_with(&self, dir: &Path, tokenizer: &Tokenizer, generation: &GenerationConfig) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut config = self.config().clone();
        if config.eos_token_ids.is_empty() {
            config.eos_token_ids = generation.eos_token_ids.clone();
        }
        let mut json = config.to_hf_json();
        let dtype = match self.var_store().kind() {
            Kind::BFloat16 => Dtype::Bf16,
            Kind::Half => Dtype::F16,
            _ => Dtype::F32,
        };
        json["torch_dtype"] = match dtype {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
        .into();
        write_json(&dir.join("config.json"), &json)?;
        let mut gen_config = generation.clone();
        if gen_config.eos_token_ids.is_empty() {
            gen_config.eos_token_ids = config.eos_token_ids.clone();
        }
        write_json(&dir.join("generation_config.json"), &gen_config.to_hf_json())?;
        let path = dir.join("model.safetensors");
        write_safetensors(&on_cpu_by_name(self.var_store()), &path)?;
        tokenizer.save(dir)
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON serialises");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// The variables of `vs`, detached, contiguous on the CPU, sorted by name:
/// what a safetensors file of them holds.
pub(crate) fn on_cpu_by_name(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> =
        vs.variables().into_iter().map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Writes named CPU tensors as one safetensors file with `{"format": "pt"}`
/// metadata (transformers refuses files without it).
pub(crate) fn write_safetensors(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    struct View {
        dtype: StDtype,
        shape: Vec<usize>,
        data: Vec<u8>,
    }
    impl safetensors::View for &View {
        fn dtype(&self) -> StDtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.data)
        }
        fn data_len(&self) -> usize {
            self.data.len()
        }
    }
    let mut views = Vec::with_capacity(named.len());
    for (name, t) in named {
        let dtype = match t.kind() {
            Kind::Float => StDtype::F32,
            Kind::BFloat16 => StDtype::BF16,
            Kind::Half => StDtype::F16,
            other => return Err(Error::invalid("tensor", format!("`{name}` has kind {other:?}"))),
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        views.push((name.clone(), View { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data }));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let refs: Vec<(&str, &View)> = views.iter().map(|(n, v)| (n.as_str(), v)).collect();
    safetensors::serialize_to_file(refs, Some(metadata), path)
        .map_err(|e| Error::Format { path: path.into(), reason: e.to_string() })
}
