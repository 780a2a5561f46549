//! The data plane: Redis Streams with consumer groups.
//!
//! Per run, two streams: `<prefix>:<run>:sampled` (rollout → reward, group
//! `reward`) and `<prefix>:<run>:labeled` (reward → learner, group `learner`).
//! An entry holds the trajectory id (`id`) and the protobuf message (`p`).
//!
//! A third, `<prefix>:<run>:judged`, is a broadcast rather than a queue: each
//! reward process adds the steps its judge scored, tagged with its worker id
//! (`w`), and every reward process reads all of it with its own read position
//! (plain `XREAD`, no group, nothing acknowledged; [`Publisher`],
//! [`Subscriber`]). It is trimmed to `redis.max_len` entries, oldest first.
//!
//! - Producers add with `XADD ... MAXLEN <cap>` from a Lua script that only adds
//!   while the stream is shorter than the cap, so a full stream makes the
//!   producer wait (back-pressure) instead of trimming unread entries (loss).
//! - Consumers read with `XREADGROUP`, acknowledge with `XACK` and then `XDEL`,
//!   so a stream's length is what is still waiting or in flight.
//! - Entries a consumer read but did not acknowledge for `redis.claim_idle_ms`
//!   are taken over with `XAUTOCLAIM`; those of a worker declared dead are taken
//!   over at once ([`Consumer::claim_from`]).
//! - The learner's consumer remembers every trajectory id it ingested in a
//!   bitmap (`<prefix>:<run>:ingested`, one bit per id), so a trajectory labeled twice (its reward
//!   worker died after sending the label but before acknowledging) is trained on
//!   once.
//! - Commands that fail because the server is unreachable, restarting or loading
//!   its AOF are retried with exponential backoff for up to `redis.retry_for_ms`.

use super::{Error, Result, unix_ms};
use prism_core::config::{Invalid, check};
use prism_core::{LabeledTrajectory, Trajectory};
use prism_proto::{convert, v1};
use prost::Message;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamClaimReply, StreamId, StreamReadReply};
use redis::{RedisError, Value};
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::time::{Duration, Instant};

/// `[redis]`: the Redis server of the distributed transport and how streams use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `redis://[:password@]host:port[/db]`, `rediss://` (TLS) or `unix:///path`.
    /// A password written here is never printed. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// Environment variable holding the Redis password (overrides one in `url`);
    /// unset or empty = none. Default `PRISM_REDIS_PASSWORD`.
    pub password_env: String,
    /// PEM file of the CA that signed a `rediss://` server's certificate; empty =
    /// the system's roots. Default empty.
    pub tls_ca_file: String,
    /// First part of every key prism writes. Default `prism`.
    pub prefix: String,
    /// Cap on each stream's length; producers wait while a stream is this full.
    /// Default 10000.
    pub max_len: u64,
    /// Entries a consumer reads (and a producer adds) per round trip. Default 64.
    pub batch: usize,
    /// How long one blocking read waits for new entries, in ms. Default 1000.
    pub block_ms: u64,
    /// Entries read but not acknowledged for this long are reclaimed by another
    /// consumer of the group, in ms. Default 60000.
    pub claim_idle_ms: u64,
    /// How long a producer sleeps before retrying a full stream, in ms. Default 20.
    pub backpressure_poll_ms: u64,
    /// Timeout of one connection attempt, in ms. Default 5000.
    pub connect_timeout_ms: u64,
    /// Longest pause between reconnection attempts, in ms. Default 2000.
    pub reconnect_max_delay_ms: u64,
    /// A command keeps being retried while Redis is unreachable for this long,
    /// then the worker fails, in ms. Default 120000.
    pub retry_for_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            password_env: "PRISM_REDIS_PASSWORD".into(),
            tls_ca_file: String::new(),
            prefix: "prism".into(),
            max_len: 10_000,
            batch: 64,
            block_ms: 1000,
            claim_idle_ms: 60_000,
            backpressure_poll_ms: 20,
            connect_timeout_ms: 5000,
            reconnect_max_delay_ms: 2000,
            retry_for_ms: 120_000,
        }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
            return Err(Invalid::new("redis.url", redact_url(&self.url), "must start with redis://, rediss:// or unix://"));
        }
        if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
            return Err(Invalid::new("redis.prefix", &self.prefix, "must be non-empty without spaces"));
        }
        check::positive("redis.max_len", self.max_len)?;
        check::positive("redis.batch", self.batch)?;
        if self.batch as u64 > self.max_len {
            return Err(Invalid::new("redis.batch", self.batch, format!("must not exceed redis.max_len ({})", self.max_len)));
        }
        check::positive("redis.block_ms", self.block_ms)?;
        check::positive("redis.claim_idle_ms", self.claim_idle_ms)?;
        check::positive("redis.backpressure_poll_ms", self.backpressure_poll_ms)?;
        check::positive("redis.connect_timeout_ms", self.connect_timeout_ms)?;
        check::positive("redis.reconnect_max_delay_ms", self.reconnect_max_delay_ms)?;
        check::positive("redis.retry_for_ms", self.retry_for_ms)?;
        Ok(())
    }
}

