//! The generative PRM judge: a client for any OpenAI-compatible server (vLLM,
//! SGLang, llama.cpp, `prism serve`) that asks it whether each step of a
//! solution is correct and turns its replies into P(step correct).
//!
//! A step's score is P(yes) read from the verdict token's `top_logprobs` when
//! the server sends them, else the verdict read from the text (1 or 0), averaged
//! over `samples` sampled replies. A verdict that cannot be read is counted as
//! unknown and never scored. Calls go through a concurrency limit, a per-attempt
//! timeout, retries with jittered exponential backoff (429, 5xx, timeouts,
//! resets, malformed bodies), a circuit breaker, and an LRU cache keyed by a hash
//! of (model, template, problem, reference and outcome when the template reads
//! them, step prefix). Every `canary_every` calls a canary with a content-free
//! solution is sent, and the share the judge accepts is reported as its
//! false-positive rate ("One Token to Fool", Zhao et al. 2025); while that rate
//! over the last `canary_window` canaries is above `canary_max_rate`, the judge
//! is not [trusted](Judge::trusted) and its scores should not be used.
//!
//! The server's output is not trusted either: a body over `max_reply_bytes` is
//! malformed (and is not read past the cap), a reply cut off at `max_tokens`
//! gives no verdict, a logprob that is not a log-probability or a P(yes) that
//! is not a finite number in [0, 1] makes that reply's verdict unknown, and
//! only finite scores are cached. The policy's text goes into prompts escaped
//! and between nonce tags ([`template::escape_policy_text`]).

mod breaker;
mod cache;
pub mod parse;
pub mod template;

pub use breaker::BreakerState;
pub use template::{Style, Template};

use crate::{Error, Result};
use breaker::{Breaker, Pass};
use cache::Lru;
use futures::future::join_all;
use parse::Choice;
use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// `[judge]`: the judge server and how it is called.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the OpenAI-compatible API; requests go to
    /// `{url}/chat/completions` or `{url}/completions`. Default
    /// `http://127.0.0.1:8000/v1`.
    pub url: String,
    /// Model name sent with every request. Default `judge`.
    pub model: String,
    /// `chat` (`/chat/completions`) or `completions`. Default `chat`.
    pub api: Api,
    /// Name of an environment variable holding a bearer token (the token itself
    /// never appears in a config). Empty = no authorisation header. Default empty.
    pub api_key_env: String,
    /// Prompt style and reply format: `genprm` (one request per step prefix,
    /// `\boxed{Yes|No}`) or `thinkprm` (one request for all steps,
    /// `Step i: \boxed{correct|incorrect}`). Default `genprm`.
    pub template: Style,
    /// A Jinja template file replacing the built-in prompt of `template` (it gets
    /// `problem`, `reference`, `outcome`, `steps`, `current`, `nonce`; see
    /// [`template`]). Empty = built-in. Default empty.
    pub template_file: String,
    /// Built-in templates that tell the judge the task's reference answer and
    /// whether the trajectory reached it, when known, and ask it to grade the
    /// steps against that instead of solving the problem again (TP-GRPO's
    /// evaluator). Default false.
    pub reference_aware: bool,
    /// Sampled replies per step; `vote` makes them one score. Default 1.
    pub samples: u32,
    /// How the sampled replies make one score: `mean`, `majority` or
    /// `all_correct` (a reply counts as judging the step correct when its
    /// P(correct) is at least `threshold`). Default `mean`.
    pub vote: Vote,
    /// Meta-critique: every sampled critique goes back to the judge in a
    /// second call that reviews it (the first critique quoted in the prompt)
    /// and gives the verdict in its place, as the verification ensembles of
    /// SPARK and CAPO check a critique before trusting it. Doubles the calls;
    /// a failed review fails the step (it is not replaced by the unreviewed
    /// verdict). Default false.
    pub meta_critique: bool,
    /// Sampling temperature. Default 0.0 (greedy; use > 0 with samples > 1).
    pub temperature: f64,
    /// Most tokens per reply; a reply cut off there (`finish_reason =
    /// "length"`) gives no verdict. Default 1024.
    pub max_tokens: u32,
    /// Largest reply body read, bytes; a larger one is malformed (read no
    /// further than this). Default 1048576 (1 MiB).
    pub max_reply_bytes: u64,
    /// Alternatives asked per token for P(yes); 0 = do not ask for logprobs
    /// (scores are shares of verdicts). Default 5.
    pub top_logprobs: u32,
    /// A step counts as judged wrong when its score is below this (ProcessBench
    /// predictions, canary false positives, agreement). Default 0.5.
    pub threshold: f64,
    /// Most requests in flight at once. Default 64.
    pub concurrency: u32,
    /// Per-attempt timeout (connect, send, whole reply), ms. Default 60000.
    pub timeout_ms: u64,
    /// Retries after a failed attempt (429, 5xx, 408, timeout, reset,
    /// malformed body). Default 3.
    pub retries: u32,
    /// First backoff, ms; attempt k waits a uniform random time in
    /// [0, min(backoff_max_ms, backoff_ms * 2^k)] (or the server's Retry-After
    /// when longer, capped at backoff_max_ms). Default 250.
    pub backoff_ms: u64,
    /// Longest backoff, ms. Default 10000.
    pub backoff_max_ms: u64,
    /// Consecutive failed attempts that open the circuit breaker. Default 5.
    pub breaker_failures: u32,
    /// How long the breaker stays open before half-open probes, ms. Default 10000.
    pub breaker_cooldown_ms: u64,
    /// Probes let through at once while half-open. Default 1.
    pub breaker_probes: u32,
    /// Entries of the verdict cache; 0 = no cache. Default 65536.
    pub cache_entries: u64,
    /// Send a canary (content-free solution) every this many judge calls; 0 =
    /// never. Default 200.
    pub canary_every: u64,
    /// Canaries over which the recent false-positive rate is measured (the
    /// latest this many with a readable verdict). Default 20.
    pub canary_window: u32,
    /// When the false-positive rate over the window is above this (with at
    /// least min(5, canary_window) canaries in it), the judge is not trusted
    /// and its scores are not used until the rate falls to this or below. In
    /// [0, 1]. Default 0.2.
    pub canary_max_rate: f64,
}

