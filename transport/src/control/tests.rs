use super::*;
use super::types::{health_from_wire, health_to_wire};
use crate::grpc::{self, Token};
use crate::{Error, Result};
use prism_core::{Assignment, GroupId, PolicyVersion};
use std::sync::Arc;
use std::time::Duration;
use crate::testing::{TestLearner, eventually};
use std::sync::Mutex;
use std::sync::atomic::Ordering::Relaxed;

fn dist(heartbeat_ms: u64, dead_after_ms: u64) -> crate::Config {
    crate::Config { heartbeat_ms, dead_after_ms, ..Default::default() }
}

async fn client(l: &TestLearner, token: Option<&str>) -> Result<ControlClient> {
    let token = token.map(|t| Token::new(t).unwrap());
    ControlClient::connect(&l.grpc, Some(&l.addr), token.as_ref()).await
}

#[tokio::test]
async fn workers_register_heartbeat_and_show_in_status() {
    let l = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), None).await;
    l.control.set_policy_version(5);
    let mut c = client(&l, None).await.unwrap();
    let r = c.register(Role::Rollout, "pod-a", "cpu").await.unwrap();
    assert!(r.worker_id.starts_with("rollout-1-"), "{}", r.worker_id);
    assert_eq!((r.run_id.as_str(), r.policy_version), ("test-run", 5));
    let r2 = c.register(Role::Reward, "pod-b", "cpu").await.unwrap();
    assert_eq!(r2.worker_id, format!("reward-2-{}", &r.worker_id["rollout-1-".len()..]), "one learner, one suffix");
    let hb = c.heartbeat(&r.worker_id, 3, WorkerCounters { processed: 40, in_flight: 2, dropped: 0 }).await.unwrap();
    assert_eq!((hb.latest_version, hb.shutdown), (5, false));
    l.control.set_progress(7, 20, 112);
    l.control.record_dropped("stale", 3);
    let s = c.status().await.unwrap();
    assert_eq!((s.policy_version, s.step, s.total_steps, s.trajectories_trained), (5, 7, 20, 112));
    assert_eq!(s.dropped.get("stale"), Some(&3));
    let w = s.workers.iter().find(|w| w.worker_id == r.worker_id).unwrap();
    assert_eq!((w.role, w.state, w.policy_version, w.lag), (Role::Rollout, WorkerState::Alive, 3, 2));
    assert_eq!(w.counters.processed, 40);
    let e = c.register(Role::Learner, "x", "cpu").await.unwrap_err().to_string();
    assert!(e.contains("dist.learner_ranks = 1") && e.contains("a learner rank cannot join"), "{e}");
}

/// A learner that restarted numbers its workers from 1 again; a worker still
/// heartbeating under the id the learner before the restart gave it is told it
/// is gone (and registers again), never taken for the worker that now has its
/// number. (Two rollouts of a resumed run used to share one id.)
#[tokio::test]
async fn a_restarted_learner_tells_old_ids_from_its_own() {
    let first = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), None).await;
    let mut c = client(&first, None).await.unwrap();
    let old = c.register(Role::Rollout, "pod-a", "cpu").await.unwrap().worker_id;
    drop(first);
    let restarted = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), None).await;
    let mut c = client(&restarted, None).await.unwrap();
    let new = c.register(Role::Rollout, "pod-b", "cpu").await.unwrap().worker_id;
    assert!(old.starts_with("rollout-1-") && new.starts_with("rollout-1-") && old != new, "{old} {new}");
    let err = c.heartbeat(&old, 0, WorkerCounters::default()).await.unwrap_err();
    assert!(matches!(err, Error::Gone { .. }), "{err}");
    assert_eq!(c.heartbeat(&new, 0, WorkerCounters::default()).await.unwrap().shutdown, false);
}

#[tokio::test]
async fn a_silent_worker_is_marked_dead_and_survivors_hear_of_it() {
    let l = TestLearner::start(&dist(50, 300), grpc::Config::default(), None).await;
    let mut c = client(&l, None).await.unwrap();
    let silent = c.register(Role::Reward, "silent", "cpu").await.unwrap().worker_id;
    let counters = Arc::new(Counters::default());
    counters.processed.store(9, Relaxed);
    let (membership, task) = join(c.clone(), Role::Reward, "alive", "cpu", counters).await.unwrap();
    let mut m = membership.clone();
    let seen = eventually("the silent worker declared dead", Duration::from_secs(10), async || {
        let cur = m.borrow_and_update().clone();
        cur.dead_workers.contains(&silent).then_some(cur)
    })
    .await;
    assert_ne!(seen.worker_id, silent);
    let s = c.status().await.unwrap();
    let state = |id: &str| s.workers.iter().find(|w| w.worker_id == id).unwrap().state;
    assert_eq!(state(&silent), WorkerState::Dead);
    assert_eq!(state(&seen.worker_id), WorkerState::Alive);
    // a dead worker that comes back is told to register again
    let err = c.heartbeat(&silent, 0, Default::default()).await.unwrap_err();
    assert!(err.to_string().contains("register again"), "{err}");
    task.abort();
}

