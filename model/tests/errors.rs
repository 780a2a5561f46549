//! Weight files that are wrong say which file and which tensor; GGUF blocks
//! dequantize to the values worked out by hand from the ggml block layouts.

mod common;
use prism_model::gguf::GgufFile;
use prism_model::{Error, LoadOptions, load};
use std::path::Path;
use tch::Tensor;

/// A GGUF v3 file with the given tensors `(name, dims, ggml type, bytes)`.
fn write_gguf(path: &Path, tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) {
    let mut out = Vec::new();
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(1u64.to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for (_, _, _, bytes) in tensors {
        let start = out.len();
        out.extend(bytes);
        while (out.len() - start) % 32 != 0 {
            out.push(0);
        }
    }
    std::fs::write(path, out).unwrap();
}

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

#[test]
fn gguf_blocks_dequantize_as_the_layouts_say() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blocks.gguf");
    // Q8_0: d = 0.5, q = -16..16 → x = q / 2.
    let mut q8 = f16(0.5).to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    // Q4_0: d = 2, byte j = (hi << 4) | lo with lo = j % 16, hi = 15 - j % 16:
    // x[j] = 2 (lo - 8), x[16 + j] = 2 (hi - 8).
    let mut q4_0 = f16(2.0).to_vec();
    q4_0.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
    // Q4_1: d = 0.25, m = -1: x = 0.25 q - 1.
    let mut q4_1 = f16(0.25).to_vec();
    q4_1.extend(f16(-1.0));
    q4_1.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
    let f32s: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16s: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&v| f16(v)).collect();
    let bf16s: Vec<u8> = [3.0f32, -0.5].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
    write_gguf(&path, &[
        ("q8", vec![32], 8, q8),
        ("q4_0", vec![32], 2, q4_0),
        ("q4_1", vec![32], 3, q4_1),
        ("f32", vec![2, 2], 0, f32s),
        ("f16", vec![2], 1, f16s),
        ("bf16", vec![2], 30, bf16s),
        ("q5_0", vec![32], 6, vec![0; 22]),
    ]);
    let file = GgufFile::open(&path).unwrap();
    let values = |name: &str| Vec::<f32>::try_from(file.tensor(name).unwrap().flatten(0, -1)).unwrap();
    assert_eq!(values("q8"), (0..32).map(|i| (i as f32 - 16.0) / 2.0).collect::<Vec<_>>());
    let lo: Vec<f32> = (0..16).map(|j| 2.0 * (j as f32 - 8.0)).collect();
    let hi: Vec<f32> = (0..16).map(|j| 2.0 * ((15 - j) as f32 - 8.0)).collect();
    assert_eq!(values("q4_0"), [lo, hi].concat());
    let lo: Vec<f32> = (0..16).map(|j| 0.25 * j as f32 - 1.0).collect();
    let hi: Vec<f32> = (0..16).map(|j| 0.25 * (15 - j) as f32 - 1.0).collect();
    assert_eq!(values("q4_1"), [lo, hi].concat());
    assert_eq!(file.tensor("f32").unwrap().size(), vec![2, 2]);
    assert_eq!(values("f32"), vec![1.5, -2.0, 0.25, 8.0]);
    assert_eq!(values("f16"), vec![1.5, -2.0]);
    assert_eq!(values("bf16"), vec![3.0, -0.5]);

    let err = file.tensor("q5_0").unwrap_err().to_string();
    assert!(err.contains("blocks.gguf") && err.contains("q5_0") && err.contains("Q5_0"), "{err}");
    let err = file.tensor("nope").unwrap_err().to_string();
    assert!(err.contains("blocks.gguf") && err.contains("`nope` is missing"), "{err}");
}

#[test]
fn a_truncated_gguf_names_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    write_gguf(&path, &[("a", vec![4], 0, vec![0; 16]), ("b", vec![64], 0, vec![0; 256])]);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert!(file.tensor("a").is_ok());
    let err = file.tensor("b").unwrap_err();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("cut.gguf") && msg.contains("`b`") && msg.contains("truncated"), "{msg}");

    std::fs::write(&path, &bytes[..20]).unwrap();
    let msg = GgufFile::open(&path).err().unwrap().to_string();
    assert!(msg.contains("cut.gguf") && msg.contains("truncated header"), "{msg}");
    std::fs::write(&path, b"not a gguf at all").unwrap();
    let msg = GgufFile::open(&path).err().unwrap().to_string();
    assert!(msg.contains("bad magic"), "{msg}");
}

#[test]
fn a_truncated_smollm_file_fails_naming_a_tensor() {
    let Some(gguf) = common::smollm_gguf() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("smollm-cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load(cut.to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(msg.contains("smollm-cut.gguf") && msg.contains("blk.") && msg.contains("truncated"), "{msg}");
}

#[test]
fn hf_folders_with_a_missing_or_misshapen_tensor_say_which() {
    let dir = tempfile::tempdir().unwrap();
    let m = load("builtin:tiny-arith", &LoadOptions::default()).unwrap();
    m.model.save_hf(dir.path(), &m.tokenizer).unwrap();
    assert!(load(dir.path().to_str().unwrap(), &LoadOptions::default()).is_ok());
    let file = dir.path().join("model.safetensors");
    let tensors = Tensor::read_safetensors(&file).unwrap();

    let without: Vec<_> = tensors.iter().filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight").map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    Tensor::write_safetensors(&without, &file).unwrap();
    let msg = load(dir.path().to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("`model.layers.1.mlp.up_proj.weight` is missing"), "{msg}");

    let reshaped: Vec<_> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), if n == "model.norm.weight" { t.narrow(0, 0, 100).contiguous() } else { t.shallow_clone() }))
        .collect();
    Tensor::write_safetensors(&reshaped, &file).unwrap();
    let msg = load(dir.path().to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("`model.norm.weight` has shape [100], expected [128]"), "{msg}");

    let msg = load("/no/such/model.gguf", &LoadOptions::default()).err().unwrap().to_string();
    assert!(msg.contains("/no/such/model.gguf") && msg.contains("no such file"), "{msg}");
    let msg = load("builtin:huge", &LoadOptions::default()).err().unwrap().to_string();
    assert!(msg.contains("huge") && msg.contains("tiny-arith"), "{msg}");
}
