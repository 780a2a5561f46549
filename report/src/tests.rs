use super::plot::{moving_average, step_label, ticks};
use super::*;

#[test]
fn timestamps_and_durations_parse() {
    // 2026-11-26T09:18:40Z = 1795684720 s
    assert_eq!(parse_rfc3339_micros("2026-11-26T09:18:40.5Z"), Some(1_795_684_720.5e6));
    assert_eq!(parse_rfc3339_micros("1970-01-01T00:00:00Z"), Some(0.0));
    assert_eq!(parse_duration_micros("1.5ms"), Some(1500.0));
    assert_eq!(parse_duration_micros("250µs"), Some(250.0));
    assert_eq!(parse_duration_micros("2s"), Some(2e6));
    assert_eq!(parse_duration_micros("x"), None);
}

#[test]
fn report_draws_every_present_metric_and_a_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = String::new();
    for step in 1..=6 {
        m.push_str(&format!(
            "{{\"kind\":\"step\",\"step\":{step},\"time_s\":{},\"reward\":{},\"approx_kl\":0.01,\"entropy\":1.2,\"lag_mean\":0.5,\"lag_max\":1,\"rollout_tokens_per_s\":900,\"trained_per_s\":12,\"train_s\":0.4,\"wait_s\":0.1,\"uniform_share\":{},\"difficulty\":{},\"skipped_prompts\":0}}\n",
            step as f64 * 0.7,
            0.1 * step as f64,
            0.8 - 0.05 * step as f64,
            step / 3
        ));
        m.push_str(&format!(
            "{{\"kind\":\"eval\",\"step\":{step},\"time_s\":{},\"eval_accuracy\":{}}}\n",
            step as f64 * 0.7,
            0.3 + 0.01 * step as f64
        ));
    }
    std::fs::write(dir.path().join("metrics.jsonl"), m).unwrap();
    let trace = [
        r#"{"timestamp":"2026-11-26T09:18:40.000100Z","level":"INFO","fields":{"message":"close","time.busy":"1.5ms","time.idle":"0.5ms"},"span":{"actor":"rollout-0","groups":2,"name":"generate"}}"#,
        r#"{"timestamp":"2026-11-26T09:18:40.003000Z","level":"INFO","fields":{"message":"close","time.busy":"2ms","time.idle":"0ns"},"span":{"actor":"learner","name":"train"}}"#,
        r#"{"timestamp":"2026-11-26T09:18:40.003000Z","level":"INFO","fields":{"message":"labeled"},"span":{"name":"label"}}"#,
    ];
    std::fs::write(dir.path().join("trace.jsonl"), trace.join("\n")).unwrap();
    let written = run(dir.path(), None).unwrap();
    let names: Vec<String> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    for f in ["reward", "accuracy", "kl", "entropy", "lag", "throughput", "curriculum"] {
        for ext in ["png", "svg"] {
            let name = format!("{f}.{ext}");
            assert!(names.contains(&name), "{name} missing from {names:?}");
            assert!(std::fs::metadata(dir.path().join("report").join(&name)).unwrap().len() > 1000);
        }
    }
    assert!(!names.contains(&"clip.png".to_string()), "no clip metrics, no clip plot");
    let png = std::fs::read(dir.path().join("report/reward.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let timeline: Value = serde_json::from_slice(&std::fs::read(dir.path().join("report/timeline.json")).unwrap()).unwrap();
    let events = timeline["traceEvents"].as_array().unwrap();
    let complete: Vec<&Value> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(complete.len(), 2);
    // generate: closed at +100µs after 2ms of life → started at -1900µs; it is the origin.
    assert_eq!(complete[0]["name"], "generate");
    assert_eq!(complete[0]["ts"], 0.0);
    assert_eq!(complete[0]["dur"], 2000.0);
    assert_eq!(complete[0]["args"]["groups"], 2);
    // train: closed at +3000µs after 2ms → starts 1000µs-(-1900µs) = 2900µs after the origin.
    assert_eq!(complete[1]["ts"], 2900.0);
    let threads: Vec<&str> = events.iter().filter(|e| e["ph"] == "M").map(|e| e["args"]["name"].as_str().unwrap()).collect();
    assert_eq!(threads, vec!["learner", "rollout-0"]);
}

const HEALTH: [&str; 4] = ["reward_sources", "judge", "annotation_queue", "judge_quality"];

/// `n` step rows with noise, and the health fields when `health`.
fn run_rows(n: u64, health: bool) -> String {
    let mut m = String::new();
    for step in 1..=n {
        let noise = ((step * 7919) % 13) as f64 / 13.0 - 0.5;
        let mut row = serde_json::json!({
            "kind": "step", "step": step, "time_s": step as f64 * 1.3,
            "reward": 0.4 + 0.002 * step as f64 + 0.2 * noise, "train_accuracy": 0.5 + 0.3 * noise,
            "rollout_tokens_per_s": 13_000.0 + 50.0 * noise, "trained_per_s": 11.0, "train_s": 0.6 + 0.2 * noise, "wait_s": 0.3,
        });
        if health {
            let trusted = !(20..30).contains(&step);
            row["reward_sources"] = serde_json::json!({"judge": if trusted { 30 } else { 0 }, "cache": 5, "distilled": 20, "verifier": 10, "unknown": (step % 3)});
            row["judge_latency_ms"] =
                if step % 5 == 0 { Value::Null } else { serde_json::json!({"p50": 1500.0 + 100.0 * noise, "p95": 3000.0}) };
            row["annotation_queue"] = serde_json::json!({"depth": step % 17, "shed": step / 10, "capacity": 16});
            row["canary_fp_rate"] = if step < 3 { Value::Null } else { serde_json::json!(if trusted { 0.02 } else { 0.3 }) };
            row["canary_max_rate"] = serde_json::json!(0.1);
            row["distill_agreement"] = serde_json::json!(0.6 + 0.005 * step as f64);
            row["distill_min_agreement"] = serde_json::json!(0.8);
            row["judge_budget_refused"] = serde_json::json!(step * 2);
            row["judge_trusted"] = serde_json::json!(trusted);
        }
        m.push_str(&format!("{row}\n"));
        if step % 10 == 0 {
            m.push_str(&format!(
                "{}\n",
                serde_json::json!({"kind": "eval", "step": step, "time_s": step as f64 * 1.3, "eval_accuracy": 0.3 + 0.004 * step as f64})
            ));
        }
    }
    m
}

fn parse(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn panel_titles(figs: &[plot::Figure], file: &str) -> Vec<String> {
    figs.iter().find(|f| f.file == file).map(|f| f.panels.iter().map(|p| p.y_desc.clone()).collect()).unwrap_or_default()
}

#[test]
fn health_fields_draw_the_health_figures() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("metrics.jsonl"), run_rows(60, true)).unwrap();
    let written = run(dir.path(), None).unwrap();
    for f in HEALTH {
        for ext in ["png", "svg"] {
            let path = dir.path().join("report").join(format!("{f}.{ext}"));
            assert!(written.contains(&path), "{} missing from {written:?}", path.display());
            assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        }
    }
    let figs = figures(&parse(&run_rows(60, true)));
    assert_eq!(panel_titles(&figs, "judge"), ["latency (ms)", "refusals (cumulative)"]);
    assert_eq!(panel_titles(&figs, "annotation_queue"), ["requests queued", "requests (cumulative)"]);
    assert_eq!(panel_titles(&figs, "judge_quality"), ["false positives (%)", "agreement (%)"]);
    let canary = &figs.iter().find(|f| f.file == "judge_quality").unwrap().panels[0];
    assert_eq!(canary.shaded.len(), 1, "steps 20..=29 ran with the judge off");
    assert_eq!((canary.shaded[0].0, canary.shaded[0].1), (20.0, 29.0));
    assert_eq!(canary.series[1].style, plot::Style::Limit, "the limit is dashed");
}

