//! The judge client against a fault-injecting server on 127.0.0.1: slow
//! replies, hangs, 500s, 429s, garbage, truncated bodies and connection
//! resets. No call outlives its timeout, retries and the breaker behave as
//! configured, and every trajectory ends with a label and its sources.
//!
//! Elapsed-time checks here are bounds with wide margins (a call that should
//! give up after 0.3 s must not take the server's 30 s), not speed goals.

use prism_core::ScoreSource;
use prism_reward::config::{Fallback, Process};
use prism_reward::judge::{self, BreakerState, Failure, Judge, StepJudgement};
use prism_reward::testkit::{Reply, Request, Scripted, TestServer, chat_text, trajectory};
use prism_reward::{Labeler, distill};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn config(server: &TestServer) -> judge::Config {
    judge::Config {
        url: server.url(),
        model: "faulty".into(),
        timeout_ms: 300,
        retries: 2,
        backoff_ms: 1,
        backoff_max_ms: 5,
        breaker_failures: 1000,
        canary_every: 0,
        top_logprobs: 0,
        ..judge::Config::default()
    }
}

fn yes() -> Reply {
    Reply::ok(chat_text(&["Looks right. \\boxed{Yes}"]))
}

fn steps(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("step {i}")).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits until `cond` holds, polling.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn slow_replies_time_out_and_no_call_outlives_its_timeout() {
    let server = TestServer::start(|_: &Request| Scripted { delay: Duration::from_secs(30), reply: yes() }).unwrap();
    let judge = Judge::new(&config(&server)).unwrap();
    let start = Instant::now();
    let got = judge.judge("p", &refs(&steps(4))).await;
    let elapsed = start.elapsed();
    assert_eq!(got, vec![StepJudgement::Failed { failure: Failure::Timeout }; 4]);
    // 3 attempts of 0.3 s each plus backoffs of at most 5 ms, the 4 steps in parallel.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    let m = judge.metrics();
    assert_eq!((m.attempts, m.timeouts, m.retries, m.failed_calls), (12, 12, 8, 4));
}

#[tokio::test]
async fn a_hung_server_is_cut_off_by_the_timeout() {
    let server = TestServer::start(|_: &Request| Reply::Hang.into()).unwrap();
    let judge = Judge::new(&judge::Config { retries: 0, ..config(&server) }).unwrap();
    let start = Instant::now();
    assert_eq!(judge.judge("p", &["a"]).await, vec![StepJudgement::Failed { failure: Failure::Timeout }]);
    assert!(start.elapsed() < Duration::from_secs(5));
    // The client closed its connection, so the server is not left holding it.
    eventually("the server to see the connection close", || server.in_flight() == 0).await;
}

