//! The local pipeline with small stand-in backends: accounting, staleness,
//! back-pressure, supervision (panics injected through the backends), and
//! clean interruption.

use prism_actors::backend::{
    Assignment, BackendResult, DropReason, EvalReport, Factory, Generate, Label, LabelFuture, SourcePosition, StepReport, Train, WeightSet,
};
use prism_actors::{Finish, LearnerPlan, PipelineSpec, StalePolicy, Summary};
use prism_core::{FinishReason, PolicyVersion, RewardLabel, ScoreSource, Trajectory, TrajectoryId};
use prism_rollout::Task;
use prism_rollout::curriculum::{self, Curriculum};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const G: usize = 4;

/// Samples G trajectories per prompt; can be told to panic on given calls.
struct FakeGen {
    calls: Arc<AtomicUsize>,
    panic_on: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    version: PolicyVersion,
}

impl Generate for FakeGen {
    fn load_weights(&mut self, w: &WeightSet) -> BackendResult<()> {
        self.version = w.version;
        Ok(())
    }

    fn generate(&mut self, work: &[Assignment], version: PolicyVersion) -> BackendResult<Vec<Vec<Trajectory>>> {
        assert_eq!(version, self.version, "tagged with the loaded weights");
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if (self.panic_on)(call) {
            panic!("injected rollout panic on call {call}");
        }
        std::thread::sleep(Duration::from_millis(2));
        Ok(work
            .iter()
            .map(|a| {
                assert!(version >= a.min_version, "sampled by weights older than the assignment allows");
                (0..G)
                    .map(|s| Trajectory {
                        id: TrajectoryId(a.group.0 * G as u64 + s as u64),
                        group: a.group,
                        sample: s as u32,
                        group_size: G as u32,
                        prompt: a.prompt.clone(),
                        policy_version: version,
                        prompt_tokens: vec![1, 2],
                        tokens: vec![3, 4, 5],
                        logprobs: vec![-0.5; 3],
                        text: "abc".into(),
                        token_ends: vec![1, 2, 3],
                        // The last sample of a group stands for one stopped by early rejection.
                        finish: if s == G - 1 { FinishReason::Rejected } else { FinishReason::Eos },
                        generate_ms: 2,
                        version_changes: Vec::new(),
                    })
                    .collect()
            })
            .collect())
    }
}

/// Outcome = sample is odd, except groups whose id is a multiple of
/// `uniform_every`, which all score 0 (zero variance).
struct FakeLabel {
    delay: Duration,
    uniform_every: u64,
    panic_once_on: Option<TrajectoryId>,
    panicked: AtomicUsize,
}

impl Label for FakeLabel {
    fn label<'a>(&'a self, t: &'a Trajectory) -> LabelFuture<'a> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if Some(t.id) == self.panic_once_on && self.panicked.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("injected reward panic on trajectory {}", t.id);
            }
            let uniform = self.uniform_every > 0 && t.group.0 % self.uniform_every == 0;
            let outcome = if uniform { 0.0 } else { (t.sample % 2) as f32 };
            Ok(RewardLabel { outcome, outcome_source: ScoreSource::Verifier, answer: None, steps: vec![] })
        })
    }
}

#[derive(Default)]
struct TrainLog {
    checkpoints: Mutex<Vec<(u64, u64)>>,
    trained_ids: Mutex<Vec<TrajectoryId>>,
    /// Operators in each trained group's arithmetic problem.
    trained_operators: Mutex<Vec<usize>>,
}

struct FakeTrain {
    version: u64,
    log: Arc<TrainLog>,
    step_delay: Duration,
}

