use super::*;
use crate::config::{Fallback, Process};
use crate::testkit::{Reply, Request, TestServer, chat_text, trajectory};

/// A judge that says Yes to a step iff it is `a op b = c` with the right `c`
/// (or an answer line), reading the step under judgment from the GenPRM prompt.
fn arithmetic_judge() -> TestServer {
    TestServer::start(|req: &Request| {
        let prompt = req.prompt();
        let n: usize =
            prompt.split("Judge only Step ").nth(1).and_then(|r| r.split(';').next()).unwrap().parse().unwrap();
        let step = prompt.split(&format!("Step {n}:\n")).nth(1).unwrap().lines().next().unwrap();
        let right = step.starts_with("A:") || {
            let (lhs, c) = step.split_once('=').unwrap_or(("", "x"));
            crate::expr::eval(lhs).ok() == c.parse::<f64>().ok()
        };
        Reply::ok(chat_text(&[if right { "\\boxed{Yes}" } else { "\\boxed{No}" }])).into()
    })
    .unwrap()
}

fn judge_config(server: &TestServer) -> judge::Config {
    judge::Config {
        url: server.url(),
        timeout_ms: 5_000,
        backoff_ms: 1,
        backoff_max_ms: 5,
        canary_every: 0,
        top_logprobs: 0,
        ..judge::Config::default()
    }
}

fn sources(label: &RewardLabel) -> Vec<ScoreSource> {
    label.steps.iter().map(|s| s.source).collect()
}

fn scores(label: &RewardLabel) -> Vec<Option<f32>> {
    label.steps.iter().map(|s| s.score).collect()
}

#[tokio::test]
async fn verifier_labels_carry_outcome_steps_and_spans() {
    let labeler = Labeler::new(&Config::default(), &judge::Config::default(), &distill::Config::default()).unwrap();
    let t = trajectory(1, "arithmetic", "7+3*4-2", None, "3*4=12\n7+12=20\n20-2=18\nA:18\n");
    let label = labeler.label(&t).await;
    assert_eq!(
        (label.outcome, label.outcome_source, label.answer.as_deref()),
        (0.0, ScoreSource::Verifier, Some("18"))
    );
    assert_eq!(scores(&label), vec![Some(1.0), Some(0.0), Some(1.0), Some(0.0)]);
    assert_eq!(sources(&label), vec![ScoreSource::Verifier; 4]);
    // One token per character here, so token spans equal byte spans.
    assert_eq!(label.steps[1].step.text, 7..14);
    assert_eq!(label.steps[1].step.tokens, 7..14);
    let m = labeler.metrics();
    assert_eq!((m.labels, m.sources.verifier, m.judge.is_none()), (1, 4, true));
}

#[tokio::test]
async fn outcome_only() {
    let cfg = Config { process: Process::None, ..Config::default() };
    let labeler = Labeler::new(&cfg, &judge::Config::default(), &distill::Config::default()).unwrap();
    let label = labeler.label(&trajectory(1, "arithmetic", "2+2", None, "2+2=4\nA:4\n")).await;
    assert_eq!((label.outcome, label.steps.len()), (1.0, 0));
}

#[tokio::test]
async fn judge_labels_then_cache() {
    let server = arithmetic_judge();
    let cfg = Config { process: Process::Judge, ..Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill::Config::default()).unwrap();
    let t = trajectory(1, "arithmetic", "7+3*4-2", None, "3*4=12\n7+12=20\n20-2=18\nA:18\n");
    let label = labeler.label(&t).await;
    // The judge here ignores operand availability: 20-2=18 is right arithmetic.
    assert_eq!(scores(&label), vec![Some(1.0), Some(0.0), Some(1.0), Some(1.0)]);
    assert_eq!(sources(&label), vec![ScoreSource::Judge; 4]);
    let (again, meta) = labeler.label_with_meta(&t).await;
    assert_eq!(sources(&again), vec![ScoreSource::JudgeCache; 4]);
    assert!(meta.judge_admitted && !meta.guarded && !meta.deadline_hit);
    assert!(meta.judgements.iter().all(|j| matches!(j, Some(StepJudgement::Scored { cached: true, samples: 1, .. }))));
    assert_eq!(server.requests(), 4);
    let m = labeler.metrics();
    assert_eq!((m.sources.judge, m.sources.judge_cache), (4, 4));
}

