//! The Weights service: the learner publishes each policy version as a set of
//! named tensors (the model's Hugging Face names); rollout processes pull the
//! newest one as a stream of chunks, each tagged with its version and carrying
//! a CRC-32 of its bytes, and copy it into their `VarStore` by name.

use super::grpc::{self, ClientAuth, Token};
use super::{Error, Result};
use bytes::Bytes;
use prism_proto::v1;
use prism_proto::v1::weights_server::WeightsServer;
use std::pin::Pin;
use std::sync::Arc;
use tch::{Kind, Tensor};
use tokio::sync::watch;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// One named tensor's bytes (little-endian, row-major, on the CPU), in one or
/// more consecutive pieces (as published: one; as received: one per chunk, so
/// they are applied without being copied together first).
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub dtype: v1::DType,
    pub shape: Vec<i64>,
    pub pieces: Vec<Bytes>,
}

impl TensorData {
    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one piece.
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

impl PartialEq for TensorData {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.dtype == other.dtype && self.shape == other.shape && self.to_vec() == other.to_vec()
    }
}

/// A policy version: every parameter of the model, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightBytes {
    pub version: u64,
    pub tensors: Vec<TensorData>,
}

fn dtype_of(kind: Kind) -> Option<v1::DType> {
    Some(match kind {
        Kind::Float => v1::DType::F32,
        Kind::Half => v1::DType::F16,
        Kind::BFloat16 => v1::DType::Bf16,
        Kind::Double => v1::DType::F64,
        Kind::Int64 => v1::DType::I64,
        Kind::Int => v1::DType::I32,
        Kind::Uint8 => v1::DType::U8,
        _ => return None,
    })
}

fn kind_of(dtype: v1::DType) -> Option<(Kind, usize)> {
    Some(match dtype {
        v1::DType::F32 => (Kind::Float, 4),
        v1::DType::F16 => (Kind::Half, 2),
        v1::DType::Bf16 => (Kind::BFloat16, 2),
        v1::DType::F64 => (Kind::Double, 8),
        v1::DType::I64 => (Kind::Int64, 8),
        v1::DType::I32 => (Kind::Int, 4),
        v1::DType::U8 => (Kind::Uint8, 1),
        v1::DType::Unspecified => return None,
    })
}

