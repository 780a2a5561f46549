//! prism-reward: turning a trajectory into a [`prism_core::RewardLabel`].
//!
//! Owns outcome verifiers ([`outcome`]), step segmentation ([`segment`]),
//! deterministic step verifiers ([`steps`], with the small expression parser in
//! [`expr`]), the generative PRM judge client for any OpenAI-compatible server
//! ([`judge`]), the ONI-style distilled reward model ([`distill`]), the assembly of
//! one trajectory's label ([`Labeler`]) and the ProcessBench evaluation of a judge
//! ([`processbench`]). [`testkit`] holds the scripted and fault-injecting
//! OpenAI-compatible servers the tests and the benchmark run on 127.0.0.1.
//!
//! Must not know about the learner, actors or transports: it is a plain async
//! library, callable and testable on its own.

/// A config enum read from and written as one of a fixed set of strings, so
/// that a wrong value is reported with the accepted ones (the `config` crate's
/// own enum errors do not list them).
macro_rules! string_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The accepted spellings.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                match s.as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(format!("unknown value {s:?}, expected one of: {}", Self::NAMES.join(", "))),
                }
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_string()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod config;
pub mod distill;
pub mod expr;
pub mod judge;
pub mod labeler;
pub mod outcome;
pub mod processbench;
pub mod segment;
pub mod steps;
pub mod testkit;

pub use config::Config;
pub use labeler::{Health, JudgedStep, LabelMeta, Labeler, LatencyMs, Metrics, QueueHealth};

/// Errors of the reward library. Labeling itself never fails (a trajectory
/// always gets a label); these come from construction and from I/O.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] prism_core::config::Invalid),
    #[error("judge template {name}: {reason}")]
    Template { name: String, reason: String },
    #[error("judge client: {0}")]
    Client(String),
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error("{path}, item {item}: {reason}")]
    Data { path: String, item: usize, reason: String },
    #[error("distilled reward model: {0}")]
    Torch(#[from] tch::TchError),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
