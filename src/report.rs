//! `prism report runs/<id>`: plots of a run's metrics (PNG and SVG) over
//! learner steps and over wall time, and a Chrome-trace / Perfetto timeline of
//! which actor was busy when, rebuilt from `trace.jsonl`.

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One plotted quantity: a label and the metric keys it is drawn from.
struct Figure {
    file: &'static str,
    title: &'static str,
    series: &'static [(&'static str, &'static str)],
}

/// Series are `(legend, metrics key)`; a key missing from a run is skipped.
const FIGURES: &[Figure] = &[
    Figure { file: "reward", title: "reward (train samples)", series: &[("reward", "reward"), ("outcome accuracy", "train_accuracy")] },
    Figure {
        file: "accuracy",
        title: "held-out accuracy (greedy)",
        series: &[("accuracy", "eval_accuracy"), ("step accuracy", "eval_step_accuracy"), ("train step accuracy", "step_accuracy")],
    },
    Figure { file: "kl", title: "KL", series: &[("approx KL", "approx_kl"), ("KL to reference", "kl")] },
    Figure { file: "entropy", title: "entropy", series: &[("entropy", "entropy")] },
    Figure { file: "clip", title: "clip fraction", series: &[("clip low", "clip_frac_low"), ("clip high", "clip_frac_high"), ("clip", "clip_frac")] },
    Figure { file: "lag", title: "policy lag (versions)", series: &[("mean lag", "lag_mean"), ("max lag", "lag_max")] },
    Figure {
        file: "throughput",
        title: "throughput per stage",
        series: &[
            ("rollout tokens/s", "rollout_tokens_per_s"),
            ("trained samples/s", "trained_per_s"),
            ("learner train s/step", "train_s"),
            ("learner wait s/step", "wait_s"),
        ],
    },
];

/// A point: (step, wall seconds, value).
type Point = (f64, f64, f64);

