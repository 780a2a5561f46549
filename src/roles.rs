//! `prism learner`, `prism learner-rank`, `prism rollout`, `prism reward`: the
//! roles of a distributed run, each its own process, composed from the same backends as `prism train`
//! and connected by Redis Streams (trajectories) and the learner's gRPC
//! services (control, weights).

use crate::config::Config;
use crate::run_dir::RunDir;
use crate::telemetry;
use crate::train::{self, Prepared};
use anyhow::{Context, Result, bail};
use prism_transport::control::{self, Control, ControlClient, Counters, NcclId, Role};
use prism_transport::grpc::{self, Token};
use prism_transport::health::Health;
use prism_transport::redis::{Redis, RunKeys, Seal};
use prism_transport::weights::{Weights, WeightsClient};
use prism_actors::remote::{learner, learner_rank, reward, rollout};
use prism_transport::{metrics, nccl, nccl_weights};
use prism_actors::adapters::{ModelGenerator, RankLearner, RewardLabeler};
use prism_model::Loaded;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The CUDA device index of `model.device` for the NCCL collectives that
/// `setting` asks for (`instead`: what to do without a GPU), after checking
/// that NCCL runs here. Fails before anything starts on a machine without it.
fn nccl_cuda(config: &Config, setting: &str, instead: &str) -> Result<usize> {
    let device = prism_model::parse_device(&config.model.device).context("model.device")?;
    let tch::Device::Cuda(index) = device else {
        bail!(
            "{setting} runs NCCL collectives between GPUs, but model.device = {:?}: set model.device = \"cuda\" (or cuda:N), \
             or {instead}",
            config.model.device
        );
    };
    let probe = nccl::probe().with_context(|| setting.to_string())?;
    tracing::info!(nccl_version = probe.nccl_version, devices = probe.devices, device = index, "NCCL available");
    Ok(index)
}

/// With `dist.weights = "nccl"`: the CUDA device of the weight broadcast.
fn nccl_device(config: &Config) -> Result<Option<usize>> {
    if config.dist.weights != prism_transport::WeightTransport::Nccl {
        return Ok(None);
    }
    nccl_cuda(config, "dist.weights = \"nccl\"", "use dist.weights = \"grpc\"").map(Some)
}

/// With `dist.learner_ranks > 1`: the CUDA device of the gradient all-reduce.
fn data_parallel_device(config: &Config) -> Result<Option<usize>> {
    if config.dist.learner_ranks <= 1 {
        return Ok(None);
    }
    let setting = format!("dist.learner_ranks = {}", config.dist.learner_ranks);
    nccl_cuda(config, &setting, "train on one learner (dist.learner_ranks = 1)").map(Some)
}

/// The NCCL group the learner broadcasts weights in.
const WEIGHTS_GROUP: &str = "weights";

/// Every NCCL communicator's timeout and bucket size in bytes, from `[dist]`.
fn nccl_limits(config: &Config) -> (Duration, usize) {
    (Duration::from_millis(config.dist.nccl_timeout_ms), (config.dist.nccl_bucket_mb as usize).saturating_mul(1 << 20))
}

/// How the data-parallel learner ranks shard the optimizer (`dist.shard`).
fn sharding(config: &Config) -> Option<prism_learner::optim::sharded::Sharding> {
    use prism_learner::optim::sharded::{Sharding, Stage};
    let stage = match config.dist.shard {
        prism_transport::Shard::None => return None,
        prism_transport::Shard::Optimizer => Stage::Optimizer,
        prism_transport::Shard::Gradients => Stage::Gradients,
    };
    Some(Sharding { stage, bucket_bytes: nccl_limits(config).1 })
}

/// How to join the weight-broadcast communicator as `rank` of `world`.
fn join_nccl(config: &Config, id: Vec<u8>, rank: usize, world: usize, device: usize) -> nccl_weights::Join {
    let (timeout, bucket) = nccl_limits(config);
    Box::new(move || {
        let comm = nccl::Communicator::new(&id, rank, world, device, timeout, bucket)?;
        Ok(Box::new(comm) as Box<dyn nccl_weights::Collective>)
    })
}

fn threads(config: &Config) {
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
}