/// `url` with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, path) = rest.split_once('/').map_or((rest, None), |(a, p)| (a, Some(p)));
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => authority.to_string(),
    };
    match path {
        Some(p) => format!("{scheme}://{authority}/{p}"),
        None => format!("{scheme}://{authority}"),
    }
}

/// The keys of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunKeys {
    /// Sampled trajectories, rollout → reward.
    pub sampled: String,
    /// Labeled trajectories, reward → learner.
    pub labeled: String,
    /// Trajectory ids the learner has ingested (a bitmap; ids ≥ 2^32 in
    /// the set `<ingested>:large`).
    pub ingested: String,
    /// Steps the reward processes' judges scored, every reward process → every
    /// reward process (a broadcast, no consumer group).
    pub judged: String,
}

impl RunKeys {
    /// The keys of run `run_id` under `prefix`.
    pub fn new(prefix: &str, run_id: &str) -> Self {
        Self {
            sampled: format!("{prefix}:{run_id}:sampled"),
            labeled: format!("{prefix}:{run_id}:labeled"),
            ingested: format!("{prefix}:{run_id}:ingested"),
            judged: format!("{prefix}:{run_id}:judged"),
        }
    }
}

/// Consumer group of the sampled stream.
pub const REWARD_GROUP: &str = "reward";
/// Consumer group of the labeled stream.
pub const LEARNER_GROUP: &str = "learner";

/// A value that travels as a stream entry.
pub trait Entry: Sized + Send + Sync + 'static {
    /// The trajectory id, the key of idempotent ingestion.
    fn id(&self) -> u64;
    /// The id of the trajectory's group.
    fn group(&self) -> u64;
    /// The protobuf encoding, stamped with the send time.
    fn encode(&self) -> Vec<u8>;
    /// Decodes what [`Entry::encode`] produced.
    fn decode(bytes: &[u8]) -> Result<Self>;
}

impl Entry for Trajectory {
    fn id(&self) -> u64 {
        self.id.0
    }
    fn group(&self) -> u64 {
        self.group.0
    }
    fn encode(&self) -> Vec<u8> {
        convert::trajectory_to_wire(self, v1::Timings { sampled_at_ms: unix_ms(), ..Default::default() }).encode_to_vec()
    }
    fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(convert::decode::<v1::Trajectory>("Trajectory", bytes)?.try_into()?)
    }
}

impl Entry for LabeledTrajectory {
    fn id(&self) -> u64 {
        self.trajectory.id.0
    }
    fn group(&self) -> u64 {
        self.trajectory.group.0
    }
    fn encode(&self) -> Vec<u8> {
        convert::labeled_to_wire(self, v1::Timings { labeled_at_ms: unix_ms(), ..Default::default() }).encode_to_vec()
    }
    fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(convert::decode::<v1::LabeledTrajectory>("LabeledTrajectory", bytes)?.try_into()?)
    }
}

impl Entry for prism_proto::LabelResult {
    fn id(&self) -> u64 {
        match self {
            Ok(l) => l.trajectory.id.0,
            Err(f) => f.trajectory.id.0,
        }
    }
    fn group(&self) -> u64 {
        match self {
            Ok(l) => l.trajectory.group.0,
            Err(f) => f.trajectory.group.0,
        }
    }
    fn encode(&self) -> Vec<u8> {
        convert::label_result_to_wire(self, v1::Timings { labeled_at_ms: unix_ms(), ..Default::default() }).encode_to_vec()
    }
    fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(convert::label_result_from_wire(convert::decode::<v1::LabelResult>("LabelResult", bytes)?)?)
    }
}

