//! Helpers shared by the model tests: the repository, the Python reference
//! (transformers in `.venv`), and the SmolLM2 GGUF that scripts/setup fetches.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tch::Tensor;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `model/tests/reference/<script>` with the repository's `.venv` Python,
/// feeding `stdin`; returns stdout, panicking with stderr on failure.
pub fn python(script: &str, args: &[&str], stdin: &str) -> String {
    // PRISM_PYTHON: another interpreter with torch and transformers (GPU machines).
    let py = std::env::var_os("PRISM_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(py.exists() || std::env::var_os("PRISM_PYTHON").is_some(), "{} is missing: run scripts/setup", py.display());
    let mut child = Command::new(py)
        .arg(repo().join("model/tests/reference").join(script))
        .args(args)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python starts");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The SmolLM2-135M-Instruct GGUF (`PRISM_SMOLLM_GGUF` or
/// `.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`). Under CI its absence is a
/// failure; elsewhere the test is skipped with the reason printed.
pub fn smollm_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PRISM_SMOLLM_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.exists() {
        return Some(path);
    }
    let reason = format!("{} is missing: run scripts/setup", path.display());
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("skipped: {reason}");
    None
}

/// The device the parity tests run the model on: `PRISM_TEST_DEVICE` (`cuda`,
/// `cuda:N`; scripts/gpu-check sets it), else the CPU.
pub fn device() -> tch::Device {
    std::env::var("PRISM_TEST_DEVICE").map_or(tch::Device::Cpu, |d| prism_model::parse_device(&d).expect("PRISM_TEST_DEVICE"))
}

/// Load options on [`device`], float32.
pub fn load_options() -> prism_model::LoadOptions {
    prism_model::LoadOptions { device: device(), ..Default::default() }
}

/// Largest absolute difference between two float tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu).to_kind(tch::Kind::Double);
    (cpu(a) - cpu(b)).abs().max().double_value(&[])
}

/// Named tensors of a safetensors file.
pub fn read_safetensors(path: &Path) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}
