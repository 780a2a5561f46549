//! A judge that behaves like a real one, for benchmarks and tests: an
//! OpenAI-compatible server (`/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`) that grades the arithmetic task's steps with the project's
//! step checker ([`crate::steps::check_arithmetic`]) and answers the way a
//! served GenPRM or ThinkPRM judge does — slowly, sometimes wrongly, sometimes
//! not at all.
//!
//! - **Grading.** The problem and the steps are read back from the prompt the
//!   judge client rendered ([`read_prompt`]); GenPRM-style prompts get a verdict
//!   on their last step, ThinkPRM-style prompts one per step. Each verdict is
//!   flipped with probability `flip_p`, decided by a hash of (seed, style,
//!   problem, steps, choice, step), so a rerun gets the same verdicts; each
//!   of `n` choices is graded on its own, as if sampled. Content-free steps
//!   (no digit, e.g. the client's canaries `:`, `Solution`) and steps the
//!   checker cannot score are judged wrong, except that the judge is fooled
//!   with probability `canary_accept_p`; they are never flipped, so the canary
//!   false-positive rate measures `canary_accept_p` alone.
//! - **Logprobs.** Replies are cut into word and punctuation tokens; when asked
//!   (chat `logprobs: true, top_logprobs: k`; completions `logprobs: k`) each
//!   token carries a logprob, and the verdict token carries both verdict words
//!   among its alternatives: `confidence` on the verdict given
//!   (`flipped_confidence` when it was flipped), the rest on the other word.
//!   `n` and `max_tokens` are honoured (a reply cut at `max_tokens` tokens
//!   ends with `finish_reason: "length"`).
//! - **Time.** A request waits for one of `concurrency` slots (a real server's
//!   batch slots), then holds it for a service time drawn from a log-normal
//!   distribution with mean `latency_mean_ms` and log-space spread
//!   `latency_sigma`. What a client sees is queue wait plus service time.
//! - **Failures.** A share `fail_share` of requests fails after its service
//!   time: `fail_status_share` of those with HTTP 500 or 503 (even odds; 503
//!   with `Retry-After: 1`), the rest with a connection reset.
//! - **Outages.** [`RealisticJudge::pause`] closes the listener (connections
//!   are refused) and resets every open connection; [`RealisticJudge::resume`]
//!   listens on the same port again.
//!
//! It runs on its own thread and single-threaded runtime, like
//! [`super::TestServer`], and reuses its HTTP/1.1 reading (keep-alive,
//! `Content-Length` bodies).

use crate::judge::Style;
use crate::steps::{check_arithmetic, expression_numbers};
use regex::Regex;
use serde::Serialize;
use serde_json::{Value, json};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};

/// How the realistic judge behaves. The defaults are the benchmark's judge
/// (issue 15): 1.5 s mean latency, 15% flipped verdicts, 16 slots, 2% failures.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where to listen. Default `127.0.0.1:0` (a free port).
    pub listen: SocketAddr,
    /// Mean service time of a request (queue wait excluded), ms. Default 1500.
    pub latency_mean_ms: f64,
    /// Spread of the service time: the sigma of its logarithm (log-normal with
    /// the mean above); 0 = always exactly the mean. Default 0.5 (the middle
    /// 90% of service times lie within about 0.39× to 2× the mean).
    pub latency_sigma: f64,
    /// Probability that a verdict is flipped. Default 0.15.
    pub flip_p: f64,
    /// Requests served at once; the others wait in a queue. Default 16.
    pub concurrency: usize,
    /// Share of requests that fail (after their service time). Default 0.02.
    pub fail_share: f64,
    /// Of the failures, the share answered with 500 or 503 (even odds); the
    /// rest are connection resets. Default 0.5.
    pub fail_status_share: f64,
    /// Probability that a content-free step (a canary) is accepted. Default 0.
    pub canary_accept_p: f64,
    /// Probability on the verdict word given, in the verdict token's
    /// alternatives (the other word gets the rest). Default 0.9.
    pub confidence: f64,
    /// The same for a flipped verdict. Default 0.7.
    pub flipped_confidence: f64,
    /// ThinkPRM replies write their prose between `Step i:` and the verdict
    /// (`Step i: <prose> \boxed{correct}`, as ThinkPRM does); when false, the
    /// prose is a line of its own before `Step i: \boxed{correct}`. Default true.
    pub inline_prose: bool,
    /// Seed of every random choice (verdict flips, service times, failures).
    /// Default 0.
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency_mean_ms: 1500.0,
            latency_sigma: 0.5,
            flip_p: 0.15,
            concurrency: 16,
            fail_share: 0.02,
            fail_status_share: 0.5,
            canary_accept_p: 0.0,
            confidence: 0.9,
            flipped_confidence: 0.7,
            inline_prose: true,
            seed: 0,
        }
    }
}

