//! bf16 autocast on CUDA.
//!
//! `tch::autocast` turns autocast on but cannot choose its dtype, and libtorch's
//! default for CUDA is float16, which needs loss scaling. libtorch exports
//! `at::autocast::{get,set}_autocast_dtype(DeviceType, ScalarType)`; both
//! arguments are `int8_t` enums, so the functions are called directly by their
//! (Itanium-mangled) names. The state they set is thread-local, like autocast.

use tch::Device;

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
}

/// The dtype CUDA autocast casts to on this thread (a `c10::ScalarType` code).
pub fn cuda_autocast_dtype() -> i8 {
    // SAFETY: reads a thread-local of libtorch; no pointers involved.
    unsafe { at_get_autocast_dtype(DEVICE_CUDA) }
}

/// Runs `f` under bf16 autocast when `enabled` and `device` is CUDA, else plainly.
pub fn bf16<T>(enabled: bool, device: Device, f: impl FnOnce() -> T) -> T {
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
}
