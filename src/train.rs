//! `prism train`: composes a local run — model, task, warm start, learner,
//! reward labeler, rollout workers — and runs the actor pipeline until the step
//! or time budget is spent or Ctrl-C, then prints the summary.

use crate::config::Config;
use crate::progress;
use crate::run_dir::RunDir;
use crate::telemetry;
use anyhow::{bail, Context, Result};
use prism_actors::backend::{Factory, Generate, SourcePosition};
use prism_actors::adapters::{CheckpointPlan, Evaluator, ModelGenerator, PolicyTrainer, RewardLabeler};
use prism_actors::{Finish, LearnerPlan, PipelineSpec, StalePolicy, Summary};
use prism_learner::{Learner, TokenPair, warmstart};
use prism_model::{chat::ChatMessage, Loaded, Tokenizer, Transformer};
use prism_rollout::arithmetic::FlawedTeacher;
use prism_rollout::curriculum::Curriculum;
use prism_rollout::{sampler, Task};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `prism train` (RL, or SFT with `learner.mode = "sft"`).
pub fn main(config: &Config, resume: Option<&Path>) -> Result<()> {
    let run = match resume {
        Some(dir) => RunDir::open(dir).with_context(|| format!("{}: not a run folder", dir.display()))?,
        None => RunDir::create(&config.run.dir, &config.to_toml()).context("creating the run folder")?,
    };
    let _telemetry = telemetry::init(&config.log, Some(&run.path)).context("opening trace.jsonl")?;
    if config.train.threads > 0 {
        tch::set_num_threads(config.train.threads as i32);
    }
    tracing::info!(run_id = %run.id, run = %run.path.display(), "run folder");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        if config.learner.is_sft() { sft(config, &run).await } else { rl(config, &run, resume.is_some()).await }
    });
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "run failed");
    }
    result
}

pub(crate) fn load_model(config: &Config) -> Result<Loaded> {
    let opts = config.model.load_options(config.run.seed)?;
    let loaded = prism_model::load(&config.model.source, &opts).with_context(|| format!("loading model {}", config.model.source))?;
    loaded.with_chat_template_kwargs(&config.model.chat_template_kwargs).context("model.chat_template_kwargs")
}

/// Attaches `learner.lora`'s adapters (drawn from the run's seed) to the
/// policy the learner trains, when set; the adapter records `model.source`
/// as its base unless that is a builtin, which transformers cannot load.
pub(crate) fn attach_lora(config: &Config, model: &mut Transformer) -> Result<()> {
    if let Some(lora) = &config.learner.lora {
        let base = (!config.model.source.starts_with("builtin:")).then(|| config.model.source.clone());
        model.attach_lora(lora, config.run.seed, base).context("learner.lora")?;
    }
    Ok(())
}

pub(crate) fn task(config: &Config, tokenizer: &Tokenizer) -> Result<Task> {
    let tok = tokenizer.clone();
    let render = move |question: &str| {
        tok.apply_chat_template(&[ChatMessage::new("user", question)], true).unwrap_or_else(|_| question.to_string())
    };
    Ok(Task::new(&config.task, config.run.seed, Box::new(render))?)
}

/// The held-out evaluator, labeling with verifiers only.
fn evaluator(config: &Config, task: &Task, eos: Vec<u32>) -> Result<Evaluator> {
    let mut reward = config.reward.clone();
    reward.process = prism_reward::config::Process::Verifier;
    let labeler = prism_reward::Labeler::new(&reward, &config.judge, &prism_reward::distill::Config::default())?;
    Ok(Evaluator {
        prompts: task.eval_prompts(config.train.eval_problems),
        labeler: Arc::new(labeler),
        max_new_tokens: config.rollout.max_new_tokens,
        eos,
        batch: 64,
        runtime: tokio::runtime::Handle::current(),
    })
}

