//! prism-report: what `prism report runs/<id>` draws from a run folder —
//! plots of its metrics (PNG and SVG) over learner steps and over wall time,
//! one unit of measure per panel, and a Chrome-trace / Perfetto timeline of
//! which actor was busy when, rebuilt from `trace.jsonl`.
//!
//! Reads only the files a run writes (`metrics.jsonl`, `trace.jsonl`): it
//! knows no actors, no model and no transport, so it reads the runs of every
//! mode alike, and runs from older versions (a field a row lacks is a series
//! not drawn).
//!
//! Noisy per-step series are drawn as a centered moving average (about a
//! fifteenth of the run wide) with the per-step values faint behind it.
//! The reward-health figures (`reward_sources`, `judge`, `annotation_queue`,
//! `judge_quality`) are drawn when the run's step rows carry those fields;
//! runs from before they existed simply have none.

mod plot;
#[cfg(test)]
mod tests;

use anyhow::{bail, Context, Result};
use plot::{Figure, Layer, Panel, Point, Style, YAxis};
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const BROWN: RGBColor = RGBColor(140, 86, 75);
const GRAY: RGBColor = RGBColor(127, 127, 127);
const LIGHT_BLUE: RGBColor = RGBColor(158, 202, 225);
const DARK: RGBColor = RGBColor(60, 60, 60);

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
    for fig in figures(&rows) {
        let png = out.join(format!("{}.png", fig.file));
        let svg = out.join(format!("{}.svg", fig.file));
        let size = fig.size();
        plot::draw(BitMapBackend::new(&png, size).into_drawing_area(), &fig)
            .with_context(|| format!("{}: drawing failed", png.display()))?;
        plot::draw(SVGBackend::new(&svg, size).into_drawing_area(), &fig).with_context(|| format!("{}: drawing failed", svg.display()))?;
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

/// The figures `rows` have data for, in the order they are written.
fn figures(rows: &[Value]) -> Vec<Figure> {
    let steps: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "step").collect();
    let evals: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "eval").collect();
    let p = |key: &str| points(&steps, key);
    let judge_off = judge_off_spans(&steps);
    let candidates = vec![
        Figure {
            file: "reward",
            title: "reward of the trained samples",
            panels: vec![Panel::new("mean outcome reward", "reward", YAxis::Auto).with("reward", BLUE, Style::Smoothed, p("reward"))],
        },
        Figure {
            file: "accuracy",
            title: "accuracy: held-out (greedy) and on the trained samples",
            panels: vec![Panel::new("accuracy", "accuracy (%)", YAxis::Share)
                .with("train outcome accuracy", LIGHT_BLUE, Style::Faint, p("train_accuracy"))
                .with("train step accuracy", RGBColor(255, 187, 120), Style::Faint, p("step_accuracy"))
                .with("held-out accuracy", BLUE, Style::Prominent, points(&evals, "eval_accuracy"))
                .with("held-out step accuracy", ORANGE, Style::Prominent, points(&evals, "eval_step_accuracy"))],
        },
        Figure {
            file: "kl",
            title: "KL divergence",
            panels: vec![Panel::new("KL", "KL (nats)", YAxis::FromZero)
                .with("approx KL to the sampling policy", BLUE, Style::Smoothed, p("approx_kl"))
                .with("KL to the reference", ORANGE, Style::Smoothed, p("kl"))],
        },
        Figure {
            file: "entropy",
            title: "policy entropy",
            panels: vec![Panel::new("entropy", "entropy (nats/token)", YAxis::Auto).with("entropy", BLUE, Style::Smoothed, p("entropy"))],
        },
        Figure {
            file: "clip",
            title: "clipped tokens",
            panels: vec![Panel::new("clip fraction", "tokens clipped (%)", YAxis::ShareFromZero)
                .with("clip low", BLUE, Style::Smoothed, p("clip_frac_low"))
                .with("clip high", ORANGE, Style::Smoothed, p("clip_frac_high"))
                .with("clip", GREEN, Style::Smoothed, p("clip_frac"))],
        },
        Figure {
            file: "lag",
            title: "policy lag of the trained groups",
            panels: vec![Panel::new("policy lag", "versions behind", YAxis::FromZero)
                .with("mean lag", BLUE, Style::Smoothed, p("lag_mean"))
                .with("max lag", ORANGE, Style::Smoothed, p("lag_max"))
                .with("mean token lag", GREEN, Style::Smoothed, p("token_lag_mean"))],
        },
        Figure {
            file: "throughput",
            title: "throughput per stage",
            panels: vec![
                Panel::new("rollout throughput", "tokens/s", YAxis::FromZero).with(
                    "rollout tokens/s (run average)",
                    BLUE,
                    Style::Line,
                    p("rollout_tokens_per_s"),
                ),
                Panel::new("learner throughput", "samples/s", YAxis::FromZero).with(
                    "trained samples/s (run average)",
                    GREEN,
                    Style::Line,
                    p("trained_per_s"),
                ),
                Panel::new("learner time per step", "seconds", YAxis::FromZero)
                    .with("training", PURPLE, Style::Smoothed, p("train_s"))
                    .with("waiting for labeled groups", ORANGE, Style::Smoothed, p("wait_s")),
            ],
        },
        Figure {
            file: "curriculum",
            title: "wasted groups and the curriculum (task.adaptive)",
            panels: vec![
                Panel::new("groups whose samples all pass or all fail", "uniform groups (%)", YAxis::ShareFromZero).with(
                    "uniform share of the retired groups",
                    RED,
                    Style::Smoothed,
                    p("uniform_share"),
                ),
                Panel::new("arithmetic difficulty", "operators added", YAxis::FromZero).with("difficulty", BLUE, Style::Line, p("difficulty")),
                Panel::new("dataset prompts skipped", "prompts (cumulative)", YAxis::FromZero).with(
                    "skipped",
                    ORANGE,
                    Style::Line,
                    p("skipped_prompts"),
                ),
            ],
        },
        Figure {
            file: "reward_sources",
            title: "where the step scores of the trained groups came from",
            panels: vec![sources_panel(&steps, &judge_off)],
        },
        Figure {
            file: "judge",
            title: "judge calls",
            panels: vec![
                Panel::new("judge latency", "latency (ms)", YAxis::FromZero)
                    .with("p50", BLUE, Style::Smoothed, p("judge_latency_ms.p50"))
                    .with("p95", RED, Style::Smoothed, p("judge_latency_ms.p95")),
                Panel::new("judge calls refused by the annotation budget", "refusals (cumulative)", YAxis::FromZero).with(
                    "refused",
                    BROWN,
                    Style::Line,
                    p("judge_budget_refused"),
                ),
            ],
        },
        Figure {
            file: "annotation_queue",
            title: "background annotation queue",
            panels: vec![
                Panel::new("queue depth", "requests queued", YAxis::FromZero)
                    .with("depth", BLUE, Style::Line, p("annotation_queue.depth"))
                    .with("capacity", DARK, Style::Limit, p("annotation_queue.capacity")),
                Panel::new("requests shed (queue full, oldest first)", "requests (cumulative)", YAxis::FromZero).with(
                    "shed",
                    RED,
                    Style::Line,
                    p("annotation_queue.shed"),
                ),
            ],
        },
        Figure {
            file: "judge_quality",
            title: "judge and distiller quality",
            panels: vec![
                shade(
                    Panel::new("canary false-positive rate (windowed)", "false positives (%)", YAxis::ShareFromZero)
                        .with("canary false-positive rate", RED, Style::Line, p("canary_fp_rate"))
                        .with("limit (judge.canary_max_rate)", DARK, Style::Limit, p("canary_max_rate")),
                    &judge_off,
                ),
                Panel::new("distiller agreement with the judge (held-out judged steps)", "agreement (%)", YAxis::Share)
                    .with("agreement", GREEN, Style::Line, p("distill_agreement"))
                    .with("minimum (distill.min_agreement)", DARK, Style::Limit, p("distill_min_agreement")),
            ],
        },
    ];
    candidates
        .into_iter()
        .filter_map(|mut fig| {
            fig.panels.retain(Panel::has_data);
            (!fig.panels.is_empty()).then_some(fig)
        })
        .collect()
}