/// A connection to the run's Redis: makes producers and consumers.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    config: Config,
    url: String,
    /// The connection `connect` checked the server with, kept for short
    /// requests (queue depths, clearing a run); clones share it.
    shared: ConnectionManager,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Redis {
    /// Checks the URL, password and TLS settings and that the server answers
    /// within `redis.connect_timeout_ms`.
    pub async fn connect(config: &Config) -> Result<Self> {
        let url = redact_url(&config.url);
        let setup = |reason: String| Error::RedisUnreachable { url: url.clone(), waited_ms: 0, last: reason };
        let mut info = redis::IntoConnectionInfo::into_connection_info(config.url.as_str()).map_err(|e| setup(format!("bad URL: {e}")))?;
        if let Some(password) = std::env::var(&config.password_env).ok().filter(|p| !p.is_empty()) {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        if config.url.starts_with("rediss://") {
            super::grpc::crypto_provider();
        }
        let client = if config.tls_ca_file.is_empty() {
            redis::Client::open(info)
        } else {
            let ca = std::fs::read(&config.tls_ca_file).map_err(|e| setup(format!("redis.tls_ca_file {}: {e}", config.tls_ca_file)))?;
            redis::Client::build_with_tls(info, redis::TlsCertificates { client_tls: None, root_cert: Some(ca) })
        }
        .map_err(|e| setup(e.to_string()))?;
        let timeout = Duration::from_millis(config.connect_timeout_ms);
        let mut conn = manager(&client, config, &url, timeout).await?;
        match tokio::time::timeout(timeout, redis::cmd("PING").query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(Self { client, config: config.clone(), url, shared: conn }),
            Ok(Err(e)) => Err(Error::RedisUnreachable { url, waited_ms: 0, last: e.to_string() }),
            Err(_) => Err(Error::RedisUnreachable { url, waited_ms: config.connect_timeout_ms, last: "no answer to PING".into() }),
        }
    }

    /// The settings it was made with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The URL with any password redacted.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A new connection that reconnects by itself, with responses allowed to
    /// take `response_timeout` (longer than a blocking read).
    async fn connection(&self, response_timeout: Duration) -> Result<ConnectionManager> {
        manager(&self.client, &self.config, &self.url, response_timeout).await
    }

    /// A producer adding to `stream`.
    pub async fn producer<T: Entry>(&self, stream: &str) -> Result<Producer<T>> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        Ok(Producer {
            conn: Retrying::new(self, self.connection(timeout).await?),
            stream: stream.to_string(),
            script: redis::Script::new(ADD_BELOW_CAP),
            waits: 0,
            _t: PhantomData,
        })
    }

    /// A consumer named `consumer` in `group` of `stream` (group created if
    /// missing). `dedup`: a set of ids already ingested; entries whose id is in
    /// it are acknowledged and skipped.
    pub async fn consumer<T: Entry>(&self, stream: &str, group: &str, consumer: &str, dedup: Option<&str>) -> Result<Consumer<T>> {
        let timeout = Duration::from_millis(self.config.block_ms + self.config.connect_timeout_ms);
        let mut c = Consumer {
            conn: Retrying::new(self, self.connection(timeout).await?),
            stream: stream.to_string(),
            group: group.to_string(),
            name: consumer.to_string(),
            dedup: dedup.map(str::to_string),
            own_pending_checked: false,
            claim_cursor: "0-0".into(),
            duplicates: 0,
            _t: PhantomData,
        };
        c.ensure_group().await?;
        Ok(c)
    }

    /// Deletes run `keys`' streams (with their consumer groups) and the set of
    /// ingested ids: a fresh run starts from nothing.
    pub async fn reset_run(&self, keys: &RunKeys) -> Result<()> {
        let mut conn = Retrying::new(self, self.shared.clone());
        let large = format!("{}:large", keys.ingested);
        let cmd = redis::cmd("DEL").arg(&keys.sampled).arg(&keys.labeled).arg(&keys.ingested).arg(&large).arg(&keys.judged).clone();
        let deleted: u64 = conn.query("DEL", &keys.sampled, &cmd).await?;
        if deleted > 0 {
            tracing::info!(sampled = %keys.sampled, labeled = %keys.labeled, deleted, "cleared what an earlier run left in redis");
        }
        Ok(())
    }

    /// A publisher adding to the broadcast `stream` as `sender`.
    pub async fn publisher(&self, stream: &str, sender: &str) -> Result<Publisher> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        Ok(Publisher { conn: Retrying::new(self, self.connection(timeout).await?), stream: stream.to_string(), sender: sender.to_string() })
    }

    /// A subscriber to the broadcast `stream` for `sender`, which skips its
    /// own entries. It reads what is added from now on: its position starts at
    /// the stream's newest entry (at the start of an empty or missing stream).
    pub async fn subscriber(&self, stream: &str, sender: &str) -> Result<Subscriber> {
        let timeout = Duration::from_millis(self.config.block_ms + self.config.connect_timeout_ms);
        let mut conn = Retrying::new(self, self.connection(timeout).await?);
        let cmd = redis::cmd("XREVRANGE").arg(stream).arg("+").arg("-").arg("COUNT").arg(1).clone();
        let newest: redis::streams::StreamRangeReply = conn.query("XREVRANGE", stream, &cmd).await?;
        let last = newest.ids.first().map_or_else(|| "0-0".to_string(), |e| e.id.clone());
        Ok(Subscriber { conn, stream: stream.to_string(), sender: sender.to_string(), last, own: 0, dropped: 0 })
    }

    /// The trajectory ids `stream` holds, by group (acknowledged entries are
    /// deleted, so this is what is still in flight there), and how many
    /// entries do not decode as `T`.
    pub async fn groups_in<T: Entry>(&self, stream: &str) -> Result<(GroupIds, u64)> {
        let mut conn = Retrying::new(self, self.shared.clone());
        let mut groups = std::collections::HashMap::new();
        let mut undecodable = 0;
        let mut after = "-".to_string();
        loop {
            let cmd = redis::cmd("XRANGE").arg(stream).arg(&after).arg("+").arg("COUNT").arg(512).clone();
            let page: redis::streams::StreamRangeReply = conn.query("XRANGE", stream, &cmd).await?;
            let Some(last) = page.ids.last() else { break };
            after = format!("({}", last.id);
            for entry in &page.ids {
                match entry.map.get("p") {
                    Some(Value::BulkString(bytes)) => match T::decode(bytes) {
                        Ok(item) => {
                            groups.entry(item.group()).or_insert_with(std::collections::HashSet::new).insert(item.id());
                        }
                        Err(_) => undecodable += 1,
                    },
                    _ => undecodable += 1,
                }
            }
        }
        Ok((groups, undecodable))
    }

    /// Waiting and in-flight entries of `group` on `stream`.
    pub async fn depth(&self, stream: &str, group: &str) -> Result<QueueDepth> {
        depth(&mut Retrying::new(self, self.shared.clone()), stream, group).await
    }
}