/// The learner's half of an RL run, shared by `prism train` and `prism learner`:
/// the policy after the warm start (or the checkpoint it resumes from), the
/// trainer around it, and where the prompts continue.
/// The implicit PRM for `reward.process = "implicit"`: φ and the frozen
/// reference are two copies of the configured model, given `weights` (the
/// policy's at the start of RL) when there are any. φ's state is not
/// checkpointed: a resumed run starts it again from the policy it resumes.
pub(crate) fn implicit_prm(config: &Config, weights: Option<&prism_actors::backend::WeightSet>) -> Result<prism_reward::implicit::ImplicitPrm> {
    let copy = || -> Result<Box<dyn prism_reward::implicit::TokenModel>> {
        let Loaded { model, .. } = load_model(config)?;
        if let Some(w) = weights {
            let tensors = w.tensors.lock().map_err(|_| anyhow::anyhow!("weight set poisoned"))?;
            model.load_named(tensors.iter().map(|(n, t)| (n.clone(), t.copy())))?;
        }
        Ok(Box::new(model))
    };
    Ok(prism_reward::implicit::ImplicitPrm::new(&config.implicit, copy()?, copy()?)?)
}

pub(crate) struct Prepared {
    pub trainer: PolicyTrainer,
    /// Policy version of the trainer's weights (the checkpoint's step on resume).
    pub version: u64,
    pub cursor: u64,
    /// The curriculum, continued from the checkpoint on resume.
    pub curriculum: Curriculum,
    /// The checkpoint folder resumed from.
    pub restored: Option<PathBuf>,
    pub task: Arc<Task>,
    pub eos: Vec<u32>,
}

pub(crate) async fn prepare(config: &Config, run: &RunDir, resuming: bool) -> Result<Prepared> {
    let Loaded { mut model, tokenizer, generation } = load_model(config)?;
    let eos = generation.eos_token_ids.clone();
    let task = Arc::new(task(config, &tokenizer)?);
    let checkpoints = run.path.join("checkpoints");
    let has_checkpoint = resuming && checkpoints.is_dir();

    if config.warmstart.enabled && config.task.kind == "arithmetic" && !has_checkpoint {
        let cache = warm_start(config, &mut model, &tokenizer, &eos).await?;
        println!("warm start: {}", cache.display());
    }

    // A LoRA policy's reference is its own base, the adapters off.
    let reference = if config.learner.kl_coef > 0.0 && config.learner.lora.is_none() {
        let mut r = load_model(config)?.model;
        r.copy_weights_from(&model)?;
        Some(r)
    } else {
        None
    };
    let mut model = model;
    attach_lora(config, &mut model)?;
    let mut learner = Learner::new(config.learner.clone(), model, reference, config.run.seed)?;
    let mut restored_from = None;
    let (version, position) = match has_checkpoint {
        true => match learner.resume(&checkpoints)? {
            Some(restored) => {
                for r in &restored.rejected {
                    eprintln!("prism: skipped damaged checkpoint {r}");
                }
                let position: SourcePosition = serde_json::from_value(restored.meta.data_cursor.clone())
                    .with_context(|| format!("{}: data_cursor is not a prompt source position", restored.path.display()))?;
                let cursor = position.prompt_cursor;
                println!("resumed from {} (step {}, prompt cursor {cursor})", restored.path.display(), restored.meta.step);
                restored_from = Some(restored.path.clone());
                (restored.meta.step, position)
            }
            None => (0, SourcePosition::default()),
        },
        false => (0, SourcePosition::default()),
    };
    let cursor = position.prompt_cursor;
    let curriculum = Curriculum::new(&config.task.adaptive, task.seed(), Some(position.curriculum));
    if version >= config.train.steps {
        bail!("the run is already at step {version} and train.steps = {}: raise train.steps to continue", config.train.steps);
    }
    let trainer = PolicyTrainer::new(
        learner,
        tokenizer.clone(),
        version,
        evaluator(config, &task, eos.clone())?,
        CheckpointPlan { dir: checkpoints, config_hash: prism_learner::checkpoint::config_hash(config) },
    );
    Ok(Prepared { trainer, version, cursor, curriculum, restored: restored_from, task, eos })
}

/// When the learner stops, evaluates and checkpoints.
pub(crate) fn plan(config: &Config) -> LearnerPlan {
    LearnerPlan {
        batch_groups: config.train.batch_groups,
        max_staleness: config.learner.max_staleness,
        stale: if config.learner.stale_groups == prism_learner::config::StaleGroups::ImportanceWeight { StalePolicy::ImportanceWeight } else { StalePolicy::Drop },
        max_steps: config.train.steps,
        time_limit: time_limit(config),
        eval_every: config.train.eval_every,
        checkpoint_every: config.train.checkpoint_every,
    }
}

fn time_limit(config: &Config) -> Option<Duration> {
    (config.train.time_limit_s > 0.0).then(|| Duration::from_secs_f64(config.train.time_limit_s))
}

