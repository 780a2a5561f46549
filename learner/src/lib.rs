//! prism-learner: turning labeled groups into optimizer steps.
//!
//! Owns advantage estimators (GRPO, Dr. GRPO, RLOO, process, TP-GRPO), policy
//! losses (PPO clip with clip-higher, dual clip, KL, entropy), the optimizer and
//! schedules, the train step, SFT, and checkpoints with exact resume.
//!
//! Must not know about actors, transports or where trajectories came from.
