//! Tracing: human-readable lines on the console, and per run a `trace.jsonl`
//! with one JSON object per event and per span open/close, carrying the
//! structured fields (`trajectory_id`, `policy_version`, `step`, ...).
//!
//! The console is for people watching a run: warnings, run-level events
//! (run folder, warm start, restarts, the finishing summary) and, drawn
//! beside tracing by `progress`, the progress line. Per-record events — an
//! `info` (or quieter) event of a library crate carrying a `step`,
//! `trajectory_id` or `policy_version` field, such as a line per learner
//! step or per weight version — go to `trace.jsonl` (and `metrics.jsonl`)
//! only, unless the console filter asks for `debug` or more, which shows
//! everything it names. This binary's own events (`prism::…`) speak about
//! the run and are never records.
//!
//! With `log.otlp_endpoint`, the spans also go to an OpenTelemetry collector
//! (OTLP over HTTP), batched on a thread of their own, as service
//! `prism-<role>` with the attribute `prism.run_id`.

use crate::config::LogConfig;
use std::path::Path;
use tracing::level_filters::LevelFilter;
use tracing::{Level, Metadata};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Fields that mark an event as one record among many (a step, a trajectory,
/// a policy version) rather than news about the run.
const RECORD_FIELDS: [&str; 3] = ["step", "trajectory_id", "policy_version"];

/// Keeps the trace writer alive; dropping it flushes `trace.jsonl` and the
/// spans not yet exported.
#[must_use = "dropping the guard stops the trace writer"]
pub struct Telemetry {
    _trace: Option<WorkerGuard>,
    _otlp: Option<Otlp>,
}

/// The OTLP exporter's provider; dropping it exports what is left.
pub struct Otlp(opentelemetry_sdk::trace::SdkTracerProvider);

impl Drop for Otlp {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("prism: exporting the last spans to log.otlp_endpoint: {e}");
        }
    }
}

/// The layer exporting spans that `log.otlp` lets through to
/// `log.otlp_endpoint`, as service `prism-<role>` of run `run_id`; `None`
/// without an endpoint. Call it outside an async runtime (the blocking HTTP
/// client it makes has a runtime of its own).
pub fn otlp_layer<S>(log: &LogConfig, role: &str, run_id: &str) -> std::io::Result<Option<(Box<dyn Layer<S> + Send + Sync>, Otlp)>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::WithExportConfig;
    if log.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    // The blocking reqwest client the exporter makes (with this timeout).
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&log.otlp_endpoint)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| std::io::Error::other(format!("log.otlp_endpoint {}: {e}", log.otlp_endpoint)))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(format!("prism-{role}"))
        .with_attributes([
            opentelemetry::KeyValue::new("prism.run_id", run_id.to_string()),
            opentelemetry::KeyValue::new("service.instance.id", instance()),
        ])
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("prism")).with_filter(EnvFilter::new(&log.otlp)).boxed();
    Ok(Some((layer, Otlp(provider))))
}

/// This process, as the trace backend names it: host and pid.
fn instance() -> String {
    let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "unknown".into());
    format!("{host}/{}", std::process::id())
}

/// Installs the global subscriber: console always, `trace.jsonl` in `run_dir`
/// when given.
pub fn init(log: &LogConfig, run_dir: Option<&Path>) -> std::io::Result<Telemetry> {
    init_role(log, run_dir, "train", "")
}

