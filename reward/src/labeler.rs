//! The assembly of one trajectory's [`RewardLabel`]: outcome verifier, step
//! segmentation, and step scores from the verifiers or the judge (with the
//! guard, the annotation budget, the overall deadline and the fallback), each
//! with its source.
//!
//! With the judge, the labeler follows ONI (Zheng et al. 2025, "Online
//! Intrinsic Rewards"): the judge is an annotator, not a gate. With
//! `reward.judge_wait_ms = 0` a label is made at once by the fallback — the
//! distilled model once it agrees with the judge well enough, else the
//! verifiers — and the trajectory goes to a bounded background annotation
//! queue ([`Annotations`]); the judge's verdicts, whenever they arrive, train
//! the distilled model and fill the judge's cache. A wait above 0 lets a label
//! wait that long for the verdicts (blocking, for comparison).
//!
//! Every group's process scores come from one *source class* (judge,
//! distilled, verifier): the class is chosen when the group's first member is
//! labeled and kept for the others ([`Plans`]), and the annotation budget
//! admits whole groups. Only per-step failures (a verdict that did not come,
//! the guard) deviate, and they are counted.

use crate::Result;
use crate::config::{Config, Fallback, Process};
use crate::distill::{self, Budget, DistillMetrics, Distiller};
use crate::implicit::{ImplicitMetrics, ImplicitPrm};
use crate::judge::{self, Failure, Judge, JudgeMetrics, StepJudgement, Style, Subject};
use crate::outcome::{Outcome, OutcomeVerifier};
use crate::segment::Segmenter;
use crate::steps::StepVerifier;
use prism_core::{Prompt, RewardLabel, ScoreSource, StepScore, Trajectory};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Labels trajectories; built once from the config and shared.
pub struct Labeler {
    cfg: Config,
    /// `reward.judge_wait_ms` resolved.
    wait: Duration,
    segmenter: Segmenter,
    outcome: OutcomeVerifier,
    judge: Option<Judge>,
    distiller: Option<Arc<Distiller>>,
    implicit: Option<Arc<ImplicitPrm>>,
    learner: Option<Learner>,
    annotations: Option<Annotations>,
    budget: Mutex<Budget>,
    plans: Mutex<Plans>,
    /// A canary probe of a distrusted judge is in flight.
    probing: Arc<std::sync::atomic::AtomicBool>,
    counts: Mutex<Counts>,
}

/// Step scores handed out, by source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceCounts {
    pub verifier: u64,
    pub judge: u64,
    pub judge_cache: u64,
    pub distilled: u64,
    #[serde(default)]
    pub implicit: u64,
    pub guard: u64,
    pub unknown: u64,
}

#[derive(Debug, Default)]
struct Counts {
    labels: u64,
    guarded: u64,
    deadline_hits: u64,
    fallback_steps: u64,
    judge_unknown_steps: u64,
    judge_failed_steps: u64,
    distrusted_groups: u64,
    distilled_unavailable: u64,
    implicit_failures: u64,
    sources: SourceCounts,
}

/// How one label was made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelMeta {
    /// Time spent labeling, ms.
    pub elapsed_ms: f64,
    /// The guard scored every step 0 before any judge call.
    pub guarded: bool,
    /// The annotation budget let the judge label this trajectory's group.
    pub judge_admitted: bool,
    /// The trajectory went to the background annotation queue.
    pub queued: bool,
    /// The deadline passed while steps waited on the judge.
    pub deadline_hit: bool,
    /// The judge's judgement of each step, when it was asked (empty otherwise).
    pub judgements: Vec<Option<StepJudgement>>,
}

/// A snapshot of the labeler's counters and its parts' metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Trajectories labeled.
    pub labels: u64,
    /// Trajectories the guard scored 0 before any judge call.
    pub guarded: u64,
    /// Trajectories whose overall deadline passed while steps waited on the judge.
    pub deadline_hits: u64,
    /// Groups the annotation budget kept from the judge.
    pub budget_refusals: u64,
    /// Steps the judge did not score that got the fallback.
    pub fallback_steps: u64,
    /// Steps whose judge verdicts were all unreadable.
    pub judge_unknown_steps: u64,
    /// Steps whose judge calls failed (breaker open, errors, deadline).
    pub judge_failed_steps: u64,
    /// Groups admitted to the judge while the canary gate distrusted it (they
    /// got the fallback).
    pub distrusted_groups: u64,
    /// Labels whose distilled scores could not be had after all (the verifiers
    /// scored them).
    pub distilled_unavailable: u64,
    /// Labels whose implicit-PRM scores could not be had (steps unscored).
    pub implicit_failures: u64,
    /// Step scores by source.
    pub sources: SourceCounts,
    /// The background annotation queue, when the judge annotates in the background.
    pub annotations: Option<QueueHealth>,
    pub judge: Option<JudgeMetrics>,
    pub distill: Option<DistillMetrics>,
    pub implicit: Option<ImplicitMetrics>,
}

