use super::*;
use std::io::Write;

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(contents.as_bytes()).unwrap();
    f
}

fn layers(file: Option<&tempfile::NamedTempFile>, env: &[(&str, &str)], sets: &[&str]) -> Layers {
    Layers {
        file: file.map(|f| f.path().to_path_buf()),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        sets: sets.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn defaults_alone_resolve() {
    let c = load(&Layers::default()).unwrap();
    assert_eq!(c.run.seed, 0);
    assert_eq!(c.run.dir, PathBuf::from("runs"));
    assert_eq!(c.log.console, "warn,prism=info");
    assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
}

#[test]
fn layers_apply_in_order_file_env_set() {
    let f = file("[run]\nseed = 1\ndir = \"from-file\"\n[log]\ntrace = \"debug\"\n");
    // file alone
    let c = load(&layers(Some(&f), &[], &[])).unwrap();
    assert_eq!((c.run.seed, c.run.dir.to_str().unwrap(), c.log.trace.as_str()), (1, "from-file", "debug"));
    // env beats file
    let c = load(&layers(Some(&f), &[("PRISM__RUN__SEED", "2")], &[])).unwrap();
    assert_eq!(c.run.seed, 2);
    assert_eq!(c.run.dir, PathBuf::from("from-file"));
    // --set beats env; later --set beats earlier
    let c = load(&layers(Some(&f), &[("PRISM__RUN__SEED", "2")], &["run.seed=3", "run.seed=4"])).unwrap();
    assert_eq!(c.run.seed, 4);
    // untouched keys keep the defaults
    assert_eq!(c.log.console, "warn,prism=info");
}

#[test]
fn overrides_take_strings_without_quotes() {
    let c = load(&layers(None, &[("PRISM__REDIS__URL", "redis://10.0.0.1:7000")], &[])).unwrap();
    assert_eq!(c.redis.url, "redis://10.0.0.1:7000");
    let c = load(&layers(None, &[], &["redis.url=rediss://h:1/2", "log.console=\"debug\""])).unwrap();
    assert_eq!(c.redis.url, "rediss://h:1/2");
    assert_eq!(c.log.console, "debug");
}

#[test]
fn printed_config_round_trips() {
    let c = load(&layers(None, &[], &["run.seed=9"])).unwrap();
    let f = file(&c.to_toml());
    assert_eq!(load(&layers(Some(&f), &[], &[])).unwrap(), c);
}

#[test]
fn missing_file_names_the_file() {
    let l = Layers { file: Some("/nonexistent/prism.toml".into()), ..Default::default() };
    let e = load(&l).unwrap_err().to_string();
    assert_eq!(e, "config file /nonexistent/prism.toml: cannot read it: no such file");
}

#[test]
fn syntax_error_names_file_and_line() {
    let f = file("[run]\nseed = 1\ndir = \"runs\n");
    let e = load(&layers(Some(&f), &[], &[])).unwrap_err();
    let ConfigError::Syntax { line, .. } = &e else { panic!("{e}") };
    assert_eq!(*line, 3);
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("config file {}, line 3,", f.path().display())), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
}

#[test]
fn unknown_key_in_file_names_file_and_key() {
    let f = file("[run]\nseed = 1\nsed = 2\n");
    let e = load(&layers(Some(&f), &[], &[])).unwrap_err().to_string();
    assert_eq!(e, format!("{}: unknown key `run.sed` (expected one of: dir, seed)", f.path().display()));
}

#[test]
fn unknown_section_is_an_error() {
    let f = file("[rnu]\nseed = 1\n");
    let e = load(&layers(Some(&f), &[], &[])).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: unknown key `rnu`", f.path().display())), "{e}");
}

#[test]
fn unknown_key_from_set_names_the_argument() {
    let e = load(&layers(None, &[], &["run.sede=1"])).unwrap_err().to_string();
    assert!(e.starts_with("--set run.sede=1: unknown key `run.sede`"), "{e}");
    let e = load(&layers(None, &[], &["nosuch.key=1"])).unwrap_err().to_string();
    assert!(e.starts_with("--set nosuch.key=1: unknown key `nosuch`"), "{e}");
}

#[test]
fn wrong_type_names_origin_key_and_value() {
    let f = file("[run]\nseed = \"abc\"\n");
    let e = load(&layers(Some(&f), &[], &[])).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: `run.seed`: invalid type: string \"abc\"", f.path().display())), "{e}");

    let e = load(&layers(None, &[("PRISM__RUN__SEED", "-3")], &[])).unwrap_err().to_string();
    assert!(e.starts_with("environment variable PRISM__RUN__SEED: `run.seed`:"), "{e}");
    assert!(e.contains("-3"), "{e}");
}

#[test]
fn invalid_value_names_origin_key_and_value() {
    let e = load(&layers(None, &[], &["redis.url=ftp://x"])).unwrap_err().to_string();
    assert_eq!(
        e,
        "--set redis.url=ftp://x: invalid value \"ftp://x\" for `redis.url`: must start with redis://, rediss:// or unix://"
    );
    let f = file("[log]\nconsole = \"prism=loud\"\n");
    let e = load(&layers(Some(&f), &[], &[])).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}: invalid value \"prism=loud\" for `log.console`: not a tracing filter", f.path().display())), "{e}");
}

