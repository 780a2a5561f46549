//! The tokenizer: a `tokenizers` tokenizer (what `tokenizer.json` describes)
//! plus what `tokenizer_config.json` adds — special tokens, whether a BOS is
//! prepended, and the chat template.

use crate::chat::{self, ChatMessage};
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Text ↔ token ids, special tokens and the chat template of one model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `bos_token` of tokenizer_config.json (or the GGUF metadata).
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Prepend `bos_token` when encoding with special tokens and the
    /// tokenizer's own post-processor does not (GGUF `add_bos_token`).
    pub add_bos: bool,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Variables every chat prompt's template sees besides the messages
    /// (`model.chat_template_kwargs`, e.g. `enable_thinking = false` for
    /// Qwen3); see [`Tokenizer::set_chat_template_kwargs`].
    chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
}

/// A token given as a string or as an AddedToken object `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Builds from `tokenizer.json` text and special-token settings.
    pub fn from_json(json: &str, origin: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| Error::Format { path: origin.into(), reason: format!("not a tokenizer.json: {e}") })?;
        Ok(Self {
            inner,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            add_bos: false,
            chat_template: None,
            chat_template_kwargs: serde_json::Map::new(),
        })
    }

    /// Reads `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja`
    /// where present, from an HF folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut tok = Self::from_json(&text, &path)?;
        let config_path = dir.join("tokenizer_config.json");
        if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let config: Value = serde_json::from_str(&text)
                .map_err(|e| Error::Format { path: config_path.clone(), reason: e.to_string() })?;
            tok.bos_token = token_string(config.get("bos_token"));
            tok.eos_token = token_string(config.get("eos_token"));
            tok.pad_token = token_string(config.get("pad_token"));
            tok.unk_token = token_string(config.get("unk_token"));
            tok.chat_template = match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            tok.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Ok(tok)
    }

    /// Token ids of `text`; with `add_special_tokens`, whatever the tokenizer
    /// adds (its post-processor, and BOS where `add_bos`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            self.add_bos_to(&mut ids);
        }
        Ok(ids)
    }

    /// Puts BOS first where `add_bos` says so and it is not there yet.
    fn add_bos_to(&self, ids: &mut Vec<u32>) {
        if let (true, Some(bos)) = (self.add_bos, self.bos_id()) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
    }

    /// Text of `ids`; special tokens left out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The text of each prefix `ids[..=i]` ends at byte `ends[i]` of the
    /// decoded text (special tokens skipped). A token that ends inside a
    /// multi-byte character ends where the last complete character does.
    pub fn decode_with_ends(&self, ids: &[u32]) -> Result<(String, Vec<u32>)> {
        let text = self.decode(ids, true)?;
        let mut ends = Vec::with_capacity(ids.len());
        let mut last = 0usize;
        for i in 0..ids.len() {
            let prefix = self.decode(&ids[..=i], true)?;
            let common = prefix.bytes().zip(text.bytes()).take_while(|(a, b)| a == b).count();
            let mut end = common.min(prefix.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            last = last.max(end);
            ends.push(last as u32);
        }
        Ok((text, ends))
    }

    /// The vocabulary entry of `id` as written in tokenizer.json.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text one token stands for on its own (what OpenAI's `logprobs.token` shows).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id], false).unwrap_or_default()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Variables every chat prompt's template sees from now on besides the
    /// messages, as transformers' `apply_chat_template(**kwargs)` passes
    /// them; none may be one prism sets itself ([`chat::RESERVED`]).
    pub fn set_chat_template_kwargs(&mut self, kwargs: serde_json::Map<String, serde_json::Value>) -> Result<()> {
        chat::check_kwargs(&kwargs)?;
        self.chat_template_kwargs = kwargs;
        Ok(())
    }

    /// The variables set by [`Tokenizer::set_chat_template_kwargs`].
    pub fn chat_template_kwargs(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.chat_template_kwargs
    }

    /// The prompt text for `messages`, as transformers' `apply_chat_template`
    /// with `tokenize=False` renders it.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`Tokenizer::apply_chat_template`] with `extra` template variables
    /// (a request's `chat_template_kwargs`) over the tokenizer's own.
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("this model's tokenizer has no chat template".into()))?;
        let mut kwargs = self.chat_template_kwargs.clone();
        kwargs.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        chat::render(template, messages, add_generation_prompt, self.bos_token.as_deref(), self.eos_token.as_deref(), &kwargs)
    }

    /// Token ids of the chat prompt for `messages` (the template rendered as
    /// [`Tokenizer::apply_chat_template`] renders it, encoded with special
    /// tokens), where a message's text that spells a special token (a user
    /// writing `<|im_end|>`) stays text: only the template's own markup
    /// becomes control tokens. Messages that spell none (nearly all) encode
    /// exactly as the rendered text does.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode_chat_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`Tokenizer::encode_chat`] with `extra` template variables (see
    /// [`Tokenizer::apply_chat_template_with`]).
    pub fn encode_chat_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template_with(messages, add_generation_prompt, extra)?;
        let specials: Vec<String> =
            self.inner.get_added_tokens_decoder().into_values().filter(|t| t.special && !t.content.is_empty()).map(|t| t.content).collect();
        if !messages.iter().any(|m| specials.iter().any(|s| m.content.contains(s.as_str()))) {
            return self.encode(&text, true);
        }
        let fail = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        // What encoding with special tokens adds around the text (BOS, ...).
        let (full, bare) = (self.inner.encode(text.as_str(), true).map_err(fail)?, self.inner.encode(text.as_str(), false).map_err(fail)?);
        let (full, bare) = (full.get_ids(), bare.get_ids());
        let at = (0..=full.len().saturating_sub(bare.len())).find(|&o| full[o..].starts_with(bare)).unwrap_or(0);
        let (prefix, suffix) = (&full[..at], &full[(at + bare.len()).min(full.len())..]);
        let mut literal = self.inner.clone();
        literal.set_encode_special_tokens(true);
        let mut ids = prefix.to_vec();
        let mut pos = 0;
        for m in messages.iter().filter(|m| !m.content.is_empty()) {
            let Some(found) = text[pos..].find(m.content.as_str()) else {
                return Err(Error::Template(
                    "a message spells a special token and the chat template changes its text, so it cannot be kept as text".into(),
                ));
            };
            ids.extend(self.inner.encode(&text[pos..pos + found], false).map_err(fail)?.get_ids());
            ids.extend(literal.encode(m.content.as_str(), false).map_err(fail)?.get_ids());
            pos += found + m.content.len();
        }
        ids.extend(self.inner.encode(&text[pos..], false).map_err(fail)?.get_ids());
        ids.extend(suffix);
        self.add_bos_to(&mut ids);
        Ok(ids)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (with the chat
    /// template) so that transformers' `AutoTokenizer.from_pretrained(dir)`
    /// loads the same tokenizer.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        let json = self.inner.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        let mut config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000_000_000_000u64,
        });
        let obj = config.as_object_mut().expect("a JSON object");
        for (key, value) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            if let Some(v) = value {
                obj.insert(key.into(), v.clone().into());
            }
        }
        if let Some(t) = &self.chat_template {
            obj.insert("chat_template".into(), t.clone().into());
        }
        let path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&config).expect("JSON serialises");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        Ok(())
    }
}
