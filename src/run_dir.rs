//! The run folder: `runs/<run-id>/` with the resolved `config.toml`, the
//! `trace.jsonl`, and (written by the training commands) `metrics.jsonl` and
//! `checkpoints/`.

use std::hash::{BuildHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One run's folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub id: String,
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `root/<new id>/` and writes the resolved configuration into it.
    pub fn create(root: &Path, config_toml: &str) -> std::io::Result<Self> {
        loop {
            let id = new_run_id(SystemTime::now(), random_suffix());
            let path = root.join(&id);
            std::fs::create_dir_all(root)?;
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    std::fs::write(path.join("config.toml"), config_toml)?;
                    return Ok(Self { id, path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl RunDir {
    /// An existing run folder (to resume it).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if !path.join("config.toml").is_file() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no config.toml in it"));
        }
        let id = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Self { id, path: path.to_path_buf() })
    }
}

/// The newest run folder under `root` of the distributed run `run_id` (its
/// recorded `dist.run_id`) that holds a checkpoint, if any. Folder names sort
/// by start time.
pub fn latest_resumable(root: &Path, run_id: &str) -> std::io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Ok(text) = std::fs::read_to_string(path.join("config.toml")) else { continue };
        let recorded = text.parse::<toml::Table>().ok().and_then(|t| {
            t.get("dist").and_then(|d| d.get("run_id")).and_then(|v| v.as_str()).map(str::to_string)
        });
        let has_checkpoint = std::fs::read_dir(path.join("checkpoints")).is_ok_and(|mut d| d.next().is_some());
        if recorded.as_deref() == Some(run_id) && has_checkpoint {
            found.push(path);
        }
    }
    Ok(found.into_iter().max_by(|a, b| a.file_name().cmp(&b.file_name())))
}

/// `YYYYMMDD-HHMMSS-xxxx`: UTC time of creation and 4 random hex digits, so ids
/// sort by start time and two runs started in the same second do not collide.
pub fn new_run_id(now: SystemTime, suffix: u16) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = prism_model::chat::civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}-{suffix:04x}", s / 3600, s % 3600 / 60, s % 60)
}

fn random_suffix() -> u16 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    (SystemTime::now(), std::process::id()).hash(&mut h);
    h.finish() as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn run_id_is_utc_timestamp_and_suffix() {
        // 2026-11-26T09:18:40Z = 1795684720 s (date -u -d @1795684720)
        let t = UNIX_EPOCH + Duration::from_secs(1_795_684_720);
        assert_eq!(new_run_id(t, 0xab1), "20261126-091840-0ab1");
        assert_eq!(new_run_id(UNIX_EPOCH, 0), "19700101-000000-0000");
        // leap day
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29T00:00:00Z
        assert_eq!(&new_run_id(t, 0)[..8], "20000229");
    }

    #[test]
    fn the_latest_resumable_run_is_the_newest_of_the_run_id_with_a_checkpoint() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(latest_resumable(&root.path().join("none"), "a").unwrap(), None);
        let make = |name: &str, run_id: &str, checkpoint: bool| {
            let p = root.path().join(name);
            std::fs::create_dir_all(p.join("checkpoints")).unwrap();
            std::fs::write(p.join("config.toml"), format!("[dist]\nrun_id = \"{run_id}\"\n")).unwrap();
            if checkpoint {
                std::fs::create_dir(p.join("checkpoints/step-000004")).unwrap();
            }
            p
        };
        make("20261201-000000-0001", "a", true);
        let newest = make("20261202-000000-0001", "a", true);
        make("20261203-000000-0001", "a", false); // crashed before its first checkpoint
        make("20261204-000000-0001", "b", true); // another run
        std::fs::create_dir(root.path().join("cache")).unwrap();
        assert_eq!(latest_resumable(root.path(), "a").unwrap(), Some(newest));
        assert_eq!(latest_resumable(root.path(), "c").unwrap(), None);
    }

    #[test]
    fn create_writes_config_and_distinct_ids() {
        let root = tempfile::tempdir().unwrap();
        let a = RunDir::create(root.path(), "[run]\nseed = 1\n").unwrap();
        let b = RunDir::create(root.path(), "x").unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(std::fs::read_to_string(a.path.join("config.toml")).unwrap(), "[run]\nseed = 1\n");
    }
}
