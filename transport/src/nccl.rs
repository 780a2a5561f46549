//! NCCL collectives between GPUs: the learner broadcasting weights to rollout
//! GPUs, and data-parallel learner ranks all-reducing gradients.
//!
//! Through cudarc's NCCL bindings, loaded at run time: CPU builds compile this
//! and need no CUDA. cudarc panics when it cannot load `libcuda`/`libnccl`, so
//! [`probe`] checks for them first (and contains any panic), and everything
//! else goes through it: on a CPU machine the answer is a clean
//! [`Error::NcclUnavailable`].
//!
//! The communicator and its CUDA stream live on a dedicated thread
//! ([`Communicator`] sends it jobs). Each collective runs in buckets of
//! `dist.nccl_bucket_mb` (one NCCL group per bucket) and is waited for with a
//! deadline: past `dist.nccl_timeout_ms` the communicator is aborted and the
//! error names the rank and the operation, instead of hanging.

use super::{Error, Result};
use cudarc::nccl::sys as nccl;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Size of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// NCCL's version code, e.g. 22805 for 2.28.5.
    pub nccl_version: i32,
    /// CUDA devices visible.
    pub devices: i32,
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs `f`, turning a panic inside cudarc into an `NcclUnavailable` error.
fn contained<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|p| Error::NcclUnavailable(format!("{what}: {}", panic_message(p))))
}

