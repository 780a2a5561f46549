//! CPU kernels for decode steps of 1 to 64 sequences in float32, or 1 to 16
//! in bfloat16 (`csrc/`, built by build.rs on x86-64 for AVX-512), where torch is either
//! compute-bound or dispatch-bound:
//!
//! - [`linear`], `csrc/small_gemm.cpp`: `res + x · wᵀ`. For 2 to 64 rows MKL's
//!   sgemm with the weights as torch stores them (`[out, in]`) is compute-bound
//!   at a fifth of the FMA rate, while the kernel reads each weight once and
//!   runs near memory bandwidth; for one row it is a few percent faster than
//!   MKL's sgemv. bfloat16 weights are widened as they are read (float32
//!   arithmetic, as torch's bf16 products accumulate), so a step reads half
//!   the bytes.
//! - [`decode_layer`], `csrc/decode_layer.cpp`: a whole decoder layer for one
//!   new token per sequence in one call, where torch's ~40 small operations
//!   per layer cost more in dispatch than in arithmetic at batch 1.
//!
//! Both answer `None` wherever they do not apply — another device or dtype, a
//! strided operand, too few or too many rows, autograd recording, a CPU
//! without AVX-512 — and the caller falls back to torch. `PRISM_CPU_KERNELS`
//! in the environment compares them with torch (`prism bench generate`):
//! `0` turns both off, `gemm` keeps only [`linear`].

use tch::{Device, Kind, Tensor};

#[cfg(cpu_kernels)]
mod ffi {
    use std::os::raw::{c_int, c_void};

    /// `PrismDecodeLayer` of csrc/decode_layer.cpp, field for field.
    #[repr(C)]
    pub struct DecodeLayer {
        pub batch: i64,
        pub dim: i64,
        pub heads: i64,
        pub kv_heads: i64,
        pub head_dim: i64,
        pub ffn: i64,
        pub threads: i64,
        pub bf16: i64,
        pub eps: f32,
        pub input_norm: *const c_void,
        pub qkv: *const c_void,
        pub qkv_bias: *const c_void,
        pub o: *const c_void,
        pub o_bias: *const c_void,
        pub post_norm: *const c_void,
        pub gate_up: *const c_void,
        pub gate_up_bias: *const c_void,
        pub down: *const c_void,
        pub down_bias: *const c_void,
        pub cos: *const c_void,
        pub sin: *const c_void,
        pub keys: *mut c_void,
        pub values: *mut c_void,
        pub capacity: i64,
        pub len: i64,
        pub key_mask: *const u8,
        pub x: *const c_void,
        pub out: *mut c_void,
    }

    unsafe extern "C" {
        pub fn prism_decode_layer(p: *const DecodeLayer) -> c_int;
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
            threads: c_int,
        ) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub fn prism_small_gemm_bf16(
            x: *const f32,
            ldx: i64,
            w: *const u16,
            ldw: i64,
            y: *mut f32,
            ldy: i64,
            res: *const f32,
            ldr: i64,
            m: i64,
            n: i64,
            k: i64,
            threads: c_int,
        ) -> c_int;
    }
}

/// The most rows the kernels take (0 = unavailable here, or turned off), and
/// whether the fused layer is on.
fn enabled() -> (i64, bool) {
    static ON: std::sync::OnceLock<(i64, bool)> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(cpu_kernels)]
        {
            let choice = std::env::var("PRISM_CPU_KERNELS").unwrap_or_default();
            // SAFETY: these take no arguments and only query the CPU.
            if choice != "0" && unsafe { ffi::prism_small_gemm_supported() } == 1 {
                return (unsafe { ffi::prism_small_gemm_max_rows() }, choice != "gemm");
            }
        }
        (0, false)
    })
}

fn max_rows() -> i64 {
    enabled().0
}

