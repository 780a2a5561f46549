//! Loopback OpenAI-compatible servers for tests and benchmarks: a scripted
//! server that answers each request with what a closure chooses — chosen texts
//! and logprobs, after a chosen delay, or a fault (an HTTP error, garbage, a
//! truncated body, a connection reset, no answer at all).
//!
//! The server speaks just enough HTTP/1.1 (keep-alive, `Content-Length`
//! bodies) and runs on its own thread with its own single-threaded runtime,
//! so that it works from sync and async tests alike and its CPU time can be
//! told apart from the client's.

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod realistic;

/// The shared data folder: `$PRISM_DATA_DIR`, else `../shared/data` next to the
/// repository (as seen from this crate's sources).
pub fn data_dir() -> PathBuf {
    match std::env::var_os("PRISM_DATA_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    }
}

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Request {
    /// 0-based arrival order over the server's lifetime.
    pub seq: u64,
    /// e.g. `/v1/chat/completions`.
    pub path: String,
    /// The JSON body (`Value::Null` when it is not JSON).
    pub body: Value,
}

impl Request {
    /// The prompt text: the last chat message's content, or `prompt`.
    pub fn prompt(&self) -> &str {
        self.body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .or_else(|| self.body["prompt"].as_str())
            .unwrap_or("")
    }

    /// The `n` asked for (1 when absent).
    pub fn n(&self) -> usize {
        self.body["n"].as_u64().unwrap_or(1) as usize
    }
}

/// How the server answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An HTTP response with a JSON (or any) body.
    Body { status: u16, body: String, headers: Vec<(String, String)> },
    /// Closes the connection with a TCP reset instead of answering.
    Reset,
    /// Sends headers announcing the whole body, half of it, then closes.
    Truncated(String),
    /// Never answers (until the client gives up).
    Hang,
}

impl Reply {
    /// `200 OK` with `body`.
    pub fn ok(body: impl Into<String>) -> Self {
        Reply::Body { status: 200, body: body.into(), headers: vec![] }
    }

    /// An error status with a small JSON error body.
    pub fn status(status: u16) -> Self {
        Reply::Body {
            status,
            body: json!({"error": {"message": "scripted failure", "code": status}}).to_string(),
            headers: vec![],
        }
    }
}

/// A reply and how long to wait before sending it.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub delay: Duration,
    pub reply: Reply,
}

impl From<Reply> for Scripted {
    fn from(reply: Reply) -> Self {
        Scripted { delay: Duration::ZERO, reply }
    }
}

/// What a stopped server reports.
#[derive(Debug, Clone, Copy)]
pub struct ServerStats {
    pub requests: u64,
    /// CPU seconds the server's thread used (Linux; `None` elsewhere).
    pub cpu_seconds: Option<f64>,
}

type Script = Arc<dyn Fn(&Request) -> Scripted + Send + Sync>;

/// A scripted server on 127.0.0.1; stops when dropped.
pub struct TestServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    in_flight: Arc<AtomicU64>,
    max_in_flight: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Option<f64>>>,
}

impl TestServer {
    /// Starts a server answering every request with `script(&request)`.
    pub fn start(script: impl Fn(&Request) -> Scripted + Send + Sync + 'static) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let in_flight = Arc::new(AtomicU64::new(0));
        let max_in_flight = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let counters = (requests.clone(), in_flight.clone(), max_in_flight.clone());
        let script: Script = Arc::new(script);
        let thread = std::thread::Builder::new().name("test-server".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                loop {
                    tokio::select! {
                        _ = &mut stopped => break,
                        accepted = listener.accept() => {
                            if let Ok((stream, _)) = accepted {
                                let _ = stream.set_nodelay(true);
                                tokio::spawn(serve(stream, script.clone(), counters.clone()));
                            }
                        }
                    }
                }
            });
            drop(runtime);
            thread_cpu_seconds()
        })?;
        Ok(Self { addr, requests, in_flight, max_in_flight, stop: Some(stop), thread: Some(thread) })
    }

    /// The OpenAI-style base URL, `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were being handled at the same time.
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Stops the server and reports what it did.
    pub fn stop(mut self) -> ServerStats {
        self.shutdown()
    }

    fn shutdown(&mut self) -> ServerStats {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let cpu_seconds = self.thread.take().and_then(|t| t.join().ok()).flatten();
        ServerStats { requests: self.requests(), cpu_seconds }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves one connection: requests one after another (keep-alive).
async fn serve(
    mut stream: TcpStream,
    script: Script,
    (requests, in_flight, max_in_flight): (Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>),
) {
    let mut buf = Vec::new();
    loop {
        let Some((path, body)) = read_request(&mut stream, &mut buf).await else { return };
        let seq = requests.fetch_add(1, Ordering::SeqCst);
        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        max_in_flight.fetch_max(now, Ordering::SeqCst);
        let request = Request { seq, path, body: serde_json::from_slice(&body).unwrap_or(Value::Null) };
        let Scripted { delay, reply } = script(&request);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let keep = match reply {
            Reply::Body { status, body, headers } => {
                let mut head = format!(
                    "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    reason(status),
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");

                stream.write_all(head.as_bytes()).await.is_ok() && stream.write_all(body.as_bytes()).await.is_ok()
            }
            Reply::Reset => {
                let _ = stream.set_zero_linger();
                false
            }
            Reply::Truncated(body) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&body.as_bytes()[..body.len() / 2]).await;
                let _ = stream.flush().await;
                false
            }
            Reply::Hang => {
                // Wait until the client closes the connection.
                let mut byte = [0u8; 1];
                let _ = stream.read(&mut byte).await;
                false
            }
        };
        in_flight.fetch_sub(1, Ordering::SeqCst);
        if !keep {
            return;
        }
    }
}