/// Whether NCCL can run here: the CUDA driver library loads, a device is
/// visible and libnccl loads. Never panics.
pub fn probe() -> Result<Probe> {
    // SAFETY: only tries to dlopen the library by its usual names.
    if !contained("loading libcuda", || unsafe { cudarc::driver::sys::is_culib_present() })? {
        return Err(Error::NcclUnavailable("libcuda.so (the NVIDIA driver) is not installed on this machine".into()));
    }
    // SAFETY: as above.
    if !contained("loading libnccl", || unsafe { cudarc::nccl::sys::is_culib_present() })? {
        return Err(Error::NcclUnavailable(
            "libnccl.so is not on the library path (cudarc loads it by that name; the torch wheel ships \
             nvidia/nccl/lib/libnccl.so.2: link it as libnccl.so in a folder on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    contained("cuInit", cudarc::driver::result::init)?
        .map_err(|e| Error::NcclUnavailable(format!("cuInit failed: {e:?}")))?;
    let devices = contained("counting devices", cudarc::driver::CudaContext::device_count)?
        .map_err(|e| Error::NcclUnavailable(format!("cannot count CUDA devices: {e:?}")))?;
    if devices == 0 {
        return Err(Error::NcclUnavailable("no CUDA device is visible".into()));
    }
    let nccl_version = contained("ncclGetVersion", cudarc::nccl::result::get_nccl_version)?
        .map_err(|e| Error::NcclUnavailable(format!("ncclGetVersion failed: {e:?}")))?;
    Ok(Probe { nccl_version, devices })
}

/// A new NCCL unique id (rank 0 makes it and shares it over Control).
pub fn unique_id() -> Result<Vec<u8>> {
    probe()?;
    let id = contained("ncclGetUniqueId", cudarc::nccl::result::get_uniqueid)?
        .map_err(|e| Error::NcclUnavailable(format!("ncclGetUniqueId failed: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn nccl_dtype(kind: Kind) -> Option<nccl::ncclDataType_t> {
    use nccl::ncclDataType_t::*;
    Some(match kind {
        Kind::Float => ncclFloat32,
        Kind::Half => ncclFloat16,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Double => ncclFloat64,
        Kind::Int64 => ncclInt64,
        Kind::Int => ncclInt32,
        Kind::Uint8 => ncclUint8,
        Kind::Int8 => ncclInt8,
        _ => return None,
    })
}

enum Op {
    Broadcast { root: usize },
    AllReduceSum,
    /// `tensors` = [input (world × n), output (n)].
    ReduceScatterSum,
    /// `tensors` = [input (n), output (world × n)].
    AllGather,
}

struct Job {
    op: Op,
    tensors: Vec<Tensor>,
    reply: mpsc::Sender<Result<()>>,
}

/// One rank's NCCL communicator, owned by a dedicated thread.
pub struct Communicator {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    rank: usize,
    world: usize,
    timeout: Duration,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator").field("rank", &self.rank).field("world", &self.world).finish_non_exhaustive()
    }
}

/// Everything the communicator thread owns.
struct Comm {
    comm: nccl::ncclComm_t,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    device: usize,
    rank: usize,
    world: usize,
    timeout: Duration,
    bucket_bytes: usize,
}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world` on CUDA device `device`.
    /// Fails after `timeout` if the other ranks do not join.
    pub fn new(id: &[u8], rank: usize, world: usize, device: usize, timeout: Duration, bucket_bytes: usize) -> Result<Self> {
        probe()?;
        if id.len() != UNIQUE_ID_BYTES || rank >= world {
            return Err(Error::Nccl {
                rank,
                world,
                op: "init".into(),
                reason: format!("unique id of {} bytes (want {UNIQUE_ID_BYTES}) or rank out of range", id.len()),
            });
        }
        let mut unique = nccl::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
        for (d, s) in unique.internal.iter_mut().zip(id) {
            *d = *s as _;
        }
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("nccl-rank{rank}"))
            .spawn(move || {
                let comm = match Comm::init(unique, rank, world, device, timeout, bucket_bytes) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for job in jobs_rx {
                    let result = comm.run(&job.op, &job.tensors);
                    let failed = result.is_err();
                    let _ = job.reply.send(result);
                    if failed {
                        // The communicator was aborted: later jobs would fail too.
                        return;
                    }
                }
                comm.destroy();
            })
            .map_err(|e| Error::Nccl { rank, world, op: "init".into(), reason: format!("cannot start thread: {e}") })?;
        match ready_rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(Self { jobs: Some(jobs_tx), thread: Some(thread), rank, world, timeout }),
            Ok(Err(e)) => Err(e),
            // ncclCommInitRank blocks until every rank joins; the thread is left
            // blocked and the run fails.
            Err(_) => Err(Error::NcclTimeout { rank, world, op: "init (waiting for the other ranks)".into(), timeout_ms: timeout.as_millis() as u64 }),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    fn submit(&self, op: Op, name: &str, tensors: &[Tensor]) -> Result<()> {
        let dead = || Error::Nccl { rank: self.rank, world: self.world, op: name.into(), reason: "the communicator was aborted by an earlier failure".into() };
        let (reply, rx) = mpsc::channel();
        let tensors = tensors.iter().map(Tensor::shallow_clone).collect();
        self.jobs.as_ref().ok_or_else(dead)?.send(Job { op, tensors, reply }).map_err(|_| dead())?;
        // The thread enforces the timeout per bucket; this bounds the whole call.
        rx.recv_timeout(self.timeout * 4 + Duration::from_secs(5)).map_err(|_| Error::NcclTimeout {
            rank: self.rank,
            world: self.world,
            op: name.into(),
            timeout_ms: self.timeout.as_millis() as u64,
        })?
    }

    /// Broadcasts `tensors` (CUDA, contiguous) from `root` to every rank, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        self.submit(Op::Broadcast { root }, &format!("broadcast from rank {root}"), tensors)
    }

    /// Sums `tensors` (CUDA, contiguous) over every rank, in place.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.submit(Op::AllReduceSum, "all-reduce (sum)", tensors)
    }

    /// Sums `input` (CUDA, contiguous, `world × n` elements) over every rank
    /// into this rank's share `output` (`n` elements).
    pub fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.shares("reduce-scatter (sum)", input, output)?;
        self.submit(Op::ReduceScatterSum, "reduce-scatter (sum)", &[input.shallow_clone(), output.shallow_clone()])
    }

    /// Every rank's `input` (CUDA, contiguous, `n` elements) in rank order
    /// into `output` (`world × n` elements).
    pub fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        self.shares("all-gather", output, input)?;
        self.submit(Op::AllGather, "all-gather", &[input.shallow_clone(), output.shallow_clone()])
    }

    fn shares(&self, op: &str, whole: &Tensor, share: &Tensor) -> Result<()> {
        prism_learner::collective::check_shares(self.world, whole, share)
            .map_err(|reason| Error::Nccl { rank: self.rank, world: self.world, op: op.into(), reason })
    }

    /// Averages `tensors` over every rank, in place (gradients of data-parallel ranks).
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<()> {
        self.all_reduce_sum(tensors)?;
        let _guard = tch::no_grad_guard();
        for t in tensors {
            let _ = t.shallow_clone().f_div_scalar_(self.world as f64).map_err(|e| Error::Nccl {
                rank: self.rank,
                world: self.world,
                op: "all-reduce (mean)".into(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

impl prism_learner::Collective for Communicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> prism_learner::Result<()> {
        Communicator::all_reduce_sum(self, tensors).map_err(|e| prism_learner::Error::Collective(e.to_string()))
    }
    fn broadcast(&self, tensors: &[Tensor], root: usize) -> prism_learner::Result<()> {
        Communicator::broadcast(self, tensors, root).map_err(|e| prism_learner::Error::Collective(e.to_string()))
    }
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> prism_learner::Result<()> {
        Communicator::reduce_scatter_sum(self, input, output).map_err(|e| prism_learner::Error::Collective(e.to_string()))
    }
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> prism_learner::Result<()> {
        Communicator::all_gather(self, input, output).map_err(|e| prism_learner::Error::Collective(e.to_string()))
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Comm {
    fn init(id: nccl::ncclUniqueId, rank: usize, world: usize, device: usize, timeout: Duration, bucket_bytes: usize) -> Result<Self> {
        let fail = |op: &str, reason: String| Error::Nccl { rank, world, op: op.into(), reason };
        let ctx = contained("CUDA context", || cudarc::driver::CudaContext::new(device))?
            .map_err(|e| fail("init", format!("CUDA device {device}: {e:?}")))?;
        ctx.bind_to_thread().map_err(|e| fail("init", format!("{e:?}")))?;
        let stream = ctx.new_stream().map_err(|e| fail("init", format!("new stream: {e:?}")))?;
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id came from ncclGetUniqueId.
        unsafe { cudarc::nccl::result::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map_err(|e| fail("init", format!("ncclCommInitRank: {e:?}")))?;
        tracing::info!(rank, world, device, "NCCL communicator ready");
        Ok(Self { comm, stream, device, rank, world, timeout, bucket_bytes: bucket_bytes.max(1) })
    }

    fn run(&self, op: &Op, tensors: &[Tensor]) -> Result<()> {
        let name = match op {
            Op::Broadcast { root } => format!("broadcast from rank {root}"),
            Op::AllReduceSum => "all-reduce (sum)".to_string(),
            Op::ReduceScatterSum => "reduce-scatter (sum)".to_string(),
            Op::AllGather => "all-gather".to_string(),
        };
        let fail = |reason: String| Error::Nccl { rank: self.rank, world: self.world, op: name.clone(), reason };
        for (i, t) in tensors.iter().enumerate() {
            if t.device() != tch::Device::Cuda(self.device) || !t.is_contiguous() {
                return Err(fail(format!("tensor {i} must be contiguous on cuda:{} (is on {:?})", self.device, t.device())));
            }
            if nccl_dtype(t.kind()).is_none() {
                return Err(fail(format!("tensor {i} has dtype {:?}, which NCCL does not carry", t.kind())));
            }
        }
        // The tensors were written on torch's streams; finish that work first.
        tch::Cuda::synchronize(self.device as i64);
        let stream = self.stream.cu_stream() as nccl::cudaStream_t;
        if let (Op::ReduceScatterSum | Op::AllGather, [input, output]) = (op, tensors) {
            // One call over separate buffers (their sizes checked by the caller).
            let dtype = nccl_dtype(input.kind()).expect("checked above");
            // SAFETY: both are contiguous CUDA buffers of the checked sizes, kept
            // alive by `tensors` until the stream is done.
            let r = unsafe {
                match op {
                    Op::ReduceScatterSum => cudarc::nccl::result::reduce_scatter(
                        input.data_ptr(),
                        output.data_ptr(),
                        output.numel(),
                        dtype,
                        nccl::ncclRedOp_t::ncclSum,
                        self.comm,
                        stream,
                    ),
                    _ => cudarc::nccl::result::all_gather(input.data_ptr(), output.data_ptr(), input.numel(), dtype, self.comm, stream),
                }
            };
            r.map_err(|e| fail(format!("{e:?}")))?;
            return self.wait(&name, 0);
        }
        if matches!(op, Op::ReduceScatterSum | Op::AllGather) {
            return Err(fail(format!("takes one input and one output tensor, not {}", tensors.len())));
        }
        for (b, bucket) in buckets(tensors, self.bucket_bytes).into_iter().enumerate() {
            cudarc::nccl::result::group_start().map_err(|e| fail(format!("ncclGroupStart: {e:?}")))?;
            for t in bucket {
                let ptr = t.data_ptr();
                let count = t.numel();
                let dtype = nccl_dtype(t.kind()).expect("checked above");
                // SAFETY: `ptr` is the start of a contiguous CUDA buffer of `count`
                // elements of `dtype`, kept alive by `tensors` until the stream is done.
                let r = unsafe {
                    match op {
                        Op::Broadcast { root } => cudarc::nccl::result::broadcast(ptr, ptr, count, dtype, *root as i32, self.comm, stream),
                        Op::AllReduceSum => cudarc::nccl::result::all_reduce(ptr, ptr, count, dtype, nccl::ncclRedOp_t::ncclSum, self.comm, stream),
                        Op::ReduceScatterSum | Op::AllGather => unreachable!("returned above"),
                    }
                };
                r.map_err(|e| fail(format!("bucket {b}: {e:?}")))?;
            }
            cudarc::nccl::result::group_end().map_err(|e| fail(format!("ncclGroupEnd: {e:?}")))?;
            self.wait(&name, b)?;
        }
        Ok(())
    }

    /// Polls the stream until the bucket is done, NCCL reports an error, or the
    /// deadline passes (then aborts the communicator so peers fail too).
    fn wait(&self, name: &str, bucket: usize) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let stream = self.stream.cu_stream();
        loop {
            // SAFETY: the stream is alive (owned by self).
            match unsafe { cudarc::driver::sys::cuStreamQuery(stream) } {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => return Ok(()),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(Error::Nccl { rank: self.rank, world: self.world, op: format!("{name}, bucket {bucket}"), reason: format!("CUDA stream error {other:?}") });
                }
            }
            let mut async_err = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: comm is initialised; async_err is a valid out-pointer.
            unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if !matches!(async_err, nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress) {
                // SAFETY: aborting an initialised communicator.
                let _ = unsafe { cudarc::nccl::result::comm_abort(self.comm) };
                return Err(Error::Nccl { rank: self.rank, world: self.world, op: format!("{name}, bucket {bucket}"), reason: format!("{async_err:?} (a peer failed or left)") });
            }
            if Instant::now() >= deadline {
                // SAFETY: aborting an initialised communicator.
                let _ = unsafe { cudarc::nccl::result::comm_abort(self.comm) };
                return Err(Error::NcclTimeout {
                    rank: self.rank,
                    world: self.world,
                    op: format!("{name}, bucket {bucket} (communicator aborted)"),
                    timeout_ms: self.timeout.as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn destroy(self) {
        // SAFETY: the communicator is initialised and no work is pending.
        let _ = unsafe { cudarc::nccl::result::comm_destroy(self.comm) };
    }
}

/// Splits `tensors` into consecutive groups of at most `bucket_bytes` (a
/// tensor larger than that forms a bucket of its own).
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<&[Tensor]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        if i > start && size + bytes > bucket_bytes {
            out.push(&tensors[start..i]);
            (start, size) = (i, 0);
        }
        size += bytes;
    }
    if start < tensors.len() {
        out.push(&tensors[start..]);
    }
    out
}

#[cfg(test)]
mod tests;
