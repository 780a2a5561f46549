//! A rollout process's side of the Weights service: fetches a version over
//! one or more connections and checks every chunk (version tag, position,
//! CRC-32) and every tensor (whole, as announced) before handing it on.

use super::data::{Part, TensorData, WeightBytes};
use super::server::MAX_STREAMS;
use crate::grpc::{self, ClientAuth, Token};
use crate::{Error, Result};
use bytes::Bytes;
use prism_proto::v1;
use tokio_stream::StreamExt;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Inner = v1::weights_client::WeightsClient<InterceptedService<Channel, ClientAuth>>;

/// A rollout process's connection to the learner's Weights service: one or
/// more HTTP/2 connections (`grpc.weight_streams`), over which each fetch is
/// split, so that receiving and checking the bytes runs on several cores.
#[derive(Clone, Debug)]
pub struct WeightsClient {
    pub(super) inners: Vec<Inner>,
    addr: String,
}

/// One stream's chunks, checksummed, in the order they came.
pub(super) struct Received {
    /// (version, tensor_count, part) of the first chunk; None = the stream was empty.
    pub(super) tag: Option<(u64, u32, Part)>,
    pub(super) chunks: Vec<v1::WeightChunk>,
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
            let result = self.fetch_split(want, false).await;
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

    /// Downloads the frozen base the newest version's LoRA adapters are over
    /// ([`super::Part::Base`]), checked as [`Self::fetch`] checks a version.
    pub async fn fetch_base(&mut self) -> Result<WeightBytes> {
        self.fetch_split(0, true).await
    }

    async fn fetch_split(&self, version: u64, base: bool) -> Result<WeightBytes> {
        let shards = self.inners.len() as u32;
        let tasks: Vec<_> = self
            .inners
            .iter()
            .enumerate()
            .map(|(shard, inner)| {
                let (inner, addr) = (inner.clone(), self.addr.clone());
                tokio::spawn(receive(inner, addr, v1::FetchWeightsRequest { version, shard: shard as u32, shards, base }))
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
/// The error for chunks of one version that disagree on what they hold.
const MIXED_PARTS: &str = "chunks of one version disagree on its part";

/// Receives one stream whole, checking each chunk's CRC-32 and that the
/// stream carries one version.
async fn receive(mut inner: Inner, addr: String, request: v1::FetchWeightsRequest) -> Result<Received> {
    let r = inner.fetch(request).await;
    let mut stream = r.map_err(WeightsClient::err(&addr, "Fetch"))?.into_inner();
    let mut got = Received { tag: None, chunks: Vec::new() };
    let mut name = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(WeightsClient::err(&addr, "Fetch"))?;
        let part = Part::from_wire(chunk.base, chunk.adapter_scale, chunk.is_base);
        let (v, _, first) = *got.tag.get_or_insert((chunk.version, chunk.tensor_count, part));
        if chunk.version != v {
            return Err(Error::Weights { version: v, reason: format!("a chunk of version {} arrived mid-stream", chunk.version) });
        }
        if part != first {
            return Err(Error::Weights { version: v, reason: format!("{MIXED_PARTS} ({first:?} and {part:?})") });
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
pub(super) fn assemble(version: u64, streams: Vec<Received>) -> Result<WeightBytes> {
    let tags: Vec<(u64, u32, Part)> = streams.iter().filter_map(|s| s.tag).collect();
    let Some(&(v, count, part)) = tags.first() else {
        return Err(Error::Weights { version, reason: "the stream was empty".into() });
    };
    if let Some((other, _, _)) = tags.iter().find(|(w, _, _)| *w != v) {
        return Err(Error::Weights { version: v, reason: format!("{MIXED} {v} and {other}") });
    }
    if let Some((_, _, other)) = tags.iter().find(|(_, _, p)| *p != part) {
        return Err(Error::Weights { version: v, reason: format!("{MIXED_PARTS} ({part:?} and {other:?})") });
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
    Ok(WeightBytes { version: v, part, tensors })
}