impl Labeler {
    /// A labeler for `[reward]`, with a judge client when `process = "judge"`
    /// and a distilled model when `[distill] enabled`.
    pub fn new(cfg: &Config, judge_cfg: &judge::Config, distill_cfg: &distill::Config) -> Result<Self> {
        cfg.validate()?;
        distill_cfg.validate()?;
        let judge = if cfg.process == Process::Judge { Some(Judge::new(judge_cfg)?) } else { None };
        let distiller = if cfg.process == Process::Judge && distill_cfg.enabled {
            Some(Arc::new(Distiller::new(distill_cfg)?))
        } else {
            None
        };
        let wait = cfg.judge_wait(distill_cfg.enabled);
        let learner = distiller.as_ref().map(|d| Learner::new(d.clone()));
        let annotations = match &judge {
            Some(j) if wait.is_zero() => Some(Annotations::new(cfg, j.clone(), learner.clone())),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            wait,
            segmenter: Segmenter::new(cfg)?,
            outcome: OutcomeVerifier::new(cfg)?,
            judge,
            distiller,
            implicit: None,
            learner,
            annotations,
            budget: Mutex::new(Budget::new(distill_cfg)),
            plans: Mutex::new(Plans::default()),
            probing: Arc::default(),
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn judge(&self) -> Option<&Judge> {
        self.judge.as_ref()
    }

    /// Attaches the implicit PRM that scores steps under `reward.process =
    /// "implicit"` (it needs the policy model, which the caller loads).
    pub fn with_implicit(mut self, prm: ImplicitPrm) -> Self {
        self.implicit = Some(Arc::new(prm));
        self
    }

    pub fn implicit(&self) -> Option<&Arc<ImplicitPrm>> {
        self.implicit.as_ref()
    }

    pub fn distiller(&self) -> Option<&Arc<Distiller>> {
        self.distiller.as_ref()
    }

    /// Writes the state of the reward models this labeler trains online
    /// (the distilled model, the implicit PRM's φ) into `dir`, a checkpoint
    /// folder being written. Nothing when it trains none.
    pub fn save_state(&self, dir: &std::path::Path) -> crate::Result<()> {
        if let Some(d) = &self.distiller {
            d.save(dir)?;
        }
        if let Some(p) = &self.implicit {
            p.save(dir)?;
        }
        Ok(())
    }

    /// Continues the reward models from a checkpoint folder written with
    /// [`Labeler::save_state`]; returns which were restored (none from a
    /// checkpoint of a run that trained none).
    pub fn load_state(&self, dir: &std::path::Path) -> crate::Result<Vec<&'static str>> {
        let mut restored = Vec::new();
        if let Some(d) = &self.distiller
            && d.load(dir)?
        {
            restored.push("distilled model");
        }
        if let Some(p) = &self.implicit
            && p.load(dir)?
        {
            restored.push("implicit PRM");
        }
        Ok(restored)
    }

    /// How long a label may wait for the judge (0 = background annotation).
    pub fn judge_wait(&self) -> Duration {
        self.wait
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The label of `t`. Never fails and never waits past `reward.deadline_ms`
    /// (nor, for the judge, past `reward.judge_wait_ms`): every step gets a
    /// score or `None`, and a source.
    pub async fn label(&self, t: &Trajectory) -> RewardLabel {
        self.label_with_meta(t).await.0
    }

    /// The label of `t` and how it was made (the judge's per-step judgements,
    /// guard, budget, deadline). Also logged as one debug event per trajectory.
    #[tracing::instrument(skip_all, fields(trajectory_id = t.id.0, policy_version = t.policy_version.0))]
    pub async fn label_with_meta(&self, t: &Trajectory) -> (RewardLabel, LabelMeta) {
        let started = Instant::now();
        let mut meta = LabelMeta::default();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.cfg.deadline_ms);
        let outcome = self.outcome.verify(&t.prompt, &t.text);
        let steps = if self.cfg.process == Process::None { Vec::new() } else { self.segmenter.steps(t) };
        let texts: Vec<&str> = steps.iter().map(|s| &t.text[s.text.start as usize..s.text.end as usize]).collect();
        let scores: Vec<(Option<f32>, ScoreSource)> = match self.cfg.process {
            Process::None => Vec::new(),
            Process::Verifier => self.verifier_scores(t, &texts),
            Process::Judge => self.judge_scores(t, &steps, &texts, &outcome, deadline, &mut meta).await,
            Process::Implicit => self.implicit_scores(t, &steps, &outcome).await,
        };
        meta.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut c = self.counts();
        c.labels += 1;
        for (_, source) in &scores {
            let s = &mut c.sources;
            *match source {
                ScoreSource::Verifier => &mut s.verifier,
                ScoreSource::Judge => &mut s.judge,
                ScoreSource::JudgeCache => &mut s.judge_cache,
                ScoreSource::Distilled => &mut s.distilled,
                ScoreSource::Implicit => &mut s.implicit,
                ScoreSource::Guard => &mut s.guard,
                ScoreSource::Unknown => &mut s.unknown,
            } += 1;
        }
        drop(c);
        tracing::debug!(
            outcome = outcome.score,
            steps = scores.len(),
            judged = scores.iter().filter(|(_, s)| matches!(s, ScoreSource::Judge | ScoreSource::JudgeCache)).count(),
            guarded = meta.guarded,
            judge_admitted = meta.judge_admitted,
            queued = meta.queued,
            deadline_hit = meta.deadline_hit,
            elapsed_ms = meta.elapsed_ms,
            "labeled"
        );
        let label = RewardLabel {
            outcome: outcome.score,
            outcome_source: outcome.source,
            answer: outcome.answer,
            steps: steps
                .into_iter()
                .zip(scores)
                .map(|(step, (score, source))| StepScore { step, score, source })
                .collect(),
        };
        (label, meta)
    }

    /// Step scores from the implicit PRM: σ(β Σ log(π_φ/π_ref)) over each
    /// step's tokens, with φ as it is before learning from this trajectory;
    /// then φ learns from the verifier's outcome (only a verifier's: a
    /// guessed outcome is not a label), in one Adam step with the labels that
    /// share its batch (concurrent labels are batched). Unknown (counted, logged) when the
    /// PRM is missing or fails.
    async fn implicit_scores(
        &self,
        t: &Trajectory,
        steps: &[prism_core::Step],
        outcome: &Outcome,
    ) -> Vec<(Option<f32>, ScoreSource)> {
        let unknown = vec![(None, ScoreSource::Unknown); steps.len()];
        let Some(prm) = self.implicit.clone() else {
            self.counts().implicit_failures += 1;
            tracing::warn!("reward.process = \"implicit\" but no implicit PRM is attached: steps unscored");
            return unknown;
        };
        let item = crate::implicit::Item {
            prompt: t.prompt_tokens.clone(),
            completion: t.tokens.clone(),
            spans: steps.iter().map(|s| s.tokens.clone()).collect(),
            outcome: (outcome.source == ScoreSource::Verifier).then_some(outcome.score),
        };
        match prm.score(item).await {
            Ok(rewards) => rewards.into_iter().map(|r| (Some(sigmoid(r)), ScoreSource::Implicit)).collect(),
            Err(error) => {
                self.counts().implicit_failures += 1;
                tracing::warn!(trajectory_id = t.id.0, %error, "implicit PRM failed: steps unscored");
                unknown
            }
        }
    }

    /// The cheap score of the last step of `text`, a partial completion of
    /// `prompt` that has just ended a step (early rejection): the distilled
    /// model's once it agrees with the judge well enough, else the step
    /// verifier's; `None` when neither can tell (or there is no step yet).
    /// Blocks (the distilled model runs on tch).
    pub fn score_partial(&self, prompt: &Prompt, text: &str) -> Option<f32> {
        let spans = self.segmenter.spans(&prompt.task, text);
        let last = spans.last()?;
        let step = &text[last.start as usize..last.end as usize];
        if let Some(d) = self.distiller.as_ref().filter(|d| d.ready()) {
            let problem = if prompt.problem.is_empty() { prompt.text.as_str() } else { prompt.problem.as_str() };
            let context = format!("{problem}\n{}", &text[..last.start as usize]);
            if let Ok(scores) = d.score(&[(context.as_str(), step)]) {
                return scores.into_iter().next().flatten();
            }
        }
        let texts: Vec<&str> = spans.iter().map(|s| &text[s.start as usize..s.end as usize]).collect();
        StepVerifier::for_task(self.cfg.step_verifier, &prompt.task, self.cfg.tolerance).score(prompt, &texts).pop().flatten()
    }

    fn verifier_scores(&self, t: &Trajectory, texts: &[&str]) -> Vec<(Option<f32>, ScoreSource)> {
        let verifier = StepVerifier::for_task(self.cfg.step_verifier, &t.prompt.task, self.cfg.tolerance);
        verifier
            .score(&t.prompt, texts)
            .into_iter()
            .map(|s| (s, if s.is_some() { ScoreSource::Verifier } else { ScoreSource::Unknown }))
            .collect()
    }

    /// The independent verdicts `distill.consensus` holds the judge's
    /// against, one per step: the step verifier's where it has one, else the
    /// outcome verifier's for the last step (a wrong final answer puts the
    /// step that states it in the wrong). All `None` with the filter off.
    fn checks(&self, t: &Trajectory, texts: &[&str], outcome: &Outcome) -> Vec<Option<bool>> {
        if !self.distiller.as_ref().is_some_and(|d| d.config().consensus) {
            return vec![None; texts.len()];
        }
        let mut checks: Vec<Option<bool>> =
            self.verifier_scores(t, texts).into_iter().map(|(s, _)| s.map(|s| s >= 0.5)).collect();
        if let Some(last) = checks.last_mut()
            && last.is_none()
            && outcome.source == ScoreSource::Verifier
        {
            *last = Some(outcome.score >= 0.5);
        }
        checks
    }

    /// The class of the fallback as things stand now.
    fn fallback_class(&self) -> Class {
        match self.cfg.fallback {
            Fallback::Distilled if self.distiller.as_ref().is_some_and(|d| d.ready()) => Class::Distilled,
            Fallback::Distilled | Fallback::Verifier => Class::Verifier,
            Fallback::None => Class::Unknown,
        }
    }

    /// The plan of `t`'s group: made when its first member is labeled (the
    /// budget asked once for the whole group), then kept for the others.
    fn plan(&self, judge: &Judge, t: &Trajectory, calls: u64) -> Plan {
        let group = t.group.0;
        // Held while planning, so the budget is asked once per group.
        let mut plans = lock(&self.plans);
        if let Some(p) = plans.get(group) {
            return p;
        }
        let group_calls = calls.saturating_mul(t.group_size.max(1) as u64);
        let admitted = lock(&self.budget).admit(group, group_calls, Instant::now());
        let trusted = judge.trusted();
        let fallback = self.fallback_class();
        let class = if admitted && trusted && !self.wait.is_zero() { Class::Judge } else { fallback };
        if admitted && !trusted {
            self.counts().distrusted_groups += 1;
            if !self.wait.is_zero() {
                self.probe_canary(judge, t);
            }
        }
        plans.insert(group, Plan { admitted, class, fallback })
    }

    /// While the canary gate distrusts the judge and no label calls it, one
    /// canary at a time keeps measuring it, so that it can be trusted again.
    /// (Background annotation keeps calling the judge, and canaries with it.)
    fn probe_canary(&self, judge: &Judge, t: &Trajectory) {
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.probing.store(false, Ordering::Release);
            return;
        };
        let (judge, probing, problem) = (judge.clone(), self.probing.clone(), t.prompt.problem.clone());
        runtime.spawn(async move {
            judge.send_canary_now(&problem).await;
            probing.store(false, Ordering::Release);
        });
    }

