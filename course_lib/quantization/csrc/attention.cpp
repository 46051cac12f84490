// One decode step's attention over a static KV cache (AVX-512): a new token's query against the filled slots.
//
// At decode a query is one row, so attention is two matrix-vector products over the cache (the keys times q,
// then the weights times the values) with a softmax between. PyTorch's fused attention call is built for many
// rows: at one row, over a cache of a few hundred slots, its fixed cost per call is most of its time, and the
// compiled step's mask reads every slot, filled or not. This kernel reads only the filled slots (their count from
// a 0-d tensor, so one graph serves every step), maps each query head to its key/value head (grouped-query
// attention) without copying the cache, and works in float32.
//
// Registered as torch.ops.course_lib.decode_attention beside the GEMV kernels (csrc/gemv.cpp), built with them.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include "load16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using course_lib_native::load16;

// e^x for x <= 0 (scores minus their maximum): 2^(x log2 e) as 2^n times a degree-7 Taylor polynomial of 2^f,
// |f| <= 1/2 (relative error under 1e-8); far below zero it underflows to 0, as exp does
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Scores of C query heads that share one key head against rows 0..n-1 of K: scores[c * ss + j] = scale q_c . k_j.
// Each key row is converted to float32 once for all C queries; each query's sum runs in the same order whatever
// C is (one accumulator over d, then a horizontal add), so grouping never changes a score.
template <int C, typename T>
void scores_of(const float* q, const T* k, int64_t n, int64_t D, float scale, float* scores, int64_t ss) {
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = k + j * D;
    __m512 a[C];
    for (int c = 0; c < C; ++c) a[c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 kd = load16(kr + d);
      for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(_mm512_loadu_ps(q + c * D + d), kd, a[c]);
    }
    for (int c = 0; c < C; ++c) scores[c * ss + j] = _mm512_reduce_add_ps(a[c]) * scale;
  }
}

// scores[0..n) -> e^(s - max) in place; returns 1 / their sum
inline float softmax_weights(float* scores, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, scores[j]);
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sv = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + j), mv));
    _mm512_storeu_ps(scores + j, e);
    sv = _mm512_add_ps(sv, e);
  }
  if (j < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + j), mv)));
    _mm512_mask_storeu_ps(scores + j, tail, e);
    sv = _mm512_add_ps(sv, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sv);
}

// out[d0 .. d0 + 16 NB) = inv * sum_r w[r] v[r, d0 ..]: NB independent sums (one per 16 columns), each over r in
// order, so the rows' latency overlaps and every column's sum is the same as one accumulator's would be.
template <int NB, typename T>
void weighted_rows(const float* w, const T* v, int64_t n, int64_t D, int64_t d0, float inv, float* out) {
  __m512 acc[NB];
  for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps();
  for (int64_t r = 0; r < n; ++r) {
    const __m512 s = _mm512_set1_ps(w[r]);
    const T* vr = v + r * D + d0;
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_fmadd_ps(s, load16(vr + 16 * b), acc[b]);
  }
  for (int b = 0; b < NB; ++b) _mm512_storeu_ps(out + d0 + 16 * b, _mm512_mul_ps(acc[b], _mm512_set1_ps(inv)));
}

// C query heads sharing one key/value head: out_c = softmax(scale K q_c) V over the first n rows of K and V.
// q and out are C x D float32; scores holds C x n.
template <typename T>
void heads(const float* q, int C, const T* k, const T* v, int64_t n, int64_t D, float scale, float* scores,
           float* out) {
  for (int c0 = 0; c0 < C; c0 += 4) {  // keys converted once per four queries
    const float* qc = q + c0 * D;
    float* sc = scores + c0 * n;
    switch (std::min(4, C - c0)) {
      case 1: scores_of<1>(qc, k, n, D, scale, sc, n); break;
      case 2: scores_of<2>(qc, k, n, D, scale, sc, n); break;
      case 3: scores_of<3>(qc, k, n, D, scale, sc, n); break;
      default: scores_of<4>(qc, k, n, D, scale, sc, n); break;
    }
  }
  for (int c = 0; c < C; ++c) {
    float* w = scores + c * n;
    const float inv = softmax_weights(w, n);
    for (int64_t d0 = 0; d0 < D;) {
      switch (std::min<int64_t>(4, (D - d0) / 16)) {
        case 1: weighted_rows<1>(w, v, n, D, d0, inv, out + c * D); d0 += 16; break;
        case 2: weighted_rows<2>(w, v, n, D, d0, inv, out + c * D); d0 += 32; break;
        case 3: weighted_rows<3>(w, v, n, D, d0, inv, out + c * D); d0 += 48; break;
        default: weighted_rows<4>(w, v, n, D, d0, inv, out + c * D); d0 += 64; break;
      }
    }
  }
}