impl Train for FakeTrain {
    fn version(&self) -> PolicyVersion {
        PolicyVersion(self.version)
    }
    fn weights(&self) -> BackendResult<Arc<WeightSet>> {
        Ok(WeightSet::new(PolicyVersion(self.version), vec![("w".into(), tch::Tensor::from(self.version as f32))]))
    }
    fn admit(&self, group: &[prism_core::LabeledTrajectory]) -> Result<(), DropReason> {
        let first = group[0].label.outcome;
        if group.iter().all(|l| l.label.outcome == first) { Err(DropReason::ZeroAdvantage) } else { Ok(()) }
    }
    fn train(&mut self, groups: Vec<Vec<prism_core::LabeledTrajectory>>, lags: &[u64]) -> BackendResult<StepReport> {
        assert_eq!(groups.len(), lags.len());
        std::thread::sleep(self.step_delay);
        let mut ids = self.log.trained_ids.lock().unwrap();
        for g in &groups {
            assert_eq!(g.len(), G, "only complete groups are trained");
            ids.extend(g.iter().map(|l| l.trajectory.id));
            let problem = &g[0].trajectory.prompt.problem;
            self.log.trained_operators.lock().unwrap().push(problem.chars().filter(|c| "+-*".contains(*c)).count());
        }
        self.version += 1;
        Ok(StepReport { trajectories: groups.iter().map(Vec::len).sum(), stats: [("loss".to_string(), 0.5)].into() })
    }
    fn evaluate(&mut self) -> BackendResult<EvalReport> {
        Ok(EvalReport { accuracy: self.version as f64 / 100.0, step_accuracy: None, problems: 10 })
    }
    fn checkpoint(&mut self, position: &SourcePosition) -> BackendResult<()> {
        self.log.checkpoints.lock().unwrap().push((self.version, position.prompt_cursor));
        Ok(())
    }
}

struct Setup {
    max_steps: u64,
    max_staleness: u64,
    batch_groups: usize,
    rollout_workers: usize,
    label: FakeLabel,
    panic_on: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    restart_limit: usize,
    step_delay: Duration,
    curriculum: Curriculum,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            max_steps: 5,
            max_staleness: 0,
            batch_groups: 4,
            rollout_workers: 2,
            label: FakeLabel { delay: Duration::ZERO, uniform_every: 0, panic_once_on: None, panicked: AtomicUsize::new(0) },
            panic_on: Arc::new(|_| false),
            restart_limit: 5,
            step_delay: Duration::from_millis(5),
            curriculum: Curriculum::new(&Default::default(), 0, None),
        }
    }
}

struct Outcome {
    result: Result<Summary, prism_actors::Error>,
    log: Arc<TrainLog>,
    metrics: Vec<serde_json::Value>,
    gen_calls: usize,
}

async fn run(setup: Setup, shutdown: impl std::future::Future<Output = ()>) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let metrics_path = dir.path().join("metrics.jsonl");
    let calls = Arc::new(AtomicUsize::new(0));
    let panic_on = setup.panic_on.clone();
    let calls_in = calls.clone();
    let generator: Factory<Box<dyn Generate>> = Arc::new(move || {
        Ok(Box::new(FakeGen { calls: calls_in.clone(), panic_on: panic_on.clone(), version: PolicyVersion(0) }) as Box<dyn Generate>)
    });
    let log = Arc::new(TrainLog::default());
    let task = Task::new(&prism_rollout::task::Config::default(), 0, Box::new(|q| q.to_string())).unwrap();
    let config = prism_actors::Config {
        reward_workers: 3,
        restart_limit: setup.restart_limit,
        restart_backoff_ms: 5,
        restart_backoff_max_ms: 20,
        shutdown_timeout_s: 20.0,
        ..Default::default()
    };
    let spec = PipelineSpec {
        task: Arc::new(task),
        cursor: 0,
        curriculum: setup.curriculum.clone(),
        generator,
        labeler: Arc::new(setup.label),
        trainer: Box::new(FakeTrain { version: 0, log: log.clone(), step_delay: setup.step_delay }),
        plan: LearnerPlan {
            batch_groups: setup.batch_groups,
            max_staleness: setup.max_staleness,
            stale: StalePolicy::Drop,
            max_steps: setup.max_steps,
            time_limit: None,
            eval_every: 2,
            checkpoint_every: 0,
        },
        rollout_workers: setup.rollout_workers,
        prompts_per_batch: 2,
        config,
        metrics_path: Some(metrics_path.clone()),
        progress: tokio::sync::watch::channel(Default::default()).0,
    };
    let result = tokio::time::timeout(Duration::from_secs(60), prism_actors::run(spec, shutdown))
        .await
        .expect("the pipeline must finish, not hang");
    let metrics = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics.jsonl lines are JSON"))
        .collect();
    Outcome { result, log, metrics, gen_calls: calls.load(Ordering::SeqCst) }
}

fn steps(m: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    m.iter().filter(|l| l["kind"] == "step").collect()
}