#[test]
fn a_run_with_some_health_fields_draws_only_those() {
    let rows: Vec<Value> = parse(&run_rows(30, true))
        .into_iter()
        .map(|mut r| {
            if let Some(o) = r.as_object_mut() {
                o.insert("canary_fp_rate".into(), Value::Null);
                for k in ["annotation_queue", "judge_latency_ms", "judge_budget_refused", "reward_sources"] {
                    o.remove(k);
                }
            }
            r
        })
        .collect();
    let figs = figures(&rows);
    let files: Vec<&str> = figs.iter().map(|f| f.file).collect();
    assert!(files.contains(&"judge_quality") && !files.contains(&"judge") && !files.contains(&"reward_sources"), "{files:?}");
    assert_eq!(panel_titles(&figs, "judge_quality"), ["agreement (%)"], "a limit without a rate draws no canary panel");
}

#[test]
fn throughput_draws_one_unit_per_panel() {
    let figs = figures(&parse(&run_rows(40, false)));
    assert_eq!(panel_titles(&figs, "throughput"), ["tokens/s", "samples/s", "seconds"]);
    let fig = figs.iter().find(|f| f.file == "throughput").unwrap();
    let names: Vec<Vec<&str>> = fig.panels.iter().map(|p| p.series.iter().map(|s| s.name.as_str()).collect()).collect();
    assert_eq!(
        names,
        [vec!["rollout tokens/s (run average)"], vec!["trained samples/s (run average)"], vec!["training", "waiting for labeled groups"]]
    );
    let acc = &figs.iter().find(|f| f.file == "accuracy").unwrap().panels[0];
    let held_out = acc.series.iter().find(|s| s.name == "held-out accuracy").unwrap();
    assert_eq!(held_out.style, plot::Style::Prominent);
    assert_eq!(held_out.points.len(), 4, "one point per eval row");
    let train = acc.series.iter().find(|s| s.name == "train outcome accuracy").unwrap();
    assert_eq!((train.style, train.points.len()), (plot::Style::Faint, 40));
}

