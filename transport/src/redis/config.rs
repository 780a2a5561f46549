//! `[redis]`, the keys of a run, and the helpers that need no connection.

use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};

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
    /// File holding the Redis password (e.g. a mounted Kubernetes Secret);
    /// wins over `password_env` and `url`. Empty = none. Default empty.
    pub password_file: String,
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
            password_file: String::new(),
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

/// PINGs the Redis at `url` (blocking, each step bounded by `timeout`) and
/// returns its version, for `prism doctor`.
pub fn ping(url: &str, timeout: std::time::Duration) -> std::result::Result<String, String> {
    let client = ::redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut con = client.get_connection_with_timeout(timeout).map_err(|e| e.to_string())?;
    con.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let pong: String = ::redis::cmd("PING").query(&mut con).map_err(|e| e.to_string())?;
    if pong != "PONG" {
        return Err(format!("PING answered {pong:?}"));
    }
    let info: String = ::redis::cmd("INFO").arg("server").query(&mut con).map_err(|e| e.to_string())?;
    Ok(info.lines().find_map(|l| l.strip_prefix("redis_version:")).unwrap_or("unknown version").trim().to_string())
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
    /// Every group id the run's learners handed out is below this number (a
    /// reservation the learner raises ahead of its prompt source), so that a
    /// resumed learner numbers its groups past everything an earlier one
    /// issued: what that one left in flight can never pass for a group of
    /// the resumed run, nor a resumed group be skipped as already ingested.
    pub issued: String,
}

impl RunKeys {
    /// The keys of run `run_id` under `prefix`.
    pub fn new(prefix: &str, run_id: &str) -> Self {
        Self {
            sampled: format!("{prefix}:{run_id}:sampled"),
            labeled: format!("{prefix}:{run_id}:labeled"),
            ingested: format!("{prefix}:{run_id}:ingested"),
            judged: format!("{prefix}:{run_id}:judged"),
            issued: format!("{prefix}:{run_id}:issued"),
        }
    }
}

/// Consumer group of the sampled stream.
pub const REWARD_GROUP: &str = "reward";
/// Consumer group of the labeled stream.
pub const LEARNER_GROUP: &str = "learner";