/// The most rows the kernels take in bfloat16. Past 16 torch's own bf16
/// products (oneDNN, on the CPU's bf16 units where it has them) catch up
/// with widening the weights to float32: SmolLM2-135M decode on 2 threads
/// (`prism bench generate --set model.dtype=bf16`, kernels on / off) ran
/// 2.0× at 4 rows, 1.4× at 8, 1.0× at 16 and 0.94× at 32, and a 64-token
/// prefill 0.76×.
const BF16_MAX_ROWS: i64 = 16;

/// The most rows the kernels take for tensors of `kind`.
fn max_rows_for(kind: Kind) -> i64 {
    if kind == Kind::BFloat16 { max_rows().min(BF16_MAX_ROWS) } else { max_rows() }
}

/// Whether [`decode_layer`] can run here.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode_layer_enabled() -> bool {
    enabled().1
}

/// Whether autograd records operations on this thread now.
pub(crate) fn grad_enabled() -> bool {
    // SAFETY: sets the thread's grad mode and puts it back as it was.
    unsafe {
        let was = torch_sys::at_grad_set_enabled(0);
        torch_sys::at_grad_set_enabled(was);
        was != 0
    }
}

/// Whether `t` is a contiguous float32 or bfloat16 CPU matrix.
fn applies(t: &Tensor) -> bool {
    t.device() == Device::Cpu
        && matches!(t.kind(), Kind::Float | Kind::BFloat16)
        && t.dim() == 2
        && t.is_contiguous()
}

/// `res + x · wᵀ` for `x` `[M, K]`, `w` `[N, K]` and `res` `[M, N]` (or none),
/// all float32 or all bfloat16 (then summed in float32 and rounded once, as
/// torch's bf16 `addmm`), when the kernel applies (see the module's notes);
/// `None` otherwise.
pub(crate) fn linear(x: &Tensor, w: &Tensor, res: Option<&Tensor>) -> Option<Tensor> {
    let (m, k) = x.size2().ok()?;
    let kind = w.kind();
    let applies = |t: &Tensor| applies(t) && t.kind() == kind;
    if m > max_rows_for(kind) || !applies(x) || !applies(w) || w.size()[1] != k || grad_enabled() {
        return None;
    }
    let n = w.size()[0];
    if res.is_some_and(|r| !applies(r) || r.size() != [m, n]) {
        return None;
    }
    // The rows and the sum in float32 (a bf16 step's rows are few: `m` ≤ 64).
    let (x, res) = match kind {
        Kind::Float => (x.shallow_clone(), res.map(Tensor::shallow_clone)),
        _ => (x.to_kind(Kind::Float), res.map(|r| r.to_kind(Kind::Float))),
    };
    let y = Tensor::empty([m, n], (Kind::Float, Device::Cpu));
    #[cfg(cpu_kernels)]
    {
        let res_ptr = res.as_ref().map_or(std::ptr::null(), |r| r.data_ptr() as *const f32);
        let (x_ptr, y_ptr, threads) = (x.data_ptr() as *const f32, y.data_ptr() as *mut f32, tch::get_num_threads());
        // SAFETY: x, y (and res) are contiguous float32 CPU tensors and w a
        // contiguous CPU tensor of `kind` (float32 or bfloat16, two bytes
        // each), of the shapes checked above, so every index the kernel uses
        // (m < M, j < N, k < K with the given leading dimensions) is in
        // bounds; y is fresh and overlaps nothing; nothing else touches them
        // during the call.
        let rc = unsafe {
            if kind == Kind::Float {
                ffi::prism_small_gemm(x_ptr, k, w.data_ptr() as *const f32, k, y_ptr, n, res_ptr, n, m, n, k, threads)
            } else {
                ffi::prism_small_gemm_bf16(x_ptr, k, w.data_ptr() as *const u16, k, y_ptr, n, res_ptr, n, m, n, k, threads)
            }
        };
        if rc == 0 {
            return Some(if kind == Kind::Float { y } else { y.to_kind(kind) });
        }
    }
    None
}