/// Rows without a value for this many rows in a row break the line there.
const GAP_ROWS: usize = 3;

/// `rows`' values of `path` (dots go into objects: `judge_latency_ms.p50`).
/// Rows without a finite number there are left out; where `GAP_ROWS` or
/// more in a row lack one (the judge was off, say), a gap marker (a NaN
/// value) breaks the line instead of bridging it.
fn points(rows: &[&Value], path: &str) -> Vec<Point> {
    let mut out = Vec::new();
    let mut missing = 0;
    for r in rows {
        let (Some(step), Some(time)) = (r["step"].as_f64(), r["time_s"].as_f64()) else { continue };
        match path.split('.').try_fold(*r, |v, k| v.get(k)).and_then(Value::as_f64).filter(|v| v.is_finite()) {
            Some(v) => {
                if missing >= GAP_ROWS && !out.is_empty() {
                    out.push((step, time, f64::NAN));
                }
                missing = 0;
                out.push((step, time, v));
            }
            None => missing += 1,
        }
    }
    out
}

/// Sources of step scores in stacking order (bottom first), named and coloured.
const SOURCES: [(&str, &str, RGBColor); 6] = [
    ("judge", "judge", BLUE),
    ("cache", "judge (cached)", LIGHT_BLUE),
    ("distilled", "distilled model", GREEN),
    ("verifier", "verifiers", ORANGE),
    ("guard", "guard", PURPLE),
    ("unknown", "unknown", GRAY),
];

