//! bf16 autocast on CUDA, and on the CPU when asked (`learner.bf16_cpu`).
//!
//! `tch::autocast` turns autocast on but cannot choose its dtype, and libtorch's
//! default for CUDA is float16, which needs loss scaling. libtorch exports
//! `at::autocast::{get,set}_autocast_dtype(DeviceType, ScalarType)`; both
//! arguments are `int8_t` enums, so the functions are called directly by their
//! (Itanium-mangled) names. The state they set is thread-local, like autocast.
//! CPU autocast is turned on the same way (`tch::autocast` only knows CUDA):
//! `at::autocast::{is,set}_autocast_enabled(DeviceType, bool)`, with the
//! nesting count and the cast-weight cache handled as `tch::autocast` does.

use tch::Device;

const DEVICE_CPU: i8 = 0; // c10::DeviceType::CPU
const DEVICE_CUDA: i8 = 1; // c10::DeviceType::CUDA
/// `c10::ScalarType::Half`.
pub const SCALAR_HALF: i8 = 5;
/// `c10::ScalarType::BFloat16`.
pub const SCALAR_BF16: i8 = 15;

unsafe extern "C" {
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_get_autocast_dtype(device_type: i8) -> i8;
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast19is_autocast_enabledEN3c1010DeviceTypeE"]
    fn at_is_autocast_enabled(device_type: i8) -> bool;
    #[link_name = "_ZN2at8autocast20set_autocast_enabledEN3c1010DeviceTypeEb"]
    fn at_set_autocast_enabled(device_type: i8, enabled: bool);
    #[link_name = "_ZN2at8autocast17increment_nestingEv"]
    fn at_increment_nesting() -> i64;
    #[link_name = "_ZN2at8autocast17decrement_nestingEv"]
    fn at_decrement_nesting() -> i64;
    #[link_name = "_ZN2at8autocast11clear_cacheEv"]
    fn at_clear_cache();
}

/// The dtype CUDA autocast casts to on this thread (a `c10::ScalarType` code).
pub fn cuda_autocast_dtype() -> i8 {
    // SAFETY: reads a thread-local of libtorch; no pointers involved.
    unsafe { at_get_autocast_dtype(DEVICE_CUDA) }
}

/// Runs `f` under bf16 autocast when `enabled` and `device` is CUDA, or when
/// `cpu` and `device` is the CPU; else plainly.
pub fn bf16<T>(enabled: bool, cpu: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if cpu && device == Device::Cpu {
        return cpu_bf16(f);
    }
    if !(enabled && device.is_cuda()) {
        return f();
    }
    let previous = cuda_autocast_dtype();
    // SAFETY: sets a thread-local of libtorch to a valid ScalarType code.
    unsafe { at_set_autocast_dtype(DEVICE_CUDA, SCALAR_BF16) };
    let out = tch::autocast(true, f);
    unsafe { at_set_autocast_dtype(DEVICE_CUDA, previous) };
    out
}

/// Whether CPU autocast is on on this thread.
pub fn cpu_autocast_enabled() -> bool {
    // SAFETY: reads a thread-local of libtorch.
    unsafe { at_is_autocast_enabled(DEVICE_CPU) }
}

/// Runs `f` under CPU bf16 autocast: matrix products and the other
/// autocast-listed operations run in bf16 on float32 weights (the weights'
/// bf16 copies are cached for the span and dropped at its end, so an optimizer
/// step after it is seen by the next one).
fn cpu_bf16<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: thread-locals of libtorch set to valid values and restored.
    let (was_enabled, was_dtype) = unsafe { (at_is_autocast_enabled(DEVICE_CPU), at_get_autocast_dtype(DEVICE_CPU)) };
    unsafe {
        at_set_autocast_dtype(DEVICE_CPU, SCALAR_BF16);
        at_set_autocast_enabled(DEVICE_CPU, true);
        at_increment_nesting();
    }
    let out = f();
    unsafe {
        if at_decrement_nesting() == 0 {
            at_clear_cache();
        }
        at_set_autocast_enabled(DEVICE_CPU, was_enabled);
        at_set_autocast_dtype(DEVICE_CPU, was_dtype);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binding reaches libtorch's own setting: the CUDA default is float16,
    /// and what we set is what libtorch reports (no GPU needed; it is a flag).
    #[test]
    fn autocast_dtype_binding_round_trips() {
        std::thread::spawn(|| {
            assert_eq!(cuda_autocast_dtype(), SCALAR_HALF);
            unsafe { at_set_autocast_dtype(DEVICE_CUDA, SCALAR_BF16) };
            assert_eq!(cuda_autocast_dtype(), SCALAR_BF16);
            unsafe { at_set_autocast_dtype(DEVICE_CUDA, SCALAR_HALF) };
        })
        .join()
        .unwrap();
    }

    /// CPU autocast runs a linear layer in bf16 on float32 weights, only
    /// inside the span, and leaves the thread as it found it.
    #[test]
    fn cpu_autocast_runs_products_in_bf16_inside_the_span_only() {
        std::thread::spawn(|| {
            let x = tch::Tensor::randn([4, 8], (tch::Kind::Float, Device::Cpu));
            let w = tch::Tensor::randn([3, 8], (tch::Kind::Float, Device::Cpu)).set_requires_grad(true);
            assert!(!cpu_autocast_enabled());
            let (inside, enabled) = bf16(false, true, Device::Cpu, || (x.linear(&w, None::<&tch::Tensor>).kind(), cpu_autocast_enabled()));
            assert_eq!((inside, enabled), (tch::Kind::BFloat16, true));
            assert!(!cpu_autocast_enabled());
            assert_eq!(x.linear(&w, None::<&tch::Tensor>).kind(), tch::Kind::Float);
            // Off, CPU autocast is not entered (the CUDA switch alone does not touch the CPU).
            assert_eq!(bf16(true, false, Device::Cpu, || x.linear(&w, None::<&tch::Tensor>).kind()), tch::Kind::Float);
        })
        .join()
        .unwrap();
    }
}
