//! The real backends of a run: the model engine behind [`Generate`], the reward
//! labeler behind [`Label`], the learner behind [`Train`], and the held-out
//! [`Evaluator`] they share with `prism eval`.

use crate::backend::{
    Assignment, BackendError, BackendResult, DropReason, EvalReport, Generate, Label, LabelFuture, SourcePosition, StepReport, Train, WeightSet,
};
use prism_core::{GroupId, LabeledTrajectory, PolicyVersion, Prompt, RewardLabel, Trajectory, TrajectoryId};
use prism_learner::optim::sharded::Sharding;
use prism_learner::{CheckpointMeta, Learner, Policy};
use prism_model::{engine, LoraParts, SamplingParams, Tokenizer, Transformer};
use prism_rollout::sampler;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The cheap score of the newest step of a partial completion of a prompt
/// (see [`prism_reward::Labeler::score_partial`]), for early rejection.
pub type PartialScorer = Arc<dyn Fn(&Prompt, &str) -> Option<f32> + Send + Sync>;

/// A rollout worker's policy copy and sampling settings.
pub struct ModelGenerator {
    model: Transformer,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    rollout: prism_rollout::Config,
    seed: u64,
    scorer: Option<PartialScorer>,
}

impl ModelGenerator {
    pub fn new(model: Transformer, tokenizer: Tokenizer, eos: Vec<u32>, rollout: prism_rollout::Config, seed: u64) -> Self {
        Self { model, tokenizer, eos, rollout, seed, scorer: None }
    }

    /// Early rejection: with `rollout.reject_below` above 0, a sample whose
    /// newest step `scorer` scores below it stops at that step boundary.
    pub fn with_scorer(mut self, scorer: PartialScorer) -> Self {
        self.scorer = Some(scorer);
        self
    }

    /// The labeler's cheap scorer as a [`PartialScorer`].
    pub fn labeler_scorer(labeler: Arc<prism_reward::Labeler>) -> PartialScorer {
        Arc::new(move |prompt, text| labeler.score_partial(prompt, text))
    }
}

impl Generate for ModelGenerator {
    fn load_weights(&mut self, weights: &WeightSet) -> BackendResult<()> {
        load_into(&self.model, weights)
    }

    fn generate(&mut self, work: &[Assignment], version: PolicyVersion) -> BackendResult<Vec<Vec<Trajectory>>> {
        self.sample(work, version, None)
    }

    fn generate_inflight(
        &mut self,
        work: &[Assignment],
        version: PolicyVersion,
        newer: &mut crate::backend::NewerWeights<'_>,
    ) -> BackendResult<(Vec<Vec<Trajectory>>, PolicyVersion)> {
        if !self.rollout.inflight_updates {
            return Ok((self.generate(work, version)?, version));
        }
        let model = &self.model;
        let (mut held, mut failed) = (version, None);
        let mut refresh = || -> Option<u64> {
            if failed.is_some() {
                return None;
            }
            let weights = newer(held).filter(|w| w.version > held)?;
            match load_into(model, &weights) {
                Ok(()) => {
                    held = weights.version;
                    tracing::debug!(policy_version = held.0, "in-flight weight update");
                    Some(held.0)
                }
                Err(e) => {
                    failed = Some(BackendError(format!("loading weights v{} in flight: {}", weights.version.0, e.0)));
                    None
                }
            }
        };
        let groups = self.sample(work, version, Some(&mut refresh))?;
        match failed {
            Some(e) => Err(e),
            None => Ok((groups, held)),
        }
    }
}

