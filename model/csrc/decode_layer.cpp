// One decoder layer for one new token per sequence, on the CPU, in a single
// call, with every tensor in float32 or every tensor in bfloat16: what transformer.rs's Layer::forward does with torch for a
// decode step (RMSNorm, fused q/k/v product and bias, rotate-half RoPE, the
// key/value cache write, grouped-query attention under the cache's key mask,
// the output product and residual, RMSNorm, fused gate/up product, SwiGLU,
// the down product and residual), where torch spends more time dispatching
// its ~40 small operations than computing them. One OpenMP team (torch's pool)
// runs every stage; each stage's work is shared out by `omp for`, whose
// barrier ends it. The products are gemm.h's kernel.
//
// The arithmetic follows the torch path: RMSNorm as weight * (x * rsqrt(mean(x²)
// + eps)); RoPE as x * cos + roll(x, half) * signed_sin; attention scaled by
// 1/sqrt(head_dim), softmax over the keys the mask admits (the new token's own
// key always), in float32. Only the order of summation differs.
//
// In bfloat16 the arithmetic is float32 too, and each value is rounded to
// bfloat16 where torch's bfloat16 path stores one (a product's output, the
// norm before and after its weight, each RoPE term, the attention output, the
// activation and the gated product, each residual sum), so the two paths
// differ by the order of summation and by torch's own float32 stretches
// (softmax, the product accumulators) alone.

#include <omp.h>

#include <cmath>
#include <vector>

#include "gemm.h"

extern "C" {

// Everything one call reads and writes; every matrix row-major and contiguous,
// every tensor but the mask of the one dtype `bf16` names.
struct PrismDecodeLayer {
  int64_t batch, dim, heads, kv_heads, head_dim, ffn;
  int64_t threads;           // OpenMP threads to use (torch's intra-op count)
  int64_t bf16;              // 1: the tensors hold bfloat16; 0: float32
  float eps;
  const void* input_norm;    // [dim]
  const void* qkv;           // [(heads + 2 kv_heads) head_dim, dim]
  const void* qkv_bias;      // [(heads + 2 kv_heads) head_dim] or null
  const void* o;             // [dim, heads head_dim]
  const void* o_bias;        // [dim] or null
  const void* post_norm;     // [dim]
  const void* gate_up;       // [2 ffn, dim]
  const void* gate_up_bias;  // [2 ffn] or null
  const void* down;          // [dim, ffn]
  const void* down_bias;     // [dim] or null
  const void* cos;           // [batch, head_dim]: each row's position
  const void* sin;           // [batch, head_dim], first half negated
  void* keys;                // [batch, kv_heads, capacity, head_dim]
  void* values;              // [batch, kv_heads, capacity, head_dim]
  int64_t capacity;
  int64_t len;               // positions already cached; the new one goes at len
  const uint8_t* key_mask;   // [batch, capacity], nonzero = may attend; null = all
  const void* x;             // [batch, dim]
  void* out;                 // [batch, dim]
};

}  // extern "C"

namespace {

using prism::round_to;
using prism::to_f32;

// The widest head the kernel takes (a key is rotated on the stack).
constexpr int64_t kMaxHeadDim = 512;

// y[b] = w * (x[b] * rsqrt(mean(x[b]²) + eps)) for the rows shared out; in
// bfloat16 (T) the normed row is rounded before the weight and after it.
template <typename T, typename X>
PRISM_AVX512 void rms_norm_for(const X* x, const T* w, float* y, int64_t batch, int64_t dim, float eps) {
#pragma omp for schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const X* xb = x + b * dim;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) ss += to_f32(xb[i]) * to_f32(xb[i]);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    float* yb = y + b * dim;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) yb[i] = round_to<T>(to_f32(w[i]) * round_to<T>(to_f32(xb[i]) * r));
  }
}

// out = x * cos + roll(x, half) * signed_sin over one head (in T's precision:
// the first term rounded, then the sum, as torch's mul and addcmul).
template <typename T>
PRISM_AVX512 inline void rope(const float* x, const T* cos, const T* sin, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i)
    out[i] = round_to<T>(round_to<T>(x[i] * to_f32(cos[i])) + x[i < half ? i + half : i - half] * to_f32(sin[i]));
}