#[test]
fn malformed_set_is_an_error() {
    let e = load(&layers(None, &[], &["run.seed"])).unwrap_err().to_string();
    assert_eq!(e, "--set run.seed: malformed override \"run.seed\": expected section.key=value");
}

#[test]
fn printed_config_never_shows_a_redis_password() {
    let c = load(&layers(None, &[("PRISM__REDIS__URL", "redis://:hunter2@h:6379/0")], &[])).unwrap();
    assert_eq!(c.redis.url, "redis://:hunter2@h:6379/0", "the password is still used");
    let shown = c.to_toml();
    assert!(!shown.contains("hunter2") && shown.contains("redis://:***@h:6379/0"), "{shown}");
}

#[test]
fn printed_config_never_shows_a_judge_credential() {
    let c = load(&layers(None, &[], &["judge.url=https://user:sk-secret@judge.example/v1"])).unwrap();
    assert_eq!(c.judge.url, "https://user:sk-secret@judge.example/v1", "the credential is still used");
    let shown = c.to_toml();
    assert!(!shown.contains("sk-secret") && shown.contains("https://user:***@judge.example/v1"), "{shown}");
}

#[test]
fn an_otlp_endpoint_must_be_a_url() {
    let e = load(&layers(None, &[], &["log.otlp_endpoint=collector:4318"])).unwrap_err().to_string();
    assert!(e.contains("`log.otlp_endpoint`: must be an http:// or https:// URL, or empty"), "{e}");
    load(&layers(None, &[], &["log.otlp_endpoint=http://collector:4318/v1/traces"])).unwrap();
}

#[test]
fn distributed_sections_are_validated_with_their_keys() {
    let e = load(&layers(None, &[], &["dist.dead_after_ms=100", "dist.heartbeat_ms=100"])).unwrap_err().to_string();
    assert!(e.contains("`dist.dead_after_ms`: must be at least twice dist.heartbeat_ms (100)"), "{e}");
    let e = load(&layers(None, &[], &["grpc.learner=127.0.0.1:50051"])).unwrap_err().to_string();
    assert!(e.contains("`grpc.learner`: must start with http:// or https://"), "{e}");
    let e = load(&layers(None, &[], &["redis.max_len=0"])).unwrap_err().to_string();
    assert!(e.contains("`redis.max_len`: must be > 0"), "{e}");
    let e = load(&layers(None, &[], &["dist.shard=gradients"])).unwrap_err().to_string();
    assert!(e.contains("`dist.shard`") && e.contains("needs dist.learner_ranks > 1 (it is 1)"), "{e}");
    let e = load(&layers(None, &[], &["dist.shard=zero3"])).unwrap_err().to_string();
    assert!(e.contains("zero3"), "{e}");
    load(&layers(None, &[], &["dist.shard=optimizer", "dist.learner_ranks=2"])).unwrap();
}

#[test]
fn learner_section_defaults_match_the_documented_ones() {
    let c = load(&Layers::default()).unwrap();
    // The embedded default trains the tiny arithmetic model; everything else is the library's default.
    let embedded = prism_learner::Config {
        advantage: prism_learner::config::Estimator::TpGrpo,
        drop_uniform_groups: true,
        lr: 1.5e-4,
        micro_batch_size: 128,
        max_staleness: 2,
        ..prism_learner::Config::default()
    };
    assert_eq!(c.learner, embedded);
    let c = load(&layers(None, &[], &["learner.mode=sft", "learner.clip_high=0.3"])).unwrap();
    assert!(c.learner.is_sft());
    assert_eq!(c.learner.clip_high, 0.3);
    let e = load(&layers(None, &[], &["learner.advantage=ppo"])).unwrap_err().to_string();
    assert!(e.contains("`learner.advantage`") && e.contains("tp_grpo"), "{e}");
}

#[test]
fn reward_sections_default_to_their_documented_defaults() {
    let c = load(&Layers::default()).unwrap();
    assert_eq!(c.reward, prism_reward::Config::default());
    assert_eq!(c.judge, prism_reward::judge::Config::default());
    assert_eq!(c.distill, prism_reward::distill::Config::default());
}

#[test]
fn reward_sections_are_validated_and_typed() {
    let e = load(&layers(None, &[], &["judge.url=ftp://x"])).unwrap_err().to_string();
    assert_eq!(e, "--set judge.url=ftp://x: invalid value \"ftp://x\" for `judge.url`: must start with http:// or https://");
    let e = load(&layers(None, &[], &["reward.segmentation=\"regex\""])).unwrap_err().to_string();
    assert!(e.contains("`reward.step_regex`") && e.contains("must be set"), "{e}");
    let e = load(&layers(None, &[], &["judge.template=\"genprn\""])).unwrap_err().to_string();
    assert_eq!(
        e,
        "--set judge.template=\"genprn\": `judge.template`: unknown value \"genprn\", expected one of: genprm, thinkprm"
    );
    let e = load(&layers(None, &[("PRISM__DISTILL__JUDGE_FRACTION", "1.5")], &[])).unwrap_err().to_string();
    assert!(e.contains("`distill.judge_fraction`") && e.contains("1.5"), "{e}");
    let c = load(&layers(None, &[], &["reward.process=\"judge\"", "judge.samples=4"])).unwrap();
    assert_eq!((c.reward.process, c.judge.samples), (prism_reward::config::Process::Judge, 4));
}
