// Decode attention over the token-level KV pool (one query token per request), written for CPU.
//
// research_rt::decode_attention(q [B, H, D], k_buf [S, KVH, D], v_buf [S, KVH, D],
//                               kv_indices [B, Lk] int64, attn_mask [B, 1, 1, Lk] bool, scale)
//   -> [B, H * D] in q's dtype.
// Query heads h = g_kv * G + i (G = H / KVH) share KV head g_kv. Work item (b, g_kv) walks the
// visible keys of request b once, in blocks, and for each key row computes the G dot products
// (the row is read once for the whole group), keeping an online softmax (running max, sum and
// float32 accumulator, rescaled when the max grows). This file has the portable loops, written for
// the compiler's vectorizer; where the CPU has AVX-512, decode_attention_avx512.cpp runs instead.
#include "decode_attention.h"

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kBlock = 32;  // keys per online-softmax update

using research_rt::to_float;  // vec_math.h

inline void load_row(const float* src, float* dst, int64_t d) { std::memcpy(dst, src, d * sizeof(float)); }
inline void load_row(const at::BFloat16* src, float* dst, int64_t d) {
  // bfloat16 is the high half of a float32: widen the raw bits (vectorizes to shifts)
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = static_cast<uint32_t>(raw[i]) << 16;
}

using research_rt::DecodeProblem;

template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                   const at::Tensor& kv_indices, const at::Tensor& mask, double scale,
                   at::Tensor& out) {
  const DecodeProblem<T> p(q, k_buf, v_buf, kv_indices, mask, out);
  const int64_t B = p.B, H = p.H, D = p.D, KVH = p.KVH, G = p.G, Lk = p.Lk;
  const int64_t slot_stride = p.slot_stride, head_stride = p.head_stride;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), krow(D), vrow(D), scores(G * kBlock);
    std::vector<float> run_max(G), run_sum(G);
    std::vector<int64_t> slots(kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KVH, g_kv = item % KVH;
      for (int64_t i = 0; i < G; ++i) {
        const T* src = p.q + (b * H + g_kv * G + i) * D;
        for (int64_t x = 0; x < D; ++x) qf[i * D + x] = to_float(src[x]) * sc;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      const int64_t* row_idx = p.idx + b * Lk;
      const bool* row_mask = p.mask + b * Lk;
      for (int64_t j0 = 0; j0 < Lk; j0 += kBlock) {
        int64_t n = 0;  // visible keys of this block
        for (int64_t j = j0; j < std::min(j0 + kBlock, Lk); ++j)
          if (row_mask[j]) slots[n++] = row_idx[j];
        if (n == 0) continue;
        for (int64_t t = 0; t < n; ++t) {  // scores: each key row read once for the G heads
          load_row(p.k + slots[t] * slot_stride + g_kv * head_stride, krow.data(), D);
          for (int64_t i = 0; i < G; ++i) {
            const float* qi = qf.data() + i * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t x = 0; x < D; ++x) s += qi[x] * krow[x];
            scores[i * kBlock + t] = s;
          }
        }
        for (int64_t i = 0; i < G; ++i) {  // online softmax update
          float* si = scores.data() + i * kBlock;
          float m = run_max[i];
          for (int64_t t = 0; t < n; ++t) m = std::max(m, si[t]);
          const float correction = std::exp(run_max[i] - m);  // exp(-inf) = 0 on the first block
          float sum = run_sum[i] * correction;
          for (int64_t t = 0; t < n; ++t) {
            si[t] = std::exp(si[t] - m);
            sum += si[t];
          }
          run_max[i] = m;
          run_sum[i] = sum;
          float* ai = acc.data() + i * D;
#pragma omp simd
          for (int64_t x = 0; x < D; ++x) ai[x] *= correction;
        }
        for (int64_t t = 0; t < n; ++t) {  // values: each row read once for the G heads
          load_row(p.v + slots[t] * slot_stride + g_kv * head_stride, vrow.data(), D);
          for (int64_t i = 0; i < G; ++i) {
            const float p = scores[i * kBlock + t];
            float* ai = acc.data() + i * D;
#pragma omp simd
            for (int64_t x = 0; x < D; ++x) ai[x] += p * vrow[x];
          }
        }
      }
      for (int64_t i = 0; i < G; ++i) {
        const float inv = run_sum[i] > 0.f ? 1.f / run_sum[i] : 0.f;  // no visible key: zeros
        T* dst = p.out + b * H * D + (g_kv * G + i) * D;
        for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(acc[i * D + x] * inv);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& kv_indices, const at::Tensor& attn_mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "q, k_buf, v_buf must be 3-d");
  TORCH_CHECK(q.scalar_type() == k_buf.scalar_type() && k_buf.scalar_type() == v_buf.scalar_type(),
              "q, k_buf and v_buf must share a dtype");
  TORCH_CHECK(k_buf.sizes() == v_buf.sizes() && k_buf.strides() == v_buf.strides(),
              "k_buf and v_buf must have one layout");
  TORCH_CHECK(k_buf.stride(2) == 1, "k_buf rows must be contiguous");
  TORCH_CHECK(q.size(1) % k_buf.size(1) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.size(2) == k_buf.size(2), "head_dim mismatch");
  TORCH_CHECK(kv_indices.dim() == 2 && kv_indices.size(0) == q.size(0), "kv_indices must be [B, Lk]");
  TORCH_CHECK(kv_indices.scalar_type() == at::kLong, "kv_indices must be int64");
  TORCH_CHECK(attn_mask.scalar_type() == at::kBool && attn_mask.numel() == kv_indices.numel(),
              "attn_mask must be bool with B * Lk elements");
  auto qc = q.contiguous();
  auto idx = kv_indices.contiguous();
  auto mask = attn_mask.contiguous();
  auto out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (research_rt::decode_attention_avx512(qc, k_buf, v_buf, idx, mask, scale, out)) return out;
  if (q.scalar_type() == at::kFloat) {
    decode_kernel<float>(qc, k_buf, v_buf, idx, mask, scale, out);
  } else if (bf16) {
    decode_kernel<at::BFloat16>(qc, k_buf, v_buf, idx, mask, scale, out);
  } else {
    TORCH_CHECK(false, "decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("decode_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor kv_indices, Tensor attn_mask, float scale) -> Tensor");
  m.def("decode_attention_vector_width(bool bf16) -> int", &research_rt::decode_attention_vector_width);
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("decode_attention", &decode_attention); }