string_enum! {
    /// How a step's sampled replies make one score (verification ensembles,
    /// as SPARK and CAPO vote over sampled critiques): `mean` of the replies'
    /// P(correct); `majority`, 1 when more replies judge it correct than
    /// wrong, 0 when fewer, 0.5 on a tie; `all_correct`, 1 only when every
    /// reply judges it correct (a step any critique faults is wrong).
    pub enum Vote {
        Mean = "mean",
        Majority = "majority",
        AllCorrect = "all_correct",
    }
}

string_enum! {
    /// Which OpenAI endpoint the judge is called on.
    pub enum Api {
        Chat = "chat",
        Completions = "completions",
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8000/v1".into(),
            model: "judge".into(),
            api: Api::Chat,
            api_key_env: String::new(),
            template: Style::Genprm,
            template_file: String::new(),
            reference_aware: false,
            samples: 1,
            vote: Vote::Mean,
            meta_critique: false,
            temperature: 0.0,
            max_tokens: 1024,
            max_reply_bytes: 1 << 20,
            top_logprobs: 5,
            threshold: 0.5,
            concurrency: 64,
            timeout_ms: 60_000,
            retries: 3,
            backoff_ms: 250,
            backoff_max_ms: 10_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            breaker_probes: 1,
            cache_entries: 65_536,
            canary_every: 200,
            canary_window: 20,
            canary_max_rate: 0.2,
        }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Invalid::new("judge.url", &self.url, "must start with http:// or https://"));
        }
        if self.model.is_empty() {
            return Err(Invalid::new("judge.model", &self.model, "must not be empty"));
        }
        check::positive("judge.samples", self.samples)?;
        check::in_range("judge.temperature", self.temperature, 0.0, 10.0)?;
        check::positive("judge.max_tokens", self.max_tokens)?;
        check::positive("judge.max_reply_bytes", self.max_reply_bytes)?;
        check::in_range("judge.top_logprobs", self.top_logprobs, 0, 20)?;
        check::in_range("judge.threshold", self.threshold, 0.0, 1.0)?;
        check::positive("judge.concurrency", self.concurrency)?;
        check::positive("judge.timeout_ms", self.timeout_ms)?;
        if self.backoff_ms > self.backoff_max_ms {
            return Err(Invalid::new("judge.backoff_ms", self.backoff_ms, "must be <= judge.backoff_max_ms"));
        }
        check::positive("judge.breaker_failures", self.breaker_failures)?;
        check::positive("judge.breaker_probes", self.breaker_probes)?;
        check::positive("judge.canary_window", self.canary_window)?;
        check::in_range("judge.canary_max_rate", self.canary_max_rate, 0.0, 1.0)?;
        Ok(())
    }
}

/// Why the judge gave no verdict for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The circuit breaker was open.
    BreakerOpen,
    /// The last attempt timed out.
    Timeout,
    /// The last attempt got this HTTP status.
    Status(u16),
    /// The last attempt's connection failed (refused, reset, cut short).
    Connection,
    /// The last attempt's body was not an OpenAI response, or was larger than
    /// `max_reply_bytes`.
    Malformed,
    /// The template could not be rendered.
    Template,
    /// The caller's deadline passed first.
    Deadline,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::BreakerOpen => write!(f, "breaker open"),
            Failure::Timeout => write!(f, "timeout"),
            Failure::Status(s) => write!(f, "HTTP {s}"),
            Failure::Connection => write!(f, "connection failed"),
            Failure::Malformed => write!(f, "malformed response"),
            Failure::Template => write!(f, "template error"),
            Failure::Deadline => write!(f, "deadline passed"),
        }
    }
}

/// What the judge said about one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StepJudgement {
    /// P(step correct): the mean over the replies whose verdict could be read.
    Scored {
        p: f32,
        /// Served from the cache.
        cached: bool,
        /// Replies with a verdict.
        samples: u32,
        /// Replies without one.
        unknown: u32,
    },
    /// No reply had a readable verdict.
    Unknown { samples: u32 },
    /// No reply at all.
    Failed { failure: Failure },
}

