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

/// Early rejection's scorer: the newest step of a partial completion, by the
/// step verifier while there is no distilled model.
#[test]
fn a_partial_completion_is_scored_by_its_newest_step() {
    let labeler = Labeler::new(&Config::default(), &judge::Config::default(), &distill::Config::default()).unwrap();
    let prompt = trajectory(1, "arithmetic", "7+3*4-2", None, "").prompt;
    assert_eq!(labeler.score_partial(&prompt, "3*4=12\n"), Some(1.0));
    assert_eq!(labeler.score_partial(&prompt, "3*4=12\n7+12=20\n"), Some(0.0));
    assert_eq!(labeler.score_partial(&prompt, "3*4=12\n7+12=19\n"), Some(1.0));
    assert_eq!(labeler.score_partial(&prompt, ""), None, "no step yet");
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
    // A wrong result is off by a thousand or more: single-digit operands never
    // reach it, so the rule is one the hashed n-gram model learns every time
    // (whether it can learn harder rules is distill's own test; these tests
    // are about the plumbing, and must not depend on the order verdicts land).
    let c = if next(2) == 0 { v } else { v + 1000 + next(3) as i64 };
    (format!("{a}{op}{b}"), format!("{a}{op}{b}={c}\nA:{c}\n"))
}

#[tokio::test]
async fn distilled_scores_fill_in_outside_the_budget() {
    tch::set_num_threads(1);
    let server = arithmetic_judge();
    // Blocking on the judge for the groups it annotates (judge_wait_ms > 0).
    let cfg = Config {
        process: Process::Judge,
        fallback: Fallback::Distilled,
        judge_wait_ms: Some(60_000),
        ..Config::default()
    };
    let distill = distill::Config { enabled: true, judge_fraction: 0.5, min_labels: 200, ..distill::Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill).unwrap();
    let mut seen = SourceCounts::default();
    for id in 0..3000 {
        if id % 100 == 0 {
            // The distilled model learns on a blocking thread of its own.
            assert!(labeler.settled(Duration::from_secs(30)).await);
        }
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

/// A trajectory that is member `sample` of group `group` (of `size`).
fn member(group: u64, sample: u32, size: u32, problem: &str, completion: &str) -> Trajectory {
    let mut t = trajectory(group * size as u64 + sample as u64, "arithmetic", problem, None, completion);
    t.group = prism_core::GroupId(group);
    t.sample = sample;
    t.group_size = size;
    t
}

#[tokio::test]
async fn background_annotation_never_waits_for_the_judge() {
    // A judge that never answers: a label that waited for it would hang here.
    let hung = TestServer::start(|_: &Request| Reply::Hang.into()).unwrap();
    let cfg = Config { process: Process::Judge, fallback: Fallback::Distilled, ..Config::default() };
    let distill = distill::Config { enabled: true, ..distill::Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&hung), &distill).unwrap();
    assert_eq!(labeler.judge_wait(), Duration::ZERO, "distill.enabled makes background annotation the default");
    for g in 0..4 {
        let t = member(g, 0, 1, "7+3*4-2", "3*4=12\n7+12=20\n20-2=18\nA:18\n");
        let (label, meta) = tokio::time::timeout(Duration::from_secs(30), labeler.label_with_meta(&t))
            .await
            .expect("a label never waits for the judge");
        assert!(meta.queued && meta.judge_admitted && meta.judgements.is_empty());
        // Before the distilled model is ready, the verifiers score: counted as such.
        assert_eq!(sources(&label), vec![ScoreSource::Verifier; 4]);
        assert_eq!(scores(&label), vec![Some(1.0), Some(0.0), Some(1.0), Some(0.0)]);
    }
    let h = labeler.health();
    let q = h.annotation_queue.unwrap();
    assert_eq!((q.queued, h.judge_wait_ms), (4, Some(0)));
    assert_eq!(labeler.metrics().sources.verifier, 16);
}

#[tokio::test]
async fn background_verdicts_train_the_distilled_model_and_fill_the_cache() {
    tch::set_num_threads(1);
    let server = arithmetic_judge();
    let cfg = Config { process: Process::Judge, fallback: Fallback::Distilled, ..Config::default() };
    let distill = distill::Config { enabled: true, min_labels: 200, ..distill::Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill).unwrap();
    let mut distilled = 0;
    for id in 0..2000 {
        let (problem, completion) = arithmetic_completion(id);
        let label = labeler.label(&member(id, 0, 1, &problem, &completion)).await;
        for s in &label.steps {
            assert!(s.score.is_some(), "{s:?}");
            match s.source {
                ScoreSource::Distilled => distilled += 1,
                ScoreSource::Verifier => {}
                other => panic!("labels are made at once by the fallback, not the judge: {other:?}"),
            }
        }
        if id % 50 == 49 {
            assert!(labeler.settled(Duration::from_secs(60)).await, "annotation settles");
        }
    }
    assert!(labeler.settled(Duration::from_secs(60)).await);
    let m = labeler.metrics();
    let q = m.annotations.clone().unwrap();
    assert_eq!((q.queued, q.judged, q.shed), (2000, 2000, 0), "{q:?}");
    let d = m.distill.clone().unwrap();
    assert!(d.labels >= 1000 && d.ready && d.agreement.unwrap() >= 0.9, "{d:?}");
    assert!(distilled > 1000, "distilled scores once the model agrees with the judge: {distilled}");
    let j = m.judge.unwrap();
    assert_eq!(j.calls, server.requests(), "every background verdict is one judge call");
    // The verdicts filled the cache: the same trajectory judged again costs nothing.
    let before = server.requests();
    let (problem, completion) = arithmetic_completion(7);
    let again = labeler.judge().unwrap().judge(&problem, &completion.lines().collect::<Vec<_>>()).await;
    assert!(again.iter().all(|j| matches!(j, StepJudgement::Scored { cached: true, .. })), "{again:?}");
    assert_eq!(server.requests(), before);
}

#[tokio::test]
async fn a_full_annotation_queue_sheds_the_oldest() {
    let hung = TestServer::start(|_: &Request| Reply::Hang.into()).unwrap();
    let cfg = Config {
        process: Process::Judge,
        judge_wait_ms: Some(0),
        annotation_queue: 2,
        annotators: 1,
        ..Config::default()
    };
    let labeler = Labeler::new(&cfg, &judge_config(&hung), &distill::Config::default()).unwrap();
    for g in 0..6 {
        labeler.label(&member(g, 0, 1, "2+2", "2+2=4\nA:4\n")).await;
    }
    let q = wait_for(&labeler, |q| q.busy == 1).await;
    assert_eq!(q.queued, 6);
    assert_eq!(q.depth, 1, "one of the two newest is being judged, the other waits: {q:?}");
    // Labeling never yields on this runtime, so all six were queued before the
    // annotator first ran: the four oldest were shed.
    assert_eq!((q.shed, q.depth, q.busy), (4, 1, 1), "{q:?}");
    // GenPRM: one request per step prefix of the trajectory being judged.
    assert_eq!(hung.requests(), 2);
}

/// Polls the annotation queue until `ok` (at most 30 s).
async fn wait_for(labeler: &Labeler, ok: impl Fn(&QueueHealth) -> bool) -> QueueHealth {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let q = labeler.health().annotation_queue.unwrap();
        if ok(&q) || Instant::now() >= until {
            return q;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn the_budget_admits_whole_groups_so_a_group_has_one_source_class() {
    let server = arithmetic_judge();
    let cfg = Config {
        process: Process::Judge,
        fallback: Fallback::Verifier,
        judge_wait_ms: Some(60_000),
        ..Config::default()
    };
    let distill = distill::Config { judge_fraction: 0.5, ..distill::Config::default() };
    let labeler = Labeler::new(&cfg, &judge_config(&server), &distill).unwrap();
    let (mut judged, mut verified) = (0, 0);
    for g in 0..40 {
        // Members labeled concurrently, as the reward pool does.
        let labels = futures::future::join_all((0..4).map(|i| {
            let (problem, completion) = arithmetic_completion(g * 4 + i as u64);
            let t = member(g, i, 4, &problem, &completion);
            let labeler = &labeler;
            async move { labeler.label(&t).await }
        }))
        .await;
        let classes: Vec<bool> = labels
            .iter()
            .flat_map(|l| l.steps.iter())
            .map(|s| matches!(s.source, ScoreSource::Judge | ScoreSource::JudgeCache))
            .collect();
        assert!(classes.iter().all(|&c| c == classes[0]), "group {g} mixes sources: {labels:?}");
        if classes[0] { judged += 1 } else { verified += 1 }
    }
    assert!(judged > 5 && verified > 5, "about half the groups go to the judge: {judged} vs {verified}");
    assert_eq!(labeler.metrics().budget_refusals, verified, "the budget is asked once per group");
}

#[tokio::test]
async fn a_judge_fooled_by_canaries_is_turned_off_and_back_on() {
    use std::sync::atomic::AtomicBool;
    // Says Yes to everything — content-free canaries included — until told to
    // reject the canaries (prompts without the trajectory's answer line).
    let fooled = Arc::new(AtomicBool::new(true));
    let server = {
        let fooled = fooled.clone();
        TestServer::start(move |req: &Request| {
            let canary = !req.prompt().contains("A:18");
            let yes = !canary || fooled.load(Ordering::SeqCst);
            Reply::ok(chat_text(&[if yes { "\\boxed{Yes}" } else { "\\boxed{No}" }])).into()
        })
        .unwrap()
    };
    let cfg = Config { process: Process::Judge, judge_wait_ms: Some(60_000), ..Config::default() };
    let judge_cfg = judge::Config { canary_every: 1, canary_window: 5, canary_max_rate: 0.2, ..judge_config(&server) };
    let labeler = Labeler::new(&cfg, &judge_cfg, &distill::Config::default()).unwrap();
    let completion = "3*4=12\n7+12=20\n20-2=18\nA:18\n";
    let mut group = 0;
    let mut label_next = || {
        group += 1;
        // A new problem each time, so that the judge is called (not its cache).
        member(group, 0, 1, &format!("7+3*4-2+0*{group}"), completion)
    };
    // Trusted at first: judge scores.
    let first = labeler.label(&label_next()).await;
    assert_eq!(sources(&first), vec![ScoreSource::Judge; 4]);
    // The canaries sent with the judge calls are accepted: judge scores turn off.
    let mut off = None;
    for _ in 0..400 {
        let label = labeler.label(&label_next()).await;
        if sources(&label) == vec![ScoreSource::Verifier; 4] {
            off = Some(label);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(off.is_some(), "judge scores never turned off: {:?}", labeler.health());
    let h = labeler.health();
    assert_eq!(h.judge_trusted, Some(false));
    assert!(h.canary_fp_rate.unwrap() > 0.2, "{h:?}");
    assert!(labeler.metrics().distrusted_groups >= 1);
    // The judge stops accepting canaries: probes bring its rate down and its
    // scores back, although no label calls it meanwhile.
    fooled.store(false, Ordering::SeqCst);
    let mut on = false;
    for _ in 0..2000 {
        let label = labeler.label(&label_next()).await;
        if sources(&label).iter().all(|s| matches!(s, ScoreSource::Judge | ScoreSource::JudgeCache)) {
            on = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(on, "judge scores never came back: {:?}", labeler.health());
    assert_eq!(labeler.health().judge_trusted, Some(true));
}
