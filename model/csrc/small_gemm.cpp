// y = res + x · wᵀ for a few rows of x, in float32: the matrix products of a
// decode step of 1 to 64 sequences, where MKL's sgemm (with w as torch stores
// it, [N, K] row-major) reaches about a fifth of the machine's FMA rate.
//
// A block of 6 rows of w is dotted with up to 4 rows of x at a time (24
// accumulators, 10 loads per 24 FMAs, a horizontal sum per output at the end);
// passes over further rows of x find the block in L1, so w is read from memory
// once per call, and the next block is prefetched while one is computed (its
// rows are too short for the hardware prefetcher). Row blocks are split over
// torch's OpenMP threads (the same pool, so no thread competes with torch's).
//
// Built with -fopenmp; only the kernels are compiled for AVX-512, and
// prism_small_gemm_supported() says whether this CPU runs them.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;
// Rows of w per block, and rows of x per micro-kernel call: R × MB
// accumulators, R + MB loads per 16 k (6 × 4 and 4 × 6 measured alike; 8 × 3
// slower at 16 rows).
constexpr int kR = 6;
constexpr int kMB = 4;

// acc[r][m] = sum_k w[r][k] x[m][k] for R rows of w and MB rows of x,
// 16 k at a time (the tail of K under a mask), summed across lanes at the end.
// `next` (or null) is the next block's first row, fetched into cache meanwhile:
// a block's rows are too short for the hardware prefetcher to pick them up.
template <int R, int MB>
__attribute__((target("avx512f,fma"))) void micro(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K,
                                                   const float* next, float out[R][kMB]) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
    if (next)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * ldw + k), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * ldw + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, w + r * ldw + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// Rows [j0, j0 + R) of y, every m < M.
template <int R>
void rows(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, const float* res, int64_t ldr,
          int64_t M, int64_t N, int64_t K, int64_t j0) {
  float out[R][kMB];
  for (int64_t m0 = 0; m0 < M; m0 += kMB) {
    const float* xm = x + m0 * ldx;
    const float* wj = w + j0 * ldw;
    // The first pass over the block brings it in; later ones find it cached.
    const float* next = m0 == 0 && j0 + 2 * R <= N ? wj + R * ldw : nullptr;
    const int64_t mb = std::min<int64_t>(kMB, M - m0);
    switch (mb) {
      case 1: micro<R, 1>(wj, ldw, xm, ldx, K, next, out); break;
      case 2: micro<R, 2>(wj, ldw, xm, ldx, K, next, out); break;
      case 3: micro<R, 3>(wj, ldw, xm, ldx, K, next, out); break;
      default: micro<R, kMB>(wj, ldw, xm, ldx, K, next, out); break;
    }
    for (int64_t m = 0; m < mb; ++m) {
      float* dst = y + (m0 + m) * ldy + j0;
      const float* add = res ? res + (m0 + m) * ldr + j0 : nullptr;
      for (int r = 0; r < R; ++r) dst[r] = (add ? add[r] : 0.0f) + out[r][m];
    }
  }
}

}  // namespace

extern "C" {

// 1 when this CPU has AVX-512F and FMA, else 0.
int prism_small_gemm_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

// The most rows of x one call takes.
int64_t prism_small_gemm_max_rows() { return 64; }

// y[m][j] = (res ? res[m][j] : 0) + sum_k x[m][k] w[j][k] for m < M <= 64,
// j < N; leading dimensions in elements. Returns 0, or -1 when M is out of
// range (nothing is written).
int prism_small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, float* y, int64_t ldy, const float* res,
                     int64_t ldr, int64_t M, int64_t N, int64_t K) {
  if (M < 1 || M > 64) return -1;
  const int64_t blocks = N / kR;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) rows<kR>(x, ldx, w, ldw, y, ldy, res, ldr, M, N, K, b * kR);
  for (int64_t j = blocks * kR; j < N; ++j) rows<1>(x, ldx, w, ldw, y, ldy, res, ldr, M, N, K, j);
  return 0;
}

}  // extern "C"