/// The first attempt for each step fails in its own way; the retry succeeds.
#[tokio::test]
async fn retries_recover_from_each_kind_of_fault() {
    let faults = [
        Reply::status(500),
        Reply::Body { status: 429, body: "{}".into(), headers: vec![("retry-after".into(), "0".into())] },
        Reply::Reset,
        Reply::Truncated(chat_text(&["\\boxed{Yes}"])),
        Reply::ok("<html>502 Bad Gateway</html>"),
        Reply::status(503),
        Reply::ok("{\"choices\": [{\"message\": {\"content\": \"\\\\boxed{Ye"),
    ];
    let attempts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let faults_for_server = faults.clone();
    let server = TestServer::start(move |req: &Request| {
        let prompt = req.prompt().to_string();
        let step: usize = prompt.split("Judge only Step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
        let mut seen = attempts.lock().unwrap();
        let n = seen.entry(prompt).or_default();
        *n += 1;
        if *n == 1 { faults_for_server[step - 1].clone().into() } else { yes().into() }
    })
    .unwrap();
    let judge = Judge::new(&config(&server)).unwrap();
    let got = judge.judge("p", &refs(&steps(faults.len()))).await;
    assert!(got.iter().all(|j| j.score() == Some(1.0)), "{got:?}");
    let m = judge.metrics();
    assert_eq!((m.attempts, m.retries, m.failed_calls), (14, 7, 0));
    assert_eq!((m.http_errors, m.rate_limited), (3, 1));
    // The reset and the body cut short by the connection closing.
    assert_eq!(m.connection_errors, 2);
    // Not JSON, and JSON cut short inside a complete HTTP body.
    assert_eq!(m.malformed, 2);
}

#[tokio::test]
async fn garbage_text_is_unknown_and_a_client_error_is_not_retried() {
    let server = TestServer::start(|req: &Request| {
        if req.prompt().contains("Judge only Step 1;") {
            Reply::ok(chat_text(&["asdf \u{fffd}\u{0} qwerty }{ \\boxed"])).into()
        } else {
            Reply::status(400).into()
        }
    })
    .unwrap();
    let judge = Judge::new(&config(&server)).unwrap();
    let got = judge.judge("p", &["a", "b"]).await;
    assert_eq!(got[0], StepJudgement::Unknown { samples: 1 });
    assert_eq!(got[1], StepJudgement::Failed { failure: Failure::Status(400) });
    let m = judge.metrics();
    assert_eq!((m.attempts, m.retries, m.unknown_verdicts), (2, 0, 1));
}

#[tokio::test]
async fn breaker_opens_after_k_failures_and_half_opens_after_cooldown() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let server = TestServer::start(
        move |_: &Request| if h.load(Ordering::SeqCst) { yes().into() } else { Reply::status(500).into() },
    )
    .unwrap();
    let cfg = judge::Config { retries: 0, breaker_failures: 3, breaker_cooldown_ms: 200, ..config(&server) };
    let judge = Judge::new(&cfg).unwrap();
    for i in 0..3 {
        assert_eq!(
            judge.judge("p", &[&format!("s{i}")]).await[0],
            StepJudgement::Failed { failure: Failure::Status(500) }
        );
    }
    assert_eq!(judge.breaker_state(), BreakerState::Open);
    // While open, calls fail fast without reaching the server.
    assert_eq!(judge.judge("p", &["s3"]).await[0], StepJudgement::Failed { failure: Failure::BreakerOpen });
    assert_eq!(server.requests(), 3);
    // After the cooldown one probe goes through; it fails, so the breaker opens again.
    eventually("half-open", || judge.breaker_state() == BreakerState::HalfOpen).await;
    assert_eq!(judge.judge("p", &["s4"]).await[0], StepJudgement::Failed { failure: Failure::Status(500) });
    assert_eq!((judge.breaker_state(), server.requests()), (BreakerState::Open, 4));
    // The server recovers; the next probe succeeds and closes the breaker.
    healthy.store(true, Ordering::SeqCst);
    eventually("half-open again", || judge.breaker_state() == BreakerState::HalfOpen).await;
    assert_eq!(judge.judge("p", &["s5"]).await[0].score(), Some(1.0));
    assert_eq!(judge.breaker_state(), BreakerState::Closed);
    let m = judge.metrics();
    assert_eq!((m.breaker_opens, m.breaker_rejections), (2, 1));
}

#[tokio::test]
async fn a_dead_judge_falls_back_and_opens_the_breaker() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let judge_cfg = judge::Config {
        url: format!("http://127.0.0.1:{port}/v1"),
        timeout_ms: 300,
        retries: 1,
        backoff_ms: 1,
        backoff_max_ms: 5,
        breaker_failures: 4,
        canary_every: 0,
        ..judge::Config::default()
    };
    let cfg = prism_reward::Config { process: Process::Judge, fallback: Fallback::Verifier, ..Default::default() };
    let labeler = Labeler::new(&cfg, &judge_cfg, &distill::Config::default()).unwrap();
    for id in 0..5 {
        let label =
            labeler.label(&trajectory(id, "arithmetic", "7+3*4-2", None, "3*4=12\n7+12=19\n19-2=17\nA:17\n")).await;
        assert_eq!(label.outcome, 1.0);
        assert!(label.steps.iter().all(|s| s.source == ScoreSource::Verifier && s.score == Some(1.0)));
    }
    let m = labeler.metrics();
    let j = m.judge.unwrap();
    assert_eq!((j.breaker_state, j.breaker_opens), (BreakerState::Open, 1));
    assert!(j.connection_errors >= 4 && j.breaker_rejections > 0, "{j:?}");
    assert_eq!(m.fallback_steps, 20);
}

