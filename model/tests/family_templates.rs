//! The real chat templates of the model families prism loads (Qwen3, Llama
//! 3.1/3.2, Mistral, Gemma 2, Gemma 3), as scripts/setup unpacks them into
//! `.cache/chat-templates/` from the trl wheel and the llama-cpp-python sdist,
//! rendered by prism exactly as transformers' `apply_chat_template` renders
//! them (model/tests/reference/family_templates.py), on conversations with and
//! without a system message, over several turns, with and without the
//! generation prompt, Qwen3's thinking switch and `<think>` blocks; where a
//! template refuses a conversation by design, both refuse it.

mod common;

use common::*;
use prism_model::chat::{self, ChatMessage};
use serde_json::{Map, Value, json};

struct Family {
    /// The file under `.cache/chat-templates/`.
    file: &'static str,
    /// bos/eos as the family's tokenizer_config.json has them.
    bos: Option<&'static str>,
    eos: &'static str,
    /// Template variables each conversation is also rendered with.
    kwargs: Vec<Value>,
    /// Conversations (by name) the template rejects, with the words of its exception.
    rejects: &'static [(&'static str, &'static str)],
}

/// What Mistral's and Gemma's templates raise when turns do not alternate.
const ALTERNATE: &str = "roles must alternate user/assistant/user/assistant/...";

fn families() -> Vec<Family> {
    let thinking = vec![json!({}), json!({"enable_thinking": false}), json!({"enable_thinking": true})];
    let llama = vec![json!({}), json!({"date_string": "26 Jul 2024"})];
    vec![
        // Qwen3 as its repositories ship it now (trl), and its first revision (llama.cpp).
        Family { file: "qwen3.jinja", bos: None, eos: "<|im_end|>", kwargs: thinking.clone(), rejects: &[] },
        Family { file: "Qwen-Qwen3-0.6B.jinja", bos: None, eos: "<|im_end|>", kwargs: thinking, rejects: &[] },
        Family { file: "llama3_1.jinja", bos: Some("<|begin_of_text|>"), eos: "<|eot_id|>", kwargs: llama.clone(), rejects: &[] },
        // Without date_string, Llama 3.2 dates its system prompt with strftime_now.
        Family { file: "llama3_2.jinja", bos: Some("<|begin_of_text|>"), eos: "<|eot_id|>", kwargs: llama, rejects: &[] },
        Family {
            file: "mistralai-Mistral-Nemo-Instruct-2407.jinja",
            bos: Some("<s>"),
            eos: "</s>",
            kwargs: vec![json!({})],
            rejects: &[("two users", ALTERNATE), ("assistant first", ALTERNATE)],
        },
        Family {
            file: "gemma.jinja",
            bos: Some("<bos>"),
            eos: "<eos>",
            kwargs: vec![json!({})],
            rejects: &[
                ("system", "System role not supported"),
                ("system, three turns", "System role not supported"),
                ("system, whitespace", "System role not supported"),
                ("system, think", "System role not supported"),
                ("system, two thoughts", "System role not supported"),
                ("two users", ALTERNATE),
                ("assistant first", ALTERNATE),
            ],
        },
        Family {
            file: "gemma3.jinja",
            bos: Some("<bos>"),
            eos: "<eos>",
            kwargs: vec![json!({})],
            rejects: &[("two users", ALTERNATE), ("assistant first", ALTERNATE)],
        },
    ]
}

fn conversations() -> Vec<(&'static str, Vec<ChatMessage>)> {
    let m = ChatMessage::new;
    vec![
        ("one user", vec![m("user", "What is 7+3*4?")]),
        ("system", vec![m("system", "You are terse."), m("user", "Name a prime.")]),
        (
            "system, three turns",
            vec![
                m("system", "You are a careful tutor."),
                m("user", "Hi!"),
                m("assistant", "Hello! How can I help?"),
                m("user", "Count to three."),
                m("assistant", "1, 2, 3."),
                m("user", "And back?"),
            ],
        ),
        ("ends with the answer", vec![m("user", "2+2?"), m("assistant", "4")]),
        (
            "system, whitespace",
            vec![
                m("system", "  Answer in French.\n"),
                m("user", "\n  Bonjour ?  \n"),
                m("assistant", "  Salut — ça va ? 🙂\n\n"),
                m("user", "Très bien.\t"),
            ],
        ),
        // A thought in an earlier answer (Qwen3 drops it) and in the last one (Qwen3 keeps it).
        (
            "system, think",
            vec![
                m("system", "Think first."),
                m("user", "Is 91 prime?"),
                m("assistant", "<think>\n91 = 7 * 13.\n</think>\n\nNo: 91 = 7 * 13."),
                m("user", "Is 97?"),
                m("assistant", "<think>\nNo divisor up to 9.\n</think>\n\nYes."),
            ],
        ),
        (
            "system, two thoughts",
            vec![
                m("system", "Think first."),
                m("user", "Is 91 prime?"),
                m("assistant", "<think>\n91 = 7 * 13.\n</think>\n\nNo."),
                m("user", "Is 97?"),
            ],
        ),
        ("empty thought", vec![m("user", "Hi"), m("assistant", "<think>\n\n</think>\n\nHello.")]),
        ("two users", vec![m("user", "Hi"), m("user", "Anyone?")]),
        ("assistant first", vec![m("assistant", "Welcome."), m("user", "Thanks.")]),
    ]
}