    async fn judge_scores(
        &self,
        t: &Trajectory,
        steps: &[prism_core::Step],
        texts: &[&str],
        outcome: &Outcome,
        deadline: tokio::time::Instant,
        meta: &mut LabelMeta,
    ) -> Vec<(Option<f32>, ScoreSource)> {
        let Some(judge) = &self.judge else { return self.verifier_scores(t, texts) };
        if texts.is_empty() {
            return Vec::new();
        }
        if self.cfg.guard && (outcome.answer.is_none() || t.text.trim().chars().count() < self.cfg.min_chars as usize) {
            self.counts().guarded += 1;
            meta.guarded = true;
            return vec![(Some(0.0), ScoreSource::Guard); texts.len()];
        }
        let problem = if t.prompt.problem.is_empty() { t.prompt.text.as_str() } else { t.prompt.problem.as_str() };
        let cfg = judge.config();
        let calls = match judge.template().style() {
            Style::Genprm => texts.len() as u64 * cfg.samples as u64,
            Style::Thinkprm => cfg.samples as u64,
        };
        let plan = self.plan(judge, t, calls);
        meta.judge_admitted = plan.admitted;
        let subject = Subject {
            problem,
            reference: t.prompt.reference.as_deref(),
            outcome: (outcome.source == ScoreSource::Verifier).then_some(outcome.score >= 0.5),
        };
        let checks = self.checks(t, texts, outcome);
        if plan.admitted
            && let Some(queue) = &self.annotations
        {
            meta.queued = true;
            queue.push(Job {
                problem: problem.to_string(),
                reference: subject.reference.map(str::to_string),
                outcome: subject.outcome,
                steps: texts.iter().map(|s| s.to_string()).collect(),
                contexts: steps.iter().map(|s| self.context(t, problem, s)).collect(),
                checks: checks.clone(),
            });
        }
        let mut scores: Vec<Option<(Option<f32>, ScoreSource)>> = vec![None; texts.len()];
        if plan.class == Class::Judge {
            let until = deadline.min(tokio::time::Instant::now() + self.wait);
            let judgements = judge.judge_subject(&subject, texts, Some(until)).await;
            meta.judgements = judgements.iter().cloned().map(Some).collect();
            let mut learn = Vec::new();
            let mut c = self.counts();
            let mut hit_deadline = false;
            for (i, j) in judgements.into_iter().enumerate() {
                match j {
                    StepJudgement::Scored { p, cached, .. } if p.is_finite() => {
                        scores[i] = Some((Some(p), if cached { ScoreSource::JudgeCache } else { ScoreSource::Judge }));
                        if !cached {
                            learn.push(JudgedStep {
                                context: self.context(t, problem, &steps[i]),
                                step: texts[i].to_string(),
                                p,
                                check: checks[i],
                            });
                        }
                    }
                    StepJudgement::Scored { .. } | StepJudgement::Unknown { .. } => c.judge_unknown_steps += 1,
                    StepJudgement::Failed { failure } => {
                        c.judge_failed_steps += 1;
                        hit_deadline |= failure == Failure::Deadline;
                    }
                }
            }
            if hit_deadline {
                c.deadline_hits += 1;
            }
            drop(c);
            meta.deadline_hit = hit_deadline;
            if let Some(l) = &self.learner {
                l.learn(learn);
            }
        }
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| scores[i].is_none()).collect();
        if !missing.is_empty() {
            let class = if plan.class == Class::Judge { plan.fallback } else { plan.class };
            self.counts().fallback_steps += missing.len() as u64;
            let fallback = self.scores_of(class, t, problem, steps, texts, &missing).await;
            for (i, s) in missing.into_iter().zip(fallback) {
                scores[i] = Some(s);
            }
        }
        scores.into_iter().map(|s| s.unwrap_or((None, ScoreSource::Unknown))).collect()
    }

    /// Scores for the steps `missing` from the source class `class`; the
    /// verifiers when the distilled model cannot score them after all (counted).
    async fn scores_of(
        &self,
        class: Class,
        t: &Trajectory,
        problem: &str,
        steps: &[prism_core::Step],
        texts: &[&str],
        missing: &[usize],
    ) -> Vec<(Option<f32>, ScoreSource)> {
        match class {
            Class::Unknown => return vec![(None, ScoreSource::Unknown); missing.len()],
            Class::Distilled => {
                if let Some(d) = &self.distiller {
                    let d = d.clone();
                    let items: Vec<(String, String)> =
                        missing.iter().map(|&i| (self.context(t, problem, &steps[i]), texts[i].to_string())).collect();
                    let scored = tokio::task::spawn_blocking(move || {
                        let refs: Vec<(&str, &str)> = items.iter().map(|(c, s)| (c.as_str(), s.as_str())).collect();
                        d.score(&refs)
                    })
                    .await;
                    if let Ok(Ok(scores)) = scored
                        && scores.iter().all(Option::is_some)
                    {
                        return scores.into_iter().map(|s| (s, ScoreSource::Distilled)).collect();
                    }
                }
                self.counts().distilled_unavailable += 1;
            }
            Class::Verifier | Class::Judge => {}
        }
        let all = self.verifier_scores(t, texts);
        missing.iter().map(|&i| all[i]).collect()
    }

    /// The context of a step for the distilled model: the problem and the
    /// completion up to the step.
    fn context(&self, t: &Trajectory, problem: &str, step: &prism_core::Step) -> String {
        format!("{problem}\n{}", &t.text[..step.text.start as usize])
    }

    /// Learns from steps another process's judge scored (distributed mode:
    /// every reward process trains its distilled model on every judged step).
    /// Returns how many were taken (0 without a distilled model).
    pub fn learn_from(&self, judged: Vec<JudgedStep>) -> usize {
        match &self.learner {
            Some(l) => {
                let n = judged.len();
                l.learn_remote(judged);
                n
            }
            None => 0,
        }
    }

    /// Steps this labeler's judge scored since the last call (fresh verdicts
    /// only, not cache hits), for sharing with other processes; empty unless
    /// [`Labeler::share_judged`] turned sharing on.
    pub fn take_judged(&self) -> Vec<JudgedStep> {
        self.learner.as_ref().map(|l| l.take_shared()).unwrap_or_default()
    }

    /// Keeps (up to `cap`) the steps this labeler's judge scores, for
    /// [`Labeler::take_judged`].
    pub fn share_judged(&self, cap: usize) {
        if let Some(l) = &self.learner {
            l.share(cap);
        }
    }

    /// Waits until the background annotation queue is empty, no annotation
    /// is in flight and the distilled model has learned from every verdict
    /// received, or `timeout` passes; says whether it settled. For tests,
    /// benchmarks and the end of a run.
    pub async fn settled(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        loop {
            let queue_idle = self.annotations.as_ref().is_none_or(|a| {
                let h = a.health();
                h.depth == 0 && h.busy == 0
            });
            if queue_idle && self.learner.as_ref().is_none_or(Learner::idle) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reward health now: what every learner step's metrics row carries.
    pub fn health(&self) -> Health {
        let judge = self.judge.as_ref().map(Judge::metrics);
        let distill = self.distiller.as_ref().map(|d| d.metrics());
        let implicit = self.implicit.as_ref().map(|p| p.metrics());
        Health {
            judge_wait_ms: self.judge.as_ref().map(|_| self.wait.as_millis() as u64),
            judge_latency_ms: judge.as_ref().filter(|j| j.verdicts + j.unknown_verdicts > 0).map(|j| LatencyMs {
                p50: j.latency_ms_p50,
                p95: j.latency_ms_p95,
            }),
            annotation_queue: self.annotations.as_ref().map(|a| a.health()),
            canary_fp_rate: judge.as_ref().and_then(|j| j.canary_fp_rate_window),
            canary_max_rate: self.judge.as_ref().map(|j| j.config().canary_max_rate),
            judge_trusted: judge.as_ref().map(|j| j.trusted),
            distill_agreement: distill.as_ref().and_then(|d| d.agreement),
            distill_min_agreement: distill.as_ref().map(|d| d.min_agreement),
            distill_ready: distill.as_ref().map(|d| d.ready),
            judge_budget_refused: self.judge.as_ref().map(|_| lock(&self.budget).refused),
            distill_keep_rate: distill.as_ref().and_then(|d| d.consensus_keep_rate),
            implicit_loss: implicit.as_ref().and_then(|m| m.loss),
            implicit_updates: implicit.as_ref().map(|m| m.updates),
        }
    }

    /// A snapshot of the counters, the judge's and the distilled model's metrics.
    pub fn metrics(&self) -> Metrics {
        let budget_refusals = lock(&self.budget).refused;
        let c = self.counts();
        Metrics {
            labels: c.labels,
            guarded: c.guarded,
            deadline_hits: c.deadline_hits,
            budget_refusals,
            fallback_steps: c.fallback_steps,
            judge_unknown_steps: c.judge_unknown_steps,
            judge_failed_steps: c.judge_failed_steps,
            distrusted_groups: c.distrusted_groups,
            distilled_unavailable: c.distilled_unavailable,
            implicit_failures: c.implicit_failures,
            sources: c.sources.clone(),
            annotations: self.annotations.as_ref().map(|a| a.health()),
            judge: self.judge.as_ref().map(Judge::metrics),
            distill: self.distiller.as_ref().map(|d| d.metrics()),
            implicit: self.implicit.as_ref().map(|p| p.metrics()),
        }
    }
}

impl Drop for Labeler {
    fn drop(&mut self) {
        if let Some(a) = &self.annotations {
            a.close();
        }
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a group's process scores come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The judge's verdicts (live or cached), waited for.
    Judge,
    Distilled,
    Verifier,
    /// No source: scores unknown (`fallback = "none"`).
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    /// The budget admitted the group to the judge.
    admitted: bool,
    class: Class,
    /// For steps the judge did not score (class `Judge`).
    fallback: Class,
}

/// The plans of the latest groups (bounded: a group's members are labeled
/// close together).
#[derive(Default)]
struct Plans {
    by_group: HashMap<u64, Plan>,
    order: VecDeque<u64>,
}

const PLANS_KEPT: usize = 65_536;

impl Plans {
    fn get(&self, group: u64) -> Option<Plan> {
        self.by_group.get(&group).copied()
    }

    fn insert(&mut self, group: u64, plan: Plan) -> Plan {
        if self.order.len() == PLANS_KEPT
            && let Some(old) = self.order.pop_front()
        {
            self.by_group.remove(&old);
        }
        self.order.push_back(group);
        self.by_group.insert(group, plan);
        plan
    }
}

/// One step the judge scored: what the distilled model learns from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgedStep {
    /// The problem and the completion before the step.
    pub context: String,
    pub step: String,
    /// The judge's P(step correct).
    pub p: f32,
    /// An independent verdict on the step (the step verifier's, or the
    /// outcome's for the last step), for `distill.consensus`; `None` when
    /// there is none or the filter is off.
    #[serde(default)]
    pub check: Option<bool>,
}

/// Feeds the distilled model on one blocking thread at a time, from the
/// labeler's own judge calls and from other processes'; a bounded inbox whose
/// overflow is counted.
#[derive(Clone)]
struct Learner {
    inner: Arc<LearnerInner>,
}

struct LearnerInner {
    distiller: Arc<Distiller>,
    inbox: Mutex<VecDeque<JudgedStep>>,
    running: std::sync::atomic::AtomicBool,
    dropped: AtomicU64,
    failed: AtomicU64,
    shared: Mutex<Option<(usize, Vec<JudgedStep>)>>,
}

const LEARN_INBOX: usize = 16_384;

impl Learner {
    fn new(distiller: Arc<Distiller>) -> Self {
        Self {
            inner: Arc::new(LearnerInner {
                distiller,
                inbox: Mutex::new(VecDeque::new()),
                running: false.into(),
                dropped: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                shared: Mutex::new(None),
            }),
        }
    }

    /// Learns from this process's judged steps (and keeps them for sharing).
    fn learn(&self, steps: Vec<JudgedStep>) {
        if steps.is_empty() {
            return;
        }
        if let Some((cap, kept)) = lock(&self.inner.shared).as_mut() {
            let room = cap.saturating_sub(kept.len());
            kept.extend(steps.iter().take(room).cloned());
        }
        self.learn_remote(steps);
    }

    fn learn_remote(&self, steps: Vec<JudgedStep>) {
        {
            let mut inbox = lock(&self.inner.inbox);
            for s in steps {
                if inbox.len() == LEARN_INBOX {
                    inbox.pop_front();
                    self.inner.dropped.fetch_add(1, Ordering::Relaxed);
                }
                inbox.push_back(s);
            }
        }
        if self.inner.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        let drain = move || {
            loop {
                let batch: Vec<JudgedStep> = lock(&inner.inbox).drain(..).collect();
                if batch.is_empty() {
                    inner.running.store(false, Ordering::Release);
                    // A push may have come between the drain and the store.
                    if lock(&inner.inbox).is_empty() || inner.running.swap(true, Ordering::AcqRel) {
                        return;
                    }
                    continue;
                }
                for s in batch {
                    if let Err(e) = inner.distiller.observe_checked(&s.context, &s.step, s.p, s.check) {
                        inner.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "distilled model could not learn from a judged step");
                    }
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(drain)),
            Err(_) => drain(),
        }
    }

    fn idle(&self) -> bool {
        !self.inner.running.load(Ordering::Acquire) && lock(&self.inner.inbox).is_empty()
    }

    fn share(&self, cap: usize) {
        let mut shared = lock(&self.inner.shared);
        if shared.is_none() {
            *shared = Some((cap, Vec::new()));
        }
    }

    fn take_shared(&self) -> Vec<JudgedStep> {
        lock(&self.inner.shared).as_mut().map(|(_, kept)| std::mem::take(kept)).unwrap_or_default()
    }
}

/// One trajectory waiting for the judge in the background.
struct Job {
    problem: String,
    reference: Option<String>,
    outcome: Option<bool>,
    steps: Vec<String>,
    contexts: Vec<String>,
    checks: Vec<Option<bool>>,
}

/// The background annotation queue: a bounded queue of trajectories the
/// judge is to score (shedding the oldest when full) and `reward.annotators`
/// tasks that judge them, started with the first job on the caller's tokio
/// runtime, each call bounded by `reward.deadline_ms`. Verdicts train the
/// distilled model (while the judge is trusted: see the canary gate) and fill
/// the judge's cache.
struct Annotations {
    inner: Arc<AnnotationsInner>,
}

struct AnnotationsInner {
    judge: Judge,
    learner: Option<Learner>,
    capacity: usize,
    workers: usize,
    deadline: Duration,
    queue: Mutex<VecDeque<Job>>,
    wake: tokio::sync::Notify,
    started: std::sync::Once,
    closed: std::sync::atomic::AtomicBool,
    queued: AtomicU64,
    shed: AtomicU64,
    judged: AtomicU64,
    busy: AtomicU64,
    untrusted: AtomicU64,
}

/// The background annotation queue's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueHealth {
    /// Trajectories waiting now.
    pub depth: u64,
    /// Most that may wait.
    pub capacity: u64,
    /// Trajectories being judged now.
    pub busy: u64,
    /// Trajectories queued, taken to the judge (judged, or failed: an outage
    /// drains the queue fast), and shed (oldest first, queue full) so far.
    pub queued: u64,
    pub judged: u64,
    pub shed: u64,
    /// Judged while the canary gate distrusted the judge (not learned from).
    pub untrusted: u64,
}