impl Config {
    /// Checks values that are not acceptable; the message names the field.
    pub fn validate(&self) -> io::Result<()> {
        let invalid = |field: &str, value: &dyn std::fmt::Debug, why: &str| {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("realistic judge {field} = {value:?}: {why}")))
        };
        if !(self.latency_mean_ms.is_finite() && self.latency_mean_ms >= 0.0) {
            return invalid("latency_mean_ms", &self.latency_mean_ms, "must be >= 0");
        }
        if !(self.latency_sigma.is_finite() && (0.0..=5.0).contains(&self.latency_sigma)) {
            return invalid("latency_sigma", &self.latency_sigma, "must be in [0, 5]");
        }
        for (field, p) in [
            ("flip_p", self.flip_p),
            ("fail_share", self.fail_share),
            ("fail_status_share", self.fail_status_share),
            ("canary_accept_p", self.canary_accept_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return invalid(field, &p, "must be in [0, 1]");
            }
        }
        for (field, p) in [("confidence", self.confidence), ("flipped_confidence", self.flipped_confidence)] {
            if !(0.5..=1.0).contains(&p) {
                return invalid(field, &p, "must be in [0.5, 1]");
            }
        }
        if self.concurrency == 0 {
            return invalid("concurrency", &self.concurrency, "must be > 0");
        }
        Ok(())
    }
}

/// What the judge has done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Requests received (every path, bad ones included).
    pub requests: u64,
    /// Completion requests answered with 200 (`/v1/models` not counted).
    pub answered: u64,
    /// Verdicts given (one per reply choice and judged step).
    pub verdicts: u64,
    /// Of those, flipped.
    pub flipped: u64,
    /// Of those, content-free steps accepted.
    pub canaries_accepted: u64,
    /// Requests failed on purpose (`failed_status + resets`).
    pub failed: u64,
    /// Answered 500 or 503 on purpose.
    pub failed_status: u64,
    /// Connections reset on purpose.
    pub resets: u64,
    /// Requests cut off by [`RealisticJudge::pause`] or [`RealisticJudge::stop`]
    /// before they were answered.
    pub cut: u64,
    /// Answered 400 (not JSON, no prompt) or 404 (unknown path).
    pub bad_requests: u64,
    /// Times the judge was paused.
    pub outages: u64,
    /// The most requests holding a slot at once (at most `concurrency`).
    pub max_in_flight: u64,
    /// The most requests waiting for a slot at once.
    pub max_queued: u64,
    /// Mean time from a request's arrival to its 200 reply (queue wait
    /// included), ms.
    pub latency_ms_mean: f64,
    /// Mean time answered requests waited for a slot, ms.
    pub queue_ms_mean: f64,
}

#[derive(Default)]
struct Counters {
    stats: Stats,
    latency_sum_ms: f64,
    queue_sum_ms: f64,
}

