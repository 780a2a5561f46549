//! prism-proto: the wire format between processes.
//!
//! Owns the `prism.v1` protobuf package (prompts, trajectories, reward labels; the
//! `Control` and `Weights` services), its tonic/prost generated code, and the one
//! place where those messages convert to and from `prism-core` types.
//!
//! Must not know about models, rewards or actors.
