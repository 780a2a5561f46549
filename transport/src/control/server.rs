//! The Control service's RPCs: the wire side of [`Control`]. Requests are
//! checked here (roles, sizes, known workers) and answered with the marks
//! clients act on: "not ready" and "gone" (see `grpc::rpc_error`).

use super::state::{Control, Worker};
use super::types::{Role, WorkerState, assignment_to_wire, health_from_wire};
use crate::grpc;
use prism_proto::v1;
use prism_proto::v1::control_server::ControlServer;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::{Code, Request, Response, Status};

/// The longest the learner holds a long poll (GetWork, GetStep, GetNcclId);
/// clients ask for no longer.
pub(super) const MAX_POLL: Duration = Duration::from_secs(60);

impl Control {
    /// The tonic service, refusing requests without `token` when one is set.
    pub fn service(&self, token: Option<grpc::Token>) -> InterceptedService<ControlServer<Self>, grpc::Auth> {
        InterceptedService::new(ControlServer::new(self.clone()), grpc::Auth::new(token))
    }
}

/// A worker the learner does not count in (any more): it registers again.
fn gone_worker(rpc: &str, worker_id: &str, state: Option<WorkerState>) -> Status {
    match state {
        None => grpc::gone(Code::NotFound, format!("{rpc}: unknown worker {worker_id}: register first")),
        Some(state) => grpc::gone(
            Code::FailedPrecondition,
            format!("{rpc}: worker {worker_id} is {}: its entries were handed to others; register again", state.name()),
        ),
    }
}

#[tonic::async_trait]
impl v1::control_server::Control for Control {
    async fn register(&self, request: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = request.into_inner();
        let Some(role) = Role::from_wire(r.role) else {
            return Err(Status::invalid_argument(format!("register: role {} cannot join as a worker", r.role)));
        };
        if self.shutdown.borrow().is_some() {
            return Err(Status::unavailable("register: the run is shutting down"));
        }
        let mut s = self.lock();
        s.sweep(Instant::now());
        // A worker that registers again (declared dead, or left) keeps the
        // rank it held: only its own, and only while no live worker holds it.
        if r.nccl_rank > 0 && matches!(role, Role::Rollout | Role::Learner) {
            let held_by = |alive: bool| {
                s.workers.values().any(|w| {
                    w.role == role && w.nccl_rank == r.nccl_rank && (w.state == WorkerState::Alive) == alive && (alive || w.name == r.name)
                })
            };
            if held_by(true) || !held_by(false) {
                return Err(Status::permission_denied(format!(
                    "register: {} rank {} is not {}'s to claim: a live worker holds it, or it never held it",
                    role.name(),
                    r.nccl_rank,
                    r.name
                )));
            }
        }
        let nccl_rank = match role {
            Role::Rollout if r.nccl_rank == 0 => s.nccl_ranks.pop_front().unwrap_or(0),
            Role::Rollout => r.nccl_rank,
            Role::Learner if r.nccl_rank > 0 => r.nccl_rank,
            Role::Learner => match s.learner_ranks.pop_front() {
                Some(rank) => rank,
                None if s.learner_world <= 1 => {
                    return Err(Status::invalid_argument(
                        "register: this run trains on one learner (dist.learner_ranks = 1): a learner rank cannot join",
                    ));
                }
                None => {
                    return Err(Status::resource_exhausted(format!(
                        "register: every data-parallel learner rank (1..{} of dist.learner_ranks = {}) is taken",
                        s.learner_world, s.learner_world
                    )));
                }
            },
            Role::Reward => 0,
        };
        s.next_id += 1;
        let worker_id = format!("{}-{}-{}", role.name(), s.next_id, s.incarnation);
        tracing::info!(worker_id = %worker_id, name = %r.name, device = %r.device, pid = r.pid, nccl_rank, "worker registered");
        s.workers.insert(
            worker_id.clone(),
            Worker {
                role,
                name: r.name,
                device: r.device,
                state: WorkerState::Alive,
                policy_version: 0,
                last_seen: Instant::now(),
                counters: Default::default(),
                throughput: 0.0,
                nccl_rank,
                reward_health: None,
            },
        );
        Ok(Response::new(v1::RegisterResponse {
            worker_id,
            run_id: s.run_id.clone(),
            heartbeat_interval_ms: s.heartbeat.as_millis() as u64,
            policy_version: s.policy_version,
            nccl_rank,
        }))
    }

    async fn heartbeat(&self, request: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let now = Instant::now();
        let mut s = self.lock();
        s.sweep(now);
        let Some(w) = s.workers.get_mut(&r.worker_id) else {
            return Err(gone_worker("heartbeat", &r.worker_id, None));
        };
        if w.state != WorkerState::Alive {
            return Err(gone_worker("heartbeat", &r.worker_id, Some(w.state)));
        }
        let counters: super::WorkerCounters = r.counters.unwrap_or_default().into();
        let dt = now.duration_since(w.last_seen).as_secs_f64();
        if dt > 0.0 {
            let rate = counters.processed.saturating_sub(w.counters.processed) as f64 / dt;
            w.throughput = if w.throughput == 0.0 { rate } else { 0.7 * w.throughput + 0.3 * rate };
        }
        w.last_seen = now;
        w.policy_version = r.policy_version;
        w.counters = counters;
        w.reward_health = r.reward_health.map(health_from_wire);
        Ok(Response::new(v1::HeartbeatResponse {
            latest_version: s.policy_version,
            shutdown: self.shutdown.borrow().is_some(),
            dead_workers: s.dead.clone(),
        }))
    }

