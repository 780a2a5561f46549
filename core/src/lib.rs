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
pub use label::{LabeledTrajectory, RewardLabel, ScoreSource, StepScore};
pub use trajectory::{FinishReason, Prompt, Step, Trajectory};
