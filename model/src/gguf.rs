//! GGUF files (llama.cpp): metadata, tensors dequantized to float32 at load
//! (F32, F16, BF16, Q8_0, Q4_0, Q4_1), and the tokenizer rebuilt from the
//! `tokenizer.ggml.*` metadata.
//!
//! Format facts (GGUF spec, ggml docs/gguf.md): little-endian; header `GGUF`,
//! version u32, tensor count u64, metadata count u64; metadata as (string key,
//! u32 type, value); tensor infos as (name, n_dims u32, dims u64 × n, ggml type
//! u32, offset u64) with `dims[0]` the fastest-varying; tensor data starts at the
//! next multiple of `general.alignment` (default 32) after the infos. Block
//! layouts (ggml-common.h): Q8_0 = f16 d + 32 × i8, x = d·q; Q4_0 = f16 d + 16
//! bytes, x = d·(nibble − 8); Q4_1 = f16 d + f16 m + 16 bytes, x = d·nibble + m;
//! element j of a Q4 block is the low nibble of byte j for j < 16 and the high
//! nibble of byte j − 16 otherwise.

use crate::config::{Family, GenerationConfig, ModelConfig, RopeScaling};
use crate::{Error, LoadOptions, Loaded, Result, Tokenizer, Transformer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// An integer value of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::U16(v) => Some(v as u64),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::U32(v) => Some(v as u64),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types prism reads.
const F32: u32 = 0;
const F16: u32 = 1;
const Q4_0: u32 = 2;
const Q4_1: u32 = 3;
const Q8_0: u32 = 8;
const BF16: u32 = 30;
const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

fn type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        30 => "BF16",
        _ => return format!("ggml type {t}"),
    };
    name.to_string()
}

/// (elements per block, bytes per block).
fn block_layout(t: u32) -> Option<(usize, usize)> {
    match t {
        F32 => Some((1, 4)),
        F16 | BF16 => Some((1, 2)),
        Q4_0 => Some((32, 18)),
        Q4_1 => Some((32, 20)),
        Q8_0 => Some((32, 34)),
        _ => None,
    }
}

