//! prism-serve: an OpenAI-compatible HTTP server over one model (what
//! `prism serve` runs, and what users point at as a judge).
//!
//! `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with
//! SSE streaming). One generation thread owns the model; handlers queue jobs to
//! it, and every job that arrived while a batch was running goes into the next
//! batch together (each response says how many requests shared its batch in
//! the `x-prism-batch-requests` header).
//!
//! It is built not to be knocked over: every size in a request is checked
//! (with checked arithmetic) before it is queued; at most `serve.max_queue`
//! jobs wait (more are answered 429); a request whose client went away stops
//! generating; a chat message that spells a special token keeps it as text; a
//! generation that panics fails its own requests with 500 and the thread serves
//! on; with an API key set (`serve.api_key_env`) every route asks for it.
//!
//! Entry: [`run`] (`listener`, [`Config`], the loaded model, its name, a
//! shutdown future); the `prism` binary binds the address and loads the model.
//! Must not know the learner, rewards, actors or transports: it serves one
//! model and nothing else.

#[cfg(feature = "testkit")]
pub mod testkit;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prism_core::FinishReason;
use prism_core::config::Invalid;
use prism_model::chat::ChatMessage;
use prism_model::engine::{self, Request, Sample, SamplingParams};
use prism_model::{Loaded, Tokenizer};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use tokio::sync::{mpsc, oneshot};

/// `[serve]`: the HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listen address. Default `127.0.0.1:8000`.
    pub addr: String,
    /// Model name clients send; empty = the model file or folder name. Default empty.
    pub name: String,
    /// Most sequences (requests × n) in one batch. Default 64.
    pub max_batch: usize,
    /// `max_tokens` of requests that give none. Default 256.
    pub default_max_tokens: usize,
    /// Most jobs waiting for the generation thread; requests beyond are
    /// answered 429. Default 64.
    pub max_queue: usize,
    /// Environment variable holding the API key every request must carry
    /// (`Authorization: Bearer <key>`); unset or empty = none. Default
    /// `PRISM_SERVE_API_KEY`.
    pub api_key_env: String,
    /// Serve an `addr` other hosts can reach without an API key. Without it,
    /// such a server refuses to start. Default false.
    pub insecure: bool,
}

impl Config {
    pub fn validate(&self) -> Result<(), Invalid> {
        self.addr
            .parse::<std::net::SocketAddr>()
            .map_err(|_| Invalid::new("serve.addr", &self.addr, "expected host:port, e.g. 127.0.0.1:8000"))?;
        prism_core::config::check::positive("serve.max_batch", self.max_batch)?;
        prism_core::config::check::positive("serve.default_max_tokens", self.default_max_tokens)?;
        prism_core::config::check::positive("serve.max_queue", self.max_queue)?;
        Ok(())
    }

    /// The API key from `api_key_env`, if set and not empty.
    pub fn api_key(&self) -> Option<String> {
        std::env::var(&self.api_key_env).ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty())
    }

    /// Whether the server may listen on `addr`: on a loopback address
    /// always; where other hosts can reach it only with an API key, or with
    /// `insecure` said explicitly.
    pub fn check_exposure(&self) -> Result<(), Invalid> {
        let Ok(addr) = self.addr.parse::<std::net::SocketAddr>() else { return self.validate() };
        if addr.ip().is_loopback() || self.insecure || self.api_key().is_some() {
            return Ok(());
        }
        Err(Invalid::new(
            "serve.addr",
            &self.addr,
            format!(
                "other hosts can reach it and no API key is set ({} is empty): anyone who reaches it could use the \
                 model. Set one (export {}=$(openssl rand -hex 32); clients send `Authorization: Bearer <key>`), listen \
                 on 127.0.0.1, or opt out explicitly with serve.insecure = true",
                self.api_key_env, self.api_key_env
            ),
        ))
    }
}

/// The name a model source is served under when `serve.name` is empty.
pub fn default_name(source: &str) -> String {
    if let Some(b) = source.strip_prefix("builtin:") {
        return b.to_string();
    }
    let p = std::path::Path::new(source.trim_end_matches('/'));
    let name = if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) { p.file_stem() } else { p.file_name() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| source.to_string())
}

/// What a streaming job hears from the generation thread.
enum Progress {
    Token { sample: usize, token: u32 },
}