impl WeightBytes {
    /// Copies `tensors` (any device) to CPU bytes, in the order given.
    pub fn from_tensors<'a>(version: u64, tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                let bad = |reason: String| Error::Tensor { version, name: name.to_string(), reason };
                let dtype = dtype_of(t.kind()).ok_or_else(|| bad(format!("unsupported dtype {:?}", t.kind())))?;
                let t = t.detach().to_device(tch::Device::Cpu).contiguous();
                let numel = t.numel();
                let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
                t.f_copy_data_u8(&mut data, numel).map_err(|e| bad(e.to_string()))?;
                Ok(TensorData { name: name.to_string(), dtype, shape: t.size(), pieces: vec![data.into()] })
            })
            .collect::<Result<_>>()?;
        Ok(Self { version, tensors })
    }

    /// Every variable of `vs`, sorted by name.
    pub fn from_var_store(version: u64, vs: &tch::nn::VarStore) -> Result<Self> {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_tensors(version, vars.iter().map(|(n, t)| (n.as_str(), t)))
    }

    /// Total payload bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.len() as u64).sum()
    }

    /// The tensors as CPU `tch` tensors, by name (one copy of each).
    pub fn to_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.tensors
            .iter()
            .map(|t| {
                let bad = |reason: String| Error::Tensor { version: self.version, name: t.name.clone(), reason };
                let (kind, elt) = kind_of(t.dtype).ok_or_else(|| bad("unspecified dtype".into()))?;
                let want = t.shape.iter().product::<i64>() as usize * elt;
                if t.len() != want {
                    return Err(bad(format!("has {} bytes, its shape and dtype need {want}", t.len())));
                }
                let tensor = Tensor::f_from_slice(&t.to_vec())
                    .and_then(|b| b.f_view_dtype(kind))
                    .and_then(|b| b.f_view(t.shape.as_slice()))
                    .map_err(|e| bad(e.to_string()))?;
                Ok((t.name.clone(), tensor))
            })
            .collect()
    }

    /// Copies every tensor into the variable of the same name in `vs`
    /// (converting dtype and device as needed). The set and the store must have
    /// exactly the same names and shapes; nothing is copied otherwise.
    pub fn apply_to(&self, vs: &tch::nn::VarStore) -> Result<()> {
        let vars = vs.variables();
        let bad = |name: &str, reason: String| Error::Tensor { version: self.version, name: name.to_string(), reason };
        for t in &self.tensors {
            let var = vars.get(&t.name).ok_or_else(|| bad(&t.name, "no variable of this name in the model".into()))?;
            if var.size() != t.shape {
                return Err(bad(&t.name, format!("has shape {:?}, the model's is {:?}", t.shape, var.size())));
            }
            let (_, elt) = kind_of(t.dtype).ok_or_else(|| bad(&t.name, "unspecified dtype".into()))?;
            let want = t.shape.iter().product::<i64>() as usize * elt;
            if t.len() != want {
                return Err(bad(&t.name, format!("has {} bytes, its shape and dtype need {want}", t.len())));
            }
        }
        if vars.len() != self.tensors.len() {
            let mut missing: Vec<&String> =
                vars.keys().filter(|k| !self.tensors.iter().any(|t| &t.name == *k)).collect();
            missing.sort();
            return Err(Error::Weights {
                version: self.version,
                reason: format!("lacks {} of the model's variables, e.g. {:?}", missing.len(), missing.first()),
            });
        }
        let _guard = tch::no_grad_guard();
        for t in &self.tensors {
            let (kind, _) = kind_of(t.dtype).ok_or_else(|| bad(&t.name, "unspecified dtype".into()))?;
            let var = &vars[&t.name];
            // Same dtype: each piece's bytes straight into their place in the
            // variable (no staging copy, any alignment).
            if var.is_contiguous() && var.kind() == kind && var.device() == tch::Device::Cpu {
                // A plain memcpy: torch's own copy would start a parallel region
                // per piece, which stalls when the machine's cores are busy.
                let dst = var.data_ptr() as *mut u8;
                let mut at = 0usize;
                for p in &t.pieces {
                    // SAFETY: `var` is a contiguous CPU tensor of `kind` and
                    // `t.shape`, so it owns exactly `t.len()` bytes from `dst`
                    // (both checked above); the pieces add up to that length and
                    // do not overlap the variable; nothing else uses the
                    // variable while weights are applied (between generations).
                    unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.add(at), p.len()) };
                    at += p.len();
                }
            } else if var.is_contiguous() && var.kind() == kind {
                let flat = var.f_view_dtype(Kind::Uint8).and_then(|v| v.f_view([-1])).map_err(|e| bad(&t.name, e.to_string()))?;
                let mut at = 0i64;
                for p in &t.pieces {
                    let n = p.len() as i64;
                    // SAFETY: `p` holds `n` initialised bytes and outlives
                    // `src`, which `copy_` only reads.
                    let src = unsafe { Tensor::f_from_blob(p.as_ptr(), &[n], &[], Kind::Uint8, tch::Device::Cpu) };
                    src.and_then(|src| flat.f_narrow(0, at, n)?.f_copy_(&src)).map_err(|e| bad(&t.name, e.to_string()))?;
                    at += n;
                }
            } else {
                let src = Tensor::f_from_slice(&t.to_vec())
                    .and_then(|b| b.f_view_dtype(kind))
                    .and_then(|b| b.f_view(t.shape.as_slice()))
                    .map_err(|e| bad(&t.name, e.to_string()))?;
                var.shallow_clone().f_copy_(&src).map_err(|e| bad(&t.name, e.to_string()))?;
            }
        }
        Ok(())
    }
}

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
struct Published {
    set: Arc<WeightBytes>,
    spans: Vec<Span>,
}

impl Published {
    fn new(set: WeightBytes, chunk_bytes: usize) -> Self {
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
    fn chunks(self: Arc<Self>, shard: usize, shards: usize) -> impl Iterator<Item = v1::WeightChunk> {
        let n = self.spans.len();
        let (lo, hi) = (shard * n / shards, (shard + 1) * n / shards);
        let count = self.set.tensors.len() as u32;
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
            }
        })
    }
}

/// The learner's side: holds the newest version. Cloning shares it.
#[derive(Clone, Debug)]
pub struct Weights {
    latest: Arc<watch::Sender<Option<Arc<Published>>>>,
    chunk_bytes: usize,
}

/// Most streams one fetch may be split into.
pub const MAX_STREAMS: u32 = 64;

