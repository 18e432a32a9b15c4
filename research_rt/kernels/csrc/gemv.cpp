// Matrix-vector product for single-stream decode on CPU: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// research_rt::gemv(x [M, K], w [N, K], bias [N] or None) -> [M, N] in x's dtype; M is small (1).
// At batch 1 decode reads every weight once per token, so this loop must stream w at memory
// bandwidth. Each thread takes a contiguous range of output rows and walks them one row at a
// time, front to back: a single sequential stream per thread is what the hardware prefetcher
// follows best (interleaving four rows, to reuse each load of x, ran at 26 GB/s on the LM head
// against 46 GB/s for one row at a time; csrc measurements in benchmarks/RESULTS.md). bfloat16
// uses AVX512-BF16's pairwise dot product (VDPBF16PS: 32 products per instruction, float32
// accumulation); float32 uses AVX-512 FMAs; other CPUs use a plain loop for the vectorizer.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kGrain = 64;  // at least this many output rows per thread

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// One dot product of length K, accumulated in float32.
inline float dot(const float* w, const float* x, int64_t K) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  for (; k < K; k += 16) {  // the tail: masked loads read zeros past K
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; ++k) acc += w[k] * x[k];
  return acc;
#endif
}

inline float dot(const at::BFloat16* wt, const at::BFloat16* xt, int64_t K) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wt);
  const uint16_t* x = reinterpret_cast<const uint16_t*>(xt);
#if defined(__AVX512BF16__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32),
                          (__m512bh)_mm512_loadu_si512(x + k + 32));
  }
  for (; k < K; k += 32) {
    const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1ull << (K - k)) - 1);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k),
                          (__m512bh)_mm512_maskz_loadu_epi16(m, x + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < K; ++k) acc += bf16_to_float(w[k]) * bf16_to_float(x[k]);
  return acc;
#endif
}

template <typename T>
void gemv_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = n0; n < n1; ++n) {
        const float v = dot(wp + n * K, xp + m * K, K) + (bp ? static_cast<float>(bp[n]) : 0.f);
        op[m * N + n] = static_cast<T>(v);
      }
    }
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: x [M, K] and w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "gemv: x and w must have one dtype");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->to(x.scalar_type()).contiguous();
  const at::Tensor* bptr = bias.has_value() ? &bc : nullptr;
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
