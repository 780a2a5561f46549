//! The learner's side of the labeled stream: label results, ingested once per
//! trajectory id, assembled into complete groups (all G samples labeled) or
//! failed groups (a sample could not be labeled: the group is dropped and
//! counted, its later members acknowledged and ignored). The learner is the
//! labeled stream's only reader, so it never takes over idle entries: they
//! are its own, waiting for the rest of their group or for a step.

use super::redis::{Config, Consumer, Redis, RunKeys, LEARNER_GROUP};
use super::Result;
use prism_core::{GroupId, LabeledTrajectory};
use prism_proto::LabelResult;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A group leaving the assembler.
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    /// Every sample labeled, in sample order. `entries` are acknowledged by
    /// [`Assembler::ack`] once the group is safely handed over.
    Complete { group: GroupId, trajectories: Vec<LabeledTrajectory>, entries: Vec<String> },
    /// A sample could not be labeled: the group (`size` trajectories) is dropped.
    Failed { group: GroupId, size: u64, reason: String, entries: Vec<String> },
}

#[derive(Default)]
struct Partial {
    expected: usize,
    members: BTreeMap<u32, LabeledTrajectory>,
    entries: Vec<String>,
}

/// Reads the labeled stream as the learner.
pub struct Assembler {
    consumer: Consumer<LabelResult>,
    partial: HashMap<GroupId, Partial>,
    failed: HashSet<GroupId>,
    /// Entries to acknowledge without handing anything over (late members of
    /// failed groups, undecodable entries are acknowledged by the consumer).
    loose: Vec<String>,
    /// Undecodable entries dropped so far.
    undecodable: u64,
}

impl Assembler {
    /// The learner's consumer (named `consumer`) of `keys.labeled`,
    /// deduplicating by trajectory id in `keys.ingested`.
    pub async fn new(redis: &Redis, keys: &RunKeys, consumer: &str) -> Result<Self> {
        Ok(Self {
            consumer: redis.consumer(&keys.labeled, LEARNER_GROUP, consumer, Some(&keys.ingested)).await?.without_reclaim(),
            partial: HashMap::new(),
            failed: HashSet::new(),
            loose: Vec::new(),
            undecodable: 0,
        })
    }

    /// Entries that did not decode as a label result so far (acknowledged and
    /// dropped; the groups they belonged to never complete, and are dropped
    /// as incomplete once given up on: [`Assembler::abandon`]).
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    /// Gives up on `group` (it has waited too long for its missing members):
    /// it fails, its later members are acknowledged and ignored, and the
    /// entries of the members that did arrive are returned, to acknowledge
    /// once the drop is counted. `None` if the group failed already.
    pub fn abandon(&mut self, group: GroupId) -> Option<Vec<String>> {
        if !self.failed.insert(group) {
            return None;
        }
        Some(self.partial.remove(&group).map(|p| p.entries).unwrap_or_default())
    }

    /// Whether `group` failed or was given up on: it is counted as dropped
    /// whole, so members of it still in a stream are not in flight.
    pub fn has_failed(&self, group: GroupId) -> bool {
        self.failed.contains(&group)
    }

    /// Trajectories skipped as already ingested.
    pub fn duplicates(&self) -> u64 {
        self.consumer.duplicates()
    }

    /// Groups with some but not all samples labeled.
    pub fn partial_groups(&self) -> usize {
        self.partial.len()
    }

    /// Reads what arrived (waiting up to `redis.block_ms`) and returns the
    /// groups it completed or failed.
    pub async fn next(&mut self, config: &Config) -> Result<Vec<Assembled>> {
        let batch = self.consumer.recv(config).await?;
        self.undecodable += batch.dropped.len() as u64;
        let mut out = Vec::new();
        for d in batch.items {
            let (group, size, sample) = match &d.item {
                Ok(l) => (l.trajectory.group, l.trajectory.group_size, l.trajectory.sample),
                Err(f) => (f.trajectory.group, f.trajectory.group_size, f.trajectory.sample),
            };
            if self.failed.contains(&group) {
                self.loose.push(d.entry);
                continue;
            }
            match d.item {
                Err(f) => {
                    let mut entries = self.partial.remove(&group).map(|p| p.entries).unwrap_or_default();
                    entries.push(d.entry);
                    self.failed.insert(group);
                    tracing::warn!(group = group.0, trajectory_id = f.trajectory.id.0, reason = %f.error, "group dropped: a sample could not be labeled");
                    out.push(Assembled::Failed { group, size: size as u64, reason: f.error, entries });
                }
                Ok(l) => {
                    let p = self.partial.entry(group).or_insert_with(|| Partial { expected: size as usize, ..Default::default() });
                    p.entries.push(d.entry);
                    p.members.insert(sample, l);
                    if p.members.len() >= p.expected {
                        let p = self.partial.remove(&group).unwrap_or_default();
                        out.push(Assembled::Complete { group, trajectories: p.members.into_values().collect(), entries: p.entries });
                    }
                }
            }
        }
        if !self.loose.is_empty() {
            let loose = std::mem::take(&mut self.loose);
            self.consumer.ack(&loose).await?;
        }
        Ok(out)
    }

    /// Acknowledges (and deletes) the entries of groups handed over.
    pub async fn ack(&mut self, entries: &[String]) -> Result<()> {
        self.consumer.ack(entries).await
    }
}