#[tokio::test]
async fn shutdown_reaches_workers_through_heartbeats() {
    let l = TestLearner::start(&dist(50, 1000), grpc::Config::default(), None).await;
    let c = client(&l, None).await.unwrap();
    let (mut membership, task) = join(c.clone(), Role::Rollout, "w", "cpu", Arc::new(Counters::default())).await.unwrap();
    let mut requested = l.control.shutdown_requested();
    c.clone().shutdown("", "done").await.unwrap();
    requested.changed().await.unwrap();
    assert_eq!(requested.borrow().as_deref(), Some("done"));
    eventually("workers told to stop", Duration::from_secs(10), async || membership.borrow_and_update().shutdown.then_some(())).await;
    task.await.unwrap(); // the heartbeat task ends by itself
    assert!(c.clone().register(Role::Rollout, "late", "cpu").await.unwrap_err().to_string().contains("shutting down"));
}

#[tokio::test]
async fn requests_without_the_right_token_are_refused_clearly() {
    let l = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), Some("s3cret-token")).await;
    let err = client(&l, None).await.unwrap().register(Role::Rollout, "w", "cpu").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Register refused") && text.contains("no bearer token"), "{text}");
    assert!(matches!(err, Error::Refused { rpc: "Register", .. }), "{err:?}");
    let err = client(&l, Some("guess")).await.unwrap().status().await.unwrap_err().to_string();
    assert!(err.contains("wrong bearer token") && !err.contains("s3cret"), "{err}");
    client(&l, Some("s3cret-token")).await.unwrap().register(Role::Rollout, "w", "cpu").await.unwrap();
}

#[tokio::test]
async fn an_unreachable_learner_is_a_clear_error_within_the_connect_timeout() {
    let cfg = grpc::Config { connect_timeout_ms: 300, request_timeout_ms: 1000, ..Default::default() };
    // nothing listens
    let port = crate::testing::free_port();
    let addr = format!("http://127.0.0.1:{port}");
    let err = ControlClient::connect(&cfg, Some(&addr), None).await.unwrap_err().to_string();
    assert!(err.starts_with(&format!("learner at {addr} did not answer within 300 ms")), "{err}");
    // something accepts connections but never speaks
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", silent.local_addr().unwrap());
    let err = ControlClient::connect(&cfg, Some(&addr), None).await.and_then(|_| Ok(())).err();
    if let Some(err) = err {
        assert!(err.to_string().contains(&addr), "{err}");
    } else {
        let mut c = ControlClient::connect(&cfg, Some(&addr), None).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(60), c.status()).await.expect("a deadline, not a hang").unwrap_err();
        assert!(err.to_string().contains(&addr), "{err}");
    }
}

/// The learner publishes a group's NCCL id in its own process; the ranks
/// get it over Control. No client may publish or replace one (it could take
/// rank 0's place in the group).
#[tokio::test]
async fn the_nccl_id_goes_from_rank_0_to_the_others() {
    let l = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), None).await;
    let mut rank1 = client(&l, None).await.unwrap();
    let waiting = tokio::spawn(async move { rank1.get_nccl_id("weights", Duration::from_secs(20)).await });
    let id: Vec<u8> = (0..128).map(|i| i as u8).collect();
    l.control.set_nccl_id("weights", id.clone(), 3);
    let got = waiting.await.unwrap().unwrap();
    assert_eq!((got.id, got.world_size), (id.clone(), 3));
    let mut other = client(&l, None).await.unwrap();
    let err = other.get_nccl_id("other", Duration::from_millis(100)).await.unwrap_err().to_string();
    assert!(err.contains("not published within 100 ms"), "{err}");
    let forged: Vec<u8> = vec![7; 128];
    let err = other.publish_nccl_id("weights", forged, 3).await.unwrap_err();
    assert!(matches!(err, crate::Error::Refused { .. }) && err.to_string().contains("only the learner"), "{err}");
    assert_eq!(other.get_nccl_id("weights", Duration::ZERO).await.unwrap().id, id, "the learner's id stands");
}

