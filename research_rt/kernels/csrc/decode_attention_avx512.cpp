// Decode attention with AVX-512 (and AVX512-BF16 for bfloat16): the fast path of
// research_rt::decode_attention (decode_attention.cpp states the op and its layout).
//
// Keys go in blocks of 32, read first in pool order (load_rows). Scores: each query head's dot
// products with 16 keys (VDPBF16PS or FMA, unrolled for a head size of 2 or 4 vectors) are summed
// together by one transpose-and-add tree, scaled, and turned into the block's softmax weights by a
// vector exp, with the running max and sum of the online softmax (flash-decoding style). Values: in
// bfloat16, two keys per VDPBF16PS with the probabilities rounded to bfloat16 (accumulate_value_pairs);
// in float32, each row added into the G heads of its group by FMAs. The accumulators stay in
// registers over the block. A work item is a request and all its KV heads (whole pool rows) when
// there are enough requests; per KV head otherwise. Measured against Inductor's fused decode in
// benchmarks/RESULTS.md. Every request runs this one pass, whatever its batch, so its output has the
// same bits alone and in any batch. (A pass that multiplied a prefix shared by four or more requests
// as matrices, once for the batch, made W3's decode attention 2.5x faster but summed in another
// order: bfloat16 greedy tokens then depended on the batch; RESULTS.md, 2026-12-07.)
#include "decode_attention.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace research_rt {

// The head-dim multiple the vectorized path needs for this dtype, or 0 where this build has none
// (then the op runs the portable loops, slower than Inductor's fused decode beyond batch 1).
int64_t decode_attention_vector_width(bool bf16) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return bf16 ? 32 : 16;
#elif defined(__AVX512F__)
  return bf16 ? 0 : 16;
#else
  (void)bf16;
  return 0;
#endif
}

#if defined(__AVX512F__)
namespace {

constexpr int64_t kVecBlock = 16;  // keys per zmm of scores
constexpr int64_t kBlock = 32;  // keys per online-softmax update: two zmm of scores per head

inline bool fast_path_fits(int64_t D, bool bf16) {
#if defined(__AVX512BF16__)
  return D % (bf16 ? 32 : 16) == 0;
#else
  return !bf16 && D % 16 == 0;
#endif
}

// q . k over D, as 16 partial sums (summed by sum16). ND > 0: D is ND vectors, known when compiled
// (unrolled; a loop over D's two vectors of SmolLM2's 64 spent ~30% of the op on its counter).
template <int ND>
inline __m512 dot_lanes(const float* q, const float* k, int64_t D) {
  const int64_t n = ND > 0 ? ND : D / 16;
  __m512 a = _mm512_setzero_ps();
  for (int64_t x = 0; x < n; ++x) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * x), _mm512_loadu_ps(k + 16 * x), a);
  return a;
}
template <int ND>
inline __m512 dot_lanes(const at::BFloat16* q, const at::BFloat16* k, int64_t D) {
#if defined(__AVX512BF16__)
  const int64_t n = ND > 0 ? ND : D / 32;
  __m512 a = _mm512_setzero_ps();
  for (int64_t x = 0; x < n; ++x)
    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + 32 * x), (__m512bh)_mm512_loadu_si512(k + 32 * x));
  return a;
#else
  return _mm512_setzero_ps();  // unreachable: fast_path_fits is false for bfloat16 without AVX512-BF16
#endif
}

// acc[i][:] += sum_t probs[i][t] * v_t for the n value rows of one block and the G query heads of
// their KV head. G and C (16-wide column chunks done together) are compile-time constants, so the
// G * C accumulators stay in registers over the block: a load, FMA and store per head, key and 16
// values took ~2x longer, and one chunk at a time (G chains of 32 dependent FMAs) waited on the
// FMA latency.
template <int G, int C, typename T>
inline void accumulate_values(float* acc, const float* probs, const T* const* vrows, int64_t n, int64_t D) {
  for (int64_t x = 0; x < D; x += 16 * C) {
    __m512 a[G][C];
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) a[i][c] = _mm512_loadu_ps(acc + i * D + x + 16 * c);
    for (int64_t t = 0; t < n; ++t) {
      for (int c = 0; c < C; ++c) {
        const __m512 v = load16(vrows[t] + x + 16 * c);
        for (int i = 0; i < G; ++i) a[i][c] = _mm512_fmadd_ps(_mm512_set1_ps(probs[i * kBlock + t]), v, a[i][c]);
      }
    }
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + i * D + x + 16 * c, a[i][c]);
  }
}