struct Job {
    request: Request,
    progress: Option<mpsc::UnboundedSender<Progress>>,
    reply: oneshot::Sender<Result<(Vec<Sample>, usize), String>>,
}

#[derive(Clone)]
struct AppState {
    name: String,
    tokenizer: Tokenizer,
    max_context: usize,
    vocab: usize,
    eos: Vec<u32>,
    default_max_tokens: usize,
    max_batch: usize,
    max_queue: usize,
    jobs: std_mpsc::SyncSender<Job>,
    created: u64,
}

/// What stops the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("serve: cannot start the generation thread: {0}")]
    Thread(std::io::Error),
    #[error("serve: serving HTTP on {addr}: {source}")]
    Http { addr: String, source: std::io::Error },
}

/// Serves `loaded` as model `name` on `listener` until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: &Config,
    loaded: Loaded,
    name: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let (tx, rx) = std_mpsc::sync_channel::<Job>(config.max_queue);
    let mut eos = loaded.generation.eos_token_ids.clone();
    eos.extend(loaded.tokenizer.eos_id().filter(|e| !eos.contains(e)));
    let state = AppState {
        name,
        tokenizer: loaded.tokenizer.clone(),
        max_context: loaded.model.config().max_position_embeddings,
        vocab: loaded.model.config().vocab_size,
        eos,
        default_max_tokens: config.default_max_tokens,
        max_batch: config.max_batch,
        max_queue: config.max_queue,
        jobs: tx,
        created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    let max_batch = config.max_batch;
    let worker = std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || {
            let Loaded { model, tokenizer, .. } = loaded;
            generation_loop(
                move |requests, on_event, cancelled| engine::generate_requests(&model, &tokenizer, requests, on_event, cancelled),
                rx,
                max_batch,
            )
        })
        .map_err(Error::Thread)?;
    let key = config.api_key().map(Arc::<str>::from);
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route", None, "not_found") })
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let key = key.clone();
            async move {
                match key {
                    Some(key) if !authorized(request.headers(), &key) => error(
                        StatusCode::UNAUTHORIZED,
                        "a valid API key is required: send `Authorization: Bearer <key>`",
                        None,
                        "invalid_api_key",
                    ),
                    _ => next.run(request).await,
                }
            }
        }))
        .with_state(Arc::new(state));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|source| Error::Http { addr, source })?;
    // The state (and with it the job sender) is gone: the worker's queue closes.
    let _ = worker.join();
    Ok(())
}

/// Whether `headers` carry `Authorization: Bearer <key>` (compared in
/// constant time).
fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(given) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == key.len() && given.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The generation thread: take every queued job (up to `max_batch` sequences),
/// generate them as one batch, answer each. A request whose client went away
/// (its reply or its stream dropped) stops generating. A batch whose
/// generation panics fails its own requests; the thread goes on with the next.
fn generation_loop(
    mut generate: impl FnMut(
        &[Request],
        &mut dyn FnMut(engine::Event<'_>),
        &dyn Fn(usize) -> bool,
    ) -> Result<Vec<Vec<Sample>>, prism_model::Error>,
    rx: std_mpsc::Receiver<Job>,
    max_batch: usize,
) {
    let mut waiting: Option<Job> = None;
    loop {
        let first = match waiting.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut jobs = vec![first];
        let mut rows = jobs[0].request.params.n;
        while let Ok(j) = rx.try_recv() {
            if rows + j.request.params.n > max_batch {
                waiting = Some(j);
                break;
            }
            rows += j.request.params.n;
            jobs.push(j);
        }
        let requests: Vec<Request> = jobs.iter().map(|j| j.request.clone()).collect();
        let progress: Vec<Option<mpsc::UnboundedSender<Progress>>> = jobs.iter().map(|j| j.progress.clone()).collect();
        let count = jobs.len();
        tracing::debug!(requests = count, sequences = rows, "generating a batch");
        let gone = |request: usize| {
            jobs.get(request).is_some_and(|j| j.reply.is_closed() || j.progress.as_ref().is_some_and(|p| p.is_closed()))
        };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            generate(
                &requests,
                &mut |event| {
                    if let engine::Event::Token { request, sample, tokens } = event {
                        if let (Some(Some(tx)), Some(token)) = (progress.get(request), tokens.last()) {
                            let _ = tx.send(Progress::Token { sample, token: *token });
                        }
                    }
                },
                &gone,
            )
        }));
        match result {
            Ok(Ok(samples)) => {
                for (job, s) in jobs.into_iter().zip(samples) {
                    let _ = job.reply.send(Ok((s, count)));
                }
            }
            Ok(Err(e)) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.to_string()));
                }
            }
            Err(panic) => {
                let what = panic.downcast_ref::<String>().map(String::as_str).or(panic.downcast_ref::<&str>().copied()).unwrap_or("a panic");
                tracing::error!(requests = count, panic = what, "the generation of a batch panicked; its requests fail, the server goes on");
                for job in jobs {
                    let _ = job.reply.send(Err(format!("the generation of this request's batch failed ({what})")));
                }
            }
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>, code: &str) -> Response {
    let body = json!({"error": {"message": message.into(), "type": "invalid_request_error", "param": param, "code": code}});
    (status, axum::Json(body)).into_response()
}