#[tokio::test]
async fn the_deadline_bounds_a_label_when_the_judge_hangs() {
    let server = TestServer::start(|_: &Request| Reply::Hang.into()).unwrap();
    let judge_cfg = judge::Config { timeout_ms: 60_000, ..config(&server) };
    let cfg = prism_reward::Config { process: Process::Judge, deadline_ms: 400, ..Default::default() };
    let labeler = Labeler::new(&cfg, &judge_cfg, &distill::Config::default()).unwrap();
    let start = Instant::now();
    let label = labeler.label(&trajectory(1, "arithmetic", "2+2", None, "2+2=4\nA:4\n")).await;
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert_eq!(
        label.steps.iter().map(|s| (s.score, s.source)).collect::<Vec<_>>(),
        vec![(Some(1.0), ScoreSource::Verifier); 2]
    );
    assert_eq!(labeler.metrics().deadline_hits, 1);
}

/// Every request gets a fault or an answer drawn at random; every trajectory
/// still gets a label whose every step has a source, within its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_random_faults_every_trajectory_gets_a_label() {
    let server = TestServer::start(|req: &Request| {
        let r = (req.seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % 10;
        let reply = match r {
            0 => Reply::Hang,
            1 => Reply::status(500),
            2 => Reply::Body { status: 429, body: "{}".into(), headers: vec![("retry-after".into(), "0".into())] },
            3 => Reply::Reset,
            4 => Reply::Truncated(chat_text(&["\\boxed{Yes}"])),
            5 => Reply::ok(chat_text(&["no verdict here"])),
            6 => Reply::ok("garbage"),
            7 => Reply::ok(chat_text(&["\\boxed{No}"])),
            _ => yes(),
        };
        let delay = if r == 8 { Duration::from_secs(2) } else { Duration::from_millis(r) };
        Scripted { delay, reply }
    })
    .unwrap();
    let judge_cfg = judge::Config {
        timeout_ms: 200,
        retries: 2,
        breaker_failures: 8,
        breaker_cooldown_ms: 100,
        concurrency: 16,
        canary_every: 7,
        ..config(&server)
    };
    let cfg = prism_reward::Config { process: Process::Judge, deadline_ms: 1_500, ..Default::default() };
    let labeler = Arc::new(Labeler::new(&cfg, &judge_cfg, &distill::Config::default()).unwrap());
    let tasks: Vec<_> = (0..60u64)
        .map(|id| {
            let labeler = labeler.clone();
            tokio::spawn(async move {
                let completion = format!("{id}+1={}\n{}+{id}={}\nA:{}\n", id + 1, id + 1, 2 * id + 1, 2 * id + 1);
                let t = trajectory(id, "arithmetic", &format!("{id}+1+{id}"), None, &completion);
                let start = Instant::now();
                let label = labeler.label(&t).await;
                (label, start.elapsed())
            })
        })
        .collect();
    let mut steps = 0;
    for task in tasks {
        let (label, elapsed) = task.await.unwrap();
        assert!(elapsed < Duration::from_millis(1_500 + 2_000), "a label took {elapsed:?}");
        assert_eq!((label.outcome, label.steps.len()), (1.0, 3));
        for s in &label.steps {
            steps += 1;
            match s.source {
                ScoreSource::Judge | ScoreSource::JudgeCache | ScoreSource::Verifier => assert!(s.score.is_some()),
                ScoreSource::Unknown => assert!(s.score.is_none()),
                other => panic!("unexpected source {other:?}"),
            }
        }
    }
    let m = labeler.metrics();
    let src = &m.sources;
    assert_eq!(src.judge + src.judge_cache + src.verifier + src.unknown, steps);
    let j = m.judge.as_ref().unwrap();
    println!("{m:#?}");
    assert!(src.judge > 0 && src.verifier > 0, "both the judge and the fallback scored steps");
    assert!(j.retries > 0 && j.timeouts > 0 && j.http_errors > 0 && j.malformed > 0 && j.unknown_verdicts > 0);
    assert_eq!(m.fallback_steps, src.verifier);
}