/// One tensor's entry in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them (fastest-varying first).
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The shape in PyTorch order (slowest-varying first). [`GgufFile::open`]
    /// has checked that every dimension fits.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    /// Its number of values; `None` when the dimensions' product overflows.
    fn numel(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }

    /// Its data's length in bytes, for the types this reader knows (`None`
    /// for others, or when it overflows).
    fn byte_len(&self) -> Option<u64> {
        let (block, block_bytes) = block_layout(self.ggml_type)?;
        (self.numel()? / block as u64).checked_mul(block_bytes as u64)
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| Error::Format {
            path: self.path.into(),
            reason: format!("truncated header: needs {n} bytes at offset {} of {}", self.pos, self.bytes.len()),
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let b = self.take(n)?;
        Ok(String::from_utf8_lossy(b).into_owned())
    }
    fn value(&mut self, t: u32, depth: u32) -> Result<Value> {
        Ok(match t {
            0 => Value::U8(self.u8()?),
            1 => Value::I8(self.u8()? as i8),
            2 => Value::U16(self.u16()?),
            3 => Value::I16(self.u16()? as i16),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(self.u32()? as i32),
            6 => Value::F32(f32::from_bits(self.u32()?)),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 if depth < 4 => {
                let item_type = self.u32()?;
                let n = self.u64()? as usize;
                // Every item takes at least one byte: bound the allocation by the file.
                if n > self.bytes.len() - self.pos {
                    return Err(Error::Format {
                        path: self.path.into(),
                        reason: format!("array of {n} items at offset {} runs past the end", self.pos),
                    });
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            _ => {
                return Err(Error::Format {
                    path: self.path.into(),
                    reason: format!("unknown metadata value type {t} at offset {}", self.pos),
                });
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses the header, metadata and tensor index of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not write; see hf.rs.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut r = Reader { bytes: &mmap, pos: 0, path };
        let magic = r.take(4)?;
        if magic != b"GGUF" {
            return Err(Error::Format { path: path.into(), reason: "not a GGUF file (bad magic)".into() });
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Format { path: path.into(), reason: format!("GGUF version {version} (supported: 2, 3)") });
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let t = r.u32()?;
            let v = r.value(t, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 4 {
                return Err(Error::Format { path: path.into(), reason: format!("tensor `{name}` has {n_dims} dimensions") });
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = r.u32()?;
            let offset = r.u64()?;
            tensors.insert(name.clone(), TensorInfo { name, dims, ggml_type, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32).max(1);
        let data_start = (r.pos as u64).div_ceil(alignment).checked_mul(alignment).ok_or_else(|| Error::Format {
            path: path.into(),
            reason: format!("general.alignment {alignment} puts the data past any file"),
        })?;
        drop(r);
        // Every tensor's size and place checked now, before anything is
        // allocated from them: its values lie within the file.
        let len = mmap.len() as u64;
        for info in tensors.values() {
            let lie = |reason: String| Error::Format { path: path.into(), reason: format!("tensor `{}`: {reason}", info.name) };
            if info.dims.iter().any(|&d| i64::try_from(d).is_err()) {
                return Err(lie(format!("dimensions {:?} past any tensor", info.dims)));
            }
            if info.numel().is_none() {
                return Err(lie(format!("dimensions {:?} overflow when multiplied out", info.dims)));
            }
            if block_layout(info.ggml_type).is_some() {
                let start = data_start.saturating_add(info.offset);
                let end = info.byte_len().and_then(|n| data_start.checked_add(info.offset)?.checked_add(n));
                if end.is_none_or(|end| end > len) {
                    return Err(Error::Truncated { path: path.into(), name: info.name.clone(), start, end: end.unwrap_or(u64::MAX), len });
                }
            }
        }
        Ok(Self { path: path.into(), mmap, version, metadata, tensors, data_start })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the tensor data starts: the header (metadata and tensor index)
    /// is everything before.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// How many values its tensors hold in all (checked when opened; saturating).
    pub fn values(&self) -> u64 {
        self.tensors.values().filter_map(TensorInfo::numel).fold(0u64, u64::saturating_add)
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Tensor `name` dequantized to float32, in PyTorch shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.path.clone(), name: name.into() })?;
        let (block, block_bytes) = block_layout(info.ggml_type).ok_or_else(|| Error::UnsupportedType {
            path: self.path.clone(),
            name: name.into(),
            kind: type_name(info.ggml_type),
            supported: SUPPORTED,
        })?;
        let n = info.numel().expect("checked when the file was opened");
        if n % block as u64 != 0 {
            return Err(Error::Format {
                path: self.path.clone(),
                reason: format!("tensor `{name}`: {n} elements is not a multiple of the block size {block}"),
            });
        }
        let start = self.data_start + info.offset;
        let end = start + n / block as u64 * block_bytes as u64;
        let len = self.mmap.len() as u64;
        if end > len {
            return Err(Error::Truncated { path: self.path.clone(), name: name.into(), start, end, len });
        }
        let bytes = &self.mmap[start as usize..end as usize];
        let values = dequantize(info.ggml_type, bytes, n as usize);
        Ok(Tensor::from_slice(&values).view(info.shape().as_slice()))
    }
}

fn dequantize(t: u32, bytes: &[u8], n: usize) -> Vec<f32> {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::with_capacity(n);
    match t {
        F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        F16 => out.extend(bytes.chunks_exact(2).map(f16)),
        BF16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16(&b[0..2]);
                out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
            }
        }
        Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16(&b[0..2]);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
            }
        }
        Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
        }
        _ => unreachable!("checked by block_layout"),
    }
    out
}

/// Undoes llama.cpp's reordering of q/k rows for Llama-architecture GGUF files:
/// its converter turns the rotate-half RoPE layout into the interleaved one by
/// viewing rows as `[heads, 2, head_dim/2]` and swapping the last two axes
/// (convert_hf_to_gguf.py `LlamaModel.permute`); the inverse views them as
/// `[heads, head_dim/2, 2]` and swaps back.
fn unpermute(w: &Tensor, heads: i64) -> Tensor {
    let size = w.size();
    let rows = size[0];
    let mut view = vec![heads, rows / heads / 2, 2];
    view.extend_from_slice(&size[1..]);
    w.view(view.as_slice()).transpose(1, 2).reshape(size.as_slice())
}

/// The HF name of a GGUF tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// The GGUF name of an HF parameter name (inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{param}"))
}

impl GgufFile {
    /// The model configuration the metadata describes.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.get("general.architecture").and_then(Value::as_str).unwrap_or("").to_string();
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(Error::Format {
                    path: self.path.clone(),
                    reason: format!("architecture {other:?} is not supported (llama, qwen2, qwen3)"),
                });
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| -> Result<usize> {
            self.get(&key(k)).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| Error::Format {
                path: self.path.clone(),
                reason: format!("metadata `{}` is missing", key(k)),
            })
        };
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = int("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = int("attention.key_length").or_else(|_| int("rope.dimension_count")).unwrap_or(hidden_size / num_heads.max(1));
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len())
                .or_else(|| self.tensors.get("token_embd.weight").and_then(|t| t.dims.get(1)).map(|&d| d as usize))
                .unwrap_or(0),
        };
        let rope_scaling = match self.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self.get(&key("rope.scaling.factor")).and_then(Value::as_f64).unwrap_or(1.0),
            },
            Some(other) => {
                return Err(Error::Format {
                    path: self.path.clone(),
                    reason: format!("rope scaling {other:?} is not supported (none, linear)"),
                });
            }
        };
        let tok = |k: &str| self.get(&format!("tokenizer.ggml.{k}")).and_then(Value::as_u64).map(|v| v as u32);
        Ok(ModelConfig {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: int("context_length").unwrap_or(2048),
            rms_norm_eps: self.get(&key("attention.layer_norm_rms_epsilon")).and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta: self.get(&key("rope.freq_base")).and_then(Value::as_f64).unwrap_or(10000.0),
            rope_scaling,
            qkv_bias: self.tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: self.tensors.contains_key("blk.0.attn_q_norm.weight"),
            o_bias: self.tensors.contains_key("blk.0.attn_output.bias"),
            mlp_bias: self.tensors.contains_key("blk.0.ffn_up.bias"),
            tie_word_embeddings: !self.tensors.contains_key("output.weight"),
            sliding_window: None,
            gemma: None,
            bos_token_id: tok("bos_token_id"),
            eos_token_ids: tok("eos_token_id").into_iter().collect(),
            pad_token_id: tok("padding_token_id"),
        })
    }

    /// The tokenizer the metadata describes. Byte-level BPE (`gpt2`) is built
    /// as transformers' GGUF converter builds it: BPE over the vocabulary and
    /// merges, a byte-level pre-tokenizer and decoder; tokens typed CONTROL (3)
    /// become special added tokens and USER_DEFINED (4) plain added tokens.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        if model != "gpt2" {
            return Err(Error::Format {
                path: self.path.clone(),
                reason: format!("tokenizer model {model:?} is not supported (gpt2 byte-level BPE)"),
            });
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let arr = self.get(k).and_then(Value::as_array).ok_or_else(|| Error::Format {
                path: self.path.clone(),
                reason: format!("metadata `{k}` is missing"),
            })?;
            Ok(arr.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect())
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges").unwrap_or_default();
        let types: Vec<u64> = self
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let alphabet = byte_alphabet();
        let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = serde_json::Map::new();
        for (i, t) in tokens.iter().enumerate() {
            let spelled = if in_alphabet(t) { t.clone() } else { t.bytes().map(|b| alphabet[b as usize]).collect() };
            vocab.insert(spelled, i.into());
        }
        let merges: Vec<serde_json::Value> = merges
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| serde_json::json!([a, b]))
            .collect();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = types.get(i).copied().unwrap_or(1);
            let special = ty == 3 && in_alphabet(t);
            if special || (ty == 4 && vocab.contains_key(t)) {
                added.push(serde_json::json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": special,
                }));
            }
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        });
        let mut tok = Tokenizer::from_json(&json.to_string(), &self.path)?;
        let id_token = |k: &str| {
            self.get(&format!("tokenizer.ggml.{k}")).and_then(Value::as_u64).and_then(|i| tokens.get(i as usize)).cloned()
        };
        tok.bos_token = id_token("bos_token_id");
        tok.eos_token = id_token("eos_token_id");
        tok.pad_token = id_token("padding_token_id");
        tok.unk_token = id_token("unknown_token_id");
        tok.add_bos = self.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false);
        tok.chat_template = self.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
        Ok(tok)
    }
}