template <typename T>
PRISM_AVX512 inline float dot(const float* a, const T* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

template <typename T>
PRISM_AVX512 int decode_layer(const PrismDecodeLayer* p) {
  const int64_t B = p->batch, d = p->dim, h = p->heads, hkv = p->kv_heads, hd = p->head_dim, f = p->ffn;
  if (B < 1 || B > prism::kMaxRows || h % hkv != 0 || hd % 2 != 0 || hd > kMaxHeadDim) return -1;
  const int64_t nq = (h + 2 * hkv) * hd, group = h / hkv, S = p->len + 1, cap = p->capacity;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const auto in = [](const void* t) { return static_cast<const T*>(t); };
  const T* x = in(p->x);
  T* keys = static_cast<T*>(p->keys);
  T* values = static_cast<T*>(p->values);
  T* out = static_cast<T*>(p->out);
  // Scratch, grown once per calling thread.
  thread_local std::vector<float> scratch;
  const int threads = p->threads < 1 ? 1 : static_cast<int>(p->threads);
  const int64_t need = B * d * 4 + B * nq + B * h * hd * 2 + B * 2 * f + B * f + threads * S;
  if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
  float* xn = scratch.data();    // [B, d], normed input of either half
  float* x1 = xn + B * d;        // [B, d], after attention
  float* xf = x1 + B * d;        // [B, d], the input in float32
  float* yf = xf + B * d;        // [B, d], the output in float32
  float* qkv = yf + B * d;       // [B, nq]
  float* q = qkv + B * nq;       // [B, h, hd], rotated queries
  float* att = q + B * h * hd;   // [B, h, hd], attention output
  float* gu = att + B * h * hd;  // [B, 2f]
  float* hid = gu + B * 2 * f;   // [B, f]
  float* scores = hid + B * f;   // [threads, S]
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * d; ++i) xf[i] = to_f32(x[i]);
    rms_norm_for(x, in(p->input_norm), xn, B, d, p->eps);
    prism::gemm_for<T>(xn, d, in(p->qkv), d, qkv, nq, nullptr, 0, in(p->qkv_bias), B, nq);
    // RoPE of every query and key head; keys and values into the cache.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * (h + hkv); ++i) {
      const int64_t b = i / (h + hkv), head = i % (h + hkv);
      const float* src = qkv + b * nq + head * hd;
      const T* c = in(p->cos) + b * hd;
      const T* s = in(p->sin) + b * hd;
      float* dst = q + (b * h + head) * hd;
      if (head < h) {
        rope(src, c, s, dst, hd);
      } else {
        const int64_t g = head - h;
        const int64_t at = ((b * hkv + g) * cap + p->len) * hd;
        float rotated[kMaxHeadDim];
        rope(src, c, s, rotated, hd);
        const float* v = qkv + b * nq + (h + hkv + g) * hd;
        for (int64_t j = 0; j < hd; ++j) {
          keys[at + j] = prism::from_f32<T>(rotated[j]);
          values[at + j] = prism::from_f32<T>(v[j]);
        }
      }
    }
    // Attention: query head j reads key/value head j / group (repeat_kv's pairing).
    float* sc = scores + omp_get_thread_num() * S;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * h; ++i) {
      const int64_t b = i / h, head = i % h, g = head / group;
      const float* qi = q + i * hd;
      const T* kb = keys + (b * hkv + g) * cap * hd;
      const T* vb = values + (b * hkv + g) * cap * hd;
      const uint8_t* mask = p->key_mask ? p->key_mask + b * cap : nullptr;
      float top = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (mask && s < p->len && !mask[s]) {
          sc[s] = -INFINITY;
          continue;
        }
        sc[s] = dot(qi, kb + s * hd, hd) * scale;
        top = std::max(top, sc[s]);
      }
      float total = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        sc[s] = sc[s] == -INFINITY ? 0.0f : std::exp(sc[s] - top);
        total += sc[s];
      }
      float* yi = att + i * hd;
      for (int64_t j = 0; j < hd; ++j) yi[j] = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        const float w = sc[s] / total;
        if (w == 0.0f) continue;
        const T* vs = vb + s * hd;
#pragma omp simd
        for (int64_t j = 0; j < hd; ++j) yi[j] += w * to_f32(vs[j]);
      }
      for (int64_t j = 0; j < hd; ++j) yi[j] = round_to<T>(yi[j]);
    }
    prism::gemm_for<T>(att, h * hd, in(p->o), h * hd, x1, d, xf, d, in(p->o_bias), B, d);
    rms_norm_for(static_cast<const float*>(x1), in(p->post_norm), xn, B, d, p->eps);
    prism::gemm_for<T>(xn, d, in(p->gate_up), d, gu, 2 * f, nullptr, 0, in(p->gate_up_bias), B, 2 * f);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B; ++i) {
      const float* g = gu + i * 2 * f;
      const float* u = g + f;
      float* y = hid + i * f;
      for (int64_t j = 0; j < f; ++j) y[j] = round_to<T>(round_to<T>(g[j] / (1.0f + std::exp(-g[j]))) * u[j]);
    }
    prism::gemm_for<T>(hid, f, in(p->down), f, yf, d, x1, d, in(p->down_bias), B, d);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * d; ++i) out[i] = prism::from_f32<T>(yf[i]);
  }
  return 0;
}

}  // namespace

extern "C" {

// Runs the layer; returns 0, or -1 when the batch or the head is out of the
// kernel's range (nothing is written).
PRISM_AVX512 int prism_decode_layer(const PrismDecodeLayer* p) {
  return p->bf16 ? decode_layer<prism::bf16>(p) : decode_layer<float>(p);
}

}  // extern "C"
