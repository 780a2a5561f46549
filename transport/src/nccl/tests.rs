use super::*;

#[test]
fn buckets_group_consecutive_tensors_up_to_the_size() {
    let t = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
    let ts = vec![t(10), t(10), t(30), t(5), t(100)];
    let sizes: Vec<usize> = buckets(&ts, 80).iter().map(|b| b.len()).collect();
    // 40+40 bytes fit in 80; 120 alone; 20 then 400 (too big to share)
    assert_eq!(sizes, vec![2, 1, 1, 1]);
    assert!(buckets(&[], 80).is_empty());
}

#[test]
fn without_a_gpu_nccl_is_reported_unavailable_not_a_panic() {
    match probe() {
        Ok(p) => eprintln!("NCCL {} with {} CUDA device(s): the GPU test covers it", p.nccl_version, p.devices),
        Err(e) => {
            let text = e.to_string();
            assert!(text.starts_with("NCCL unavailable: "), "{text}");
            assert!(unique_id().is_err());
            let err = Communicator::new(&[0; UNIQUE_ID_BYTES], 0, 1, 0, Duration::from_secs(1), 1 << 20).unwrap_err();
            assert!(err.to_string().starts_with("NCCL unavailable"), "{err}");
        }
    }
}

/// Whether the GPU tests must run (scripts/gpu-check sets it): then a
/// missing GPU or NCCL is a failure, not a skip.
fn gpu_or_skip() -> bool {
    let required = std::env::var("PRISM_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let reason = match probe() {
        Err(e) => e.to_string(),
        Ok(_) if !tch::Cuda::is_available() => "libtorch sees no CUDA device".to_string(),
        Ok(_) => return true,
    };
    assert!(!required, "PRISM_REQUIRE_GPU=1 but {reason}");
    eprintln!("skipped (GPU test): {reason}");
    false
}

/// GPU only: a one-rank communicator broadcasts and all-reduces tensors with
/// the shapes of SmolLM2-135M's first layer on cuda:0. Expected values, by
/// hand: broadcast from the only rank leaves them as they were; the sum over
/// one rank is the tensor itself; the mean divides that sum by 1.
#[test]
fn one_rank_broadcast_and_all_reduce_on_the_gpu() {
    if !gpu_or_skip() {
        return;
    }
    let dev = tch::Device::Cuda(0);
    let id = unique_id().unwrap();
    // A 1 MiB bucket splits the embedding-sized tensors into several NCCL groups.
    let comm = Communicator::new(&id, 0, 1, 0, Duration::from_secs(60), 1 << 20).unwrap();
    let shapes: [&[i64]; 6] = [&[49152, 576], &[576, 576], &[192, 576], &[1536, 576], &[576, 1536], &[576]];
    let ts: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| (Tensor::arange(s.iter().product::<i64>(), (Kind::Float, dev)) * (i as f64 + 1.0)).reshape(*s))
        .collect();
    let want: Vec<Tensor> = ts.iter().map(|t| t.copy()).collect();
    comm.broadcast(&ts, 0).unwrap();
    comm.all_reduce_sum(&ts).unwrap();
    comm.all_reduce_mean(&ts).unwrap();
    for (i, (a, b)) in ts.iter().zip(&want).enumerate() {
        assert!(a.equal(b), "tensor {i} changed");
    }
    let half: Vec<Tensor> = ts.iter().map(|t| t.to_kind(Kind::BFloat16)).collect();
    comm.all_reduce_sum(&half).unwrap();
    assert!(half[1].to_kind(Kind::Float).equal(&want[1].to_kind(Kind::BFloat16).to_kind(Kind::Float)));
}

/// GPU only: ZeRO's collectives on a one-rank communicator: the reduce-scatter
/// share of one rank is the whole sum (its input), and the all-gather of one
/// share is that share; shares that do not add up are refused before NCCL runs.
#[test]
fn one_rank_reduce_scatter_and_all_gather_on_the_gpu() {
    if !gpu_or_skip() {
        return;
    }
    let dev = tch::Device::Cuda(0);
    let id = unique_id().unwrap();
    let comm = Communicator::new(&id, 0, 1, 0, Duration::from_secs(60), 1 << 20).unwrap();
    let input = Tensor::arange(1000, (Kind::Float, dev)) * 0.5;
    let share = Tensor::zeros([1000], (Kind::Float, dev));
    comm.reduce_scatter_sum(&input, &share).unwrap();
    assert!(share.equal(&input), "reduce-scatter over one rank");
    let whole = Tensor::zeros([1000], (Kind::Float, dev));
    comm.all_gather(&share, &whole).unwrap();
    assert!(whole.equal(&input), "all-gather over one rank");
    let err = comm.reduce_scatter_sum(&input, &Tensor::zeros([999], (Kind::Float, dev))).unwrap_err().to_string();
    assert!(err.contains("reduce-scatter") && err.contains("1000 elements"), "{err}");
}