struct Shared {
    cfg: Config,
    slots: Semaphore,
    requests: AtomicU64,
    in_flight: AtomicU64,
    queued: AtomicU64,
    paused: AtomicBool,
    counters: Mutex<Counters>,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.counters.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

enum Command {
    Pause(std::sync::mpsc::Sender<io::Result<()>>),
    Resume(std::sync::mpsc::Sender<io::Result<()>>),
    Stop,
}

/// The realistic judge server; stops when dropped.
pub struct RealisticJudge {
    addr: SocketAddr,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RealisticJudge {
    /// Starts the judge on `cfg.listen`.
    pub fn start(cfg: Config) -> io::Result<Self> {
        cfg.validate()?;
        let listener = std::net::TcpListener::bind(cfg.listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            slots: Semaphore::new(cfg.concurrency),
            cfg,
            requests: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            counters: Mutex::new(Counters::default()),
        });
        let (commands, received) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let server = shared.clone();
        let thread = std::thread::Builder::new().name("realistic-judge".into()).spawn(move || {
            runtime.block_on(accept_loop(listener, addr, received, server));
        })?;
        Ok(Self { addr, shared, commands, thread: Some(thread) })
    }

    /// The OpenAI-style base URL, `http://ADDR/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn config(&self) -> &Config {
        &self.shared.cfg
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> u64 {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Whether the judge is in an outage.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let c = self.shared.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = c.stats.clone();
        stats.requests = self.requests();
        if stats.answered > 0 {
            stats.latency_ms_mean = c.latency_sum_ms / stats.answered as f64;
            stats.queue_ms_mean = c.queue_sum_ms / stats.answered as f64;
        }
        stats
    }

    /// Starts an outage: the listener is closed, so connections are refused,
    /// and every open connection is reset (requests in it are cut off).
    /// Returns once the listener is closed (the resets follow at once); a
    /// no-op while paused.
    pub fn pause(&self) -> io::Result<()> {
        self.command(Command::Pause)
    }

    /// Ends an outage: listens on the same address again. A no-op while not
    /// paused; fails if the port was taken meanwhile.
    pub fn resume(&self) -> io::Result<()> {
        self.command(Command::Resume)
    }

    fn command(&self, make: fn(std::sync::mpsc::Sender<io::Result<()>>) -> Command) -> io::Result<()> {
        let (ack, done) = std::sync::mpsc::channel();
        let gone = || io::Error::new(io::ErrorKind::NotConnected, "the realistic judge has stopped");
        self.commands.send(make(ack)).map_err(|_| gone())?;
        done.recv().map_err(|_| gone())?
    }

    /// Stops the server and reports what it did.
    pub fn stop(mut self) -> Stats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let _ = self.commands.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RealisticJudge {
    fn drop(&mut self) {
        self.shutdown();
    }
}

enum Event {
    Command(Option<Command>),
    Accepted(io::Result<TcpStream>),
}

async fn accept_loop(
    listener: std::net::TcpListener,
    addr: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
) {
    let mut listener = tokio::net::TcpListener::from_std(listener).ok();
    // Bumped at each pause; every connection resets itself when it changes.
    let (epoch, _) = watch::channel(0u64);
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await.map(|(stream, _)| stream),
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            command = commands.recv() => Event::Command(command),
            accepted = accept => Event::Accepted(accepted),
        };
        match event {
            Event::Accepted(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let mut cut = epoch.subscribe();
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut stream = stream;
                    let reset = tokio::select! {
                        _ = serve(&mut stream, &shared) => false,
                        _ = cut.changed() => true,
                    };
                    if reset {
                        let _ = stream.set_zero_linger();
                    }
                });
            }
            Event::Accepted(Err(_)) => {}
            Event::Command(Some(Command::Pause(ack))) => {
                if listener.take().is_some() {
                    shared.paused.store(true, Ordering::SeqCst);
                    shared.count(|c| c.stats.outages += 1);
                    epoch.send_modify(|e| *e += 1);
                }
                let _ = ack.send(Ok(()));
            }
            Event::Command(Some(Command::Resume(ack))) => {
                let result = if listener.is_some() {
                    Ok(())
                } else {
                    rebind(addr).map(|l| {
                        listener = Some(l);
                        shared.paused.store(false, Ordering::SeqCst);
                    })
                };
                let _ = ack.send(result);
            }
            Event::Command(Some(Command::Stop) | None) => break,
        }
    }
}