/// With NCCL weights, the first `nccl_rollouts` rollouts get ranks 1..=n of
/// the broadcast; later ones, reward workers, and a rollout registering again
/// with its rank get none, and the ranks are not handed out twice.
#[tokio::test]
async fn nccl_ranks_go_to_the_first_rollouts_once() {
    let config = crate::Config { weights: crate::WeightTransport::Nccl, nccl_rollouts: 2, ..dist(1000, 10_000) };
    let l = TestLearner::start(&config, grpc::Config::default(), None).await;
    let mut c = client(&l, None).await.unwrap();
    let rank = async |c: &mut ControlClient, role, held| c.register_again(role, "w", "cuda:0", held).await.unwrap().nccl_rank;
    assert_eq!(rank(&mut c, Role::Reward, 0).await, 0);
    let first = c.register(Role::Rollout, "w", "cuda:0").await.unwrap();
    assert_eq!(first.nccl_rank, 1);
    // A rank is claimed again only by the worker that held it, once it is
    // not alive: not while it lives, not by another worker.
    let refused = |e: crate::Error| assert!(matches!(e, crate::Error::Refused { .. }) && e.to_string().contains("not w"), "{e}");
    refused(c.register_again(Role::Rollout, "w", "cuda:0", 1).await.unwrap_err());
    c.shutdown(&first.worker_id, "restarting").await.unwrap();
    let e = c.register_again(Role::Rollout, "x", "cuda:0", 1).await.unwrap_err();
    assert!(matches!(e, crate::Error::Refused { .. }) && e.to_string().contains("not x's to claim"), "{e}");
    assert_eq!(rank(&mut c, Role::Rollout, 1).await, 1, "registering again keeps the rank it had");
    refused(c.register_again(Role::Rollout, "w", "cuda:0", 2).await.unwrap_err());
    assert_eq!(rank(&mut c, Role::Rollout, 0).await, 2);
    assert_eq!(rank(&mut c, Role::Rollout, 0).await, 0, "both ranks are taken");
    let ranks: Vec<u32> = c.status().await.unwrap().workers.iter().map(|w| w.nccl_rank).collect();
    assert_eq!(ranks, vec![0, 1, 1, 2, 0], "status shows each worker's rank");
    let grpc_only = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), None).await;
    let mut c = client(&grpc_only, None).await.unwrap();
    assert_eq!(rank(&mut c, Role::Rollout, 0).await, 0, "no ranks without dist.weights = nccl");
}

#[tokio::test]
async fn tls_with_a_private_ca() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let server = grpc::Config {
        tls_cert: cert_path.display().to_string(),
        tls_key: key_path.display().to_string(),
        ..Default::default()
    };
    let l = TestLearner::start(&dist(1000, 10_000), server, None).await;
    let cfg = grpc::Config { tls_ca: cert_path.display().to_string(), ..Default::default() };
    let mut c = ControlClient::connect(&cfg, Some(&l.addr), None).await.unwrap();
    assert_eq!(c.status().await.unwrap().run_id, "test-run");
    // plaintext to a TLS server does not get through
    let plain = l.addr.replace("https://", "http://");
    let r = match ControlClient::connect(&grpc::Config { connect_timeout_ms: 2000, ..cfg }, Some(&plain), None).await {
        Ok(mut c) => c.status().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err());
}

/// The certificates scripts/k8s-certs makes for the Kubernetes manifests
/// (an openssl CA and the learner's certificate for `learner-0.learner`):
/// a worker checking the learner against that CA, under that name, gets
/// through with its token; under another name it does not.
#[tokio::test]
async fn the_certificates_k8s_certs_makes_serve_the_learner() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s-certs");
    let out = std::process::Command::new(&script).arg(dir.path()).arg("prism").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = |n: &str| dir.path().join(n).display().to_string();
    let server = grpc::Config { tls_cert: file("tls.crt"), tls_key: file("tls.key"), ..Default::default() };
    let l = TestLearner::start(&dist(1000, 10_000), server, Some("k8s-token")).await;
    let port = l.addr.rsplit(':').next().unwrap().to_string();
    let token = grpc::Token::new("k8s-token").unwrap();
    let cfg = grpc::Config { tls_ca: file("ca.crt"), tls_domain: "learner-0.learner".into(), connect_timeout_ms: 5000, ..Default::default() };
    let mut c = ControlClient::connect(&cfg, Some(&format!("https://127.0.0.1:{port}")), Some(&token)).await.unwrap();
    assert_eq!(c.status().await.unwrap().run_id, "test-run");
    let wrong = grpc::Config { tls_domain: "someone-else".into(), connect_timeout_ms: 2000, ..cfg };
    let r = match ControlClient::connect(&wrong, Some(&format!("https://127.0.0.1:{port}")), Some(&token)).await {
        Ok(mut c) => c.status().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "a certificate for another name is refused");
}