/// Reads one request (headers and a `Content-Length` body); `None` at EOF or on
/// anything malformed.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let path = head.split_whitespace().nth(1)?.to_string();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[header_end..header_end + length].to_vec();
    buf.drain(..header_end + length);
    Some((path, body))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// CPU seconds used by the calling thread (Linux `/proc/thread-self/schedstat`).
pub fn thread_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    Some(text.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
}

/// CPU seconds (user + system) used by this process so far (Linux
/// `/proc/self/stat`, in clock ticks of 1/100 s).
pub fn process_cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// One sampled token with its top alternatives, for [`chat_logprobs`].
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// Splits `text` into tokens at `cuts` (byte offsets) with logprob 0 and no
/// alternatives; tests then set the interesting ones.
pub fn tokens(text: &str, cuts: &[usize]) -> Vec<TokenSpec> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(text.len());
    bounds.windows(2).map(|w| TokenSpec { token: text[w[0]..w[1]].to_string(), logprob: 0.0, top: vec![] }).collect()
}

/// A chat/completions response with one choice per text.
pub fn chat_text(texts: &[&str]) -> String {
    let choices: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}))
        .collect();
    json!({"id": "test", "object": "chat.completion", "model": "test", "choices": choices}).to_string()
}

/// A chat/completions response whose choices carry logprobs (OpenAI shape:
/// `logprobs.content[i] = {token, logprob, top_logprobs: [{token, logprob}]}`).
pub fn chat_logprobs(choices: &[Vec<TokenSpec>]) -> String {
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, toks)| {
            let content: String = toks.iter().map(|t| t.token.as_str()).collect();
            let lp: Vec<Value> = toks
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t.top.iter().map(|(tok, lp)| json!({"token": tok, "logprob": lp})).collect();
                    json!({"token": t.token, "logprob": t.logprob, "top_logprobs": top})
                })
                .collect();
            json!({"index": i, "message": {"role": "assistant", "content": content}, "logprobs": {"content": lp}, "finish_reason": "stop"})
        })
        .collect();
    json!({"id": "test", "object": "chat.completion", "model": "test", "choices": choices}).to_string()
}

/// A legacy completions response with logprobs (`tokens`, `token_logprobs`,
/// `top_logprobs` as maps).
pub fn completion_logprobs(choices: &[Vec<TokenSpec>]) -> String {
    let choices: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, toks)| {
            let text: String = toks.iter().map(|t| t.token.as_str()).collect();
            let top: Vec<Value> = toks
                .iter()
                .map(|t| Value::Object(t.top.iter().map(|(k, v)| (k.clone(), json!(v))).collect()))
                .collect();
            json!({"index": i, "text": text, "finish_reason": "stop", "logprobs": {
                "tokens": toks.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": toks.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
            }})
        })
        .collect();
    json!({"id": "test", "object": "text_completion", "model": "test", "choices": choices}).to_string()
}

/// A trajectory for tests and benchmarks: one token per character of
/// `completion` (so token spans are character spans), prompt `Q:{problem}\n`.
pub fn trajectory(
    id: u64,
    task: &str,
    problem: &str,
    reference: Option<&str>,
    completion: &str,
) -> prism_core::Trajectory {
    use prism_core::*;
    let token_ends: Vec<u32> = completion.char_indices().map(|(i, c)| (i + c.len_utf8()) as u32).collect();
    Trajectory {
        id: TrajectoryId(id),
        group: GroupId(id),
        sample: 0,
        group_size: 1,
        prompt: Prompt {
            id: PromptId(id),
            task: task.into(),
            problem: problem.into(),
            text: format!("Q:{problem}\n"),
            reference: reference.map(str::to_string),
        },
        policy_version: PolicyVersion(0),
        prompt_tokens: vec![],
        tokens: vec![0; token_ends.len()],
        logprobs: vec![0.0; token_ends.len()],
        text: completion.into(),
        token_ends,
        finish: FinishReason::Eos,
        generate_ms: 0,
        version_changes: Vec::new(),
    }
}