/// GPT-2's byte → printable character table: bytes `!`..`~`, `¡`..`¬` and
/// `®`..`ÿ` stand for themselves, the other 68 map to U+0100 onwards in order.
fn byte_alphabet() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("a Latin-1 code point")
        } else {
            let c = char::from_u32(next).expect("a BMP code point");
            next += 1;
            c
        };
    }
    table
}

/// Loads a GGUF file: weights dequantized into `opts.dtype`, tokenizer from metadata.
pub fn load_file(path: &Path, opts: &LoadOptions) -> Result<Loaded> {
    let file = GgufFile::open(path)?;
    let config = file.model_config()?;
    let tokenizer = file.tokenizer()?;
    let generation = GenerationConfig {
        eos_token_ids: config.eos_token_ids.clone(),
        bos_token_id: config.bos_token_id,
        pad_token_id: config.pad_token_id,
        ..Default::default()
    };
    let llama = matches!(config.family, Family::Llama | Family::Mistral);
    let (heads, kv_heads) = (config.num_heads as i64, config.num_kv_heads as i64);
    // The metadata's sizes are checked against what the file holds before
    // the model is allocated from them.
    config.check_sizes(file.values(), path)?;
    let mut model = Transformer::empty(config, opts.device, opts.dtype)?;
    for name in model.parameter_names() {
        let g = gguf_name(&name).ok_or_else(|| Error::invalid("parameter", &name))?;
        let mut t = file.tensor(&g)?;
        if llama && g.ends_with("attn_q.weight") {
            t = unpermute(&t, heads);
        } else if llama && g.ends_with("attn_k.weight") {
            t = unpermute(&t, kv_heads);
        }
        model.set_parameter(&name, &t, path).map_err(|e| match e {
            Error::WrongShape { path, got, want, .. } => Error::WrongShape { path, name: g.clone(), got, want },
            other => other,
        })?;
    }
    model.set_tokenizer(tokenizer.clone());
    Ok(Loaded { model, tokenizer, generation })
}
