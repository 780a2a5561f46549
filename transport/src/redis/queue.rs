//! The queues: a [`Producer`] adds to a stream under its cap (back-pressure),
//! a [`Consumer`] reads it as one member of a consumer group, takes over idle
//! and dead members' entries, drops undecodable ones and skips trajectories
//! already ingested.

use super::config::Config;
use super::connection::Retrying;
use super::entry::Entry;
use super::seal::Seal;
use crate::{Error, Result};
use redis::Value;
use redis::streams::{StreamAutoClaimReply, StreamClaimReply, StreamId, StreamReadReply};
use std::marker::PhantomData;
use std::time::Duration;

/// Adds entries from ARGV[2..] (triples of id, payload, tag) while the
/// stream is shorter than ARGV[1]; returns how many it added. Atomic, so
/// concurrent producers cannot push the stream past its cap and trim unread
/// entries. An empty tag (no seal) adds no `m` field.
const ADD_BELOW_CAP: &str = r#"
local cap = tonumber(ARGV[1])
local len = redis.call('XLEN', KEYS[1])
local added = 0
for i = 2, #ARGV, 3 do
  if len >= cap then break end
  if ARGV[i + 2] == '' then
    redis.call('XADD', KEYS[1], 'MAXLEN', cap, '*', 'id', ARGV[i], 'p', ARGV[i + 1])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', cap, '*', 'id', ARGV[i], 'p', ARGV[i + 1], 'm', ARGV[i + 2])
  end
  len = len + 1
  added = added + 1
end
return added
"#;

/// Whether `entry` of `stream` carries the right tag under `seal` (always,
/// without a seal).
pub(super) fn sealed_well(seal: Option<&Seal>, stream: &str, entry: &StreamId) -> bool {
    let field = |name: &str| match entry.map.get(name) {
        Some(Value::BulkString(b)) => Some(b.as_slice()),
        _ => None,
    };
    match (field("id"), field("p")) {
        (Some(id), Some(p)) => super::seal::admits(seal, stream, id, p, field("m")),
        _ => seal.is_none(),
    }
}

/// Adds entries to one stream, waiting while it is at its cap.
pub struct Producer<T> {
    conn: Retrying,
    stream: String,
    seal: Option<Seal>,
    script: redis::Script,
    waits: u64,
    _t: PhantomData<fn(T)>,
}

impl<T: Entry> Producer<T> {
    pub(super) fn new(conn: Retrying, stream: &str, seal: Option<Seal>) -> Self {
        Self { conn, stream: stream.to_string(), seal, script: redis::Script::new(ADD_BELOW_CAP), waits: 0, _t: PhantomData }
    }