/// [`init`] for `role` of the distributed run `run_id`, which exports its
/// spans with `log.otlp_endpoint` under those names.
pub fn init_role(log: &LogConfig, run_dir: Option<&Path>, role: &str, run_id: &str) -> std::io::Result<Telemetry> {
    let console_filter =
        std::env::var("RUST_LOG").ok().and_then(|v| EnvFilter::builder().parse(v).ok()).unwrap_or_else(|| EnvFilter::new(&log.console));
    let console = console_layer(console_filter, std::io::stderr);
    let (trace, guard) = match run_dir {
        Some(dir) => {
            let (layer, guard) = trace_layer(&dir.join("trace.jsonl"), &log.trace)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let (otlp, provider) = match otlp_layer(log, role, run_id)? {
        Some((layer, provider)) => (Some(layer), Some(provider)),
        None => (None, None),
    };
    // A second init (tests calling commands in-process) keeps the first subscriber.
    let _ = Registry::default().with(console).with(trace).with(otlp).try_init();
    Ok(Telemetry { _trace: guard, _otlp: provider })
}

/// Console-only tracing, for commands that make no run folder.
pub fn init_console(log: &LogConfig) -> Telemetry {
    init(log, None).expect("console tracing needs no I/O")
}

/// Human-readable lines to `writer`: what `filter` lets through, less the
/// per-record events when `filter` asks for no more than `info`.
pub fn console_layer<S, W>(filter: EnvFilter, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let show_records = filter.max_level_hint().is_some_and(|l| l >= LevelFilter::DEBUG);
    let quiet = filter_fn(move |meta| show_records || !is_record(meta));
    tracing_subscriber::fmt::layer().with_writer(writer).with_filter(filter.and(quiet)).boxed()
}

/// An event of a library crate at `info` or below that carries one of
/// [`RECORD_FIELDS`].
fn is_record(meta: &Metadata<'_>) -> bool {
    let binary = meta.target() == "prism" || meta.target().starts_with("prism::");
    meta.is_event() && !binary && *meta.level() >= Level::INFO && RECORD_FIELDS.iter().any(|f| meta.fields().field(f).is_some())
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
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
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

    /// A `MakeWriter` into a shared buffer, to read what the console printed.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'w self) -> Buffer {
            self.clone()
        }
    }

    /// What the console prints, under `filter`, of a run's typical events.
    fn console_of(filter: &str) -> String {
        let out = Buffer::default();
        let subscriber = Registry::default().with(console_layer(EnvFilter::new(filter), out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(run = "runs/x", "run folder");
            tracing::info!(step = 100u64, loss = 0.3f64, "warm start");
            tracing::info!(target: "prism_actors::metrics", step = 3u64, reward = 0.5f64, lag = 0.2f64, "learner step");
            tracing::info!(target: "prism_transport::weights", policy_version = 3u64, "weights published");
            tracing::info_span!("trajectory", trajectory_id = 9u64)
                .in_scope(|| tracing::info!(target: "prism_transport::redis", trajectory_id = 9u64, "skipping"));
            tracing::warn!(target: "prism_reward::labeler", step = 3u64, "judge off: canary false-positive rate 30% over 10%");
            tracing::info!(ledger = "made 4 = trained 4", "run finished");
            tracing::debug!("debug detail");
        });
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn console_keeps_per_step_records_out_at_info() {
        let text = console_of("warn,prism=info");
        for line in ["run folder", "warm start", "run finished"] {
            assert!(text.contains(line), "the binary's run-level info is shown, step field or not: {line} missing from {text}");
        }
        assert!(text.contains("judge off: canary"), "warnings are shown, step field or not: {text}");
        for record in ["learner step", "weights published", "skipping", "debug detail"] {
            assert!(!text.contains(record), "{record} is a per-record event, for the trace only: {text}");
        }
    }

    #[test]
    fn console_shows_records_when_asked_for_debug() {
        let text = console_of("debug");
        for line in ["run folder", "warm start", "learner step", "weights published", "skipping", "debug detail"] {
            assert!(text.contains(line), "{line} missing at debug: {text}");
        }
    }

    /// A collector on loopback that answers every request 200 and keeps the
    /// bodies (OTLP/HTTP protobuf: strings travel as their UTF-8 bytes).
    fn collector() -> (String, std::sync::mpsc::Receiver<Vec<u8>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let _ = tx.send(body);
                    let out = reader.get_mut();
                    out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n").unwrap();
                }
            }
        });
        (url, rx)
    }

    /// With `log.otlp_endpoint`, spans reach the collector named by role and
    /// run, at the latest when the guard is dropped; filtered-out spans do not.
    #[test]
    fn spans_are_exported_to_an_otlp_collector() {
        let (url, bodies) = collector();
        let log = LogConfig { console: "warn".into(), trace: "info".into(), otlp_endpoint: url, otlp: "info".into() };
        let (layer, guard) = otlp_layer::<Registry>(&log, "rollout", "run-42").unwrap().expect("an endpoint is set");
        tracing::subscriber::with_default(Registry::default().with(layer), || {
            tracing::info_span!("generate", policy_version = 3u64).in_scope(|| tracing::info!("sampled"));
            tracing::debug_span!("too_fine").in_scope(|| {});
        });
        drop(guard);
        let body = bodies.recv_timeout(std::time::Duration::from_secs(20)).expect("the collector got spans");
        let text = String::from_utf8_lossy(&body);
        for want in ["prism-rollout", "run-42", "prism.run_id", "generate", "policy_version"] {
            assert!(text.contains(want), "{want} missing from the export");
        }
        assert!(!text.contains("too_fine"), "a span below log.otlp is not exported");
        // Without an endpoint there is no layer.
        let off = LogConfig { otlp_endpoint: String::new(), ..log };
        assert!(otlp_layer::<Registry>(&off, "rollout", "x").unwrap().is_none());
    }
}