/// Resolves on the first Ctrl-C (and quits the process on the second).
pub(crate) async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
    eprintln!("prism: interrupted; stopping after a final checkpoint (Ctrl-C again to quit now)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("prism: interrupted twice; quitting without a final checkpoint");
        std::process::exit(130);
    });
}

async fn rl(config: &Config, run: &RunDir, resuming: bool) -> Result<()> {
    let started = Instant::now();
    let Prepared { trainer, version, cursor, curriculum, restored, task, eos } = prepare(config, run, resuming).await?;
    let mut labeler = prism_reward::Labeler::new(&config.reward, &config.judge, &config.distill)?;
    if config.reward.process == prism_reward::config::Process::Implicit {
        use prism_actors::backend::Train;
        labeler = labeler.with_implicit(implicit_prm(config, Some(&*trainer.weights()?))?);
    }
    // The reward models trained online (distilled model, implicit PRM) are
    // checkpointed with the policy and continue on resume.
    if let Some(path) = &restored {
        let models = labeler.load_state(path)?;
        if !models.is_empty() {
            println!("resumed the {} from {}", models.join(" and "), path.display());
        }
    }
    let labeler = Arc::new(labeler);
    let trainer = trainer.with_extra_state({
        let labeler = labeler.clone();
        Arc::new(move |dir: &Path| labeler.save_state(dir).map_err(|e| e.to_string()))
    });
    let generator: Factory<Box<dyn Generate>> = {
        let config = config.clone();
        let eos = eos.clone();
        let labeler = labeler.clone();
        Arc::new(move || {
            let Loaded { model, tokenizer, .. } = load_model(&config).map_err(prism_actors::BackendError::new)?;
            let generator = ModelGenerator::new(model, tokenizer, eos.clone(), config.rollout.clone(), config.run.seed)
                .with_scorer(ModelGenerator::labeler_scorer(labeler.clone()));
            Ok(Box::new(generator) as Box<dyn Generate>)
        })
    };
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(Default::default());
    let drawer = progress::spawn(progress_rx, progress::Goal { first_step: version, max_steps: config.train.steps, time_limit: time_limit(config) });
    let spec = PipelineSpec {
        task,
        cursor,
        curriculum,
        generator,
        labeler: Arc::new(RewardLabeler(labeler)),
        trainer: Box::new(trainer),
        plan: plan(config),
        rollout_workers: config.rollout.workers,
        prompts_per_batch: config.rollout.prompts_per_batch,
        config: config.pipeline.clone(),
        metrics_path: Some(run.path.join("metrics.jsonl")),
        progress: progress_tx,
    };
    let summary = prism_actors::run(spec, ctrl_c()).await.map_err(anyhow::Error::msg)?;
    let _ = drawer.await;
    finish(config, run, version, &summary, started)
}

/// Prints how the run went, writes `summary.json`, and fails when the
/// trajectory accounting does not balance.
pub(crate) fn finish(config: &Config, run: &RunDir, version: u64, summary: &Summary, started: Instant) -> Result<()> {
    let evals = read_evals(&run.path.join("metrics.jsonl"))?;
    let first = evals.iter().find(|e| e.step == version);
    let last = evals.last();
    let pct = |e: Option<&Eval>| e.map_or("—".to_string(), |e| format!("{:.1}%", e.accuracy * 100.0));
    let start_label = if version == 0 { "warm start".to_string() } else { format!("resumed at step {version}") };
    println!("held-out accuracy ({} problems, greedy):", config.train.eval_problems);
    println!("  {start_label:<22} {}", pct(first));
    println!("  {:<22} {}", format!("final (step {})", last.map_or(version, |e| e.step)), pct(last));
    println!("stopped: {}", match summary.finish {
        Finish::MaxSteps => "reached train.steps",
        Finish::TimeLimit => "reached train.time_limit_s",
        Finish::Interrupted => "interrupted",
    });
    println!("trajectories: {}", summary.ledger);
    println!("wall time: {:.1} s (RL {:.1} s)", started.elapsed().as_secs_f64(), summary.wall.as_secs_f64());
    println!("run folder: {}", run.path.display());
    let json = serde_json::json!({
        "finish": format!("{:?}", summary.finish),
        "start_step": version,
        "start_accuracy": first.map(|e| e.accuracy),
        "final_step": last.map(|e| e.step),
        "final_accuracy": last.map(|e| e.accuracy),
        "ledger": summary.ledger,
        "balanced": summary.ledger.balanced(),
        "wall_s": started.elapsed().as_secs_f64(),
        "rl_wall_s": summary.wall.as_secs_f64(),
    });
    std::fs::write(run.path.join("summary.json"), serde_json::to_vec_pretty(&json)?)?;
    tracing::info!(ledger = %summary.ledger, balanced = summary.ledger.balanced(), "run finished");
    if !summary.ledger.balanced() {
        bail!("trajectory accounting does not balance: {}", summary.ledger);
    }
    Ok(())
}

