//! The assembly of one trajectory's [`RewardLabel`]: outcome verifier, step
//! segmentation, and step scores from the verifiers or the judge (with the
//! guard, the annotation budget, the overall deadline and the fallback), each
//! with its source.

use crate::Result;
use crate::config::{Config, Fallback, Process};
use crate::distill::{self, Budget, DistillMetrics, Distiller};
use crate::judge::{self, Failure, Judge, JudgeMetrics, StepJudgement, Style};
use crate::outcome::{Outcome, OutcomeVerifier};
use crate::segment::Segmenter;
use crate::steps::StepVerifier;
use prism_core::{RewardLabel, ScoreSource, StepScore, Trajectory};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Labels trajectories; built once from the config and shared.
pub struct Labeler {
    cfg: Config,
    segmenter: Segmenter,
    outcome: OutcomeVerifier,
    judge: Option<Judge>,
    distiller: Option<Arc<Distiller>>,
    budget: Mutex<Budget>,
    counts: Mutex<Counts>,
}

/// Step scores handed out, by source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceCounts {
    pub verifier: u64,
    pub judge: u64,
    pub judge_cache: u64,
    pub distilled: u64,
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
    sources: SourceCounts,
}

/// How one label was made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelMeta {
    /// Time spent labeling, ms.
    pub elapsed_ms: f64,
    /// The guard scored every step 0 before any judge call.
    pub guarded: bool,
    /// The annotation budget let the judge label this trajectory.
    pub judge_admitted: bool,
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
    /// Trajectories the annotation budget kept from the judge.
    pub budget_refusals: u64,
    /// Steps the judge did not score that got the fallback.
    pub fallback_steps: u64,
    /// Steps whose judge verdicts were all unreadable.
    pub judge_unknown_steps: u64,
    /// Steps whose judge calls failed (breaker open, errors, deadline).
    pub judge_failed_steps: u64,
    /// Step scores by source.
    pub sources: SourceCounts,
    pub judge: Option<JudgeMetrics>,
    pub distill: Option<DistillMetrics>,
}

impl Labeler {
    /// A labeler for `[reward]`, with a judge client when `process = "judge"`
    /// and a distilled model when `[distill] enabled`.
    pub fn new(cfg: &Config, judge_cfg: &judge::Config, distill_cfg: &distill::Config) -> Result<Self> {
        cfg.validate()?;
        let judge = if cfg.process == Process::Judge { Some(Judge::new(judge_cfg)?) } else { None };
        let distiller = if cfg.process == Process::Judge && distill_cfg.enabled {
            Some(Arc::new(Distiller::new(distill_cfg)?))
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            segmenter: Segmenter::new(cfg)?,
            outcome: OutcomeVerifier::new(cfg)?,
            judge,
            distiller,
            budget: Mutex::new(Budget::new(distill_cfg)),
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn judge(&self) -> Option<&Judge> {
        self.judge.as_ref()
    }

    pub fn distiller(&self) -> Option<&Arc<Distiller>> {
        self.distiller.as_ref()
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The label of `t`. Never fails and never waits past `reward.deadline_ms`
    /// on the judge: every step gets a score or `None`, and a source.
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

    fn verifier_scores(&self, t: &Trajectory, texts: &[&str]) -> Vec<(Option<f32>, ScoreSource)> {
        let verifier = StepVerifier::for_task(self.cfg.step_verifier, &t.prompt.task, self.cfg.tolerance);
        verifier
            .score(&t.prompt, texts)
            .into_iter()
            .map(|s| (s, if s.is_some() { ScoreSource::Verifier } else { ScoreSource::Unknown }))
            .collect()
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
        let admitted = self.budget.lock().unwrap_or_else(|e| e.into_inner()).admit(t.id.0, calls, Instant::now());
        let mut scores: Vec<Option<(Option<f32>, ScoreSource)>> = vec![None; texts.len()];
        let mut learn = Vec::new();
        meta.judge_admitted = admitted;
        if admitted {
            let judgements = judge.judge_until(problem, texts, Some(deadline)).await;
            meta.judgements = judgements.iter().cloned().map(Some).collect();
            let mut c = self.counts();
            let mut hit_deadline = false;
            for (i, j) in judgements.into_iter().enumerate() {
                match j {
                    StepJudgement::Scored { p, cached, .. } => {
                        scores[i] = Some((Some(p), if cached { ScoreSource::JudgeCache } else { ScoreSource::Judge }));
                        if !cached {
                            learn.push((self.context(t, problem, &steps[i]), texts[i].to_string(), p));
                        }
                    }
                    StepJudgement::Unknown { .. } => c.judge_unknown_steps += 1,
                    StepJudgement::Failed { failure } => {
                        c.judge_failed_steps += 1;
                        hit_deadline |= failure == Failure::Deadline;
                    }
                }
            }
            if hit_deadline {
                c.deadline_hits += 1;
            }
            meta.deadline_hit = hit_deadline;
        }
        if let (Some(d), false) = (&self.distiller, learn.is_empty()) {
            let d = d.clone();
            let observed = tokio::task::spawn_blocking(move || {
                for (context, step, p) in learn {
                    d.observe(&context, &step, p)?;
                }
                Ok::<_, crate::Error>(())
            })
            .await;
            if let Ok(Err(e)) | Err(e) = observed.map_err(|e| crate::Error::Client(e.to_string())) {
                tracing::warn!(error = %e, "distilled model could not learn from the judge");
            }
        }
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| scores[i].is_none()).collect();
        if !missing.is_empty() {
            self.counts().fallback_steps += missing.len() as u64;
            let fallback = self.fallback(t, problem, steps, texts, &missing).await;
            for (i, s) in missing.into_iter().zip(fallback) {
                scores[i] = Some(s);
            }
        }
        scores.into_iter().map(|s| s.unwrap_or((None, ScoreSource::Unknown))).collect()
    }

    /// Scores for the steps `missing` from the configured fallback.
    async fn fallback(
        &self,
        t: &Trajectory,
        problem: &str,
        steps: &[prism_core::Step],
        texts: &[&str],
        missing: &[usize],
    ) -> Vec<(Option<f32>, ScoreSource)> {
        if self.cfg.fallback == Fallback::Distilled
            && let Some(d) = self.distiller.as_ref().filter(|d| d.ready())
        {
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
        if self.cfg.fallback == Fallback::None {
            return vec![(None, ScoreSource::Unknown); missing.len()];
        }
        let all = self.verifier_scores(t, texts);
        missing.iter().map(|&i| all[i]).collect()
    }

    /// The context of a step for the distilled model: the problem and the
    /// completion up to the step.
    fn context(&self, t: &Trajectory, problem: &str, step: &prism_core::Step) -> String {
        format!("{problem}\n{}", &t.text[..step.text.start as usize])
    }

    /// A snapshot of the counters, the judge's and the distilled model's metrics.
    pub fn metrics(&self) -> Metrics {
        let budget_refusals = self.budget.lock().unwrap_or_else(|e| e.into_inner()).refused;
        let c = self.counts();
        Metrics {
            labels: c.labels,
            guarded: c.guarded,
            deadline_hits: c.deadline_hits,
            budget_refusals,
            fallback_steps: c.fallback_steps,
            judge_unknown_steps: c.judge_unknown_steps,
            judge_failed_steps: c.judge_failed_steps,
            sources: c.sources.clone(),
            judge: self.judge.as_ref().map(Judge::metrics),
            distill: self.distiller.as_ref().map(|d| d.metrics()),
        }
    }
}

#[cfg(test)]
mod tests;