/// GPU only: rank 0 of two, whose peer never comes, fails within the timeout
/// with an error naming the rank and the operation.
#[test]
fn a_missing_peer_is_a_timeout_naming_rank_and_operation() {
    if !gpu_or_skip() {
        return;
    }
    let id = unique_id().unwrap();
    let err = Communicator::new(&id, 0, 2, 0, Duration::from_secs(3), 1 << 20).unwrap_err().to_string();
    assert_eq!(err, "NCCL rank 0/2: init (waiting for the other ranks) did not complete within 3000 ms");
}

/// GPU only: a learner joined to a one-rank NCCL communicator goes through
/// every collective of data-parallel training (the i64 header and the state
/// broadcast, the f32 log-prob gather, the gradient and f64 statistics
/// all-reduces) and must train exactly as the same learner alone.
#[test]
fn a_one_rank_data_parallel_learner_on_the_gpu_trains_as_one_alone() {
    if !gpu_or_skip() {
        return;
    }
    let dev = tch::Device::Cuda(0);
    let model = |dtype| {
        let opts = prism_model::LoadOptions { seed: 3, device: dev, dtype };
        prism_model::load("builtin:tiny-arith", &opts).unwrap().model
    };
    let config = prism_learner::Config { kl_coef: 0.05, is_cap: 2.0, ppo_epochs: 2, mini_batches: 2, micro_batch_size: 3, lr: 1e-2, ..Default::default() };
    let groups: Vec<Vec<prism_core::LabeledTrajectory>> = (0..2u64)
        .map(|g| {
            (0..4u64)
                .map(|i| {
                    let mut t = crate::testing::labeled(g * 4 + i, 4 + i as usize);
                    t.trajectory.prompt_tokens = vec![3, 4, 5];
                    t.trajectory.tokens = (0..t.trajectory.tokens.len() as u32).map(|k| 6 + (k + i as u32) % 8).collect();
                    t
                })
                .collect()
        })
        .collect();
    let weights = |l: &prism_learner::Learner<prism_model::Transformer>| -> Vec<Tensor> {
        prism_learner::policy::named_variables(prism_learner::Policy::var_store(l.policy())).into_iter().map(|(_, t)| t.to_device(tch::Device::Cpu)).collect()
    };
    use prism_learner::optim::sharded::{Sharding, Stage};
    // Unsharded, then ZeRO-1 and ZeRO-2 (reduce-scatter and all-gather over
    // NCCL), in float32 and in bf16 (float32 masters, bf16 all-gathers). In
    // bf16 the sharded update's gradient norm is summed in another order, so
    // a weight may round to the neighbouring bf16 value.
    let cases = [prism_model::Dtype::F32, prism_model::Dtype::Bf16]
        .into_iter()
        .flat_map(|dtype| [None, Some(Stage::Optimizer), Some(Stage::Gradients)].map(|s| (dtype, s.map(|stage| Sharding { stage, bucket_bytes: 4096 }))));
    for (dtype, sharding) in cases {
        let bf16 = dtype == prism_model::Dtype::Bf16;
        let mut alone = prism_learner::Learner::new(config.clone(), model(dtype), Some(model(dtype)), 1).unwrap();
        let mut joined = prism_learner::Learner::new(config.clone(), model(dtype), Some(model(dtype)), 1).unwrap();
        let comm = Communicator::new(&unique_id().unwrap(), 0, 1, 0, Duration::from_secs(60), 1 << 20).unwrap();
        joined.join_data_parallel(Box::new(comm), sharding).unwrap();
        let before = weights(&alone);
        for _ in 0..2 {
            let a = alone.train_step(&groups).unwrap();
            let b = joined.train_step(&groups).unwrap();
            assert_eq!(a.updates.len(), b.updates.len());
            for (x, y) in a.updates.iter().zip(&b.updates) {
                let tolerance = if bf16 { 1e-2 } else { 1e-6 };
                assert!((x.loss - y.loss).abs() <= tolerance * x.loss.abs().max(1.0) && x.tokens == y.tokens, "{dtype:?} {sharding:?}: {x:?} vs {y:?}");
            }
        }
        let (a, b) = (weights(&alone), weights(&joined));
        let max_abs = |ts: &[Tensor], us: &[Tensor]| ts.iter().zip(us).map(|(x, y)| (x - y).abs().max().to_kind(tch::Kind::Float).double_value(&[])).fold(0.0, f64::max);
        let (moved, diff) = (max_abs(&a, &before), max_abs(&a, &b));
        eprintln!("one-rank data-parallel learner on cuda:0, {dtype:?}, shard {sharding:?}: weights moved {moved:.3e}, differ from alone by {diff:.3e}");
        assert!(moved > 1e-4, "training must move the weights ({moved})");
        // float32: equal up to summation order; bf16: one spacing at the largest weights (|w| < 4).
        let tolerance = if bf16 { 2f64.powi(-6) } else { 1e-6 };
        assert!(diff <= tolerance, "{dtype:?} {sharding:?}: the one-rank learner departs from the learner alone by {diff}");
    }
}
