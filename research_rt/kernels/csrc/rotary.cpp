// Rotary position embedding (rotate-half layout) of q and k in one pass, for CPU inference:
//   research_rt::rotary(positions [T], q [T, H, D], k [T, KVH, D], cos [P, D], sin [P, D]) -> (q', k')
//   x' = x * c + rotate_half(x) * s,  c = cos[positions].to(x.dtype), s likewise,
//   rotate_half(x) = cat(-x[.., D/2:], x[.., :D/2])
// with the roundings of that PyTorch code (models/layers/rotary.py, Hugging Face's
// apply_rotary_pos_emb): each of the two products and their sum is rounded to x's dtype, the tables
// once to it, so the op's results equal the eager ATen ops' bit for bit in float32 and bfloat16, NaN
// payloads aside (the float32 products and sum use explicit-rounding intrinsics, which the compiler
// cannot fuse into an FMA). Eager ATen ran it as ~14 ops (two gathers and casts of the tables, and per
// tensor neg, cat, two muls, add): 342-634 us for one 512-token chunk of SmolLM2 (9 + 3 heads of 64,
// bfloat16) against 116-137 us here, memory-bound (2 threads, AMD EPYC Zen 5 in a slow phase;
// RESULTS.md). q and k may be views into a fused qkv row (any token stride, heads contiguous); the
// results are contiguous. Compiled graphs call it too: Inductor's fusion of the PyTorch code keeps the
// products in float32, so compiled decode steps gave other bits than eager ones.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace research_rt {
namespace {

// One head's D values: out[d] = round(round(x[d] * c[d]) + round(r[d] * s[d])), r = rotate_half(x).
// c and s are already rounded to T.
template <typename T>
void rotate_head(const T* x, const float* c, const float* s, T* out, int64_t D) {
  const int64_t half = D / 2;
#if defined(__AVX512F__)
  if (half % 16 == 0) {  // the two halves side by side: x1 = x[j], x2 = x[half + j]
    constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    for (int64_t j = 0; j < half; j += 16) {
      const __m512 x1 = load16(x + j), x2 = load16(x + half + j);
      const __m512 neg_x2 = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x2), sign));
      const __m512 a1 = round16<T>(_mm512_mul_round_ps(x1, _mm512_loadu_ps(c + j), kRound));
      const __m512 b1 = round16<T>(_mm512_mul_round_ps(neg_x2, _mm512_loadu_ps(s + j), kRound));
      const __m512 a2 = round16<T>(_mm512_mul_round_ps(x2, _mm512_loadu_ps(c + half + j), kRound));
      const __m512 b2 = round16<T>(_mm512_mul_round_ps(x1, _mm512_loadu_ps(s + half + j), kRound));
      store16(out + j, _mm512_add_round_ps(a1, b1, kRound));
      store16(out + half + j, _mm512_add_round_ps(a2, b2, kRound));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) {  // other head sizes; volatile keeps the float32 products out of an FMA
    const float r = d < half ? -to_float(x[d + half]) : to_float(x[d - half]);
    volatile float a = round_to<T>(to_float(x[d]) * c[d]);
    volatile float b = round_to<T>(r * s[d]);
    out[d] = static_cast<T>(a + b);
  }
}

template <typename T>
void rotate(const at::Tensor& positions, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
            at::Tensor& out) {
  const int64_t T_ = x.size(0), H = x.size(1), D = x.size(2), stride = x.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const T* xp = x.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(2 * D);  // this token's cos and sin, rounded to T as the tables' cast does
    for (int64_t t = t0; t < t1; ++t) {
      const float* ct = cp + pos[t] * D;
      const float* st = sp + pos[t] * D;
      int64_t d = 0;
#if defined(__AVX512F__)
      for (; d + 16 <= D; d += 16) {
        _mm512_storeu_ps(&cs[d], round16<T>(_mm512_loadu_ps(ct + d)));
        _mm512_storeu_ps(&cs[D + d], round16<T>(_mm512_loadu_ps(st + d)));
      }
#endif
      for (; d < D; ++d) {
        cs[d] = round_to<T>(ct[d]);
        cs[D + d] = round_to<T>(st[d]);
      }
      for (int64_t h = 0; h < H; ++h) rotate_head(xp + t * stride + h * D, cs.data(), cs.data() + D, op + (t * H + h) * D, D);
    }
  });
}

// x as [T, heads, D] with contiguous heads (a view into a fused qkv row is fine), else a copy
at::Tensor heads_contiguous(const at::Tensor& x) {
  return x.stride(2) == 1 && x.stride(1) == x.size(2) ? x : x.contiguous();
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& positions, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rotary: q [T, H, D] and k [T, KVH, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "rotary: q and k both float32 or both bfloat16");
  const int64_t T_ = q.size(0), D = q.size(2);
  TORCH_CHECK(D % 2 == 0 && cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) == D &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rotary: cos and sin float32 [positions, D] for an even head size D");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T_, "rotary: one position per token");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < cos.size(0), "rotary: position ", pp[t], " outside the table's [0, ",
                cos.size(0), ")");
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  std::tuple<at::Tensor, at::Tensor> out{at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options())};
  const at::Tensor qs = heads_contiguous(q), ks = heads_contiguous(k);
  if (q.scalar_type() == at::kBFloat16) {
    rotate<at::BFloat16>(pos, qs, c, s, std::get<0>(out));
    rotate<at::BFloat16>(pos, ks, c, s, std::get<1>(out));
  } else {
    rotate<float>(pos, qs, c, s, std::get<0>(out));
    rotate<float>(pos, ks, c, s, std::get<1>(out));
  }
  return out;
}

}  // namespace
}  // namespace research_rt

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("rotary(Tensor positions, Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("rotary", &research_rt::rotary); }
