//! A policy version as bytes: named tensors, little-endian and row-major,
//! made from and applied to libtorch tensors.

use crate::{Error, Result};
use bytes::Bytes;
use prism_proto::v1;
use tch::{Kind, Tensor};

/// One named tensor's bytes (little-endian, row-major, on the CPU), in one or
/// more consecutive pieces (as published: one; as received: one per chunk, so
/// they are applied without being copied together first).
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub dtype: v1::DType,
    pub shape: Vec<i64>,
    pub pieces: Vec<Bytes>,
}

impl TensorData {
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one piece.
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

impl PartialEq for TensorData {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.dtype == other.dtype && self.shape == other.shape && self.to_vec() == other.to_vec()
    }
}

/// A policy version: every parameter of the model, by name; or a LoRA
/// policy's version as its adapters, or its frozen base (see [`Part`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightBytes {
    pub version: u64,
    pub part: Part,
    pub tensors: Vec<TensorData>,
}

/// What a [`WeightBytes`] holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Part {
    /// Every parameter of the model at the version.
    Whole,
    /// The version's LoRA adapters (PEFT names), merged over the frozen base
    /// `base` at `scale` (alpha / rank) to make the version.
    Adapters { base: u64, scale: f64 },
    /// The frozen base `id` itself (its version is 0).
    Base { id: u64 },
}

impl Part {
    /// `(base, adapter_scale, is_base)` as a chunk carries them (see `WeightChunk`).
    pub fn to_wire(self) -> (u64, f64, bool) {
        match self {
            Part::Whole => (0, 0.0, false),
            Part::Adapters { base, scale } => (base, scale, false),
            Part::Base { id } => (id, 0.0, true),
        }
    }

    /// The part chunks tagged `(base, adapter_scale, is_base)` hold.
    pub fn from_wire(base: u64, scale: f64, is_base: bool) -> Self {
        match (base, is_base) {
            (0, _) => Part::Whole,
            (id, true) => Part::Base { id },
            (base, false) => Part::Adapters { base, scale },
        }
    }
}

/// The id of a frozen base: a hash of its names, shapes, dtypes and bytes
/// (never 0), the same in every process that holds the same base, so that a
/// restarted learner's rollouts keep the base they have.
pub fn base_id(tensors: &[TensorData]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    let mut total = 0u64;
    for t in tensors {
        h.update(t.name.as_bytes());
        h.update(&(t.dtype as i32).to_le_bytes());
        for d in &t.shape {
            h.update(&d.to_le_bytes());
        }
        for p in &t.pieces {
            h.update(p);
        }
        total = total.wrapping_add(t.len() as u64);
    }
    (total << 32 | u64::from(h.finalize())).max(1)
}

fn dtype_of(kind: Kind) -> Option<v1::DType> {
    Some(match kind {
        Kind::Float => v1::DType::F32,
        Kind::Half => v1::DType::F16,
        Kind::BFloat16 => v1::DType::Bf16,
        Kind::Double => v1::DType::F64,
        Kind::Int64 => v1::DType::I64,
        Kind::Int => v1::DType::I32,
        Kind::Uint8 => v1::DType::U8,
        _ => return None,
    })
}

fn kind_of(dtype: v1::DType) -> Option<(Kind, usize)> {
    Some(match dtype {
        v1::DType::F32 => (Kind::Float, 4),
        v1::DType::F16 => (Kind::Half, 2),
        v1::DType::Bf16 => (Kind::BFloat16, 2),
        v1::DType::F64 => (Kind::Double, 8),
        v1::DType::I64 => (Kind::Int64, 8),
        v1::DType::I32 => (Kind::Int, 4),
        v1::DType::U8 => (Kind::Uint8, 1),
        v1::DType::Unspecified => return None,
    })
}

