//! Broadcast streams: every [`Subscriber`] reads every entry a [`Publisher`]
//! adds, from its own position (no consumer group, nothing acknowledged).

use super::config::Config;
use super::connection::Retrying;
use super::queue::Dropped;
use super::seal::Seal;
use crate::Result;
use redis::Value;
use redis::streams::StreamReadReply;

/// Adds entries to a broadcast stream (see [`Subscriber`]), each tagged with
/// its sender; the stream keeps the newest `redis.max_len` entries. Nothing
/// acknowledges a broadcast entry, so there is no back-pressure: a subscriber
/// more than `redis.max_len` entries behind misses the oldest.
pub struct Publisher {
    conn: Retrying,
    stream: String,
    sender: String,
    seal: Option<Seal>,
}

impl Publisher {
    pub(super) fn new(conn: Retrying, stream: &str, sender: &str, seal: Option<Seal>) -> Self {
        Self { conn, stream: stream.to_string(), sender: sender.to_string(), seal }
    }

    /// Adds one entry holding `payload` (sealed, with a seal: the tag covers
    /// the sender too); returns its entry id.
    pub async fn publish(&mut self, payload: &[u8], config: &Config) -> Result<String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream).arg("MAXLEN").arg(config.max_len).arg("*").arg("w").arg(&self.sender).arg("p").arg(payload);
        if let Some(seal) = &self.seal {
            cmd.arg("m").arg(seal.tag(&self.stream, self.sender.as_bytes(), payload).as_slice());
        }
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
    /// Entries without a sender (`w`) or a payload (`p`), or not sealed
    /// with the run's token, skipped.
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
    seal: Option<Seal>,
}

impl Subscriber {
    /// Reads `stream` for `sender` from after entry `last`.
    pub(super) fn new(conn: Retrying, stream: &str, sender: &str, last: String, seal: Option<Seal>) -> Self {
        Self { conn, stream: stream.to_string(), sender: sender.to_string(), last, own: 0, dropped: 0, seal }
    }

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
            let tag = match entry.map.get("m") {
                Some(Value::BulkString(tag)) => Some(tag.as_slice()),
                _ => None,
            };
            let sealed = |sender: &str, payload: &[u8]| super::seal::admits(self.seal.as_ref(), &self.stream, sender.as_bytes(), payload, tag);
            match (sender, payload) {
                (Some(s), _) if s == self.sender => out.own += 1,
                (Some(sender), Some(payload)) if !sealed(&sender, &payload) => {
                    tracing::warn!(stream = %self.stream, entry = %entry.id, %sender, "skipping a broadcast entry not sealed with the run's token");
                    out.dropped.push(Dropped { entry: entry.id, reason: "not sealed with the run's token".into() });
                }
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