impl Weights {
    /// Serves chunks of `chunk_bytes`.
    pub fn new(chunk_bytes: usize) -> Self {
        Self { latest: Arc::new(watch::channel(None).0), chunk_bytes: chunk_bytes.max(1) }
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

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::WeightChunk, Status>> + Send>>;

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

type Inner = v1::weights_client::WeightsClient<InterceptedService<Channel, ClientAuth>>;

/// A rollout process's connection to the learner's Weights service: one or
/// more HTTP/2 connections (`grpc.weight_streams`), over which each fetch is
/// split, so that receiving and checking the bytes runs on several cores.
#[derive(Clone, Debug)]
pub struct WeightsClient {
    inners: Vec<Inner>,
    addr: String,
}

/// One stream's chunks, checksummed, in the order they came.
struct Received {
    /// (version, tensor_count) of the first chunk; None = the stream was empty.
    tag: Option<(u64, u32)>,
    chunks: Vec<v1::WeightChunk>,
}

impl WeightsClient {
    /// Connects to the learner at `grpc.learner`, or `addr` when given, with
    /// `grpc.weight_streams` connections.
    pub async fn connect(config: &grpc::Config, addr: Option<&str>, token: Option<&Token>) -> Result<Self> {
        let addr = addr.unwrap_or(&config.learner).to_string();
        let mut inners = Vec::new();
        for _ in 0..config.weight_streams.clamp(1, MAX_STREAMS) {
            // Each connect opens its own connection (a Channel multiplexes
            // streams over one, which one task on each side serves).
            let channel = grpc::connect(config, &addr).await?;
            inners.push(
                v1::weights_client::WeightsClient::with_interceptor(channel, ClientAuth::new(token))
                    .max_decoding_message_size(config.max_message_bytes())
                    .max_encoding_message_size(config.max_message_bytes()),
            );
        }
        Ok(Self { inners, addr })
    }

    fn err<'a>(addr: &'a str, rpc: &'static str) -> impl Fn(Status) -> Error + 'a {
        move |status| grpc::rpc_error(addr, rpc, status)
    }

    /// The newest published version (0 = none yet).
    pub async fn latest_version(&mut self) -> Result<u64> {
        let r = self.inners[0].get_latest_version(v1::GetLatestVersionRequest {}).await;
        r.map(|r| r.into_inner().version).map_err(Self::err(&self.addr, "GetLatestVersion"))
    }

    /// Downloads `version` (0 = the newest), checking every chunk's CRC-32,
    /// version tag and position, and that every tensor arrived whole. Split
    /// over the client's connections; when the newest version is replaced
    /// while it is being fetched, fetches the new one (up to three times).
    pub async fn fetch(&mut self, version: u64) -> Result<WeightBytes> {
        let mut tries = 0;
        loop {
            // One stream needs no pinning: the server sends whatever is newest.
            let want = if version == 0 && self.inners.len() > 1 { self.latest_version().await? } else { version };
            let result = self.fetch_split(want).await;
            let replaced = match &result {
                Err(Error::Gone { .. }) => want != 0,
                Err(Error::Weights { reason, .. }) => reason.starts_with(MIXED),
                _ => false,
            };
            if version == 0 && replaced && tries < 3 {
                tries += 1;
                tracing::debug!(addr = %self.addr, version = want, "weights replaced while fetched; fetching the newest again");
                continue;
            }
            return result;
        }
    }

    async fn fetch_split(&self, version: u64) -> Result<WeightBytes> {
        let shards = self.inners.len() as u32;
        let tasks: Vec<_> = self
            .inners
            .iter()
            .enumerate()
            .map(|(shard, inner)| {
                let (inner, addr) = (inner.clone(), self.addr.clone());
                tokio::spawn(receive(inner, addr, v1::FetchWeightsRequest { version, shard: shard as u32, shards }))
            })
            .collect();
        let mut streams = Vec::with_capacity(tasks.len());
        let mut first_err = None;
        // Every stream is awaited, and the lowest shard's error reported, so
        // the error does not depend on which stream failed first.
        for task in tasks {
            match task.await {
                Ok(Ok(r)) => streams.push(r),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(Error::Weights { version, reason: format!("a fetch stream's task failed: {e}") });
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        assemble(version, streams)
    }

    /// If the learner holds a version newer than `held`, downloads it, applies
    /// it to `vs` and returns its number.
    pub async fn pull_newer(&mut self, held: u64, vs: &tch::nn::VarStore) -> Result<Option<u64>> {
        let latest = self.latest_version().await?;
        if latest <= held {
            return Ok(None);
        }
        let set = self.fetch(0).await?;
        set.apply_to(vs)?;
        Ok(Some(set.version))
    }
}

/// Start of the error for streams of one fetch that carried different versions.
const MIXED: &str = "the streams of one fetch carried versions";

/// Receives one stream whole, checking each chunk's CRC-32 and that the
/// stream carries one version.
async fn receive(mut inner: Inner, addr: String, request: v1::FetchWeightsRequest) -> Result<Received> {
    let r = inner.fetch(request).await;
    let mut stream = r.map_err(WeightsClient::err(&addr, "Fetch"))?.into_inner();
    let mut got = Received { tag: None, chunks: Vec::new() };
    let mut name = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(WeightsClient::err(&addr, "Fetch"))?;
        let (v, _) = *got.tag.get_or_insert((chunk.version, chunk.tensor_count));
        if chunk.version != v {
            return Err(Error::Weights { version: v, reason: format!("a chunk of version {} arrived mid-stream", chunk.version) });
        }
        if let Some(h) = &chunk.header {
            name.clone_from(&h.name);
        }
        let crc = crc32fast::hash(&chunk.data);
        if crc != chunk.crc32 {
            return Err(Error::Checksum { version: v, name, offset: chunk.offset, got: crc, want: chunk.crc32 });
        }
        got.chunks.push(chunk);
    }
    Ok(got)
}

/// Puts the streams of one fetch (in shard order) back together as a set,
/// checking that they make every tensor whole, in order, exactly once.
fn assemble(version: u64, streams: Vec<Received>) -> Result<WeightBytes> {
    let tags: Vec<(u64, u32)> = streams.iter().filter_map(|s| s.tag).collect();
    let Some(&(v, count)) = tags.first() else {
        return Err(Error::Weights { version, reason: "the stream was empty".into() });
    };
    if let Some((other, _)) = tags.iter().find(|(w, _)| *w != v) {
        return Err(Error::Weights { version: v, reason: format!("{MIXED} {v} and {other}") });
    }
    let mut tensors: Vec<TensorData> = Vec::new();
    // The tensor being received: its index, header and pieces so far.
    let mut current: Option<(u32, v1::TensorHeader, Vec<Bytes>)> = None;
    let mut got_bytes = 0u64;
    let finish = |current: &mut Option<(u32, v1::TensorHeader, Vec<Bytes>)>, got: u64, tensors: &mut Vec<TensorData>| {
        if let Some((_, h, pieces)) = current.take() {
            if got != h.byte_len {
                return Err(Error::Tensor { version: v, name: h.name, reason: format!("only {got} of its {} bytes arrived", h.byte_len) });
            }
            let dtype = v1::DType::try_from(h.dtype).unwrap_or(v1::DType::Unspecified);
            tensors.push(TensorData { name: h.name, dtype, shape: h.shape, pieces });
        }
        Ok(())
    };
    for chunk in streams.into_iter().flat_map(|s| s.chunks) {
        if chunk.tensor_count != count {
            return Err(Error::Weights { version: v, reason: format!("chunks disagree on the tensor count ({count} and {})", chunk.tensor_count) });
        }
        // A header either begins the next tensor, or (at the start of a
        // shard's stream) repeats the current one's where it continues.
        let continues = matches!(&current, Some((i, _, _)) if *i == chunk.tensor_index && chunk.offset != 0);
        if let Some(header) = chunk.header.clone().filter(|_| !continues) {
            finish(&mut current, got_bytes, &mut tensors)?;
            got_bytes = 0;
            if chunk.tensor_index as usize != tensors.len() || chunk.offset != 0 {
                return Err(Error::Weights {
                    version: v,
                    reason: format!("tensor {} arrived out of order (expected index {})", header.name, tensors.len()),
                });
            }
            current = Some((chunk.tensor_index, header, Vec::new()));
        }
        let Some((index, header, pieces)) = &mut current else {
            return Err(Error::Weights { version: v, reason: "stream began without a tensor header".into() });
        };
        if chunk.tensor_index != *index || chunk.offset != got_bytes {
            return Err(Error::Tensor {
                version: v,
                name: header.name.clone(),
                reason: format!("chunk at byte {} arrived where byte {got_bytes} was expected", chunk.offset),
            });
        }
        got_bytes += chunk.data.len() as u64;
        if got_bytes > header.byte_len {
            return Err(Error::Tensor { version: v, name: header.name.clone(), reason: format!("more than its {} bytes arrived", header.byte_len) });
        }
        pieces.push(chunk.data);
    }
    finish(&mut current, got_bytes, &mut tensors)?;
    if tensors.len() != count as usize {
        return Err(Error::Weights { version: v, reason: format!("stream ended after {} of {count} tensors", tensors.len()) });
    }
    Ok(WeightBytes { version: v, tensors })
}

#[cfg(test)]
mod tests;