/// Serves `/livez` and `/readyz` on `dist.health_listen` (unless empty).
async fn health(config: &Config) -> Result<Health> {
    let stuck_after = (config.dist.stuck_after_ms > 0).then(|| Duration::from_millis(config.dist.stuck_after_ms));
    let health = Health::new().stuck_after(stuck_after);
    if !config.dist.health_listen.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.dist.health_listen)
            .await
            .with_context(|| format!("dist.health_listen = {}: cannot listen", config.dist.health_listen))?;
        let h = health.clone();
        tokio::spawn(async move {
            if let Err(e) = h.serve(listener, std::future::pending()).await {
                tracing::error!(error = %e, "health endpoints stopped");
            }
        });
    }
    Ok(health)
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Refuses a learner whose gRPC services other hosts can reach without a
/// token (unless `grpc.insecure = true` says so), before anything starts.
pub fn check_exposure(config: &Config) -> Result<()> {
    let token = Token::from_config(&config.grpc)?;
    config.grpc.check_exposure(token.as_ref())?;
    if token.is_none() && config.grpc.insecure {
        tracing::warn!(listen = %config.grpc.listen, "grpc.insecure = true: serving Control and Weights without a token");
        eprintln!("prism: warning: grpc.insecure = true: {} serves the run without a token", config.grpc.listen);
    }
    Ok(())
}

/// `prism learner [--resume RUN]`: prompts, training, checkpoints, and the
/// Control and Weights services on `grpc.listen`.
pub fn learner(config: &Config, resume: Option<&Path>) -> Result<()> {
    if config.learner.is_sft() {
        bail!("prism learner trains RL only; run learner.mode = \"sft\" with prism train");
    }
    let nccl_device = nccl_device(config)?;
    let dp_device = data_parallel_device(config)?;
    let run = match resume {
        Some(dir) => RunDir::open(dir).with_context(|| format!("{}: not a run folder", dir.display()))?,
        None => RunDir::create(&config.run.dir, &config.to_toml()).context("creating the run folder")?,
    };
    let _telemetry = telemetry::init_role(&config.log, Some(&run.path), "learner", &config.dist.run_id).context("opening trace.jsonl")?;
    threads(config);
    tracing::info!(run_id = %run.id, run = %run.path.display(), dist_run = %config.dist.run_id, "run folder");
    let result = runtime()?.block_on(learner_main(config, &run, resume.is_some(), nccl_device, dp_device));
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "run failed");
    }
    result
}

