//! prism-transport: everything that crosses a process boundary.
//!
//! ```text
//!                         gRPC (tonic, optional TLS, bearer token)
//!        ┌──────────── Control: Register / Heartbeat / GetStatus / Shutdown / NCCL id ───────────┐
//!        │             Weights: GetLatestVersion / Fetch (chunked, CRC-32, version-tagged)       │
//!        ▼                                                                                        │
//!   rollout ×N ──XADD──▶ <prefix>:<run>:sampled ──XREADGROUP "reward"──▶ reward ×M            learner
//!                                                                         │                       ▲
//!                         <prefix>:<run>:labeled ◀──────────XADD──────────┘                       │
//!                                 └──────────────XREADGROUP "learner", dedup by trajectory id─────┘
//! ```
//!
//! - [`redis`]: the data plane, Redis Streams with consumer groups, XAUTOCLAIM,
//!   back-pressure at a MAXLEN cap, idempotent ingestion, reconnect with backoff;
//!   [`assembly`] puts labelled trajectories back into whole groups.
//! - [`control`], [`weights`]: the learner's gRPC services and their clients.
//! - [`grpc`]: endpoints, TLS and the bearer token shared by both services.
//! - [`nccl`]: NCCL collectives on GPUs (cudarc, loaded at run time);
//!   [`nccl_weights`] broadcasts policy weights over them.
//! - [`health`]: the HTTP liveness/readiness endpoints every role serves.
//! - [`judged`]: the judged stream's payload (judged steps every reward
//!   process's distilled model learns from).
//! - The config sections `[redis]` ([`redis::Config`]), `[grpc]`
//!   ([`grpc::Config`]) and `[dist]` ([`Config`]), and the [`Error`] of all of them.
//!
//! Owns the wire: the generated protobuf types (`prism-proto`) are used here
//! and nowhere else is meant to need them. Knows no actors and no stage: what
//! a role does with a batch, a step or a weight set is `prism-actors`' business
//! (its `remote` roles are the users of this crate).

pub mod assembly;
pub mod control;
pub mod grpc;
pub mod health;
pub mod judged;
pub mod nccl;
pub mod nccl_weights;
pub mod metrics;
pub mod redis;
pub mod weights;

/// The attribute async trait impls of this crate's traits use (e.g.
/// [`control::WorkSource`]), so their users need no tonic of their own.
pub use tonic::async_trait;

use prism_core::config::{Invalid, check};
use serde::{Deserialize, Serialize};