fn bad(message: impl Into<String>, param: &str) -> Response {
    error(StatusCode::BAD_REQUEST, message, Some(param), "invalid_value")
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": s.name, "object": "model", "created": s.created, "owned_by": "prism", "max_model_len": s.max_context}],
    }))
    .into_response()
}

/// `stop` as OpenAI accepts it: a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of /v1/completions: text, one-text list, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
struct CompletionBody {
    model: String,
    prompt: Prompt,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<usize>,
    seed: Option<u64>,
    stop: Option<Stop>,
    logprobs: Option<usize>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<ChatMessage>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<usize>,
    seed: Option<u64>,
    stop: Option<Stop>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    #[serde(default)]
    stream: bool,
    /// Variables for the chat template over the server's own
    /// (`model.chat_template_kwargs`), as vLLM takes them: e.g.
    /// `{"enable_thinking": false}` for Qwen3.
    #[serde(default)]
    chat_template_kwargs: serde_json::Map<String, Value>,
}

/// Parses a JSON body; errors name the field.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Response> {
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(format!("invalid JSON body: {e}"), "body"))?;
    if !value.is_object() {
        return Err(bad("the body must be a JSON object", "body"));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        if let Some(field) = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            let field = if path == "." { field.to_string() } else { format!("{path}.{field}") };
            bad(format!("missing required field `{field}`"), &field)
        } else {
            bad(format!("invalid value for `{path}`: {inner}"), &path)
        }
    })
}

struct Common {
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    n: Option<usize>,
    seed: Option<u64>,
    stop: Option<Stop>,
}

/// Sampling parameters of a request, checked; 400 naming the field otherwise.
fn sampling(s: &AppState, c: Common, prompt_len: usize, max_tokens_field: &str) -> Result<SamplingParams, Response> {
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(format!("temperature must be between 0 and 2, got {temperature}"), "temperature"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(format!("top_p must be in (0, 1], got {top_p}"), "top_p"));
    }
    let top_k = c.top_k.unwrap_or(-1);
    if top_k < -1 || top_k == 0 {
        return Err(bad(format!("top_k must be -1 (off) or >= 1, got {top_k}"), "top_k"));
    }
    let n = c.n.unwrap_or(1);
    let most = s.max_batch.min(128);
    if !(1..=most).contains(&n) {
        return Err(bad(format!("n must be between 1 and {most} (serve.max_batch), got {n}"), "n"));
    }
    let max_tokens = c.max_tokens.unwrap_or(s.default_max_tokens.min(s.max_context.saturating_sub(prompt_len)).max(1));
    if max_tokens == 0 {
        return Err(bad(format!("{max_tokens_field} must be at least 1"), max_tokens_field));
    }
    if prompt_len.checked_add(max_tokens).is_none_or(|total| total > s.max_context) {
        return Err(bad(
            format!(
                "this model's maximum context length is {} tokens; the prompt has {prompt_len} tokens and {max_tokens_field} asks for {max_tokens}",
                s.max_context
            ),
            max_tokens_field,
        ));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad("stop takes up to 4 non-empty strings", "stop"));
    }
    let seed = c.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    Ok(SamplingParams {
        n,
        temperature,
        top_k: if top_k < 0 { 0 } else { top_k as usize },
        top_p,
        max_new_tokens: max_tokens,
        stop,
        eos: s.eos.clone(),
        seed,
    })
}