    /// Adds `items` in order; returns once all are in the stream. While the
    /// stream holds `redis.max_len` entries it waits (back-pressure).
    pub async fn send(&mut self, items: &[T], config: &Config) -> Result<()> {
        let encoded: Vec<(String, Vec<u8>, Vec<u8>)> = items
            .iter()
            .map(|t| {
                let (id, payload) = (t.id().to_string(), t.encode());
                let tag = self.seal.as_ref().map_or_else(Vec::new, |s| s.tag(&self.stream, id.as_bytes(), &payload));
                (id, payload, tag)
            })
            .collect();
        let mut rest = &encoded[..];
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(config.batch)];
            let mut inv = self.script.key(&self.stream);
            inv.arg(config.max_len);
            for (id, payload, tag) in chunk {
                inv.arg(id).arg(payload.as_slice()).arg(tag.as_slice());
            }
            let added: usize = self.conn.script("XADD", &self.stream, &inv).await?;
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

/// Resets the idle time of the entries in ARGV[3..] that are still pending
/// in consumer ARGV[2] of group ARGV[1] (an entry another consumer took over
/// stays theirs); returns how many it refreshed.
const KEEP_OWN: &str = r#"
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"#;

/// Reads one stream as one named consumer of one group.
pub struct Consumer<T> {
    conn: Retrying,
    stream: String,
    group: String,
    name: String,
    dedup: Option<String>,
    /// Takes over entries idle in any consumer (see [`Consumer::recv`]).
    reclaim_idle: bool,
    seal: Option<Seal>,
    keep_own: redis::Script,
    own_pending_checked: bool,
    /// Entries this consumer was handed and has not acknowledged.
    held: std::collections::HashSet<String>,
    /// A read was retried after a transient failure: Redis may have handed
    /// it entries whose reply was lost, which only a read of this consumer's
    /// own pending entries finds (see [`Consumer::recv`]).
    recheck_own: bool,
    claim_cursor: String,
    duplicates: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T: Entry> Consumer<T> {
    /// Joins `group` of `stream` (creating it if missing) as `name`.
    pub(super) async fn new(
        conn: Retrying,
        stream: &str,
        group: &str,
        name: &str,
        dedup: Option<&str>,
        seal: Option<Seal>,
    ) -> Result<Self> {
        let mut c = Self {
            conn,
            stream: stream.to_string(),
            group: group.to_string(),
            name: name.to_string(),
            dedup: dedup.map(str::to_string),
            reclaim_idle: true,
            seal,
            keep_own: redis::Script::new(KEEP_OWN),
            own_pending_checked: false,
            held: Default::default(),
            recheck_own: false,
            claim_cursor: "0-0".into(),
            duplicates: 0,
            _t: PhantomData,
        };
        c.ensure_group().await?;
        Ok(c)
    }

    /// This consumer's name in its group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Duplicates skipped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Never takes over idle entries: for the only live consumer of its group
    /// (the learner), where every idle entry is one it holds itself, waiting
    /// in memory for the rest of its group or its step.
    pub fn without_reclaim(mut self) -> Self {
        self.reclaim_idle = false;
        self
    }

    /// Resets the idle time of `entries` this consumer still holds, so that
    /// no other consumer takes them over while it is working on them (call it
    /// well within every `redis.claim_idle_ms`). Returns how many it still
    /// held: the others were taken over (this consumer was too slow, or was
    /// declared dead) and their results will be skipped as duplicates.
    pub async fn keep(&mut self, entries: &[String]) -> Result<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut inv = self.keep_own.key(&self.stream);
        inv.arg(&self.group).arg(&self.name);
        for e in entries {
            inv.arg(e);
        }
        let kept: usize = self.conn.script("XCLAIM", &self.stream, &inv).await?;
        if kept < entries.len() {
            tracing::warn!(
                stream = %self.stream, consumer = %self.name, lost = entries.len() - kept,
                "entries in hand were taken over by another consumer"
            );
        }
        Ok(kept)
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
    /// in other consumers (unless [`Consumer::without_reclaim`]), then new
    /// ones (waiting up to `redis.block_ms`). Empty when nothing arrived in time.
    ///
    /// After a read that was retried (the connection dropped, Redis
    /// restarted), this consumer's own pending entries are read again and
    /// those it was never handed are delivered: Redis may have handed them
    /// over with a reply that was lost, and a consumer that takes nothing
    /// back from idle (the learner) would otherwise never see them.
    pub async fn recv(&mut self, config: &Config) -> Result<Batch<T>> {
        let mut raw: Vec<(StreamId, bool)> = Vec::new();
        if self.recheck_own && self.own_pending_checked {
            self.recheck_own = false;
            let lost = self.own_pending_not_held(config).await?;
            if !lost.is_empty() {
                tracing::warn!(stream = %self.stream, consumer = %self.name, count = lost.len(), "entries handed over with a reply lost to a dropped connection, read again");
            }
            raw.extend(lost.into_iter().map(|e| (e, false)));
        }
        if raw.is_empty() && !self.own_pending_checked {
            let reply = self.read("0", config, None).await?;
            self.own_pending_checked = true;
            raw.extend(reply.into_iter().map(|e| (e, false)));
        }
        if raw.is_empty() && self.reclaim_idle {
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

    /// This consumer's pending entries that it was not handed (in pages).
    async fn own_pending_not_held(&mut self, config: &Config) -> Result<Vec<StreamId>> {
        let (mut from, mut out) = ("0".to_string(), Vec::new());
        loop {
            let page = self.read(&from, config, None).await?;
            let Some(last) = page.last() else { break };
            from = last.id.clone();
            let full = page.len() >= config.batch;
            out.extend(page.into_iter().filter(|e| !self.held.contains(&e.id)));
            if !full {
                break;
            }
        }
        Ok(out)
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
        self.conn.pipe::<()>("XACK", &self.stream, &pipe).await?;
        for e in entries {
            self.held.remove(e);
        }
        Ok(())
    }

    async fn read(&mut self, from: &str, config: &Config, block: Option<u64>) -> Result<Vec<StreamId>> {
        let retried = self.conn.retried;
        let out = self.read_once(from, config, block).await;
        if self.conn.retried != retried {
            self.recheck_own = true;
        }
        out
    }

    async fn read_once(&mut self, from: &str, config: &Config, block: Option<u64>) -> Result<Vec<StreamId>> {
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
            if !entry.map.is_empty() && !sealed_well(self.seal.as_ref(), &self.stream, &entry) {
                let reason = "not sealed with the run's token (written by something without it, or on another stream)";
                dropped.push(Dropped { entry: entry.id, reason: reason.into() });
                continue;
            }
            match entry.map.get("p") {
                Some(Value::BulkString(bytes)) => match T::decode(bytes) {
                    Ok(item) if id_field(&entry) != Some(item.id()) => dropped.push(Dropped {
                        entry: entry.id,
                        reason: format!("its id field disagrees with the trajectory id {} it holds", item.id()),
                    }),
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
        self.held.extend(items.iter().map(|d| d.entry.clone()));
        Ok(Batch { items, dropped, duplicates })
    }
}

/// The trajectory id an entry's `id` field names.
fn id_field(entry: &StreamId) -> Option<u64> {
    match entry.map.get("id") {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}