template <int G, typename T>
inline void accumulate_values(float* acc, const float* probs, const T* const* vrows, int64_t n, int64_t D) {
  // as many chunks at once as D allows, within ~24 of the 32 vector registers
  if (D % 64 == 0 && G * 4 <= 24) return accumulate_values<G, 4>(acc, probs, vrows, n, D);
  if (D % 32 == 0 && G * 2 <= 24) return accumulate_values<G, 2>(acc, probs, vrows, n, D);
  accumulate_values<G, 1>(acc, probs, vrows, n, D);
}

#if defined(__AVX512BF16__)
// The bfloat16 version: two keys per VDPBF16PS. The rows of keys t and t + 1 are interleaved into
// (v_t[x], v_t+1[x]) pairs (VPUNPCKLWD / VPUNPCKHWD, which take columns 0-3 and 4-7 of each 8-column
// lane: the accumulators hold their columns in that order, permuted back when stored) and each
// head's probabilities are rounded to bfloat16 pairs (p_t, p_t+1), as flash attention rounds P for
// its P V product on GPUs; the sums stay float32. Half the multiply-adds of the float32 version and
// no widening of the value rows.
template <int G, int C>
inline void accumulate_value_pairs(float* acc, const uint32_t* pairs, const at::BFloat16* const* vrows, int64_t n,
                                   int64_t D) {
  // natural 16-column halves <-> the unpacks' lo (columns 8L + 0..3) and hi (8L + 4..7) orders
  const __m512i to_lo = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i to_hi = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const __m512i from_0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i from_1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t x = 0; x < D; x += 32 * C) {
    __m512 lo[G][C], hi[G][C];
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) {
        const __m512 n0 = _mm512_loadu_ps(acc + i * D + x + 32 * c), n1 = _mm512_loadu_ps(acc + i * D + x + 32 * c + 16);
        lo[i][c] = _mm512_permutex2var_ps(n0, to_lo, n1);
        hi[i][c] = _mm512_permutex2var_ps(n0, to_hi, n1);
      }
    for (int64_t t = 0; t < n; t += 2) {
      const at::BFloat16* r0 = vrows[t];
      const at::BFloat16* r1 = vrows[t + 1 < n ? t + 1 : t];  // odd tail: probability 0 on a finite row
      for (int c = 0; c < C; ++c) {
        const __m512i a = _mm512_loadu_si512(r0 + x + 32 * c), b = _mm512_loadu_si512(r1 + x + 32 * c);
        const __m512bh vlo = (__m512bh)_mm512_unpacklo_epi16(a, b), vhi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int i = 0; i < G; ++i) {
          const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[i * (kBlock / 2) + t / 2]));
          lo[i][c] = _mm512_dpbf16_ps(lo[i][c], p, vlo);
          hi[i][c] = _mm512_dpbf16_ps(hi[i][c], p, vhi);
        }
      }
    }
    for (int i = 0; i < G; ++i)
      for (int c = 0; c < C; ++c) {
        _mm512_storeu_ps(acc + i * D + x + 32 * c, _mm512_permutex2var_ps(lo[i][c], from_0, hi[i][c]));
        _mm512_storeu_ps(acc + i * D + x + 32 * c + 16, _mm512_permutex2var_ps(lo[i][c], from_1, hi[i][c]));
      }
  }
}

