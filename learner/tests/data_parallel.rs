//! Data-parallel learner ranks (threads joined by the in-process collective):
//! W ranks on the same groups take the updates one learner takes on all of
//! them, and stay equal to each other.

mod common;

use common::*;
use prism_learner::collective::Local;
use prism_learner::optim::sharded::{Sharding, Stage};
use prism_learner::{CheckpointMeta, Config, Learner, TrainReport};
use std::path::Path;
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

/// Three steps of one learner alone, on the models `make` gives (float32 or bf16).
fn alone(make: fn(u64) -> TinyLm, config: &Config, steps: &[Vec<Vec<prism_core::LabeledTrajectory>>]) -> (Vec<(String, Vec<f32>)>, Vec<TrainReport>) {
    let mut learner = Learner::new(config.clone(), make(7), Some(make(7)), 11).unwrap();
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
        learner.join_data_parallel(Box::new(collective), None).unwrap();
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
    let (want, want_reports) = alone(TinyLm::new, &config, &steps);
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
        learner.join_data_parallel(Box::new(collective), None).unwrap_err().to_string()
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
        learner.join_data_parallel(Box::new(collective), None).unwrap_err().to_string()
    });
    assert!(errors[1].contains("rank 1: its [learner] settings differ from rank 0's"), "{}", errors[1]);
}

fn sharding(stage: Stage, bucket_bytes: usize) -> Option<Sharding> {
    Some(Sharding { stage, bucket_bytes })
}

/// `steps` on `world` ranks sharding the optimizer as `sharding`, on the
/// models `make` gives (only rank 0 starts from the right model, or resumes
/// from `resume`); after
/// `checkpoint_after` steps, the ranks write a checkpoint into `save`.
fn sharded_ranks(
    make: fn(u64) -> TinyLm,
    config: &Config,
    world: usize,
    sharding: Option<Sharding>,
    steps: &[Vec<Vec<prism_core::LabeledTrajectory>>],
    resume: Option<&Path>,
    save: Option<(&Path, usize)>,
) -> Vec<(Vec<(String, Vec<f32>)>, Vec<TrainReport>)> {
    on_ranks(world, Duration::from_secs(60), |rank, collective| {
        let (model, reference, seed) = if rank == 0 { (7, 7, 11) } else { (100 + rank as u64, 50, 99) };
        let mut learner = Learner::new(config.clone(), make(model), Some(make(reference)), seed).unwrap();
        if let (0, Some(dir)) = (rank, resume) {
            learner.resume(dir).unwrap().expect("a checkpoint");
        }
        learner.join_data_parallel(Box::new(collective), sharding).unwrap();
        let mut reports = Vec::new();
        for (i, g) in steps.iter().enumerate() {
            reports.push(learner.train_step(g).unwrap());
            if let Some((dir, after)) = save
                && i + 1 == after
            {
                let meta = CheckpointMeta { step: after as u64, policy_version: after as u64, data_cursor: serde_json::json!({}), config_hash: "h".into() };
                if rank == 0 {
                    learner.save_checkpoint(dir, &meta).unwrap();
                } else {
                    let e = learner.save_checkpoint(dir, &meta).unwrap_err().to_string();
                    assert!(e.contains("send_checkpoint_shares"), "{e}");
                    learner.send_checkpoint_shares().unwrap();
                }
            }
        }
        (learner.policy().weights(), reports)
    })
}

fn steps_of(seed: u64, n: u64) -> Vec<Vec<Vec<prism_core::LabeledTrajectory>>> {
    (0..n).map(|s| groups(seed + s, 3, 4).into_iter().chain(groups(seed + 30 + s, 1, 1)).collect()).collect()
}

