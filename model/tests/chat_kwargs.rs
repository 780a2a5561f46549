//! Chat-template variables beyond the messages (`model.chat_template_kwargs`,
//! a request's `chat_template_kwargs`; Qwen3's `enable_thinking` switch):
//! rendered as transformers' `apply_chat_template(**kwargs)` renders them.

mod common;

use common::*;
use prism_model::chat::ChatMessage;
use prism_model::Tokenizer;
use serde_json::{Map, Value, json};

/// A template of this test's own with Qwen3's thinking switch (an empty
/// think block when `enable_thinking` is false) and an optional variable.
const TEMPLATE: &str = "{%- if system_name is defined %}<|system|>{{ system_name }}\n{% endif -%}
{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}
{% endfor -%}
{%- if add_generation_prompt %}<|assistant|>
{%- if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif -%}
{% endif -%}";

fn kwargs(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn template_variables_render_as_transformers_renders_them() {
    let dir = tempfile::tempdir().unwrap();
    let loaded = prism_model::load("builtin:tiny-arith", &load_options()).unwrap();
    loaded.model.save_hf_with(dir.path(), &loaded.tokenizer, &loaded.generation).unwrap();
    let mut tok = Tokenizer::from_hf_dir(dir.path()).unwrap();
    tok.chat_template = Some(TEMPLATE.into());
    let conversation = json!([{"role": "user", "content": "1+2*3"}, {"role": "assistant", "content": "7"}, {"role": "user", "content": "and 4*5?"}]);
    let messages: Vec<ChatMessage> = serde_json::from_value(conversation.clone()).unwrap();
    let variants = [json!({}), json!({"enable_thinking": false}), json!({"enable_thinking": true}), json!({"system_name": "prism", "enable_thinking": false})];
    let mut cases = Vec::new();
    for v in &variants {
        for generation in [false, true] {
            cases.push(json!({"messages": conversation, "add_generation_prompt": generation, "kwargs": v}));
        }
    }
    let spec = json!({"dir": dir.path(), "template": TEMPLATE, "cases": cases});
    let theirs: Vec<String> = serde_json::from_str(&python("chat_kwargs.py", &[], &spec.to_string())).unwrap();
    let mut i = 0;
    for v in &variants {
        for generation in [false, true] {
            // As a request's variables, and as the tokenizer's own.
            let ours = tok.apply_chat_template_with(&messages, generation, &kwargs(v.clone())).unwrap();
            assert_eq!(ours, theirs[i], "kwargs {v}, generation prompt {generation}");
            let mut set = tok.clone();
            set.set_chat_template_kwargs(kwargs(v.clone())).unwrap();
            assert_eq!(set.apply_chat_template(&messages, generation).unwrap(), theirs[i]);
            i += 1;
        }
    }
    // The switch does change the prompt.
    assert!(theirs[3].ends_with("<think>\n\n</think>\n\n") && !theirs[1].contains("<think>"), "{:?}", &theirs[..4]);
    // A request's variables override the tokenizer's own.
    let mut set = tok.clone();
    set.set_chat_template_kwargs(kwargs(json!({"enable_thinking": false}))).unwrap();
    assert_eq!(set.apply_chat_template_with(&messages, true, &kwargs(json!({"enable_thinking": true}))).unwrap(), theirs[5]);
    // prism's own variables cannot be overridden.
    let e = tok.apply_chat_template_with(&messages, true, &kwargs(json!({"add_generation_prompt": false}))).unwrap_err().to_string();
    assert!(e.contains("add_generation_prompt"), "{e}");
    assert!(tok.clone().set_chat_template_kwargs(kwargs(json!({"messages": []}))).is_err());
}