/// Hands out prompt ids 0, 1, 2, ... and records what it hears.
#[derive(Default)]
struct FakeWork {
    next: Mutex<u64>,
    delivered: Mutex<Vec<(String, Vec<u64>, u64)>>,
    failed: Mutex<Vec<String>>,
}

#[tonic::async_trait]
impl WorkSource for FakeWork {
    async fn get_work(&self, _worker: &str, max: usize, _wait: Duration) -> Option<Vec<Assignment>> {
        let mut next = self.next.lock().unwrap();
        let out = (0..max as u64).map(|i| Assignment { group: GroupId(*next + i), prompt: crate::testing::trajectory(0, 1).prompt, min_version: PolicyVersion(0) }).collect();
        *next += max as u64;
        Some(out)
    }
    fn delivered(&self, worker: &str, groups: &[u64], trajectories: u64, _tokens: u64, _generate_s: f64) {
        self.delivered.lock().unwrap().push((worker.into(), groups.to_vec(), trajectories));
    }
    fn worker_failed(&self, worker: &str) {
        self.failed.lock().unwrap().push(worker.into());
    }
}

#[tokio::test]
async fn rollout_workers_get_prompts_report_deliveries_and_their_death_reissues_them() {
    let l = TestLearner::start(&dist(50, 300), grpc::Config::default(), None).await;
    let mut c = client(&l, None).await.unwrap();
    let r = c.register(Role::Rollout, "w", "cpu").await.unwrap();
    let err = c.get_work(&r.worker_id, 2, Duration::from_millis(10)).await.unwrap_err();
    assert!(matches!(err, Error::NotReady { .. }) && err.to_string().contains("not handing out prompts yet"), "{err}");
    let work = Arc::new(FakeWork::default());
    l.control.set_work_source(work.clone());
    let got = c.get_work(&r.worker_id, 2, Duration::from_millis(10)).await.unwrap().unwrap();
    assert_eq!(got.iter().map(|a| a.group.0).collect::<Vec<_>>(), vec![0, 1]);
    c.delivered(&r.worker_id, vec![0, 1], 8, 64, 0.5).await.unwrap();
    assert_eq!(work.delivered.lock().unwrap()[0], (r.worker_id.clone(), vec![0, 1], 8));
    // it stops heartbeating: declared dead by the sweeper, the work source hears of it
    let sweeper = l.control.spawn_sweeper();
    eventually("the worker declared dead", Duration::from_secs(10), async || {
        (!work.failed.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    sweeper.abort();
    assert_eq!(*work.failed.lock().unwrap(), vec![r.worker_id.clone()]);
    let err = c.get_work(&r.worker_id, 1, Duration::from_millis(10)).await.unwrap_err();
    assert!(matches!(err, Error::Gone { .. }) && err.to_string().contains("register again"), "{err}");
    // once the run stops, workers are told so
    let r2 = c.register(Role::Rollout, "w2", "cpu").await.unwrap();
    l.control.request_shutdown("done");
    assert_eq!(c.get_work(&r2.worker_id, 1, Duration::from_millis(10)).await.unwrap(), None);
}

fn reward_health(depth: u64) -> prism_reward::Health {
    prism_reward::Health {
        judge_wait_ms: Some(0),
        judge_latency_ms: Some(prism_reward::LatencyMs { p50: 1480.0, p95: 2900.0 }),
        annotation_queue: Some(prism_reward::QueueHealth {
            depth,
            capacity: 1024,
            busy: 4,
            queued: 300,
            judged: 280,
            shed: 3,
            untrusted: 1,
        }),
        canary_fp_rate: Some(0.0),
        canary_max_rate: Some(0.05),
        judge_trusted: Some(true),
        distill_agreement: Some(0.87),
        distill_min_agreement: Some(0.75),
        distill_ready: Some(true),
        judge_budget_refused: Some(2),
        ..Default::default()
    }
}

/// A reward worker's heartbeats carry its labeler's health; the learner keeps
/// the latest and shows it in the status.
#[tokio::test]
async fn a_reward_workers_health_reaches_the_status_with_its_heartbeats() {
    let l = TestLearner::start(&dist(30, 10_000), grpc::Config::default(), None).await;
    let c = client(&l, None).await.unwrap();
    let now = Arc::new(Mutex::new(reward_health(12)));
    let counters = Arc::new(Counters::default());
    let source = now.clone();
    counters.report_health(Arc::new(move || Some(source.lock().unwrap().clone())));
    let (membership, task) = join(c.clone(), Role::Reward, "judge-box", "cpu", counters).await.unwrap();
    let id = membership.borrow().worker_id.clone();
    let (_, rollout_task) = join(c.clone(), Role::Rollout, "gpu-box", "cpu", Arc::new(Counters::default())).await.unwrap();
    let health = eventually("the health in the status", Duration::from_secs(10), async || {
        let s = c.clone().status().await.unwrap();
        s.workers.iter().find(|w| w.worker_id == id)?.reward_health.clone()
    })
    .await;
    assert_eq!(health, reward_health(12), "every field survives the wire");
    // The latest heartbeat's health replaces the one before.
    *now.lock().unwrap() = reward_health(40);
    eventually("the newer health", Duration::from_secs(10), async || {
        (l.control.reward_health() == vec![(id.clone(), reward_health(40))]).then_some(())
    })
    .await;
    let s = c.clone().status().await.unwrap();
    let rollout = s.workers.iter().find(|w| w.role == Role::Rollout).unwrap();
    assert_eq!(rollout.reward_health, None, "a worker without a judge reports none");
    // An empty health (no judge) still round-trips as empty.
    assert_eq!(health_from_wire(health_to_wire(&prism_reward::Health::default())), prism_reward::Health::default());
    task.abort();
    rollout_task.abort();
}

/// A step's groups travel whole in one GetStep answer: a step larger than
/// tonic's default 4 MiB decode limit still reaches the learner ranks.
#[tokio::test]
async fn a_step_larger_than_four_mib_reaches_the_learner_ranks() {
    let config = crate::Config { learner_ranks: 2, ..dist(1000, 10_000) };
    let l = TestLearner::start(&config, grpc::Config::default(), None).await;
    let mut c = client(&l, None).await.unwrap();
    let rank = c.register(Role::Learner, "rank-1", "cuda:1").await.unwrap();
    // 8 trajectories of 100k tokens: about 8 MB on the wire.
    let group: Vec<_> = (0..8).map(|i| crate::testing::labeled(i, 100_000)).collect();
    l.control.publish_step(1, std::slice::from_ref(&group));
    match c.get_step(&rank.worker_id, 0, Duration::ZERO).await.unwrap() {
        StepPoll::Ready(step) => assert_eq!(step.groups, vec![group]),
        other => panic!("step 0 is published: {other:?}"),
    }
}

/// A caller may ask to wait as long as it likes: the client asks for at most
/// a minute (tonic panics on a deadline past ~11,000 years), the learner holds
/// a long poll at most a minute whatever a request says (a `wait_ms` of
/// u64::MAX overflowed the handler's deadline), and both answer as soon as
/// they can.
#[tokio::test]
async fn the_longest_wait_is_served_not_a_panic() {
    let l = TestLearner::start(&dist(1000, 10_000), grpc::Config::default(), None).await;
    let mut rank1 = client(&l, None).await.unwrap();
    let waiting = tokio::spawn(async move { rank1.get_nccl_id("weights", Duration::from_millis(u64::MAX)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    l.control.set_nccl_id("weights", vec![7; crate::nccl::UNIQUE_ID_BYTES], 2);
    let got = tokio::time::timeout(Duration::from_secs(30), waiting).await.expect("answered within the cap").unwrap().unwrap();
    assert_eq!((got.id.len(), got.world_size), (crate::nccl::UNIQUE_ID_BYTES, 2));
    // A request straight off the wire, as another client could send it.
    let mut raw = prism_proto::v1::control_client::ControlClient::connect(l.addr.clone()).await.unwrap();
    let request = prism_proto::v1::GetNcclIdRequest { group: "weights".into(), wait_ms: u64::MAX };
    let id = tokio::time::timeout(Duration::from_secs(30), raw.get_nccl_id(request)).await.expect("answered").unwrap().into_inner();
    assert_eq!(id.world_size, 2);
}
