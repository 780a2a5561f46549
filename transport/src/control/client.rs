//! A worker's (or `prism status`'s) connection to the learner's Control
//! service: requests in core and transport types, errors classified (see
//! [`crate::Error`]'s `NotReady`, `Gone`, `Refused`, `Unreachable`).

use super::server::MAX_POLL;
use super::types::{
    ClusterStatus, HeartbeatReply, NcclId, Registration, Role, StepPoll, WorkerCounters, assignment_from_wire, health_to_wire,
};
use crate::grpc::{self, ClientAuth, Token};
use crate::{Error, Result};
use prism_core::Assignment;
use prism_proto::v1;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The largest Control answer a client takes. A `GetStep` answer carries a
/// whole step's groups (tokens, log-probs, text: about 10 bytes a token), so
/// tonic's 4 MiB default would refuse every step past a few hundred 1k-token
/// trajectories.
const MAX_ANSWER_BYTES: usize = 1 << 30;

/// A worker's (or `prism status`'s) connection to the learner's Control service.
#[derive(Clone, Debug)]
pub struct ControlClient {
    inner: v1::control_client::ControlClient<InterceptedService<Channel, ClientAuth>>,
    addr: String,
}

impl ControlClient {
    /// Connects to the learner at `grpc.learner`, or `addr` when given.
    pub async fn connect(config: &grpc::Config, addr: Option<&str>, token: Option<&Token>) -> Result<Self> {
        let addr = addr.unwrap_or(&config.learner).to_string();
        let channel = grpc::connect(config, &addr).await?;
        let inner = v1::control_client::ControlClient::with_interceptor(channel, ClientAuth::new(token))
            .max_decoding_message_size(MAX_ANSWER_BYTES);
        Ok(Self { inner, addr })
    }