/// One decoder layer's parameters, as the decoding path holds them (fused
/// q/k/v and gate/up matrices).
pub(crate) struct LayerWeights<'a> {
    pub input_norm: &'a Tensor,
    pub qkv: &'a Tensor,
    pub qkv_bias: Option<&'a Tensor>,
    pub o: &'a Tensor,
    pub o_bias: Option<&'a Tensor>,
    pub post_norm: &'a Tensor,
    pub gate_up: &'a Tensor,
    pub gate_up_bias: Option<&'a Tensor>,
    pub down: &'a Tensor,
    pub down_bias: Option<&'a Tensor>,
}

/// What a decode step of one layer reads besides the weights.
pub(crate) struct DecodeStep<'a> {
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub eps: f64,
    /// `[B, 1, dim]`: the hidden state of each sequence's new token.
    pub x: &'a Tensor,
    /// `[B, 1, 1, head_dim]`: RoPE tables at each row's position (sin signed).
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// `[B, kv_heads, capacity, head_dim]`: the cache, written at `len`.
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
    pub len: i64,
    /// `[B, capacity]` bool, the positions a query may attend; `None` = all.
    pub key_mask: Option<&'a Tensor>,
}

/// Whether `t` is a contiguous CPU tensor of `kind` and exactly `shape`.
fn is(t: &Tensor, kind: Kind, shape: &[i64]) -> bool {
    t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() && t.size() == shape
}

#[cfg_attr(not(cpu_kernels), allow(dead_code))]
fn ptr(t: Option<&Tensor>) -> *const std::os::raw::c_void {
    t.map_or(std::ptr::null(), |t| t.data_ptr() as *const _)
}

