//! prism-rollout: where trajectories come from.
//!
//! Owns the tasks and datasets (the built-in arithmetic task, JSONL / GSM8K), the
//! prompt source with its resumable cursor, and group sampling: G completions per
//! prompt turned into [`prism_core::Trajectory`] values with behaviour log-probs.
//!
//! Must not know about rewards, the learner, actors or transports.