template <int G>
inline void accumulate_values(float* acc, const float* probs, const at::BFloat16* const* vrows, int64_t n, int64_t D) {
  uint32_t pairs[G * kBlock / 2];
  for (int i = 0; i < G; ++i) {  // probabilities past n are 0 (masked scores)
    const __m512bh pb = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(probs + i * kBlock + 16), _mm512_loadu_ps(probs + i * kBlock));
    _mm512_storeu_si512(pairs + i * (kBlock / 2), (__m512i)pb);
  }
  // D is a multiple of 32 on this path (fast_path_fits)
  if (D % 64 == 0 && G * 4 <= 24) return accumulate_value_pairs<G, 2>(acc, pairs, vrows, n, D);
  accumulate_value_pairs<G, 1>(acc, pairs, vrows, n, D);
}
#endif

template <typename T>
inline void accumulate_values(int64_t G, float* acc, const float* probs, const T* const* vrows, int64_t n, int64_t D) {
  switch (G) {
    case 1: return accumulate_values<1>(acc, probs, vrows, n, D);
    case 2: return accumulate_values<2>(acc, probs, vrows, n, D);
    case 3: return accumulate_values<3>(acc, probs, vrows, n, D);
    case 4: return accumulate_values<4>(acc, probs, vrows, n, D);
    case 5: return accumulate_values<5>(acc, probs, vrows, n, D);
    case 6: return accumulate_values<6>(acc, probs, vrows, n, D);
    case 7: return accumulate_values<7>(acc, probs, vrows, n, D);
    case 8: return accumulate_values<8>(acc, probs, vrows, n, D);
    default:  // larger groups: one head at a time
      for (int64_t i = 0; i < G; ++i) accumulate_values<1>(acc + i * D, probs + i * kBlock, vrows, n, D);
  }
}

// Loads the K and V rows of keys [t0, t1) in pool order, each row whole, so that the block's passes
// (a third of every row per KV head, for scores, then values) read them from L1/L2. The passes'
// own order, strided, halved what the hardware prefetchers fetch: a plain read of a layer of W2's
// KV in that order ran at 11 GB/s on one core, in row order 26 GB/s; software prefetches (T0/T2,
// 0-128 keys ahead) changed nothing measurable. W2-like batch 64, one layer from DRAM, two threads:
// 58 -> 42 ns a key (benchmarks/RESULTS.md, 2026-12-06).
template <typename T>
inline void load_rows(const T* kh, const T* vh, const int64_t* slots, int64_t t0, int64_t t1, int64_t slot_stride,
                      int64_t span_bytes) {
  const auto load = [span_bytes](const T* row) {
    const char* p = reinterpret_cast<const char*>(row);
    for (int64_t off = 0; off < span_bytes; off += 64) {
      const __m512i x = _mm512_loadu_si512(p + off);
      asm volatile("" : : "v"(x));  // keep the load; its value is not needed
    }
  };
  for (int64_t t = t0; t < t1; ++t) {
    load(kh + slots[t] * slot_stride);
    load(vh + slots[t] * slot_stride);
  }
}

// Contiguous ranges of work items, one per thread, of about equal numbers of visible keys (a
// thread's time): requests' lengths differ (W2: 32 to 640 keys), and equal numbers of requests left
// one thread waiting for the other. Returns the ranges' bounds, first 0, last the item count.
std::vector<int64_t> split_items(const bool* mask, int64_t B, int64_t Lk, int64_t items_per_req, int64_t parts) {
  const int64_t n_items = B * items_per_req;
  parts = std::max<int64_t>(1, std::min(parts, n_items));
  std::vector<int64_t> keys(n_items + 1, 0);  // prefix sums of the items' keys (plus one for setup)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t visible = 1 + std::count(mask + b * Lk, mask + (b + 1) * Lk, true);
    for (int64_t i = b * items_per_req; i < (b + 1) * items_per_req; ++i) keys[i + 1] = keys[i] + visible;
  }
  std::vector<int64_t> bounds{0};
  for (int64_t t = 1; t < parts; ++t) {  // the first item that starts at or past t / parts of the keys
    const int64_t goal = keys[n_items] * t / parts;
    const int64_t i = std::lower_bound(keys.begin(), keys.end(), goal) - keys.begin();
    bounds.push_back(std::max(bounds.back(), std::min(n_items, i)));
  }
  bounds.push_back(n_items);
  return bounds;
}

