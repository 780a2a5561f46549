// The small-batch float32 matrix product shared by small_gemm.cpp (one product)
// and decode_layer.cpp (a whole decode step of a layer): y = res + x · wᵀ for
// up to 64 rows of x, w as torch stores it ([N, K] row-major).
//
// A block of 6 rows of w is dotted with up to 4 rows of x at a time (24
// accumulators, 10 loads per 24 FMAs, a horizontal sum per output at the end);
// passes over further rows of x find the block in L1, so w is read from memory
// once per call, and the next block is prefetched while one is computed (its
// rows are too short for the hardware prefetcher). Everything here is compiled
// for AVX-512 and FMA; callers check prism_small_gemm_supported() first.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define PRISM_AVX512 __attribute__((target("avx512f,fma")))

namespace prism {

constexpr int kLanes = 16;
// Rows of w per block, and rows of x per micro-kernel call: R × MB
// accumulators, R + MB loads per 16 k (6 × 4 and 4 × 6 measured alike; 8 × 3
// slower at 16 rows).
constexpr int kR = 6;
constexpr int kMB = 4;
constexpr int64_t kMaxRows = 64;

// acc[r][m] = sum_k w[r][k] x[m][k] for R rows of w and MB rows of x,
// 16 k at a time (the tail of K under a mask), summed across lanes at the end.
// `next` (or null) is the next block's first row, fetched into cache meanwhile.
template <int R, int MB>
PRISM_AVX512 inline void micro(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, const float* next,
                               float out[R][kMB]) {
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

// Rows [j0, j0 + R) of y, every m < M, for w [N, K] contiguous; bias (or
// null) indexed by j.
template <int R>
PRISM_AVX512 inline void rows(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                              const float* res, int64_t ldr, const float* bias, int64_t M, int64_t N, int64_t j0) {
  float out[R][kMB];
  for (int64_t m0 = 0; m0 < M; m0 += kMB) {
    const float* xm = x + m0 * ldx;
    const float* wj = w + j0 * K;
    // The first pass over the block brings it in; later ones find it cached.
    const float* next = m0 == 0 && j0 + 2 * R <= N ? wj + R * K : nullptr;
    const int64_t mb = std::min<int64_t>(kMB, M - m0);
    switch (mb) {
      case 1: micro<R, 1>(wj, K, xm, ldx, K, next, out); break;
      case 2: micro<R, 2>(wj, K, xm, ldx, K, next, out); break;
      case 3: micro<R, 3>(wj, K, xm, ldx, K, next, out); break;
      default: micro<R, kMB>(wj, K, xm, ldx, K, next, out); break;
    }
    for (int64_t m = 0; m < mb; ++m) {
      float* dst = y + (m0 + m) * ldy + j0;
      const float* add = res ? res + (m0 + m) * ldr + j0 : nullptr;
      for (int r = 0; r < R; ++r) {
        float v = (add ? add[r] : 0.0f) + out[r][m];
        if (bias) v += bias[j0 + r];
        dst[r] = v;
      }
    }
  }
}

// y = res + x · wᵀ (+ bias) for M <= 64 rows of x (leading dimension ldx) and
// w [N, K] contiguous; res (or null) [M, N] with leading dimension ldr.
// Must be called by every thread of an OpenMP team (or outside one): the
// row blocks are shared out by an orphaned `omp for`, which ends in a barrier.
PRISM_AVX512 inline void gemm_for(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                                  const float* res, int64_t ldr, const float* bias, int64_t M, int64_t N) {
  const int64_t blocks = N / kR;
  const int64_t items = blocks + N % kR;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    if (i < blocks)
      rows<kR>(x, ldx, w, K, y, ldy, res, ldr, bias, M, N, i * kR);
    else
      rows<1>(x, ldx, w, K, y, ldy, res, ldr, bias, M, N, blocks * kR + (i - blocks));
  }
}

}  // namespace prism