    async fn get_status(&self, _: Request<v1::GetStatusRequest>) -> Result<Response<v1::ClusterStatus>, Status> {
        Ok(Response::new((&self.status()).into()))
    }

    async fn shutdown(&self, request: Request<v1::ShutdownRequest>) -> Result<Response<v1::ShutdownResponse>, Status> {
        let r = request.into_inner();
        if r.worker_id.is_empty() {
            tracing::info!(reason = %r.reason, "shutdown requested over gRPC");
            self.request_shutdown(&r.reason);
        } else {
            let mut s = self.lock();
            if let Some(w) = s.workers.get_mut(&r.worker_id) {
                tracing::info!(worker_id = %r.worker_id, reason = %r.reason, "worker left");
                w.state = WorkerState::Left;
                // Survivors take over whatever it read and did not acknowledge.
                s.dead.push(r.worker_id.clone());
                if let Some(work) = &s.work {
                    work.worker_failed(&r.worker_id);
                }
            }
        }
        Ok(Response::new(v1::ShutdownResponse {}))
    }

    /// Refused: the learner publishes its groups' NCCL ids itself
    /// ([`Control::set_nccl_id`]); a client that could replace them could
    /// take the place of rank 0 in a weight broadcast or gradient all-reduce.
    async fn publish_nccl_id(&self, request: Request<v1::NcclId>) -> Result<Response<v1::PublishNcclIdResponse>, Status> {
        let id = request.into_inner();
        tracing::warn!(group = %id.group, "refused a PublishNcclId: only the learner publishes NCCL ids");
        Err(Status::permission_denied(format!("publish NCCL id for {}: only the learner publishes its groups' NCCL ids", id.group)))
    }

    async fn get_work(&self, request: Request<v1::GetWorkRequest>) -> Result<Response<v1::GetWorkResponse>, Status> {
        let r = request.into_inner();
        let work = {
            let s = self.lock();
            match s.workers.get(&r.worker_id).map(|w| w.state) {
                Some(WorkerState::Alive) => {}
                state => return Err(gone_worker("get work", &r.worker_id, state)),
            }
            s.work.clone().ok_or_else(|| grpc::not_ready("get work: the learner is not handing out prompts yet"))?
        };
        if self.shutdown.borrow().is_some() {
            return Ok(Response::new(v1::GetWorkResponse { assignments: vec![], stopped: true }));
        }
        let wait = Duration::from_millis(r.wait_ms).min(MAX_POLL);
        Ok(Response::new(match work.get_work(&r.worker_id, r.max.max(1) as usize, wait).await {
            Some(assignments) => v1::GetWorkResponse { assignments: assignments.iter().map(assignment_to_wire).collect(), stopped: false },
            None => v1::GetWorkResponse { assignments: vec![], stopped: true },
        }))
    }

    async fn delivered(&self, request: Request<v1::DeliveredRequest>) -> Result<Response<v1::DeliveredResponse>, Status> {
        let r = request.into_inner();
        let work = self.lock().work.clone().ok_or_else(|| grpc::not_ready("delivered: the learner has no work source yet"))?;
        work.delivered(&r.worker_id, &r.groups, r.trajectories, r.tokens, r.generate_s);
        Ok(Response::new(v1::DeliveredResponse {}))
    }

    async fn get_step(&self, request: Request<v1::GetStepRequest>) -> Result<Response<v1::StepBatch>, Status> {
        let r = request.into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_POLL);
        loop {
            let notified = self.step_published.notified();
            {
                let s = self.lock();
                match s.workers.get(&r.worker_id).map(|w| w.role) {
                    Some(Role::Learner) => {}
                    Some(_) => return Err(Status::permission_denied(format!("get step: worker {} is not a learner rank", r.worker_id))),
                    None => return Err(gone_worker("get step", &r.worker_id, None)),
                }
                match &s.steps.current {
                    Some(b) if b.index == r.index => return Ok(Response::new((**b).clone())),
                    Some(b) if b.index > r.index => {
                        return Err(grpc::gone(
                            Code::FailedPrecondition,
                            format!(
                                "get step: step {} is gone (rank 0 is at step {}): this learner rank fell behind, and \
                                 the ranks' weights have parted",
                                r.index, b.index
                            ),
                        ));
                    }
                    _ if s.steps.stopped || self.shutdown.borrow().is_some() => {
                        return Ok(Response::new(v1::StepBatch { index: r.index, stopped: true, ..Default::default() }));
                    }
                    _ => {}
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(v1::StepBatch { index: r.index, ..Default::default() }));
            }
        }
    }

    async fn get_nccl_id(&self, request: Request<v1::GetNcclIdRequest>) -> Result<Response<v1::NcclId>, Status> {
        let r = request.into_inner();
        let wait = Duration::from_millis(r.wait_ms).min(MAX_POLL);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.nccl_published.notified();
            if let Some(id) = self.lock().nccl_ids.get(&r.group) {
                return Ok(Response::new(id.into()));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(grpc::not_ready(format!("NCCL id of group {} not published within {} ms", r.group, wait.as_millis())));
            }
        }
    }
}