fn assert_trained_once(log: &TrainLog) {
    let ids = log.trained_ids.lock().unwrap();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "no trajectory is trained twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_run_trains_on_policy_and_balances() {
    let out = run(Setup::default(), std::future::pending()).await;
    let summary = out.result.unwrap();
    assert_eq!(summary.finish, Finish::MaxSteps);
    let l = &summary.ledger;
    assert!(l.balanced(), "{l}");
    assert_eq!(l.trained, 5 * 4 * G as u64);
    let steps = steps(&out.metrics);
    assert_eq!(steps.len(), 5);
    for s in &steps {
        assert_eq!(s["lag_max"], 0, "max_staleness 0 means on-policy: {s}");
    }
    // evaluations: before training, every 2 steps, and at the end
    let evals: Vec<u64> = out.metrics.iter().filter(|l| l["kind"] == "eval").map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, vec![0, 2, 4, 5]);
    // a final checkpoint with the cursor
    let cps = out.log.checkpoints.lock().unwrap().clone();
    assert_eq!(cps.last().unwrap().0, 5);
    assert!(cps.last().unwrap().1 >= 20, "cursor counts issued prompts: {cps:?}");
    assert_trained_once(&out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_run_bounds_lag_and_in_flight_work() {
    let setup = Setup {
        max_staleness: 2,
        max_steps: 8,
        label: FakeLabel { delay: Duration::from_millis(3), uniform_every: 0, panic_once_on: None, panicked: AtomicUsize::new(0) },
        step_delay: Duration::from_millis(20),
        ..Setup::default()
    };
    let out = run(setup, std::future::pending()).await;
    let summary = out.result.unwrap();
    assert!(summary.ledger.balanced(), "{}", summary.ledger);
    let steps = steps(&out.metrics);
    let max_lag = steps.iter().map(|s| s["lag_max"].as_u64().unwrap()).max().unwrap();
    assert!(max_lag <= 2, "lag bounded by max_staleness");
    assert!(max_lag >= 1, "a slow learner with max_staleness 2 does train on older samples");
    // Never more than batch × (1 + max_staleness) groups in the system.
    let bound = 4 * 3 * G as u64;
    for s in steps {
        let dropped: u64 = s["dropped"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
        let held = s["made"].as_u64().unwrap() - s["trained"].as_u64().unwrap() - dropped;
        assert!(held <= bound, "{held} trajectories in flight > {bound}");
    }
    assert_trained_once(&out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_advantage_groups_are_dropped_and_counted() {
    let setup = Setup {
        label: FakeLabel { delay: Duration::ZERO, uniform_every: 3, panic_once_on: None, panicked: AtomicUsize::new(0) },
        ..Setup::default()
    };
    let out = run(setup, std::future::pending()).await;
    let l = out.result.unwrap().ledger;
    assert!(l.balanced(), "{l}");
    assert!(l.dropped["zero_advantage"] > 0, "{l}");
    assert_eq!(l.dropped["zero_advantage"] % G as u64, 0, "whole groups are dropped");
    // Early-rejected trajectories are counted (one per group) with their tokens.
    assert_eq!((l.rejected, l.rejected_tokens), (l.made / G as u64, 3 * l.made / G as u64), "{l}");
    assert!(out.metrics.iter().filter(|m| m["kind"] == "step").all(|m| m["rejected"].as_u64().is_some()));
    assert_eq!(l.trained, 5 * 4 * G as u64, "dropped groups are replaced, batches stay full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_rollout_worker_is_restarted_and_its_prompts_reissued() {
    let setup = Setup { panic_on: Arc::new(|call| call == 1 || call == 4), ..Setup::default() };
    let out = run(setup, std::future::pending()).await;
    let summary = out.result.unwrap();
    assert_eq!(summary.finish, Finish::MaxSteps);
    assert!(summary.ledger.balanced(), "{}", summary.ledger);
    let restarts: Vec<_> = out.metrics.iter().filter(|l| l["kind"] == "restart").collect();
    assert_eq!(restarts.len(), 2, "{restarts:?}");
    for r in restarts {
        assert!(r["actor"].as_str().unwrap().starts_with("rollout-"));
        assert!(r["error"].as_str().unwrap().contains("injected rollout panic"), "{r}");
    }
    assert!(out.gen_calls > 2);
    assert_trained_once(&out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_reward_worker_is_restarted_and_the_trajectory_relabeled() {
    let setup = Setup {
        label: FakeLabel {
            delay: Duration::ZERO,
            uniform_every: 0,
            panic_once_on: Some(TrajectoryId(5)),
            panicked: AtomicUsize::new(0),
        },
        ..Setup::default()
    };
    let out = run(setup, std::future::pending()).await;
    let summary = out.result.unwrap();
    assert!(summary.ledger.balanced(), "{}", summary.ledger);
    assert!(summary.ledger.dropped.get("reward_failed").is_none(), "retried, not dropped: {}", summary.ledger);
    let restarts: Vec<_> = out.metrics.iter().filter(|l| l["kind"] == "restart").collect();
    assert_eq!(restarts.len(), 1);
    assert!(restarts[0]["actor"].as_str().unwrap().starts_with("reward-worker-"));
    assert!(restarts[0]["error"].as_str().unwrap().contains("injected reward panic on trajectory 5"));
    assert!(out.log.trained_ids.lock().unwrap().contains(&TrajectoryId(5)), "the relabeled trajectory is trained");
    assert_trained_once(&out.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_restarts_fail_the_run_naming_the_actor() {
    let setup = Setup { panic_on: Arc::new(|_| true), rollout_workers: 1, restart_limit: 2, ..Setup::default() };
    let out = run(setup, std::future::pending()).await;
    let e = out.result.unwrap_err().to_string();
    assert!(e.starts_with("rollout-0 failed 3 times within"), "{e}");
    assert!(e.contains("injected rollout panic"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interruption_stops_cleanly_with_a_final_checkpoint() {
    let setup = Setup { max_steps: 1_000_000, step_delay: Duration::from_millis(10), ..Setup::default() };
    let done = Arc::new(AtomicU64::new(0));
    let shutdown = {
        let done = done.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            done.store(1, Ordering::SeqCst);
        }
    };
    let out = run(setup, shutdown).await;
    let summary = out.result.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 1);
    assert_eq!(summary.finish, Finish::Interrupted);
    assert!(summary.ledger.balanced(), "{}", summary.ledger);
    let cps = out.log.checkpoints.lock().unwrap().clone();
    let last_version = steps(&out.metrics).last().map_or(0, |s| s["step"].as_u64().unwrap());
    assert_eq!(cps.last().unwrap().0, last_version, "final checkpoint at the last trained version");
    assert_trained_once(&out.log);
}

/// `task.adaptive` on the arithmetic task: every other group is uniform (all
/// wrong), so the pass rate is 0.25 against a target of 0.2 and the
/// difficulty rises; the step rows record the uniform share, the level and
/// the groups retired, and the learner trains on problems with more
/// operators than the task's [2, 3].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curriculum_adapts_the_difficulty_and_the_metrics_record_it() {
    let adaptive = curriculum::Config { enabled: true, target: 0.2, band: 0.01, window: 8, max_level: 2, ..Default::default() };
    let out = run(
        Setup {
            max_steps: 12,
            label: FakeLabel { delay: Duration::ZERO, uniform_every: 2, panic_once_on: None, panicked: AtomicUsize::new(0) },
            curriculum: Curriculum::new(&adaptive, 0, None),
            ..Default::default()
        },
        std::future::pending(),
    )
    .await;
    out.result.unwrap();
    let steps = steps(&out.metrics);
    let (mut retired, mut uniform) = (0.0, 0.0);
    for s in &steps {
        let n = s["retired_groups"].as_f64().unwrap();
        retired += n;
        uniform += n * s["uniform_share"].as_f64().unwrap_or(0.0);
        assert_eq!(s["skipped_prompts"], 0, "no dataset, nothing skipped");
    }
    assert!(retired >= 48.0, "every trained or dropped group is counted: {retired}");
    assert!((uniform / retired - 0.5).abs() < 0.1, "half the groups are uniform: {uniform} of {retired}");
    assert_eq!(steps.last().unwrap()["difficulty"], 2, "{}", steps.last().unwrap());
    let ops = out.log.trained_operators.lock().unwrap();
    assert!(ops[..4].iter().all(|&n| (2..=3).contains(&n)), "the first problems are the task's: {ops:?}");
    assert!(ops.iter().rev().take(4).all(|&n| (4..=5).contains(&n)), "the last ones are two levels harder: {ops:?}");
}
