//! `prism plan`: the memory plan of a learner rank, and its check against the
//! peak memory of real CPU training steps (`--measure`) on tiny configs.

mod common;

use common::prism;
use std::path::Path;

/// A Llama-style config.json of `layers` layers over a vocabulary of `vocab`.
fn config(dir: &Path, name: &str, vocab: u64, layers: u64) -> String {
    let path = dir.join(format!("{name}.json"));
    let json = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 256, "intermediate_size": 768,
        "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    std::fs::write(&path, json.to_string()).unwrap();
    path.display().to_string()
}

fn plan(args: &[&str]) -> (bool, String, String) {
    let out = prism().arg("plan").args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The plan's activations, gradients and optimizer state are within 15 % of
/// the peak resident memory two real CPU training steps reach above the
/// loaded model: deep and narrow-vocabulary (the layers dominate) and
/// shallow with a large vocabulary (the loss's logits dominate).
#[test]
fn the_plan_matches_the_measured_peak_of_cpu_training_steps() {
    let dir = tempfile::tempdir().unwrap();
    for (name, vocab, layers) in [("deep", 64, 8), ("wide-vocabulary", 16384, 2)] {
        let model = config(dir.path(), name, vocab, layers);
        let (ok, out, err) = plan(&["--model", &model, "--seq-len", "512", "--prompt-len", "128", "--micro-batch", "16", "--measure"]);
        assert!(ok, "{err}");
        let line = out.lines().find(|l| l.starts_with("measured: ")).unwrap_or_else(|| panic!("{out}"));
        let pct: f64 = line.rsplit('(').next().unwrap().trim_end_matches("%)").parse().unwrap_or_else(|e| panic!("{line}: {e}"));
        eprintln!("{name}: {line}");
        assert!(pct.abs() <= 15.0, "{name}: the plan is off by {pct}% of the measured peak:\n{out}");
    }
}

/// Every shard setting has its column; sharding divides the optimizer state
/// (and streamed ZeRO-2 the gradients); a model too large says so; bad sizes
/// are refused by name.
#[test]
fn the_plan_shows_every_shard_setting_and_refuses_bad_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let model = config(dir.path(), "m", 32000, 4);
    let (ok, out, err) = plan(&["--model", &model, "--ranks", "4", "--gpu-memory", "0.05GB", "--seq-len", "256", "--micro-batch", "4", "--bucket-mb", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("none") && out.contains("optimizer") && out.contains("gradients"), "{out}");
    let row = |label: &str| -> Vec<f64> {
        let line = out.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("{label}:\n{out}"));
        line[label.len()..].split_whitespace().map(|v| v.parse().unwrap()).collect()
    };
    let optimizer = row("optimizer state");
    assert!(optimizer[1] < optimizer[0] / 2.0 && optimizer[1] == optimizer[2], "{out}");
    // Autograd holds every gradient, except ZeRO-2's with the layers
    // recomputed: the embedding's, one layer's and one bucket's.
    let kept = row("gradients, activations kept");
    assert_eq!(kept, vec![kept[0]; 3], "{out}");
    let recomputed = row("gradients, recomputed");
    assert!(recomputed[0] == kept[0] && recomputed[1] == kept[0] && recomputed[2] < kept[0] * 0.95, "{out}");
    assert!(out.lines().any(|l| l.starts_with("fits 0.05 GB") && l.ends_with("no")), "{out}");
    assert!(out.contains("rollout engine:") && out.contains("KV cache"), "{out}");
    let (ok, _, err) = plan(&["--model", &model, "--gpu-memory", "80 bananas"]);
    assert!(!ok && err.contains("--gpu-memory \"80 bananas\""), "{err}");
    let (ok, _, err) = plan(&["--model", &dir.path().join("missing.json").display().to_string()]);
    assert!(!ok && err.contains("missing.json"), "{err}");
}
