//! CUDA-only checks (skipped with a message on CPU; `scripts/gpu-check` runs
//! them on a GPU machine): bf16 autocast really is bf16, a bf16 train step
//! agrees with the float32 CPU step, and a CUDA checkpoint resumes on the CPU.

mod common;

use common::*;
use prism_learner::{CheckpointMeta, Config, Learner, Policy, autocast};
use tch::{Device, Kind, Tensor, nn, nn::Module};

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("skipped: no CUDA device (scripts/gpu-check runs this on a GPU machine)");
        None
    }
}

#[test]
fn autocast_computes_matmuls_in_bf16() {
    let Some(device) = cuda() else { return };
    let vs = nn::VarStore::new(device);
    let linear = nn::linear(vs.root() / "l", 8, 8, Default::default());
    let x = Tensor::ones([2, 8], (Kind::Float, device));
    assert_eq!(autocast::bf16(true, false, device, || linear.forward(&x).kind()), Kind::BFloat16);
    assert_eq!(autocast::bf16(false, false, device, || linear.forward(&x).kind()), Kind::Float);
    // The previous autocast dtype is restored afterwards.
    assert_eq!(autocast::cuda_autocast_dtype(), autocast::SCALAR_HALF);
}

#[test]
fn bf16_train_step_on_cuda_matches_the_cpu_step() {
    let Some(device) = cuda() else { return };
    let config = Config { lr: 1e-2, kl_coef: 0.05, is_cap: 2.0, advantage: prism_learner::config::Estimator::TpGrpo, ..Config::default() };
    let batch = groups(3, 3, 4);
    let mut cpu = Learner::new(config.clone(), TinyLm::new(2), Some(TinyLm::new(2)), 0).unwrap();
    let mut gpu = Learner::new(config.clone(), TinyLm::on(2, device), Some(TinyLm::on(2, device)), 0).unwrap();
    let a = cpu.train_step(&batch).unwrap().updates[0].clone();
    let b = gpu.train_step(&batch).unwrap().updates[0].clone();
    assert!((a.loss - b.loss).abs() <= 2e-2 * a.loss.abs().max(1e-2), "cpu {} vs cuda bf16 {}", a.loss, b.loss);
    assert!((a.grad_norm - b.grad_norm).abs() <= 5e-2 * a.grad_norm, "{} vs {}", a.grad_norm, b.grad_norm);
    assert_eq!(a.tokens, b.tokens);
    // Master weights stay float32.
    assert!(
        prism_learner::policy::named_variables(gpu.policy().var_store()).iter().all(|(_, t)| t.kind() == Kind::Float)
    );

    let dir = tempfile::tempdir().unwrap();
    let meta =
        CheckpointMeta { step: 1, policy_version: 1, data_cursor: serde_json::Value::Null, config_hash: String::new() };
    gpu.save_checkpoint(dir.path(), &meta).unwrap();
    let mut restored = Learner::new(config, TinyLm::new(9), Some(TinyLm::new(2)), 0).unwrap();
    restored.resume(dir.path()).unwrap().unwrap();
    assert_eq!(restored.policy().weights(), gpu.policy().weights());
}