/// Listens on `addr` again (std sets `SO_REUSEADDR`, so connections of the
/// previous listener in TIME_WAIT do not block it).
fn rebind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// How one request is answered.
enum Answer {
    Http { status: u16, body: String, headers: &'static [(&'static str, &'static str)] },
    Reset,
}

/// Serves one connection: requests one after another (keep-alive).
async fn serve(stream: &mut TcpStream, shared: &Shared) {
    let mut buf = Vec::new();
    loop {
        let Some((path, body)) = super::read_request(stream, &mut buf).await else {
            return;
        };
        let arrived = Instant::now();
        let seq = shared.requests.fetch_add(1, Ordering::SeqCst);
        let mut pending = Pending { shared, done: false };
        let (answer, graded) = answer(shared, seq, &path, &body).await;
        let ok = match answer {
            Answer::Http { status, body, headers } => {
                let mut head = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    super::reason(status),
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let written =
                    stream.write_all(head.as_bytes()).await.is_ok() && stream.write_all(body.as_bytes()).await.is_ok();
                if let (true, Some(queue)) = (written, graded) {
                    let ms = arrived.elapsed().as_secs_f64() * 1e3;
                    shared.count(|c| {
                        c.stats.answered += 1;
                        c.latency_sum_ms += ms;
                        c.queue_sum_ms += queue.as_secs_f64() * 1e3;
                    });
                }
                written
            }
            Answer::Reset => {
                let _ = stream.set_zero_linger();
                false
            }
        };
        pending.done = true;
        if !ok {
            return;
        }
    }
}

/// Counts a request cut off before its answer was sent.
struct Pending<'a> {
    shared: &'a Shared,
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.shared.count(|c| c.stats.cut += 1);
        }
    }
}

