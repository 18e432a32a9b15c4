// The AVX-512 path of research_rt::decode_attention (decode_attention_avx512.cpp), called by the
// op in decode_attention.cpp, which keeps the portable loops for every other case.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace research_rt {

// The head-dim multiple the vectorized path needs for this dtype, or 0 where this build has none
// (then the op runs the portable loops, slower than Inductor's fused decode beyond batch 1).
int64_t decode_attention_vector_width(bool bf16);

// Fills `out` and returns true when the vectorized path covers q's dtype and head size; false
// (out untouched) otherwise. Arguments are the op's, checked and contiguous.
bool decode_attention_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& kv_indices, const at::Tensor& mask, double scale,
                             at::Tensor& out);

}  // namespace research_rt
