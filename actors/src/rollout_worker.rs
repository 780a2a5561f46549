//! RolloutWorker: asks for prompts, makes sure its weights are recent enough,
//! samples groups on a blocking thread, and hands them on — waiting while the
//! stage after it is full, so a slow reward stage slows sampling.
//!
//! The worker is the same in every mode; only its [`Ports`] differ: where its
//! prompts come from, where it gets weights, and where its groups go.
//!
//! - In one process ([`Channels`]): the prompt source, weight sync and reward
//!   pool actors.
//! - In a rollout process ([`crate::remote::rollout`]): the learner's Control
//!   service, the Weights stream or the NCCL broadcast, and the sampled stream.
//!
//! ```text
//! Next ─▶ Ports::work ─▶ Ports::weights ─▶ load + generate (blocking) ─▶ Ports::deliver ─▶ Next
//!            │ None           │ Void ─▶ Next               │ error
//!            ▼                                           ▼
//!    Ports::leave(Finished), stop            Ports::leave(Failed), the actor fails
//! ```

use crate::backend::{Assignment, BackendError, Factory, Generate, NewerWeights, WeightSet};
use crate::error::{Error, Result};
use crate::metrics::MetricsMsg;
use crate::reward_pool::PoolMsg;
use crate::source::SourceMsg;
use crate::weight_sync::SyncMsg;
use prism_core::{PolicyVersion, Trajectory};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::Instrument;

pub enum RolloutMsg {
    /// Take the next batch of work (the worker sends this to itself).
    Next,
}

/// One batch, sampled.
pub struct Sampled {
    /// The prompts it was asked for.
    pub work: Vec<Assignment>,
    /// One group per prompt, in the same order.
    pub groups: Vec<Vec<Trajectory>>,
    /// The policy version that sampled them.
    pub version: PolicyVersion,
    /// Seconds the generation took.
    pub generate_s: f64,
}

/// What a worker's ports say about the weights for the work in hand.
pub enum Weights {
    /// Keep the version held (it is recent enough, or the run is stopping:
    /// a worker holding too old a version then leaves, giving its work back).
    Keep,
    /// Load this set before sampling.
    Load(Arc<WeightSet>),
    /// The work in hand no longer stands (the learner that gave it restarted
    /// and has forgotten it): drop it unsampled and ask for work again.
    Void,
}

/// Why a worker leaves.
pub enum Leave {
    /// No more work: the run is over for it.
    Finished,
    /// It stopped while holding work it could not sample (the run stopped
    /// while it waited for weights); the work is to be issued again.
    Stopped,
    /// Sampling failed; the actor fails with this error after telling its ports.
    Failed(Error),
}

/// Where a rollout worker's work comes from, where it gets weights, and where
/// its groups go. `worker` is the worker's name.
pub trait Ports: Send + 'static {
    /// The next batch of at most `max` prompts (possibly none yet); `None`
    /// when this worker's job is done.
    fn work(&mut self, worker: &str, max: usize) -> impl Future<Output = Result<Option<Vec<Assignment>>>> + Send;
    /// The weights for work that needs at least version `min`, given the
    /// version the worker holds.
    fn weights(&mut self, worker: &str, held: Option<PolicyVersion>, min: PolicyVersion) -> impl Future<Output = Result<Weights>> + Send;
    /// The weights `weights` gave were loaded.
    fn loaded(&mut self, _version: PolicyVersion) {}
    /// For in-flight weight updates (`rollout.inflight_updates`): a poll a
    /// generation thread can ask between decode steps for weights published
    /// after a version, answering at once. `None` where these ports cannot.
    fn newer(&self) -> Option<Box<NewerWeights<'static>>> {
        None
    }
    /// Hands a sampled batch on.
    fn deliver(&mut self, worker: &str, sampled: Sampled) -> impl Future<Output = Result<()>> + Send;
    /// The worker stops.
    fn leave(&mut self, worker: &str, why: Leave) -> impl Future<Output = ()> + Send;
}

/// A worker's sampler that can be taken once: for a process that built its
/// generator before the worker starts (a restart would need a factory).
pub fn once(generator: Box<dyn Generate>) -> Factory<Box<dyn Generate>> {
    let slot = Mutex::new(Some(generator));
    Arc::new(move || {
        slot.lock()
            .map_err(|_| BackendError::new("the generator's lock was poisoned"))?
            .take()
            .ok_or_else(|| BackendError::new("this worker's generator was already taken (it cannot be restarted in place)"))
    })
}