impl Annotations {
    fn new(cfg: &Config, judge: Judge, learner: Option<Learner>) -> Self {
        Self {
            inner: Arc::new(AnnotationsInner {
                judge,
                learner,
                capacity: cfg.annotation_queue as usize,
                workers: cfg.annotators as usize,
                deadline: Duration::from_millis(cfg.deadline_ms),
                queue: Mutex::new(VecDeque::new()),
                wake: tokio::sync::Notify::new(),
                started: std::sync::Once::new(),
                closed: false.into(),
                queued: AtomicU64::new(0),
                shed: AtomicU64::new(0),
                judged: AtomicU64::new(0),
                busy: AtomicU64::new(0),
                untrusted: AtomicU64::new(0),
            }),
        }
    }

    fn push(&self, job: Job) {
        let inner = &self.inner;
        {
            let mut q = lock(&inner.queue);
            if q.len() >= inner.capacity {
                q.pop_front();
                inner.shed.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(job);
        }
        inner.queued.fetch_add(1, Ordering::Relaxed);
        inner.started.call_once(|| match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                for _ in 0..inner.workers {
                    h.spawn(annotate(inner.clone()));
                }
            }
            Err(_) => tracing::warn!("no async runtime: background annotation cannot start"),
        });
        inner.wake.notify_one();
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_waiters();
    }

    fn health(&self) -> QueueHealth {
        let i = &self.inner;
        QueueHealth {
            depth: lock(&i.queue).len() as u64,
            capacity: i.capacity as u64,
            busy: i.busy.load(Ordering::Relaxed),
            queued: i.queued.load(Ordering::Relaxed),
            judged: i.judged.load(Ordering::Relaxed),
            shed: i.shed.load(Ordering::Relaxed),
            untrusted: i.untrusted.load(Ordering::Relaxed),
        }
    }
}