#[derive(Debug, Clone, Deserialize)]
struct Eval {
    step: u64,
    #[serde(rename = "eval_accuracy")]
    accuracy: f64,
}

fn read_evals(path: &Path) -> Result<Vec<Eval>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "eval")
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect())
}

/// Demonstration `index` of the flawed teacher, tokenised: prompt, then the
/// teacher's steps and answer followed by eos.
fn demonstration(task: &Task, teacher: &FlawedTeacher, tokenizer: &Tokenizer, eos: &[u32], index: u64) -> Result<TokenPair> {
    let Task::Arithmetic { generator, seed } = task else { bail!("warm start needs the arithmetic task") };
    // A stream of its own, so demonstrations are not the RL prompts.
    let expr = generator.train(prism_rollout::hash64(&[*seed, 0xde70]), index);
    let prompt = prism_core::Prompt {
        id: prism_core::PromptId(index),
        task: "arithmetic".into(),
        problem: expr.to_string(),
        text: expr.prompt(),
        reference: None,
    };
    let mut completion = tokenizer.encode(&expr.completion(teacher), false)?;
    completion.extend(eos.first());
    Ok(TokenPair { prompt: sampler::encode_prompt(tokenizer, &prompt)?, completion })
}

/// Imitates the flawed teacher (`prism_learner::warmstart`), or loads the
/// result from `runs/cache/` when a warm start with the same settings was made
/// before; a longer one continues the longest shorter one cached.
async fn warm_start(config: &Config, model: &mut Transformer, tokenizer: &Tokenizer, eos: &[u32]) -> Result<PathBuf> {
    // Everything that shapes the weights but the number of steps.
    let key = prism_learner::checkpoint::config_hash(&serde_json::json!({
        "model": config.model, "seed": config.run.seed, "task": config.task.arithmetic,
        "warmstart": { "batch": config.warmstart.batch, "lr": config.warmstart.lr },
        "learner": { "weight_decay": config.learner.weight_decay, "beta1": config.learner.beta1, "beta2": config.learner.beta2,
                     "eps": config.learner.eps, "grad_clip": config.learner.grad_clip },
        "format": 2,
    }));
    let root = config.run.dir.join("cache");
    let cache = warmstart::cache_dir(&root, &key, config.warmstart.steps);
    let load_cached = |dir: &Path, model: &mut Transformer| -> Result<()> {
        let cached = prism_model::load(dir.to_str().context("cache path is not UTF-8")?, &config.model.load_options(config.run.seed)?)
            .with_context(|| format!("{}: damaged warm-start cache (delete it to rebuild)", dir.display()))?;
        model.copy_weights_from(&cached.model)?;
        Ok(())
    };
    if warmstart::is_cached(&cache) {
        load_cached(&cache, model)?;
        tracing::info!(cache = %cache.display(), "warm start loaded from cache");
        return Ok(cache);
    }
    let first_step = match warmstart::longest_shorter(&root, &key, config.warmstart.steps) {
        Some((steps, dir)) => {
            load_cached(&dir, model)?;
            println!("warm start: continuing {} from step {steps}", dir.display());
            steps
        }
        None => 0,
    };
    let task = task(config, tokenizer)?;
    let teacher = FlawedTeacher { rate: config.task.arithmetic.flaw_rate, seed: config.task.arithmetic.flaw_seed };
    let plan = warmstart::Plan {
        batch: config.warmstart.batch,
        lr: config.warmstart.lr,
        eval_every: config.warmstart.eval_every,
        seed: config.run.seed,
    };
    let placeholder = load_model(config)?.model;
    let policy = std::mem::replace(model, placeholder);
    let (base, steps) = (config.learner.clone(), first_step..config.warmstart.steps);
    let (tok, eos) = (tokenizer.clone(), eos.to_vec());
    let evaluator = (plan.eval_every > 0).then(|| evaluator(config, &task, eos.clone())).transpose()?;
    let started = Instant::now();
    let trained = tokio::task::spawn_blocking(move || -> Result<Transformer> {
        let _span = tracing::info_span!("warmstart", actor = "learner").entered();
        let of = steps.end;
        let demo = |index: u64| -> prism_learner::Result<TokenPair> {
            demonstration(&task, &teacher, &tok, &eos, index).map_err(|e| prism_learner::Error::Model(format!("demonstration {index}: {e:#}")))
        };
        let evaluate = |done: u64, loss: f64, policy: &Transformer| -> prism_learner::Result<()> {
            if let Some(e) = &evaluator {
                let report = e.evaluate(policy, &tok).map_err(|e| prism_learner::Error::Model(e.to_string()))?;
                let seconds = started.elapsed().as_secs_f64();
                tracing::info!(step = done, of, loss, accuracy = report.accuracy, seconds, "warm start evaluated");
            }
            Ok(())
        };
        Ok(warmstart::train(&plan, &base, policy, steps, demo, evaluate)?)
    })
    .await??;
    *model = trained;
    warmstart::store(&cache, |tmp| model.save_hf(tmp, tokenizer).map_err(|e| prism_learner::Error::Model(e.to_string())))
        .with_context(|| format!("{}: cannot store the warm start", cache.display()))?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        steps = config.warmstart.steps - first_step,
        cache = %cache.display(),
        "warm start trained"
    );
    Ok(cache)
}

