//! prism-serve over real HTTP on 127.0.0.1, in this process: models,
//! completions with logprobs and n > 1, stop strings, chat with SSE streaming,
//! concurrent requests batched together, and every error case.

use serde_json::{Value, json};
use prism_serve::testkit;
use std::path::PathBuf;

/// prism-serve over a model on a free loopback port, on its own runtime
/// thread; stopped (and the thread joined) when dropped.
struct Server {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(source: &str) -> Self {
        Self::start_with(source, |_| {})
    }

    /// With `change` made to the default settings.
    fn start_with(source: &str, change: impl FnOnce(&mut prism_serve::Config)) -> Self {
        let model = prism_model::Config { source: source.into(), dtype: "f32".into(), device: "cpu".into(), chat_template_kwargs: Default::default() };
        let loaded = prism_model::load(source, &model.load_options(0).unwrap()).unwrap();
        let mut config = config("127.0.0.1:0");
        change(&mut config);
        let name = prism_serve::default_name(source);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap().to_string()).unwrap();
                let shutdown = async {
                    let _ = stopped.await;
                };
                prism_serve::run(listener, &config, loaded, name, shutdown).await.unwrap();
            });
        });
        Server { addr: addr_rx.recv().unwrap(), stop: Some(stop), thread: Some(thread) }
    }

    /// One HTTP/1.1 request; returns (status, headers, body) with chunked bodies decoded.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String, String) {
        self.request_with(method, path, body, "")
    }

    /// [`Server::request`] with extra header lines (each ending in `\r\n`).
    fn request_with(&self, method: &str, path: &str, body: &str, headers: &str) -> (u16, String, String) {
        testkit::request(&self.addr, method, path, body, headers)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        testkit::post_json(&self.addr, path, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The default settings on `addr`, with an API key variable nobody sets.
fn config(addr: &str) -> prism_serve::Config {
    prism_serve::Config {
        addr: addr.into(),
        name: String::new(),
        max_batch: 64,
        default_max_tokens: 256,
        max_queue: 64,
        api_key_env: "PRISM_TEST_NO_SUCH_KEY".into(),
        insecure: false,
    }
}

/// The SmolLM2 GGUF that scripts/setup fetches (`PRISM_SMOLLM_GGUF` names
/// another); `None`, with a note, where it is missing outside CI.
fn smollm_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("PRISM_SMOLLM_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if path.exists() {
        return Some(path);
    }
    let reason = format!("{} is missing: run scripts/setup", path.display());
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("skipped: {reason}");
    None
}

#[test]
fn completions_with_logprobs_n_and_stop() {
    let server = Server::start("builtin:tiny-arith");
    let (status, _, body) = server.request("GET", "/v1/models", "");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-arith");

    let req = json!({"model": "tiny-arith", "prompt": "Q:7+3*4-2\n", "max_tokens": 12, "n": 3, "logprobs": 2, "seed": 5, "temperature": 1.0});
    let (status, r) = server.post("/v1/completions", &req);
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for c in choices {
        let lp = &c["logprobs"];
        let n = lp["tokens"].as_array().unwrap().len();
        assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
        assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), n);
        assert!(lp["top_logprobs"][0].as_object().unwrap().len() <= 2);
        assert!(lp["token_logprobs"].as_array().unwrap().iter().all(|v| v.as_f64().unwrap() <= 0.0));
        // The random model may sample its eos before max_tokens.
        let finish = c["finish_reason"].as_str().unwrap();
        assert!(finish == "length" && n == 12 || finish == "stop" && n < 12, "{finish} after {n} tokens");
    }
    // The same seed gives the same completions.
    let (_, again) = server.post("/v1/completions", &req);
    assert_eq!(r["choices"], again["choices"]);

    // A seeded sample, then a stop string taken from it: the same sample ends before it.
    let (seeded, text) = (0..20)
        .map(|seed| {
            let req = json!({"model": "tiny-arith", "prompt": "Q:1+1\n", "max_tokens": 20, "seed": seed});
            let (_, g) = server.post("/v1/completions", &req);
            (req, g["choices"][0]["text"].as_str().unwrap().to_string())
        })
        .find(|(_, t)| t.chars().count() >= 3)
        .expect("a sample with 3 characters");
    let stop: String = text.chars().skip(2).take(1).collect();
    let mut with_stop = seeded.clone();
    with_stop["stop"] = json!([stop]);
    let (_, s) = server.post("/v1/completions", &with_stop);
    let cut = s["choices"][0]["text"].as_str().unwrap();
    assert_eq!(s["choices"][0]["finish_reason"], "stop");
    assert_eq!(cut, &text[..text.find(&stop).unwrap()]);
}

