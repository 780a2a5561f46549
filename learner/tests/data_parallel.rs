//! Data-parallel learner ranks (threads joined by the in-process collective):
//! W ranks on the same groups take the updates one learner takes on all of
//! them, and stay equal to each other.

mod common;

use common::*;
use prism_learner::collective::Local;
use prism_learner::{Config, Learner, TrainReport};
use std::time::Duration;

/// Every option whose arithmetic the sharding touches: importance-weight
/// scoring (prox log-probs), the KL reference, PPO epochs with shuffled
/// mini-batches, micro-batching, clipping, weight decay and TP-GRPO.
fn config() -> Config {
    Config {
        advantage: prism_learner::config::Estimator::TpGrpo,
        aggregation: prism_learner::config::Aggregation::SeqMeanTokenSumNorm,
        loss_norm_len: 8,
        kl_coef: 0.05,
        entropy_coef: 0.01,
        is_cap: 2.0,
        ppo_epochs: 2,
        mini_batches: 3,
        micro_batch_size: 2,
        lr: 0.05,
        grad_clip: 0.5,
        weight_decay: 0.01,
        ..Config::default()
    }
}

/// Three steps of one learner alone.
fn alone(config: &Config, steps: &[Vec<Vec<prism_core::LabeledTrajectory>>]) -> (Vec<(String, Vec<f32>)>, Vec<TrainReport>) {
    let mut learner = Learner::new(config.clone(), TinyLm::new(7), Some(TinyLm::new(7)), 11).unwrap();
    let reports = steps.iter().map(|g| learner.train_step(g).unwrap()).collect();
    (learner.policy().weights(), reports)
}

/// `f(rank, collective)` on a thread per rank of a `Local` group; the results in rank order.
fn on_ranks<T: Send>(world: usize, timeout: Duration, f: impl Fn(usize, Local) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = Local::group(world, timeout).into_iter().enumerate().map(|(rank, c)| s.spawn(move || f(rank, c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The same steps on `world` ranks. Only rank 0 starts from the right model,
/// reference and seed: joining must hand them to the others.
fn ranks(config: &Config, world: usize, steps: &[Vec<Vec<prism_core::LabeledTrajectory>>]) -> Vec<(Vec<(String, Vec<f32>)>, Vec<TrainReport>)> {
    on_ranks(world, Duration::from_secs(60), |rank, collective| {
        let (model, reference, seed) = if rank == 0 { (7, 7, 11) } else { (100 + rank as u64, 50, 99) };
        let mut learner = Learner::new(config.clone(), TinyLm::new(model), Some(TinyLm::new(reference)), seed).unwrap();
        learner.join_data_parallel(Box::new(collective)).unwrap();
        assert_eq!(learner.rank(), (rank, world));
        let reports = steps.iter().map(|g| learner.train_step(g).unwrap()).collect();
        (learner.policy().weights(), reports)
    })
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-6)
}

#[test]
fn data_parallel_ranks_take_the_single_learners_updates() {
    let config = config();
    // 13 rows per step over 3 mini-batches: shares of 2 and 1 rows on 3 ranks,
    // and on 5 ranks some ranks have nothing to do in some updates.
    let steps: Vec<_> = (0..3).map(|s| groups(40 + s, 3, 4).into_iter().chain(groups(70 + s, 1, 1)).collect()).collect();
    let (want, want_reports) = alone(&config, &steps);
    let initial = TinyLm::new(7).weights();
    let moved = max_diff(&want, &initial);
    assert!(moved > 1e-2, "training must move the weights ({moved})");
    for world in [2, 3, 5] {
        let out = ranks(&config, world, &steps);
        for (rank, (weights, reports)) in out.iter().enumerate() {
            // Every rank holds the same weights, bit for bit.
            assert_eq!(max_diff(weights, &out[0].0), 0.0, "world {world}: rank {rank} departs from rank 0");
            // ... which are the single learner's, up to the order of summation.
            let d = max_diff(weights, &want);
            eprintln!("world {world} rank {rank}: weights moved {moved}, differ from one learner's by {d}");
            assert!(d <= 1e-5, "world {world}: rank {rank} differs from one learner by {d}");
            // The statistics are the whole update's on every rank.
            for (got, want) in reports.iter().zip(&want_reports) {
                assert_eq!(got.sequences, want.sequences);
                assert_eq!(got.updates.len(), want.updates.len());
                for (g, w) in got.updates.iter().zip(&want.updates) {
                    assert_eq!((g.tokens, g.sequences, g.update, g.epoch), (w.tokens, w.sequences, w.update, w.epoch));
                    for (name, g, w) in [
                        ("loss", g.loss, w.loss),
                        ("grad_norm", g.grad_norm, w.grad_norm),
                        ("entropy", g.entropy, w.entropy),
                        ("approx_kl", g.approx_kl, w.approx_kl),
                        ("kl_ref", g.kl_ref, w.kl_ref),
                        ("ratio_max", g.ratio_max, w.ratio_max),
                        ("is_weight_mean", g.is_weight_mean, w.is_weight_mean),
                        ("clip_frac_high", g.clip_frac_high, w.clip_frac_high),
                    ] {
                        assert!(relative(g, w) < 1e-4 || (g - w).abs() < 1e-7, "world {world} rank {rank}: {name} {g} vs {w}");
                    }
                }
            }
        }
    }
}

#[test]
fn ranks_with_different_models_are_refused_by_name() {
    let errors = on_ranks(2, Duration::from_secs(2), |rank, collective| {
        // Rank 1 has no reference model: fewer tensors.
        let reference = (rank == 0).then(|| TinyLm::new(7));
        let config = Config { kl_coef: if rank == 0 { 0.05 } else { 0.0 }, ..config() };
        let mut learner = Learner::new(config, TinyLm::new(7), reference, 0).unwrap();
        learner.join_data_parallel(Box::new(collective)).unwrap_err().to_string()
    });
    // Rank 1 says why; rank 0, left alone in the next collective, times out
    // with the missing rank named instead of hanging.
    assert!(errors[1].contains("learner rank 1 holds") && errors[1].contains("same model"), "{}", errors[1]);
    assert!(errors[0].contains("rank 0/2") && errors[0].contains("did not join: [1]"), "{}", errors[0]);
}

#[test]
fn ranks_with_different_learner_settings_are_refused() {
    let errors = on_ranks(2, Duration::from_secs(2), |rank, collective| {
        let config = Config { lr: if rank == 0 { 0.05 } else { 0.01 }, ..config() };
        let mut learner = Learner::new(config, TinyLm::new(7), Some(TinyLm::new(7)), 0).unwrap();
        learner.join_data_parallel(Box::new(collective)).unwrap_err().to_string()
    });
    assert!(errors[1].contains("rank 1: its [learner] settings differ from rank 0's"), "{}", errors[1]);
}