/// Ranks that shard the optimizer (ZeRO-1) or the gradients too (ZeRO-2),
/// in one bucket or in buckets of 256 bytes (64 elements: the embedding
/// alone is two of them), take one learner's updates, with its statistics.
#[test]
fn sharded_ranks_take_the_single_learners_updates() {
    let config = config();
    let steps = steps_of(40, 3);
    let (want, want_reports) = alone(TinyLm::new, &config, &steps);
    for world in [2, 3, 5] {
        for stage in [Stage::Optimizer, Stage::Gradients] {
            for bucket_bytes in [256, 64 << 20] {
                let out = sharded_ranks(TinyLm::new, &config, world, sharding(stage, bucket_bytes), &steps, None, None);
                for (rank, (weights, reports)) in out.iter().enumerate() {
                    let at = format!("world {world}, {stage:?}, buckets of {bucket_bytes} B, rank {rank}");
                    assert_eq!(max_diff(weights, &out[0].0), 0.0, "{at}: departs from rank 0");
                    let d = max_diff(weights, &want);
                    assert!(d <= 1e-5, "{at}: differs from one learner by {d}");
                    for (got, want) in reports.iter().zip(&want_reports) {
                        for (g, w) in got.updates.iter().zip(&want.updates) {
                            assert_eq!((g.tokens, g.sequences, g.update, g.skipped), (w.tokens, w.sequences, w.update, w.skipped), "{at}");
                            for (name, g, w) in [("loss", g.loss, w.loss), ("grad_norm", g.grad_norm, w.grad_norm), ("lr", g.lr, w.lr)] {
                                assert!(relative(g, w) < 1e-4 || (g - w).abs() < 1e-7, "{at}: {name} {g} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A checkpoint of 3 sharded ranks holds one optimizer file per rank; 3
/// ranks resuming from it end bit for bit where the ranks that went on
/// ended; 2 ranks, or one learner alone, resume from it too (the shares put
/// back together) and end there up to the order of summation.
#[test]
fn sharded_checkpoints_resume_exactly_and_with_other_rank_counts() {
    let config = config();
    let steps = steps_of(60, 4);
    let dir = tempfile::tempdir().unwrap();
    let through = sharded_ranks(TinyLm::new, &config, 3, sharding(Stage::Gradients, 256), &steps, None, Some((dir.path(), 2)));
    let folder = dir.path().join("step-00000002");
    let mut files: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert!(files.iter().filter(|f| f.starts_with("optimizer-")).eq(["optimizer-00000-of-00003.safetensors", "optimizer-00001-of-00003.safetensors", "optimizer-00002-of-00003.safetensors"].iter()), "{files:?}");
    assert!(!files.contains(&"optimizer.safetensors".to_string()), "{files:?}");

    let resumed = sharded_ranks(TinyLm::new, &config, 3, sharding(Stage::Gradients, 256), &steps[2..], Some(dir.path()), None);
    for (rank, (weights, _)) in resumed.iter().enumerate() {
        assert_eq!(max_diff(weights, &through[0].0), 0.0, "3 ranks resumed: rank {rank} is not bit-identical");
    }
    let fewer = sharded_ranks(TinyLm::new, &config, 2, sharding(Stage::Optimizer, 1 << 20), &steps[2..], Some(dir.path()), None);
    let d = max_diff(&fewer[0].0, &through[0].0);
    assert!(d <= 1e-5, "2 ranks resumed differ by {d}");
    let mut alone = Learner::new(config.clone(), TinyLm::new(1), Some(TinyLm::new(7)), 0).unwrap();
    alone.resume(dir.path()).unwrap().unwrap();
    for g in &steps[2..] {
        alone.train_step(g).unwrap();
    }
    let d = max_diff(&alone.policy().weights(), &through[0].0);
    assert!(d <= 1e-5, "one learner resumed differs by {d}");
    // Without the moments (a checkpoint missing a rank's file) it is refused by name.
    std::fs::remove_file(folder.join("optimizer-00001-of-00003.safetensors")).unwrap();
    let mut learner = Learner::new(config.clone(), TinyLm::new(7), Some(TinyLm::new(7)), 0).unwrap();
    let e = learner.resume(dir.path()).unwrap_err().to_string();
    assert!(e.contains("optimizer-00001-of-00003.safetensors"), "{e}");
}

/// Ranks that disagree on sharding are refused when they join.
#[test]
fn ranks_with_different_sharding_are_refused() {
    let errors = on_ranks(2, Duration::from_secs(2), |rank, collective| {
        let mut learner = Learner::new(config(), TinyLm::new(7), Some(TinyLm::new(7)), 0).unwrap();
        let s = if rank == 0 { sharding(Stage::Gradients, 1024) } else { sharding(Stage::Optimizer, 1024) };
        learner.join_data_parallel(Box::new(collective), s).map(|_| ()).unwrap_err().to_string()
    });
    assert!(errors[1].contains("rank 1: its sharding") && errors[1].contains("dist.shard"), "{}", errors[1]);
}

/// The float32 master weights of a checkpoint's optimizer state, by
/// parameter in name order: `master.<param>` of one learner's file, or the
/// `master` shares of `world` sharded ranks' files put back together.
fn checkpoint_masters(folder: &Path, world: Option<usize>) -> Vec<Vec<f32>> {
    use prism_learner::policy::read_safetensors;
    let flat = |t: &tch::Tensor| Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap();
    let model = TinyLm::bf16(7);
    let names: Vec<String> = prism_learner::policy::named_variables(prism_learner::Policy::var_store(&model)).into_iter().map(|(n, _)| n).collect();
    match world {
        None => {
            let mut t = read_safetensors(&folder.join("optimizer.safetensors")).unwrap();
            names.iter().map(|n| flat(&t.remove(&format!("master.{n}")).expect("a master per parameter"))).collect()
        }
        Some(world) => {
            let shares: Vec<tch::Tensor> = (0..world)
                .map(|r| read_safetensors(&folder.join(format!("optimizer-{r:05}-of-{world:05}.safetensors"))).unwrap().remove("master").expect("a master share"))
                .collect();
            let layout = prism_learner::optim::sharded::Layout::new(prism_learner::Policy::var_store(&model), world, 256, prism_learner::optim::sharded::Order::Layers).unwrap();
            layout.whole_of(&shares).unwrap().iter().map(flat).collect()
        }
    }
}

fn mean_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (sum, n) = a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y)).fold((0.0, 0usize), |(s, n), (x, y)| (s + f64::from((x - y).abs()), n + 1));
    sum / n.max(1) as f64
}

/// A bf16 model on sharded ranks keeps float32 master weights for its
/// share only (the bf16 values are all-gathered): at a learning rate whose
/// updates are under bf16's spacing, the ranks' masters, put back together
/// from a checkpoint, are one bf16 learner's masters up to the order the
/// gradients are summed in (one learner adds every micro-batch's in bf16;
/// the ranks add their sums in float32): within 1 % of how far training
/// moved them. The ranks stay equal to each other; 3 ranks resume bit for
/// bit, and one learner resumes from their checkpoint.
#[test]
fn a_bf16_model_on_sharded_ranks_keeps_float32_masters_per_share() {
    let config = Config { lr: 2e-4, ..config() };
    let steps = steps_of(80, 4);
    let meta = CheckpointMeta { step: 4, policy_version: 4, data_cursor: serde_json::json!({}), config_hash: "h".into() };
    let one = tempfile::tempdir().unwrap();
    let mut alone = Learner::new(config.clone(), TinyLm::bf16(7), Some(TinyLm::bf16(7)), 11).unwrap();
    for g in &steps {
        alone.train_step(g).unwrap();
    }
    alone.save_checkpoint(one.path(), &meta).unwrap();
    let want = checkpoint_masters(&one.path().join("step-00000004"), None);
    let start: Vec<Vec<f32>> = TinyLm::bf16(7).weights().into_iter().map(|(_, v)| v).collect();
    let moved = mean_abs(&want, &start);
    for world in [2, 3] {
        for stage in [Stage::Optimizer, Stage::Gradients] {
            let dir = tempfile::tempdir().unwrap();
            let out = sharded_ranks(TinyLm::bf16, &config, world, sharding(stage, 256), &steps, None, Some((dir.path(), 4)));
            let at = format!("world {world}, {stage:?}");
            for (rank, (weights, _)) in out.iter().enumerate() {
                assert_eq!(max_diff(weights, &out[0].0), 0.0, "{at}: rank {rank} departs from rank 0");
            }
            let got = checkpoint_masters(&dir.path().join("step-00000004"), Some(world));
            let d = mean_abs(&got, &want);
            assert!(d <= 0.01 * moved, "{at}: the masters differ from one bf16 learner's by {d} on average; training moved them {moved}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let through = sharded_ranks(TinyLm::bf16, &config, 3, sharding(Stage::Gradients, 256), &steps, None, Some((dir.path(), 2)));
    let resumed = sharded_ranks(TinyLm::bf16, &config, 3, sharding(Stage::Gradients, 256), &steps[2..], Some(dir.path()), None);
    for (rank, (weights, _)) in resumed.iter().enumerate() {
        assert_eq!(max_diff(weights, &through[0].0), 0.0, "3 bf16 ranks resumed: rank {rank} is not bit-identical");
    }
    let mut alone = Learner::new(config.clone(), TinyLm::bf16(1), Some(TinyLm::bf16(7)), 0).unwrap();
    alone.resume(dir.path()).unwrap().unwrap();
    for g in &steps[2..] {
        alone.train_step(g).unwrap();
    }
    alone.save_checkpoint(one.path(), &CheckpointMeta { step: 5, ..meta }).unwrap();
    let resumed_alone = checkpoint_masters(&one.path().join("step-00000005"), None);
    let through_dir = tempfile::tempdir().unwrap();
    sharded_ranks(TinyLm::bf16, &config, 3, sharding(Stage::Gradients, 256), &steps, None, Some((through_dir.path(), 4)));
    let d = mean_abs(&resumed_alone, &checkpoint_masters(&through_dir.path().join("step-00000004"), Some(3)));
    assert!(d <= 0.01 * moved, "one bf16 learner resumed from 3 ranks' checkpoint: its masters differ by {d} on average (moved {moved})");
}

/// ZeRO-2 with the layers recomputed streams the gradients: each decoder
/// layer's are handed to the optimizer as the backward pass makes them and
/// reduce-scattered bucket by bucket, so no layer's gradient ever reaches
/// `.grad` and a rank holds at most one layer's and one bucket's waiting.
/// On 2, 3 and 5 ranks (the 5 with micro-batches of no rows: those ranks
/// run the same collectives with zeros), in buckets smaller than a layer,
/// of about a layer, and of the whole model, the ranks take one learner's
/// updates with its statistics. (At lr 1e-3: at the other tests' 0.05,
/// AdamW blows the order of summation up to 1.4e-4 on this transformer, for
/// ZeRO-1's all-reduce as much as for these streamed reduce-scatters.)
#[test]
fn zero2_with_recomputed_layers_streams_each_layers_gradients_and_takes_the_single_learners_updates() {
    let config = Config { checkpoint_activations: true, lr: 1e-3, ..config() };
    let steps = steps_of(70, 2);
    let mut one = Learner::new(config.clone(), tiny_arith(7), Some(tiny_arith(7)), 11).unwrap();
    let want_reports: Vec<TrainReport> = steps.iter().map(|g| one.train_step(g).unwrap()).collect();
    let want = weights(one.policy());
    let start = weights(&tiny_arith(7));
    let moved = max_diff(&want, &start);
    assert!(moved > 1e-3, "one learner did not train");
    // tiny-arith's layers hold 196,864 parameters each.
    let layer: usize = start.iter().filter(|(n, _)| n.contains("layers.0.")).map(|(_, v)| v.len()).sum();
    assert_eq!(layer, 196_864);
    for world in [2, 3, 5] {
        for bucket_bytes in [4096, 4 * layer, 64 << 20] {
            let out = on_ranks(world, Duration::from_secs(120), |rank, collective| {
                let (model, seed) = if rank == 0 { (7, 11) } else { (100 + rank as u64, 99) };
                let mut learner = Learner::new(config.clone(), tiny_arith(model), Some(tiny_arith(model)), seed).unwrap();
                learner.join_data_parallel(Box::new(collective), sharding(Stage::Gradients, bucket_bytes)).unwrap();
                let reports: Vec<TrainReport> = steps.iter().map(|g| learner.train_step(g).unwrap()).collect();
                let in_grad: Vec<String> = prism_learner::policy::named_variables(prism_learner::Policy::var_store(learner.policy()))
                    .into_iter()
                    .filter(|(n, t)| n.contains("layers.") && t.grad().defined())
                    .map(|(n, _)| n)
                    .collect();
                let opt = learner.sharded_optimizer().expect("sharded");
                (weights(learner.policy()), reports, in_grad, opt.peak_streamed(), opt.largest_bucket())
            });
            for (rank, (w, reports, in_grad, peak, bucket)) in out.iter().enumerate() {
                let at = format!("world {world}, buckets of {bucket_bytes} B, rank {rank}");
                assert!(in_grad.is_empty(), "{at}: layer gradients reached .grad: {in_grad:?}");
                assert!(*peak >= layer, "{at}: the layers' gradients were not handed over ({peak} elements at most)");
                assert!(*peak <= layer + bucket, "{at}: {peak} gradient elements held at once, above a layer's {layer} and a bucket's {bucket}");
                assert_eq!(max_diff(w, &out[0].0), 0.0, "{at}: departs from rank 0");
                // Within 0.5 % of how far the weights moved (1.15e-2): the
                // order of summation, which AdamW's 1/sqrt(v) enlarges where
                // v is small (measured up to 1.25e-5 = 0.11 % on 5 ranks on
                // an AVX-512 machine, below 1e-5 on an AVX2 one); a lost or
                // doubled bucket moves its weights by whole updates.
                let d = max_diff(w, &want);
                assert!(d <= 0.005 * moved, "{at}: differs from one learner by {d} (the weights moved {moved})");
                for (got, want) in reports.iter().zip(&want_reports) {
                    assert_eq!(got.updates.len(), want.updates.len(), "{at}");
                    for (g, w) in got.updates.iter().zip(&want.updates) {
                        assert_eq!((g.tokens, g.sequences, g.update, g.skipped), (w.tokens, w.sequences, w.update, w.skipped), "{at}");
                        for (name, g, w) in [("loss", g.loss, w.loss), ("grad_norm", g.grad_norm, w.grad_norm)] {
                            assert!(relative(g, w) < 1e-4 || (g - w).abs() < 1e-7, "{at}: {name} {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}