pub struct RolloutWorker<P>(PhantomData<fn() -> P>);

impl<P> RolloutWorker<P> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<P> Default for RolloutWorker<P> {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
pub struct RolloutArgs<P> {
    pub name: String,
    pub factory: Factory<Box<dyn Generate>>,
    pub ports: P,
    pub prompts_per_batch: usize,
}

pub struct RolloutState<P> {
    name: String,
    ports: P,
    prompts_per_batch: usize,
    backend: Option<Box<dyn Generate>>,
    version: Option<PolicyVersion>,
}

/// What one turn of the worker led to.
enum Turn {
    Again,
    Leave(Leave),
}

impl<P: Ports> RolloutState<P> {
    /// Asks for work, refreshes the weights, samples and hands the batch on.
    async fn turn(&mut self) -> Result<Turn> {
        let work = match self.ports.work(&self.name, self.prompts_per_batch.max(1)).await? {
            Some(work) if work.is_empty() => return Ok(Turn::Again),
            Some(work) => work,
            None => return Ok(Turn::Leave(Leave::Finished)),
        };
        let need = work.iter().map(|w| w.min_version).max().unwrap_or_default();
        let weights = match self.ports.weights(&self.name, self.version, need).await? {
            Weights::Load(set) => Some(set),
            Weights::Keep if self.version.is_none_or(|v| v < need) => {
                // Nothing to sample with (the run is stopping): give the prompts back.
                return Ok(Turn::Leave(Leave::Stopped));
            }
            Weights::Keep => None,
            Weights::Void => {
                tracing::warn!(actor = %self.name, groups = work.len(), "dropping work its learner no longer knows of (the learner restarted)");
                return Ok(Turn::Again);
            }
        };
        let backend = self.backend.take().ok_or_else(|| Error::Thread(format!("{}: backend lost by an earlier failure", self.name)))?;
        let span = tracing::info_span!("generate", actor = %self.name, groups = work.len(), policy_version = tracing::field::Empty);
        let started = Instant::now();
        let held = self.version;
        let loading = weights.is_some();
        let newer = self.ports.newer();
        let (backend, result) = tokio::task::spawn_blocking({
            let span = span.clone();
            move || {
                let _enter = span.enter();
                let mut backend = backend;
                let version = match &weights {
                    Some(w) => match backend.load_weights(w) {
                        Ok(()) => w.version,
                        Err(e) => return (backend, Err((Some(w.version), e))),
                    },
                    None => held.unwrap_or_default(),
                };
                span.record("policy_version", version.0);
                let out = match newer {
                    Some(mut newer) => backend.generate_inflight(&work, version, &mut *newer),
                    None => backend.generate(&work, version).map(|groups| (groups, version)),
                };
                (backend, out.map(|(groups, last)| (version, last, groups, work)).map_err(|e| (None, e)))
            }
        })
        .await
        .map_err(|e| Error::Thread(format!("{}: the generation thread failed: {e}", self.name)))?;
        self.backend = Some(backend);
        let (version, last, groups, work) = match result {
            Ok(sampled) => sampled,
            Err((Some(v), e)) => return Err(Error::backend(format!("{}: loading weights v{}", self.name, v.0), e)),
            Err((None, e)) => return Err(Error::backend(format!("{}: generation", self.name), e)),
        };
        if loading || last != version {
            self.ports.loaded(last);
        }
        // Newer weights loaded in flight are what the worker holds now.
        self.version = Some(last);
        if groups.len() != work.len() {
            let e = BackendError(format!("returned {} groups for {} prompts", groups.len(), work.len()));
            return Err(Error::backend(format!("{}: generation", self.name), e));
        }
        let sampled = Sampled { work, groups, version, generate_s: started.elapsed().as_secs_f64() };
        self.ports.deliver(&self.name, sampled).await?;
        Ok(Turn::Again)
    }
}

impl<P: Ports> Actor for RolloutWorker<P> {
    type Msg = RolloutMsg;
    type State = RolloutState<P>;
    type Arguments = RolloutArgs<P>;