template <typename T, int ND>
void decode_kernel_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                          const at::Tensor& kv_indices, const at::Tensor& mask, double scale,
                          at::Tensor& out) {
  const DecodeProblem<T> p(q, k_buf, v_buf, kv_indices, mask, out);
  const int64_t B = p.B, H = p.H, D = p.D, KVH = p.KVH, G = p.G, Lk = p.Lk;
  const int64_t slot_stride = p.slot_stride, head_stride = p.head_stride;
  const T *qp = p.q, *kp = p.k, *vp = p.v;
  const int64_t* idx = p.idx;
  const bool* mp = p.mask;
  T* op = p.out;
  const __m512 sc = _mm512_set1_ps(static_cast<float>(scale));
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // A work item is one request and all its KV heads when there are enough requests to share out:
  // each key's K and V rows of every head (contiguous in the pool) are then read in one pass, a
  // stream the prefetchers follow. Items of one (request, KV head) read a third of each row with a
  // stride between, and took twice as long as whole rows at batch 64 x 512 keys (5.3 vs 2.7 ms,
  // RESULTS.md).
  // Few requests (batch 1) split by KV head to keep every thread busy.
  const int64_t heads_per_item = B >= 2 * at::get_num_threads() ? KVH : 1;
  const int64_t items_per_req = KVH / heads_per_item;
  const int64_t span_bytes = ((heads_per_item - 1) * head_stride + D) * static_cast<int64_t>(sizeof(T));

  const auto run_items = [&](int64_t begin, int64_t end) {
    const int64_t HI = heads_per_item * G;  // query heads of one item
    std::vector<float> acc(HI * D), scores(HI * kBlock), probs(HI * kBlock), run_max(HI), run_sum(HI);
    std::vector<int64_t> slots(Lk);
    int64_t slots_of = -1;  // the request whose visible slots `slots` holds
    int64_t n_visible = 0;
    __m512 part[kVecBlock];
    const T* vrows[kBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_req, g0 = (item % items_per_req) * heads_per_item;
      if (b != slots_of) {  // the request's visible key slots, in order
        n_visible = 0;
        for (int64_t j = 0; j < Lk; ++j)
          if (mp[b * Lk + j]) slots[n_visible++] = idx[b * Lk + j];
        slots_of = b;
      }
      const T* qh = qp + (b * H + g0 * G) * D;  // the item's HI query rows
      const T* kh = kp + g0 * head_stride;
      const T* vh = vp + g0 * head_stride;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      for (int64_t j0 = 0; j0 < n_visible; j0 += kBlock) {
        const int64_t n = std::min(kBlock, n_visible - j0);
        const int64_t* blk = slots.data() + j0;
        load_rows(kh, vh, slots.data(), j0, j0 + n, slot_stride, span_bytes);
        // scores of every head first, then the softmax updates: the heads' chains are independent,
        // and split this way the CPU overlaps them (one loop doing both waited on each head's
        // reductions and exp in turn)
        for (int64_t h = 0; h < HI; ++h) {  // query head h reads KV head h / G of the item
          const T* kg = kh + (h / G) * head_stride;
          for (int64_t half = 0; half < kBlock; half += kVecBlock) {
            const int64_t m = std::max<int64_t>(0, std::min(kVecBlock, n - half));
            if (m == 0) {
              _mm512_storeu_ps(scores.data() + h * kBlock + half, neg_inf);
              continue;
            }
            // all 16 lanes, keys past m on the block's first row (masked below): a fixed count keeps
            // `part` in registers (a loop to m stored and reloaded each dot product)
            for (int64_t t = 0; t < kVecBlock; ++t)
              part[t] = dot_lanes<ND>(qh + h * D, kg + blk[t < m ? half + t : 0] * slot_stride, D);
            const __mmask16 live = static_cast<__mmask16>((1u << m) - 1);
            _mm512_storeu_ps(scores.data() + h * kBlock + half, _mm512_mask_mul_ps(neg_inf, live, sum16(part), sc));
          }
        }
        for (int64_t h = 0; h < HI; ++h) {
          const __m512 s0 = _mm512_loadu_ps(scores.data() + h * kBlock);
          const __m512 s1 = _mm512_loadu_ps(scores.data() + h * kBlock + kVecBlock);
          const float m = std::max(run_max[h], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
          const float correction = std::exp(run_max[h] - m);  // exp(-inf) = 0 on the first block
          const __m512 mv = _mm512_set1_ps(m);
          // masked keys hold -inf: exp16 clamps them to ~1e-38, zeroed by the masks
          const __m512 p0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s0, neg_inf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s0, mv)));
          const __m512 p1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s1, neg_inf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s1, mv)));
          _mm512_storeu_ps(probs.data() + h * kBlock, p0);
          _mm512_storeu_ps(probs.data() + h * kBlock + kVecBlock, p1);
          run_sum[h] = run_sum[h] * correction + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
          run_max[h] = m;
          if (correction != 1.f) {
            const __m512 c = _mm512_set1_ps(correction);
            float* ah = acc.data() + h * D;
            for (int64_t x = 0; x < D; x += 16) _mm512_storeu_ps(ah + x, _mm512_mul_ps(_mm512_loadu_ps(ah + x), c));
          }
        }
        for (int64_t g = 0; g < heads_per_item; ++g) {  // each value row widened once for its G heads
          for (int64_t t = 0; t < n; ++t) vrows[t] = vh + g * head_stride + blk[t] * slot_stride;
          accumulate_values(G, acc.data() + g * G * D, probs.data() + g * G * kBlock, vrows, n, D);
        }
      }
      for (int64_t h = 0; h < HI; ++h) {
        const float inv = run_sum[h] > 0.f ? 1.f / run_sum[h] : 0.f;  // no visible key: zeros
        T* dst = op + (b * H + g0 * G + h) * D;
        for (int64_t x = 0; x < D; ++x) dst[x] = static_cast<T>(acc[h * D + x] * inv);
      }
    }
  };
  const std::vector<int64_t> bounds = split_items(mp, B, Lk, items_per_req, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t t0, int64_t t1) {
    run_items(bounds[t0], bounds[t1]);
  });
}