fn check_model(s: &AppState, model: &str) -> Result<(), Response> {
    if model == s.name {
        Ok(())
    } else {
        Err(error(
            StatusCode::NOT_FOUND,
            format!("the model `{model}` does not exist (this server serves `{}`)", s.name),
            Some("model"),
            "model_not_found",
        ))
    }
}

fn check_top(n: usize, field: &str) -> Result<(), Response> {
    if n > 20 { Err(bad(format!("{field} must be between 0 and 20, got {n}"), field)) } else { Ok(()) }
}

/// Queues a job; returns its samples and how many requests shared the batch.
async fn submit(
    s: &AppState,
    request: Request,
    progress: Option<mpsc::UnboundedSender<Progress>>,
) -> Result<oneshot::Receiver<Result<(Vec<Sample>, usize), String>>, Response> {
    let (tx, rx) = oneshot::channel();
    s.jobs.try_send(Job { request, progress, reply: tx }).map_err(|e| match e {
        std_mpsc::TrySendError::Full(_) => error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("the server is busy: {} requests are waiting (serve.max_queue); try again shortly", s.max_queue),
            None,
            "rate_limit_exceeded",
        ),
        std_mpsc::TrySendError::Disconnected(_) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "the generation thread has stopped", None, "unavailable")
        }
    })?;
    Ok(rx)
}

async fn wait(rx: oneshot::Receiver<Result<(Vec<Sample>, usize), String>>) -> Result<(Vec<Sample>, usize), Response> {
    match rx.await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e, None, "generation_failed")),
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "the generation thread stopped", None, "generation_failed")),
    }
}

/// The completion as OpenAI reports it: text cut before the first stop string,
/// and the number of tokens that text covers (their logprobs are reported).
fn visible(sample: &Sample, stop: &[String]) -> (String, usize) {
    let mut text = sample.text.clone();
    if sample.finish == FinishReason::Stop {
        if let Some(cut) = stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
    }
    let mut start = 0u32;
    let mut count = 0;
    for &end in &sample.token_ends {
        if start as usize >= text.len() && end as usize > text.len() {
            break;
        }
        count += 1;
        start = end;
    }
    // The eos token that ended a sample has no text of its own to report.
    let shown = if sample.finish == FinishReason::Eos { sample.tokens.len() - 1 } else { sample.tokens.len() };
    (text, count.min(shown))
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Rejected => "length",
    }
}

fn with_batch_header(mut r: Response, batch: usize) -> Response {
    r.headers_mut().insert("x-prism-batch-requests", HeaderValue::from(batch as u64));
    r
}

