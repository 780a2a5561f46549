//! Hand calculations; `tests/reference.rs` compares against torch.optim.AdamW.

use super::*;
use tch::{Device, nn::Init};

#[test]
fn schedules_follow_the_transformers_formulas() {
    let cosine = Config { lr: 1.0, schedule: crate::config::Schedule::Cosine, warmup_steps: 2, total_steps: 6, ..Config::default() };
    // Warmup s / 2; then 0.5 (1 + cos(pi (s - 2) / 4)).
    let want = [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0];
    for (s, w) in want.iter().enumerate() {
        assert!((lr_at(&cosine, s as u64) - w).abs() < 1e-6, "step {s}: {}", lr_at(&cosine, s as u64));
    }
    let floored = Config { min_lr_ratio: 0.1, ..cosine.clone() };
    // 0.1 + 0.9 * 0.5.
    assert!((lr_at(&floored, 4) - 0.55).abs() < 1e-12);
    let constant = Config { lr: 1.0, warmup_steps: 2, ..Config::default() };
    let got: Vec<f64> = (0..4).map(|s| lr_at(&constant, s)).collect();
    assert_eq!(got, vec![0.0, 0.5, 1.0, 1.0]);
}

fn one_param(value: f32) -> (nn::VarStore, Tensor) {
    let vs = nn::VarStore::new(Device::Cpu);
    let p = vs.root().var("w", &[1], Init::Const(value as f64));
    (vs, p)
}

#[test]
fn first_adamw_step_by_hand() {
    // p = 1, g = 0.5, lr 0.1, wd 0.01: decay p = 0.999; m = 0.05, v = 0.00025;
    // bias corrections 0.1 and 0.001: m_hat = 0.5, sqrt(v_hat) = 0.5; step = -0.1.
    let (vs, p) = one_param(1.0);
    let mut opt = AdamW::new(&vs, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 });
    (&p * 0.5).sum(Kind::Float).backward();
    opt.step(0.1).unwrap();
    assert!((p.double_value(&[0]) - 0.899).abs() < 1e-6, "{}", p.double_value(&[0]));
    assert_eq!(opt.steps(), 1);
    let state = opt.state_tensors();
    assert_eq!(state[0].0, "exp_avg.w");
    assert!((state[0].1.double_value(&[0]) - 0.05).abs() < 1e-7);
    assert!((state[1].1.double_value(&[0]) - 0.00025).abs() < 1e-9);
}

#[test]
fn clipping_scales_to_the_max_norm() {
    // Gradients (3, 4) have norm 5; clipping to 1 scales by 1 / (5 + 1e-6).
    let vs = nn::VarStore::new(Device::Cpu);
    let a = vs.root().var("a", &[1], Init::Const(0.0));
    let b = vs.root().var("b", &[1], Init::Const(0.0));
    let mut opt = AdamW::new(&vs, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 });
    (&a * 3.0 + &b * 4.0).sum(Kind::Float).backward();
    let norm = opt.clip_grad_norm(1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    assert!((a.grad().double_value(&[0]) - 0.6).abs() < 1e-6);
    assert!((b.grad().double_value(&[0]) - 0.8).abs() < 1e-6);
    // Under the limit nothing changes.
    assert!((opt.clip_grad_norm(10.0).unwrap() - 1.0).abs() < 1e-6);
    assert!((a.grad().double_value(&[0]) - 0.6).abs() < 1e-6);
    opt.zero_grad();
    assert_eq!(opt.grad_norm().unwrap(), 0.0);
}

/// A bf16 parameter steps through a float32 master: the master follows the
/// float32 optimizer on the same gradients bit for bit, the parameter is it
/// rounded, and the checkpoint state holds the master. Applied to the bf16
/// values themselves, these updates (1e-3 against a spacing of 2^-9 near
/// 0.3) would round away.
#[test]
fn a_bf16_parameter_steps_through_a_float32_master() {
    let init = Tensor::from_slice(&[0.3f32, -0.4, 0.2, 0.45]).to_kind(Kind::BFloat16).to_kind(Kind::Float);
    let make = |kind: Kind| {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut p = vs.root().var("w", &[4], Init::Const(0.0));
        tch::no_grad(|| p.copy_(&init));
        let mut vs = vs;
        if kind == Kind::BFloat16 {
            vs.bfloat16();
        }
        let p = vs.root().get("w").unwrap();
        assert_eq!(p.kind(), kind);
        (vs, p)
    };
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let (vs32, p32) = make(Kind::Float);
    let (vs16, p16) = make(Kind::BFloat16);
    let (mut opt32, mut opt16) = (AdamW::new(&vs32, config), AdamW::new(&vs16, config));
    for step in 0..5 {
        // Gradients bf16 can hold exactly, so both optimizers see the same ones.
        let g = Tensor::from_slice(&[0.5f32, -0.25, 1.0 + step as f32, -2.0]);
        for (p, opt) in [(&p32, &mut opt32), (&p16, &mut opt16)] {
            opt.zero_grad();
            (p * g.to_kind(p.kind())).sum(Kind::Float).backward();
            opt.step(1e-3).unwrap();
        }
    }
    let master = opt16.state_tensors().into_iter().find(|(n, _)| n == "master.w").expect("a master in the state").1;
    assert!(master.equal(&p32), "master {master} vs float32 {p32}");
    assert!(p16.equal(&p32.to_kind(Kind::BFloat16)), "{p16} is not the master rounded");
    assert!(!p16.to_kind(Kind::Float).equal(&init), "the bf16 parameter moved");
    // A float32 parameter has no master in the state.
    assert!(opt32.state_tensors().iter().all(|(n, _)| !n.starts_with("master.")));
}

/// The one-pass CPU kernel gives what the torch ops give (they run where
/// the kernel does not apply: here on transposed, non-contiguous copies),
/// with and without weight decay, over several steps.
#[test]
fn the_fused_cpu_update_equals_the_torch_ops() {
    tch::manual_seed(7);
    for weight_decay in [0.0, 0.1] {
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay };
        let fresh = || [Tensor::randn([300, 257], (Kind::Float, tch::Device::Cpu)), Tensor::zeros([300, 257], (Kind::Float, tch::Device::Cpu))];
        let [start, _] = fresh();
        let (mut p, mut m, mut v) = (start.copy(), start.zeros_like(), start.zeros_like());
        // The same values, stored transposed: not contiguous, so the torch ops run.
        let t = |x: &Tensor| x.tr().contiguous().tr();
        let (mut pt, mut mt, mut vt) = (t(&start), t(&m), t(&v));
        assert!(!pt.is_contiguous());
        for step in 1..=4 {
            let g = Tensor::randn([300, 257], (Kind::Float, tch::Device::Cpu));
            config.update(&mut p, &mut m, &mut v, &g, 1e-2, step).unwrap();
            config.update(&mut pt, &mut mt, &mut vt, &t(&g), 1e-2, step).unwrap();
        }
        let moved = (&p - &start).abs().max().double_value(&[]);
        let diff = (&p - &pt).abs().max().double_value(&[]);
        assert!(moved > 1e-2, "{moved}");
        // Up to a rounding of the values (an ulp of a value near 4 is 4.8e-7).
        let largest = p.abs().max().double_value(&[]);
        assert!(diff <= 1e-6 * largest, "weight decay {weight_decay}: {diff} (values up to {largest}) after moving {moved}");
        assert!((&m - &mt).abs().max().double_value(&[]) <= 1e-6 && (&v - &vt).abs().max().double_value(&[]) <= 1e-6);
    }
}