// decode_kernel_avx512 with the head size's vector count compiled in where it is 2 or 4 (D 64 or 128
// in bfloat16, 32 or 64 in float32)
template <typename T>
void run_decode(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf, const at::Tensor& kv_indices,
                const at::Tensor& mask, double scale, at::Tensor& out) {
  constexpr int64_t width = 64 / sizeof(T);
  const int64_t D = q.size(2);
  if (D == 2 * width) return decode_kernel_avx512<T, 2>(q, k_buf, v_buf, kv_indices, mask, scale, out);
  if (D == 4 * width) return decode_kernel_avx512<T, 4>(q, k_buf, v_buf, kv_indices, mask, scale, out);
  decode_kernel_avx512<T, 0>(q, k_buf, v_buf, kv_indices, mask, scale, out);
}
}  // namespace

bool decode_attention_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& kv_indices, const at::Tensor& mask, double scale,
                             at::Tensor& out) {
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  if (!(bf16 || q.scalar_type() == at::kFloat) || !fast_path_fits(q.size(2), bf16)) return false;
  if (bf16) run_decode<at::BFloat16>(q, k_buf, v_buf, kv_indices, mask, scale, out);
  else run_decode<float>(q, k_buf, v_buf, kv_indices, mask, scale, out);
  return true;
}
#else
bool decode_attention_avx512(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, at::Tensor&) {
  return false;
}
#endif

}  // namespace research_rt