    async fn pre_start(&self, myself: ActorRef<RolloutMsg>, args: RolloutArgs<P>) -> Result<RolloutState<P>, ActorProcessingErr> {
        let RolloutArgs { name, factory, mut ports, prompts_per_batch } = args;
        let made = tokio::task::spawn_blocking(move || factory()).await;
        let backend = match made {
            Ok(Ok(backend)) => backend,
            Ok(Err(e)) => {
                let e = Error::backend(format!("{name}: making the generator"), e);
                let message = e.to_string();
                ports.leave(&name, Leave::Failed(e)).await;
                return Err(message.into());
            }
            Err(e) => {
                let message = format!("{name}: making the generator failed: {e}");
                ports.leave(&name, Leave::Failed(Error::Thread(message.clone()))).await;
                return Err(message.into());
            }
        };
        myself.cast(RolloutMsg::Next)?;
        Ok(RolloutState { name, ports, prompts_per_batch, backend: Some(backend), version: None })
    }

    async fn handle(&self, myself: ActorRef<RolloutMsg>, msg: RolloutMsg, state: &mut RolloutState<P>) -> Result<(), ActorProcessingErr> {
        let RolloutMsg::Next = msg;
        match state.turn().await {
            Ok(Turn::Again) => myself.cast(RolloutMsg::Next)?,
            Ok(Turn::Leave(why)) => {
                let reason = match why {
                    Leave::Stopped => "stopped while waiting for weights",
                    _ => "no more work",
                };
                state.ports.leave(&state.name, why).await;
                myself.stop(Some(reason.into()));
            }
            Err(e) => {
                let message = e.to_string();
                state.ports.leave(&state.name, Leave::Failed(e)).await;
                return Err(message.into());
            }
        }
        Ok(())
    }
}

/// The ports of a worker in one process: the prompt source, the weight sync
/// and the reward pool actors, and the metrics actor for its counts.
#[derive(Clone)]
pub struct Channels {
    pub source: ActorRef<SourceMsg>,
    pub sync: ActorRef<SyncMsg>,
    pub pool: ActorRef<PoolMsg>,
    pub metrics: ActorRef<MetricsMsg>,
}

impl Ports for Channels {
    async fn work(&mut self, worker: &str, max: usize) -> Result<Option<Vec<Assignment>>> {
        let worker = worker.to_string();
        match self.source.call(|reply| SourceMsg::GetWork { worker, max, reply }, None).await? {
            CallResult::Success(work) if !work.is_empty() => Ok(Some(work)),
            // The source stopped (or is gone): this worker's job is done.
            _ => Ok(None),
        }
    }

    async fn weights(&mut self, worker: &str, held: Option<PolicyVersion>, min: PolicyVersion) -> Result<Weights> {
        match self.sync.call(|reply| SyncMsg::GetWeights { have: held, min_version: min, reply }, None).await? {
            CallResult::Success(w) => Ok(w.map_or(Weights::Keep, Weights::Load)),
            _ => Err(Error::Unanswered(format!("{worker}: weight sync is gone"))),
        }
    }

    fn newer(&self) -> Option<Box<NewerWeights<'static>>> {
        crate::weight_sync::poll_newer(self.sync.clone())
    }

    async fn deliver(&mut self, worker: &str, sampled: Sampled) -> Result<()> {
        let Sampled { work, groups, generate_s, .. } = sampled;
        let count: usize = groups.iter().map(Vec::len).sum();
        let tokens: usize = groups.iter().flatten().map(|t| t.tokens.len()).sum();
        self.metrics.cast(MetricsMsg::TrajectoriesMade { count: count as u64, tokens: tokens as u64, generate_s })?;
        let (rejected, rejected_tokens) = crate::metrics::rejected(groups.iter().flatten());
        if rejected > 0 {
            self.metrics.cast(MetricsMsg::Rejected { trajectories: rejected, tokens: rejected_tokens })?;
        }
        for (assignment, group) in work.into_iter().zip(groups) {
            let n = group.len() as u64;
            let accepted = self
                .pool
                .call(|reply| PoolMsg::SubmitGroup { group: assignment.group, trajectories: group, reply }, None)
                .instrument(tracing::debug_span!("submit", actor = %worker, group = assignment.group.0))
                .await?;
            if !matches!(accepted, CallResult::Success(true)) {
                self.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "rollout", trajectories: n })?;
            }
        }
        Ok(())
    }

    async fn leave(&mut self, worker: &str, why: Leave) {
        // A failed worker's prompts are issued again by its supervisor, which
        // sees the failure; one that stopped holding prompts gives them back.
        if let Leave::Stopped = why {
            let _ = self.source.cast(SourceMsg::WorkerFailed(worker.to_string()));
        }
    }
}