impl WeightBytes {
    /// Copies `tensors` (any device) to CPU bytes, in the order given.
    pub fn from_tensors<'a>(version: u64, tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                let bad = |reason: String| Error::Tensor { version, name: name.to_string(), reason };
                let dtype = dtype_of(t.kind()).ok_or_else(|| bad(format!("unsupported dtype {:?}", t.kind())))?;
                let t = t.detach().to_device(tch::Device::Cpu).contiguous();
                let numel = t.numel();
                let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
                t.f_copy_data_u8(&mut data, numel).map_err(|e| bad(e.to_string()))?;
                Ok(TensorData { name: name.to_string(), dtype, shape: t.size(), pieces: vec![data.into()] })
            })
            .collect::<Result<_>>()?;
        Ok(Self { version, part: Part::Whole, tensors })
    }

    /// The same tensors, holding `part`.
    pub fn with_part(self, part: Part) -> Self {
        Self { part, ..self }
    }

    /// Every variable of `vs`, sorted by name.
    pub fn from_var_store(version: u64, vs: &tch::nn::VarStore) -> Result<Self> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_tensors(version, vars.iter().map(|(n, t)| (n.as_str(), t)))
    }

    /// Total payload bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len() as u64).sum()
    }

    /// The tensors as CPU `tch` tensors, by name (one copy of each).
    pub fn to_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.tensors
            .iter()
            .map(|t| {
                let bad = |reason: String| Error::Tensor { version: self.version, name: t.name.clone(), reason };
                let (kind, elt) = kind_of(t.dtype).ok_or_else(|| bad("unspecified dtype".into()))?;
                let want = t
                    .shape
                    .iter()
                    .try_fold(elt, |n, &d| usize::try_from(d).ok().and_then(|d| n.checked_mul(d)))
                    .ok_or_else(|| bad(format!("shape {:?} is negative or too large", t.shape)))?;
                if t.len() != want {
                    return Err(bad(format!("has {} bytes, its shape and dtype need {want}", t.len())));
                }
                let tensor = Tensor::f_from_slice(&t.to_vec())
                    .and_then(|b| b.f_view_dtype(kind))
                    .and_then(|b| b.f_view(t.shape.as_slice()))
                    .map_err(|e| bad(e.to_string()))?;
                Ok((t.name.clone(), tensor))
            })
            .collect()
    }

    /// Copies every tensor into the variable of the same name in `vs`
    /// (converting dtype and device as needed). The set and the store must have
    /// exactly the same names and shapes; nothing is copied otherwise.
    pub fn apply_to(&self, vs: &tch::nn::VarStore) -> Result<()> {
        if self.part != Part::Whole {
            return Err(Error::Weights {
                version: self.version,
                reason: format!("holds {:?}, not the whole model: merge the adapters over their base first", self.part),
            });
        }
        let vars = vs.variables();
        let bad = |name: &str, reason: String| Error::Tensor { version: self.version, name: name.to_string(), reason };
        for t in &self.tensors {
            let var = vars.get(&t.name).ok_or_else(|| bad(&t.name, "no variable of this name in the model".into()))?;
            if var.size() != t.shape {
                return Err(bad(&t.name, format!("has shape {:?}, the model's is {:?}", t.shape, var.size())));
            }
            let (_, elt) = kind_of(t.dtype).ok_or_else(|| bad(&t.name, "unspecified dtype".into()))?;
            let want = t.shape.iter().product::<i64>() as usize * elt;
            if t.len() != want {
                return Err(bad(&t.name, format!("has {} bytes, its shape and dtype need {want}", t.len())));
            }
        }
        if vars.len() != self.tensors.len() {
            let mut missing: Vec<&String> =
                vars.keys().filter(|k| !self.tensors.iter().any(|t| &t.name == *k)).collect();
            missing.sort();
            return Err(Error::Weights {
                version: self.version,
                reason: format!("lacks {} of the model's variables, e.g. {:?}", missing.len(), missing.first()),
            });
        }
        let _guard = tch::no_grad_guard();
        for t in &self.tensors {
            let (kind, _) = kind_of(t.dtype).ok_or_else(|| bad(&t.name, "unspecified dtype".into()))?;
            let var = &vars[&t.name];
            // Same dtype: each piece's bytes straight into their place in the
            // variable (no staging copy, any alignment).
            if var.is_contiguous() && var.kind() == kind && var.device() == tch::Device::Cpu {
                // A plain memcpy: torch's own copy would start a parallel region
                // per piece, which stalls when the machine's cores are busy.
                let dst = var.data_ptr() as *mut u8;
                let mut at = 0usize;
                for p in &t.pieces {
                    // SAFETY: `var` is a contiguous CPU tensor of `kind` and
                    // `t.shape`, so it owns exactly `t.len()` bytes from `dst`
                    // (both checked above); the pieces add up to that length and
                    // do not overlap the variable; nothing else uses the
                    // variable while weights are applied (between generations).
                    unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.add(at), p.len()) };
                    at += p.len();
                }
            } else if var.is_contiguous() && var.kind() == kind {
                let flat = var.f_view_dtype(Kind::Uint8).and_then(|v| v.f_view([-1])).map_err(|e| bad(&t.name, e.to_string()))?;
                let mut at = 0i64;
                for p in &t.pieces {
                    let n = p.len() as i64;
                    // SAFETY: `p` holds `n` initialised bytes and outlives
                    // `src`, which `copy_` only reads.
                    let src = unsafe { Tensor::f_from_blob(p.as_ptr(), &[n], &[], Kind::Uint8, tch::Device::Cpu) };
                    src.and_then(|src| flat.f_narrow(0, at, n)?.f_copy_(&src)).map_err(|e| bad(&t.name, e.to_string()))?;
                    at += n;
                }
            } else {
                let src = Tensor::f_from_slice(&t.to_vec())
                    .and_then(|b| b.f_view_dtype(kind))
                    .and_then(|b| b.f_view(t.shape.as_slice()))
                    .map_err(|e| bad(&t.name, e.to_string()))?;
                var.shallow_clone().f_copy_(&src).map_err(|e| bad(&t.name, e.to_string()))?;
            }
        }
        Ok(())
    }
}
