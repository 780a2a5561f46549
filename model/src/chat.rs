//! Chat templates: the Jinja `chat_template` of a tokenizer rendered with
//! minijinja the way transformers' `apply_chat_template` renders it
//! (`trim_blocks` and `lstrip_blocks` on, `raise_exception`, `strftime_now`,
//! the common Python string and dict methods templates call).

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
    env.add_function("strftime_now", |format: String| -> std::result::Result<Value, minijinja::Error> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        strftime(&format, now).map(Value::from)
    });
    env.set_unknown_method_callback(python_method);
    let tmpl = env.template_from_str(template).map_err(|e| Error::Template(e.to_string()))?;
    // A special token the tokenizer lacks is left undefined, as transformers
    // passes only the tokens its tokenizer has.
    let mut vars: std::collections::BTreeMap<String, Value> = kwargs.iter().map(|(k, v)| (k.clone(), json_value(v))).collect();
    vars.insert("messages".into(), messages_value(messages));
    vars.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
    for (name, token) in [("bos_token", bos_token), ("eos_token", eos_token)] {
        if let Some(t) = token {
            vars.insert(name.into(), Value::from(t));
        }
    }
    tmpl.render(Value::from(vars)).map_err(|e| Error::Template(e.to_string()))
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

/// Python's `strftime(format)` for `seconds` since the Unix epoch, in UTC, in
/// the C locale: what transformers' `strftime_now` gives templates (Llama 3.2
/// dates its system prompt with `strftime_now("%d %b %Y")`). transformers reads
/// the local clock; prism reads UTC, the same on every host.
fn strftime(format: &str, seconds: u64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] =
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    let days = (seconds / 86_400) as i64;
    let (secs, weekday) = (seconds % 86_400, ((days + 4) % 7) as usize);
    let (year, month, day) = civil_from_days(days);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[month as usize - 1] + day + u32::from(leap && month > 2);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now({format:?}): a lone % at the end")));
        };
        let month_name = MONTHS[month as usize - 1];
        let piece = match d {
            'Y' => year.to_string(),
            'y' => format!("{:02}", year.rem_euclid(100)),
            'm' => format!("{month:02}"),
            'd' => format!("{day:02}"),
            'e' => format!("{day:2}"),
            'j' => format!("{yday:03}"),
            'B' => month_name.to_string(),
            'b' | 'h' => month_name[..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'w' => weekday.to_string(),
            'u' => (if weekday == 0 { 7 } else { weekday }).to_string(),
            'H' => format!("{hour:02}"),
            'I' => format!("{:02}", (hour + 11) % 12 + 1),
            'p' => (if hour < 12 { "AM" } else { "PM" }).to_string(),
            'M' => format!("{minute:02}"),
            'S' => format!("{second:02}"),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            '%' => "%".to_string(),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now({format:?}): %{other} is not supported"),
                ));
            }
        };
        out.push_str(&piece);
    }
    Ok(out)
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`,
/// http://howardhinnant.github.io/date_algorithms.html).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::strftime;

    /// Expected strings from Python: `datetime.fromtimestamp(t, timezone.utc).strftime(f)`.
    /// A tokenizer without a bos token leaves `bos_token` undefined, as
    /// transformers does (it passes only the special tokens it has); it
    /// renders empty where a template just prints it.
    #[test]
    fn a_missing_special_token_is_undefined() {
        let t = "{% if bos_token is defined %}bos={{ bos_token }}{% else %}no bos{% endif %}|{{ bos_token }}|{{ eos_token }}|{{ x }}";
        let kwargs: serde_json::Map<String, serde_json::Value> = serde_json::from_str(r#"{"x": 3}"#).unwrap();
        assert_eq!(super::render(t, &[], false, None, Some("</s>"), &kwargs).unwrap(), "no bos||</s>|3");
        assert_eq!(super::render(t, &[], false, Some("<s>"), Some("</s>"), &kwargs).unwrap(), "bos=<s>|<s>|</s>|3");
    }

    #[test]
    fn strftime_formats_as_python_does() {
        let f = "%Y-%m-%d %H:%M:%S|%d %b %Y|%A %a %B %j %I%p %y %e %w %u %F %T %%";
        assert_eq!(strftime(f, 0).unwrap(), "1970-01-01 00:00:00|01 Jan 1970|Thursday Thu January 001 12AM 70  1 4 4 1970-01-01 00:00:00 %");
        assert_eq!(strftime(f, 1_709_251_199).unwrap(), "2024-02-29 23:59:59|29 Feb 2024|Thursday Thu February 060 11PM 24 29 4 4 2024-02-29 23:59:59 %");
        assert_eq!(strftime(f, 1_735_689_600).unwrap(), "2025-01-01 00:00:00|01 Jan 2025|Wednesday Wed January 001 12AM 25  1 3 3 2025-01-01 00:00:00 %");
        assert_eq!(strftime(f, 1_798_675_200).unwrap(), "2026-12-31 00:00:00|31 Dec 2026|Thursday Thu December 365 12AM 26 31 4 4 2026-12-31 00:00:00 %");
        assert!(strftime("%Q", 0).unwrap_err().to_string().contains("%Q"));
    }
}
