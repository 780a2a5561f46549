//! Data-parallel learner ranks: what a [`crate::Learner`] needs from the
//! collective that connects it to the other ranks.
//!
//! On GPUs that is an NCCL communicator (prism-actors' `dist::nccl`, one rank
//! per learner process); [`Local`] connects ranks that are threads of one
//! process (tests, and anything that wants several learners without NCCL).
//!
//! Every rank makes the same calls in the same order with tensors of the same
//! shapes; a collective that cannot complete (a rank is gone, or called
//! something else) fails with an error naming the rank and the operation.

use crate::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// The ranks a learner trains with. Rank 0 owns the run (it checkpoints,
/// evaluates and publishes weights); every rank holds the same weights.
pub trait Collective: Send {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Sums `tensors` (contiguous) over every rank, in place; every rank ends
    /// with the same values.
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()>;
    /// Copies rank `root`'s `tensors` (contiguous) into every rank's, in place.
    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()>;
    /// Sums `input` (contiguous, `world × n` elements) over every rank and
    /// writes this rank's share of the sum — elements `rank·n .. (rank+1)·n` —
    /// into `output` (`n` elements): ZeRO's gradient reduce-scatter.
    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()>;
    /// Writes every rank's `input` (`n` elements), in rank order, into
    /// `output` (`world × n` elements) on every rank: ZeRO's parameter
    /// all-gather.
    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()>;
}