fn template(file: &str) -> String {
    let path = repo().join(".cache/chat-templates").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}: run scripts/setup", path.display()))
}

fn map(v: &Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn family_templates_render_as_transformers_renders_them() {
    let families = families();
    let conversations = conversations();
    let templates: Vec<String> = families.iter().map(|f| template(f.file)).collect();
    let mut cases = Vec::new();
    let mut spec = Vec::new();
    for (family, tmpl) in families.iter().zip(&templates) {
        for (name, messages) in &conversations {
            for kwargs in &family.kwargs {
                for generation in [false, true] {
                    cases.push((family, tmpl, *name, messages, kwargs, generation));
                    spec.push(json!({"template": tmpl, "bos_token": family.bos, "eos_token": family.eos,
                        "messages": messages, "add_generation_prompt": generation, "kwargs": kwargs}));
                }
            }
        }
    }
    let theirs: Vec<Value> = serde_json::from_str(&python("family_templates.py", &[], &json!({"cases": spec}).to_string())).unwrap();
    assert_eq!(theirs.len(), cases.len());
    let mut failures = Vec::new();
    for ((family, tmpl, name, messages, kwargs, generation), reference) in cases.iter().zip(&theirs) {
        let what = format!("{} on {name:?} with {kwargs}, generation prompt {generation}", family.file);
        let ours = chat::render(tmpl, messages, *generation, family.bos, Some(family.eos), &map(kwargs));
        let rejected = family.rejects.iter().find(|(n, _)| n == name).map(|(_, words)| *words);
        match (rejected, reference.get("text").and_then(Value::as_str), ours) {
            (None, Some(want), Ok(got)) if got == want => {}
            (None, Some(want), Ok(got)) => failures.push(format!("{what}:\n  transformers {want:?}\n  prism        {got:?}")),
            (None, Some(_), Err(e)) => failures.push(format!("{what}: prism failed: {e}")),
            (None, None, _) => failures.push(format!("{what}: transformers failed: {reference}")),
            (Some(words), _, ours) => {
                // Both refuse it, prism with the template's own words.
                let theirs = reference.get("error").and_then(Value::as_str).unwrap_or_default();
                if !theirs.contains(words) {
                    failures.push(format!("{what}: transformers should have raised {words:?}, gave {reference}"));
                }
                match ours {
                    Err(e) if e.to_string().contains(words) => {}
                    Err(e) => failures.push(format!("{what}: prism's error does not say {words:?}: {e}")),
                    Ok(got) => failures.push(format!("{what}: prism rendered {got:?}, transformers raised {theirs:?}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // The cases do exercise what they are meant to.
    let text = |file: &str, name: &str, kwargs: Value, generation: bool| -> &str {
        let i = cases.iter().position(|c| c.0.file == file && c.2 == name && *c.4 == kwargs && c.5 == generation).unwrap();
        theirs[i]["text"].as_str().unwrap()
    };
    assert!(text("qwen3.jinja", "one user", json!({"enable_thinking": false}), true).ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    assert!(text("qwen3.jinja", "one user", json!({"enable_thinking": true}), true).ends_with("<|im_start|>assistant\n"));
    let think = text("qwen3.jinja", "system, think", json!({}), false);
    assert!(!think.contains("91 = 7 * 13.\n</think>") && think.contains("<think>\nNo divisor up to 9.\n</think>\n\nYes."), "{think:?}");
    assert!(text("llama3_2.jinja", "one user", json!({}), true).contains(&strftime_today()));
    assert!(text("gemma3.jinja", "system", json!({}), true).starts_with("<bos><start_of_turn>user\nYou are terse.\n\nName a prime."));
}

/// Today's date as Llama 3.2 writes it (`%d %b %Y`, UTC), from `date`.
fn strftime_today() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%d %b %Y"]).env("LC_ALL", "C").output().expect("date runs");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