/// `learner.mode = "sft"`: supervised training on a JSONL of pairs, with checkpoints.
async fn sft(config: &Config, run: &RunDir) -> Result<()> {
    if config.train.sft_data.as_os_str().is_empty() {
        bail!("learner.mode = \"sft\" needs train.sft_data (a JSONL file of {{\"prompt\", \"completion\"}} pairs)");
    }
    let Loaded { mut model, tokenizer, generation } = load_model(config)?;
    attach_lora(config, &mut model)?;
    let eos = generation.eos_token_ids.first().copied();
    let pairs: Vec<TokenPair> = prism_learner::sft::read_jsonl(&config.train.sft_data)?
        .into_iter()
        .map(|p| -> Result<TokenPair> {
            let mut completion = tokenizer.encode(&p.completion, false)?;
            completion.extend(eos);
            Ok(TokenPair { prompt: tokenizer.encode(&p.prompt, true)?, completion })
        })
        .collect::<Result<_>>()?;
    let checkpoints = run.path.join("checkpoints");
    let mut learner = Learner::new(config.learner.clone(), model, None, config.run.seed)?;
    let start = match learner.resume(&checkpoints)? {
        Some(r) => r.meta.step,
        None => 0,
    };
    let hash = prism_learner::checkpoint::config_hash(config);
    let save = |learner: &Learner<Transformer>, step: u64| -> Result<()> {
        let meta = prism_learner::CheckpointMeta {
            step,
            policy_version: step,
            data_cursor: serde_json::json!({ "pair_cursor": step * config.train.sft_batch as u64 }),
            config_hash: hash.clone(),
        };
        learner.save_checkpoint(&checkpoints, &meta)?;
        Ok(())
    };
    let metrics = run.path.join("metrics.jsonl");
    let mut out = std::fs::OpenOptions::new().create(true).append(true).open(&metrics)?;
    let started = Instant::now();
    for step in start..config.train.steps {
        let b = config.train.sft_batch;
        let batch: Vec<TokenPair> = (0..b).map(|i| pairs[(step as usize * b + i) % pairs.len()].clone()).collect();
        let stats = learner.sft_step(&batch)?;
        use std::io::Write;
        writeln!(out, "{}", serde_json::json!({"kind": "step", "step": step + 1, "time_s": started.elapsed().as_secs_f64(), "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "tokens": stats.tokens}))?;
        if config.train.checkpoint_every > 0 && (step + 1) % config.train.checkpoint_every == 0 {
            save(&learner, step + 1)?;
        }
    }
    save(&learner, config.train.steps)?;
    println!("sft: {} steps on {} pairs in {:.1} s", config.train.steps - start, pairs.len(), started.elapsed().as_secs_f64());
    println!("run folder: {}", run.path.display());
    Ok(())
}
