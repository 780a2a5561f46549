use super::*;

fn write_step(dir: &Path, step: u64, keep: usize) -> PathBuf {
    write_atomic(dir, step, keep, |tmp| {
        fs::write(tmp.join("a.bin"), vec![step as u8; 1000]).unwrap();
        fs::write(tmp.join("state.json"), format!("{{\"step\":{step}}}")).unwrap();
        Ok(())
    })
    .unwrap()
}

#[test]
fn keeps_the_newest_k_and_cleans_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join(".tmp-step-00000009")).unwrap();
    for step in 1..=5 {
        write_step(dir.path(), step, 3);
    }
    let steps: Vec<u64> = list(dir.path()).unwrap().iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![3, 4, 5]);
    assert!(!dir.path().join(".tmp-step-00000009").exists());
    let (latest, rejected) = latest_intact(dir.path()).unwrap();
    assert_eq!(latest.unwrap().step, 5);
    assert!(rejected.is_empty());
}

#[test]
fn damaged_checkpoints_are_named_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    for step in 1..=4 {
        write_step(dir.path(), step, 10);
    }
    // 4: a flipped byte; 3: truncated; 2: never finished (no manifest).
    let flipped = dir.path().join("step-00000004/a.bin");
    let mut bytes = fs::read(&flipped).unwrap();
    bytes[500] ^= 1;
    fs::write(&flipped, bytes).unwrap();
    let truncated = dir.path().join("step-00000003/a.bin");
    fs::write(&truncated, vec![3u8; 10]).unwrap();
    fs::remove_file(dir.path().join("step-00000002").join(MANIFEST)).unwrap();

    let (latest, rejected) = latest_intact(dir.path()).unwrap();
    assert_eq!(latest.unwrap().step, 1);
    let lines: Vec<String> = rejected.iter().map(|r| r.to_string()).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].contains("step-00000004") && lines[0].contains("a.bin: sha256"), "{}", lines[0]);
    assert!(
        lines[1].contains("step-00000003") && lines[1].contains("a.bin: 10 bytes, the manifest says 1000"),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains("step-00000002") && lines[2].contains("manifest.json"), "{}", lines[2]);

    // A deleted file is reported too.
    fs::remove_file(dir.path().join("step-00000001/state.json")).unwrap();
    assert_eq!(verify(&dir.path().join("step-00000001")).unwrap_err(), "state.json: missing");
}

#[test]
fn config_hash_tracks_the_value() {
    assert_eq!(config_hash(&("a", 1)), config_hash(&("a", 1)));
    assert_ne!(config_hash(&("a", 1)), config_hash(&("a", 2)));
    assert_eq!(config_hash(&1).len(), 64);
}