/// Adds one to a gauge for as long as it lives, recording the gauge's peak.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(shared: &'a Shared, gauge: &'a AtomicU64, peak: fn(&mut Stats) -> &mut u64) -> Self {
        let now = gauge.fetch_add(1, Ordering::SeqCst) + 1;
        shared.count(|c| {
            let p = peak(&mut c.stats);
            *p = (*p).max(now);
        });
        Gauge(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn error_body(status: u16, message: &str) -> String {
    json!({"error": {"message": message, "type": "realistic_judge", "code": status}}).to_string()
}

/// The answer to request `seq`, and for a graded completion, how long it
/// waited for a slot.
async fn answer(shared: &Shared, seq: u64, path: &str, body: &[u8]) -> (Answer, Option<Duration>) {
    let bad = |status: u16, message: &str| {
        shared.count(|c| c.stats.bad_requests += 1);
        (Answer::Http { status, body: error_body(status, message), headers: &[] }, None)
    };
    let path = path.split('?').next().unwrap_or(path);
    let api = match path.trim_end_matches('/') {
        "/v1/chat/completions" => Api::Chat,
        "/v1/completions" => Api::Completions,
        "/v1/models" => {
            let models =
                json!({"object": "list", "data": [{"id": "realistic-judge", "object": "model", "owned_by": "prism"}]});
            return (Answer::Http { status: 200, body: models.to_string(), headers: &[] }, None);
        }
        _ => return bad(404, &format!("no route {path}")),
    };
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return bad(400, "the body is not JSON");
    };
    let Some(prompt) = prompt_of(api, &request) else {
        return bad(400, "no prompt (`messages` or `prompt`)");
    };
    let cfg = &shared.cfg;

    let waiting = Instant::now();
    // The semaphore is fair: with requests waiting, a newcomer finds no free slot.
    let _slot = match shared.slots.try_acquire() {
        Ok(slot) => slot,
        Err(_) => {
            let _queued = Gauge::enter(shared, &shared.queued, |s| &mut s.max_queued);
            let Ok(slot) = shared.slots.acquire().await else { return bad(503, "shutting down") };
            slot
        }
    };
    let queue = waiting.elapsed();
    {
        let _busy = Gauge::enter(shared, &shared.in_flight, |s| &mut s.max_in_flight);
        tokio::time::sleep(service_time(cfg, seq)).await;
    }

    let fail = hash(cfg.seed, &[b"fail", &seq.to_le_bytes()]);
    if unit(fail) < cfg.fail_share {
        let how = hash(cfg.seed, &[b"how", &seq.to_le_bytes()]);
        if unit(how) < cfg.fail_status_share {
            shared.count(|c| {
                c.stats.failed += 1;
                c.stats.failed_status += 1;
            });
            let answer = if how & 1 == 0 {
                Answer::Http { status: 500, body: error_body(500, "internal error"), headers: &[] }
            } else {
                Answer::Http { status: 503, body: error_body(503, "overloaded"), headers: &[("retry-after", "1")] }
            };
            return (answer, None);
        }
        shared.count(|c| {
            c.stats.failed += 1;
            c.stats.resets += 1;
        });
        return (Answer::Reset, None);
    }

    let asked = Asked::of(api, &request);
    let read = read_prompt(&prompt);
    let mut choices = Vec::with_capacity(asked.n);
    let mut completion_tokens = 0;
    for choice in 0..asked.n {
        let (reply, grades) = reply(cfg, &read, choice);
        shared.count(|c| {
            c.stats.verdicts += grades.len() as u64;
            c.stats.flipped += grades.iter().filter(|g| g.flipped).count() as u64;
            c.stats.canaries_accepted += grades.iter().filter(|g| g.canary && g.positive).count() as u64;
        });
        let (tokens, finish) = match asked.max_tokens {
            Some(max) if reply.len() > max => (&reply[..max], "length"),
            _ => (&reply[..], "stop"),
        };
        completion_tokens += tokens.len();
        choices.push(choice_json(api, choice, tokens, finish, asked.top_logprobs));
    }
    let model = request["model"].as_str().unwrap_or("realistic-judge");
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let prompt_tokens = TOKEN.find_iter(&prompt).count();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    let object = match api {
        Api::Chat => "chat.completion",
        Api::Completions => "text_completion",
    };
    let body = json!({
        "id": format!("judge-{seq}"),
        "object": object,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    });
    (Answer::Http { status: 200, body: body.to_string(), headers: &[] }, Some(queue))
}

/// A log-normal service time with the configured mean (`exp(mu + sigma z)`
/// with `mu = ln(mean) - sigma²/2`), seeded by the request's arrival number.
fn service_time(cfg: &Config, seq: u64) -> Duration {
    if cfg.latency_mean_ms <= 0.0 {
        return Duration::ZERO;
    }
    let s = cfg.latency_sigma;
    let u1 = 1.0 - unit(hash(cfg.seed, &[b"latency1", &seq.to_le_bytes()]));
    let u2 = unit(hash(cfg.seed, &[b"latency2", &seq.to_le_bytes()]));
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    let ms = (cfg.latency_mean_ms.ln() - s * s / 2.0 + s * z).exp();
    Duration::from_secs_f64((ms / 1e3).min(3600.0))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completions,
}

/// What a request asks for besides the prompt.
struct Asked {
    n: usize,
    max_tokens: Option<usize>,
    /// Alternatives per token; `None` = no logprobs.
    top_logprobs: Option<usize>,
}

impl Asked {
    fn of(api: Api, r: &Value) -> Self {
        let n = r["n"].as_u64().unwrap_or(1).clamp(1, 128) as usize;
        let max_tokens = r["max_tokens"].as_u64().or_else(|| r["max_completion_tokens"].as_u64()).map(|m| m as usize);
        let top_logprobs = match api {
            Api::Chat => (r["logprobs"].as_bool() == Some(true))
                .then(|| r["top_logprobs"].as_u64().unwrap_or(0).min(20) as usize),
            Api::Completions => r["logprobs"].as_u64().map(|k| k.min(20) as usize),
        };
        Self { n, max_tokens, top_logprobs }
    }
}

