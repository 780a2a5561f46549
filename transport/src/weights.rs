//! The Weights service: the learner publishes each policy version as a set of
//! named tensors (the model's Hugging Face names); rollout processes pull the
//! newest one as a stream of chunks, each tagged with its version and carrying
//! a CRC-32 of its bytes, and copy it into their `VarStore` by name. A LoRA
//! policy's versions are its adapters alone, over a frozen base published
//! once ([`Part`]).
//!
//! - [`data`]: [`WeightBytes`], a version as named tensors' bytes;
//! - [`server`]: [`Weights`], the learner's side;
//! - [`client`]: [`WeightsClient`], a rollout process's side.

pub mod data;
pub mod client;
pub mod server;

pub use data::{Part, TensorData, WeightBytes, base_id};
pub use client::WeightsClient;
pub use server::{MAX_STREAMS, Weights};

#[cfg(test)]
use {
    prism_proto::v1::{self, weights_server::WeightsServer},
    client::{Received, assemble},
    server::{ChunkStream, Published},
    std::sync::Arc,
    tch::Tensor,
    tokio_stream::StreamExt,
    tonic::{Request, Response, Status},
};

#[cfg(test)]
mod tests;
