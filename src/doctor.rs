//! `prism doctor`: what this installation can do, checked rather than assumed.

use crate::config::Config;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Prints one line per check. Exits 0: absent CUDA, NCCL or Redis are facts
/// about the machine, not failures of the command.
pub fn run(config: &Config) -> ExitCode {
    println!("prism {}", env!("CARGO_PKG_VERSION"));
    let torch_lib = loaded_libtorch_dir();
    match &torch_lib {
        Some(dir) => println!("libtorch {} ({})", libtorch_version(dir).unwrap_or_else(|| "unknown".into()), dir.display()),
        None => println!("libtorch: not found among the loaded libraries"),
    }
    let cuda = tch::Cuda::is_available();
    let devices = tch::Cuda::device_count();
    println!("cuda: {} ({devices} device{})", if cuda { "available" } else { "not available" }, plural(devices));
    match nccl_version(torch_lib.as_deref()) {
        Ok((version, path)) => println!("nccl: {version} ({})", path.display()),
        Err(reason) => println!("nccl: unavailable ({reason})"),
    }
    let shown = prism_transport::redis::redact_url(&config.redis.url);
    match prism_transport::redis::ping(&config.redis.url, Duration::from_secs(2)) {
        Ok(version) => println!("redis: answers at {shown} (redis {version})"),
        Err(reason) => println!("redis: no answer at {shown} ({reason})"),
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu threads: {cpus} (torch intra-op threads: {})", tch::get_num_threads());
    ExitCode::SUCCESS
}

fn plural(n: i64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The folder of the libtorch this process actually loaded, read from
/// /proc/self/maps (the rpath, LD_LIBRARY_PATH or a system copy may have won).
fn loaded_libtorch_dir() -> Option<PathBuf> {
    loaded_path("/libtorch_cpu.so").and_then(|p| p.parent().map(Path::to_path_buf))
}

/// The path of the first mapped library whose path contains `name`.
fn loaded_path(name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| p.contains(name)).map(PathBuf::from)
}

/// The version of the libtorch in `lib_dir`: the pip wheel's `version.py`, or
/// the libtorch archive's `build-version`.
fn libtorch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let line = text.lines().find(|l| l.starts_with("__version__"))?;
        return Some(line.split(['\'', '"']).nth(1)?.to_string());
    }
    std::fs::read_to_string(root.join("build-version")).ok().map(|s| s.trim().to_string())
}

/// Loads libnccl and asks its version. Looks where the dynamic loader would,
/// then beside the torch wheel (`site-packages/nvidia/nccl/lib`).
fn nccl_version(torch_lib: Option<&Path>) -> Result<(String, PathBuf), String> {
    let mut candidates = vec![PathBuf::from("libnccl.so.2")];
    if let Some(dir) = torch_lib.and_then(|d| d.parent()).and_then(|d| d.parent()) {
        candidates.push(dir.join("nvidia/nccl/lib/libnccl.so.2"));
    }
    let mut last_error = String::from("libnccl.so.2 not found");
    for path in candidates {
        // SAFETY: loading NCCL runs its (C) initialisers only; we call one
        // function with the documented signature `ncclResult_t ncclGetVersion(int*)`.
        let lib = match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => lib,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        let get_version: libloading::Symbol<unsafe extern "C" fn(*mut i32) -> i32> =
            unsafe { lib.get(b"ncclGetVersion\0") }.map_err(|e| format!("{}: {e}", path.display()))?;
        let mut code = 0i32;
        let rc = unsafe { get_version(&mut code) };
        if rc != 0 {
            return Err(format!("ncclGetVersion returned {rc}"));
        }
        return Ok((decode_nccl_version(code), loaded_path("libnccl.so").unwrap_or(path)));
    }
    Err(last_error)
}

/// NCCL's version code: `major*10000 + minor*100 + patch` since 2.9, and
/// `major*1000 + minor*100 + patch` before (nccl.h, `NCCL_VERSION`).
fn decode_nccl_version(code: i32) -> String {
    if code >= 20900 {
        format!("{}.{}.{}", code / 10000, code % 10000 / 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code % 1000 / 100, code % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_version_codes_decode() {
        assert_eq!(decode_nccl_version(22809), "2.28.9");
        assert_eq!(decode_nccl_version(2708), "2.7.8");
    }
}