/// The prompt text: every chat message's text joined by newlines, or `prompt`
/// (the first one when it is a list).
fn prompt_of(api: Api, r: &Value) -> Option<String> {
    match api {
        Api::Chat => {
            let messages = r["messages"].as_array()?;
            let texts: Vec<String> = messages
                .iter()
                .filter_map(|m| match &m["content"] {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(parts) => {
                        Some(parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join(""))
                    }
                    _ => None,
                })
                .collect();
            (!texts.is_empty()).then(|| texts.join("\n"))
        }
        Api::Completions => match &r["prompt"] {
            Value::String(s) => Some(s.clone()),
            Value::Array(list) => list.first()?.as_str().map(str::to_string),
            _ => None,
        },
    }
}

/// What the judge read from a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgePrompt {
    /// GenPRM (the prompt asks for `\boxed{Yes}`/`\boxed{No}`) or ThinkPRM (it
    /// asks for `\boxed{correct}`/`\boxed{incorrect}`), read from the prompt
    /// outside the steps.
    pub style: Style,
    /// The arithmetic expression of the problem (the first line after
    /// `Problem:` that is one, `Q:` stripped), if any.
    pub problem: Option<String>,
    /// The steps in order, without their nonce tags and surrounding whitespace.
    pub steps: Vec<String>,
}

/// `Step 3:` at the start of a line.
static STEP_HEADER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^[ \t]*Step[ \t]+\d+[ \t]*:[ \t]*").expect("valid regex"));
/// An opening nonce tag around a step, `<step-abcdef12>`, at the start of a
/// line (the templates also name the tag in their instructions, mid-line).
static STEP_OPEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?m)^[ \t]*<(step-[0-9A-Za-z_]+)>").expect("valid regex"));
/// Any nonce tag, opening or closing (`<problem-…>`, `</step-…>`).
static NONCE_TAG: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"</?[A-Za-z]+-[0-9A-Za-z_]+>").expect("valid regex"));
/// The reply tokenizer: a word, a number or one other character, with the
/// whitespace before it; trailing whitespace on its own.
static TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*(?:[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9])|\s+").expect("valid regex"));

/// Reads the problem, the steps and the style back from a judge prompt
/// rendered by the built-in templates (or one laid out like them): steps are
/// the contents of `<step-…>…</step-…>` nonce tags (less a `Step k:` header
/// at their start) when the prompt has them, else the text after each
/// `Step k:` header at the start of a line, up to a blank line or the next
/// header. Step text is returned as the prompt shows it (escaped by the
/// client where the policy wrote something that looks like prompt structure).
pub fn read_prompt(prompt: &str) -> JudgePrompt {
    let mut steps = Vec::new();
    // Byte ranges of the steps (tags and headers included), to tell the
    // template's own text from the policy's.
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some(open) = STEP_OPEN.captures_at(prompt, at) {
        let whole = open.get(0).map_or(at..at, |m| m.range());
        let close = format!("</{}>", &open[1]);
        let Some(end) = prompt[whole.end..].find(&close) else {
            break;
        };
        let inside = &prompt[whole.end..whole.end + end];
        // The built-in templates put the step's header inside its tags.
        let header = STEP_HEADER.find(inside).filter(|h| inside[..h.start()].trim().is_empty());
        steps.push(inside[header.map_or(0, |h| h.end())..].trim().to_string());
        spans.push(whole.start..whole.end + end + close.len());
        at = whole.end + end + close.len();
    }
    if steps.is_empty() {
        let headers: Vec<_> = STEP_HEADER.find_iter(prompt).collect();
        for (i, h) in headers.iter().enumerate() {
            let region_end = headers.get(i + 1).map_or(prompt.len(), |next| next.start());
            let region = &prompt[h.end()..region_end];
            // The step's lines: up to the first blank line after some text.
            let mut len = 0;
            let mut seen_text = false;
            for line in region.split_inclusive('\n') {
                if line.trim().is_empty() && seen_text {
                    break;
                }
                seen_text |= !line.trim().is_empty();
                len += line.len();
            }
            steps.push(NONCE_TAG.replace_all(&region[..len], "").trim().to_string());
            spans.push(h.start()..h.end() + len);
        }
    }
    let first_step = spans.first().map_or(prompt.len(), |s| s.start);
    let head = &prompt[..first_step];
    let problem_text = head.find("Problem:").map_or(head, |i| &head[i + "Problem:".len()..]);
    let problem = NONCE_TAG.replace_all(problem_text, "\n").lines().find_map(|line| {
        let line = line.trim();
        let line = line.strip_prefix("Q:").unwrap_or(line).trim();
        expression_numbers(line).map(|_| line.to_string())
    });
    let mut frame = String::with_capacity(prompt.len());
    let mut from = 0;
    for s in &spans {
        frame.push_str(&prompt[from..s.start]);
        from = s.end;
    }
    frame.push_str(&prompt[from..]);
    let style = if frame.contains("\\boxed{correct}") || frame.contains("\\boxed{incorrect}") {
        Style::Thinkprm
    } else {
        Style::Genprm
    };
    JudgePrompt { style, problem, steps }
}

