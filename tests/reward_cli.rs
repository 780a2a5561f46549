//! `prism eval processbench` and `prism bench reward` end to end, against
//! scripted OpenAI-compatible judges on 127.0.0.1.

mod common;
use common::*;
use prism_reward::testkit::{Reply, Request, TestServer, chat_text};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    std::env::var_os("PRISM_DATA_DIR").map_or_else(|| repo().join("../shared/data"), PathBuf::from)
}

/// A judge that checks the arithmetic of the step under judgment (`a op b = c`).
fn arithmetic_judge() -> TestServer {
    TestServer::start(|req: &Request| {
        let prompt = req.prompt();
        let n: usize =
            prompt.split("Judge only Step ").nth(1).and_then(|r| r.split(';').next()).unwrap().parse().unwrap();
        let step = prompt.split(&format!("Step {n}:\n")).nth(1).unwrap().lines().next().unwrap();
        let (lhs, rhs) = step.split_once('=').unwrap();
        let right = prism_reward::expr::eval(lhs).ok() == rhs.trim().parse::<f64>().ok();
        Reply::ok(chat_text(&[if right { "Redone: it holds. \\boxed{Yes}" } else { "It does not hold. \\boxed{No}" }]))
            .into()
    })
    .unwrap()
}

#[test]
fn processbench_scores_a_judge_and_writes_predictions() {
    let dir = tempfile::tempdir().unwrap();
    // Labels are ProcessBench's: the first wrong step, or -1. The judge above
    // gets a, b, c and f right; d's label blames a right step, e's misses one.
    let items = [
        ("a", vec!["1+1=2", "2+2=4", "4+4=8"], -1),
        ("b", vec!["1+1=2", "2+2=5", "5+1=6"], 1),
        ("c", vec!["1+1=3", "3+3=6"], 0),
        ("d", vec!["1+1=2", "2*3=6"], 1),
        ("e", vec!["2+2=4", "4+4=9"], -1),
        ("f", vec!["3*3=9"], -1),
    ];
    let data = dir.path().join("mini.jsonl");
    let lines: Vec<String> = items
        .iter()
        .map(|(id, steps, label)| {
            serde_json::json!({"id": id, "problem": format!("Problem {id}"), "steps": steps, "label": label})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let server = arithmetic_judge();
    let out = prism()
        .args(["eval", "processbench", "--judge", &server.url(), "--model", "fake", "--data", data.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // Erroneous b, c right, d wrong: 66.7%. All-correct a, f right, e wrong: 66.7%.
    // F1 = 2 * 66.7 * 66.7 / 133.3 = 66.7.
    assert!(text.contains("6 items (3 erroneous, 3 all-correct)"), "{text}");
    assert!(text.contains("erroneous accuracy: 66.7%\ncorrect accuracy: 66.7%\nF1: 66.7\n"), "{text}");
    assert!(text.contains("unknown steps: 0, failed steps: 0"), "{text}");
    // Not a terminal: plain progress lines, ending with all items.
    assert!(stderr(&out).contains("processbench: 6/6 items"), "{}", stderr(&out));
    let predictions = std::fs::read_to_string(dir.path().join("processbench-mini.jsonl")).unwrap();
    let mut by_id: Vec<(String, i64, bool)> = predictions
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v["prediction"].as_i64().unwrap(), v["correct"].as_bool().unwrap())
        })
        .collect();
    by_id.sort();
    let want: Vec<(String, i64, bool)> =
        [("a", -1, true), ("b", 1, true), ("c", 0, true), ("d", -1, false), ("e", 1, false), ("f", -1, true)]
            .iter()
            .map(|(id, p, c)| (id.to_string(), *p, *c))
            .collect();
    assert_eq!(by_id, want);
    // One request per step prefix: 3 + 3 + 2 + 2 + 2 + 1.
    assert_eq!(server.requests(), 13);
}

#[test]
fn processbench_on_the_shipped_data_with_a_yes_man_judge() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(|_: &Request| Reply::ok(chat_text(&["\\boxed{Yes}"])).into()).unwrap();
    let data = data_dir().join("processbench/gsm8k.json");
    let out = prism()
        .args(["eval", "processbench", "--judge", &server.url(), "--model", "yes", "--data", data.to_str().unwrap()])
        .args(["--limit", "12", "--template", "genprm", "--out", "preds.jsonl"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // The first 12 items of the file all have an error; predicting "no error"
    // everywhere gets none of them.
    assert!(text.contains("12 items (12 erroneous, 0 all-correct)"), "{text}");
    assert!(text.contains("erroneous accuracy: 0.0%\ncorrect accuracy: 0.0%\nF1: 0.0\n"), "{text}");
    let predictions = std::fs::read_to_string(dir.path().join("preds.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 12);
    for line in predictions.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["prediction"], -1, "{line}");
        assert!(v["id"].as_str().unwrap().starts_with("gsm8k-"));
    }
}

#[test]
fn processbench_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "[{\"problem\": \"p\", \"steps\": [\"a\"], \"label\": 3}]").unwrap();
    let out = prism()
        .args(["eval", "processbench", "--data", bad.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.json, item 0: label 3 outside -1..1"), "{}", stderr(&out));
    let out = prism()
        .args(["eval", "processbench", "--data", bad.to_str().unwrap(), "--judge", "ftp://x"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("`judge.url`"), "{}", stderr(&out));
}

#[test]
fn bench_reward_reports_throughput_and_cpu() {
    let out = prism()
        .args(["bench", "reward", "--requests", "256", "--concurrency", "32", "--delay-ms", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("reward bench: 256 judge requests (64 trajectories x 4 steps), 32 in flight"), "{text}");
    assert!(text.contains("% of the 1600 requests/s bound"), "{text}");
    assert!(text.contains("cpu: client "), "{text}");
    assert!(text.contains("0 failed calls"), "{text}");
}