/// What can go wrong in the distributed transports. Every message names the
/// peer, stream, tensor or rank involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis {url}: {op} on `{key}` failed: {source}")]
    Redis { url: String, op: &'static str, key: String, source: ::redis::RedisError },
    #[error("redis {url}: unreachable for {waited_ms} ms (last error: {last})")]
    RedisUnreachable { url: String, waited_ms: u64, last: String },
    #[error("stream {stream}: entry {entry}: {reason}")]
    BadEntry { stream: String, entry: String, reason: String },
    #[error("learner at {addr} did not answer within {timeout_ms} ms: {reason}")]
    Connect { addr: String, timeout_ms: u64, reason: String },
    /// The peer is up but cannot answer this yet (the learner is not
    /// handing out prompts yet, an NCCL id is not published within the
    /// wait): ask again later.
    #[error("{addr}: {rpc}: not ready: {reason}")]
    NotReady { addr: String, rpc: &'static str, reason: String },
    /// What the request is about no longer exists for the caller: a worker
    /// the learner forgot or declared dead (register again), a step or a
    /// weight version that has been replaced.
    #[error("{addr}: {rpc}: gone: {reason}")]
    Gone { addr: String, rpc: &'static str, reason: String },
    /// The peer refused the request: a missing or wrong credential, an
    /// invalid argument, a rank that is taken, a message over a limit.
    /// Asking again will not help.
    #[error("{addr}: {rpc} refused: {reason}")]
    Refused { addr: String, rpc: &'static str, reason: String },
    /// The request got no answer: the connection was lost, the deadline
    /// passed, or the peer went away during the call.
    #[error("{addr}: {rpc} failed: {reason}")]
    Unreachable { addr: String, rpc: &'static str, reason: String },
    #[error("grpc: {0}")]
    Tls(String),
    #[error("secret {source_name}: {reason}")]
    Secret { source_name: String, reason: String },
    #[error("weights v{version}: {reason}")]
    Weights { version: u64, reason: String },
    #[error("weights v{version}: tensor {name}: chunk at byte {offset} has CRC-32 {got:#010x}, expected {want:#010x}")]
    Checksum { version: u64, name: String, offset: u64, got: u32, want: u32 },
    #[error("weights v{version}: tensor {name}: {reason}")]
    Tensor { version: u64, name: String, reason: String },
    #[error("NCCL unavailable: {0}")]
    NcclUnavailable(String),
    #[error("NCCL rank {rank}/{world}: {op} failed: {reason}")]
    Nccl { rank: usize, world: usize, op: String, reason: String },
    #[error("NCCL rank {rank}/{world}: {op} did not complete within {timeout_ms} ms")]
    NcclTimeout { rank: usize, world: usize, op: String, timeout_ms: u64 },
    #[error("{what} at {addr}: {reason}")]
    Serve { what: &'static str, addr: String, reason: String },
    #[error(transparent)]
    Convert(#[from] prism_proto::ConvertError),
    #[error("data-parallel learner rank {rank}: {reason}")]
    LearnerRank { rank: usize, reason: String },
    /// A collective between ranks (or a learner rank's training) failed.
    #[error(transparent)]
    Learner(#[from] prism_learner::Error),
}

impl Error {
    /// Whether the same request may succeed if made again: the learner is
    /// restarting, unreachable, not ready yet, or forgot this worker (which
    /// then registers again).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::NotReady { .. } | Self::Gone { .. } | Self::Unreachable { .. } | Self::Connect { .. })
    }
}

/// Result alias of the distributed transports.
pub type Result<T, E = Error> = std::result::Result<T, E>;

prism_core::string_enum! {
    /// How weights reach rollout processes: over the gRPC Weights stream, or
    /// broadcast over NCCL (GPUs).
    pub enum WeightTransport { Grpc = "grpc", Nccl = "nccl" }
}

prism_core::string_enum! {
    /// What data-parallel learner ranks shard (ZeRO stages): nothing, the
    /// optimizer state (stage 1), or also the gradients (stage 2).
    pub enum Shard { None = "none", Optimizer = "optimizer", Gradients = "gradients" }
}

/// `[dist]`: how the processes of a distributed run find and watch each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names this run's streams and consumer groups; processes with the same
    /// `run_id` and Redis form one run. Default `prism`.
    pub run_id: String,
    /// How often workers heartbeat the learner, in ms. Default 1000.
    pub heartbeat_ms: u64,
    /// A worker silent for longer than this is marked dead and its entries
    /// reclaimed, in ms. Default 10000.
    pub dead_after_ms: u64,
    /// Address of the HTTP liveness (`/livez`) and readiness (`/readyz`)
    /// endpoints every role serves; empty = none. Default `0.0.0.0:8081`.
    pub health_listen: String,
    /// `/livez` answers 503 once a ready role's loop has made no progress
    /// (a step, a batch, an answer) for this long, in ms; 0 = never. Default
    /// 900000.
    pub stuck_after_ms: u64,
    /// How weights reach rollout processes: `grpc` or `nccl` (GPUs). Default `grpc`.
    pub weights: WeightTransport,
    /// Every NCCL collective (and communicator setup) fails after this many ms
    /// instead of hanging. Default 120000.
    pub nccl_timeout_ms: u64,
    /// NCCL broadcast / all-reduce bucket size in MiB. Default 64.
    pub nccl_bucket_mb: u64,
    /// With `weights = "nccl"`: how many rollout processes join the learner's
    /// broadcast (ranks 1..=n, to the first n that register; later ones pull
    /// over the Weights stream). The learner waits for all of them. Default 1.
    pub nccl_rollouts: u64,
    /// Data-parallel learner ranks (GPUs, NCCL): `prism learner` is rank 0,
    /// and `learner_ranks - 1` processes of `prism learner-rank` join it;
    /// each step's rows are shared out among them and their gradients
    /// all-reduced. Default 1 (one learner).
    pub learner_ranks: u64,
    /// With `learner_ranks > 1`: what the ranks shard. `none`: each holds
    /// the whole optimizer state (AdamW moments, 8 bytes a parameter);
    /// `optimizer`: each keeps its 1/N share of it, updates its share of the
    /// weights and all-gathers them (ZeRO-1); `gradients`: the gradients are
    /// also reduce-scattered to the shares (ZeRO-2). Checkpoints then hold
    /// one optimizer file per rank and resume with any number of ranks.
    /// Default `none`.
    pub shard: Shard,
    /// A group whose trajectories were delivered this long ago and that is
    /// still not fully labeled (a member lost, or undecodable: e.g. written
    /// by another version of prism) is dropped as `incomplete`, and its
    /// credit returns, in ms; 0 = wait forever. Default 600000.
    pub group_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            run_id: "prism".into(),
            heartbeat_ms: 1000,
            dead_after_ms: 10_000,
            health_listen: "0.0.0.0:8081".into(),
            stuck_after_ms: 900_000,
            weights: WeightTransport::Grpc,
            nccl_timeout_ms: 120_000,
            nccl_bucket_mb: 64,
            nccl_rollouts: 1,
            learner_ranks: 1,
            shard: Shard::None,
            group_timeout_ms: 600_000,
        }
    }
}

impl Config {
    /// Checks values that parse but are not acceptable.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.run_id.is_empty() || !self.run_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(Invalid::new("dist.run_id", &self.run_id, "must be non-empty letters, digits, '-', '_' or '.'"));
        }
        check::positive("dist.heartbeat_ms", self.heartbeat_ms)?;
        if self.dead_after_ms < 2 * self.heartbeat_ms {
            return Err(Invalid::new(
                "dist.dead_after_ms",
                self.dead_after_ms,
                format!("must be at least twice dist.heartbeat_ms ({})", self.heartbeat_ms),
            ));
        }
        if !self.health_listen.is_empty() && self.health_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Invalid::new("dist.health_listen", &self.health_listen, "must be host:port (IP address) or empty"));
        }
        check::positive("dist.nccl_timeout_ms", self.nccl_timeout_ms)?;
        check::positive("dist.nccl_bucket_mb", self.nccl_bucket_mb)?;
        if self.weights == WeightTransport::Nccl {
            check::positive("dist.nccl_rollouts", self.nccl_rollouts)?;
        }
        check::positive("dist.learner_ranks", self.learner_ranks)?;
        if self.shard != Shard::None && self.learner_ranks < 2 {
            return Err(Invalid::new(
                "dist.shard",
                self.shard.as_str(),
                format!("shards the optimizer over data-parallel learner ranks: needs dist.learner_ranks > 1 (it is {})", self.learner_ranks),
            ));
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Test servers and fixtures (a private redis-server, a learner's gRPC
/// services on loopback, trajectories): for tests of this crate and of its
/// users, behind the `testing` feature.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
