//! Tracing: human-readable lines on the console, and per run a `trace.jsonl`
//! with one JSON object per event and per span open/close, carrying the
//! structured fields (`trajectory_id`, `policy_version`, `step`, ...).

use crate::config::LogConfig;
use std::path::Path;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Keeps the trace writer alive; dropping it flushes `trace.jsonl`.
#[must_use = "dropping the guard stops the trace writer"]
pub struct Telemetry {
    _trace: Option<WorkerGuard>,
}

/// Installs the global subscriber: console always, `trace.jsonl` in `run_dir`
/// when given.
pub fn init(log: &LogConfig, run_dir: Option<&Path>) -> std::io::Result<Telemetry> {
    let console_filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::builder().parse(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&log.console));
    let console = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(console_filter);
    let (trace, guard) = match run_dir {
        Some(dir) => {
            let (layer, guard) = trace_layer(&dir.join("trace.jsonl"), &log.trace)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    // A second init (tests calling commands in-process) keeps the first subscriber.
    let _ = Registry::default().with(console).with(trace).try_init();
    Ok(Telemetry { _trace: guard })
}

/// Console-only tracing, for commands that make no run folder.
pub fn init_console(log: &LogConfig) -> Telemetry {
    init(log, None).expect("console tracing needs no I/O")
}

/// The JSON-lines layer writing to `path`, with span open/close events so that
/// `prism report` can rebuild a timeline of which actor was busy when.
pub fn trace_layer<S>(path: &Path, filter: &str) -> std::io::Result<(Box<dyn Layer<S> + Send + Sync>, WorkerGuard)>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // Appended to: a resumed run keeps the trace of the sessions before it.
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let (writer, guard) = tracing_appender::non_blocking(file);
    let layer = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(writer)
        .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
        .with_current_span(true)
        .with_span_list(true)
        .with_thread_names(true)
        .with_filter(EnvFilter::new(filter))
        .boxed();
    Ok((layer, guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_file_is_json_lines_with_structured_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let (layer, guard) = trace_layer::<Registry>(&path, "info").unwrap();
        let subscriber = Registry::default().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("rollout_worker", worker = 2);
            let _e = span.enter();
            let t = tracing::info_span!("trajectory", trajectory_id = 17u64, policy_version = 3u64);
            t.in_scope(|| tracing::info!(step = 5u64, reward = 0.5f64, "labeled"));
            tracing::debug!("filtered out at info");
        });
        drop(guard);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
        // 2 span opens + 1 event + 2 span closes; the debug event is filtered.
        assert_eq!(lines.len(), 5, "{text}");
        let event = lines.iter().find(|l| l["fields"]["message"] == "labeled").expect("the event");
        assert_eq!(event["fields"]["step"], 5);
        assert_eq!(event["fields"]["reward"], 0.5);
        assert_eq!(event["span"]["trajectory_id"], 17);
        assert_eq!(event["spans"][0]["name"], "rollout_worker");
        assert_eq!(event["spans"][0]["worker"], 2);
        let closes = lines.iter().filter(|l| l["fields"]["message"] == "close").count();
        assert_eq!(closes, 2);
    }
}
