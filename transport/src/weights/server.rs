//! The learner's side of the Weights service: the newest version, its chunks
//! and their checksums worked out once, served to any number of fetches.

use super::data::WeightBytes;
use crate::grpc::{self, Token};
use bytes::Bytes;
use prism_proto::v1;
use prism_proto::v1::weights_server::WeightsServer;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

/// Where one chunk of a published version lies, and its CRC-32.
#[derive(Debug, Clone, Copy)]
struct Span {
    tensor: usize,
    piece: usize,
    start: usize,
    end: usize,
    /// Byte offset within the tensor.
    offset: u64,
    crc: u32,
}

/// A version as served: the set and every chunk's place and checksum, worked
/// out once when it is published, so that serving a fetch (one per rollout
/// process per version) only slices and sends.
#[derive(Debug)]
pub(super) struct Published {
    set: Arc<WeightBytes>,
    spans: Vec<Span>,
}

impl Published {
    pub(super) fn new(set: WeightBytes, chunk_bytes: usize) -> Self {
        let mut spans = Vec::new();
        for (tensor, t) in set.tensors.iter().enumerate() {
            let mut offset = 0u64;
            let first = spans.len();
            for (piece, bytes) in t.pieces.iter().enumerate() {
                let mut start = 0;
                while start < bytes.len() {
                    let end = (start + chunk_bytes).min(bytes.len());
                    spans.push(Span { tensor, piece, start, end, offset, crc: crc32fast::hash(&bytes[start..end]) });
                    offset += (end - start) as u64;
                    start = end;
                }
            }
            // An empty tensor still sends one (empty) chunk carrying its header.
            if spans.len() == first {
                spans.push(Span { tensor, piece: 0, start: 0, end: 0, offset: 0, crc: crc32fast::hash(&[]) });
            }
        }
        Self { set: Arc::new(set), spans }
    }

    /// The chunks of run `shard` of `shards` (see `FetchWeightsRequest`),
    /// lazily, slicing (not copying) the set's bytes.
    pub(super) fn chunks(self: Arc<Self>, shard: usize, shards: usize) -> impl Iterator<Item = v1::WeightChunk> {
        let n = self.spans.len();
        let (lo, hi) = (shard * n / shards, (shard + 1) * n / shards);
        let count = self.set.tensors.len() as u32;
        let (base, adapter_scale, is_base) = self.set.part.to_wire();
        (lo..hi).map(move |i| {
            let s = self.spans[i];
            let t = &self.set.tensors[s.tensor];
            let data = t.pieces.get(s.piece).map_or_else(Bytes::new, |p| p.slice(s.start..s.end));
            v1::WeightChunk {
                version: self.set.version,
                tensor_index: s.tensor as u32,
                tensor_count: count,
                header: (s.offset == 0 || i == lo).then(|| v1::TensorHeader {
                    name: t.name.clone(),
                    dtype: t.dtype as i32,
                    shape: t.shape.clone(),
                    byte_len: t.len() as u64,
                }),
                offset: s.offset,
                crc32: s.crc,
                data,
                base,
                adapter_scale,
                is_base,
            }
        })
    }
}

/// The learner's side: holds the newest version (and a LoRA policy's frozen
/// base, which its versions' adapters are merged over). Cloning shares it.
#[derive(Clone, Debug)]
pub struct Weights {
    latest: Arc<watch::Sender<Option<Arc<Published>>>>,
    base: Arc<std::sync::Mutex<Option<Arc<Published>>>>,
    chunk_bytes: usize,
}

/// Most streams one fetch may be split into.
pub const MAX_STREAMS: u32 = 64;

impl Weights {
    /// Serves chunks of `chunk_bytes`.
    pub fn new(chunk_bytes: usize) -> Self {
        Self { latest: Arc::new(watch::channel(None).0), base: Arc::default(), chunk_bytes: chunk_bytes.max(1) }
    }

    /// Holds `set` (a [`super::Part::Base`]) as the frozen base later
    /// versions' adapters ([`super::Part::Adapters`]) name; fetched with
    /// `FetchWeightsRequest.base`.
    pub fn publish_base(&self, set: WeightBytes) {
        tracing::info!(base = set.part.to_wire().0, tensors = set.tensors.len(), bytes = set.total_bytes(), "frozen base published");
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(Published::new(set, self.chunk_bytes)));
    }

    /// The id of the base held (0 = none).
    pub fn base_id(&self) -> u64 {
        self.base.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |p| p.set.part.to_wire().0)
    }

    /// Makes `set` the version every new fetch gets (computing its chunks'
    /// checksums here, once). Fetches in progress finish with the version they
    /// started.
    pub fn publish(&self, set: WeightBytes) {
        tracing::info!(policy_version = set.version, tensors = set.tensors.len(), bytes = set.total_bytes(), "weights published");
        self.latest.send_replace(Some(Arc::new(Published::new(set, self.chunk_bytes))));
    }

    /// The newest published version number (0 = none).
    pub fn latest_version(&self) -> u64 {
        self.latest.borrow().as_ref().map_or(0, |p| p.set.version)
    }

    /// The tonic service, refusing requests without `token` when one is set.
    pub fn service(&self, token: Option<Token>, max_message_bytes: usize) -> InterceptedService<WeightsServer<Self>, grpc::Auth> {
        let server = WeightsServer::new(self.clone())
            .max_encoding_message_size(max_message_bytes)
            .max_decoding_message_size(max_message_bytes);
        InterceptedService::new(server, grpc::Auth::new(token))
    }
}

pub(super) type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl v1::weights_server::Weights for Weights {
    async fn get_latest_version(&self, _: Request<v1::GetLatestVersionRequest>) -> Result<Response<v1::VersionInfo>, Status> {
        let info = match self.latest.borrow().as_ref() {
            Some(p) => v1::VersionInfo { version: p.set.version, tensor_count: p.set.tensors.len() as u32, total_bytes: p.set.total_bytes() },
            None => v1::VersionInfo::default(),
        };
        Ok(Response::new(info))
    }

    type FetchStream = ChunkStream;

    async fn fetch(&self, request: Request<v1::FetchWeightsRequest>) -> Result<Response<ChunkStream>, Status> {
        let r = request.into_inner();
        let shards = r.shards.max(1);
        if shards > MAX_STREAMS || r.shard >= shards {
            return Err(Status::invalid_argument(format!(
                "fetch: shard {} of {} is not a shard (shards must be 1..={MAX_STREAMS}, shard below it)",
                r.shard, r.shards
            )));
        }
        if r.base {
            if r.version != 0 {
                return Err(Status::invalid_argument(format!("fetch: a base has no version (asked for the base with version {})", r.version)));
            }
            let Some(base) = self.base.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                return Err(grpc::gone(tonic::Code::NotFound, "fetch: no frozen base is held (the policy has no LoRA adapters)"));
            };
            return Ok(Response::new(Box::pin(tokio_stream::iter(base.chunks(r.shard as usize, shards as usize).map(Ok)))));
        }
        let Some(published) = self.latest.borrow().clone() else {
            return Err(grpc::not_ready("fetch: no weights published yet"));
        };
        if r.version != 0 && r.version != published.set.version {
            return Err(grpc::gone(tonic::Code::NotFound, format!(
                "fetch: version {} is not held; the newest is {}",
                r.version, published.set.version
            )));
        }
        let stream = tokio_stream::iter(published.chunks(r.shard as usize, shards as usize).map(Ok));
        Ok(Response::new(Box::pin(stream)))
    }
}