/// One verdict of a reply.
#[derive(Debug, Clone, Copy)]
struct Grade {
    /// 1-based step number.
    step: usize,
    positive: bool,
    flipped: bool,
    /// The step was content-free or could not be checked.
    canary: bool,
    confidence: f64,
}

/// A reply token with its logprob and alternatives (most likely first).
#[derive(Debug, Clone)]
struct Tok {
    text: String,
    logprob: f64,
    top: Vec<(String, f64)>,
}

/// Choice `choice`'s reply to a prompt, as tokens, and the verdicts in it.
/// Random choices hash what was read from the prompt, not the prompt itself,
/// which holds a fresh nonce at every render.
fn reply(cfg: &Config, read: &JudgePrompt, choice: usize) -> (Vec<Tok>, Vec<Grade>) {
    let steps: Vec<&str> = read.steps.iter().map(String::as_str).collect();
    let mut parts: Vec<&[u8]> = vec![read.style.as_str().as_bytes(), read.problem.as_deref().unwrap_or("").as_bytes()];
    parts.extend(steps.iter().map(|s| s.as_bytes()));
    let content = hash(cfg.seed, &parts);
    let truth = match &read.problem {
        Some(expr) => check_arithmetic(expr, &steps),
        None => vec![None; steps.len()],
    };
    let grade = |i: usize| {
        let key = |what: &[u8]| unit(hash(content, &[what, &(choice as u64).to_le_bytes(), &(i as u64).to_le_bytes()]));
        match truth[i] {
            Some(t) if steps[i].bytes().any(|b| b.is_ascii_digit()) => {
                let flipped = key(b"flip") < cfg.flip_p;
                let confidence = if flipped { cfg.flipped_confidence } else { cfg.confidence };
                Grade { step: i + 1, positive: (t >= 0.5) != flipped, flipped, canary: false, confidence }
            }
            _ => {
                let positive = key(b"canary") < cfg.canary_accept_p;
                Grade { step: i + 1, positive, flipped: false, canary: true, confidence: cfg.confidence }
            }
        }
    };
    let key = hash(content, &[b"tokens", &(choice as u64).to_le_bytes()]);
    let mut out = Reply { tokens: Vec::new(), key };
    let grades: Vec<Grade> = match read.style {
        Style::Genprm => {
            let Some(last) = steps.len().checked_sub(1) else {
                out.prose("There is no step to judge, so I cannot accept it.\n\n\\boxed{");
                out.verdict("No", "Yes", cfg.confidence);
                out.prose("}");
                return (out.tokens, Vec::new());
            };
            let g = grade(last);
            out.prose(&genprm_critique(&g));
            out.prose("\n\n\\boxed{");
            let (said, other) = if g.positive { ("Yes", "No") } else { ("No", "Yes") };
            out.verdict(said, other, g.confidence);
            out.prose("}");
            vec![g]
        }
        Style::Thinkprm => {
            let grades: Vec<Grade> = (0..steps.len()).map(grade).collect();
            out.prose("Let me verify each step in order.");
            for g in &grades {
                let prose = thinkprm_prose(g);
                if cfg.inline_prose {
                    out.prose(&format!("\nStep {}: {prose} \\boxed{{", g.step));
                } else {
                    out.prose(&format!("\n{prose}\nStep {}: \\boxed{{", g.step));
                }
                let (said, other) = if g.positive { ("correct", "incorrect") } else { ("incorrect", "correct") };
                out.verdict(said, other, g.confidence);
                out.prose("}");
            }
            grades
        }
    };
    (out.tokens, grades)
}