#[tokio::test]
async fn guard_scores_zero_before_any_call() {
    let server = arithmetic_judge();
    let cfg = Config { process: Process::Judge, min_chars: 6, ..Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill::Config::default()).unwrap();
    // No final answer line.
    let no_answer =
        labeler.label(&trajectory(1, "arithmetic", "2+2", None, "Let's solve this problem step by step.\n")).await;
    assert_eq!((scores(&no_answer), sources(&no_answer)), (vec![Some(0.0)], vec![ScoreSource::Guard]));
    // Too short, even with an answer.
    let (short, meta) = labeler.label_with_meta(&trajectory(2, "arithmetic", "2+2", None, "A:4\n")).await;
    assert!(meta.guarded && !meta.judge_admitted && meta.judgements.is_empty());
    assert_eq!(sources(&short), vec![ScoreSource::Guard]);
    assert_eq!(short.outcome, 1.0, "the outcome verifier still sees the right answer");
    assert_eq!(server.requests(), 0);
    assert_eq!(labeler.metrics().guarded, 2);
}

#[tokio::test]
async fn outside_the_budget_steps_take_the_fallback() {
    let server = arithmetic_judge();
    let cfg = Config { process: Process::Judge, fallback: Fallback::Verifier, ..Config::default() };
    let distill = distill::Config { judge_fraction: 0.0, ..distill::Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill).unwrap();
    let label = labeler.label(&trajectory(1, "arithmetic", "7+3*4-2", None, "3*4=12\n7+12=20\n20-2=18\nA:18\n")).await;
    // The verifier's verdicts, operand availability included.
    assert_eq!(scores(&label), vec![Some(1.0), Some(0.0), Some(1.0), Some(0.0)]);
    assert_eq!(sources(&label), vec![ScoreSource::Verifier; 4]);
    assert_eq!(server.requests(), 0);
    let m = labeler.metrics();
    assert_eq!((m.budget_refusals, m.fallback_steps), (1, 4));
    // With no fallback, the steps are unknown: no score, not a silent 0.
    let cfg = Config { fallback: Fallback::None, ..cfg };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill).unwrap();
    let label = labeler.label(&trajectory(1, "arithmetic", "2+2", None, "2+2=4\nA:4\n")).await;
    assert_eq!((scores(&label), sources(&label)), (vec![None, None], vec![ScoreSource::Unknown; 2]));
}

/// Random single-digit `a op b = c` steps, right or off by one to three.
fn arithmetic_completion(seed: u64) -> (String, String) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let (a, b) = (next(10) as i64, next(10) as i64);
    let (op, v) = match next(3) {
        0 => ('+', a + b),
        1 => ('-', a - b),
        _ => ('*', a * b),
    };
    let c = if next(2) == 0 { v } else { v + 1 + next(3) as i64 };
    (format!("{a}{op}{b}"), format!("{a}{op}{b}={c}\nA:{c}\n"))
}

#[tokio::test]
async fn distilled_scores_fill_in_outside_the_budget() {
    tch::set_num_threads(1);
    let server = arithmetic_judge();
    let cfg = Config { process: Process::Judge, fallback: Fallback::Distilled, ..Config::default() };
    let distill = distill::Config { enabled: true, judge_fraction: 0.5, min_labels: 200, ..distill::Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill).unwrap();
    let mut seen = SourceCounts::default();
    for id in 0..3000 {
        let (problem, completion) = arithmetic_completion(id);
        let label = labeler.label(&trajectory(id, "arithmetic", &problem, None, &completion)).await;
        assert_eq!(label.steps.len(), 2);
        for s in &label.steps {
            assert!(s.score.is_some(), "{s:?}");
            match s.source {
                ScoreSource::Distilled => seen.distilled += 1,
                ScoreSource::Verifier => seen.verifier += 1,
                ScoreSource::Judge | ScoreSource::JudgeCache => seen.judge += 1,
                other => panic!("unexpected source {other:?}"),
            }
        }
    }
    let m = labeler.metrics();
    // About half the trajectories went to the judge; the others got the verifier
    // until the model had learned from 200 labels, distilled scores after.
    assert!(seen.judge > 2000 && seen.distilled > 2000 && seen.verifier > 0, "{seen:?}");
    let d = m.distill.unwrap();
    println!("distill metrics: {d:?}");
    assert!(d.ready && d.agreement.unwrap() >= 0.9, "{d:?}");
    assert_eq!(d.scored, seen.distilled);
}