impl StepJudgement {
    /// The score, when there is one.
    pub fn score(&self) -> Option<f32> {
        match self {
            StepJudgement::Scored { p, .. } => Some(*p),
            _ => None,
        }
    }
}

/// A snapshot of the judge's counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeMetrics {
    /// Judge calls for steps (one per step prefix, or per solution with
    /// `thinkprm`), cache hits excluded, canaries excluded.
    pub calls: u64,
    /// Second calls that reviewed a critique (`meta_critique`).
    pub meta_calls: u64,
    /// HTTP attempts, retries and canaries included.
    pub attempts: u64,
    pub retries: u64,
    pub timeouts: u64,
    /// Attempts answered with a non-2xx status (429 included).
    pub http_errors: u64,
    /// Attempts answered with 429.
    pub rate_limited: u64,
    /// Attempts whose connection failed (refused, reset, body cut short).
    pub connection_errors: u64,
    /// Attempts whose body was not an OpenAI response.
    pub malformed: u64,
    /// Calls that got no reply after all retries (breaker refusals included).
    pub failed_calls: u64,
    /// Attempts the open breaker refused.
    pub breaker_rejections: u64,
    pub breaker_state: BreakerState,
    pub breaker_opens: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Replies whose verdict was read.
    pub verdicts: u64,
    /// Of those, scored from logprobs (the rest from the verdict text).
    pub logprob_verdicts: u64,
    /// Replies whose verdict could not be read (truncated replies, and those
    /// with `non_finite` scores, included).
    pub unknown_verdicts: u64,
    /// Verdicts made unknown because their logprobs were not log-probabilities
    /// (above 0, NaN, +inf) or gave a P(yes) that is not a finite number in
    /// [0, 1], or because a step's mean score was not one.
    pub non_finite: u64,
    /// Replies (canaries included) cut off at `max_tokens` (`finish_reason =
    /// "length"`); they give no verdict.
    pub truncated: u64,
    /// Replies (canaries included) that carried token logprobs, and of those,
    /// how many had tokens that do not spell the reply's text (so P(yes) cannot
    /// be read from them).
    pub logprob_replies: u64,
    pub logprob_mismatches: u64,
    /// Canaries with a readable verdict, and how many the judge accepted.
    pub canaries: u64,
    pub canary_false_positives: u64,
    /// `canary_false_positives / canaries`; `None` before the first canary.
    pub canary_fpr: Option<f64>,
    /// The false-positive rate over the latest `canary_window` canaries; `None`
    /// before the first.
    pub canary_fp_rate_window: Option<f64>,
    /// Whether the judge's scores may be used ([`Judge::trusted`]).
    pub trusted: bool,
    /// Times the judge went from trusted to not trusted.
    pub distrusted_transitions: u64,
    /// Successful attempts' latency: mean and max over all, p50 and p95 over the
    /// latest 4096.
    pub latency_ms_mean: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_max: f64,
}

#[derive(Debug, Default)]
struct Stats {
    calls: u64,
    meta_calls: u64,
    attempts: u64,
    retries: u64,
    timeouts: u64,
    http_errors: u64,
    rate_limited: u64,
    connection_errors: u64,
    malformed: u64,
    failed_calls: u64,
    breaker_rejections: u64,
    cache_hits: u64,
    cache_misses: u64,
    verdicts: u64,
    logprob_verdicts: u64,
    unknown_verdicts: u64,
    non_finite: u64,
    truncated: u64,
    logprob_replies: u64,
    logprob_mismatches: u64,
    canaries: u64,
    canary_false_positives: u64,
    /// The latest `canary_window` canaries: accepted or not.
    canary_window: VecDeque<bool>,
    distrusted: bool,
    distrusted_transitions: u64,
    latency_sum_ms: f64,
    latency_n: u64,
    latency_max_ms: f64,
    recent_ms: VecDeque<f64>,
}

const RECENT_LATENCIES: usize = 4096;

/// Content-free "solutions" sent as canaries, in turn: a judge that accepts
/// them can be fooled by a single token ("One Token to Fool", Zhao et al.
/// 2025, lists punctuation, reasoning openers and their translations).
pub const CANARIES: [&str; 8] = [
    ":",
    "Thought process:",
    "Let's solve this problem step by step.",
    ".",
    "Solution",
    "Lösung:",
    "解答：",
    "Solución paso a paso:",
];

/// What a solution is judged against: the problem, and what the task knows
/// about its answer (templates receive them as `problem`, `reference`,
/// `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject<'a> {
    pub problem: &'a str,
    /// The task's reference answer, when it has one.
    pub reference: Option<&'a str>,
    /// Whether the trajectory's final answer was verified right; `None` when
    /// it was not checked.
    pub outcome: Option<bool>,
}

impl<'a> Subject<'a> {
    /// A problem with nothing known about its answer.
    pub fn problem(problem: &'a str) -> Self {
        Self { problem, reference: None, outcome: None }
    }
}

