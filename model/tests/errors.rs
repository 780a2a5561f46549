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
    // Found when the file is opened, before anything is read or allocated.
    let err = GgufFile::open(&path).err().unwrap();
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

/// A GGUF whose header lies: dimensions whose product overflows, an offset
/// past the end, a dimension past any tensor. Each is an error naming the
/// file and the tensor when the file is opened, before anything is allocated.
#[test]
fn a_gguf_with_lying_tensor_entries_is_refused_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lies.gguf");
    for (dims, offset_fix, want) in [
        (vec![1u64 << 33, 1 << 33], None, "overflow"),
        (vec![4], Some(u64::MAX - 8), "truncated"),
        (vec![1u64 << 63], None, "past any tensor"),
    ] {
        write_gguf(&path, &[("a", vec![4], 0, vec![0; 16]), ("liar", dims.clone(), 0, vec![0; 16])]);
        if let Some(offset) = offset_fix {
            // The last u64 before the data's alignment padding is `liar`'s offset.
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.windows(4).rposition(|w| w == b"liar").unwrap() + 4 + 4 + 8 * dims.len() + 4;
            bytes[at..at + 8].copy_from_slice(&offset.to_le_bytes());
            std::fs::write(&path, bytes).unwrap();
        }
        let msg = GgufFile::open(&path).err().unwrap().to_string();
        assert!(msg.contains("lies.gguf") && msg.contains("`liar`") && msg.contains(want), "{dims:?}: {msg}");
    }
}

/// Sizes a model would be allocated from (a config.json or GGUF metadata)
/// are checked against what the file holds: a vocabulary of 2^40, sizes whose
/// product overflows, a zero head count, RoPE tables past 2^31 values.
#[test]
fn model_sizes_past_what_the_file_holds_are_refused() {
    let base = load("builtin:tiny-arith", &LoadOptions::default()).unwrap().model.config().clone();
    let held = base.weight_count().unwrap();
    let origin = Path::new("model/config.json");
    base.check_sizes(held, origin).unwrap();
    // A file a few tensors short is left to the load, which names them.
    base.check_sizes(held / 2, origin).unwrap();
    let cases = [
        (prism_model::ModelConfig { vocab_size: 1 << 40, ..base.clone() }, "the file holds"),
        (prism_model::ModelConfig { hidden_size: usize::MAX / 2, ..base.clone() }, "overflow"),
        (prism_model::ModelConfig { num_heads: 0, ..base.clone() }, "attention heads is 0"),
        (prism_model::ModelConfig { num_kv_heads: 3, ..base.clone() }, "do not share out"),
        (prism_model::ModelConfig { max_position_embeddings: 1 << 40, ..base.clone() }, "RoPE tables"),
    ];
    for (config, want) in cases {
        let msg = config.check_sizes(held, origin).unwrap_err().to_string();
        assert!(msg.contains("model/config.json") && msg.contains(want), "{want}: {msg}");
    }
}

/// A sharded folder's index may only name files of the folder.
#[test]
fn an_index_naming_a_shard_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = load("builtin:tiny-arith", &LoadOptions::default()).unwrap();
    m.model.save_hf(dir.path(), &m.tokenizer).unwrap();
    for shard in ["../model.safetensors", "/etc/passwd", "sub/../../x.safetensors"] {
        let index = serde_json::json!({"weight_map": {"model.norm.weight": shard}});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let msg = load(dir.path().to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string();
        assert!(msg.contains("model.safetensors.index.json") && msg.contains("not a file of the model folder"), "{shard}: {msg}");
    }
}

/// A deterministic xorshift, so that a failing mutant can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Mutated headers of the real SmolLM2 GGUF (counts, lengths, types,
/// dimensions and offsets overwritten with random or extreme values, mostly
/// where the counts and the tensor index are) never panic or abort: opening,
/// the model config, the tokenizer, the size check and tensor reads each work
/// or fail with an error naming the file; every 20th mutant is loaded whole.
#[test]
fn mutated_gguf_headers_never_panic() {
    let Some(gguf) = common::smollm_gguf() else { return };
    let header = GgufFile::open(&gguf).unwrap().data_start() as usize;
    let original = std::fs::read(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutant.gguf");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut refused = 0;
    for mutant in 0..120 {
        let mut bytes = original.clone();
        let mut what = Vec::new();
        for _ in 0..1 + rng.below(4) {
            let at = match rng.below(3) {
                0 => rng.below(64),
                1 => (header as u64).saturating_sub(24 << 10) + rng.below(24 << 10),
                _ => rng.below(header as u64),
            } as usize;
            let width = [1usize, 4, 8][rng.below(3) as usize].min(bytes.len() - at);
            let value: u64 = match rng.below(4) {
                0 => u64::MAX,
                1 => 1 << (32 + rng.below(31)),
                2 => 0,
                _ => rng.next(),
            };
            bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            what.push((at, width, value));
        }
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), Error> {
            let file = GgufFile::open(&path)?;
            let config = file.model_config()?;
            file.tokenizer()?;
            config.check_sizes(file.values(), &path)?;
            for name in ["output_norm.weight", "blk.0.attn_norm.weight", "blk.29.ffn_norm.weight"] {
                let _ = file.tensor(name)?;
            }
            if mutant % 20 == 0 {
                load(path.to_str().unwrap(), &LoadOptions::default())?;
            }
            Ok(())
        }));
        match outcome {
            Err(_) => panic!("mutant {mutant} ({what:?}) panicked"),
            Ok(Err(e)) => {
                refused += 1;
                assert!(e.to_string().contains("mutant.gguf"), "mutant {mutant} ({what:?}): the error does not name the file: {e}");
            }
            Ok(Ok(())) => {}
        }
    }
    assert!(refused >= 30, "most mutants are refused ({refused} of 120)");
}