#[test]
fn errors_name_the_field() {
    let server = Server::start("builtin:tiny-arith");
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("/v1/completions", "{not json", 400, "body"),
        ("/v1/completions", r#"{"model": "tiny-arith"}"#, 400, "prompt"),
        ("/v1/completions", r#"{"model": "tiny-arith", "prompt": "Q", "temperature": "hot"}"#, 400, "temperature"),
        ("/v1/completions", r#"{"model": "tiny-arith", "prompt": "Q", "temperature": 5}"#, 400, "temperature"),
        ("/v1/completions", r#"{"model": "tiny-arith", "prompt": "Q", "top_p": 0}"#, 400, "top_p"),
        ("/v1/completions", r#"{"model": "tiny-arith", "prompt": "Q", "n": 0}"#, 400, "n"),
        ("/v1/completions", r#"{"model": "tiny-arith", "prompt": "Q", "logprobs": 50}"#, 400, "logprobs"),
        ("/v1/completions", r#"{"model": "tiny-arith", "prompt": "Q", "max_tokens": 100000}"#, 400, "max_tokens"),
        ("/v1/completions", r#"{"model": "gpt-9", "prompt": "Q"}"#, 404, "model"),
        ("/v1/chat/completions", r#"{"model": "tiny-arith"}"#, 400, "messages"),
        ("/v1/chat/completions", r#"{"model": "tiny-arith", "messages": [{"role": "user"}]}"#, 400, "messages"),
        ("/v1/chat/completions", r#"{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}"#, 404, "model"),
    ];
    for (path, body, want, param) in cases {
        let (status, _, text) = server.request("POST", path, body);
        assert_eq!(status, want, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let p = v["error"]["param"].as_str().unwrap_or_default();
        assert!(p.starts_with(param), "{body}: param {p:?}, want {param:?}: {text}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
    }
    let long = "1".repeat(600);
    let (status, v) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": long, "max_tokens": 1}));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("context length"));
}

#[test]
fn concurrent_requests_share_a_batch() {
    let server = std::sync::Arc::new(Server::start("builtin:tiny-arith"));
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let server = server.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "tiny-arith", "prompt": format!("Q:{i}+{i}\n"), "max_tokens": 200, "seed": i});
                let (status, head, _) = server.request("POST", "/v1/completions", &body.to_string());
                assert_eq!(status, 200);
                head.lines()
                    .find_map(|l| l.strip_prefix("x-prism-batch-requests: "))
                    .map(|v| v.trim().parse::<usize>().unwrap())
                    .unwrap()
            })
        })
        .collect();
    let sizes: Vec<usize> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(sizes.iter().any(|&s| s > 1), "no two requests were batched together: {sizes:?}");
}

/// The chat endpoint on SmolLM2 (real chat template): plain, with top_logprobs
/// in OpenAI's format, and streamed.
#[test]
fn chat_completions_and_streaming_on_smollm() {
    let Some(gguf) = smollm_gguf() else { return };
    let server = Server::start(gguf.to_str().unwrap());
    let name = "SmolLM2-135M-Instruct.Q4_1";
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let req = json!({"model": name, "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (status, r) = server.post("/v1/chat/completions", &req);
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(!content.is_empty());
    let entries = choice["logprobs"]["content"].as_array().unwrap();
    // Every generated token but an eos that ended the answer.
    let generated = r["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let eos = usize::from(choice["finish_reason"] == "stop");
    assert_eq!(entries.len(), generated - eos);
    let joined: String = entries.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(joined, content);
    for e in entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - e["logprob"].as_f64().unwrap()).abs() < 1e-6);
    }

    let mut stream = req.clone();
    stream["stream"] = json!(true);
    stream["n"] = json!(2);
    let (status, head, body) = server.request("POST", "/v1/chat/completions", &stream.to_string());
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let mut texts = vec![String::new(); 2];
    let mut finished = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        texts[i] += c["delta"]["content"].as_str().unwrap_or("");
        if !c["finish_reason"].is_null() {
            finished += 1;
        }
    }
    assert_eq!(finished, 2);
    assert_eq!(texts, vec![content.to_string(), content.to_string()], "greedy stream = greedy answer");
}

/// One request with `"max_tokens": u64::MAX` wrapped `prompt_len +
/// max_tokens` and killed the generation thread (a 500, then 503 for every
/// request after). Now it is a 400 naming the field, and the server serves on.
#[test]
fn a_huge_max_tokens_is_refused_and_the_server_serves_on() {
    let server = Server::start("builtin:tiny-arith");
    for max_tokens in [json!(18446744073709551615u64), json!(usize::MAX - 2)] {
        let (status, body) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": max_tokens}));
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "max_tokens", "{body}");
    }
    let (status, body) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": 4}));
    assert_eq!(status, 200, "the server still serves: {body}");
    // The same on the chat route (a model with a chat template).
    let Some(gguf) = smollm_gguf() else { return };
    let server = Server::start(gguf.to_str().unwrap());
    let name = prism_serve::default_name(gguf.to_str().unwrap());
    let chat = |max: Value| json!({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": max});
    let (status, body) = server.post("/v1/chat/completions", &chat(json!(18446744073709551615u64)));
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("max_completion_tokens")), "{body}");
    let (status, body) = server.post("/v1/chat/completions", &chat(json!(2)));
    assert_eq!(status, 200, "{body}");
}

/// `n` is bounded by `serve.max_batch`: a batch never holds more sequences.
#[test]
fn n_is_bounded_by_max_batch() {
    let server = Server::start_with("builtin:tiny-arith", |c| c.max_batch = 4);
    let (status, body) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": 2, "n": 5}));
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("between 1 and 4 (serve.max_batch)"), "{body}");
    let (status, body) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": 2, "n": 4}));
    assert_eq!((status, body["choices"].as_array().map(Vec::len)), (200, Some(4)), "{body}");
}

/// With `serve.max_queue = 1`, a burst of requests while one batch runs gets
/// 429 for all but what fits; each answered one got its completion, and the
/// server serves on.
#[test]
fn a_full_queue_answers_429() {
    let server = std::sync::Arc::new(Server::start_with("builtin:tiny-arith", |c| {
        c.max_queue = 1;
        c.max_batch = 1;
    }));
    let body = json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": 400, "temperature": 1.0, "stop": ["never"]});
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (server, body) = (server.clone(), body.clone());
            std::thread::spawn(move || server.post("/v1/completions", &body))
        })
        .collect();
    let answers: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let busy: Vec<&Value> = answers.iter().filter(|(s, _)| *s == 429).map(|(_, b)| b).collect();
    assert!(!busy.is_empty(), "some requests found the queue full: {answers:?}");
    assert!(busy.iter().all(|b| b["error"]["code"] == "rate_limit_exceeded"), "{busy:?}");
    assert!(answers.iter().all(|(s, b)| *s == 429 || (*s == 200 && b["choices"][0]["text"].is_string())), "{answers:?}");
    let (status, _) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": 2}));
    assert_eq!(status, 200);
}

/// With an API key set, every route asks for it: none or a wrong one is 401.
#[test]
fn an_api_key_is_asked_for_when_set() {
    let var = format!("PRISM_TEST_SERVE_KEY_{}", std::process::id());
    // SAFETY: the variable name is unique to this test.
    unsafe { std::env::set_var(&var, "s3cret-key") };
    let server = Server::start_with("builtin:tiny-arith", |c| c.api_key_env = var.clone());
    let body = json!({"model": "tiny-arith", "prompt": "Q:1+2\n", "max_tokens": 2}).to_string();
    for headers in ["", "Authorization: Bearer wrong-key\r\n", "Authorization: s3cret-key\r\n"] {
        let (status, _, text) = server.request_with("POST", "/v1/completions", &body, headers);
        assert_eq!(status, 401, "{headers:?}: {text}");
        assert!(text.contains("invalid_api_key"), "{text}");
        assert_eq!(server.request_with("GET", "/v1/models", "", headers).0, 401);
    }
    let (status, _, text) = server.request_with("POST", "/v1/completions", &body, "Authorization: Bearer s3cret-key\r\n");
    assert_eq!(status, 200, "{text}");
}

/// A server other hosts can reach refuses to start without an API key,
/// unless told so.
#[test]
fn a_server_reachable_from_other_hosts_needs_an_api_key() {
    let config = |addr: &str, key_env: &str, insecure: bool| prism_serve::Config { api_key_env: key_env.into(), insecure, ..config(addr) };
    let e = config("0.0.0.0:8000", "PRISM_TEST_NO_SUCH_KEY", false).check_exposure().unwrap_err().to_string();
    assert!(e.contains("serve.addr") && e.contains("PRISM_TEST_NO_SUCH_KEY") && e.contains("serve.insecure = true"), "{e}");
    config("127.0.0.1:8000", "PRISM_TEST_NO_SUCH_KEY", false).check_exposure().unwrap();
    config("0.0.0.0:8000", "PRISM_TEST_NO_SUCH_KEY", true).check_exposure().unwrap();
    let var = format!("PRISM_TEST_EXPOSED_KEY_{}", std::process::id());
    // SAFETY: the variable name is unique to this test.
    unsafe { std::env::set_var(&var, "k") };
    config("0.0.0.0:8000", &var, false).check_exposure().unwrap();
}

/// `chat_template_kwargs` of a chat request reach the template (as vLLM
/// takes them); prism's own variables and a non-object are refused by name.
#[test]
fn chat_template_kwargs_reach_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = prism_model::load("builtin:tiny-arith", &Default::default()).unwrap();
    loaded.model.save_hf_with(dir.path(), &loaded.tokenizer, &loaded.generation).unwrap();
    // A template in tiny-arith's alphabet, with an optional variable.
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!("{% for m in messages %}Q:{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}A:{% if lead is defined %}{{ lead }}{% endif %}{% endif %}");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let server = Server::start(dir.path().to_str().unwrap());
    let name = prism_serve::default_name(dir.path().to_str().unwrap());
    let ask = |extra: Value| {
        let mut req = json!({"model": name, "messages": [{"role": "user", "content": "1+2"}], "max_tokens": 1, "temperature": 0});
        if !extra.is_null() {
            req["chat_template_kwargs"] = extra;
        }
        server.post("/v1/chat/completions", &req)
    };
    let (status, plain) = ask(Value::Null);
    assert_eq!(status, 200, "{plain}");
    let (status, led) = ask(json!({"lead": "3=3\n"}));
    assert_eq!(status, 200, "{led}");
    let tokens = |r: &Value| r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(tokens(&led), tokens(&plain) + 4, "{plain} {led}");
    for bad in [json!({"add_generation_prompt": false}), json!("lead")] {
        let (status, r) = ask(bad.clone());
        assert_eq!(status, 400, "{bad}: {r}");
        assert!(r.to_string().contains("chat_template_kwargs"), "{bad}: {r}");
    }
}