/// The judge client. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Judge {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Config,
    endpoint: String,
    api_key: Option<String>,
    client: reqwest::Client,
    template: Template,
    permits: Semaphore,
    breaker: Mutex<Breaker>,
    cache: Mutex<Lru<[u8; 32], Vec<StepJudgement>>>,
    stats: Mutex<Stats>,
    canary_clock: AtomicU64,
    /// Canaries sent so far, to take them from [`CANARIES`] in turn.
    canary_turn: AtomicU64,
}

/// A reply body: read whole, or found larger than `max_reply_bytes` (at
/// least this many bytes) and not read further.
enum Body {
    Read(Vec<u8>),
    TooLarge(u64),
}

/// The outcome of one HTTP attempt that did not give choices.
struct AttemptError {
    failure: Failure,
    retryable: bool,
    retry_after: Option<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind,
    // which stay usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Judge {
    /// A client for `[judge]` (reads the template file and the API key variable).
    pub fn new(cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        let template = Template::load(cfg.template, &cfg.template_file, cfg.reference_aware)?;
        let api_key = if cfg.api_key_env.is_empty() {
            None
        } else {
            Some(std::env::var(&cfg.api_key_env).map_err(|_| {
                Error::Client(format!("judge.api_key_env names {:?}, which is not set", cfg.api_key_env))
            })?)
        };
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(cfg.concurrency as usize)
            .tcp_nodelay(true);
        if is_loopback(&cfg.url) {
            builder = builder.no_proxy();
        }
        let client = builder.build().map_err(|e| Error::Client(e.to_string()))?;
        let base = cfg.url.trim_end_matches('/');
        let endpoint = match cfg.api {
            Api::Chat => format!("{base}/chat/completions"),
            Api::Completions => format!("{base}/completions"),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                api_key,
                client,
                template,
                permits: Semaphore::new(cfg.concurrency as usize),
                breaker: Mutex::new(Breaker::new(
                    cfg.breaker_failures,
                    Duration::from_millis(cfg.breaker_cooldown_ms),
                    cfg.breaker_probes,
                )),
                cache: Mutex::new(Lru::new(cfg.cache_entries as usize)),
                stats: Mutex::new(Stats::default()),
                canary_clock: AtomicU64::new(0),
                canary_turn: AtomicU64::new(0),
                cfg: cfg.clone(),
            }),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    pub fn template(&self) -> &Template {
        &self.inner.template
    }

    /// Judges every step of a solution to `problem`; one judgement per step.
    pub async fn judge(&self, problem: &str, steps: &[&str]) -> Vec<StepJudgement> {
        self.judge_subject(&Subject::problem(problem), steps, None).await
    }

    /// Like [`Judge::judge`], but steps still unjudged at `deadline` are
    /// `Failed { Deadline }` (those already judged keep their verdicts).
    pub async fn judge_until(
        &self,
        problem: &str,
        steps: &[&str],
        deadline: Option<tokio::time::Instant>,
    ) -> Vec<StepJudgement> {
        self.judge_subject(&Subject::problem(problem), steps, deadline).await
    }

    /// Judges every step of a solution to `subject` (its reference answer and
    /// verified outcome go to the template, and into the cache key when the
    /// template reads them); steps still unjudged at `deadline` are `Failed {
    /// Deadline }`.
    pub async fn judge_subject(
        &self,
        subject: &Subject<'_>,
        steps: &[&str],
        deadline: Option<tokio::time::Instant>,
    ) -> Vec<StepJudgement> {
        if steps.is_empty() {
            return Vec::new();
        }
        let deadline_failed = StepJudgement::Failed { failure: Failure::Deadline };
        match self.inner.template.style() {
            Style::Genprm => {
                let calls = (1..=steps.len()).map(|i| within(deadline, self.judge_prefix(subject, &steps[..i])));
                join_all(calls).await.into_iter().map(|r| r.unwrap_or_else(|| deadline_failed.clone())).collect()
            }
            Style::Thinkprm => within(deadline, self.judge_all(subject, steps))
                .await
                .unwrap_or_else(|| vec![deadline_failed; steps.len()]),
        }
    }

    /// Whether the judge's scores may be used: false while the judge accepts
    /// more than `canary_max_rate` of the latest `canary_window` canaries.
    pub fn trusted(&self) -> bool {
        !lock(&self.inner.stats).distrusted
    }

