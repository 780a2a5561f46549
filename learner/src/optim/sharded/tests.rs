use super::*;
use crate::collective::Local;
use crate::optim::AdamW;
use std::time::Duration;
use tch::Device;

/// A store of parameters with `shapes`, the same values on every rank.
fn store(shapes: &[&[i64]]) -> nn::VarStore {
    let vs = nn::VarStore::new(Device::Cpu);
    for (i, shape) in shapes.iter().enumerate() {
        let n: i64 = shape.iter().product();
        let init = ((Tensor::arange(n, (Kind::Float, Device::Cpu)) + i as f64).sin() * 0.5).view(*shape);
        let mut v = vs.root().var(&format!("p{i}"), shape, nn::Init::Const(0.0));
        tch::no_grad(|| v.copy_(&init));
    }
    vs
}

/// Rank `rank`'s gradient of parameter `i` at step `step`.
fn gradient(p: &Tensor, i: usize, rank: usize, step: usize) -> Tensor {
    let n = p.numel() as i64;
    ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * (rank as f64 + 1.0) + (step * 7 + i) as f64).cos() * (1.0 + rank as f64)).view(p.size().as_slice())
}

/// Sets each parameter's gradient to the sum of `ranks`' gradients.
fn set_grads(vs: &nn::VarStore, ranks: &[usize], step: usize) {
    let params: Vec<Tensor> = named_variables(vs).into_iter().map(|(_, v)| v).collect();
    let mut loss = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for (i, p) in params.iter().enumerate() {
        let mut p = p.shallow_clone();
        p.zero_grad();
        for &r in ranks {
            loss = loss + (&p * gradient(&p, i, r, step)).sum(Kind::Float);
        }
    }
    loss.backward();
}

fn values(vs: &nn::VarStore) -> Vec<f32> {
    named_variables(vs).into_iter().flat_map(|(_, v)| Vec::<f32>::try_from(v.flatten(0, -1)).unwrap()).collect()
}

const CONFIG: AdamWConfig = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };

/// Three clipped steps of one AdamW on the gradients summed over `world` ranks.
fn alone(shapes: &[&[i64]], world: usize) -> Vec<f32> {
    let vs = store(shapes);
    let mut adam = AdamW::new(&vs, CONFIG);
    let ranks: Vec<usize> = (0..world).collect();
    for step in 0..3 {
        set_grads(&vs, &ranks, step);
        adam.clip_grad_norm(0.5).unwrap();
        adam.step(0.05).unwrap();
    }
    values(&vs)
}