async fn learner_main(config: &Config, run: &RunDir, resuming: bool, nccl_device: Option<usize>, dp_device: Option<usize>) -> Result<()> {
    let started = Instant::now();
    let token = Token::from_config(&config.grpc)?;
    let seal = token.as_ref().map(Seal::new);
    let health = health(config).await?;
    let control = Control::new(&config.dist.run_id, &config.dist);
    health.add_metrics(metrics::learner(control.clone()));
    let weights = Weights::new(config.grpc.chunk_bytes);
    let listener = tokio::net::TcpListener::bind(&config.grpc.listen)
        .await
        .with_context(|| format!("grpc.listen = {}: cannot listen", config.grpc.listen))?;
    let (stop_grpc, grpc_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let (grpc_cfg, control, weights) = (config.grpc.clone(), control.clone(), weights.clone());
        tokio::spawn(async move {
            grpc::serve(listener, &grpc_cfg, token, &control, &weights, async {
                let _ = grpc_stopped.await;
            })
            .await
        })
    };
    let sweeper = control.spawn_sweeper();
    // Entries are sealed with the run's token, and checked with it.
    let redis = Redis::connect(&config.redis).await?.sealed(seal);
    let keys = RunKeys::new(&config.redis.prefix, &config.dist.run_id);
    if !resuming {
        // A fresh run must not train on, or skip as already seen, what an
        // earlier run of the same `dist.run_id` left behind.
        redis.reset_run(&keys).await?;
    }
    let Prepared { mut trainer, version, cursor, curriculum, task, .. } = train::prepare(config, run, resuming).await?;
    if resuming {
        // The checkpoint knows none of what the crashed learner left in the
        // streams (some of it sampled by weights it never saved): it goes,
        // and the prompts past the checkpoint are issued again under new ids.
        let (sampled, labeled) = redis.clear_streams(&keys).await?;
        if sampled + labeled > 0 {
            tracing::warn!(sampled, labeled, "resuming: cleared the entries the earlier learner left in the streams");
        }
    }
    let first_group = redis.issued_below(&keys).await?.max(cursor);
    if let Some(device) = dp_device {
        // Rank 0 of the data-parallel learners; `prism learner-rank` processes
        // register for ranks 1.. and join with this id. Blocks until they have.
        let world = config.dist.learner_ranks as usize;
        let id = nccl::unique_id()?;
        control.set_nccl_id(learner_rank::GROUP, id.clone(), world as u32);
        tracing::info!(world, device, "data-parallel learner: waiting for the other ranks");
        let (timeout, bucket) = nccl_limits(config);
        let sharding = sharding(config);
        if sharding.is_some() {
            // The ranks hold shares of the optimizer state: each checkpoint
            // rank 0 writes asks them for theirs.
            let control = control.clone();
            trainer = trainer.before_checkpoint(Arc::new(move || control.publish_checkpoint()));
        }
        trainer = tokio::task::spawn_blocking(move || -> Result<_> {
            let comm = nccl::Communicator::new(&id, 0, world, device, timeout, bucket).context("forming the data-parallel learner group")?;
            trainer.join_data_parallel(Box::new(comm), sharding).map_err(anyhow::Error::msg)?;
            Ok(trainer)
        })
        .await??;
        tracing::info!(world, "data-parallel learner ranks joined");
    }
    let broadcast = match nccl_device {
        None => None,
        Some(device) => {
            // Rank 0; the rollouts that registered for ranks 1..=n join with this id.
            let world = 1 + config.dist.nccl_rollouts as usize;
            let id = nccl::unique_id()?;
            control.set_nccl_id(WEIGHTS_GROUP, id.clone(), world as u32);
            tracing::info!(world, device, "NCCL weight broadcast: waiting for the rollout ranks");
            Some(nccl_weights::Sender::spawn(join_nccl(config, id, 0, world, device))?)
        }
    };
    tracing::info!(listen = %config.grpc.listen, redis = %redis.url(), policy_version = version, "learner ready");
    health.set_ready(true);
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(Default::default());
    let drawer = crate::progress::spawn(
        progress_rx,
        crate::progress::Goal {
            first_step: version,
            max_steps: config.train.steps,
            time_limit: (config.train.time_limit_s > 0.0).then(|| Duration::from_secs_f64(config.train.time_limit_s)),
        },
    );
    let role = learner::LearnerRole {
        trainer: Box::new(trainer),
        plan: train::plan(config),
        task,
        cursor,
        curriculum,
        first_group,
        group_timeout: (config.dist.group_timeout_ms > 0).then(|| Duration::from_millis(config.dist.group_timeout_ms)),
        control,
        weights,
        redis,
        keys,
        metrics_path: Some(run.path.join("metrics.jsonl")),
        progress: progress_tx,
        drain: Duration::from_millis(config.dist.dead_after_ms.max(config.grpc.request_timeout_ms)),
        broadcast,
        learner_ranks: config.dist.learner_ranks as usize,
        health: health.clone(),
    };
    let summary = learner::run(role, &config.redis, train::ctrl_c()).await.map_err(anyhow::Error::msg);
    let _ = drawer.await;
    let _ = stop_grpc.send(());
    sweeper.abort();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server"),
        Err(_) => tracing::warn!("gRPC server did not stop within 5 s"),
        _ => {}
    }
    train::finish(config, run, version, &summary?, started)
}

/// The weight group's NCCL id, which the learner publishes once its warm start
/// is done (asked again until then).
async fn nccl_id(control: &ControlClient) -> Result<NcclId> {
    let started = Instant::now();
    let mut control = control.clone();
    loop {
        match control.wait_nccl_id(WEIGHTS_GROUP, Duration::from_secs(10)).await {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => tracing::info!(waited_s = started.elapsed().as_secs(), "the learner has not published the NCCL id yet (warm start?)"),
            Err(e) => return Err(e).context("asking the learner for the NCCL weight group's id"),
        }
    }
}

