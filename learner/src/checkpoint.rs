//! Checkpoint folders: atomic writes, checksum manifests, keep-last-K, and
//! finding the newest intact one.
//!
//! Layout of `<dir>/step-<step:08>/`:
//! - `model.safetensors` (+ `config.json`, tokenizer files when the model
//!   provides them): a Hugging Face model folder;
//! - `optimizer.safetensors`: AdamW moments by parameter name;
//! - `state.json`: step, policy version, data cursor, config hashes, optimizer
//!   step count, RNG state;
//! - `manifest.json`: size and sha256 of every other file, written last.
//!
//! A checkpoint is written into `<dir>/.tmp-step-<step>` with every file and the
//! folder fsynced, then renamed into place; a crash leaves either the old set or
//! the new one, and leftover temporary folders are removed by the next write.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Name of the checksum manifest in a checkpoint folder.
pub const MANIFEST: &str = "manifest.json";
const PREFIX: &str = "step-";
const TMP_PREFIX: &str = ".tmp-";

/// What the caller stores with a checkpoint and gets back on resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// The caller's step number (names the folder).
    pub step: u64,
    /// The policy version of the saved weights.
    pub policy_version: u64,
    /// Where the data source stands (opaque to the learner).
    pub data_cursor: serde_json::Value,
    /// Hash of the run's whole configuration (see [`config_hash`]).
    pub config_hash: String,
}

/// A checkpoint folder that was skipped, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// An intact checkpoint folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub step: u64,
}

/// The outcome of a resume.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    /// The checkpoint used.
    pub path: PathBuf,
    pub meta: CheckpointMeta,
    /// Newer checkpoints that failed verification, newest first.
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, FileSum>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileSum {
    bytes: u64,
    sha256: String,
}

/// Hex sha256 of the JSON form of `value` (e.g. a configuration).
pub fn config_hash(value: &impl Serialize) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    hex(&Sha256::digest(&json))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn file_sum(path: &Path) -> Result<FileSum> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum { bytes, sha256: hex(&hasher.finalize()) })
}

fn sync_path(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// The folder name of `step`.
pub fn folder_name(step: u64) -> String {
    format!("{PREFIX}{step:08}")
}

/// Writes a checkpoint for `step` into `dir` atomically: `fill` writes the files
/// into a temporary folder, then the manifest is added, everything fsynced and
/// the folder renamed to `step-<step>`. Keeps the newest `keep` checkpoints.
pub fn write_atomic(dir: &Path, step: u64, keep: usize, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_temporaries(dir);
    let name = folder_name(step);
    let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    fill(&tmp)?;

    let mut files = BTreeMap::new();
    for entry in fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))? {
        let entry = entry.map_err(|e| Error::io(&tmp, e))?;
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_file() {
            return Err(Error::Checkpoint { path: path.clone(), reason: "checkpoints hold plain files only".into() });
        }
        sync_path(&path)?;
        files.insert(file_name, file_sum(&path)?);
    }
    let manifest_path = tmp.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&Manifest { files })
        .map_err(|e| Error::Checkpoint { path: manifest_path.clone(), reason: e.to_string() })?;
    fs::write(&manifest_path, json).map_err(|e| Error::io(&manifest_path, e))?;
    sync_path(&manifest_path)?;
    sync_path(&tmp)?;

    let target = dir.join(&name);
    if target.exists() {
        fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
    }
    fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
    sync_path(dir)?;

    let all = list(dir)?;
    if all.len() > keep {
        for old in &all[..all.len() - keep] {
            fs::remove_dir_all(&old.path).map_err(|e| Error::io(&old.path, e))?;
        }
    }
    Ok(target)
}

fn remove_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an unfinished checkpoint");
            }
        }
    }
}

/// The checkpoint folders in `dir` (complete or not), oldest first.
pub fn list(dir: &Path) -> Result<Vec<Checkpoint>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().is_dir() {
                found.push(Checkpoint { path: entry.path(), step });
            }
        }
    }
    found.sort_by_key(|c| c.step);
    Ok(found)
}

/// Checks every file of a checkpoint folder against its manifest.
pub fn verify(path: &Path) -> std::result::Result<(), String> {
    let manifest_path = path.join(MANIFEST);
    let text = fs::read(&manifest_path).map_err(|e| format!("{MANIFEST}: {e} (unfinished write?)"))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| format!("{MANIFEST}: not a manifest ({e})"))?;
    if manifest.files.is_empty() {
        return Err(format!("{MANIFEST}: lists no files"));
    }
    for (name, want) in &manifest.files {
        let file = path.join(name);
        let got = file_sum(&file).map_err(|_| format!("{name}: missing"))?;
        if got.bytes != want.bytes {
            return Err(format!("{name}: {} bytes, the manifest says {} (truncated?)", got.bytes, want.bytes));
        }
        if got.sha256 != want.sha256 {
            return Err(format!("{name}: sha256 {} does not match the manifest's {}", got.sha256, want.sha256));
        }
    }
    Ok(())
}

/// The newest checkpoint in `dir` that passes [`verify`], and the newer ones
/// that did not (each logged as a warning). `None` when none is intact.
pub fn latest_intact(dir: &Path) -> Result<(Option<Checkpoint>, Vec<Rejected>)> {
    let mut rejected = Vec::new();
    for candidate in list(dir)?.into_iter().rev() {
        match verify(&candidate.path) {
            Ok(()) => return Ok((Some(candidate), rejected)),
            Err(reason) => {
                tracing::warn!(checkpoint = %candidate.path.display(), %reason, "skipping a damaged checkpoint");
                rejected.push(Rejected { path: candidate.path, reason });
            }
        }
    }
    Ok((None, rejected))
}

#[cfg(test)]
mod tests;