fn usage(prompt: usize, samples: &[Sample]) -> Value {
    let completion: usize = samples.iter().map(|s| s.tokens.len()).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn request_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{nanos:x}")
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match completions_inner(&s, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn completions_inner(s: &AppState, body: Bytes) -> Result<Response, Response> {
    let b: CompletionBody = parse(&body)?;
    check_model(s, &b.model)?;
    if b.stream {
        return Err(bad("streaming is supported on /v1/chat/completions only", "stream"));
    }
    let prompt = match b.prompt {
        Prompt::Text(t) => s.tokenizer.encode(&t, true),
        Prompt::Texts(v) if v.len() == 1 => s.tokenizer.encode(&v[0], true),
        Prompt::Texts(_) => return Err(bad("prompt lists of more than one text are not supported", "prompt")),
        Prompt::Ids(ids) => Ok(ids),
    }
    .map_err(|e| bad(e.to_string(), "prompt"))?;
    if prompt.is_empty() {
        return Err(bad("prompt must not be empty", "prompt"));
    }
    if let Some(&t) = prompt.iter().find(|&&t| t as usize >= s.vocab) {
        return Err(bad(format!("token id {t} is outside the vocabulary of {}", s.vocab), "prompt"));
    }
    if let Some(k) = b.logprobs {
        check_top(k, "logprobs")?;
    }
    let common = Common {
        max_tokens: b.max_tokens,
        temperature: b.temperature,
        top_p: b.top_p,
        top_k: b.top_k,
        n: b.n,
        seed: b.seed,
        stop: b.stop,
    };
    let params = sampling(s, common, prompt.len(), "max_tokens")?;
    let stop = params.stop.clone();
    let prompt_len = prompt.len();
    let rx = submit(s, Request { prompt, params, top_logprobs: b.logprobs }, None).await?;
    let (samples, batch) = wait(rx).await?;
    let choices: Vec<Value> = samples
        .iter()
        .enumerate()
        .map(|(i, sample)| {
            let (text, count) = visible(sample, &stop);
            let logprobs = b.logprobs.map(|_| {
                let tops = &sample.top_logprobs[..count.min(sample.top_logprobs.len())];
                let mut offset = 0u32;
                let mut offsets = Vec::new();
                for &end in &sample.token_ends[..count] {
                    offsets.push(offset);
                    offset = end;
                }
                json!({
                    "tokens": sample.tokens[..count].iter().map(|&t| s.tokenizer.token_text(t)).collect::<Vec<_>>(),
                    "token_logprobs": tops.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tops.iter().map(|t| {
                        let mut m = serde_json::Map::new();
                        for &(id, lp) in &t.top {
                            m.entry(s.tokenizer.token_text(id)).or_insert(json!(lp));
                        }
                        Value::Object(m)
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            });
            json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(sample.finish)})
        })
        .collect();
    let body = json!({
        "id": request_id("cmpl"),
        "object": "text_completion",
        "created": s.created,
        "model": s.name,
        "choices": choices,
        "usage": usage(prompt_len, &samples),
    });
    Ok(with_batch_header(axum::Json(body).into_response(), batch))
}

fn chat_logprob_entry(tok: &Tokenizer, id: u32, logprob: f32) -> Value {
    let text = tok.token_text(id);
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
}

/// The `logprobs` of a chat choice: each of the first `count` tokens (those
/// the visible text covers) with its alternatives.
fn chat_logprobs(tok: &Tokenizer, sample: &Sample, count: usize) -> Value {
    let content: Vec<Value> = sample.top_logprobs[..count.min(sample.top_logprobs.len())]
        .iter()
        .zip(&sample.tokens)
        .map(|(t, &id)| {
            let mut e = chat_logprob_entry(tok, id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(alt, lp)| chat_logprob_entry(tok, alt, lp)).collect::<Vec<_>>().into();
            e
        })
        .collect();
    json!({"content": content})
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match chat_inner(s, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn chat_inner(s: Arc<AppState>, body: Bytes) -> Result<Response, Response> {
    let b: ChatBody = parse(&body)?;
    check_model(&s, &b.model)?;
    if b.messages.is_empty() {
        return Err(bad("messages must not be empty", "messages"));
    }
    if let Some(k) = b.top_logprobs {
        check_top(k, "top_logprobs")?;
    }
    // A message that spells a special token keeps it as text.
    prism_model::chat::check_kwargs(&b.chat_template_kwargs).map_err(|e| bad(e.to_string(), "chat_template_kwargs"))?;
    let prompt = s.tokenizer.encode_chat_with(&b.messages, true, &b.chat_template_kwargs).map_err(|e| bad(e.to_string(), "messages"))?;
    let common = Common {
        max_tokens: b.max_completion_tokens.or(b.max_tokens),
        temperature: b.temperature,
        top_p: b.top_p,
        top_k: b.top_k,
        n: b.n,
        seed: b.seed,
        stop: b.stop,
    };
    let param_name = if b.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let params = sampling(&s, common, prompt.len(), param_name)?;
    let top = (b.logprobs || b.top_logprobs.is_some()).then(|| b.top_logprobs.unwrap_or(0));
    let stop = params.stop.clone();
    let n = params.n;
    let prompt_len = prompt.len();
    let request = Request { prompt, params, top_logprobs: top };
    if b.stream {
        let (ptx, prx) = mpsc::unbounded_channel();
        let rx = submit(&s, request, Some(ptx)).await?;
        return Ok(stream_chat(s, rx, prx, n, stop, top));
    }
    let rx = submit(&s, request, None).await?;
    let (samples, batch) = wait(rx).await?;
    let choices: Vec<Value> = samples
        .iter()
        .enumerate()
        .map(|(i, sample)| {
            let (text, count) = visible(sample, &stop);
            let logprobs = top.map(|_| chat_logprobs(&s.tokenizer, sample, count));
            json!({
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason(sample.finish),
            })
        })
        .collect();
    let body = json!({
        "id": request_id("chatcmpl"),
        "object": "chat.completion",
        "created": s.created,
        "model": s.name,
        "choices": choices,
        "usage": usage(prompt_len, &samples),
    });
    Ok(with_batch_header(axum::Json(body).into_response(), batch))
}

/// A sample's text decoded as its tokens arrive, each token decoding only a
/// short window (the tokens since the last emitted text and the one before),
/// not the whole prefix: the text grows by what the window's decoding adds
/// (how text-generation servers stream; the window's first token keeps a
/// tokenizer's leading-space rules from changing text already out).
#[derive(Default)]
struct Incremental {
    tokens: Vec<u32>,
    /// The window starts here; tokens before `read` are in `text`.
    prefix: usize,
    read: usize,
    text: String,
    /// Tokens decoded so far, across all windows (what the test counts).
    work: usize,
}

impl Incremental {
    /// Adds `token`; whether `text` grew (a token that ends inside a
    /// character adds nothing until the character is whole).
    fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> bool {
        self.tokens.push(token);
        let window = &self.tokens[self.prefix..];
        self.work += window.len() + (self.read - self.prefix);
        let (Ok(before), Ok(after)) =
            (tokenizer.decode(&self.tokens[self.prefix..self.read], true), tokenizer.decode(window, true))
        else {
            return false;
        };
        if after.ends_with('\u{FFFD}') || after.len() <= before.len() {
            return false;
        }
        match after.strip_prefix(before.as_str()) {
            Some(added) => self.text.push_str(added),
            // The window decoded its first tokens differently: decode the
            // whole sample once, and go on from there.
            None => match tokenizer.decode(&self.tokens, true) {
                Ok(all) if all.starts_with(self.text.as_str()) => self.text = all,
                _ => return false,
            },
        }
        self.prefix = self.read;
        self.read = self.tokens.len();
        true
    }
}

/// SSE for a chat request: a role chunk, content deltas as tokens arrive (text
/// that could still turn into a stop string held back), a final chunk with the
/// finish reason per choice, then `[DONE]`.
fn stream_chat(
    s: Arc<AppState>,
    done: oneshot::Receiver<Result<(Vec<Sample>, usize), String>>,
    mut progress: mpsc::UnboundedReceiver<Progress>,
    n: usize,
    stop: Vec<String>,
    top: Option<usize>,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Result<SseEvent, std::convert::Infallible>>();
    let id = request_id("chatcmpl");
    tokio::spawn(async move {
        let chunk = |choice: Value| {
            json!({"id": id, "object": "chat.completion.chunk", "created": s.created, "model": s.name, "choices": [choice]})
        };
        let send = |v: Value| tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok();
        for i in 0..n {
            send(chunk(json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})));
        }
        let longest_stop = stop.iter().map(|x| x.len()).max().unwrap_or(1);
        let hold = longest_stop.saturating_sub(1);
        let mut decoded: Vec<Incremental> = (0..n).map(|_| Incremental::default()).collect();
        let mut stopped = vec![false; n];
        let mut sent: Vec<usize> = vec![0; n];
        while let Some(Progress::Token { sample, token }) = progress.recv().await {
            let Some(d) = decoded.get_mut(sample) else { continue };
            let before = d.text.len();
            if !d.push(&s.tokenizer, token) {
                continue;
            }
            let text = &d.text;
            // A stop string new in the text overlaps what this token added.
            let mut from = before.saturating_sub(longest_stop);
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            stopped[sample] |= stop.iter().any(|x| text[from..].contains(x.as_str()));
            let mut upto = text.len().saturating_sub(hold);
            while !text.is_char_boundary(upto) {
                upto -= 1;
            }
            if stopped[sample] || upto <= sent[sample] {
                continue;
            }
            let delta = &text[sent[sample]..upto];
            sent[sample] = upto;
            if !send(chunk(json!({"index": sample, "delta": {"content": delta}, "logprobs": null, "finish_reason": null}))) {
                return;
            }
        }
        let samples = match done.await {
            Ok(Ok((samples, _))) => samples,
            Ok(Err(e)) => {
                send(json!({"error": {"message": e, "type": "server_error"}}));
                return;
            }
            Err(_) => return,
        };
        for (i, sample) in samples.iter().enumerate() {
            let (text, count) = visible(sample, &stop);
            let rest = text.get(sent[i].min(text.len())..).unwrap_or("");
            let logprobs = top.map(|_| chat_logprobs(&s.tokenizer, sample, count));
            send(chunk(json!({
                "index": i,
                "delta": {"content": rest},
                "logprobs": logprobs,
                "finish_reason": finish_reason(sample.finish),
            })));
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    });
    let mut headers = HeaderMap::new();
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    (headers, Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: usize) -> (Job, oneshot::Receiver<Result<(Vec<Sample>, usize), String>>) {
        let (reply, rx) = oneshot::channel();
        let params = SamplingParams { n, temperature: 0.0, top_k: 0, top_p: 1.0, max_new_tokens: 1, stop: vec![], eos: vec![], seed: 0 };
        (Job { request: Request { prompt: vec![1], params, top_logprobs: None }, progress: None, reply }, rx)
    }

    /// A batch whose generation panics fails its own requests (they get an
    /// error, not a dropped reply) and the thread serves the next batch.
    #[test]
    fn a_panicking_generation_fails_its_batch_and_the_thread_serves_on() {
        let (tx, rx) = std_mpsc::sync_channel(4);
        let mut calls = 0;
        let thread = std::thread::spawn(move || {
            generation_loop(
                move |requests: &[Request], _: &mut dyn FnMut(engine::Event<'_>), _: &dyn Fn(usize) -> bool| {
                    calls += 1;
                    if calls == 1 {
                        panic!("injected: index out of bounds");
                    }
                    Ok(requests.iter().map(|_| Vec::new()).collect())
                },
                rx,
                8,
            )
        });
        let (first, first_rx) = job(1);
        tx.send(first).unwrap();
        let failed = first_rx.blocking_recv().expect("a reply, not a dropped sender");
        assert!(failed.unwrap_err().contains("injected: index out of bounds"));
        let (second, second_rx) = job(1);
        tx.send(second).unwrap();
        assert_eq!(second_rx.blocking_recv().unwrap().unwrap().1, 1, "the next batch is served");
        drop(tx);
        thread.join().expect("the thread ends when the queue closes, not by a panic");
    }

    /// A request whose client went away (its reply dropped) is seen as
    /// cancelled by the generation, which can stop it.
    #[test]
    fn a_request_whose_client_went_away_is_cancelled() {
        let (tx, rx) = std_mpsc::sync_channel(4);
        let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let saw = seen.clone();
        let thread = std::thread::spawn(move || {
            generation_loop(
                move |requests: &[Request], _: &mut dyn FnMut(engine::Event<'_>), cancelled: &dyn Fn(usize) -> bool| {
                    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
                    while !cancelled(0) && std::time::Instant::now() < until {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    saw.store(cancelled(0), std::sync::atomic::Ordering::SeqCst);
                    Ok(requests.iter().map(|_| Vec::new()).collect())
                },
                rx,
                8,
            )
        });
        let (first, first_rx) = job(1);
        tx.send(first).unwrap();
        drop(first_rx); // the client goes away
        drop(tx);
        thread.join().unwrap();
        assert!(seen.load(std::sync::atomic::Ordering::SeqCst), "the generation heard the request was cancelled");
    }

    /// Streaming decodes a short window per token, not the whole prefix:
    /// over a long completion the text equals decoding every token at once,
    /// and the tokens decoded in all stay within a few per token.
    #[test]
    fn streaming_decodes_incrementally() {
        let loaded = prism_model::load("builtin:tiny-arith", &prism_model::LoadOptions::default()).unwrap();
        let tok = &loaded.tokenizer;
        let text = "Q:12+7*3\n7*3=21\n12+21=33\nA:33\n".repeat(20);
        let ids = tok.encode(&text, false).unwrap();
        let mut d = Incremental::default();
        for &id in &ids {
            d.push(tok, id);
        }
        assert_eq!(d.text, tok.decode(&ids, true).unwrap());
        assert!(d.work <= 4 * ids.len(), "{} tokens decoded for {} tokens", d.work, ids.len());
        // Byte-level BPE with characters split over tokens (SmolLM2's, where
        // scripts/setup fetched it).
        let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !gguf.exists() {
            return;
        }
        let tok = prism_model::gguf::GgufFile::open(&gguf).unwrap().tokenizer().unwrap();
        let text = "Héllo — 日本語のテキスト 🙂🙂, then   spaces\n\tand tabs. ".repeat(10);
        let ids = tok.encode(&text, false).unwrap();
        let mut d = Incremental::default();
        for &id in &ids {
            d.push(&tok, id);
        }
        assert_eq!(d.text, tok.decode(&ids, true).unwrap());
        assert!(d.work <= 6 * ids.len(), "{} tokens decoded for {} tokens", d.work, ids.len());
    }
}