// q (B, H, T, D), read in place where its last stride is 1 (copied otherwise): T new tokens at slots slot .. slot + T - 1 (T > 1:
// a speculative verification pass), query t seeing slots [0, slot + t]; k, v (B, Hkv, L, D); H a multiple of
// Hkv. Returns (B, H, T, D), contiguous, in q's dtype. A query is computed by the same arithmetic whatever T is
// and whichever heads share its work item, so a verification pass scores a token exactly as a one-token step does.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slot,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) >= 1, "q must be (batch, heads, new tokens, head_dim), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "k and v must be (batch, kv_heads, slots, head_dim), alike");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "k/v (", k.sizes(), ") do not match q (", q.sizes(), ")");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "query heads (", H, ") must be a multiple of key/value heads (", Hkv, ")");
  TORCH_CHECK(D % 16 == 0, "head_dim must be a multiple of 16, got ", D);
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v must have one dtype");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D &&
                  k.stride(1) == v.stride(1) && k.stride(0) == v.stride(0),
              "k and v must be contiguous caches");
  TORCH_CHECK(slot.numel() == 1, "slot must hold one position");
  const int64_t n0 = slot.item<int64_t>() + 1;  // slots the first query sees
  TORCH_CHECK(n0 >= 1 && n0 + T - 1 <= L, "slots ", n0 - 1, "..", n0 + T - 2, " are outside the cache's ", L,
              " slots");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16, got ", q.scalar_type());
  // q read through its strides (the compiled graph hands it over transposed from the projection's rows: a copy
  // per layer saved); the output in q's dtype, converted here
  const auto qc = q.stride(3) == 1 ? q : q.contiguous();
  auto out = at::empty({B, H, T, D}, q.options());
  const int64_t rep = H / Hkv;
  // a work item: the query heads that share a key/value head, at one token. A one-token step has too few such
  // items for the threads (3 for 2 in the course's model), so there each head is its own item
  const int64_t per = B * Hkv * T >= 2 * at::get_num_threads() ? rep : 1;
  const int64_t groups = rep / per;
  at::parallel_for(0, B * Hkv * groups * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(per * (n0 + T - 1)), qf(per * D), of(per * D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i % T, h0 = i / T % (Hkv * groups) * per, b = i / (T * Hkv * groups), n = n0 + t;
      const int64_t off = b * k.stride(0) + (h0 / rep) * k.stride(1);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_q", [&] {
        for (int64_t c = 0; c < per; ++c) {
          const scalar_t* src = qc.data_ptr<scalar_t>() + b * qc.stride(0) + (h0 + c) * qc.stride(1) + t * qc.stride(2);
          for (int64_t d = 0; d < D; ++d) qf[c * D + d] = static_cast<float>(src[d]);
        }
      });
      const int C = static_cast<int>(per);
      switch (k.scalar_type()) {
        case at::kFloat:
          heads(qf.data(), C, k.data_ptr<float>() + off, v.data_ptr<float>() + off, n, D, float(scale), scores.data(), of.data());
          break;
        case at::kBFloat16:
          heads(qf.data(), C, k.data_ptr<c10::BFloat16>() + off, v.data_ptr<c10::BFloat16>() + off, n, D, float(scale), scores.data(), of.data());
          break;
        case at::kHalf:
          heads(qf.data(), C, k.data_ptr<c10::Half>() + off, v.data_ptr<c10::Half>() + off, n, D, float(scale), scores.data(), of.data());
          break;
        default: TORCH_CHECK(false, "k and v must be float32, bfloat16 or float16, got ", k.scalar_type());
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_out", [&] {
        for (int64_t c = 0; c < per; ++c) {
          scalar_t* dst = out.data_ptr<scalar_t>() + ((b * H + h0 + c) * T + t) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(of[c * D + d]);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(course_lib, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slot, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(course_lib, CPU, m) { m.impl("decode_attention", &decode_attention); }
