// The small-batch matrix product shared by small_gemm.cpp (one product) and
// decode_layer.cpp (a whole decode step of a layer): y = res + x · wᵀ for up
// to 64 rows of x, w as torch stores it ([N, K] row-major), x, y and res in
// float32, w in float32 or bfloat16 (`uint16_t`, widened to float32 as it is
// loaded: a decode step is bound by reading w, so half the bytes is nearly
// half the time; the arithmetic stays float32, as torch's bf16 products
// accumulate in float32).
//
// A block of 6 rows of w is dotted with up to 4 rows of x at a time (24
// accumulators, 10 loads per 24 FMAs, a horizontal sum per output at the end);
// passes over further rows of x find the block in L1, so w is read from memory
// once per call, and the next block is prefetched while one is computed (its
// rows are too short for the hardware prefetcher). Everything here is compiled
// for AVX-512 (F, BW, VL) and FMA; callers check prism_small_gemm_supported()
// first.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#define PRISM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))

namespace prism {

constexpr int kLanes = 16;
// Rows of w per block, and rows of x per micro-kernel call: R × MB
// accumulators, R + MB loads per 16 k (6 × 4 and 4 × 6 measured alike; 8 × 3
// slower at 16 rows).
constexpr int kR = 6;
constexpr int kMB = 4;
constexpr int64_t kMaxRows = 64;

// bfloat16 as stored: the high half of a float32.
using bf16 = uint16_t;

PRISM_AVX512 inline float to_f32(float v) { return v; }
PRISM_AVX512 inline float to_f32(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// v rounded to T's precision, to nearest even (as torch converts), NaN kept.
template <typename T>
PRISM_AVX512 inline T from_f32(float v);
template <>
PRISM_AVX512 inline float from_f32<float>(float v) { return v; }
template <>
PRISM_AVX512 inline bf16 from_f32<bf16>(float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<bf16>(bits >> 16);
}

// v as T would hold it, back in float32 (identity for float32).
template <typename T>
PRISM_AVX512 inline float round_to(float v) { return to_f32(from_f32<T>(v)); }

// 16 lanes of w from memory, as float32; `mask` loads the first lanes only.
PRISM_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
PRISM_AVX512 inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
PRISM_AVX512 inline __m512 load16(__mmask16 mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
PRISM_AVX512 inline __m512 load16(__mmask16 mask, const bf16* p) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc[r][m] = sum_k w[r][k] x[m][k] for R rows of w and MB rows of x,
// 16 k at a time (the tail of K under a mask), summed across lanes at the end.
// `next` (or null) is the next block's first row, fetched into cache meanwhile.
template <int R, int MB, typename W>
PRISM_AVX512 inline void micro(const W* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, const W* next,
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
      const __m512 wv = load16(w + r * ldw + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load16(mask, w + r * ldw + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// Rows [j0, j0 + R) of y, every m < M, for w [N, K] contiguous; bias (or
// null) indexed by j; each output rounded to R_'s precision.
template <int R, typename W, typename B, typename R_>
PRISM_AVX512 inline void rows(const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy,
                              const float* res, int64_t ldr, const B* bias, int64_t M, int64_t N, int64_t j0) {
  float out[R][kMB];
  for (int64_t m0 = 0; m0 < M; m0 += kMB) {
    const float* xm = x + m0 * ldx;
    const W* wj = w + j0 * K;
    // The first pass over the block brings it in; later ones find it cached.
    const W* next = m0 == 0 && j0 + 2 * R <= N ? wj + R * K : nullptr;
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
        if (bias) v += to_f32(bias[j0 + r]);
        dst[r] = round_to<R_>(v);
      }
    }
  }
}

// y = res + x · wᵀ (+ bias) for M <= 64 rows of x (leading dimension ldx) and
// w [N, K] contiguous; res (or null) [M, N] with leading dimension ldr; each
// output rounded to R's precision (R = float: none), as a product in R that
// accumulates in float32 rounds it once.
// Must be called by every thread of an OpenMP team (or outside one): the
// row blocks are shared out by an orphaned `omp for`, which ends in a barrier.
template <typename R = float, typename W, typename B>
PRISM_AVX512 inline void gemm_for(const float* x, int64_t ldx, const W* w, int64_t K, float* y, int64_t ldy,
                                  const float* res, int64_t ldr, const B* bias, int64_t M, int64_t N) {
  const int64_t blocks = N / kR;
  const int64_t items = blocks + N % kR;
#pragma omp for schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    if (i < blocks)
      rows<kR, W, B, R>(x, ldx, w, K, y, ldy, res, ldr, bias, M, N, i * kR);
    else
      rows<1, W, B, R>(x, ldx, w, K, y, ldy, res, ldr, bias, M, N, blocks * kR + (i - blocks));
  }
}

}  // namespace prism