/// Connects to the learner and joins the run as `role`.
async fn join(
    config: &Config,
    role: Role,
    device: &str,
) -> Result<(ControlClient, Option<Token>, Arc<Counters>, tokio::sync::watch::Receiver<control::Membership>)> {
    let token = Token::from_config(&config.grpc)?;
    let client = ControlClient::connect(&config.grpc, None, token.as_ref()).await?;
    let counters = Arc::new(Counters::default());
    let (membership, _heartbeats) = control::join(client.clone(), role, &host_name(), device, counters.clone()).await?;
    tracing::info!(worker_id = %membership.borrow().worker_id, learner = %config.grpc.learner, "joined the run");
    Ok((client, token, counters, membership))
}

/// `prism learner-rank`: one of the data-parallel learner ranks of a run
/// whose `prism learner` is rank 0 (`dist.learner_ranks > 1`, GPUs).
pub fn learner_rank(config: &Config) -> Result<()> {
    let _telemetry = telemetry::init_role(&config.log, None, "learner-rank", &config.dist.run_id).context("log.otlp_endpoint")?;
    threads(config);
    if config.learner.is_sft() {
        bail!("prism learner-rank trains RL only (learner.mode = \"sft\" runs with prism train)");
    }
    let Some(device) = data_parallel_device(config)? else {
        bail!("dist.learner_ranks = 1: this run trains on one learner, and there is no rank for this process to join");
    };
    runtime()?.block_on(async {
        let health = health(config).await?;
        let mut model = train::load_model(config)?.model;
        train::attach_lora(config, &mut model)?;
        // The weights are rank 0's once joined; only the shapes must agree.
        let reference = if config.learner.kl_coef > 0.0 && config.learner.lora.is_none() { Some(train::load_model(config)?.model) } else { None };
        let learner = prism_learner::Learner::new(config.learner.clone(), model, reference, config.run.seed)?;
        let (control, _token, counters, membership) = join(config, Role::Learner, &config.model.device).await?;
        health.add_metrics(metrics::worker(Role::Learner, counters.clone()));
        health.set_ready(true);
        let (timeout, bucket) = nccl_limits(config);
        let trainer = RankLearner::new(learner, device, timeout, bucket, sharding(config));
        let args = learner_rank::RankArgs {
            control,
            membership,
            counters,
            trainer: Box::new(trainer),
            poll: Duration::from_secs(10),
            health: health.clone(),
        };
        let s = learner_rank::run(args, train::ctrl_c()).await?;
        println!("learner rank {}/{}: {} steps on {} trajectories, policy version {}", s.rank, s.world, s.steps, s.trajectories, s.version);
        Ok(())
    })
}

/// `prism rollout`: samples the learner's prompts with the newest weights.
pub fn rollout(config: &Config) -> Result<()> {
    if config.rollout.inflight_updates && config.dist.weights == prism_transport::WeightTransport::Nccl {
        anyhow::bail!(
            "rollout.inflight_updates = true with dist.weights = \"nccl\": a rollout process picks up versions in flight \
             over the Weights stream only (a broadcast needs every rank between generations): set dist.weights = \"grpc\" \
             or rollout.inflight_updates = false"
        );
    }
    let _telemetry = telemetry::init_role(&config.log, None, "rollout", &config.dist.run_id).context("log.otlp_endpoint")?;
    threads(config);
    let nccl_device = nccl_device(config)?;
    runtime()?.block_on(async {
        let health = health(config).await?;
        let Loaded { model, tokenizer, generation } = train::load_model(config)?;
        let layout = nccl_weights::layout(model.var_store().variables().iter().map(|(n, t)| (n.as_str(), t)));
        let mut generator =
            ModelGenerator::new(model, tokenizer, generation.eos_token_ids.clone(), config.rollout.clone(), config.run.seed);
        if config.rollout.reject_below > 0.0 {
            // Early rejection in a rollout process scores steps with the step
            // verifiers (the distilled model lives in the reward processes).
            let reward = prism_reward::Config { process: prism_reward::config::Process::Verifier, ..config.reward.clone() };
            let labeler = prism_reward::Labeler::new(&reward, &config.judge, &prism_reward::distill::Config::default())?;
            generator = generator.with_scorer(ModelGenerator::labeler_scorer(Arc::new(labeler)));
        }
        let (control, token, counters, membership) = join(config, Role::Rollout, &config.model.device).await?;
        health.add_metrics(metrics::worker(Role::Rollout, counters.clone()));
        let weights = WeightsClient::connect(&config.grpc, None, token.as_ref()).await?;
        let rank = membership.borrow().nccl_rank as usize;
        let broadcast = match nccl_device {
            Some(device) if rank > 0 => {
                let id = nccl_id(&control).await?;
                tracing::info!(rank, world = id.world_size, device, "joining the learner's NCCL weight broadcast");
                let join = join_nccl(config, id.id, rank, id.world_size as usize, device);
                let receiver = nccl_weights::Receiver::spawn(join, layout, tch::Device::Cuda(device))?;
                Some((Arc::new(receiver), Duration::from_millis(config.dist.nccl_timeout_ms)))
            }
            Some(_) => {
                tracing::warn!(
                    nccl_rollouts = config.dist.nccl_rollouts,
                    "the learner gave this rollout no NCCL rank (every rank of its weight broadcast is taken, or it \
                     runs dist.weights = \"grpc\"): pulling weights over the Weights stream"
                );
                None
            }
            None => None,
        };
        let redis = Redis::connect(&config.redis).await?.sealed(token.as_ref().map(Seal::new));
        health.set_ready(true);
        let args = rollout::RolloutArgs {
            control,
            weights,
            redis,
            keys: RunKeys::new(&config.redis.prefix, &config.dist.run_id),
            generator: Box::new(generator),
            prompts_per_batch: config.rollout.prompts_per_batch,
            counters,
            membership,
            give_up_after: Duration::from_millis(config.redis.retry_for_ms),
            broadcast,
            health: health.clone(),
            inflight: config.rollout.inflight_updates,
        };
        let summary = rollout::run(args, &config.redis, train::ctrl_c()).await?;
        println!(
            "rollout: {} groups ({} trajectories) sampled, {} weight versions pulled ({} bytes), {} received by broadcast",
            summary.groups, summary.trajectories, summary.weight_pulls, summary.weight_bytes, summary.weight_broadcasts
        );
        Ok(())
    })
}

