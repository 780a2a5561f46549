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

/// A LoRA checkpoint (the base with a PEFT adapter beside it) exports as
/// one merged model: no adapter files, the adapted model's logits.
#[test]
fn export_merges_a_lora_adapter_into_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let (from, to) = (dir.path().join("lora"), dir.path().join("merged"));
    let loaded = prism_model::load("builtin:tiny-arith", &Default::default()).unwrap();
    let mut model = loaded.model;
    model.save_hf_with(&from, &loaded.tokenizer, &loaded.generation).unwrap();
    model.attach_lora(&prism_model::LoraConfig { rank: 4, ..Default::default() }, 1, None).unwrap();
    tch::manual_seed(2);
    let mut vars: Vec<_> = model.adapter_store().unwrap().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| vars.iter().filter(|(n, _)| n.contains("lora_B")).for_each(|(_, t)| t.shallow_clone().copy_(&(t.randn_like() * 0.05))));
    model.save_adapter(&from).unwrap();

    let out = prism().args(["export", "--from", from.to_str().unwrap(), "--to", to.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(to.join("model.safetensors").exists() && !to.join("adapter_config.json").exists());
    let ids = tch::Tensor::from_slice2(&[[1i64, 5, 9, 12, 7, 3]]);
    let merged = prism_model::load(to.to_str().unwrap(), &Default::default()).unwrap().model;
    let base = prism_model::load("builtin:tiny-arith", &Default::default()).unwrap().model;
    let _guard = tch::no_grad_guard();
    let want = model.forward(&ids, None);
    let diff = (merged.forward(&ids, None) - &want).abs().max().double_value(&[]);
    let moved = (base.forward(&ids, None) - &want).abs().max().double_value(&[]);
    assert!(moved > 1e-3 && diff < 1e-5, "the adapter moved the logits {moved}; merged vs adapted {diff}");
}
