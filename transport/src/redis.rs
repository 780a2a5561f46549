//! The data plane: Redis Streams with consumer groups.
//!
//! Per run, two streams: `<prefix>:<run>:sampled` (rollout → reward, group
//! `reward`) and `<prefix>:<run>:labeled` (reward → learner, group `learner`).
//! An entry holds the trajectory id (`id`), the protobuf message (`p`) and,
//! when the run has a token, the HMAC tag that seals them ([`seal`], `m`).
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
//!
//! - [`config`]: `[redis]`, the keys of a run, the consumer groups;
//! - [`connection`]: [`Redis`], the connection that makes the rest and
//!   retries commands;
//! - [`entry`]: what travels as an entry ([`Entry`]);
//! - [`queue`]: [`Producer`] and [`Consumer`], the sampled and labeled streams;
//! - [`broadcast`]: [`Publisher`] and [`Subscriber`], the judged stream;
//! - [`seal`]: [`Seal`], the HMAC that authenticates entries.

pub mod broadcast;
pub mod config;
pub mod connection;
pub mod entry;
pub mod queue;
pub mod seal;

pub use broadcast::{Broadcast, Broadcasts, Publisher, Subscriber};
pub use config::{Config, LEARNER_GROUP, REWARD_GROUP, RunKeys, ping, redact_url};
pub use connection::{GroupIds, QueueDepth, Redis};
pub use entry::Entry;
pub use queue::{Batch, Consumer, Delivery, Dropped, Producer};
pub use seal::Seal;

#[cfg(test)]
use {crate::Error, prism_core::{LabeledTrajectory, Trajectory}, std::time::Duration};

#[cfg(test)]
mod tests;
