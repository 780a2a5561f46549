//! `prism learner`, `prism rollout`, `prism reward`: the roles of a distributed
//! run, each its own process, composed from the same backends as `prism train`
//! and connected by Redis Streams (trajectories) and the learner's gRPC
//! services (control, weights).

use crate::config::Config;
use crate::run_dir::RunDir;
use crate::telemetry;
use crate::train::{self, Prepared};
use anyhow::{Context, Result, bail};
use prism_actors::dist::control::{self, Control, ControlClient, Counters};
use prism_actors::dist::grpc::{self, Token};
use prism_actors::dist::health::Health;
use prism_actors::dist::redis::{Redis, RunKeys};
use prism_actors::dist::weights::{Weights, WeightsClient};
use prism_actors::dist::{learner, reward, rollout};
use prism_actors::local::{ModelGenerator, RewardLabeler};
use prism_model::Loaded;
use prism_proto::v1;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The roles move weights over the gRPC Weights stream only, so far.
fn check_weights_transport(config: &Config) -> Result<()> {
    if config.dist.weights == "nccl" {
        bail!(
            "dist.weights = \"nccl\": the NCCL communicator is built and GPU-checked (scripts/gpu-check) but the \
             learner and rollout roles do not broadcast through it yet; use dist.weights = \"grpc\""
        );
    }
    Ok(())
}

fn threads(config: &Config) {
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
}

/// Serves `/livez` and `/readyz` on `dist.health_listen` (unless empty).
async fn health(config: &Config) -> Result<Health> {
    let health = Health::new();
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

/// `prism learner [--resume RUN]`: prompts, training, checkpoints, and the
/// Control and Weights services on `grpc.listen`.
pub fn learner(config: &Config, resume: Option<&Path>) -> Result<()> {
    if config.learner.is_sft() {
        bail!("prism learner trains RL only; run learner.mode = \"sft\" with prism train");
    }
    check_weights_transport(config)?;
    let run = match resume {
        Some(dir) => RunDir::open(dir).with_context(|| format!("{}: not a run folder", dir.display()))?,
        None => RunDir::create(&config.run.dir, &config.to_toml()).context("creating the run folder")?,
    };
    let _telemetry = telemetry::init(&config.log, Some(&run.path)).context("opening trace.jsonl")?;
    threads(config);
    tracing::info!(run_id = %run.id, run = %run.path.display(), dist_run = %config.dist.run_id, "run folder");
    let result = runtime()?.block_on(learner_main(config, &run, resume.is_some()));
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "run failed");
    }
    result
}

async fn learner_main(config: &Config, run: &RunDir, resuming: bool) -> Result<()> {
    let started = Instant::now();
    let token = Token::from_config(&config.grpc)?;
    let health = health(config).await?;
    let control = Control::new(&config.dist.run_id, &config.dist);
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
    let redis = Redis::connect(&config.redis).await?;
    let keys = RunKeys::new(&config.redis.prefix, &config.dist.run_id);
    if !resuming {
        // A fresh run must not train on, or skip as already seen, what an
        // earlier run of the same `dist.run_id` left behind.
        redis.reset_run(&keys).await?;
    }
    let Prepared { trainer, version, cursor, task, .. } = train::prepare(config, run, resuming).await?;
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
        control,
        weights,
        redis,
        keys,
        metrics_path: Some(run.path.join("metrics.jsonl")),
        progress: progress_tx,
        drain: Duration::from_millis(config.dist.dead_after_ms.max(config.grpc.request_timeout_ms)),
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

/// Connects to the learner and joins the run as `role`.
async fn join(
    config: &Config,
    role: v1::Role,
    device: &str,
) -> Result<(ControlClient, Option<Token>, Arc<Counters>, tokio::sync::watch::Receiver<control::Membership>)> {
    let token = Token::from_config(&config.grpc)?;
    let client = ControlClient::connect(&config.grpc, None, token.as_ref()).await?;
    let counters = Arc::new(Counters::default());
    let (membership, _heartbeats) = control::join(client.clone(), role, &host_name(), device, counters.clone()).await?;
    tracing::info!(worker_id = %membership.borrow().worker_id, learner = %config.grpc.learner, "joined the run");
    Ok((client, token, counters, membership))
}

/// `prism rollout`: samples the learner's prompts with the newest weights.
pub fn rollout(config: &Config) -> Result<()> {
    let _telemetry = telemetry::init_console(&config.log);
    threads(config);
    check_weights_transport(config)?;
    runtime()?.block_on(async {
        let health = health(config).await?;
        let Loaded { model, tokenizer, generation } = train::load_model(config)?;
        let generator = ModelGenerator::new(model, tokenizer, generation.eos_token_ids.clone(), config.rollout.clone(), config.run.seed);
        let (control, token, counters, membership) = join(config, v1::Role::Rollout, &config.model.device).await?;
        let weights = WeightsClient::connect(&config.grpc, None, token.as_ref()).await?;
        let redis = Redis::connect(&config.redis).await?;
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
        };
        let summary = rollout::run(args, &config.redis, train::ctrl_c()).await?;
        println!(
            "rollout: {} groups ({} trajectories) sampled, {} weight versions pulled",
            summary.groups, summary.trajectories, summary.weight_pulls
        );
        Ok(())
    })
}

/// `prism reward`: labels sampled trajectories with the run's verifiers and judge.
pub fn reward(config: &Config) -> Result<()> {
    let _telemetry = telemetry::init_console(&config.log);
    threads(config);
    runtime()?.block_on(async {
        let health = health(config).await?;
        let labeler = prism_reward::Labeler::new(&config.reward, &config.judge, &config.distill)?;
        let (mut control, _token, counters, membership) = join(config, v1::Role::Reward, "cpu").await?;
        let worker_id = membership.borrow().worker_id.clone();
        let redis = Redis::connect(&config.redis).await?;
        health.set_ready(true);
        let args = reward::RewardArgs {
            redis,
            keys: RunKeys::new(&config.redis.prefix, &config.dist.run_id),
            consumer: worker_id,
            labeler: Arc::new(RewardLabeler(Arc::new(labeler))),
            concurrency: config.pipeline.reward_workers,
            attempts: config.pipeline.reward_attempts,
            counters,
            membership: Some(membership.clone()),
        };
        let summary = reward::run(args, &config.redis, train::ctrl_c()).await?;
        let worker_id = membership.borrow().worker_id.clone();
        if let Err(e) = control.shutdown(&worker_id, "finished").await {
            tracing::warn!(error = %e, "telling the learner this worker leaves failed");
        }
        println!("reward: {} labeled, {} failed, {} reclaimed from other workers", summary.labeled, summary.failed, summary.reclaimed);
        Ok(())
    })
}