/// A new connection to `client` that reconnects by itself, with responses
/// allowed to take `response_timeout`; `url` (redacted) names it in errors.
async fn manager(client: &redis::Client, c: &Config, url: &str, response_timeout: Duration) -> Result<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(c.connect_timeout_ms)))
        .set_response_timeout(Some(response_timeout))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(c.reconnect_max_delay_ms))
        .set_number_of_retries(2);
    match tokio::time::timeout(Duration::from_millis(c.connect_timeout_ms * 2), client.get_connection_manager_with_config(cfg)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(Error::RedisUnreachable { url: url.to_string(), waited_ms: c.connect_timeout_ms, last: e.to_string() }),
        Err(_) => Err(Error::RedisUnreachable {
            url: url.to_string(),
            waited_ms: c.connect_timeout_ms * 2,
            last: "connection attempt timed out".into(),
        }),
    }
}

async fn depth(conn: &mut Retrying, stream: &str, group: &str) -> Result<QueueDepth> {
    let len: u64 = conn.query("XLEN", stream, redis::cmd("XLEN").arg(stream)).await?;
    let pending: Value = match conn.query("XPENDING", stream, redis::cmd("XPENDING").arg(stream).arg(group)).await {
        Ok(v) => v,
        Err(Error::Redis { source, .. }) if source.code() == Some("NOGROUP") => Value::Nil,
        Err(e) => return Err(e),
    };
    let pending = match pending {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    };
    Ok(QueueDepth { stream: stream.to_string(), waiting: len.saturating_sub(pending), pending })
}

