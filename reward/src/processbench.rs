//! ProcessBench (Zheng et al. 2024): can a judge find the first wrong step?
//!
//! Each item has a problem, its solution's steps and `label`, the 0-based index
//! of the first wrong step or -1 when all are right. The judge's prediction is
//! the first step scored below `judge.threshold` (or -1). The metric is the
//! accuracy on the erroneous items (prediction == label), the accuracy on the
//! all-correct items (prediction == -1), and their harmonic mean (F1).
//!
//! A step the judge could not score (unreadable verdicts, failed calls) does
//! not count as wrong; such steps are counted and reported with each item.

use crate::judge::{Judge, StepJudgement};
use crate::{Error, Result};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One ProcessBench item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub problem: String,
    pub steps: Vec<String>,
    /// Index of the first wrong step, or -1.
    pub label: i64,
}

/// The judge's reading of one item, as written to the predictions JSONL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub label: i64,
    /// First step scored below the threshold, or -1.
    pub prediction: i64,
    pub correct: bool,
    /// Each step's score (`null` when the judge gave none).
    pub scores: Vec<Option<f32>>,
    pub judgements: Vec<StepJudgement>,
    /// Steps whose verdicts were all unreadable.
    pub unknown_steps: u32,
    /// Steps whose judge calls failed.
    pub failed_steps: u32,
}

/// The ProcessBench metric over a set of predictions (accuracies in percent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub items: usize,
    pub erroneous: usize,
    pub all_correct: usize,
    /// Accuracy on the erroneous items, %.
    pub erroneous_accuracy: f64,
    /// Accuracy on the all-correct items, %.
    pub correct_accuracy: f64,
    /// Harmonic mean of the two, %.
    pub f1: f64,
    pub unknown_steps: u64,
    pub failed_steps: u64,
}

/// Reads ProcessBench items from a JSON array or JSON lines; the first `limit`.
pub fn load(path: &Path, limit: Option<usize>) -> Result<Vec<Item>> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: name.clone(), reason: e.to_string() })?;
    let values: Vec<serde_json::Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| Error::Data { path: name.clone(), item: 0, reason: e.to_string() })?
    } else {
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| Error::Data { path: name.clone(), item: i, reason: e.to_string() })
            })
            .collect::<Result<_>>()?
    };
    values
        .into_iter()
        .take(limit.unwrap_or(usize::MAX))
        .enumerate()
        .map(|(i, v)| {
            let bad = |reason: &str| Error::Data { path: name.clone(), item: i, reason: reason.into() };
            let steps: Vec<String> = v["steps"]
                .as_array()
                .ok_or_else(|| bad("no `steps` list"))?
                .iter()
                .map(|s| s.as_str().map(str::to_string).ok_or_else(|| bad("a step is not a string")))
                .collect::<Result<_>>()?;
            let label = v["label"].as_i64().ok_or_else(|| bad("no integer `label`"))?;
            if label < -1 || label >= steps.len() as i64 {
                return Err(bad(&format!("label {label} outside -1..{}", steps.len())));
            }
            Ok(Item {
                id: v["id"].as_str().map_or_else(|| i.to_string(), str::to_string),
                problem: v["problem"].as_str().ok_or_else(|| bad("no `problem`"))?.to_string(),
                steps,
                label,
            })
        })
        .collect()
}

/// The prediction for one item from the judge's step judgements.
pub fn predict(item: &Item, judgements: Vec<StepJudgement>, threshold: f64) -> Prediction {
    let scores: Vec<Option<f32>> = judgements.iter().map(StepJudgement::score).collect();
    let prediction = scores.iter().position(|s| s.is_some_and(|p| (p as f64) < threshold)).map_or(-1, |i| i as i64);
    Prediction {
        id: item.id.clone(),
        label: item.label,
        prediction,
        correct: prediction == item.label,
        scores,
        unknown_steps: judgements.iter().filter(|j| matches!(j, StepJudgement::Unknown { .. })).count() as u32,
        failed_steps: judgements.iter().filter(|j| matches!(j, StepJudgement::Failed { .. })).count() as u32,
        judgements,
    }
}

