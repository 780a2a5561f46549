//! prism-core: the vocabulary every other crate speaks.
//!
//! It owns the data that crosses crate and process boundaries — prompts,
//! trajectories, steps, reward labels, policy versions and ids — and the small
//! shared pieces of configuration handling (the [`config::Invalid`] error that
//! every section's `validate()` returns).
//!
//! It must not know about tensors, models, actors, transports or HTTP: it is
//! plain data, so that any crate (and any process) can depend on it cheaply.

pub mod config;
pub mod ids;
pub mod label;
pub mod trajectory;

pub use ids::{GroupId, PolicyVersion, PromptId, TrajectoryId};
pub use label::{DropReason, LabelFailure, LabelResult, LabeledTrajectory, RewardLabel, ScoreSource, StepScore};
pub use trajectory::{Assignment, FinishReason, Prompt, Step, Trajectory};

/// A config enum read from and written as one of a fixed set of strings, so
/// that a wrong value is reported with the accepted ones (the `config` crate's
/// own enum errors do not list them).
#[macro_export]
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