    /// The current state of the circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        lock(&self.inner.breaker).state(Instant::now())
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> JudgeMetrics {
        let state = self.breaker_state();
        let opens = lock(&self.inner.breaker).opens;
        let s = lock(&self.inner.stats);
        let mut recent: Vec<f64> = s.recent_ms.iter().copied().collect();
        recent.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            if recent.is_empty() { 0.0 } else { recent[((recent.len() - 1) as f64 * q).round() as usize] }
        };
        JudgeMetrics {
            calls: s.calls,
            meta_calls: s.meta_calls,
            attempts: s.attempts,
            retries: s.retries,
            timeouts: s.timeouts,
            http_errors: s.http_errors,
            rate_limited: s.rate_limited,
            connection_errors: s.connection_errors,
            malformed: s.malformed,
            failed_calls: s.failed_calls,
            breaker_rejections: s.breaker_rejections,
            breaker_state: state,
            breaker_opens: opens,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
            verdicts: s.verdicts,
            logprob_verdicts: s.logprob_verdicts,
            unknown_verdicts: s.unknown_verdicts,
            non_finite: s.non_finite,
            truncated: s.truncated,
            logprob_replies: s.logprob_replies,
            logprob_mismatches: s.logprob_mismatches,
            canaries: s.canaries,
            canary_false_positives: s.canary_false_positives,
            canary_fpr: (s.canaries > 0).then(|| s.canary_false_positives as f64 / s.canaries as f64),
            canary_fp_rate_window: window_rate(&s.canary_window),
            trusted: !s.distrusted,
            distrusted_transitions: s.distrusted_transitions,
            latency_ms_mean: if s.latency_n > 0 { s.latency_sum_ms / s.latency_n as f64 } else { 0.0 },
            latency_ms_p50: quantile(0.5),
            latency_ms_p95: quantile(0.95),
            latency_ms_max: s.latency_max_ms,
        }
    }

    /// The cache key of a step prefix (or, with `thinkprm`, the whole
    /// solution), from the raw inputs (never the rendered prompt, whose nonce
    /// changes at every render). The reference and the outcome are part of it
    /// when the template reads them; a template that does not gives the same
    /// verdict whatever they are, and shares it.
    fn key(&self, subject: &Subject<'_>, steps: &[&str]) -> [u8; 32] {
        let template = &self.inner.template;
        let mut h = Sha256::new();
        for part in [self.inner.cfg.model.as_bytes(), template.id(), subject.problem.as_bytes(), self.inner.cfg.vote.as_str().as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(self.inner.cfg.samples.to_le_bytes());
        h.update([u8::from(self.inner.cfg.meta_critique)]);
        if template.reads_reference() {
            match subject.reference {
                None => h.update([0]),
                Some(r) => {
                    h.update([1]);
                    h.update((r.len() as u64).to_le_bytes());
                    h.update(r.as_bytes());
                }
            }
        }
        if template.reads_outcome() {
            h.update([match subject.outcome {
                None => 0,
                Some(false) => 1,
                Some(true) => 2,
            }]);
        }
        for s in steps {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        h.finalize().into()
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Vec<StepJudgement>> {
        let hit = lock(&self.inner.cache).get(key);
        let mut s = lock(&self.inner.stats);
        if hit.is_some() {
            s.cache_hits += 1;
        } else {
            s.cache_misses += 1;
        }
        hit.map(|v| {
            v.into_iter()
                .map(|j| match j {
                    StepJudgement::Scored { p, samples, unknown, .. } => {
                        StepJudgement::Scored { p, cached: true, samples, unknown }
                    }
                    other => other,
                })
                .collect()
        })
    }

    /// Keeps `judgements` in the cache when there is a score among them and
    /// every score is a finite number in [0, 1].
    fn remember(&self, key: [u8; 32], judgements: &[StepJudgement]) {
        let scores = || judgements.iter().filter_map(StepJudgement::score);
        if scores().next().is_some() && scores().all(|p| p.is_finite() && (0.0..=1.0).contains(&p)) {
            lock(&self.inner.cache).insert(key, judgements.to_vec());
        }
    }

    /// GenPRM style: the verdict on the last step of `prefix`.
    async fn judge_prefix(&self, subject: &Subject<'_>, prefix: &[&str]) -> StepJudgement {
        let key = self.key(subject, prefix);
        if let Some(mut hit) = self.cached(&key) {
            return hit.pop().unwrap_or(StepJudgement::Unknown { samples: 0 });
        }
        let Ok(prompt) = self.inner.template.render(subject, prefix, prefix.len()) else {
            return StepJudgement::Failed { failure: Failure::Template };
        };
        lock(&self.inner.stats).calls += 1;
        self.maybe_canary(subject);
        let judgement = match self.replies(&prompt).await {
            Ok(choices) => self.aggregate(&choices, parse::last_boxed_verdict, false),
            Err(failure) => StepJudgement::Failed { failure },
        };
        self.remember(key, std::slice::from_ref(&judgement));
        judgement
    }

    /// ThinkPRM style: verdicts on all steps from one reply per sample.
    async fn judge_all(&self, subject: &Subject<'_>, steps: &[&str]) -> Vec<StepJudgement> {
        let key = self.key(subject, steps);
        if let Some(hit) = self.cached(&key) {
            return hit;
        }
        let Ok(prompt) = self.inner.template.render(subject, steps, steps.len()) else {
            return vec![StepJudgement::Failed { failure: Failure::Template }; steps.len()];
        };
        lock(&self.inner.stats).calls += 1;
        self.maybe_canary(subject);
        let judgements: Vec<StepJudgement> = match self.replies(&prompt).await {
            Ok(choices) => (0..steps.len())
                .map(|i| self.aggregate(&choices, |text| parse::step_verdicts(text, steps.len())[i], false))
                .collect(),
            Err(failure) => vec![StepJudgement::Failed { failure }; steps.len()],
        };
        self.remember(key, &judgements);
        judgements
    }

    /// Makes one score of the per-reply scores of one step (as `judge.vote`
    /// says), whose verdict `find` reads from a reply's text; counts verdicts. The soft score comes from the
    /// verdict as found in the text the tokens spell, when it agrees with the
    /// one in the reply's text. A reply cut off at `max_tokens` gives no
    /// verdict; one whose logprobs are not log-probabilities gives an unknown
    /// one (counted as `non_finite`), as does a mean that is not a finite
    /// number in [0, 1].
    fn aggregate(
        &self,
        choices: &[Choice],
        find: impl Fn(&str) -> Option<parse::Verdict>,
        canary: bool,
    ) -> StepJudgement {
        let (mut scores, mut unknown, mut from_logprobs, mut non_finite) = (Vec::with_capacity(choices.len()), 0u32, 0u64, 0u64);
        for c in choices {
            let verdict = if c.truncated() { None } else { find(&c.text) };
            let Some(v) = verdict else {
                unknown += 1;
                continue;
            };
            let soft = match c.tokens.as_deref() {
                None => Ok(None),
                Some(tokens) => {
                    let spelled = parse::spelled(tokens);
                    let at = if spelled == c.text { Some(v) } else { find(&spelled) };
                    match at.filter(|w| w.positive == v.positive && w.words == v.words) {
                        Some(w) => parse::p_yes(tokens, &w),
                        None => Ok(None),
                    }
                }
            };
            let p = match soft {
                Ok(Some(p)) => {
                    from_logprobs += 1;
                    p as f64
                }
                Ok(None) => f64::from(u8::from(v.positive)),
                Err(parse::NotAProbability(value)) => {
                    if !canary {
                        tracing::debug!(value, "judge logprobs are not log-probabilities; verdict unknown");
                    }
                    non_finite += 1;
                    unknown += 1;
                    continue;
                }
            };
            scores.push(p);
        }
        let known = scores.len() as u32;
        let mean = vote(self.inner.cfg.vote, &scores, self.inner.cfg.threshold);
        let judgement = if known == 0 {
            StepJudgement::Unknown { samples: unknown }
        } else if !(mean.is_finite() && (0.0..=1.0).contains(&mean)) {
            non_finite += 1;
            StepJudgement::Unknown { samples: known + unknown }
        } else {
            StepJudgement::Scored { p: mean as f32, cached: false, samples: known, unknown }
        };
        if !canary {
            let mut s = lock(&self.inner.stats);
            match judgement {
                StepJudgement::Scored { .. } => {
                    s.verdicts += known as u64;
                    s.logprob_verdicts += from_logprobs;
                    s.unknown_verdicts += unknown as u64;
                }
                _ => s.unknown_verdicts += (known + unknown) as u64,
            }
            s.non_finite += non_finite;
        }
        judgement
    }

    /// Every `canary_every` calls, a canary in the background.
    fn maybe_canary(&self, subject: &Subject<'_>) {
        let every = self.inner.cfg.canary_every;
        if every == 0 {
            return;
        }
        let n = self.inner.canary_clock.fetch_add(1, Ordering::Relaxed) + 1;
        if !n.is_multiple_of(every) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let judge = self.clone();
        let (problem, reference) = (subject.problem.to_string(), subject.reference.map(str::to_string));
        let answer = self.next_canary();
        runtime.spawn(async move {
            let subject = Subject { problem: &problem, reference: reference.as_deref(), outcome: None };
            judge.canary_for(&subject, answer).await
        });
    }

    fn next_canary(&self) -> &'static str {
        let turn = self.inner.canary_turn.fetch_add(1, Ordering::Relaxed);
        CANARIES[(turn % CANARIES.len() as u64) as usize]
    }

    /// Sends the next canary of [`CANARIES`] now, for `problem`, and records
    /// whether the judge accepted it (`None` when it gave no readable verdict).
    pub async fn send_canary_now(&self, problem: &str) -> Option<bool> {
        let answer = self.next_canary();
        self.canary_for(&Subject::problem(problem), answer).await
    }

    /// Sends one canary and records whether the judge accepted it.
    pub async fn canary(&self, problem: &str, answer: &str) -> Option<bool> {
        self.canary_for(&Subject::problem(problem), answer).await
    }

    /// Sends `answer` as the whole solution to `subject` (with the outcome
    /// unknown, as a content-free solution has none); records the verdict.
    async fn canary_for(&self, subject: &Subject<'_>, answer: &str) -> Option<bool> {
        let prompt = self.inner.template.render(subject, &[answer], 1).ok()?;
        let choices = self.replies(&prompt).await.ok()?;
        let judgement = match self.inner.template.style() {
            Style::Genprm => self.aggregate(&choices, parse::last_boxed_verdict, true),
            Style::Thinkprm => self.aggregate(&choices, |text| parse::step_verdicts(text, 1)[0], true),
        };
        let accepted = judgement.score()? as f64 >= self.inner.cfg.threshold;
        self.record_canary(accepted);
        Some(accepted)
    }

    /// Counts a canary's verdict and updates whether the judge is trusted.
    fn record_canary(&self, accepted: bool) {
        let cfg = &self.inner.cfg;
        let window = cfg.canary_window.max(1) as usize;
        let limit = cfg.canary_max_rate;
        let mut s = lock(&self.inner.stats);
        s.canaries += 1;
        if accepted {
            s.canary_false_positives += 1;
        }
        s.canary_window.push_back(accepted);
        while s.canary_window.len() > window {
            s.canary_window.pop_front();
        }
        let Some(rate) = window_rate(&s.canary_window) else { return };
        let enough = s.canary_window.len() >= window.min(5);
        if !s.distrusted && enough && rate > limit {
            s.distrusted = true;
            s.distrusted_transitions += 1;
            drop(s);
            tracing::warn!(
                rate,
                window,
                limit,
                "judge accepts content-free canaries: judge scores are off until the rate falls"
            );
        } else if s.distrusted && rate <= limit {
            s.distrusted = false;
            drop(s);
            tracing::info!(rate, window, limit, "judge canary rate back under the limit: judge scores on again");
        }
    }

    /// The replies whose verdicts count: the `samples` critiques of `prompt`,
    /// or with `meta_critique` the reviews of those critiques (one second call
    /// each, all at once).
    async fn replies(&self, prompt: &str) -> Result<Vec<Choice>, Failure> {
        let critiques = self.sample(prompt).await?;
        if !self.inner.cfg.meta_critique {
            return Ok(critiques);
        }
        lock(&self.inner.stats).meta_calls += critiques.len() as u64;
        let prompts: Vec<String> = critiques.iter().map(|c| template::meta_prompt(prompt, &c.text)).collect();
        let reviews = futures::future::join_all(prompts.iter().map(|p| self.call(p, 1))).await;
        let mut out = Vec::with_capacity(reviews.len());
        for review in reviews {
            out.extend(review?.into_iter().take(1));
        }
        if out.is_empty() { Err(Failure::Malformed) } else { Ok(out) }
    }

    /// `samples` replies to `prompt` (asking with `n`, and again for the rest
    /// when a server returns fewer).
    async fn sample(&self, prompt: &str) -> Result<Vec<Choice>, Failure> {
        let want = self.inner.cfg.samples as usize;
        let mut choices = Vec::with_capacity(want);
        for _ in 0..want {
            let got = self.call(prompt, want - choices.len()).await?;
            if got.is_empty() {
                break;
            }
            choices.extend(got);
            if choices.len() >= want {
                break;
            }
        }
        choices.truncate(want);
        {
            let mut s = lock(&self.inner.stats);
            for c in &choices {
                if c.truncated() {
                    s.truncated += 1;
                }
                if let Some(tokens) = &c.tokens {
                    s.logprob_replies += 1;
                    if parse::spelled(tokens) != c.text {
                        s.logprob_mismatches += 1;
                    }
                }
            }
        }
        if choices.is_empty() { Err(Failure::Malformed) } else { Ok(choices) }
    }

    /// One request with retries, through the breaker and the concurrency limit.
    async fn call(&self, prompt: &str, n: usize) -> Result<Vec<Choice>, Failure> {
        let cfg = &self.inner.cfg;
        let body = self.request_body(prompt, n);
        let mut last = Failure::BreakerOpen;
        for attempt in 0..=cfg.retries {
            let Some(pass) = lock(&self.inner.breaker).try_pass(Instant::now()) else {
                let mut s = lock(&self.inner.stats);
                s.breaker_rejections += 1;
                s.failed_calls += 1;
                return Err(Failure::BreakerOpen);
            };
            if attempt > 0 {
                lock(&self.inner.stats).retries += 1;
            }
            let guard = PassGuard { judge: self, pass: Some(pass) };
            let result = {
                let _permit = self.inner.permits.acquire().await.map_err(|_| Failure::Connection)?;
                let started = Instant::now();
                let r = self.attempt(&body).await;
                if r.is_ok() {
                    self.record_latency(started.elapsed());
                }
                r
            };
            match result {
                Ok(choices) => {
                    guard.succeeded();
                    return Ok(choices);
                }
                Err(e) => {
                    guard.failed();
                    last = e.failure;
                    if !e.retryable || attempt == cfg.retries {
                        break;
                    }
                    let cap = cfg.backoff_max_ms as f64;
                    let ceiling = (cfg.backoff_ms as f64 * 2f64.powi(attempt as i32)).min(cap);
                    let jittered = rand::random::<f64>() * ceiling;
                    let wait = e.retry_after.map_or(jittered, |r| (r.as_millis() as f64).min(cap).max(jittered));
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
            }
        }
        lock(&self.inner.stats).failed_calls += 1;
        Err(last)
    }

    fn request_body(&self, prompt: &str, n: usize) -> Vec<u8> {
        let cfg = &self.inner.cfg;
        let mut body = serde_json::json!({
            "model": cfg.model,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "n": n,
        });
        match cfg.api {
            Api::Chat => {
                body["messages"] = serde_json::json!([{"role": "user", "content": prompt}]);
                if cfg.top_logprobs > 0 {
                    body["logprobs"] = true.into();
                    body["top_logprobs"] = cfg.top_logprobs.into();
                }
            }
            Api::Completions => {
                body["prompt"] = prompt.into();
                if cfg.top_logprobs > 0 {
                    body["logprobs"] = cfg.top_logprobs.into();
                }
            }
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// One HTTP attempt, bounded by `timeout_ms` from connect to the last byte.
    async fn attempt(&self, body: &[u8]) -> Result<Vec<Choice>, AttemptError> {
        let inner = &self.inner;
        lock(&inner.stats).attempts += 1;
        let timeout = Duration::from_millis(inner.cfg.timeout_ms);
        let cap = inner.cfg.max_reply_bytes;
        let fail = |failure, retryable| AttemptError { failure, retryable, retry_after: None };
        let send = async {
            let mut req =
                inner.client.post(&inner.endpoint).header("content-type", "application/json").body(body.to_vec());
            if let Some(key) = &inner.api_key {
                req = req.bearer_auth(key);
            }
            let mut resp = req.send().await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|secs| Duration::from_secs_f64(secs.clamp(0.0, 3600.0)));
            // Read no more than the cap: a larger announced body fails at
            // once, a longer stream as soon as it passes the cap (dropping the
            // response closes the connection).
            if let Some(announced) = resp.content_length().filter(|n| *n > cap) {
                return Ok((status, retry_after, Body::TooLarge(announced)));
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                let read = (bytes.len() + chunk.len()) as u64;
                if read > cap {
                    return Ok((status, retry_after, Body::TooLarge(read)));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, retry_after, Body::Read(bytes)))
        };
        let outcome = tokio::time::timeout(timeout, send).await;
        let mut s = lock(&inner.stats);
        match outcome {
            Err(_) => {
                s.timeouts += 1;
                Err(fail(Failure::Timeout, true))
            }
            Ok(Err(e)) if e.is_timeout() => {
                s.timeouts += 1;
                Err(fail(Failure::Timeout, true))
            }
            Ok(Err(_)) => {
                s.connection_errors += 1;
                Err(fail(Failure::Connection, true))
            }
            Ok(Ok((status, retry_after, _))) if !(200..300).contains(&status) => {
                s.http_errors += 1;
                if status == 429 {
                    s.rate_limited += 1;
                }
                let retryable = status == 429 || status == 408 || status >= 500;
                Err(AttemptError { failure: Failure::Status(status), retryable, retry_after })
            }
            Ok(Ok((_, _, Body::TooLarge(bytes)))) => {
                s.malformed += 1;
                tracing::debug!(bytes, cap, "judge response larger than judge.max_reply_bytes");
                Err(fail(Failure::Malformed, true))
            }
            Ok(Ok((_, _, Body::Read(bytes)))) => match parse::choices(inner.cfg.api, &bytes) {
                Ok(choices) => Ok(choices),
                Err(reason) => {
                    s.malformed += 1;
                    tracing::debug!(%reason, "malformed judge response");
                    Err(fail(Failure::Malformed, true))
                }
            },
        }
    }

    fn record_latency(&self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let mut s = lock(&self.inner.stats);
        s.latency_sum_ms += ms;
        s.latency_n += 1;
        s.latency_max_ms = s.latency_max_ms.max(ms);
        if s.recent_ms.len() == RECENT_LATENCIES {
            s.recent_ms.pop_front();
        }
        s.recent_ms.push_back(ms);
    }
}

/// Reports an attempt's result to the breaker exactly once, also when the
/// attempt is cancelled (then as abandoned).
struct PassGuard<'a> {
    judge: &'a Judge,
    pass: Option<Pass>,
}

impl PassGuard<'_> {
    fn succeeded(mut self) {
        if let Some(p) = self.pass.take() {
            lock(&self.judge.inner.breaker).succeeded(p);
        }
    }

    fn failed(mut self) {
        if let Some(p) = self.pass.take() {
            lock(&self.judge.inner.breaker).failed(p, Instant::now());
        }
    }
}

impl Drop for PassGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.pass.take() {
            lock(&self.judge.inner.breaker).abandoned(p);
        }
    }
}