/// The layer's output `[B, 1, dim]` for one new token per sequence, with its
/// key and value written into the cache at `len`, by the fused kernel; `None`
/// (nothing written) where it does not apply. Every tensor but the mask is
/// of the input's dtype, float32 or bfloat16.
pub(crate) fn decode_layer(w: &LayerWeights, s: &DecodeStep) -> Option<Tensor> {
    if !enabled().1 || grad_enabled() {
        return None;
    }
    let [b, one, d] = s.x.size()[..] else {
        return None;
    };
    let kind = s.x.kind();
    if !matches!(kind, Kind::Float | Kind::BFloat16) {
        return None;
    }
    let is = |t: &Tensor, shape: &[i64]| is(t, kind, shape);
    let (h, hkv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let (nq, f) = ((h + 2 * hkv) * hd, w.down.size().get(1).copied()?);
    let cap = s.keys.size().get(2).copied()?;
    let bias_ok = |t: Option<&Tensor>, n: i64| t.is_none_or(|t| is(t, &[n]));
    let mask_ok = s.key_mask.is_none_or(|m| {
        m.device() == Device::Cpu
            && m.kind() == Kind::Bool
            && m.is_contiguous()
            && m.size() == [b, cap]
    });
    let fits = one == 1
        && (1..=max_rows_for(kind)).contains(&b)
        && hkv > 0
        && h % hkv == 0
        && hd % 2 == 0
        && (0..cap).contains(&s.len)
        && is(s.x, &[b, 1, d])
        && is(s.cos, &[b, 1, 1, hd])
        && is(s.sin, &[b, 1, 1, hd])
        && is(s.keys, &[b, hkv, cap, hd])
        && is(s.values, &[b, hkv, cap, hd])
        && mask_ok
        && is(w.input_norm, &[d])
        && is(w.post_norm, &[d])
        && is(w.qkv, &[nq, d])
        && is(w.o, &[d, h * hd])
        && is(w.gate_up, &[2 * f, d])
        && is(w.down, &[d, f])
        && bias_ok(w.qkv_bias, nq)
        && bias_ok(w.o_bias, d)
        && bias_ok(w.gate_up_bias, 2 * f)
        && bias_ok(w.down_bias, d);
    if !fits {
        return None;
    }
    let out = Tensor::empty([b, 1, d], (kind, Device::Cpu));
    #[cfg(cpu_kernels)]
    {
        let p = ffi::DecodeLayer {
            batch: b,
            dim: d,
            heads: h,
            kv_heads: hkv,
            head_dim: hd,
            ffn: f,
            threads: tch::get_num_threads() as i64,
            bf16: i64::from(kind == Kind::BFloat16),
            eps: s.eps as f32,
            input_norm: ptr(Some(w.input_norm)),
            qkv: ptr(Some(w.qkv)),
            qkv_bias: ptr(w.qkv_bias),
            o: ptr(Some(w.o)),
            o_bias: ptr(w.o_bias),
            post_norm: ptr(Some(w.post_norm)),
            gate_up: ptr(Some(w.gate_up)),
            gate_up_bias: ptr(w.gate_up_bias),
            down: ptr(Some(w.down)),
            down_bias: ptr(w.down_bias),
            cos: ptr(Some(s.cos)),
            sin: ptr(Some(s.sin)),
            keys: s.keys.data_ptr(),
            values: s.values.data_ptr(),
            capacity: cap,
            len: s.len,
            key_mask: s
                .key_mask
                .map_or(std::ptr::null(), |m| m.data_ptr() as *const u8),
            x: ptr(Some(s.x)),
            out: out.data_ptr(),
        };
        // SAFETY: every pointer is the start of a contiguous CPU tensor of the
        // dtype and shape checked above (bool is one byte), which is every
        // extent the kernel indexes; `out` is fresh; the cache tensors are
        // written only at position `len` < capacity; nothing else touches
        // these tensors during the call (the model is borrowed).
        if unsafe { ffi::prism_decode_layer(&p) } == 0 {
            return Some(out);
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
            eprintln!("skipped: the CPU kernels are not available on this machine");
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

    /// bfloat16 weights (and rows and residuals): the float32 product of the
    /// bf16 values, rounded once to bf16, as torch's bf16 `addmm`.
    #[test]
    fn bf16_matches_the_float32_product_of_its_values_rounded_once() {
        if max_rows() == 0 {
            eprintln!("skipped: the CPU kernels are not available on this machine");
            return;
        }
        let _guard = tch::no_grad_guard();
        tch::manual_seed(4);
        let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
        let w = bf(Tensor::randn([37, 50], (Kind::Float, Device::Cpu)));
        for m in [1, 2, 5, 15, 16] {
            let x = bf(Tensor::randn([m, 50], (Kind::Float, Device::Cpu)));
            let res = bf(Tensor::randn([m, 37], (Kind::Float, Device::Cpu)));
            let exact = x.to_kind(Kind::Float).linear(&w.to_kind(Kind::Float), None::<&Tensor>);
            for (got, want) in [
                (linear(&x, &w, None).expect("applies"), &exact + 0.0),
                (linear(&x, &w, Some(&res)).expect("applies"), &exact + res.to_kind(Kind::Float)),
            ] {
                assert_eq!(got.kind(), Kind::BFloat16);
                // Rounded once: within half a bf16 step (2⁻⁸ relative) of
                // the exact sum, up to float32's order of summation.
                let err = ((got.to_kind(Kind::Float) - &want).abs() / (want.abs() + 1e-3)).max().double_value(&[]);
                assert!(err <= 2f64.powi(-8) * 1.01, "M={m}: relative error {err}");
            }
        }
        // More rows than it takes in bf16 go to torch.
        assert!(linear(&bf(Tensor::randn([17, 50], (Kind::Float, Device::Cpu))), &w, None).is_none(), "17 bf16 rows");
        // A bf16 matrix with float32 rows is not the kernel's.
        assert!(linear(&Tensor::randn([2, 50], (Kind::Float, Device::Cpu)), &w, None).is_none(), "mixed dtypes");
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