/// The metric over `predictions`.
pub fn report(predictions: &[Prediction]) -> Report {
    let accuracy = |erroneous: bool| -> (usize, f64) {
        let subset: Vec<&Prediction> = predictions.iter().filter(|p| (p.label >= 0) == erroneous).collect();
        let right = subset.iter().filter(|p| p.correct).count();
        (subset.len(), if subset.is_empty() { 0.0 } else { 100.0 * right as f64 / subset.len() as f64 })
    };
    let (erroneous, erroneous_accuracy) = accuracy(true);
    let (all_correct, correct_accuracy) = accuracy(false);
    let sum = erroneous_accuracy + correct_accuracy;
    Report {
        items: predictions.len(),
        erroneous,
        all_correct,
        erroneous_accuracy,
        correct_accuracy,
        f1: if sum > 0.0 { 2.0 * erroneous_accuracy * correct_accuracy / sum } else { 0.0 },
        unknown_steps: predictions.iter().map(|p| p.unknown_steps as u64).sum(),
        failed_steps: predictions.iter().map(|p| p.failed_steps as u64).sum(),
    }
}

/// Judges `items` with up to `concurrency` items in flight (the judge's own
/// limit on requests applies too), calling `done` as each finishes; returns the
/// predictions in item order.
pub async fn evaluate(
    judge: &Judge,
    items: &[Item],
    concurrency: usize,
    mut done: impl FnMut(&Prediction),
) -> Vec<Prediction> {
    let threshold = judge.config().threshold;
    let mut out: Vec<Option<Prediction>> = vec![None; items.len()];
    let mut running = futures::stream::iter(items.iter().enumerate())
        .map(|(i, item)| async move {
            let steps: Vec<&str> = item.steps.iter().map(String::as_str).collect();
            (i, predict(item, judge.judge(&item.problem, &steps).await, threshold))
        })
        .buffer_unordered(concurrency.max(1));
    while let Some((i, p)) = running.next().await {
        done(&p);
        out[i] = Some(p);
    }
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(label: i64, n: usize) -> Item {
        Item { id: "x".into(), problem: "p".into(), steps: vec!["s".into(); n], label }
    }

    fn scored(p: f32) -> StepJudgement {
        StepJudgement::Scored { p, cached: false, samples: 1, unknown: 0 }
    }

    #[test]
    fn prediction_is_the_first_step_below_threshold() {
        let p = predict(&item(1, 3), vec![scored(0.9), scored(0.2), scored(0.1)], 0.5);
        assert_eq!((p.prediction, p.correct), (1, true));
        let p = predict(&item(-1, 2), vec![scored(0.9), StepJudgement::Unknown { samples: 1 }], 0.5);
        assert_eq!((p.prediction, p.correct, p.unknown_steps), (-1, true, 1));
    }

    #[test]
    fn metric_is_the_harmonic_mean_of_the_two_accuracies() {
        // Erroneous: 1 of 2 right (50%); all-correct: 1 of 1 right (100%);
        // F1 = 2*50*100/150 = 66.67 by hand.
        let preds = vec![
            predict(&item(0, 2), vec![scored(0.1), scored(0.9)], 0.5),
            predict(&item(1, 2), vec![scored(0.9), scored(0.9)], 0.5),
            predict(&item(-1, 2), vec![scored(0.9), scored(0.9)], 0.5),
        ];
        let r = report(&preds);
        assert_eq!((r.items, r.erroneous, r.all_correct), (3, 2, 1));
        assert_eq!((r.erroneous_accuracy, r.correct_accuracy), (50.0, 100.0));
        assert!((r.f1 - 200.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn loads_the_shipped_data() {
        for (file, n) in [("gsm8k.json", 400), ("math.json", 1000)] {
            let items = load(&crate::testkit::data_dir().join("processbench").join(file), None).unwrap();
            assert_eq!(items.len(), n, "{file}");
            assert!(items.iter().any(|i| i.label == -1) && items.iter().any(|i| i.label >= 0));
        }
        let some = load(&crate::testkit::data_dir().join("processbench/gsm8k.json"), Some(5)).unwrap();
        assert_eq!((some.len(), some[0].id.as_str()), (5, "gsm8k-0"));
    }
}
