// One decoder layer for one new token per sequence, in float32 on the CPU, in
// a single call: what transformer.rs's Layer::forward does with torch for a
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

#include <omp.h>

#include <cmath>
#include <vector>

#include "gemm.h"

extern "C" {

// Everything one call reads and writes; every matrix row-major and contiguous.
struct PrismDecodeLayer {
  int64_t batch, dim, heads, kv_heads, head_dim, ffn;
  int64_t threads;            // OpenMP threads to use (torch's intra-op count)
  float eps;
  const float* input_norm;    // [dim]
  const float* qkv;           // [(heads + 2 kv_heads) head_dim, dim]
  const float* qkv_bias;      // [(heads + 2 kv_heads) head_dim] or null
  const float* o;             // [dim, heads head_dim]
  const float* o_bias;        // [dim] or null
  const float* post_norm;     // [dim]
  const float* gate_up;       // [2 ffn, dim]
  const float* gate_up_bias;  // [2 ffn] or null
  const float* down;          // [dim, ffn]
  const float* down_bias;     // [dim] or null
  const float* cos;           // [batch, head_dim]: each row's position
  const float* sin;           // [batch, head_dim], first half negated
  float* keys;                // [batch, kv_heads, capacity, head_dim]
  float* values;              // [batch, kv_heads, capacity, head_dim]
  int64_t capacity;
  int64_t len;                // positions already cached; the new one goes at len
  const uint8_t* key_mask;    // [batch, capacity], nonzero = may attend; null = all
  const float* x;             // [batch, dim]
  float* out;                 // [batch, dim]
};

}  // extern "C"

namespace {

// y[b] = w * (x[b] * rsqrt(mean(x[b]²) + eps)) for the rows shared out.
PRISM_AVX512 void rms_norm_for(const float* x, const float* w, float* y, int64_t batch, int64_t dim, float eps) {
#pragma omp for schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * dim;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < dim; ++i) ss += xb[i] * xb[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    float* yb = y + b * dim;
#pragma omp simd
    for (int64_t i = 0; i < dim; ++i) yb[i] = w[i] * (xb[i] * r);
  }
}

// out = x * cos + roll(x, half) * signed_sin over one head.
PRISM_AVX512 inline void rope(const float* x, const float* cos, const float* sin, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < hd; ++i) out[i] = x[i] * cos[i] + x[i < half ? i + half : i - half] * sin[i];
}

PRISM_AVX512 inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

extern "C" {

// Runs the layer; returns 0, or -1 when the batch is out of the kernel's
// range (nothing is written).
PRISM_AVX512 int prism_decode_layer(const PrismDecodeLayer* p) {
  const int64_t B = p->batch, d = p->dim, h = p->heads, hkv = p->kv_heads, hd = p->head_dim, f = p->ffn;
  if (B < 1 || B > prism::kMaxRows || h % hkv != 0 || hd % 2 != 0) return -1;
  const int64_t nq = (h + 2 * hkv) * hd, group = h / hkv, S = p->len + 1, cap = p->capacity;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // Scratch, grown once per calling thread.
  thread_local std::vector<float> scratch;
  const int threads = p->threads < 1 ? 1 : static_cast<int>(p->threads);
  const int64_t need = B * d * 2 + B * nq + B * h * hd * 2 + B * 2 * f + B * f + threads * S;
  if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
  float* xn = scratch.data();    // [B, d], normed input of either half
  float* x1 = xn + B * d;        // [B, d], after attention
  float* qkv = x1 + B * d;       // [B, nq]
  float* q = qkv + B * nq;       // [B, h, hd], rotated queries
  float* att = q + B * h * hd;   // [B, h, hd], attention output
  float* gu = att + B * h * hd;  // [B, 2f]
  float* hid = gu + B * 2 * f;   // [B, f]
  float* scores = hid + B * f;   // [threads, S]
#pragma omp parallel num_threads(threads)
  {
    rms_norm_for(p->x, p->input_norm, xn, B, d, p->eps);
    prism::gemm_for(xn, d, p->qkv, d, qkv, nq, nullptr, 0, p->qkv_bias, B, nq);
    // RoPE of every query and key head; keys and values into the cache.
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * (h + hkv); ++i) {
      const int64_t b = i / (h + hkv), head = i % (h + hkv);
      const float* src = qkv + b * nq + head * hd;
      const float* c = p->cos + b * hd;
      const float* s = p->sin + b * hd;
      if (head < h) {
        rope(src, c, s, q + (b * h + head) * hd, hd);
      } else {
        const int64_t g = head - h;
        const int64_t at = ((b * hkv + g) * cap + p->len) * hd;
        rope(src, c, s, p->keys + at, hd);
        const float* v = qkv + b * nq + (h + hkv + g) * hd;
        for (int64_t j = 0; j < hd; ++j) p->values[at + j] = v[j];
      }
    }
    // Attention: query head j reads key/value head j / group (repeat_kv's pairing).
    float* sc = scores + omp_get_thread_num() * S;
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * h; ++i) {
      const int64_t b = i / h, head = i % h, g = head / group;
      const float* qi = q + i * hd;
      const float* kb = p->keys + (b * hkv + g) * cap * hd;
      const float* vb = p->values + (b * hkv + g) * cap * hd;
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
        const float* vs = vb + s * hd;
#pragma omp simd
        for (int64_t j = 0; j < hd; ++j) yi[j] += w * vs[j];
      }
    }
    prism::gemm_for(att, h * hd, p->o, h * hd, x1, d, p->x, d, p->o_bias, B, d);
    rms_norm_for(x1, p->post_norm, xn, B, d, p->eps);
    prism::gemm_for(xn, d, p->gate_up, d, gu, 2 * f, nullptr, 0, p->gate_up_bias, B, 2 * f);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B; ++i) {
      const float* g = gu + i * 2 * f;
      const float* u = g + f;
      float* y = hid + i * f;
      for (int64_t j = 0; j < f; ++j) y[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
    prism::gemm_for(hid, f, p->down, f, p->out, d, x1, d, p->down_bias, B, d);
  }
  return 0;
}

}  // extern "C"
