// bfloat16 linear layers on Intel AMX tiles (amx_linear.cpp), for the gemv op and its tests.
#pragma once

#include <ATen/ATen.h>

namespace research_rt {

// Whether this build has AMX tiles and the kernel let the process use them (asked once).
bool amx_available();

// Whether amx_linear computes x [M, K] @ w [N, K]^T: both bfloat16, K a multiple of 32, AMX available.
bool amx_linear_supported(const at::Tensor& x, const at::Tensor& w);

// out [M, N] = x @ w^T (+ bias), float32 accumulation, rounded once to bfloat16. Each output row is
// the same sequence of tile products whatever M is, so a row's bits do not depend on its batch.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias);

}  // namespace research_rt
