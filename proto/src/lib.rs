//! prism-proto: the wire format between processes.
//!
//! Owns the `prism.v1` protobuf package (prompts, trajectories, reward labels; the
//! `Control` and `Weights` services), its tonic/prost generated code, and the one
//! place where those messages convert to and from `prism-core` types
//! ([`convert`]).
//!
//! Must not know about models, rewards or actors; only `prism-transport` uses
//! it (everything else speaks core types).

/// The generated `prism.v1` messages, clients and servers.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("prism.v1");
}

pub mod convert;

pub use convert::{ConvertError, LabelFailure, LabelResult, Result};