/// The same three steps on `world` sharded ranks; every rank's weights and
/// the length of its share.
fn sharded(shapes: &[&[i64]], world: usize, stage: Stage, bucket_bytes: usize) -> Vec<(Vec<f32>, usize)> {
    let group = Local::group(world, Duration::from_secs(20));
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|dp| {
                s.spawn(move || {
                    let vs = store(shapes);
                    let mut adam = ShardedAdamW::new(&vs, CONFIG, stage, dp.rank(), world, bucket_bytes).unwrap();
                    for step in 0..3 {
                        set_grads(&vs, &[dp.rank()], step);
                        let (norm, ran) = adam.step(dp, 0.05, 0.5).unwrap();
                        assert!(ran && norm > 0.5, "clipping is active (norm {norm})");
                    }
                    (values(&vs), adam.share_len())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// ZeRO-1 and ZeRO-2 on 1, 2, 3 and 5 ranks end on one AdamW's weights
/// (the gradients summed, clipped by the global norm): uneven shares (19
/// elements) and ranks whose share is padding only (3 elements on 5 ranks),
/// in one bucket and in buckets of 16 bytes (12, 5 and 2 elements: a
/// parameter larger than a bucket is one of its own).
#[test]
fn sharded_ranks_step_as_one_adamw_on_the_summed_gradients() {
    let layouts: [&[&[i64]]; 2] = [&[&[3, 4], &[5], &[2]], &[&[3]]];
    for shapes in layouts {
        let numels: Vec<usize> = shapes.iter().map(|s| s.iter().product::<i64>() as usize).collect();
        let total: usize = numels.iter().sum();
        for world in [1, 2, 3, 5] {
            let want = alone(shapes, world);
            let moved = want.iter().zip(values(&store(shapes))).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(moved > 1e-2, "the steps move the weights");
            for (bucket_bytes, share_len) in [(1 << 20, total.div_ceil(world).max(1)), (16, numels.iter().map(|n| n.div_ceil(world)).sum())] {
                for stage in [Stage::Optimizer, Stage::Gradients] {
                    let ranks = sharded(shapes, world, stage, bucket_bytes);
                    for (rank, (got, share)) in ranks.iter().enumerate() {
                        assert_eq!(*share, share_len, "{stage:?}, world {world}, buckets of {bucket_bytes} B: share length");
                        assert_eq!(got, &ranks[0].0, "{stage:?}, world {world}: rank {rank} departs from rank 0");
                        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                        assert!(diff <= 1e-6, "{stage:?}, world {world}, {total} elements, buckets of {bucket_bytes} B: rank {rank} differs from one AdamW by {diff}");
                    }
                }
            }
        }
    }
}

/// The buckets: whole parameters up to the size, one larger than it alone,
/// each padded to the world and cut into equal shares.
#[test]
fn buckets_hold_whole_parameters_and_pad_to_the_world() {
    let b = buckets(&[12, 5, 2, 1, 9], 32, 3).unwrap();
    let got: Vec<_> = b.iter().map(|b| (b.params.clone(), b.len, b.share, b.offset)).collect();
    assert_eq!(got, vec![(0..1, 12, 4, 0), (1..4, 8, 3, 4), (4..5, 9, 3, 7)]);
    assert_eq!(buckets(&[], 32, 2).unwrap().len(), 1, "no parameters: one empty bucket");
}

/// Every rank's share of per-parameter tensors, put back together, gives
/// them back; a wrong number of shares is refused.
#[test]
fn shares_of_whole_tensors_round_trip() {
    let shapes: &[&[i64]] = &[&[3, 4], &[5], &[2]];
    let vs = store(shapes);
    let per_param: Vec<Tensor> = named_variables(&vs).into_iter().map(|(_, v)| v.detach() * 3.0 + 1.0).collect();
    for world in [1, 2, 3, 5] {
        for bucket_bytes in [16, 1 << 20] {
            let adam = ShardedAdamW::new(&vs, CONFIG, Stage::Optimizer, 0, world, bucket_bytes).unwrap();
            let layout = adam.layout();
            let shares: Vec<Tensor> = (0..world).map(|r| layout.share_of(&per_param, r)).collect();
            let back = layout.whole_of(&shares).unwrap();
            for (a, b) in back.iter().zip(&per_param) {
                assert!(a.equal(b), "world {world}, buckets of {bucket_bytes} B");
            }
            assert!(layout.whole_of(&shares[1..]).is_err());
        }
    }
}

#[test]
fn a_rank_outside_its_world_is_refused() {
    let vs = store(&[&[2]]);
    assert!(ShardedAdamW::new(&vs, CONFIG, Stage::Gradients, 2, 2, 1024).is_err());
    assert!(ShardedAdamW::new(&vs, CONFIG, Stage::Gradients, 0, 0, 1024).is_err());
}

/// A parameter's decoder layer is the `N` of a `layers.N.` in its name.
#[test]
fn layers_are_read_from_the_names() {
    assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
    assert_eq!(layer_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"), Some(3));
    assert_eq!(layer_of("model.embed_tokens.weight"), None);
    assert_eq!(layer_of("model.layers.x.weight"), None);
    assert_eq!(layer_of("model.layers.7"), None);
    assert_eq!(layer_of("model.sublayers.2.w"), Some(2));
}

/// In layer order the parameters outside the layers come first, then layer
/// 0, 1, 2, 10 (by number, where names put 10 before 2); shares still map
/// to and from the parameters in name order, in either order, and the two
/// orders cut the state differently (an old checkpoint must name its own).
#[test]
fn the_layer_order_follows_the_layers_and_shares_round_trip_in_name_order() {
    let vs = nn::VarStore::new(Device::Cpu);
    let names = ["lm_head.w", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a", "model.layers.10.a", "model.layers.2.a", "model.norm.w"];
    for (i, name) in names.iter().enumerate() {
        let n = 2 + i as i64;
        let (path, leaf) = name.rsplit_once('.').unwrap();
        let mut v = path.split('.').fold(vs.root(), |p, seg| p / seg).var(leaf, &[n], nn::Init::Const(0.0));
        tch::no_grad(|| v.copy_(&(Tensor::arange(n, (Kind::Float, Device::Cpu)) + 10.0 * i as f64)));
    }
    let by_name: Vec<Tensor> = named_variables(&vs).into_iter().map(|(_, v)| v.detach().copy()).collect();
    let layers = Layout::new(&vs, 2, 16, Order::Layers).unwrap();
    let first = |t: &Tensor| t.double_value(&[0]) as i64 / 10;
    assert_eq!(layers.params.iter().map(first).collect::<Vec<_>>(), vec![0, 6, 1, 2, 3, 5, 4]);
    assert_eq!(layers.layer_params(0).len(), 2);
    assert_eq!(layers.layer_params(10).len(), 1);
    let names_order = Layout::new(&vs, 2, 16, Order::Names).unwrap();
    for layout in [&layers, &names_order] {
        let shares: Vec<Tensor> = (0..2).map(|r| layout.share_of(&by_name, r)).collect();
        for (a, b) in layout.whole_of(&shares).unwrap().iter().zip(&by_name) {
            assert!(a.equal(b), "{:?}", layout.order());
        }
    }
    assert!(!layers.share_of(&by_name, 0).equal(&names_order.share_of(&by_name, 0)));
}