/// Trajectory ids by group id.
pub type GroupIds = std::collections::HashMap<u64, std::collections::HashSet<u64>>;

/// How full a stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDepth {
    pub stream: String,
    /// Entries not yet delivered.
    pub waiting: u64,
    /// Entries delivered but not acknowledged.
    pub pending: u64,
}

/// Adds entries from ARGV[2..] (pairs of id, payload) while the stream is
/// shorter than ARGV[1]; returns how many it added. Atomic, so concurrent
/// producers cannot push the stream past its cap and trim unread entries.
const ADD_BELOW_CAP: &str = r#"
local cap = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
local added = 0
for i = 2, #ARGV, 2 do
  if len >= cap then break end
  redis.call('XADD', KEYS[1], 'MAXLEN', cap, '*', 'id', ARGV[i], 'p', ARGV[i + 1])
  len = len + 1
  added = added + 1
end
return added
"#;

/// A connection whose commands are retried with backoff while Redis is
/// unreachable, restarting or loading.
struct Retrying {
    conn: ConnectionManager,
    url: String,
    retry_for: Duration,
    max_delay: Duration,
}

impl Retrying {
    fn new(redis: &Redis, conn: ConnectionManager) -> Self {
        Self {
            conn,
            url: redis.url.clone(),
            retry_for: Duration::from_millis(redis.config.retry_for_ms),
            max_delay: Duration::from_millis(redis.config.reconnect_max_delay_ms),
        }
    }

    /// Runs `attempt` on the connection until it succeeds, fails for good, or
    /// Redis has been unreachable for `retry_for`.
    async fn retry<R, F>(&mut self, op: &'static str, key: &str, attempt: impl Fn(ConnectionManager) -> F) -> Result<R>
    where
        F: std::future::Future<Output = redis::RedisResult<R>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match attempt(self.conn.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) => self.backoff(start, &mut delay, op, key, &e).await?,
                Err(source) => return Err(Error::Redis { url: self.url.clone(), op, key: key.to_string(), source }),
            }
        }
    }

    async fn query<R: redis::FromRedisValue>(&mut self, op: &'static str, key: &str, cmd: &redis::Cmd) -> Result<R> {
        self.retry(op, key, |mut conn| async move { cmd.query_async::<R>(&mut conn).await }).await
    }

    async fn pipe<R: redis::FromRedisValue>(&mut self, op: &'static str, key: &str, pipe: &redis::Pipeline) -> Result<R> {
        self.retry(op, key, |mut conn| async move { pipe.query_async::<R>(&mut conn).await }).await
    }

    async fn script<R: redis::FromRedisValue>(&mut self, key: &str, inv: &redis::ScriptInvocation<'_>) -> Result<R> {
        self.retry("XADD", key, |mut conn| async move { inv.invoke_async::<R>(&mut conn).await }).await
    }

    async fn backoff(&self, start: Instant, delay: &mut Duration, op: &str, key: &str, e: &RedisError) -> Result<()> {
        if start.elapsed() >= self.retry_for {
            return Err(Error::RedisUnreachable {
                url: self.url.clone(),
                waited_ms: start.elapsed().as_millis() as u64,
                last: e.to_string(),
            });
        }
        tracing::warn!(url = %self.url, op, key, error = %e, retry_in_ms = delay.as_millis() as u64, "redis unavailable, retrying");
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(self.max_delay);
        Ok(())
    }
}

/// Errors after which the same command may succeed later: the connection is
/// down or the server is (re)starting.
fn transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "TRYAGAIN" | "BUSY"))
}

/// Adds entries to one stream, waiting while it is at its cap.
pub struct Producer<T> {
    conn: Retrying,
    stream: String,
    script: redis::Script,
    waits: u64,
    _t: PhantomData<fn(T)>,
}

