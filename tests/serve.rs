//! `prism serve` as a command (the server itself is tested in
//! serve/tests/http.rs, in process), and `prism export`.

mod common;
use common::*;
use serde_json::{Value, json};
use prism_serve::testkit;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

/// A running `prism serve` on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(model: &str) -> Self {
        let mut child = prism()
            .args(["serve", "--model", model, "--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.split("http://").nth(1).unwrap_or_else(|| panic!("no address in {line:?}")).trim().to_string();
        Server { child, addr }
    }

    /// One HTTP/1.1 request; returns (status, headers, body) with chunked bodies decoded.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String, String) {
        testkit::request(&self.addr, method, path, body, "")
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        testkit::post_json(&self.addr, path, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command loads the model, says where it listens, and answers there.
#[test]
fn serve_listens_where_it_says_and_answers() {
    let server = Server::start("builtin:tiny-arith");
    let (status, _, body) = server.request("GET", "/v1/models", "");
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-arith");
    let (status, r) = server.post("/v1/completions", &json!({"model": "tiny-arith", "prompt": "Q:1+1\n", "max_tokens": 4, "seed": 1}));
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"].as_array().unwrap().len(), 1);
}

#[test]
fn export_writes_a_folder_prism_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("out");
    let out = prism().args(["export", "--from", "builtin:tiny-arith", "--to", to.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(to.join(f).exists(), "{f} missing");
    }
    // And the folder is itself a model source.
    let again = dir.path().join("again");
    let out = prism().args(["export", "--from", to.to_str().unwrap(), "--to", again.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(to.join("model.safetensors")).unwrap(), std::fs::read(again.join("model.safetensors")).unwrap());
    let out = prism().args(["export", "--from", "/no/such/dir", "--to", again.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/no/such/dir"), "{}", stderr(&out));
}
