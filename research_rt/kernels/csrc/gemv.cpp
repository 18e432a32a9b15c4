// Linear layers for decode on CPU: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// research_rt::gemv(x [M, K], w [N, K], bias [N] or None) -> [M, N] in x's dtype, for any number of
// rows, each row's bits the same whatever the number of rows and wherever the row sits, so a request's
// greedy tokens do not depend on the batch it decodes in. It picks its kernel:
// - bfloat16 on CPUs with AMX: the tile kernel (amx_linear.cpp), at every row count. SmolLM2-135M's
//   121 linears streamed from DRAM per step, Xeon VM, 2 threads (RESULTS.md, "AMX tiles for the decode
//   linears"): 12.4 / 15.1 / 13.2 / 14.9 ms at 1 / 2 / 5 / 16 rows against 15.7 / 17.8 / 25.0 / 52.0 ms
//   for the dot-product loop below and oneDNN's 20.7 / 21.0 / 21.2 / 21.9 ms; 64 rows 23.1 ms against
//   oneDNN's 29.4. Prefill's hundreds of rows went to oneDNN's GEMM until 2026-12-08, whose rows have
//   other bits than the kernel's: a batch of 20 prompts prefilled together (~470 rows) got other
//   greedy tokens than each prompt alone (tests/engine/test_invariance.py).
// - bfloat16 on AVX512-BF16 without AMX: outer products over the weight packed once into column
//   panels (panel_linear.cpp), at every row count.
// - float32, and bfloat16 elsewhere: the loop below. With few rows (a single stream, a small batch, a
//   speculative verify of 5 tokens) a linear layer is bound by reading its weight once from memory,
//   so the loop streams w: each thread takes a contiguous range of output rows and walks them one
//   weight row at a time, front to back, a single sequential stream per thread that the hardware
//   prefetcher follows best (interleaving four weight rows, to reuse each load of x, ran at 26 GB/s on
//   the LM head against 46 GB/s for one row at a time; benchmarks/RESULTS.md). Each weight row is loaded
//   once for up to kMaxRows input rows (float32 FMAs on AVX-512; a plain loop for the vectorizer
//   elsewhere); past kStreamMaxRows rows, oneDNN's GEMM.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "amx_linear.h"
#include "panel_linear.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrain = 64;  // at least this many output rows per thread
constexpr int64_t kMaxRows = 8;         // input rows per pass over the weight (16 accumulators in registers)
constexpr int64_t kStreamMaxRows = 16;  // more rows: at::linear (oneDNN's GEMM)

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Dot products of one weight row with R input rows, each accumulated in float32. The weight is
// loaded once for all R rows; every row's products and sums run in the same order whatever R is
// (two accumulators over 32- or 64-wide steps, a masked tail into the first, one final reduction),
// so a row's result is bit-identical at any batch size: batch 1 and a 5-row verify agree.
template <int R>
inline void dots(const float* w, const float* const* x, int64_t K, float* out) {
#if defined(__AVX512F__)
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + k + 16);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x[r] + k), a0[r]);
      a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x[r] + k + 16), a1[r]);
    }
  }
  for (; k < K; k += 16) {  // the tail: masked loads read zeros past K
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    const __m512 w0 = _mm512_maskz_loadu_ps(m, w + k);
    for (int r = 0; r < R; ++r) a0[r] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, x[r] + k), a0[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
#else
  for (int r = 0; r < R; ++r) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += w[k] * x[r][k];
    out[r] = acc;
  }
#endif
}

// bfloat16 where this build has no AVX512-BF16 (with it, panel_linear.cpp computes bfloat16)
template <int R>
inline void dots(const at::BFloat16* wt, const at::BFloat16* const* xt, int64_t K, float* out) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wt);
  for (int r = 0; r < R; ++r) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(xt[r]);
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(w[k]) * bf16_to_float(x[k]);
    out[r] = acc;
  }
}

// Output rows [n0, n1) for input rows [m0, m0 + R): the weight rows stream once for all R.
template <int R, typename T>
void rows_kernel(const T* xp, const T* wp, const T* bp, T* op, int64_t m0, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  const T* x[R];
  for (int r = 0; r < R; ++r) x[r] = xp + (m0 + r) * K;
  float v[R];
  for (int64_t n = n0; n < n1; ++n) {
    dots<R>(wp + n * K, x, K, v);
    const float b = bp ? static_cast<float>(bp[n]) : 0.f;
    for (int r = 0; r < R; ++r) op[(m0 + r) * N + n] = static_cast<T>(v[r] + b);
  }
}

template <typename T>
void gemv_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M;) {  // groups of up to kMaxRows input rows, one weight pass each
      const int64_t r = std::min<int64_t>(M - m, kMaxRows);
      switch (r) {
        case 1: rows_kernel<1>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 2: rows_kernel<2>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 3: rows_kernel<3>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 4: rows_kernel<4>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 5: rows_kernel<5>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 6: rows_kernel<6>(xp, wp, bp, op, m, K, N, n0, n1); break;
        case 7: rows_kernel<7>(xp, wp, bp, op, m, K, N, n0, n1); break;
        default: rows_kernel<8>(xp, wp, bp, op, m, K, N, n0, n1); break;
      }
      m += r;
    }
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w must have one dtype");
  const at::Tensor* b = bias.has_value() ? &*bias : nullptr;
  if (research_rt::amx_linear_supported(x, w))
    return research_rt::amx_linear(x, w, b);
  if (research_rt::panel_linear_supported(x, w)) return research_rt::panel_linear(x, w, b);
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->to(x.scalar_type()).contiguous();
  const at::Tensor* bptr = bias.has_value() ? &bc : nullptr;
  if (x.size(0) > kStreamMaxRows) return at::linear(x, w, bias);
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    gemv_kernel<at::BFloat16>(xc, wc, bptr, out);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "gemv: float32 or bfloat16, got ", x.scalar_type());
    gemv_kernel<float>(xc, wc, bptr, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(research_rt, m) { m.def("gemv(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("gemv", &gemv); }