/// One annotation task: judges queued trajectories until the labeler is dropped.
async fn annotate(inner: Arc<AnnotationsInner>) {
    loop {
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let wake = inner.wake.notified();
        let job = lock(&inner.queue).pop_front();
        let Some(job) = job else {
            wake.await;
            continue;
        };
        inner.busy.fetch_add(1, Ordering::Relaxed);
        let steps: Vec<&str> = job.steps.iter().map(String::as_str).collect();
        let subject = Subject { problem: &job.problem, reference: job.reference.as_deref(), outcome: job.outcome };
        let deadline = tokio::time::Instant::now() + inner.deadline;
        let judgements = inner.judge.judge_subject(&subject, &steps, Some(deadline)).await;
        inner.busy.fetch_sub(1, Ordering::Relaxed);
        inner.judged.fetch_add(1, Ordering::Relaxed);
        if !inner.judge.trusted() {
            inner.untrusted.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let learned: Vec<JudgedStep> = judgements
            .iter()
            .zip(job.contexts.iter().zip(&job.steps))
            .zip(&job.checks)
            .filter_map(|((j, (context, step)), check)| match j {
                StepJudgement::Scored { p, cached: false, .. } if p.is_finite() => {
                    Some(JudgedStep { context: context.clone(), step: step.clone(), p: *p, check: *check })
                }
                _ => None,
            })
            .collect();
        if let Some(l) = &inner.learner {
            l.learn(learned);
        }
    }
}

/// Latency quantiles, ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p95: f64,
}

/// Reward health of a run, as each learner step's metrics row carries it
/// (fields are absent when the run has no judge or no distilled model).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `reward.judge_wait_ms` resolved (0 = background annotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_latency_ms: Option<LatencyMs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotation_queue: Option<QueueHealth>,
    /// The canary false-positive rate over the latest window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_fp_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary_max_rate: Option<f64>,
    /// False while the canary gate has turned judge scores off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_trusted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill_min_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill_ready: Option<bool>,
    /// Groups the annotation budget kept from the judge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub judge_budget_refused: Option<u64>,
    /// `distill.consensus`: the share of judged steps learned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill_keep_rate: Option<f64>,
    /// The implicit PRM's moving-average loss and its updates so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub implicit_updates: Option<u64>,
}

#[cfg(test)]
mod tests;