    fn err(&self, rpc: &'static str) -> impl Fn(Status) -> Error + '_ {
        move |status| grpc::rpc_error(&self.addr, rpc, status)
    }

    /// Joins the run as `role`.
    pub async fn register(&mut self, role: Role, name: &str, device: &str) -> Result<Registration> {
        self.register_again(role, name, device, 0).await
    }

    /// Registers again after the learner forgot this worker, keeping
    /// `nccl_rank`, the weight-broadcast rank it holds (0: none).
    pub async fn register_again(&mut self, role: Role, name: &str, device: &str, nccl_rank: u32) -> Result<Registration> {
        let req = v1::RegisterRequest {
            role: role.to_wire() as i32,
            name: name.into(),
            pid: std::process::id(),
            device: device.into(),
            nccl_rank,
        };
        let r = self.inner.register(req).await;
        r.map(|r| r.into_inner().into()).map_err(self.err("Register"))
    }

    /// Reports liveness, the held policy version and counters.
    pub async fn heartbeat(&mut self, worker_id: &str, policy_version: u64, counters: WorkerCounters) -> Result<HeartbeatReply> {
        self.heartbeat_with_health(worker_id, policy_version, counters, None).await
    }

    /// [`Self::heartbeat`] with a reward worker's reward health.
    pub async fn heartbeat_with_health(
        &mut self,
        worker_id: &str,
        policy_version: u64,
        counters: WorkerCounters,
        reward_health: Option<&prism_reward::Health>,
    ) -> Result<HeartbeatReply> {
        let req = v1::HeartbeatRequest {
            worker_id: worker_id.into(),
            policy_version,
            counters: Some(counters.into()),
            reward_health: reward_health.map(health_to_wire),
        };
        let r = self.inner.heartbeat(req).await;
        r.map(|r| r.into_inner().into()).map_err(self.err("Heartbeat"))
    }

    /// The cluster's status.
    pub async fn status(&mut self) -> Result<ClusterStatus> {
        let r = self.inner.get_status(v1::GetStatusRequest {}).await.map_err(self.err("GetStatus"))?;
        Ok(r.into_inner().try_into()?)
    }

    /// Stops the run (`worker_id` empty) or leaves it.
    pub async fn shutdown(&mut self, worker_id: &str, reason: &str) -> Result<()> {
        let r = self.inner.shutdown(v1::ShutdownRequest { worker_id: worker_id.into(), reason: reason.into() }).await;
        r.map(|_| ()).map_err(self.err("Shutdown"))
    }

    /// Rank 0: publishes the NCCL unique id of `group`.
    pub async fn publish_nccl_id(&mut self, group: &str, id: Vec<u8>, world_size: u32) -> Result<()> {
        let r = self.inner.publish_nccl_id(v1::NcclId { group: group.into(), id, world_size }).await;
        r.map(|_| ()).map_err(self.err("PublishNcclId"))
    }

    /// Other ranks: waits up to `wait` (at most a minute) for rank 0's id of
    /// `group`; [`Error::NotReady`] when it is not published by then.
    pub async fn get_nccl_id(&mut self, group: &str, wait: Duration) -> Result<NcclId> {
        // The learner holds a poll at most MAX_POLL: no longer deadline is needed.
        let wait = wait.min(MAX_POLL);
        let req = v1::GetNcclIdRequest { group: group.into(), wait_ms: wait.as_millis() as u64 };
        let mut request = Request::new(req);
        request.set_timeout(wait + Duration::from_secs(30));
        let r = self.inner.get_nccl_id(request).await;
        r.map(|r| r.into_inner().into()).map_err(self.err("GetNcclId"))
    }

    /// [`Self::get_nccl_id`], answering `None` when it is not published
    /// within `wait`.
    pub async fn wait_nccl_id(&mut self, group: &str, wait: Duration) -> Result<Option<NcclId>> {
        match self.get_nccl_id(group, wait).await {
            Ok(id) => Ok(Some(id)),
            Err(Error::NotReady { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Up to `max` prompts for `worker_id`, the learner waiting up to `wait`
    /// (at most a minute); `None` once the run is over. Before the learner
    /// hands out prompts (its warm start): [`Error::NotReady`].
    pub async fn get_work(&mut self, worker_id: &str, max: usize, wait: Duration) -> Result<Option<Vec<Assignment>>> {
        // The learner holds a poll at most MAX_POLL: no longer deadline is needed.
        let wait = wait.min(MAX_POLL);
        let req = v1::GetWorkRequest { worker_id: worker_id.into(), max: max as u32, wait_ms: wait.as_millis() as u64 };
        let mut request = Request::new(req);
        // The long poll may take `wait`; leave room beyond the usual deadline.
        request.set_timeout(wait + Duration::from_secs(30));
        let r = self.inner.get_work(request).await.map_err(self.err("GetWork"))?.into_inner();
        if r.stopped {
            return Ok(None);
        }
        let work = r.assignments.into_iter().map(assignment_from_wire).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(work))
    }

    /// A learner rank: the groups of step `index`, the learner waiting up to
    /// `wait` (at most a minute).
    pub async fn get_step(&mut self, worker_id: &str, index: u64, wait: Duration) -> Result<StepPoll> {
        // The learner holds a poll at most MAX_POLL: no longer deadline is needed.
        let wait = wait.min(MAX_POLL);
        let req = v1::GetStepRequest { worker_id: worker_id.into(), index, wait_ms: wait.as_millis() as u64 };
        let mut request = Request::new(req);
        request.set_timeout(wait + Duration::from_secs(30));
        let r = self.inner.get_step(request).await.map_err(self.err("GetStep"))?.into_inner();
        Ok(r.try_into()?)
    }

    /// Reports groups put on the sampled stream.
    pub async fn delivered(&mut self, worker_id: &str, groups: Vec<u64>, trajectories: u64, tokens: u64, generate_s: f64) -> Result<()> {
        let req = v1::DeliveredRequest { worker_id: worker_id.into(), groups, trajectories, tokens, generate_s };
        let r = self.inner.delivered(req).await;
        r.map(|_| ()).map_err(self.err("Delivered"))
    }
}