async fn within<T>(deadline: Option<tokio::time::Instant>, f: impl Future<Output = T>) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await.ok(),
        None => Some(f.await),
    }
}

/// The share of accepted canaries in `window`; `None` when it is empty.
/// One score from a step's per-reply scores under `mode`; a reply judges
/// the step correct when its score is at least `threshold`. NaN for no
/// replies (the caller calls that unknown).
fn vote(mode: Vote, scores: &[f64], threshold: f64) -> f64 {
    if scores.is_empty() {
        return f64::NAN;
    }
    let yes = scores.iter().filter(|&&p| p >= threshold).count();
    let no = scores.len() - yes;
    match mode {
        Vote::Mean => scores.iter().sum::<f64>() / scores.len() as f64,
        Vote::Majority => match yes.cmp(&no) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Less => 0.0,
            std::cmp::Ordering::Equal => 0.5,
        },
        Vote::AllCorrect => f64::from(u8::from(no == 0)),
    }
}

fn window_rate(window: &VecDeque<bool>) -> Option<f64> {
    (!window.is_empty()).then(|| window.iter().filter(|a| **a).count() as f64 / window.len() as f64)
}

fn is_loopback(url: &str) -> bool {
    let authority = url.split("://").nth(1).unwrap_or("").split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

#[cfg(test)]
mod tests;
