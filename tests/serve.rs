//! `prism serve` as a command (the server itself is tested in
//! serve/tests/http.rs, in process), and `prism export`.

mod common;
use common::*;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
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
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, rest) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
        (status, head.to_ascii_lowercase(), body)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = self.request("POST", path, &body.to_string());
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
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
