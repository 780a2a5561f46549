//! Chat templates: the Jinja `chat_template` of a tokenizer rendered with
//! minijinja the way transformers' `apply_chat_template` renders it
//! (`trim_blocks` and `lstrip_blocks` on, `raise_exception`, the common Python
//! string and dict methods templates call).

use crate::{Error, Result};
use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The template variables prism sets itself, which `kwargs` may not.
pub const RESERVED: [&str; 4] = ["messages", "add_generation_prompt", "bos_token", "eos_token"];

/// Checks template variables given by a user: none may be [`RESERVED`].
pub fn check_kwargs(kwargs: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    match kwargs.keys().find(|k| RESERVED.contains(&k.as_str())) {
        Some(k) => Err(Error::Template(format!("the chat template variable `{k}` is set by prism itself, not by chat_template_kwargs"))),
        None => Ok(()),
    }
}

/// Renders `template` for `messages`. `bos_token`/`eos_token` are the strings
/// templates may reference; `kwargs` are further variables the template sees,
/// as transformers' `apply_chat_template(**kwargs)` passes them (e.g.
/// Qwen3's `enable_thinking`).
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Result<String> {
    check_kwargs(kwargs)?;
    let mut env = Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| Error::Template(e.to_string()))?;
    env.set_syntax(syntax);
    env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
        Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
    });
    env.set_unknown_method_callback(python_method);
    let tmpl = env.template_from_str(template).map_err(|e| Error::Template(e.to_string()))?;
    let ctx = minijinja::context! {
        messages => messages_value(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
        ..Value::from(kwargs.iter().map(|(k, v)| (k.clone(), json_value(v))).collect::<std::collections::BTreeMap<String, Value>>())
    };
    tmpl.render(ctx).map_err(|e| Error::Template(e.to_string()))
}

/// A JSON value as the template sees it.
fn json_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(json_value).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => Value::from(o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect::<std::collections::BTreeMap<String, Value>>()),
    }
}

fn messages_value(messages: &[ChatMessage]) -> Value {
    let list: Vec<Value> = messages
        .iter()
        .map(|m| {
            let map: std::collections::BTreeMap<&str, Value> =
                [("role", Value::from(m.role.as_str())), ("content", Value::from(m.content.as_str()))].into();
            Value::from(map)
        })
        .collect();
    Value::from(list)
}

/// The Python methods chat templates call on strings and dicts.
fn python_method(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let unknown = || minijinja::Error::from(ErrorKind::UnknownMethod);
    let arg_str = |i: usize| args.get(i).and_then(|v| v.as_str().map(str::to_string));
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = arg_str(0);
            let out = match method {
                "strip" => match &chars {
                    Some(c) => s.trim_matches(|x| c.contains(x)).to_string(),
                    None => s.trim().to_string(),
                },
                "lstrip" => match &chars {
                    Some(c) => s.trim_start_matches(|x| c.contains(x)).to_string(),
                    None => s.trim_start().to_string(),
                },
                "rstrip" => match &chars {
                    Some(c) => s.trim_end_matches(|x| c.contains(x)).to_string(),
                    None => s.trim_end().to_string(),
                },
                "upper" => s.to_uppercase(),
                "lower" => s.to_lowercase(),
                "startswith" => return Ok(Value::from(chars.is_some_and(|c| s.starts_with(&c)))),
                "endswith" => return Ok(Value::from(chars.is_some_and(|c| s.ends_with(&c)))),
                "replace" => match (arg_str(0), arg_str(1)) {
                    (Some(a), Some(b)) => s.replace(&a, &b),
                    _ => return Err(unknown()),
                },
                "split" => {
                    let parts: Vec<Value> = match &chars {
                        Some(sep) => s.split(sep.as_str()).map(Value::from).collect(),
                        None => s.split_whitespace().map(Value::from).collect(),
                    };
                    return Ok(Value::from(parts));
                }
                _ => return Err(unknown()),
            };
            Ok(Value::from(out))
        }
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", &[value.clone()]),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let keys: Vec<Value> = value.try_iter()?.collect();
                let values: std::result::Result<Vec<Value>, _> = keys.iter().map(|k| value.get_item(k)).collect();
                Ok(Value::from(values?))
            }
            "get" => {
                let key = args.first().ok_or_else(unknown)?;
                let v = value.get_item(key)?;
                if v.is_undefined() { Ok(args.get(1).cloned().unwrap_or(Value::from(()))) } else { Ok(v) }
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}