/// Writes the plots and the timeline into `out` (default `<run>/report`) and
/// returns the files written.
pub fn run(run_dir: &Path, out: Option<&Path>) -> Result<Vec<PathBuf>> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics_path).with_context(|| format!("{}: cannot read", metrics_path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", metrics_path.display(), i + 1))?;
        rows.push(v);
    }
    if rows.is_empty() {
        bail!("{}: no metrics recorded yet", metrics_path.display());
    }
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| run_dir.join("report"));
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    register_font()?;

    let mut written = Vec::new();
    for fig in FIGURES {
        let series: Vec<(&str, Vec<Point>)> = fig
            .series
            .iter()
            .map(|(name, key)| (*name, points(&rows, key)))
            .filter(|(_, p)| !p.is_empty())
            .collect();
        if series.is_empty() {
            continue;
        }
        let png = out.join(format!("{}.png", fig.file));
        let svg = out.join(format!("{}.svg", fig.file));
        draw(BitMapBackend::new(&png, (1200, 450)).into_drawing_area(), fig.title, &series)
            .with_context(|| format!("{}: drawing failed", png.display()))?;
        draw(SVGBackend::new(&svg, (1200, 450)).into_drawing_area(), fig.title, &series)
            .with_context(|| format!("{}: drawing failed", svg.display()))?;
        written.push(png);
        written.push(svg);
    }

    let trace = run_dir.join("trace.jsonl");
    if trace.exists() {
        let timeline = out.join("timeline.json");
        let events = timeline_events(&trace)?;
        std::fs::write(&timeline, serde_json::to_vec(&serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" }))?)?;
        written.push(timeline);
    }
    Ok(written)
}

fn points(rows: &[Value], key: &str) -> Vec<Point> {
    rows.iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r["time_s"].as_f64()?, r.get(key)?.as_f64()?)))
        .filter(|(_, _, v)| v.is_finite())
        .collect()
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, series: &[(&str, Vec<Point>)]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let panels = root.split_evenly((1, 2));
    for (panel, (x_label, pick)) in panels.iter().zip([("learner step", 0usize), ("wall time (s)", 1usize)]) {
        let xs = series.iter().flat_map(|(_, p)| p.iter().map(move |pt| if pick == 0 { pt.0 } else { pt.1 }));
        let ys = series.iter().flat_map(|(_, p)| p.iter().map(|pt| pt.2));
        let (x0, x1) = bounds(xs);
        let (y0, y1) = bounds(ys);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{title} vs {x_label}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart.configure_mesh().x_desc(x_label).draw().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line = pts.iter().map(|pt| (if pick == 0 { pt.0 } else { pt.1 }, pt.2));
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// plotters draws text with a TrueType font it is given; Debian's
/// fonts-dejavu-core (installed by scripts/setup) or `PRISM_FONT`.
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("PRISM_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(
                [
                    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                    "/usr/share/fonts/TTF/DejaVuSans.ttf",
                ]
                .map(PathBuf::from),
            )
            .collect();
        let path = candidates.iter().find(|p| p.exists()).ok_or_else(|| {
            "no TrueType font found for the plots: install fonts-dejavu-core (scripts/setup does) or set PRISM_FONT=/path/to/font.ttf"
                .to_string()
        })?;
        let bytes: &'static [u8] = Box::leak(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{}: not a usable font", path.display()))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Chrome-trace "complete" events, one per closed span of a busy stage
/// (`generate`, `label`, `train`, `evaluate`, `checkpoint`), one track per actor.
/// A span's start is its close time minus its busy and idle time.
pub fn timeline_events(trace: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(trace).with_context(|| format!("{}: cannot read", trace.display()))?;
    let mut tracks: BTreeMap<String, usize> = BTreeMap::new();
    let mut events = Vec::new();
    let mut origin: Option<f64> = None;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", trace.display(), i + 1))?;
        if v["fields"]["message"] != "close" {
            continue;
        }
        let span = &v["span"];
        let Some(name) = span["name"].as_str() else { continue };
        if !["generate", "label", "train", "evaluate", "checkpoint"].contains(&name) {
            continue;
        }
        let Some(end) = v["timestamp"].as_str().and_then(parse_rfc3339_micros) else { continue };
        let busy = v["fields"]["time.busy"].as_str().and_then(parse_duration_micros).unwrap_or(0.0);
        let idle = v["fields"]["time.idle"].as_str().and_then(parse_duration_micros).unwrap_or(0.0);
        let start = end - busy - idle;
        let origin = *origin.get_or_insert(start);
        let actor = span["actor"].as_str().unwrap_or(name).to_string();
        let next = tracks.len();
        let tid = *tracks.entry(actor).or_insert(next);
        let args: serde_json::Map<String, Value> =
            span.as_object().map(|o| o.iter().filter(|(k, _)| *k != "name").map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        events.push(serde_json::json!({
            "name": name, "ph": "X", "pid": 1, "tid": tid,
            "ts": (start - origin).max(0.0), "dur": busy + idle, "args": args,
        }));
    }
    for (actor, tid) in tracks {
        events.push(serde_json::json!({ "name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": { "name": actor } }));
    }
    Ok(events)
}

/// `2026-11-26T10:20:30.123456Z` → microseconds since the epoch.
fn parse_rfc3339_micros(s: &str) -> Option<f64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let mut t = time.split(':');
    let (h, min, sec) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // days from civil (Howard Hinnant's algorithm)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days as f64 * 86_400.0) + h * 3600.0 + min * 60.0 + sec) * 1e6)
}

/// tracing's `time.busy` rendering (`1.23ms`, `45.6µs`, `789ns`, `2.1s`) → µs.
fn parse_duration_micros(s: &str) -> Option<f64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "ns" => n / 1000.0,
        "µs" | "us" => n,
        "ms" => n * 1000.0,
        "s" => n * 1e6,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
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
                "{{\"kind\":\"step\",\"step\":{step},\"time_s\":{},\"reward\":{},\"approx_kl\":0.01,\"entropy\":1.2,\"lag_mean\":0.5,\"lag_max\":1,\"rollout_tokens_per_s\":900,\"trained_per_s\":12,\"train_s\":0.4,\"wait_s\":0.1}}\n",
                step as f64 * 0.7,
                0.1 * step as f64
            ));
            m.push_str(&format!("{{\"kind\":\"eval\",\"step\":{step},\"time_s\":{},\"eval_accuracy\":{}}}\n", step as f64 * 0.7, 0.3 + 0.01 * step as f64));
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
        for f in ["reward", "accuracy", "kl", "entropy", "lag", "throughput"] {
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
}
