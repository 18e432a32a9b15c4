// The AVX-512 path of research_rt::decode_attention (decode_attention_avx512.cpp), called by the
// op in decode_attention.cpp, which keeps the portable loops for every other case.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace research_rt {

// The op's arguments as raw pointers and sizes (q [B, H, D], pools [S, KVH, D], kv_indices and
// mask [B, Lk], out [B, H * D]); query head h reads KV head h / G.
template <typename T>
struct DecodeProblem {
  int64_t B, H, D, KVH, G, Lk, slot_stride, head_stride;
  const T* q;
  const T* k;
  const T* v;
  const int64_t* idx;
  const bool* mask;
  T* out;

  DecodeProblem(const at::Tensor& q_, const at::Tensor& k_buf, const at::Tensor& v_buf,
                const at::Tensor& kv_indices, const at::Tensor& mask_, at::Tensor& out_)
      : B(q_.size(0)), H(q_.size(1)), D(q_.size(2)), KVH(k_buf.size(1)), G(H / KVH),
        Lk(kv_indices.size(1)), slot_stride(k_buf.stride(0)), head_stride(k_buf.stride(1)),
        q(q_.data_ptr<T>()), k(k_buf.data_ptr<T>()), v(v_buf.data_ptr<T>()),
        idx(kv_indices.data_ptr<int64_t>()), mask(mask_.data_ptr<bool>()), out(out_.data_ptr<T>()) {}
};

// The head-dim multiple the vectorized path needs for this dtype, or 0 where this build has none
// (then the op runs the portable loops, slower than Inductor's fused decode beyond batch 1).
int64_t decode_attention_vector_width(bool bf16);

// Fills `out` and returns true when the vectorized path covers q's dtype and head size; false
// (out untouched) otherwise. Arguments are the op's, checked and contiguous.
bool decode_attention_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& kv_indices, const at::Tensor& mask, double scale,
                             at::Tensor& out);

}  // namespace research_rt