/// Checks the element counts of a reduce-scatter or all-gather over `world`
/// ranks: `whole` must hold `world` times `share`, with checked arithmetic.
pub fn check_shares(world: usize, whole: &Tensor, share: &Tensor) -> std::result::Result<(), String> {
    let want = share.numel().checked_mul(world);
    if want != Some(whole.numel()) {
        return Err(format!(
            "the whole has {} elements but {world} shares of {} make {}",
            whole.numel(),
            share.numel(),
            want.map_or("more than fits".to_string(), |w| w.to_string())
        ));
    }
    if whole.kind() != share.kind() {
        return Err(format!("the whole is {:?} but the share {:?}", whole.kind(), share.kind()));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Op {
    Sum,
    Broadcast(usize),
    ReduceScatter,
    AllGather,
}

impl Op {
    fn name(self) -> String {
        match self {
            Op::Sum => "all-reduce (sum)".into(),
            Op::Broadcast(root) => format!("broadcast from rank {root}"),
            Op::ReduceScatter => "reduce-scatter (sum)".into(),
            Op::AllGather => "all-gather".into(),
        }
    }
}

/// One collective call in progress: the ranks' contributions, then the result
/// every rank copies out.
#[derive(Default)]
struct Round {
    op: Option<Op>,
    arrived: Vec<Option<Vec<Tensor>>>,
    count: usize,
    result: Option<Vec<Tensor>>,
    taken: usize,
    /// Once a call failed (a timeout, a mismatch), every later one fails.
    failed: Option<String>,
}

struct Hub {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    changed: Condvar,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An in-process collective: rank `r` of [`Local::group`] is meant for the
/// thread that trains as rank `r`. Sums are taken in rank order, so every
/// rank gets bit-identical results.
pub struct Local {
    hub: Arc<Hub>,
    rank: usize,
}

impl Local {
    /// `world` connected ranks; a call that not every rank joins within
    /// `timeout` fails on every rank.
    pub fn group(world: usize, timeout: Duration) -> Vec<Local> {
        let hub = Arc::new(Hub { world, timeout, round: Mutex::new(Round::default()), changed: Condvar::new() });
        (0..world).map(|rank| Local { hub: hub.clone(), rank }).collect()
    }

    fn fail(&self, op: Op, reason: String) -> Error {
        Error::Collective(format!("rank {}/{}: {} failed: {reason}", self.rank, self.hub.world, op.name()))
    }

    /// Waits on the hub until `ready`, a failure, or the deadline.
    fn wait<'a>(&self, mut r: MutexGuard<'a, Round>, op: Op, deadline: Instant, what: &str, ready: impl Fn(&Round) -> bool) -> Result<MutexGuard<'a, Round>> {
        loop {
            if let Some(reason) = &r.failed {
                return Err(self.fail(op, reason.clone()));
            }
            if ready(&r) {
                return Ok(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> = (0..self.hub.world).filter(|&i| r.arrived.get(i).is_none_or(Option::is_none)).collect();
                let reason = format!("{what} within {} ms (ranks that did not join: {missing:?})", self.hub.timeout.as_millis());
                r.failed = Some(format!("rank {} timed out: {reason}", self.rank));
                self.hub.changed.notify_all();
                return Err(self.fail(op, reason));
            }
            r = self.hub.changed.wait_timeout(r, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// One collective: every rank's `tensors` go in; each rank's `outputs`
    /// (the same tensors for the in-place collectives) receive the result, or
    /// this rank's share of it for a reduce-scatter.
    fn run(&self, op: Op, tensors: &[Tensor], outputs: &[Tensor]) -> Result<()> {
        let hub = &*self.hub;
        let deadline = Instant::now() + hub.timeout;
        let _guard = tch::no_grad_guard();
        // The previous round must be collected by every rank first.
        let mut r = self.wait(hub.lock(), op, deadline, "the previous call did not finish", |r| r.result.is_none())?;
        match r.op {
            None => {
                r.op = Some(op);
                r.arrived = (0..hub.world).map(|_| None).collect();
            }
            Some(other) if other != op => {
                let reason = format!("rank {} called {} while another rank called {}", self.rank, op.name(), other.name());
                r.failed = Some(reason.clone());
                hub.changed.notify_all();
                return Err(self.fail(op, reason));
            }
            Some(_) => {}
        }
        let copies = tensors.iter().map(|t| t.detach().copy()).collect();
        r.arrived[self.rank] = Some(copies);
        r.count += 1;
        if r.count == hub.world {
            let result = match combine(op, &mut r.arrived) {
                Ok(result) => result,
                Err(reason) => {
                    r.failed = Some(reason.clone());
                    hub.changed.notify_all();
                    return Err(self.fail(op, reason));
                }
            };
            r.result = Some(result);
            hub.changed.notify_all();
        }
        let r = &mut *self.wait(r, op, deadline, "not every rank joined", |r| r.result.is_some())?;
        let result = r.result.as_ref().expect("checked by wait");
        for (dst, src) in outputs.iter().zip(result) {
            let src = match op {
                Op::ReduceScatter => {
                    let n = dst.numel() as i64;
                    src.flatten(0, -1).narrow(0, self.rank as i64 * n, n).view_as(dst)
                }
                Op::AllGather => src.view_as(dst),
                _ => src.shallow_clone(),
            };
            dst.shallow_clone().f_copy_(&src)?;
        }
        r.taken += 1;
        if r.taken == hub.world {
            *r = Round { failed: r.failed.take(), ..Round::default() };
            hub.changed.notify_all();
        }
        Ok(())
    }
}

/// The result of a round every rank has joined.
fn combine(op: Op, arrived: &mut [Option<Vec<Tensor>>]) -> std::result::Result<Vec<Tensor>, String> {
    let mut ranks = arrived.iter_mut().map(|a| a.take().unwrap_or_default());
    let first = ranks.next().unwrap_or_default();
    let shapes = |ts: &[Tensor]| ts.iter().map(|t| (t.size(), t.kind())).collect::<Vec<_>>();
    let want = shapes(&first);
    let mut all = vec![first];
    for (i, ts) in ranks.enumerate() {
        if shapes(&ts) != want {
            return Err(format!("rank {} passed tensors of other shapes or dtypes than rank 0", i + 1));
        }
        all.push(ts);
    }
    Ok(match op {
        Op::Broadcast(root) => all.swap_remove(root.min(all.len() - 1)),
        // Rank order: rank 0's elements first.
        Op::AllGather => {
            let parts: Vec<Tensor> = all.iter().map(|ts| ts[0].flatten(0, -1)).collect();
            vec![Tensor::cat(&parts, 0)]
        }
        Op::Sum | Op::ReduceScatter => {
            let mut sum = all.remove(0);
            for ts in &all {
                for (s, t) in sum.iter_mut().zip(ts) {
                    *s += t;
                }
            }
            sum
        }
    })
}

impl Collective for Local {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.hub.world
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<()> {
        self.run(Op::Sum, tensors, tensors)
    }

    fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if root >= self.hub.world {
            return Err(self.fail(Op::Broadcast(root), "no such root".into()));
        }
        self.run(Op::Broadcast(root), tensors, tensors)
    }

    fn reduce_scatter_sum(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        check_shares(self.hub.world, input, output).map_err(|reason| self.fail(Op::ReduceScatter, reason))?;
        self.run(Op::ReduceScatter, std::slice::from_ref(input), std::slice::from_ref(output))
    }

    fn all_gather(&self, input: &Tensor, output: &Tensor) -> Result<()> {
        check_shares(self.hub.world, output, input).map_err(|reason| self.fail(Op::AllGather, reason))?;
        self.run(Op::AllGather, std::slice::from_ref(input), std::slice::from_ref(output))
    }
}

/// Tensor count, bytes and an FNV-1a hash of every `(name, shape, dtype)`:
/// what ranks compare before a collective over a whole model, so that ranks
/// holding different models fail with a message instead of exchanging garbage.
pub fn describe<'a>(tensors: impl IntoIterator<Item = (&'a str, Vec<i64>, Kind)>) -> (i64, i64, i64) {
    let (mut count, mut bytes, mut hash) = (0i64, 0i64, 0xcbf2_9ce4_8422_2325u64);
    for (name, shape, kind) in tensors {
        count += 1;
        bytes += shape.iter().product::<i64>() * kind.elt_size_in_bytes() as i64;
        for b in format!("{name}:{shape:?}:{kind:?};").bytes() {
            hash = (hash ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    (count, bytes, hash as i64)
}

/// The contiguous share of `0..n` that `rank` of `world` takes: the first
/// `n % world` ranks take one more than the others.
pub fn shard(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    rank * n / world..(rank + 1) * n / world
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_ranks_sum_and_broadcast_alike() {
        let ranks = Local::group(3, Duration::from_secs(10));
        let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let a = Tensor::from_slice(&[r, 10.0 * r]);
                        let b = Tensor::from_slice(&[r + 100.0]);
                        // Two rounds in a row: the second must not see the first's data.
                        c.all_reduce_sum(std::slice::from_ref(&a)).unwrap();
                        c.broadcast(std::slice::from_ref(&b), 2).unwrap();
                        (Vec::<f32>::try_from(&a).unwrap(), Vec::<f32>::try_from(&b).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in out {
            assert_eq!(a, vec![3.0, 30.0]);
            assert_eq!(b, vec![102.0]);
        }
    }

    /// ZeRO's two collectives on 1, 2, 3 and 5 ranks: each rank's share of
    /// the sum, in rank order, and every rank's share gathered back whole;
    /// shares of one element and of none (an empty tensor) too.
    #[test]
    fn local_ranks_reduce_scatter_and_all_gather() {
        for (world, n) in [(1, 3), (2, 4), (3, 1), (5, 2), (3, 0)] {
            let ranks = Local::group(world, Duration::from_secs(10));
            let out: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
                let handles: Vec<_> = ranks
                    .iter()
                    .map(|c| {
                        s.spawn(move || {
                            let r = c.rank() as f64;
                            // Rank r contributes 1000 r + i at element i (sums exact in f64).
                            let input = Tensor::arange((world * n) as i64, (Kind::Double, tch::Device::Cpu)) + 1000.0 * r;
                            let share = Tensor::zeros([n as i64], (Kind::Double, tch::Device::Cpu));
                            c.reduce_scatter_sum(&input, &share).unwrap();
                            let whole = Tensor::zeros([(world * n) as i64], (Kind::Double, tch::Device::Cpu));
                            c.all_gather(&(&share * (r + 1.0)), &whole).unwrap();
                            (Vec::<f64>::try_from(&share).unwrap(), Vec::<f64>::try_from(&whole).unwrap())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let ranks_sum: f64 = (0..world).map(|r| r as f64).sum();
            let sum = |i: usize| world as f64 * i as f64 + 1000.0 * ranks_sum;
            let gathered: Vec<f64> = (0..world).flat_map(|r| (r * n..(r + 1) * n).map(move |i| sum(i) * (r + 1) as f64)).collect();
            for (rank, (share, whole)) in out.into_iter().enumerate() {
                let want: Vec<f64> = (rank * n..(rank + 1) * n).map(sum).collect();
                assert_eq!(share, want, "world {world}, rank {rank}: reduce-scatter share");
                assert_eq!(whole, gathered, "world {world}, rank {rank}: all-gather");
            }
        }
    }

    #[test]
    fn shares_that_do_not_add_up_are_refused_by_name() {
        let ranks = Local::group(2, Duration::from_secs(1));
        let e = ranks[0].reduce_scatter_sum(&Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)), &Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)));
        let e = e.unwrap_err().to_string();
        assert!(e.contains("reduce-scatter") && e.contains("5 elements") && e.contains("2 shares of 2 make 4"), "{e}");
        let e = ranks[1].all_gather(&Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)), &Tensor::zeros([4], (Kind::Double, tch::Device::Cpu)));
        assert!(e.unwrap_err().to_string().contains("all-gather"));
    }

    #[test]
    fn a_rank_that_never_joins_fails_the_others_with_its_rank_named() {
        let ranks = Local::group(2, Duration::from_millis(200));
        let t = Tensor::from_slice(&[1.0f32]);
        let e = ranks[0].all_reduce_sum(&[t]).unwrap_err().to_string();
        assert!(e.contains("rank 0/2") && e.contains("all-reduce") && e.contains("did not join: [1]"), "{e}");
        // The group stays failed: a late rank does not hang either.
        let e = ranks[1].all_reduce_sum(&[Tensor::from_slice(&[1.0f32])]).unwrap_err().to_string();
        assert!(e.contains("timed out"), "{e}");
    }

    #[test]
    fn ranks_that_call_different_collectives_fail() {
        let ranks = Local::group(2, Duration::from_secs(5));
        let errors: Vec<String> = std::thread::scope(|s| {
            let a = s.spawn(|| ranks[0].all_reduce_sum(&[Tensor::from_slice(&[1.0f32])]).unwrap_err().to_string());
            let b = s.spawn(|| ranks[1].broadcast(&[Tensor::from_slice(&[1.0f32])], 0).unwrap_err().to_string());
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        for e in errors {
            assert!(e.contains("while another rank called"), "{e}");
        }
    }

    #[test]
    fn shards_cover_every_index_once() {
        for n in 0..9 {
            for world in 1..5 {
                let all: Vec<usize> = (0..world).flat_map(|r| shard(n, r, world)).collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
            }
        }
    }
}
