//! The CLI contract: configuration layering and errors, `--print-config`,
//! `prism doctor`, and honest refusals for what is not built.

mod common;
use common::*;

#[test]
fn print_config_shows_the_resolved_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["train", "--print-config"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: toml::Table = stdout(&out).parse().expect("TOML");
    assert_eq!(printed["run"]["seed"].as_integer(), Some(0));
    assert_eq!(printed["redis"]["url"].as_str(), Some("redis://127.0.0.1:6379"));
    // Printing the config starts nothing and writes no run folder.
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn layers_reach_the_binary_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("my.toml");
    std::fs::write(&file, "[run]\nseed = 1\ndir = \"elsewhere\"\n").unwrap();
    let out = prism()
        .args(["train", "--config", file.to_str().unwrap(), "--set", "run.seed=3", "--print-config"])
        .env("PRISM__RUN__SEED", "2")
        .env("PRISM__LOG__TRACE", "debug")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(printed["run"]["seed"].as_integer(), Some(3), "--set wins over env and file");
    assert_eq!(printed["run"]["dir"].as_str(), Some("elsewhere"), "file wins over defaults");
    assert_eq!(printed["log"]["trace"].as_str(), Some("debug"), "env wins over defaults");
}

/// Each bad configuration exits 64 with exactly one line naming where it is wrong.
#[test]
fn config_errors_exit_64_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let syntax = write("syntax.toml", "[run]\nseed = = 1\n");
    let unknown = write("unknown.toml", "[run]\nsede = 1\n");
    let wrong_type = write("type.toml", "[run]\nseed = \"abc\"\n");
    let invalid = write("invalid.toml", "[redis]\nurl = \"http://x\"\n");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--config", "/no/such/prism.toml"], vec!["/no/such/prism.toml", "no such file"]),
        (vec!["--config", &syntax], vec![&syntax, "line 2", "TOML syntax error"]),
        (vec!["--config", &unknown], vec![&unknown, "unknown key `run.sede`"]),
        (vec!["--config", &wrong_type], vec![&wrong_type, "`run.seed`", "\"abc\""]),
        (vec!["--config", &invalid], vec![&invalid, "`redis.url`", "\"http://x\""]),
        (vec!["--set", "run.seed=-1"], vec!["--set run.seed=-1", "`run.seed`"]),
        (vec!["--set", "nosuch.key=1"], vec!["unknown key `nosuch`"]),
        (vec!["--set", "run.seed"], vec!["expected section.key=value"]),
    ];
    for (args, wants) in cases {
        let out = run_in(dir.path(), &[&["train"], args.as_slice()].concat());
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line, got {err}");
        for want in wants {
            assert!(err.contains(want), "{args:?}: {err:?} should mention {want:?}");
        }
    }
    // An env variable is named too.
    let out = prism().args(["doctor"]).env("PRISM__RUN__SEED", "x").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("environment variable PRISM__RUN__SEED"), "{}", stderr(&out));
}

#[test]
fn doctor_reports_the_installation() {
    let redis = TestRedis::start();
    let out = prism().args(["doctor", "--set", &format!("redis.url={}", redis.url)]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = |prefix: &str| -> String {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line in:\n{text}")).to_string()
    };
    assert_eq!(line("prism "), format!("prism {}", env!("CARGO_PKG_VERSION")));
    assert!(line("libtorch ").starts_with("libtorch 2.11.0"), "{text}");
    let cuda = line("cuda: ");
    let has_gpu = std::path::Path::new("/dev/nvidia0").exists();
    if has_gpu {
        assert!(cuda.starts_with("cuda: available"), "{cuda}");
    } else {
        assert_eq!(cuda, "cuda: not available (0 devices)");
    }
    // The torch wheel ships libnccl.so.2; it loads without a GPU.
    assert!(line("nccl: ").starts_with("nccl: 2."), "{text}");
    assert!(line("redis: ").starts_with(&format!("redis: answers at {} (redis ", redis.url)), "{text}");
    assert!(line("cpu threads: ").starts_with("cpu threads: "), "{text}");
}

#[test]
fn doctor_says_when_redis_does_not_answer() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let out = prism().args(["doctor", "--set", &format!("redis.url={url}")]).output().unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains(&format!("redis: no answer at {url} (")), "{}", stdout(&out));
}

#[test]
fn a_learner_whose_redis_does_not_answer_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let out = prism()
        .args(["learner", "--set", &format!("redis.url={url}"), "--set", "redis.connect_timeout_ms=300"])
        .args(["--set", "grpc.listen=127.0.0.1:0", "--set", "dist.health_listen="])
        .args(["--set", &format!("run.dir={}", dir.path().display())])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("redis {url}: unreachable")), "{}", stderr(&out));
}

/// `prism bench rollout` samples the run's task both ways (one batch at a
/// time, continuous batching) on the same prompts and prints both and their
/// ratio.
#[test]
fn bench_rollout_compares_continuous_batching_with_one_batch_at_a_time() {
    let out = prism()
        .args(["bench", "rollout", "--prompts", "6", "--max-rows", "12", "--rounds", "1", "--threads", "1"])
        .args(["--set", "rollout.group_size=4", "--set", "rollout.prompts_per_batch=2", "--set", "rollout.max_new_tokens=8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("builtin:tiny-arith (arithmetic), 6 prompts x 4 samples, at most 8 new tokens, 1 threads"), "{text}");
    assert!(text.contains("one batch at a time: 2 prompts per call"), "{text}");
    assert!(text.contains("continuous: 6 prompts per call, 12 rows"), "{text}");
    assert!(text.contains("x samples per second"), "{text}");
}
