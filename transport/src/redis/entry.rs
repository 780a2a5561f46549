//! What travels as a stream entry: a trajectory, a labelled trajectory or a
//! label result, as protobuf stamped with the time it was sent.

use crate::{Result, unix_ms};
use prism_core::{LabelResult, LabeledTrajectory, Trajectory};
use prism_proto::{convert, v1};
use prost::Message;

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

impl Entry for LabelResult {
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
