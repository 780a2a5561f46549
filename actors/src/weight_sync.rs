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
    /// The newest published weights if newer than `have`, at once (no
    /// waiting): what a generation asks between decode steps for in-flight
    /// weight updates.
    GetNewer { have: PolicyVersion, reply: RpcReplyPort<Option<Arc<WeightSet>>> },
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
            SyncMsg::GetNewer { have, reply } => {
                if !reply.is_closed() {
                    let _ = reply.send(state.latest.as_ref().filter(|w| w.version > have).cloned());
                }
            }
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

/// A poll of `sync` for weights newer than a version, for a generation's
/// blocking thread between decode steps (in-flight weight updates): the
/// runtime's handle waits for the answer, which comes at once (a sync gone
/// or stuck past 5 s reads as nothing newer). `None` outside a runtime.
pub fn poll_newer(sync: ActorRef<SyncMsg>) -> Option<Box<crate::backend::NewerWeights<'static>>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    Some(Box::new(move |held: PolicyVersion| {
        let ask = sync.call(|reply| SyncMsg::GetNewer { have: held, reply }, Some(std::time::Duration::from_secs(5)));
        match runtime.block_on(ask) {
            Ok(ractor::rpc::CallResult::Success(newer)) => newer,
            _ => None,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a blocking thread, the poll answers at once: nothing newer than
    /// the version held, then the version published since, and nothing
    /// before any is (it does not wait for one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_generation_thread_polls_for_newer_weights_without_waiting() {
        let (sync, _handle) = Actor::spawn(None, WeightSync, None).await.unwrap();
        let mut poll = poll_newer(sync.clone()).expect("in a runtime");
        let started = std::time::Instant::now();
        let (none_yet, poll) = tokio::task::spawn_blocking(move || (poll(PolicyVersion(0)).map(|w| w.version), poll)).await.unwrap();
        assert_eq!(none_yet, None);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "it waited for weights");
        let set = |v| WeightSet::new(PolicyVersion(v), vec![("w".to_string(), tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)))]);
        sync.cast(SyncMsg::WeightsPublished(set(3))).unwrap();
        let mut poll = poll;
        let got = tokio::task::spawn_blocking(move || [poll(PolicyVersion(2)), poll(PolicyVersion(3)), poll(PolicyVersion(4))].map(|w| w.map(|w| w.version)))
            .await
            .unwrap();
        assert_eq!(got, [Some(PolicyVersion(3)), None, None]);
        sync.stop(None);
    }
}