#[test]
fn step_ticks_are_whole_numbers() {
    // Two steps: a float axis would put a tick at 1.5.
    assert_eq!(ticks(0.5, 2.5, 10, true), [1.0, 2.0]);
    assert_eq!(ticks(0.0, 2.0, 4, false), [0.0, 0.5, 1.0, 1.5, 2.0]);
    assert_eq!(ticks(0.5, 6.5, 10, true), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(ticks(-0.5, 400.5, 10, true), (0..=8).map(|k| k as f64 * 50.0).collect::<Vec<_>>());
    for hi in [3.0, 7.5, 12.5, 37.0, 999.0, 12_345.0] {
        let t = ticks(0.5, hi, 10, true);
        assert!(!t.is_empty() && t.len() <= 12, "{hi}: {t:?}");
        assert!(t.iter().all(|v| v.fract() == 0.0), "{hi}: {t:?}");
    }
    assert_eq!(step_label(12.0), "12");
    assert_eq!(step_label(2.9999999), "3");
    assert!(ticks(0.5, 25.5, 10, true).iter().map(|v| step_label(*v)).all(|l| !l.contains('.')));
}

#[test]
fn moving_average_is_centered_and_shrinks_at_the_ends() {
    // By hand, weights 1 2 1 over 0 3 6 9: (2·0+3)/3, (0+2·3+6)/4, (3+2·6+9)/4, (6+2·9)/3.
    assert_eq!(moving_average(&[0.0, 3.0, 6.0, 9.0], 3), [1.0, 3.0, 6.0, 8.0]);
    // Window 5, weights 1 2 3 2 1: a spike of 9 at the middle of zeros spreads as 1 2 3 2 1 (/9).
    let spike = moving_average(&[0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0], 5);
    assert_eq!(spike, [0.0, 0.0, 1.0, 2.0, 3.0, 2.0, 1.0, 0.0, 0.0]);
    assert_eq!(moving_average(&[1.0, 5.0], 1), [1.0, 5.0]);
    assert_eq!(plot::smoothing_window(6), 1, "a short run is drawn as is");
    assert_eq!(plot::smoothing_window(300) % 2, 1);
}

#[test]
fn source_shares_add_up_to_one_per_step() {
    let rows = parse(concat!(
        r#"{"kind":"step","step":1,"time_s":1,"reward_sources":{"judge":3,"cache":1,"verifier":4,"guard":0}}"#,
        "\n",
        r#"{"kind":"step","step":2,"time_s":2,"reward_sources":{"judge":0,"distilled":0}}"#,
        "\n",
        r#"{"kind":"step","step":3,"time_s":3,"reward_sources":{"judge":1,"oracle":1}}"#,
        "\n",
        r#"{"kind":"step","step":4,"time_s":4}"#,
    ));
    let steps: Vec<&Value> = rows.iter().collect();
    let shares = source_shares(&steps);
    let names: Vec<&str> = shares.iter().map(|s| s.0.as_str()).collect();
    // Never-seen sources (distilled, guard, unknown) are no layer; an unknown key is "other".
    assert_eq!(names, ["judge", "judge (cached)", "verifiers", "other"]);
    let at = |name: &str| shares.iter().find(|s| s.0 == name).unwrap().2.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>();
    // Step 2 scored nothing and step 4 has no counts: both left out.
    assert_eq!(at("judge"), [(1.0, 0.375), (3.0, 0.5)]);
    assert_eq!(at("judge (cached)"), [(1.0, 0.125), (3.0, 0.0)]);
    assert_eq!(at("verifiers"), [(1.0, 0.5), (3.0, 0.0)]);
    assert_eq!(at("other"), [(1.0, 0.0), (3.0, 0.5)]);
}

#[test]
fn judge_off_spans_cover_consecutive_untrusted_steps() {
    let rows = parse(
        &[(1, true), (2, false), (3, false), (4, true), (5, false)]
            .iter()
            .map(|(s, t)| format!(r#"{{"kind":"step","step":{s},"time_s":{},"judge_trusted":{t}}}"#, *s as f64 * 10.0))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let steps: Vec<&Value> = rows.iter().collect();
    assert_eq!(judge_off_spans(&steps), [(2.0, 3.0, 10.0, 30.0), (5.0, 5.0, 40.0, 50.0)]);
}

#[test]
fn a_long_run_of_missing_values_breaks_the_line() {
    let rows = parse(
        &[Some(1.0), None, Some(2.0), None, None, None, Some(3.0), None]
            .iter()
            .enumerate()
            .map(|(i, v)| serde_json::json!({"kind": "step", "step": i + 1, "time_s": i, "judge_latency_ms": {"p50": v}}).to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let steps: Vec<&Value> = rows.iter().collect();
    let p = points(&steps, "judge_latency_ms.p50");
    // One missing step is bridged; three are a gap, marked at the step the line resumes.
    let shown: Vec<(f64, String)> = p.iter().map(|p| (p.0, format!("{}", p.2))).collect();
    assert_eq!(shown, [(1.0, "1".into()), (3.0, "2".into()), (7.0, "NaN".into()), (7.0, "3".into())]);
    assert_eq!(plot::segments(&p).map(|s| s.len()).collect::<Vec<_>>(), [2, 1]);
    // Smoothing stays inside each segment.
    let smooth = plot::smoothed(&p, 3);
    assert_eq!(smooth.iter().filter(|q| q.2.is_nan()).count(), 1);
    assert_eq!(smooth.last().unwrap().2, 3.0);
}
