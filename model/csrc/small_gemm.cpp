// y = res + x · wᵀ for a few rows of x, in float32 (w in float32 or
// bfloat16): the matrix products of a decode step of 1 to 64 sequences, where MKL's sgemm (with w as torch stores
// it, [N, K] row-major) reaches about a fifth of the machine's FMA rate. The
// kernel is in gemm.h; row blocks are split over torch's OpenMP threads (the
// same pool, so no thread competes with torch's).
//
// Built with -fopenmp; only the kernels are compiled for AVX-512, and
// prism_small_gemm_supported() says whether this CPU runs them.

#include <omp.h>

#include "gemm.h"

extern "C" {

// 1 when this CPU has AVX-512 (F, BW, VL) and FMA, else 0.
int prism_small_gemm_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
}

// The most rows of x one call takes.
int64_t prism_small_gemm_max_rows() { return prism::kMaxRows; }

// y[m][j] = (res ? res[m][j] : 0) + sum_k x[m][k] w[j][k] for m < M <= 64,
// j < N; leading dimensions in elements, w contiguous (ldw = K), on
// `threads` OpenMP threads (torch's intra-op count: a thread's own OpenMP
// default is all cores). Returns 0, or -1 when M is out of range or w is
// strided (nothing is written).
PRISM_AVX512 int prism_small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy,
                                  const float* res, int64_t ldr, int64_t M, int64_t N, int64_t K, int threads) {
  if (M < 1 || M > prism::kMaxRows || ldw != K) return -1;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
  prism::gemm_for(x, ldx, w, K, y, ldy, res, ldr, static_cast<const float*>(nullptr), M, N);
  return 0;
}

// prism_small_gemm with w in bfloat16 (x, y and res float32; y not rounded).
PRISM_AVX512 int prism_small_gemm_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t ldw, float* y,
                                       int64_t ldy, const float* res, int64_t ldr, int64_t M, int64_t N, int64_t K,
                                       int threads) {
  if (M < 1 || M > prism::kMaxRows || ldw != K) return -1;
#pragma omp parallel num_threads(threads < 1 ? 1 : threads)
  prism::gemm_for(x, ldx, w, K, y, ldy, res, ldr, static_cast<const float*>(nullptr), M, N);
  return 0;
}

}  // extern "C"