impl<T: Entry> Producer<T> {
    /// Adds `items` in order; returns once all are in the stream. While the
    /// stream holds `redis.max_len` entries it waits (back-pressure).
    pub async fn send(&mut self, items: &[T], config: &Config) -> Result<()> {
        let encoded: Vec<(u64, Vec<u8>)> = items.iter().map(|t| (t.id(), t.encode())).collect();
        let mut rest = &encoded[..];
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(config.batch)];
            let mut inv = self.script.key(&self.stream);
            inv.arg(config.max_len);
            for (id, payload) in chunk {
                inv.arg(*id).arg(payload.as_slice());
            }
            let added: usize = self.conn.script(&self.stream, &inv).await?;
            rest = &rest[added..];
            if added < chunk.len() {
                self.waits += 1;
                tokio::time::sleep(Duration::from_millis(config.backpressure_poll_ms)).await;
            }
        }
        Ok(())
    }

    /// How many times this producer found the stream full and waited.
    pub fn backpressure_waits(&self) -> u64 {
        self.waits
    }
}

/// Adds entries to a broadcast stream (see [`Subscriber`]), each tagged with
/// its sender; the stream keeps the newest `redis.max_len` entries. Nothing
/// acknowledges a broadcast entry, so there is no back-pressure: a subscriber
/// more than `redis.max_len` entries behind misses the oldest.
pub struct Publisher {
    conn: Retrying,
    stream: String,
    sender: String,
}

impl Publisher {
    /// Adds one entry holding `payload`; returns its entry id.
    pub async fn publish(&mut self, payload: &[u8], config: &Config) -> Result<String> {
        let cmd = redis::cmd("XADD")
            .arg(&self.stream)
            .arg("MAXLEN")
            .arg(config.max_len)
            .arg("*")
            .arg("w")
            .arg(&self.sender)
            .arg("p")
            .arg(payload)
            .clone();
        self.conn.query("XADD", &self.stream, &cmd).await
    }
}

/// An entry of a broadcast stream, from another sender.
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    pub entry: String,
    pub sender: String,
    pub payload: Vec<u8>,
}

/// What one [`Subscriber::recv`] returns.
#[derive(Debug, Default)]
pub struct Broadcasts {
    /// Other senders' entries, in stream order.
    pub items: Vec<Broadcast>,
    /// Entries without a sender (`w`) or a payload (`p`), skipped.
    pub dropped: Vec<Dropped>,
    /// This subscriber's own entries, skipped.
    pub own: u64,
}

/// Reads every entry of a broadcast stream from its own position (plain
/// `XREAD`: every subscriber sees every entry), skipping its own sender's.
pub struct Subscriber {
    conn: Retrying,
    stream: String,
    sender: String,
    /// The id of the last entry read.
    last: String,
    own: u64,
    dropped: u64,
}

impl Subscriber {
    /// Own entries skipped so far.
    pub fn own(&self) -> u64 {
        self.own
    }

    /// Entries without a sender or payload skipped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The entries added after the last one read (up to `redis.batch`),
    /// waiting up to `redis.block_ms` for one. Empty when nothing arrived in
    /// time. Not cancel-safe: entries a cancelled call read are skipped.
    pub async fn recv(&mut self, config: &Config) -> Result<Broadcasts> {
        let cmd = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(config.batch)
            .arg("BLOCK")
            .arg(config.block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(&self.last)
            .clone();
        let reply: Option<StreamReadReply> = self.conn.query("XREAD", &self.stream, &cmd).await?;
        let mut out = Broadcasts::default();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            self.last = entry.id.clone();
            let sender = match entry.map.get("w") {
                Some(Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                _ => None,
            };
            let payload = match entry.map.get("p") {
                Some(Value::BulkString(b)) => Some(b.clone()),
                _ => None,
            };
            match (sender, payload) {
                (Some(s), _) if s == self.sender => out.own += 1,
                (Some(sender), Some(payload)) => out.items.push(Broadcast { entry: entry.id, sender, payload }),
                (sender, _) => {
                    let missing = if sender.is_none() { "sender field `w`" } else { "payload field `p`" };
                    tracing::warn!(stream = %self.stream, entry = %entry.id, missing, "skipping a malformed broadcast entry");
                    out.dropped.push(Dropped { entry: entry.id, reason: format!("entry has no {missing}") });
                }
            }
        }
        self.own += out.own;
        self.dropped += out.dropped.len() as u64;
        Ok(out)
    }
}

/// An entry read from a stream, to be acknowledged once handled.
#[derive(Debug)]
pub struct Delivery<T> {
    /// The stream entry id (acknowledge with it).
    pub entry: String,
    pub item: T,
    /// Taken over from another consumer (it stopped acknowledging or died).
    pub reclaimed: bool,
}

/// An entry that could not be used, acknowledged and dropped with its reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Dropped {
    pub entry: String,
    pub reason: String,
}

