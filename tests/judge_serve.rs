//! The judge against a real OpenAI-compatible server: `prism serve` running
//! SmolLM2-135M-Instruct on 127.0.0.1 (real text, real logprobs). A model this
//! small rarely writes `\boxed{Yes}`, so most verdicts are unknown: what is
//! checked is that the client reads or flags every reply, that the server's
//! logprobs are usable, that every trajectory still gets a label with sources,
//! and that `prism eval processbench` runs end to end on a small slice of the
//! real data.

mod common;
use common::*;
use prism_core::ScoreSource;
use prism_reward::config::{Fallback, Process};
use prism_reward::judge::{self, Judge, StepJudgement, Style};
use prism_reward::{Labeler, distill, testkit};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// A running `prism serve` on a free loopback port, killed when dropped.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(model: &std::path::Path) -> Self {
        let mut child = prism()
            .args(["serve", "--model", model.to_str().unwrap(), "--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split("http://").nth(1).unwrap_or_else(|| panic!("no address in {line:?}")).trim().to_string();
        Serve { child, url: format!("http://{addr}/v1") }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_dir() -> PathBuf {
    std::env::var_os("PRISM_DATA_DIR").map_or_else(|| repo().join("../shared/data"), PathBuf::from)
}

/// The two shortest ProcessBench GSM8K items, one with an error (gsm8k-126,
/// label 0) and one all correct (gsm8k-386): 7 steps in all, so that a CPU run
/// stays short.
fn slice(dir: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(data_dir().join("processbench/gsm8k.json")).unwrap();
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let picked: Vec<String> = ["gsm8k-126", "gsm8k-386"]
        .iter()
        .map(|id| items.iter().find(|i| i["id"] == *id).unwrap().to_string())
        .collect();
    let path = dir.join("slice.jsonl");
    std::fs::write(&path, picked.join("\n")).unwrap();
    path
}

fn judge_config(url: &str) -> judge::Config {
    judge::Config {
        url: url.into(),
        model: MODEL.into(),
        max_tokens: 24,
        // CPU serving of several long prompts at once is slow; nothing here may time out.
        timeout_ms: 600_000,
        breaker_failures: 1_000,
        canary_every: 0,
        ..judge::Config::default()
    }
}

#[test]
fn judge_on_prism_serve() {
    let Some(gguf) = smollm_gguf() else { return };
    let serve = Serve::start(&gguf);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // The client on its own: two samples per step, logprobs on. Every reply is
    // read as a verdict or counted as unknown, and comes with its logprobs.
    // (prism serve reports a token holding part of a multi-byte character as
    // U+FFFD, so a sampled reply's tokens may not spell its text exactly; the
    // client copes, see judge::tests::p_yes_survives_lossy_token_texts.)
    for style in [Style::Genprm, Style::Thinkprm] {
        let cfg = judge::Config { samples: 2, temperature: 1.0, template: style, ..judge_config(&serve.url) };
        let judge = Judge::new(&cfg).unwrap();
        let problem = "Tom has 3 apples and buys 4 more. How many apples does he have?";
        let got =
            runtime.block_on(judge.judge(problem, &["Tom starts with 3 apples.", "3 + 4 = 7, so he has 7 apples."]));
        assert_eq!(got.len(), 2);
        for j in &got {
            match j {
                StepJudgement::Scored { p, samples, unknown, .. } => {
                    assert!((0.0..=1.0).contains(p) && samples + unknown == 2, "{j:?}")
                }
                StepJudgement::Unknown { samples } => assert_eq!(*samples, 2),
                StepJudgement::Failed { .. } => panic!("{style}: a call failed: {j:?}"),
            }
        }
        let m = judge.metrics();
        println!("{style}: {got:?}\n{m:?}");
        let replies = match style {
            Style::Genprm => 4,
            Style::Thinkprm => 2,
        };
        let per_step = if style == Style::Thinkprm { 2 } else { 1 };
        assert_eq!(m.verdicts + m.unknown_verdicts, replies * per_step, "{style}: every reply read or flagged");
        assert_eq!((m.failed_calls, m.logprob_replies), (0, replies), "{style}");
        // A canary gets an answer too (accepted or not, or unreadable).
        runtime.block_on(judge.canary(problem, "Thought process:"));
    }

    // Real verdicts in real text: SmolLM2 does parrot a sentence ending in
    // \boxed{Yes} (greedy), so P(yes) is read from the logprobs the server
    // sent at the verdict token.
    let dir = tempfile::tempdir().unwrap();
    let parrot = dir.path().join("parrot.jinja");
    std::fs::write(&parrot, "Repeat after me, word for word: The step is correct. \\boxed{Yes}").unwrap();
    let cfg = judge::Config { template_file: parrot.to_str().unwrap().into(), ..judge_config(&serve.url) };
    let judge = Judge::new(&cfg).unwrap();
    let got = runtime.block_on(judge.judge("p", &["a", "b"]));
    let m = judge.metrics();
    println!("parrot: {got:?}\n{m:?}");
    for j in &got {
        let p = j.score().unwrap_or_else(|| panic!("{j:?}"));
        assert!(p > 0.5 && p <= 1.0, "{j:?}");
    }
    assert_eq!((m.verdicts, m.logprob_verdicts, m.unknown_verdicts), (2, 2, 0));

    // A labeler with the real judge: every step ends with a score and a source.
    let cfg = prism_reward::Config { process: Process::Judge, fallback: Fallback::Verifier, ..Default::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&serve.url), &distill::Config::default()).unwrap();
    let t = testkit::trajectory(1, "arithmetic", "7+3*4-2", None, "3*4=12\n7+12=19\n19-2=17\nA:17\n");
    let label = runtime.block_on(labeler.label(&t));
    assert_eq!((label.outcome, label.steps.len()), (1.0, 4));
    for s in &label.steps {
        assert!(matches!(s.source, ScoreSource::Judge | ScoreSource::Verifier), "{s:?}");
        assert!(s.score.is_some(), "{s:?}");
    }
    let m = labeler.metrics();
    assert_eq!(m.sources.judge + m.sources.verifier, 4);
    assert_eq!(m.fallback_steps, m.judge_unknown_steps, "unknown verdicts took the fallback: {m:?}");

    // `prism eval processbench` end to end on a small slice of the real data.
    let data = slice(dir.path());
    let out = prism()
        .args(["eval", "processbench", "--judge", &serve.url, "--model", MODEL, "--data", data.to_str().unwrap()])
        .args([
            "--set",
            "judge.max_tokens=32",
            "--set",
            "judge.timeout_ms=600000",
            "--set",
            "judge.breaker_failures=1000",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    println!("{text}");
    assert!(text.contains("2 items (1 erroneous, 1 all-correct)"), "{text}");
    assert!(text.contains("failed steps: 0"), "{text}");
    assert!(text.contains("judge: 7 calls"), "{text}");
    let predictions = std::fs::read_to_string(dir.path().join("processbench-slice.jsonl")).unwrap();
    let mut steps = 0;
    for line in predictions.lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        let judgements = p["judgements"].as_array().unwrap();
        steps += judgements.len();
        assert!(judgements.iter().all(|j| j["kind"] == "scored" || j["kind"] == "unknown"), "{line}");
        let prediction = p["prediction"].as_i64().unwrap();
        assert!(prediction >= -1 && prediction < judgements.len() as i64);
        assert_eq!(p["correct"], prediction == p["label"].as_i64().unwrap());
    }
    assert_eq!((predictions.lines().count(), steps), (2, 7));
}
