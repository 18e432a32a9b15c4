// bfloat16 decode linears from weights packed once into column panels (panel_linear.cpp), for the
// gemv op and its tests.
#pragma once

#include <ATen/ATen.h>

namespace research_rt {

// Whether panel_linear computes x [M, K] @ w [N, K]^T here: both bfloat16, this build has AVX512-BF16.
bool panel_linear_supported(const at::Tensor& x, const at::Tensor& w);

// out [M, N] = x @ w^T (+ bias) in bfloat16 from w's packed copy (made on first use, kept while w
// lives and is unchanged). Each output is one float32 chain over K whatever M is and wherever its
// row sits, so a row's bits do not depend on its batch.
at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias);

}  // namespace research_rt
