//! The matrix products of a decode step of 1 to 64 sequences on the CPU in
//! float32, by the kernel in `csrc/small_gemm.cpp`: for 2 to 64 rows MKL's
//! sgemm with the weights as torch stores them (`[out, in]`) is compute-bound
//! at a fifth of the FMA rate, while the kernel reads each weight once and runs
//! near memory bandwidth; for one row it is a few percent faster than MKL's
//! sgemv (measured by `prism bench generate`, A/B with `PRISM_SMALL_GEMM=0`).
//!
//! [`linear`] answers `None` wherever the kernel does not apply — another
//! device or dtype, a strided operand, too few or too many rows, autograd
//! recording, a CPU without AVX-512, or `PRISM_SMALL_GEMM=0` in the
//! environment (to compare with torch's product) — and the caller falls back
//! to torch.

use tch::{Device, Kind, Tensor};

#[cfg(small_gemm)]
mod ffi {
    use std::os::raw::c_int;
    unsafe extern "C" {
        pub fn prism_small_gemm_supported() -> c_int;
        pub fn prism_small_gemm_max_rows() -> i64;
        #[allow(clippy::too_many_arguments)]
        pub fn prism_small_gemm(
            x: *const f32,
            ldx: i64,
            w: *const f32,
            ldw: i64,
            y: *mut f32,
            ldy: i64,
            res: *const f32,
            ldr: i64,
            m: i64,
            n: i64,
            k: i64,
        ) -> c_int;
    }
}

/// The most rows the kernel takes (0 = the kernel is unavailable here).
fn max_rows() -> i64 {
    static MAX: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        #[cfg(small_gemm)]
        {
            let off = std::env::var("PRISM_SMALL_GEMM").is_ok_and(|v| v == "0");
            // SAFETY: these take no arguments and only query the CPU.
            if !off && unsafe { ffi::prism_small_gemm_supported() } == 1 {
                return unsafe { ffi::prism_small_gemm_max_rows() };
            }
        }
        0
    })
}

/// Whether autograd records operations on this thread now.
fn grad_enabled() -> bool {
    // SAFETY: sets the thread's grad mode and puts it back as it was.
    unsafe {
        let was = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(was);
        was != 0
    }
}

fn applies(t: &Tensor) -> bool {
    t.device() == Device::Cpu && t.kind() == Kind::Float && t.dim() == 2 && t.is_contiguous()
}

/// `res + x · wᵀ` for `x` `[M, K]`, `w` `[N, K]` and `res` `[M, N]` (or none),
/// when the kernel applies (see the module's notes); `None` otherwise.
pub(crate) fn linear(x: &Tensor, w: &Tensor, res: Option<&Tensor>) -> Option<Tensor> {
    let (m, k) = x.size2().ok()?;
    if m > max_rows() || !applies(x) || !applies(w) || w.size()[1] != k || grad_enabled() {
        return None;
    }
    let n = w.size()[0];
    if let Some(r) = res {
        if !applies(r) || r.size() != [m, n] {
            return None;
        }
    }
    let y = Tensor::empty([m, n], (Kind::Float, Device::Cpu));
    #[cfg(small_gemm)]
    {
        let res_ptr = res.map_or(std::ptr::null(), |r| r.data_ptr() as *const f32);
        // SAFETY: x, w, y (and res) are contiguous float32 CPU tensors of the
        // shapes checked above, so every index the kernel uses (m < M, j < N,
        // k < K with the given leading dimensions) is in bounds; y is fresh
        // and overlaps nothing; nothing else touches them during the call.
        let rc = unsafe {
            ffi::prism_small_gemm(
                x.data_ptr() as *const f32,
                k,
                w.data_ptr() as *const f32,
                k,
                y.data_ptr() as *mut f32,
                n,
                res_ptr,
                n,
                m,
                n,
                k,
            )
        };
        if rc == 0 {
            return Some(y);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_torch_for_every_row_count_it_takes() {
        if max_rows() == 0 {
            eprintln!("skipped: the small-GEMM kernel is not available on this machine");
            return;
        }
        let _guard = tch::no_grad_guard();
        tch::manual_seed(3);
        // N = 37 leaves a remainder after every row block; K = 50 is no multiple of 16.
        let w = Tensor::randn([37, 50], (Kind::Float, Device::Cpu));
        for m in [1, 2, 3, 5, 6, 7, 12, 13, 16, 17, 31, 33, 48, 49, 64] {
            let x = Tensor::randn([m, 50], (Kind::Float, Device::Cpu));
            let res = Tensor::randn([m, 37], (Kind::Float, Device::Cpu));
            let want = x.linear(&w, None::<&Tensor>);
            let got = linear(&x, &w, None).expect("applies");
            let err = (&got - &want).abs().max().double_value(&[]);
            assert!(err < 1e-4, "M={m}: max error {err}");
            let got = linear(&x, &w, Some(&res)).expect("applies");
            let err = (&got - (&want + &res)).abs().max().double_value(&[]);
            assert!(err < 1e-4, "M={m} with residual: max error {err}");
        }
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let _guard = tch::no_grad_guard();
        let w = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        assert!(linear(&Tensor::randn([65, 16], (Kind::Float, Device::Cpu)), &w, None).is_none(), "65 rows");
        assert!(linear(&Tensor::randn([4, 16], (Kind::Double, Device::Cpu)), &w.to_kind(Kind::Double), None).is_none(), "f64");
        assert!(linear(&Tensor::randn([16, 4], (Kind::Float, Device::Cpu)).tr(), &w, None).is_none(), "strided x");
        let recording = tch::with_grad(|| linear(&Tensor::randn([4, 16], (Kind::Float, Device::Cpu)), &w, None));
        assert!(recording.is_none(), "autograd recording");
    }
}
