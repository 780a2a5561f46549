//! RolloutWorker: pulls prompts, makes sure its weights are recent enough,
//! samples groups on a blocking thread, and hands them to the reward pool —
//! waiting when the pool is full, so a slow reward stage slows sampling.

use crate::backend::{Factory, Generate};
use crate::metrics::MetricsMsg;
use crate::reward_pool::PoolMsg;
use crate::source::SourceMsg;
use crate::weight_sync::SyncMsg;
use prism_core::PolicyVersion;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::time::Instant;
use tracing::Instrument;

pub enum RolloutMsg {
    /// Take the next batch of work (the worker sends this to itself).
    Next,
}

pub struct RolloutWorker;

#[derive(Clone)]
pub struct RolloutArgs {
    pub name: String,
    pub factory: Factory<Box<dyn Generate>>,
    pub source: ActorRef<SourceMsg>,
    pub sync: ActorRef<SyncMsg>,
    pub pool: ActorRef<PoolMsg>,
    pub metrics: ActorRef<MetricsMsg>,
    pub prompts_per_batch: usize,
}

pub struct RolloutState {
    args: RolloutArgs,
    backend: Option<Box<dyn Generate>>,
    version: Option<PolicyVersion>,
}

impl Actor for RolloutWorker {
    type Msg = RolloutMsg;
    type State = RolloutState;
    type Arguments = RolloutArgs;

    async fn pre_start(&self, myself: ActorRef<RolloutMsg>, args: RolloutArgs) -> Result<RolloutState, ActorProcessingErr> {
        let factory = args.factory.clone();
        let backend = tokio::task::spawn_blocking(move || factory()).await??;
        myself.cast(RolloutMsg::Next)?;
        Ok(RolloutState { args, backend: Some(backend), version: None })
    }

    async fn handle(&self, myself: ActorRef<RolloutMsg>, msg: RolloutMsg, state: &mut RolloutState) -> Result<(), ActorProcessingErr> {
        let RolloutMsg::Next = msg;
        let a = &state.args;
        let work = match a
            .source
            .call(|reply| SourceMsg::GetWork { worker: a.name.clone(), max: a.prompts_per_batch, reply }, None)
            .await?
        {
            CallResult::Success(work) if !work.is_empty() => work,
            // The source stopped (or is gone): this worker's job is done.
            _ => {
                myself.stop(Some("no more work".into()));
                return Ok(());
            }
        };

        let need = work.iter().map(|w| w.min_version).max().unwrap_or_default();
        let weights = match a.sync.call(|reply| SyncMsg::GetWeights { have: state.version, min_version: need, reply }, None).await? {
            CallResult::Success(w) => w,
            _ => return Err(format!("{}: weight sync is gone", a.name).into()),
        };
        let mut backend = state.backend.take().ok_or("backend lost by an earlier failure")?;
        if weights.is_none() && state.version.is_none_or(|v| v < need) {
            // Stopping: nothing to sample with; give the prompts back.
            a.source.cast(SourceMsg::WorkerFailed(a.name.clone()))?;
            state.backend = Some(backend);
            myself.stop(Some("stopped while waiting for weights".into()));
            return Ok(());
        }
        let span = tracing::info_span!("generate", actor = %a.name, groups = work.len(), policy_version = tracing::field::Empty);
        let started = Instant::now();
        let version_in = state.version;
        let (backend, result) = tokio::task::spawn_blocking({
            let span = span.clone();
            move || {
                let _enter = span.enter();
                let version = match &weights {
                    Some(w) => match backend.load_weights(w) {
                        Ok(()) => w.version,
                        Err(e) => return (backend, Err(e)),
                    },
                    None => version_in.unwrap_or_default(),
                };
                span.record("policy_version", version.0);
                let out = backend.generate(&work, version).map(|groups| (version, groups, work));
                (backend, out)
            }
        })
        .await?;
        state.backend = Some(backend);
        let (version, groups, work) = result.map_err(|e| format!("{}: generation failed: {e}", a.name))?;
        state.version = Some(version);
        if groups.len() != work.len() {
            return Err(format!("{}: backend returned {} groups for {} prompts", a.name, groups.len(), work.len()).into());
        }

        let count: usize = groups.iter().map(Vec::len).sum();
        let tokens: usize = groups.iter().flatten().map(|t| t.tokens.len()).sum();
        a.metrics.cast(MetricsMsg::TrajectoriesMade {
            count: count as u64,
            tokens: tokens as u64,
            generate_s: started.elapsed().as_secs_f64(),
        })?;
        let (rejected, rejected_tokens) = crate::metrics::rejected(groups.iter().flatten());
        if rejected > 0 {
            a.metrics.cast(MetricsMsg::Rejected { trajectories: rejected, tokens: rejected_tokens })?;
        }

        for (assignment, group) in work.into_iter().zip(groups) {
            let n = group.len() as u64;
            let accepted = a
                .pool
                .call(|reply| PoolMsg::SubmitGroup { group: assignment.group, trajectories: group, reply }, None)
                .instrument(tracing::debug_span!("submit", actor = %a.name, group = assignment.group.0))
                .await?;
            if !matches!(accepted, CallResult::Success(true)) {
                a.metrics.cast(MetricsMsg::InFlightAtShutdown { stage: "rollout", trajectories: n })?;
            }
        }
        myself.cast(RolloutMsg::Next)?;
        Ok(())
    }
}
