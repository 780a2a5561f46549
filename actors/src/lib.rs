//! prism-actors: the running system.
//!
//! Owns the ractor actors that wrap the libraries (prompt source, rollout workers,
//! reward pool, learner, weight sync, metrics), the supervision tree, staleness
//! control, and the transports between them (bounded in-memory channels; Redis
//! Streams and gRPC across processes).
//!
//! The libraries know nothing of this crate; the binary composes it.
