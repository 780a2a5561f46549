//! The broadcast protocol between the learner's Sender and rollout Receivers,
//! over the in-process collective (ranks as threads, every call bounded by a
//! timeout): NCCL itself needs one GPU per rank and is checked by
//! scripts/gpu-check.

use super::*;
use prism_learner::collective::Local;
use crate::testing::{weight_layout as layout_of, weight_set as weights, weight_tensor as value};
use std::time::Instant;

/// Joins as `rank` of an in-process collective.
fn join(rank: Local) -> Join {
    Box::new(move || Ok(Box::new(rank) as Box<dyn Collective>))
}

/// `world` ranks of one process, failing a call after `timeout`.
fn hub(world: usize, timeout: Duration) -> std::vec::IntoIter<Local> {
    Local::group(world, timeout).into_iter()
}

#[test]
fn every_rank_receives_the_newest_published_version() {
    let mut hub = hub(3, Duration::from_secs(10));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    let receivers: Vec<Receiver> = hub.map(|r| Receiver::spawn(join(r), layout_of(&weights(0)), Device::Cpu).unwrap()).collect();
    // The first version goes out as soon as every rank is there.
    sender.publish(weights(1)).unwrap();
    for r in &receivers {
        let got = r.wait_for(1, Duration::from_secs(10)).unwrap().expect("v1 arrives");
        assert_eq!(got.version.0, 1);
        assert_eq!(value(&got, "model.b"), Tensor::full([3, 4], 1.0, (Kind::Float, Device::Cpu)));
        assert_eq!(value(&got, "model.a"), Tensor::arange(5, (Kind::Int64, Device::Cpu)) + 1);
    }
    // Versions published faster than they are broadcast: the newest wins,
    // and ranks join one broadcast per announcement of something newer.
    for v in 2..=6 {
        sender.publish(weights(v)).unwrap();
        for r in &receivers {
            r.announce(v);
        }
    }
    assert!(sender.wait_broadcast(6, Duration::from_secs(10)).unwrap(), "v6 broadcast");
    for r in &receivers {
        let got = r.wait_for(6, Duration::from_secs(10)).unwrap().expect("v6 arrives");
        assert_eq!(value(&got, "model.b"), Tensor::full([3, 4], 6.0, (Kind::Float, Device::Cpu)));
        assert!(r.wait_for(7, Duration::ZERO).unwrap().is_none(), "nothing newer staged");
    }
}

#[test]
fn a_rollout_with_another_model_fails_naming_the_difference_and_the_learner_times_out() {
    let mut hub = hub(2, Duration::from_millis(300));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    let mut other = layout_of(&weights(0));
    other[0].1 = vec![6]; // model.a: 6 elements, not 5
    let receiver = Receiver::spawn(join(hub.next().unwrap()), other, Device::Cpu).unwrap();
    sender.publish(weights(1)).unwrap();
    let err = receiver.wait_for(1, Duration::from_secs(10)).err().expect("the header does not match").to_string();
    assert!(err.contains("the learner broadcasts 2 tensors of 88 bytes, this rollout's model has 2 of 96"), "{err}");
    // The learner's payload broadcast has no one to meet: it fails within the
    // timeout, and the next publish says so, naming rank and operation.
    let start = Instant::now();
    while sender.publish(weights(2)).is_ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "the sender never failed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = sender.publish(weights(3)).err().unwrap().to_string();
    assert!(err.contains("rank 0/2: broadcast from rank 0 failed: not every rank joined within 300 ms"), "{err}");
}

#[test]
fn a_rollout_that_never_joins_fails_the_learner_within_the_timeout() {
    let mut hub = hub(2, Duration::from_millis(200));
    let sender = Sender::spawn(join(hub.next().unwrap())).unwrap();
    sender.publish(weights(1)).unwrap();
    let start = Instant::now();
    let err = loop {
        match sender.wait_broadcast(1, Duration::from_millis(50)) {
            Err(e) => break e.to_string(),
            Ok(done) => assert!(!done && start.elapsed() < Duration::from_secs(10), "no rank joined, yet v1 counted as sent"),
        }
    };
    assert!(err.contains("rank 0/2") && err.contains("within 200 ms (ranks that did not join: [1])"), "{err}");
}

#[test]
fn the_signature_tells_names_shapes_and_dtypes_apart() {
    let base = layout_of(&weights(0));
    let mut renamed = base.clone();
    renamed[0].0 = "model.c".into();
    let mut retyped = base.clone();
    retyped[0].2 = Kind::Double; // same bytes as int64
    let (n, b, s) = describe(&base);
    for other in [renamed, retyped] {
        let (n2, b2, s2) = describe(&other);
        assert_eq!((n, b), (n2, b2));
        assert_ne!(s, s2);
    }
}
