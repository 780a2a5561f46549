//! Weights from the learner to rollout GPUs over NCCL (`dist.weights =
//! "nccl"`): the learner is rank 0 of a communicator whose other ranks are
//! rollout processes (ranks handed out at registration, see
//! `Control::register`); each version the learner publishes is broadcast,
//! in buckets, to every rank at once instead of being pulled over the Weights
//! stream by each.
//!
//! A broadcast needs every rank in it, so the two sides keep a simple rhythm:
//! the learner's [`Sender`] broadcasts, one after another, the newest version
//! published since its last broadcast (older ones are skipped); a rollout's
//! [`Receiver`] joins the first broadcast as soon as the communicator forms,
//! then one more whenever the heartbeats announce a version newer than the one
//! it holds. Each broadcast starts with a header (version, tensor count, bytes,
//! a signature of names, shapes and dtypes) so that a rollout whose model is
//! not the learner's fails with a message instead of receiving garbage.
//! Received versions are staged; the rollout loads them between generations.
//!
//! Both sides run on their own thread (joining a communicator and every
//! collective block), and every collective is bounded by `dist.nccl_timeout_ms`
//! (see [`super::nccl`]): a rank that is gone fails the run with its rank and
//! operation named, instead of hanging it.

pub use prism_learner::Collective;
use super::{Error, Result};
use prism_model::WeightSet;
use prism_core::PolicyVersion;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Joins the communicator (an NCCL [`super::nccl::Communicator`] on GPUs;
/// tests use an in-process one); runs on the side's own thread, as it blocks
/// until every rank has joined.
pub type Join = Box<dyn FnOnce() -> Result<Box<dyn Collective>> + Send>;

/// What a weight set looks like: `(name, shape, dtype)` in name order.
pub type Layout = Vec<(String, Vec<i64>, Kind)>;

/// The layout of `tensors` (sorted by name, as the learner publishes them).
pub fn layout<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Layout {
    let mut out: Layout = tensors.into_iter().map(|(n, t)| (n.to_string(), t.size(), t.kind())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `[version, tensors, bytes, signature]` of a broadcast.
const HEADER: usize = 4;

/// Tensor count, bytes and a hash of every name, shape and dtype.
fn describe(layout: &Layout) -> (i64, i64, i64) {
    prism_learner::collective::describe(layout.iter().map(|(n, s, k)| (n.as_str(), s.clone(), *k)))
}

#[derive(Default)]
struct State {
    /// Learner: the newest version not broadcast yet. Rollout: the newest received, not yet taken.
    pending: Option<Arc<WeightSet>>,
    /// Rollout: the newest version the learner announced.
    announced: u64,
    /// The last version broadcast (learner) or received (rollout).
    done: u64,
    failed: Option<String>,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds or the side is closed; false when closed.
    fn wait(&self, ready: impl Fn(&State) -> bool) -> bool {
        let mut s = self.lock();
        loop {
            if s.closed {
                return false;
            }
            if ready(&s) {
                return true;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fail(&self, e: &Error) {
        self.lock().failed = Some(e.to_string());
        self.changed.notify_all();
    }

    fn check(&self) -> Result<()> {
        match &self.lock().failed {
            Some(reason) => Err(Error::Weights { version: 0, reason: format!("NCCL weight broadcast: {reason}") }),
            None => Ok(()),
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

fn spawn(name: &str, shared: &Arc<Shared>, body: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    let on_error = shared.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = body() {
                tracing::error!(error = %e, "NCCL weight broadcast stopped");
                on_error.fail(&e);
            }
        })
        .map(|_| ())
        .map_err(|e| Error::Weights { version: 0, reason: format!("cannot start the {name} thread: {e}") })
}

/// The learner's side: broadcasts what it publishes.
pub struct Sender {
    shared: Arc<Shared>,
}

impl Sender {
    /// Starts the thread that joins the communicator (as rank 0) and then
    /// broadcasts each newest published version. The thread is not joined:
    /// at exit it may be inside a broadcast no rank will join any more.
    pub fn spawn(join: Join) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        spawn("nccl-weights-send", &shared, move || {
            let comm = join()?;
            while s.wait(|st| st.pending.is_some()) {
                let Some(set) = s.lock().pending.take() else { continue };
                let tensors: Vec<(String, Tensor)> = {
                    let t = set.tensors.lock().map_err(|_| Error::Weights { version: set.version.0, reason: "weight set poisoned".into() })?;
                    let mut t: Vec<(String, Tensor)> = t.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
                    t.sort_by(|a, b| a.0.cmp(&b.0));
                    t
                };
                let (count, bytes, signature) = describe(&layout(tensors.iter().map(|(n, t)| (n.as_str(), t))));
                let device = tensors.first().map_or(Device::Cpu, |(_, t)| t.device());
                let header = Tensor::from_slice(&[set.version.0 as i64, count, bytes, signature]).to_device(device);
                comm.broadcast(&[header], 0)?;
                let payload: Vec<Tensor> = tensors.into_iter().map(|(_, t)| t).collect();
                comm.broadcast(&payload, 0)?;
                tracing::debug!(policy_version = set.version.0, bytes, ranks = comm.world(), "weights broadcast");
                s.lock().done = set.version.0;
                s.changed.notify_all();
            }
            Ok(())
        })?;
        Ok(Self { shared })
    }

    /// Queues `set` for broadcast (replacing a queued older one); fails if an
    /// earlier broadcast failed.
    pub fn publish(&self, set: Arc<WeightSet>) -> Result<()> {
        self.shared.check()?;
        self.shared.lock().pending = Some(set);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits up to `timeout` until `version` (or a newer one) has been
    /// broadcast; fails if a broadcast failed.
    #[cfg(test)]
    pub fn wait_broadcast(&self, version: u64, timeout: Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.shared.lock();
        while s.done < version && s.failed.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            s = self.shared.changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        drop(s);
        self.shared.check().map(|()| true)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// A rollout's side: joins each broadcast and stages what it receives.
pub struct Receiver {
    shared: Arc<Shared>,
}

impl Receiver {
    /// Starts the thread that joins the communicator and receives into fresh
    /// tensors of `layout` on `device`.
    pub fn spawn(join: Join, layout: Layout, device: Device) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        spawn("nccl-weights-recv", &shared, move || {
            let comm = join()?;
            let (count, bytes, signature) = describe(&layout);
            // The learner broadcasts as soon as the communicator forms; after
            // that, one broadcast per announced newer version.
            let mut first = true;
            while first || s.wait(|st| st.announced > st.done) {
                first = false;
                let header = Tensor::zeros([HEADER as i64], (Kind::Int64, device));
                comm.broadcast(std::slice::from_ref(&header), 0)?;
                let h: Vec<i64> = Vec::try_from(header.to_device(Device::Cpu))
                    .map_err(|e| Error::Weights { version: 0, reason: format!("reading the broadcast header: {e}") })?;
                let version = h[0] as u64;
                if (h[1], h[2], h[3]) != (count, bytes, signature) {
                    return Err(Error::Weights {
                        version,
                        reason: format!(
                            "the learner broadcasts {} tensors of {} bytes, this rollout's model has {count} of {bytes}{}: \
                             the learner and rollouts must load the same model in the same dtype",
                            h[1],
                            h[2],
                            if (h[1], h[2]) == (count, bytes) { " (same sizes, different names, shapes or dtypes)" } else { "" }
                        ),
                    });
                }
                let tensors: Vec<Tensor> = layout.iter().map(|(_, shape, kind)| Tensor::empty(shape.as_slice(), (*kind, device))).collect();
                comm.broadcast(&tensors, 0)?;
                let named = layout.iter().map(|(n, _, _)| n.clone()).zip(tensors).collect();
                let mut st = s.lock();
                st.done = version;
                st.pending = Some(WeightSet::new(PolicyVersion(version), named));
                drop(st);
                s.changed.notify_all();
            }
            Ok(())
        })?;
        Ok(Self { shared })
    }

    /// The newest version the learner has published (from the heartbeats).
    pub fn announce(&self, version: u64) {
        let mut s = self.shared.lock();
        if version > s.announced {
            s.announced = version;
            drop(s);
            self.shared.changed.notify_all();
        }
    }

    /// Waits up to `timeout` for a staged set of at least `version`.
    pub fn wait_for(&self, version: u64, timeout: Duration) -> Result<Option<Arc<WeightSet>>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.shared.lock();
        loop {
            if s.failed.is_some() {
                drop(s);
                return self.shared.check().map(|()| None);
            }
            if s.pending.as_ref().is_some_and(|p| p.version.0 >= version) {
                return Ok(s.pending.take());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            s = self.shared.changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.close();
    }
}

#[cfg(test)]
mod tests;
