//! Judge prompt templates (Jinja, rendered with minijinja).
//!
//! A template renders the user message (chat API) or the whole prompt
//! (completions API) from `problem` (string), `steps` (list of strings) and
//! `current` (1-based index of the step under judgment; with the ThinkPRM
//! style, the number of steps). Its *style* decides how many requests are made
//! and how replies are read:
//!
//! - `genprm`: one request per step prefix (steps 1..=i); the reply critiques
//!   step i paragraph by paragraph and ends with `\boxed{Yes}` or `\boxed{No}`
//!   — the last `\boxed{}` of the reply is the verdict (after GenPRM, Zhao et
//!   al. 2025);
//! - `thinkprm`: one request for all steps; the reply verifies them in one pass
//!   and gives `Step i: \boxed{correct}` or `\boxed{incorrect}` for each (after
//!   ThinkPRM, Khalifa et al. 2025).

use crate::{Error, Result};
use minijinja::{AutoEscape, Environment, UndefinedBehavior, context};
use sha2::{Digest, Sha256};

string_enum! {
    /// How a template's requests are made and its replies read.
    pub enum Style {
        /// One request per step prefix, verdict `\boxed{Yes|No}`.
        Genprm = "genprm",
        /// One request for all steps, verdicts `Step i: \boxed{correct|incorrect}`.
        Thinkprm = "thinkprm",
    }
}

const GENPRM: &str = r#"You are a meticulous math teacher grading a student's solution one step at a time.

Problem:
{{ problem }}

Solution so far:
{% for step in steps %}
Step {{ loop.index }}:
{{ step }}
{% endfor %}
Judge only Step {{ current }}; the steps before it are context. Critique Step {{ current }} paragraph by paragraph: restate what it claims, redo every calculation in it, and check that it follows from the problem and the earlier steps. Then give your verdict on whether Step {{ current }} is correct as \boxed{Yes} or \boxed{No}, and stop."#;

const THINKPRM: &str = r#"You are a meticulous math teacher verifying a student's solution.

Problem:
{{ problem }}

Solution:
{% for step in steps %}
Step {{ loop.index }}:
{{ step }}
{% endfor %}
Go through the steps in order. For each step, briefly check its calculations and reasoning against the problem and the earlier steps, then write its verdict on its own line exactly as "Step i: \boxed{correct}" or "Step i: \boxed{incorrect}" (with i the step number). Give a verdict for every one of the {{ steps | length }} steps."#;

/// A loaded judge template.
#[derive(Debug)]
pub struct Template {
    name: String,
    style: Style,
    env: Environment<'static>,
    id: [u8; 32],
}

impl Template {
    /// The built-in template of `style`, or the Jinja file `file` (when not
    /// empty) read with that style.
    pub fn load(style: Style, file: &str) -> Result<Self> {
        let (name, source) = if file.is_empty() {
            let source = match style {
                Style::Genprm => GENPRM,
                Style::Thinkprm => THINKPRM,
            };
            (format!("builtin:{}", style.as_str()), source.to_string())
        } else {
            let source =
                std::fs::read_to_string(file).map_err(|e| Error::Io { path: file.into(), reason: e.to_string() })?;
            (file.to_string(), source)
        };
        Self::from_source(name, style, source)
    }

    /// A template from its text.
    pub fn from_source(name: String, style: Style, source: String) -> Result<Self> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        let mut hasher = Sha256::new();
        hasher.update(style.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(source.as_bytes());
        let id = hasher.finalize().into();
        env.add_template_owned("judge", source)
            .map_err(|e| Error::Template { name: name.clone(), reason: e.to_string() })?;
        let t = Self { name, style, env, id };
        // Render once so that a template using an unknown variable fails at start-up.
        t.render("1+1", &["1+1=2"], 1)?;
        Ok(t)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn style(&self) -> Style {
        self.style
    }

    /// A hash of the style and the template text (part of every cache key).
    pub fn id(&self) -> &[u8; 32] {
        &self.id
    }

    /// Renders the prompt for `steps`, judging step `current` (1-based).
    pub fn render(&self, problem: &str, steps: &[&str], current: usize) -> Result<String> {
        let template = self
            .env
            .get_template("judge")
            .map_err(|e| Error::Template { name: self.name.clone(), reason: e.to_string() })?;
        template
            .render(context! {
                problem => problem,
                steps => steps.iter().map(|s| minijinja::Value::from(*s)).collect::<Vec<_>>(),
                current => current,
            })
            .map_err(|e| Error::Template { name: self.name.clone(), reason: e.to_string() })
    }
}