/// Per step, the share of step scores from each source (`reward_sources`
/// counts), smoothed like the other per-step series; steps that scored
/// nothing are left out. Sources never seen are left out; keys not in
/// [`SOURCES`] are counted as `other`.
fn source_shares(steps: &[&Value]) -> Vec<(String, RGBColor, Vec<Point>)> {
    let mut names: Vec<(&str, String, RGBColor)> = SOURCES.iter().map(|(k, n, c)| (*k, n.to_string(), *c)).collect();
    names.push(("other", "other".into(), BROWN));
    let mut at: Vec<(f64, f64)> = Vec::new();
    let mut shares: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for r in steps {
        let (Some(counts), Some(step), Some(time)) = (r["reward_sources"].as_object(), r["step"].as_f64(), r["time_s"].as_f64()) else {
            continue;
        };
        let mut by_source = vec![0.0; names.len()];
        for (k, v) in counts {
            let n = v.as_f64().filter(|n| n.is_finite() && *n > 0.0).unwrap_or(0.0);
            let i = names.iter().position(|(key, _, _)| key == k).unwrap_or(names.len() - 1);
            by_source[i] += n;
        }
        let total: f64 = by_source.iter().sum();
        if total <= 0.0 {
            continue;
        }
        at.push((step, time));
        for (s, n) in shares.iter_mut().zip(by_source) {
            s.push(n / total);
        }
    }
    let window = plot::smoothing_window(at.len());
    names
        .into_iter()
        .zip(shares)
        .filter(|(_, s)| s.iter().any(|v| *v > 0.0))
        .map(|((_, name, color), s)| {
            let smooth = plot::moving_average(&s, window);
            (name, color, at.iter().zip(smooth).map(|((step, t), v)| (*step, *t, v)).collect())
        })
        .collect()
}

fn sources_panel(steps: &[&Value], judge_off: &[(f64, f64, f64, f64)]) -> Panel {
    let shares = source_shares(steps);
    let window = plot::smoothing_window(shares.first().map_or(0, |s| s.2.len()));
    let title =
        if window > 1 { format!("share of step scores by source ({window}-step avg)") } else { "share of step scores by source".into() };
    let mut panel = Panel::new(&title, "step scores (%)", YAxis::Share);
    panel.layers = shares.into_iter().map(|(name, color, points)| Layer { name, color, points }).collect();
    if panel.layers.is_empty() {
        return panel;
    }
    shade(panel, judge_off)
}

fn shade(mut panel: Panel, spans: &[(f64, f64, f64, f64)]) -> Panel {
    panel.shaded = spans.to_vec();
    panel.shaded_name = "judge off (canaries)";
    panel
}

/// Runs of consecutive step rows with `judge_trusted: false`, as (first step,
/// last step, start s, end s); a run starts at the row before it in time.
fn judge_off_spans(steps: &[&Value]) -> Vec<(f64, f64, f64, f64)> {
    let mut spans = Vec::new();
    let mut open: Option<(f64, f64, f64, f64)> = None;
    let mut prev_time = None;
    for r in steps {
        let (Some(step), Some(time)) = (r["step"].as_f64(), r["time_s"].as_f64()) else { continue };
        match (r["judge_trusted"].as_bool(), open.as_mut()) {
            (Some(false), Some(span)) => {
                span.1 = step;
                span.3 = time;
            }
            (Some(false), None) => open = Some((step, step, prev_time.unwrap_or(time), time)),
            (_, _) => spans.extend(open.take()),
        }
        prev_time = Some(time);
    }
    spans.extend(open);
    spans
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
        let args: serde_json::Map<String, Value> = span
            .as_object()
            .map(|o| o.iter().filter(|(k, _)| *k != "name").map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
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
