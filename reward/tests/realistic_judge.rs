//! The realistic judge (`testkit::realistic`) over real HTTP on 127.0.0.1,
//! called by the project's judge client with prompts rendered from the real
//! templates: it grades the arithmetic task's steps, flips verdicts as asked,
//! queues requests beyond its slots, fails on purpose and goes down and back up.
//!
//! Timing checks are lower bounds only (four 200 ms requests through one slot
//! cannot take less than 800 ms); nothing here asserts that something is fast.

use prism_reward::judge::{self, Api, Failure, Judge, StepJudgement, Style, Subject, Template};
use prism_reward::steps::check_arithmetic;
use prism_reward::testkit::realistic::{Config, RealisticJudge, read_prompt};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const PROBLEM: &str = "7+3*4-2";
/// 3*4=12 right, 7+12=20 wrong, 20-2=18 right (it carries the wrong result
/// forward, which the checker accepts), A:18 wrong (7+3*4-2 = 17).
const SOLUTION: [&str; 4] = ["3*4=12", "7+12=20", "20-2=18", "A:18"];
const TRUTH: [bool; 4] = [true, false, true, false];

/// A fast, faultless judge: no latency, no flips, no failures.
fn exact() -> Config {
    Config {
        latency_mean_ms: 0.0,
        latency_sigma: 0.0,
        flip_p: 0.0,
        fail_share: 0.0,
        concurrency: 8,
        ..Config::default()
    }
}

fn client(server: &RealisticJudge, style: Style, api: Api) -> Judge {
    Judge::new(&judge::Config {
        url: server.url(),
        model: "realistic".into(),
        api,
        template: style,
        canary_every: 0,
        timeout_ms: 5_000,
        retries: 0,
        breaker_failures: 1_000,
        ..judge::Config::default()
    })
    .unwrap()
}

fn scores(judgements: &[StepJudgement]) -> Vec<f32> {
    judgements.iter().map(|j| j.score().unwrap_or_else(|| panic!("no score in {judgements:?}"))).collect()
}

/// ThinkPRM layouts: prose between `Step i:` and its verdict (the default, as
/// ThinkPRM writes), and prose on a line of its own before `Step i: \boxed{}`.
const LAYOUTS: [bool; 2] = [true, false];

#[test]
fn the_prompts_of_the_real_templates_are_read_back() {
    assert_eq!(check_arithmetic(PROBLEM, &SOLUTION), vec![Some(1.0), Some(0.0), Some(1.0), Some(0.0)]);
    let known = Subject { problem: PROBLEM, reference: Some("17"), outcome: Some(false) };
    for style in [Style::Genprm, Style::Thinkprm] {
        for (reference_aware, subject) in [(false, Subject::problem(PROBLEM)), (true, known)] {
            let template = Template::load(style, "", reference_aware).unwrap();
            for n in 1..=SOLUTION.len() {
                let prompt = template.render(&subject, &SOLUTION[..n], n).unwrap();
                let read = read_prompt(&prompt);
                assert_eq!(read.style, style, "{prompt}");
                assert_eq!(read.problem.as_deref(), Some(PROBLEM), "{prompt}");
                assert_eq!(read.steps, SOLUTION[..n], "{prompt}");
            }
        }
    }
    // A template without nonce tags, the problem given as the task's prompt text.
    let untagged = "Problem:\nQ:7+3*4-2\n\nSolution so far:\n\nStep 1:\n3*4=12\n\nStep 2:\n7+12=19\n\n\
                    Judge only Step 2 ... as \\boxed{Yes} or \\boxed{No}.";
    let read = read_prompt(untagged);
    assert_eq!((read.style, read.problem.as_deref()), (Style::Genprm, Some(PROBLEM)));
    assert_eq!(read.steps, ["3*4=12", "7+12=19"]);
}

#[tokio::test]
async fn without_flips_right_steps_score_high_and_wrong_steps_low() {
    for style in [Style::Genprm, Style::Thinkprm] {
        for inline_prose in LAYOUTS {
            for api in [Api::Chat, Api::Completions] {
                let server = RealisticJudge::start(Config { inline_prose, ..exact() }).unwrap();
                let judge = client(&server, style, api);
                let got = scores(&judge.judge(PROBLEM, &SOLUTION).await);
                for (i, (&p, &right)) in got.iter().zip(&TRUTH).enumerate() {
                    assert_eq!(p >= 0.5, right, "{style} {api} inline={inline_prose} step {}: {got:?}", i + 1);
                }
                let m = judge.metrics();
                assert_eq!(m.logprob_verdicts, m.verdicts, "{style} {api}: every verdict from logprobs: {m:?}");
                // Confidence 0.9 on the verdict given: P(yes) is 0.9 or 0.1.
                assert!(got.iter().all(|p| (p - 0.9).abs() < 1e-3 || (p - 0.1).abs() < 1e-3), "{got:?}");
                let stats = server.stop();
                assert_eq!((stats.flipped, stats.verdicts), (0, 4), "{stats:?}");
            }
        }
    }
}

