//! The Control service: workers register and heartbeat with the learner, which
//! marks a worker that stays silent for `dist.dead_after_ms` dead (survivors
//! then reclaim its stream entries), answers `prism status`, hands out the NCCL
//! unique ids and ranks, hands data-parallel learner ranks the groups of each
//! step, and tells workers when to stop.
//!
//! - [`state`]: the learner's side, [`Control`], which the learner updates
//!   and the service reads;
//! - [`server`]: the RPCs, checked and answered with the marks clients act on;
//! - [`client`]: [`ControlClient`], for workers and `prism status`;
//! - [`membership`]: a worker's registration and heartbeats ([`join`]);
//! - [`types`]: what they speak, converted to and from `prism.v1` there.

pub mod client;
pub mod membership;
pub mod server;
pub mod state;
pub mod types;

pub use client::ControlClient;
pub use membership::{Counters, HealthSource, Membership, join};
pub use state::{Control, WorkSource};
pub use types::{ClusterStatus, HeartbeatReply, NcclId, Registration, Role, Step, StepPoll, WorkerCounters, WorkerState, WorkerStatus};

#[cfg(test)]
mod tests;
