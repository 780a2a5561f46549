//! The connection to a run's Redis: makes producers, consumers, publishers
//! and subscribers, and retries commands with backoff while the server is
//! unreachable, restarting or loading.

use super::config::{Config, RunKeys, redact_url};
use super::broadcast::{Publisher, Subscriber};
use super::entry::Entry;
use super::queue::{Consumer, Producer};
use super::seal::Seal;
use crate::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use std::time::{Duration, Instant};

/// A connection to the run's Redis: makes producers and consumers.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    config: Config,
    url: String,
    /// The connection `connect` checked the server with, kept for short
    /// requests (queue depths, clearing a run); clones share it.
    shared: ConnectionManager,
    /// Seals what its producers and publishers add, and checks what its
    /// consumers and subscribers read ([`Redis::sealed`]).
    seal: Option<Seal>,
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
        let from_file = match config.password_file.as_str() {
            "" => None,
            file => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| setup(format!("redis.password_file {file}: {e}")))?
                    .trim()
                    .to_string(),
            ),
        };
        if let Some(password) = from_file.or_else(|| std::env::var(&config.password_env).ok()).filter(|p| !p.is_empty()) {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        } else if info.redis_settings().password() == Some("***") {
            // What a run folder's config.toml records in place of a password.
            return Err(setup(format!(
                "the URL's password is the redacted `***` (a run folder's config.toml never holds secrets): give the \
                 password in the environment variable {} (redis.password_env), or the whole URL with --set redis.url=…",
                config.password_env
            )));
        }
        if config.url.starts_with("rediss://") {
            crate::grpc::crypto_provider();
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
            Ok(Ok(_)) => Ok(Self { client, config: config.clone(), url, shared: conn, seal: None }),
            Ok(Err(e)) => Err(Error::RedisUnreachable { url, waited_ms: 0, last: e.to_string() }),
            Err(_) => Err(Error::RedisUnreachable { url, waited_ms: config.connect_timeout_ms, last: "no answer to PING".into() }),
        }
    }

    /// Seals entries with `seal` (the run's token; `None`: entries are
    /// neither sealed nor checked).
    pub fn sealed(mut self, seal: Option<Seal>) -> Self {
        self.seal = seal;
        self
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
    pub(super) async fn connection(&self, response_timeout: Duration) -> Result<ConnectionManager> {
        manager(&self.client, &self.config, &self.url, response_timeout).await
    }

    /// A producer adding to `stream`.
    pub async fn producer<T: Entry>(&self, stream: &str) -> Result<Producer<T>> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        Ok(Producer::new(Retrying::new(self, self.connection(timeout).await?), stream, self.seal.clone()))
    }

    /// A consumer named `consumer` in `group` of `stream` (group created if
    /// missing). `dedup`: a set of ids already ingested; entries whose id is in
    /// it are acknowledged and skipped.
    pub async fn consumer<T: Entry>(&self, stream: &str, group: &str, consumer: &str, dedup: Option<&str>) -> Result<Consumer<T>> {
        let timeout = Duration::from_millis(self.config.block_ms + self.config.connect_timeout_ms);
        let conn = Retrying::new(self, self.connection(timeout).await?);
        Consumer::new(conn, stream, group, consumer, dedup, self.seal.clone()).await
    }

    /// Deletes run `keys`' streams (with their consumer groups), the set of
    /// ingested ids and the group-id reservation: a fresh run starts from nothing.
    pub async fn reset_run(&self, keys: &RunKeys) -> Result<()> {
        let mut conn = Retrying::new(self, self.shared.clone());
        let large = format!("{}:large", keys.ingested);
        let cmd = redis::cmd("DEL")
            .arg(&keys.sampled)
            .arg(&keys.labeled)
            .arg(&keys.ingested)
            .arg(&large)
            .arg(&keys.judged)
            .arg(&keys.issued)
            .clone();
        let deleted: u64 = conn.query("DEL", &keys.sampled, &cmd).await?;
        if deleted > 0 {
            tracing::info!(sampled = %keys.sampled, labeled = %keys.labeled, deleted, "cleared what an earlier run left in redis");
        }
        Ok(())
    }

    /// Deletes run `keys`' sampled and labeled streams (their consumer groups
    /// too; consumers recreate them) and returns how many entries each held.
    /// A resumed learner starts from its checkpoint: what its crashed
    /// predecessor left in flight was sampled for groups it no longer knows,
    /// some by weights it never had. The ingested ids and the group-id
    /// reservation are kept.
    pub async fn clear_streams(&self, keys: &RunKeys) -> Result<(u64, u64)> {
        let mut conn = Retrying::new(self, self.shared.clone());
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("XLEN").arg(&keys.sampled).cmd("XLEN").arg(&keys.labeled);
        pipe.cmd("DEL").arg(&keys.sampled).arg(&keys.labeled).ignore();
        conn.pipe("DEL", &keys.sampled, &pipe).await
    }

    /// The run's group-id reservation: every group id its learners handed out
    /// is below it (0 for a new run).
    pub async fn issued_below(&self, keys: &RunKeys) -> Result<u64> {
        let mut conn = Retrying::new(self, self.shared.clone());
        let value: Option<String> = conn.query("GET", &keys.issued, redis::cmd("GET").arg(&keys.issued)).await?;
        match value {
            None => Ok(0),
            Some(v) => v.parse().map_err(|_| Error::BadEntry {
                stream: keys.issued.clone(),
                entry: "GET".into(),
                reason: format!("the group-id reservation {v:?} is not a number"),
            }),
        }
    }

    /// Raises the group-id reservation to `below` (never lowers it).
    pub async fn reserve_issued(&self, keys: &RunKeys, below: u64) -> Result<()> {
        const RAISE: &str = r#"
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > now then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"#;
        let mut conn = Retrying::new(self, self.shared.clone());
        let script = redis::Script::new(RAISE);
        let mut inv = script.key(&keys.issued);
        inv.arg(below);
        conn.script::<i64>("SET", &keys.issued, &inv).await.map(|_| ())
    }

    /// A publisher adding to the broadcast `stream` as `sender`.
    pub async fn publisher(&self, stream: &str, sender: &str) -> Result<Publisher> {
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        Ok(Publisher::new(Retrying::new(self, self.connection(timeout).await?), stream, sender, self.seal.clone()))
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
        Ok(Subscriber::new(conn, stream, sender, last, self.seal.clone()))
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
                if !super::queue::sealed_well(self.seal.as_ref(), stream, entry) {
                    undecodable += 1;
                    continue;
                }
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

    /// The consumers of `group` on `stream`, with how many entries each holds
    /// unacknowledged (none when the group does not exist).
    pub async fn consumers(&self, stream: &str, group: &str) -> Result<Vec<(String, u64)>> {
        let mut conn = Retrying::new(self, self.shared.clone());
        let cmd = redis::cmd("XINFO").arg("CONSUMERS").arg(stream).arg(group).clone();
        match conn.query::<redis::streams::StreamInfoConsumersReply>("XINFO CONSUMERS", stream, &cmd).await {
            Ok(info) => Ok(info.consumers.into_iter().map(|c| (c.name, c.pending as u64)).collect()),
            Err(Error::Redis { source, .. }) if source.code() == Some("NOGROUP") => Ok(Vec::new()),
            Err(e) => Err(e),
        }
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

/// A connection whose commands are retried with backoff while Redis is
/// unreachable, restarting or loading.
pub(super) struct Retrying {
    conn: ConnectionManager,
    url: String,
    retry_for: Duration,
    max_delay: Duration,
    /// Commands that failed transiently and were retried, so far: a reply
    /// may have been lost with the connection (see `Consumer::recv`).
    pub(super) retried: u64,
}

impl Retrying {
    pub(super) fn new(redis: &Redis, conn: ConnectionManager) -> Self {
        Self {
            conn,
            url: redis.url.clone(),
            retry_for: Duration::from_millis(redis.config.retry_for_ms),
            max_delay: Duration::from_millis(redis.config.reconnect_max_delay_ms),
            retried: 0,
        }
    }

    /// Runs `attempt` on the connection until it succeeds, fails for good, or
    /// Redis has been unreachable for `retry_for`.
    pub(super) async fn retry<R, F>(&mut self, op: &'static str, key: &str, attempt: impl Fn(ConnectionManager) -> F) -> Result<R>
    where
        F: std::future::Future<Output = redis::RedisResult<R>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match attempt(self.conn.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) => {
                    self.retried += 1;
                    self.backoff(start, &mut delay, op, key, &e).await?
                }
                Err(source) => return Err(Error::Redis { url: self.url.clone(), op, key: key.to_string(), source }),
            }
        }
    }

    pub(super) async fn query<R: redis::FromRedisValue>(&mut self, op: &'static str, key: &str, cmd: &redis::Cmd) -> Result<R> {
        self.retry(op, key, |mut conn| async move { cmd.query_async::<R>(&mut conn).await }).await
    }

    pub(super) async fn pipe<R: redis::FromRedisValue>(&mut self, op: &'static str, key: &str, pipe: &redis::Pipeline) -> Result<R> {
        self.retry(op, key, |mut conn| async move { pipe.query_async::<R>(&mut conn).await }).await
    }

    pub(super) async fn script<R: redis::FromRedisValue>(
        &mut self,
        op: &'static str,
        key: &str,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<R> {
        self.retry(op, key, |mut conn| async move { inv.invoke_async::<R>(&mut conn).await }).await
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