fn genprm_critique(g: &Grade) -> String {
    let k = g.step;
    match (g.canary, g.positive) {
        (true, true) => {
            format!("Step {k} sets up the solution in a sensible way, and nothing in it is wrong.")
        }
        (true, false) => {
            format!("Step {k} does not carry out any calculation, so it makes no progress on the problem.")
        }
        (false, true) => format!(
            "Step {k} combines numbers that are available from the problem and the earlier steps. \
             Redoing its calculation gives the result it states, so the step is correct."
        ),
        (false, false) => format!(
            "Step {k} does not hold up: redoing its calculation with the numbers available from the \
             problem and the earlier steps does not give the result it states."
        ),
    }
}

fn thinkprm_prose(g: &Grade) -> &'static str {
    match (g.canary, g.positive) {
        (true, true) => "This sets up the solution; nothing in it is wrong.",
        (true, false) => "This makes no calculation and no progress on the problem.",
        (false, true) => "The calculation uses available numbers and its result checks out.",
        (false, false) => "Redoing the calculation does not give the stated result.",
    }
}

/// A reply being written, token by token.
struct Reply {
    tokens: Vec<Tok>,
    key: u64,
}

impl Reply {
    /// Ordinary text: sampled with high probability, no notable alternative.
    fn prose(&mut self, text: &str) {
        for m in TOKEN.find_iter(text) {
            let i = self.tokens.len() as u64;
            let logprob = -(0.01 + 0.4 * unit(hash(self.key, &[&i.to_le_bytes()])));
            let token = m.as_str().to_string();
            self.tokens.push(Tok { top: vec![(token.clone(), logprob)], text: token, logprob });
        }
    }

    /// The verdict word `said`, with `other` as the runner-up.
    fn verdict(&mut self, said: &str, other: &str, confidence: f64) {
        let (lp_said, lp_other) = (confidence.ln(), (1.0 - confidence).max(1e-9).ln());
        self.tokens.push(Tok {
            text: said.to_string(),
            logprob: lp_said,
            top: vec![(said.to_string(), lp_said), (other.to_string(), lp_other)],
        });
    }
}

/// One choice of the response, in the endpoint's shape.
fn choice_json(api: Api, index: usize, tokens: &[Tok], finish: &str, top_logprobs: Option<usize>) -> Value {
    let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
    match api {
        Api::Chat => {
            let logprobs = top_logprobs.map(|k| {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let top: Vec<Value> = t
                            .top
                            .iter()
                            .take(k)
                            .map(|(s, lp)| json!({"token": s, "logprob": lp, "bytes": s.as_bytes()}))
                            .collect();
                        json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes(), "top_logprobs": top})
                    })
                    .collect();
                json!({ "content": content })
            });
            json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
            })
        }
        Api::Completions => {
            let logprobs = top_logprobs.map(|k| {
                let mut offsets = Vec::with_capacity(tokens.len());
                let mut offset = 0;
                for t in tokens {
                    offsets.push(offset);
                    offset += t.text.len();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| Value::Object(t.top.iter().take(k).map(|(s, lp)| (s.clone(), json!(lp))).collect()))
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            });
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    }
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of `seed` and `parts` (FNV-1a per byte, mixed per part).
fn hash(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut h = mix(seed) ^ 0xCBF2_9CE4_8422_2325;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
        }
        h = mix(h ^ part.len() as u64);
    }
    h
}

/// A uniform number in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}