#[tokio::test]
async fn with_every_verdict_flipped_the_scores_are_inverted() {
    for style in [Style::Genprm, Style::Thinkprm] {
        for inline_prose in LAYOUTS {
            let server = RealisticJudge::start(Config { flip_p: 1.0, inline_prose, ..exact() }).unwrap();
            let judge = client(&server, style, Api::Chat);
            let got = scores(&judge.judge(PROBLEM, &SOLUTION).await);
            for (i, (&p, &right)) in got.iter().zip(&TRUTH).enumerate() {
                assert_eq!(p < 0.5, right, "{style} step {}: {got:?}", i + 1);
            }
            // A flipped verdict is given with confidence 0.7.
            assert!(got.iter().all(|p| (p - 0.7).abs() < 1e-3 || (p - 0.3).abs() < 1e-3), "{got:?}");
            assert_eq!(server.stats().flipped, 4);
        }
    }
}

#[tokio::test]
async fn flips_are_repeatable_for_a_seed() {
    let run = |seed| async move {
        let server = RealisticJudge::start(Config { flip_p: 0.5, seed, ..exact() }).unwrap();
        let steps: Vec<String> = (1..=8).map(|k| format!("{k}*1={k}")).collect();
        let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
        let problem = "1*1+2*1+3*1+4*1+5*1+6*1+7*1+8*1";
        let got = scores(&client(&server, Style::Thinkprm, Api::Chat).judge(problem, &steps).await);
        (got, server.stop().flipped)
    };
    let (a, flipped) = run(7).await;
    let (b, _) = run(7).await;
    assert_eq!(a, b, "the same seed gives the same verdicts");
    assert!((1..8).contains(&flipped), "about half of 8 verdicts flipped, got {flipped}");
}

#[tokio::test]
async fn content_free_canaries_are_rejected_unless_the_judge_is_fooled() {
    for (accept, want) in [(0.0, false), (1.0, true)] {
        for style in [Style::Genprm, Style::Thinkprm] {
            let server = RealisticJudge::start(Config { canary_accept_p: accept, flip_p: 1.0, ..exact() }).unwrap();
            let judge = client(&server, style, Api::Chat);
            for canary in [":", "Solution", "Let's solve this problem step by step."] {
                assert_eq!(judge.canary(PROBLEM, canary).await, Some(want), "{style} {canary:?}");
            }
            // Canaries are never flipped: their acceptance is canary_accept_p alone.
            assert_eq!(server.stats().flipped, 0);
        }
    }
}

#[tokio::test]
async fn requests_beyond_the_slots_wait_their_turn() {
    let server = RealisticJudge::start(Config { latency_mean_ms: 200.0, concurrency: 1, ..exact() }).unwrap();
    let judge = client(&server, Style::Genprm, Api::Chat);
    let start = Instant::now();
    // GenPRM: one request per step, all four sent at once.
    let got = judge.judge(PROBLEM, &SOLUTION).await;
    let elapsed = start.elapsed();
    assert_eq!(got.iter().filter(|j| j.score().is_some()).count(), 4, "{got:?}");
    assert!(elapsed >= Duration::from_millis(780), "4 requests of 200 ms through 1 slot took {elapsed:?}");
    let stats = server.stop();
    assert_eq!(stats.max_in_flight, 1, "{stats:?}");
    assert!(stats.max_queued >= 1, "{stats:?}");
    // The latency a client sees includes the queue: 200, 400, 600 and 800 ms.
    assert!(stats.latency_ms_mean >= 450.0 && stats.queue_ms_mean >= 250.0, "{stats:?}");
}

#[tokio::test]
async fn a_failing_judge_answers_with_errors_and_resets() {
    for (status_share, is_expected) in [
        (1.0, (|f| matches!(f, Failure::Status(500 | 503))) as fn(Failure) -> bool),
        (0.0, |f| f == Failure::Connection),
    ] {
        let server =
            RealisticJudge::start(Config { fail_share: 1.0, fail_status_share: status_share, ..exact() }).unwrap();
        let judge = client(&server, Style::Genprm, Api::Chat);
        for j in judge.judge(PROBLEM, &SOLUTION).await {
            let StepJudgement::Failed { failure } = j else { panic!("a failing judge scored a step: {j:?}") };
            assert!(is_expected(failure), "status share {status_share}: {failure:?}");
        }
        let stats = server.stop();
        assert_eq!((stats.failed, stats.answered), (4, 0), "{stats:?}");
    }
}

