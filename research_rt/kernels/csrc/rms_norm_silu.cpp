// The two row-wise steps of a decoder layer that eager prefill runs as chains of small ATen ops, each
// in one pass over the row:
//   research_rt::rms_norm(x [.., D], weight [D], eps) = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
//   research_rt::silu_mul(gate_up [.., 2F])          = silu(gate_up[.., :F]) * gate_up[.., F:]
// in float32 with the casts to x's dtype where models/layers/norm.py and llama.py's MLP have them
// (RMSNorm: normalized row rounded, then the product with the weight rounded; SiLU rounded, then the
// product rounded), so they round as the PyTorch code does; only the order of the sum of squares and
// the exp differ, by float32 rounding. Eager ATen ran RMSNorm as ~8 ops (float copy, pow, mean, add,
// rsqrt, mul, cast, mul) and SiLU-and-mul as 2, each a pass over [tokens, D] in memory: ~1.5 s of W2's
// 29 s on the Zen 5 machine (torch.profiler, benchmarks/RESULTS.md). Compiled graphs call these ops
// too, so a step has the same bits compiled and eager (Inductor's own fusion keeps bfloat16
// intermediates in float32 and sums in another order). float32 and bfloat16; rows shared among threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace research_rt {
namespace {


template <typename T>
void rms_norm_rows(const T* x, const T* w, T* out, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * D;
      T* o = out + r * D;
      float ss = 0.f;
      int64_t d = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; d + 16 <= D; d += 16) {
        const __m512 v = load16(xr + d);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; d < D; ++d) ss += to_float(xr[d]) * to_float(xr[d]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      d = 0;
#if defined(__AVX512F__)
      const __m512 iv = _mm512_set1_ps(inv);
      for (; d + 16 <= D; d += 16)
        store16(o + d, _mm512_mul_ps(load16(w + d), round16<T>(_mm512_mul_ps(load16(xr + d), iv))));
#endif
      for (; d < D; ++d) o[d] = static_cast<T>(to_float(w[d]) * round_to<T>(to_float(xr[d]) * inv));
    }
  });
}

template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t rows, int64_t F) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = x + r * 2 * F;
      const T* u = g + F;
      T* o = out + r * F;
      int64_t f = 0;
#if defined(__AVX512F__)
      for (; f + 16 <= F; f += 16) {  // exp16: vec_math.h
        const __m512 gv = load16(g + f);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 silu = round16<T>(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
        store16(o + f, _mm512_mul_ps(silu, load16(u + f)));
      }
#endif
      for (; f < F; ++f) {
        const float gf = to_float(g[f]);
        o[f] = static_cast<T>(round_to<T>(gf / (1.f + std::exp(-gf))) * to_float(u[f]));
      }
    }
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, ": float32 or bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), name, ": a contiguous tensor");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight [D] in x's dtype");
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, D, eps);
  else
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), rows, D, eps);
  return out;
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "silu_mul");
  TORCH_CHECK(x.size(-1) % 2 == 0, "silu_mul: the last dimension holds gate and up halves");
  const int64_t F = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  at::Tensor out = at::empty(shape, x.options());
  const int64_t rows = F == 0 ? 0 : x.numel() / (2 * F);
  if (x.scalar_type() == at::kBFloat16)
    silu_mul_rows(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, F);
  else
    silu_mul_rows(x.data_ptr<float>(), out.data_ptr<float>(), rows, F);
  return out;
}

}  // namespace
}  // namespace research_rt

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) {
  m.impl("rms_norm", &research_rt::rms_norm);
  m.impl("silu_mul", &research_rt::silu_mul);
}