/// `prism reward`: labels sampled trajectories with the run's verifiers and judge.
pub fn reward(config: &Config) -> Result<()> {
    let _telemetry = telemetry::init_role(&config.log, None, "reward", &config.dist.run_id).context("log.otlp_endpoint")?;
    threads(config);
    runtime()?.block_on(async {
        let health = health(config).await?;
        let mut labeler = prism_reward::Labeler::new(&config.reward, &config.judge, &config.distill)?;
        if config.reward.process == prism_reward::config::Process::Implicit {
            // From the configured model: a reward process does not hold the
            // learner's weights (a warm start, if any, is not in it).
            labeler = labeler.with_implicit(train::implicit_prm(config, None)?);
        }
        let labeler = Arc::new(labeler);
        let (mut control, token, counters, membership) = join(config, Role::Reward, "cpu").await?;
        health.add_metrics(metrics::worker(Role::Reward, counters.clone()));
        let worker_id = membership.borrow().worker_id.clone();
        let redis = Redis::connect(&config.redis).await?.sealed(token.as_ref().map(Seal::new));
        health.set_ready(true);
        let args = reward::RewardArgs {
            redis,
            keys: RunKeys::new(&config.redis.prefix, &config.dist.run_id),
            consumer: worker_id,
            labeler: Arc::new(RewardLabeler(labeler.clone())),
            concurrency: config.pipeline.reward_workers,
            attempts: config.pipeline.reward_attempts,
            counters,
            membership: Some(membership.clone()),
            // Heartbeats carry its health (with a judge); with a distilled
            // model it learns from every reward process's judged steps.
            annotator: Some(labeler),
            share: reward::Share::default(),
            health: health.clone(),
        };
        let summary = reward::run(args, &config.redis, train::ctrl_c()).await?;
        let worker_id = membership.borrow().worker_id.clone();
        if let Err(e) = control.shutdown(&worker_id, "finished").await {
            tracing::warn!(error = %e, "telling the learner this worker leaves failed");
        }
        println!("reward: {} labeled, {} failed, {} reclaimed from other workers", summary.labeled, summary.failed, summary.reclaimed);
        let shared = summary.shared;
        if shared.published + shared.learned + shared.malformed > 0 {
            println!(
                "reward: judged steps shared {}, learned from other workers {}, malformed entries skipped {}",
                shared.published, shared.learned, shared.malformed
            );
        }
        Ok(())
    })
}
