//! prism-reward: turning a trajectory into a [`prism_core::RewardLabel`].
//!
//! Owns outcome verifiers, deterministic step verifiers, the generative PRM judge
//! client (any OpenAI-compatible server), the ONI-style distilled reward model, and
//! the assembly of one trajectory's label.
//!
//! Must not know about the learner, actors or transports: it is a plain async
//! library, callable and testable on its own.