/// What one [`Consumer::recv`] returns.
#[derive(Debug)]
pub struct Batch<T> {
    pub items: Vec<Delivery<T>>,
    /// Undecodable entries (already acknowledged).
    pub dropped: Vec<Dropped>,
    /// Entries skipped because their trajectory id was already ingested
    /// (already acknowledged).
    pub duplicates: u64,
}

/// Reads one stream as one named consumer of one group.
pub struct Consumer<T> {
    conn: Retrying,
    stream: String,
    group: String,
    name: String,
    dedup: Option<String>,
    own_pending_checked: bool,
    claim_cursor: String,
    duplicates: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T: Entry> Consumer<T> {
    /// This consumer's name in its group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Duplicates skipped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    async fn ensure_group(&mut self) -> Result<()> {
        // From "0": entries added before the group existed are delivered too.
        let cmd = redis::cmd("XGROUP").arg("CREATE").arg(&self.stream).arg(&self.group).arg("0").arg("MKSTREAM").clone();
        match self.conn.query::<()>("XGROUP CREATE", &self.stream, &cmd).await {
            Ok(()) => Ok(()),
            Err(Error::Redis { source, .. }) if source.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The next entries: first this consumer's own unacknowledged ones (after a
    /// restart with the same name), then entries idle for `redis.claim_idle_ms`
    /// in other consumers, then new ones (waiting up to `redis.block_ms`).
    /// Empty when nothing arrived in time.
    pub async fn recv(&mut self, config: &Config) -> Result<Batch<T>> {
        let mut raw: Vec<(StreamId, bool)> = Vec::new();
        if !self.own_pending_checked {
            let reply = self.read("0", config, None).await?;
            self.own_pending_checked = true;
            raw.extend(reply.into_iter().map(|e| (e, false)));
        }
        if raw.is_empty() {
            let cmd = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.name)
                .arg(config.claim_idle_ms)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(config.batch)
                .clone();
            let reply: StreamAutoClaimReply = self.with_group("XAUTOCLAIM", &cmd).await?;
            self.claim_cursor = reply.next_stream_id;
            if !reply.claimed.is_empty() {
                tracing::info!(stream = %self.stream, consumer = %self.name, count = reply.claimed.len(), "reclaimed idle entries");
            }
            raw.extend(reply.claimed.into_iter().map(|e| (e, true)));
        }
        if raw.is_empty() {
            let reply = self.read(">", config, Some(config.block_ms)).await?;
            raw.extend(reply.into_iter().map(|e| (e, false)));
        }
        self.decode(raw).await
    }

    /// Takes over every entry `dead` read and did not acknowledge (a worker the
    /// learner declared dead), then removes `dead` from the group.
    pub async fn claim_from(&mut self, dead: &str, config: &Config) -> Result<Batch<T>> {
        let cmd = redis::cmd("XPENDING").arg(&self.stream).arg(&self.group).arg("-").arg("+").arg(config.max_len).arg(dead).clone();
        let pending: Vec<(String, String, u64, u64)> = self.with_group("XPENDING", &cmd).await?;
        let mut raw = Vec::new();
        if !pending.is_empty() {
            let mut cmd = redis::cmd("XCLAIM");
            cmd.arg(&self.stream).arg(&self.group).arg(&self.name).arg(0);
            for (id, ..) in &pending {
                cmd.arg(id);
            }
            let reply: StreamClaimReply = self.with_group("XCLAIM", &cmd).await?;
            raw.extend(reply.ids.into_iter().map(|e| (e, true)));
            tracing::info!(stream = %self.stream, consumer = %self.name, dead, count = raw.len(), "took over a dead worker's entries");
        }
        let cmd = redis::cmd("XGROUP").arg("DELCONSUMER").arg(&self.stream).arg(&self.group).arg(dead).clone();
        let _: i64 = self.with_group("XGROUP DELCONSUMER", &cmd).await?;
        self.decode(raw).await
    }

    /// Acknowledges handled entries and deletes them from the stream.
    pub async fn ack(&mut self, entries: &[String]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XACK").arg(&self.stream).arg(&self.group).arg(entries).ignore();
        pipe.cmd("XDEL").arg(&self.stream).arg(entries).ignore();
        self.conn.pipe::<()>("XACK", &self.stream, &pipe).await
    }

    async fn read(&mut self, from: &str, config: &Config, block: Option<u64>) -> Result<Vec<StreamId>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.group).arg(&self.name).arg("COUNT").arg(config.batch);
        if let Some(ms) = block {
            cmd.arg("BLOCK").arg(ms);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        let reply: Option<StreamReadReply> = self.with_group("XREADGROUP", &cmd).await?;
        Ok(reply.map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect()).unwrap_or_default())
    }

    /// Runs a group command, recreating the group if Redis lost it (a restart
    /// without persistence).
    async fn with_group<R: redis::FromRedisValue>(&mut self, op: &'static str, cmd: &redis::Cmd) -> Result<R> {
        match self.conn.query(op, &self.stream, cmd).await {
            // NOGROUP: the group is gone; UNBLOCKED: the stream was deleted
            // while this read waited on it (a fresh learner clears its run).
            Err(Error::Redis { source, .. }) if matches!(source.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                tracing::warn!(stream = %self.stream, group = %self.group, error = %source, "consumer group or stream missing (redis restarted without persistence, or the run was reset): recreating it");
                self.ensure_group().await?;
                self.own_pending_checked = true;
                self.conn.query(op, &self.stream, cmd).await
            }
            other => other,
        }
    }

    async fn decode(&mut self, raw: Vec<(StreamId, bool)>) -> Result<Batch<T>> {
        let mut items = Vec::with_capacity(raw.len());
        let mut dropped = Vec::new();
        for (entry, reclaimed) in raw {
            match entry.map.get("p") {
                Some(Value::BulkString(bytes)) => match T::decode(bytes) {
                    Ok(item) => items.push(Delivery { entry: entry.id, item, reclaimed }),
                    Err(e) => dropped.push(Dropped { entry: entry.id, reason: e.to_string() }),
                },
                // An entry deleted after delivery shows up without fields.
                _ => dropped.push(Dropped { entry: entry.id, reason: "entry has no payload field `p`".into() }),
            }
        }
        for d in &dropped {
            tracing::warn!(stream = %self.stream, entry = %d.entry, reason = %d.reason, "dropping undecodable entry");
        }
        let mut to_ack: Vec<String> = dropped.iter().map(|d| d.entry.clone()).collect();
        let mut duplicates = 0;
        if let Some(set) = self.dedup.clone() {
            if !items.is_empty() {
                let mut pipe = redis::pipe();
                for d in &items {
                    // A bitmap keeps a run's ids in one bit each (SETBIT answers
                    // the bit's old value); ids past a bitmap's 2^32 bits go to a set.
                    match d.item.id() {
                        id if id < 1 << 32 => pipe.cmd("SETBIT").arg(&set).arg(id).arg(1),
                        id => pipe.cmd("SADD").arg(format!("{set}:large")).arg(id),
                    };
                }
                let answers: Vec<i64> = self.conn.pipe("SETBIT", &set, &pipe).await?;
                let mut kept = Vec::with_capacity(items.len());
                for (d, answer) in items.into_iter().zip(answers) {
                    let fresh = if d.item.id() < 1 << 32 { answer == 0 } else { answer == 1 };
                    if fresh {
                        kept.push(d);
                    } else {
                        tracing::info!(stream = %self.stream, trajectory_id = d.item.id(), "skipping a trajectory already ingested");
                        duplicates += 1;
                        to_ack.push(d.entry);
                    }
                }
                items = kept;
            }
        }
        self.duplicates += duplicates;
        self.ack(&to_ack).await?;
        Ok(Batch { items, dropped, duplicates })
    }
}

#[cfg(test)]
mod tests;