/// Copies a published weight set into `model`, in place.
fn load_into(model: &Transformer, weights: &WeightSet) -> BackendResult<()> {
    let tensors = weights.tensors.lock().map_err(|_| BackendError::new("weight set poisoned"))?;
    let copies: Vec<(String, tch::Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    drop(tensors);
    model.load_named(copies).map_err(BackendError::new)
}

impl ModelGenerator {
    /// Samples the work's groups, with `refresh` asked between decode steps.
    fn sample(&self, work: &[Assignment], version: PolicyVersion, refresh: Option<&mut engine::Refresh<'_>>) -> BackendResult<Vec<Vec<Trajectory>>> {
        let pairs: Vec<(GroupId, &Prompt)> = work.iter().map(|a| (a.group, &a.prompt)).collect();
        let below = self.rollout.reject_below;
        let mut reject = self.scorer.as_ref().filter(|_| below > 0.0).map(|score| {
            let pairs = &pairs;
            move |i: usize, text: &str| score(pairs[i].1, text).is_some_and(|s| f64::from(s) < below)
        });
        let reject = reject.as_mut().map(|r| r as &mut sampler::RejectStep<'_>);
        sampler::sample_groups(&self.model, &self.tokenizer, &pairs, &self.rollout, &self.eos, version, self.seed, reject, refresh)
            .map_err(BackendError::new)
    }
}

/// The reward library's labeler, shared by every reward worker.
pub struct RewardLabeler(pub Arc<prism_reward::Labeler>);

impl Label for RewardLabeler {
    fn label<'a>(&'a self, trajectory: &'a Trajectory) -> LabelFuture<'a> {
        Box::pin(async move { Ok(self.0.label(trajectory).await) })
    }

    fn health(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        if self.0.judge().is_none() && self.0.implicit().is_none() {
            return None;
        }
        match serde_json::to_value(self.0.health()) {
            Ok(serde_json::Value::Object(m)) => Some(m),
            _ => None,
        }
    }
}

/// Greedy accuracy on a fixed set of problems, labeled by verifiers only (the
/// judge is for training signal, not for measuring progress).
pub struct Evaluator {
    pub prompts: Vec<Prompt>,
    pub labeler: Arc<prism_reward::Labeler>,
    pub max_new_tokens: usize,
    pub eos: Vec<u32>,
    /// Prompts decoded together.
    pub batch: usize,
    pub runtime: tokio::runtime::Handle,
}

/// Per-problem result of an evaluation.
#[derive(Debug, Clone)]
pub struct Graded {
    pub prompt: Prompt,
    pub samples: Vec<(String, RewardLabel)>,
}

impl Evaluator {
    /// Greedy accuracy (and step accuracy when steps are scored).
    pub fn evaluate(&self, model: &Transformer, tokenizer: &Tokenizer) -> BackendResult<EvalReport> {
        let graded = self.grade(model, tokenizer, &SamplingParams::greedy(self.max_new_tokens, self.eos.clone()))?;
        Ok(summarize(&graded, 1).0)
    }

    /// Samples `params.n` completions per problem and labels each.
    pub fn grade(&self, model: &Transformer, tokenizer: &Tokenizer, params: &SamplingParams) -> BackendResult<Vec<Graded>> {
        let mut out = Vec::with_capacity(self.prompts.len());
        let _guard = tch::no_grad_guard();
        for (chunk_index, chunk) in self.prompts.chunks(self.batch.max(1)).enumerate() {
            let ids: Vec<Vec<u32>> =
                chunk.iter().map(|p| sampler::encode_prompt(tokenizer, p)).collect::<Result<_, _>>().map_err(BackendError::new)?;
            let params = SamplingParams { seed: params.seed.wrapping_add(chunk_index as u64), ..params.clone() };
            let samples = engine::generate(model, &ids, &params).map_err(BackendError::new)?;
            for ((prompt, prompt_tokens), samples) in chunk.iter().zip(ids).zip(samples) {
                let mut graded = Graded { prompt: prompt.clone(), samples: Vec::new() };
                for (i, s) in samples.into_iter().enumerate() {
                    let t = Trajectory {
                        id: TrajectoryId(i as u64),
                        group: GroupId(prompt.id.0),
                        sample: i as u32,
                        group_size: params.n as u32,
                        prompt: prompt.clone(),
                        policy_version: PolicyVersion(0),
                        prompt_tokens: prompt_tokens.clone(),
                        tokens: s.tokens,
                        logprobs: s.logprobs,
                        text: s.text,
                        token_ends: s.token_ends,
                        finish: s.finish,
                        generate_ms: 0,
                        version_changes: Vec::new(),
                    };
                    let label = self.runtime.block_on(self.labeler.label(&t));
                    graded.samples.push((t.text, label));
                }
                out.push(graded);
            }
        }
        Ok(out)
    }
}

/// Accuracy of the first sample, step accuracy, and pass@k (Chen et al. 2021,
/// "Evaluating Large Language Models Trained on Code": the unbiased estimator
/// `1 - C(n-c, k) / C(n, k)` averaged over problems, with n samples and c correct).
pub fn summarize(graded: &[Graded], k: usize) -> (EvalReport, f64) {
    let correct = |l: &RewardLabel| l.outcome >= 0.5;
    let n_problems = graded.len().max(1) as f64;
    let accuracy = graded.iter().filter(|g| g.samples.first().is_some_and(|(_, l)| correct(l))).count() as f64 / n_problems;
    let step_scores: Vec<f64> = graded
        .iter()
        .filter_map(|g| g.samples.first())
        .flat_map(|(_, l)| l.steps.iter().filter_map(|s| s.score))
        .map(|s| if s >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    let step_accuracy = (!step_scores.is_empty()).then(|| step_scores.iter().sum::<f64>() / step_scores.len() as f64);
    let pass_at_k = graded
        .iter()
        .map(|g| {
            let n = g.samples.len();
            let c = g.samples.iter().filter(|(_, l)| correct(l)).count();
            pass_at(n, c, k)
        })
        .sum::<f64>()
        / n_problems;
    (EvalReport { accuracy, step_accuracy, problems: graded.len() }, pass_at_k)
}

fn pass_at(n: usize, c: usize, k: usize) -> f64 {
    if n < k || k == 0 {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    // 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}

/// Where and how the learner checkpoints.
pub struct CheckpointPlan {
    pub dir: PathBuf,
    /// Hash of the run's whole configuration, stored with each checkpoint.
    pub config_hash: String,
}

/// The learner library behind the learner actor.
pub struct PolicyTrainer {
    learner: Learner<Transformer>,
    tokenizer: Tokenizer,
    version: u64,
    evaluator: Evaluator,
    checkpoints: CheckpointPlan,
    extra_state: Option<ExtraState>,
    announce_checkpoint: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Writes more state into a checkpoint folder being written (the reward
/// models a local run trains online); an error fails the checkpoint.
pub type ExtraState = Arc<dyn Fn(&std::path::Path) -> Result<(), String> + Send + Sync>;

impl PolicyTrainer {
    /// `version`: the policy version of the learner's weights (0, or the
    /// checkpoint's step on resume).
    pub fn new(learner: Learner<Transformer>, tokenizer: Tokenizer, version: u64, evaluator: Evaluator, checkpoints: CheckpointPlan) -> Self {
        Self { learner, tokenizer, version, evaluator, checkpoints, extra_state: None, announce_checkpoint: None }
    }

    /// Every checkpoint also gets what `write` puts into its folder.
    pub fn with_extra_state(mut self, write: ExtraState) -> Self {
        self.extra_state = Some(write);
        self
    }

    /// `announce` runs before each checkpoint is written: data-parallel ranks
    /// that shard the optimizer hear of it and send their shares.
    pub fn before_checkpoint(mut self, announce: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.announce_checkpoint = Some(announce);
        self
    }

    /// Trains as rank 0 of data-parallel learner ranks from now on (blocks
    /// until every rank has joined; see [`Learner::join_data_parallel`]).
    pub fn join_data_parallel(&mut self, collective: Box<dyn prism_learner::Collective>, sharding: Option<Sharding>) -> BackendResult<()> {
        self.learner.join_data_parallel(collective, sharding).map_err(BackendError::new)
    }
}

impl Train for PolicyTrainer {
    fn version(&self) -> PolicyVersion {
        PolicyVersion(self.version)
    }

    fn weights(&self) -> BackendResult<Arc<WeightSet>> {
        let _guard = tch::no_grad_guard();
        // A whole model's parameters are copied (the next step writes them).
        // A LoRA model's merged weights are new tensors, the rest is its
        // frozen base, which training never writes, and the adapters come
        // copied: none needs a copy here.
        let policy = self.learner.policy();
        let version = PolicyVersion(self.version);
        let Some((scale, adapters)) = policy.published_adapters() else {
            let tensors = policy.published().into_iter().map(|(name, t)| (name, t.copy())).collect();
            return Ok(WeightSet::new(version, tensors));
        };
        // The frozen base, shared: what a transport sends once, the adapters
        // after it (`LoraParts`).
        let base = prism_learner::policy::named_variables(policy.var_store()).into_iter().map(|(n, t)| (n, t.detach())).collect();
        let parts = LoraParts { scale, base: Mutex::new(base), adapters: Mutex::new(adapters) };
        Ok(WeightSet::with_lora(version, policy.published(), parts))
    }

    fn admit(&self, group: &[LabeledTrajectory]) -> Result<(), DropReason> {
        self.learner.admit(group)
    }

    fn train(&mut self, groups: Vec<Vec<LabeledTrajectory>>, _lags: &[u64]) -> BackendResult<StepReport> {
        let trajectories = groups.iter().map(Vec::len).sum();
        let report = self.learner.train_step(&groups).map_err(BackendError::new)?;
        self.version += 1;
        Ok(StepReport { trajectories, stats: report.summary() })
    }

    fn evaluate(&mut self) -> BackendResult<EvalReport> {
        self.evaluator.evaluate(self.learner.policy(), &self.tokenizer)
    }

    fn checkpoint(&mut self, position: &SourcePosition) -> BackendResult<()> {
        let meta = CheckpointMeta {
            step: self.version,
            policy_version: self.version,
            data_cursor: serde_json::to_value(position).map_err(BackendError::new)?,
            config_hash: self.checkpoints.config_hash.clone(),
        };
        let extra = self.extra_state.clone();
        let extra = move |dir: &std::path::Path| extra.as_ref().map_or(Ok(()), |write| write(dir));
        if let Some(announce) = &self.announce_checkpoint {
            announce();
        }
        let path = self.learner.save_checkpoint_with(&self.checkpoints.dir, &meta, &extra).map_err(BackendError::new)?;
        let prompt_cursor = position.prompt_cursor;
        tracing::info!(checkpoint = %path.display(), step = self.version, prompt_cursor, "checkpoint written");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        // n = 5, c = 2, k = 1: c / n.
        assert!((pass_at(5, 2, 1) - 0.4).abs() < 1e-12);
        // n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
        assert!((pass_at(5, 2, 2) - 0.7).abs() < 1e-12);
        assert_eq!(pass_at(4, 0, 2), 0.0);
        assert_eq!(pass_at(4, 3, 2), 1.0);
        assert!(pass_at(1, 1, 2).is_nan());
    }
}

/// A data-parallel learner rank's learner (`prism learner-rank`), joined to
/// rank 0 and the other ranks by NCCL.
pub struct RankLearner {
    learner: Learner<Transformer>,
    /// The CUDA device index of the communicator.
    device: usize,
    timeout: std::time::Duration,
    bucket_bytes: usize,
    sharding: Option<Sharding>,
}

impl RankLearner {
    /// `learner` on CUDA device `device`, every collective failing after
    /// `timeout`, gradients all-reduced in buckets of `bucket_bytes`, the
    /// optimizer sharded as `sharding` says (as rank 0's).
    pub fn new(learner: Learner<Transformer>, device: usize, timeout: std::time::Duration, bucket_bytes: usize, sharding: Option<Sharding>) -> Self {
        Self { learner, device, timeout, bucket_bytes, sharding }
    }
}

impl crate::remote::learner_rank::RankTrainer for RankLearner {
    fn join(&mut self, id: &prism_transport::control::NcclId, rank: usize) -> BackendResult<()> {
        let comm = prism_transport::nccl::Communicator::new(&id.id, rank, id.world_size as usize, self.device, self.timeout, self.bucket_bytes)
            .map_err(BackendError::new)?;
        self.learner.join_data_parallel(Box::new(comm), self.sharding).map_err(BackendError::new)
    }

    fn train(&mut self, groups: Vec<Vec<LabeledTrajectory>>) -> BackendResult<()> {
        self.learner.train_step(&groups).map(|_| ()).map_err(BackendError::new)
    }

    fn checkpoint(&mut self) -> BackendResult<()> {
        // Only sharded ranks hold state rank 0 does not.
        if self.sharding.is_none() {
            return Ok(());
        }
        self.learner.send_checkpoint_shares().map_err(BackendError::new)
    }
}
