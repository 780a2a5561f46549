//! WeightSync: holds the newest published weights and hands them to rollout
//! workers between generations.
//!
//! Workers pull ([`SyncMsg::GetWeights`]): "anything newer than what I have, and
//! wait until at least `min_version` exists". The learner publishes after each
//! step; nothing is pushed into a worker in the middle of a generation.

use crate::backend::WeightSet;
use prism_core::PolicyVersion;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;

pub enum SyncMsg {
    /// The learner finished a step.
    WeightsPublished(Arc<WeightSet>),
    /// Newer weights than `have`, if any, once `min_version` is available;
    /// `None` when the caller is already current (or the sync has stopped).
    GetWeights { have: Option<PolicyVersion>, min_version: PolicyVersion, reply: RpcReplyPort<Option<Arc<WeightSet>>> },
    /// The newest published version.
    GetVersion(RpcReplyPort<Option<PolicyVersion>>),
    Stop,
}

pub struct WeightSync;

pub struct SyncState {
    latest: Option<Arc<WeightSet>>,
    waiting: Vec<(Option<PolicyVersion>, PolicyVersion, RpcReplyPort<Option<Arc<WeightSet>>>)>,
    stopped: bool,
}

impl SyncState {
    fn answer(&self, have: Option<PolicyVersion>, min_version: PolicyVersion) -> Option<Option<Arc<WeightSet>>> {
        match &self.latest {
            Some(w) if w.version >= min_version => Some(if have.is_some_and(|h| h >= w.version) { None } else { Some(w.clone()) }),
            _ if self.stopped => Some(None),
            _ => None,
        }
    }
}

impl Actor for WeightSync {
    type Msg = SyncMsg;
    type State = SyncState;
    type Arguments = Option<Arc<WeightSet>>;

    async fn pre_start(&self, _myself: ActorRef<SyncMsg>, initial: Self::Arguments) -> Result<SyncState, ActorProcessingErr> {
        Ok(SyncState { latest: initial, waiting: Vec::new(), stopped: false })
    }

    async fn handle(&self, _myself: ActorRef<SyncMsg>, msg: SyncMsg, state: &mut SyncState) -> Result<(), ActorProcessingErr> {
        match msg {
            SyncMsg::WeightsPublished(w) => {
                if state.latest.as_ref().is_none_or(|l| w.version > l.version) {
                    tracing::debug!(policy_version = w.version.0, "weights published");
                    state.latest = Some(w);
                }
                answer_waiting(state);
            }
            SyncMsg::GetWeights { have, min_version, reply } => match state.answer(have, min_version) {
                Some(answer) => {
                    if !reply.is_closed() {
                        let _ = reply.send(answer);
                    }
                }
                None => state.waiting.push((have, min_version, reply)),
            },
            SyncMsg::GetVersion(reply) => {
                if !reply.is_closed() {
                    let _ = reply.send(state.latest.as_ref().map(|w| w.version));
                }
            }
            SyncMsg::Stop => {
                state.stopped = true;
                answer_waiting(state);
            }
        }
        Ok(())
    }
}

fn answer_waiting(state: &mut SyncState) {
    let waiting = std::mem::take(&mut state.waiting);
    for (have, min_version, reply) in waiting {
        match state.answer(have, min_version) {
            Some(answer) => {
                if !reply.is_closed() {
                    let _ = reply.send(answer);
                }
            }
            None => state.waiting.push((have, min_version, reply)),
        }
    }
}