#[tokio::test]
async fn an_outage_refuses_connections_until_resumed_on_the_same_port() {
    let server = RealisticJudge::start(exact()).unwrap();
    let url = server.url();
    let judge = client(&server, Style::Genprm, Api::Chat);
    let step = ["3*4=12"];
    assert!(judge.judge(PROBLEM, &step).await[0].score().is_some());

    server.pause().unwrap();
    assert!(server.is_paused());
    let refused = std::net::TcpStream::connect_timeout(&server.addr(), Duration::from_secs(2));
    assert!(refused.is_err(), "a paused judge accepted a connection");
    // A new step, so that the client's cache cannot answer.
    let got = judge.judge(PROBLEM, &["3*4=13"]).await;
    assert_eq!(got, vec![StepJudgement::Failed { failure: Failure::Connection }]);

    server.resume().unwrap();
    assert_eq!(server.url(), url);
    assert!(judge.judge(PROBLEM, &["3*4=13"]).await[0].score().is_some_and(|p| p < 0.5));
    assert_eq!(server.stop().outages, 1);
}

#[tokio::test]
async fn an_outage_cuts_off_requests_in_flight() {
    let server = RealisticJudge::start(Config { latency_mean_ms: 5_000.0, ..exact() }).unwrap();
    let judge = client(&server, Style::Genprm, Api::Chat);
    let call = tokio::spawn({
        let judge = judge.clone();
        async move { judge.judge(PROBLEM, &["3*4=12"]).await }
    });
    let start = Instant::now();
    while server.in_flight() == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.pause().unwrap();
    assert_eq!(call.await.unwrap(), vec![StepJudgement::Failed { failure: Failure::Connection }]);
    assert_eq!(server.stop().cut, 1);
}

async fn post(server: &RealisticJudge, path: &str, body: Value) -> (u16, Value) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client
        .post(format!("http://{}{path}", server.addr()))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null))
}

#[tokio::test]
async fn replies_carry_logprobs_choices_and_lengths_as_asked() {
    let server = RealisticJudge::start(exact()).unwrap();
    let template = Template::load(Style::Genprm, "", false).unwrap();
    let prompt = template.render(&Subject::problem(PROBLEM), &SOLUTION[..2], 2).unwrap();
    let messages = json!([{"role": "user", "content": prompt}]);

    let (status, chat) = post(
        &server,
        "/v1/chat/completions",
        json!({"model": "m", "messages": messages, "n": 3, "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200);
    let choices = chat["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for c in choices {
        let text = c["message"]["content"].as_str().unwrap();
        assert!(text.ends_with("\\boxed{No}"), "step 2 is wrong: {text}");
        let tokens = c["logprobs"]["content"].as_array().unwrap();
        let spelled: String = tokens.iter().map(|t| t["token"].as_str().unwrap()).collect();
        assert_eq!(spelled, text, "the tokens spell the reply");
        let verdict = tokens.iter().find(|t| t["token"] == "No").unwrap();
        let top: Vec<(&str, f64)> = verdict["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["token"].as_str().unwrap(), a["logprob"].as_f64().unwrap()))
            .collect();
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, top[1].0), ("No", "Yes"));
        assert!((top[0].1.exp() - 0.9).abs() < 1e-6 && (top[1].1.exp() - 0.1).abs() < 1e-6, "{top:?}");
        assert_eq!(c["finish_reason"], "stop");
    }

    let (_, plain) = post(&server, "/v1/chat/completions", json!({"model": "m", "messages": messages})).await;
    assert!(plain["choices"][0]["logprobs"].is_null(), "no logprobs unless asked: {plain}");

    let (_, cut) =
        post(&server, "/v1/completions", json!({"model": "m", "prompt": prompt, "max_tokens": 5, "logprobs": 1})).await;
    let choice = &cut["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), 5);
    assert!(!choice["text"].as_str().unwrap().contains("boxed"), "{choice}");

    let (status, _) = post(&server, "/v1/embeddings", json!({"input": "x"})).await;
    assert_eq!(status, 404);
    let stats = server.stop();
    assert_eq!((stats.answered, stats.bad_requests), (3, 1), "{stats:?}");
}
