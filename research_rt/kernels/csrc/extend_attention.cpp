// research_rt::extend_attention: causal attention of a prefill (extend) batch straight over the
// token-level KV pool, for bfloat16 on CPUs with AVX512-BF16 (flash attention's online softmax).
//
//   q [T, H, D]; k_buf, v_buf [S, KVH, D] (the pool, this step's keys already written);
//   kv_indices [B, Lk] int64 (request b's j-th key is in slot kv_indices[b, j]);
//   prefix_lens, extend_lens [B] int64  ->  out [T, H * D]
//
// Request b's queries are the q rows from sum(extend_lens[:b]) on; its query i sits at position
// prefix_lens[b] + i and sees keys 0 .. prefix_lens[b] + i. No padded copy of keys or queries.
//
// A work item is one request, one KV head and up to 64 / G consecutive positions: its G query
// heads x positions are the 64 lanes ("rows") of four vectors, so the online softmax is lane-wise
// (no horizontal reductions). Keys go in blocks of 32:
//   scores  rows x keys by VDPBF16PS: the rows' query pairs (packed once per item) times each key's
//           pair broadcast from its pool row, 4 keys x 4 row vectors of accumulators at a time;
//   softmax scaled scores, running max and sum per lane, causal mask on the diagonal blocks only;
//   values  probabilities rounded to bfloat16 pairs of keys (as flash attention rounds P for its
//           second matmul), value rows interleaved in pairs, VDPBF16PS into float32 accumulators.
// Output is rounded to bfloat16 once. Any other dtype, head size or CPU: the op reports false and
// the caller runs scaled_dot_product_attention (research_rt/executor/attention/torch_native.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "vec_math.h"

namespace research_rt {
namespace {

#if defined(__AVX512F__) && defined(__AVX512BF16__)

constexpr int kMaxRowVecs = 4;  // row vectors per item: up to 64 lanes of (position, query head)
constexpr int kRows = 16 * kMaxRowVecs;
constexpr int kKeys = 32;  // keys per online-softmax update
constexpr int kScoreKeys = 4;  // keys whose scores are accumulated together

struct Item {
  int64_t b, h, i0, n_pos, cost;
  int row_vecs;  // ceil(n_pos * G / 16)
};

struct Problem {
  int64_t H, D, KVH, G, Lk, slot_stride, head_stride;
  const uint16_t* q;  // bfloat16 bits
  const uint16_t* k;
  const uint16_t* v;
  const int64_t* idx;
  const int64_t* prefix;
  const int64_t* q_start;
  uint16_t* out;
  float scale;
};

inline __m512i bcast_pair(const uint16_t* p) { return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(p)); }

// The lane of row r inside the interleaved probability pairs (see `pair_probs`).
inline int prob_lane(int r) {
  const int n = r / 16, l = r % 16;
  const int slot = l < 4 ? l : l < 8 ? l + 4 : l < 12 ? l - 4 : l;
  return n * 16 + slot;
}

// Index in a row's value accumulators of output column d: a pair of value rows interleaved by
// VPUNPCK{L,H}WD keeps columns 8L..8L+3 (low) and 8L+4..8L+7 (high) of each 128-bit lane L.
inline int value_col(int d) {
  const int c = d / 32, rem = d % 32, lane = rem / 8, w = rem % 8;
  return (2 * c + w / 4) * 16 + 4 * lane + w % 4;
}

template <int D>
struct Scratch {
  alignas(64) uint32_t qp[D / 2][kRows];  // query pairs, lane = row
  alignas(64) int32_t qpos[kRows];  // each row's position (INT_MAX: an unused lane sees every key)
  alignas(64) float s[kKeys][kRows];  // scaled scores, then probabilities
  alignas(64) uint32_t pp[kKeys / 2][kRows];  // probability pairs (keys 2u, 2u+1), lane = prob_lane(row)
  alignas(64) uint32_t vp[kKeys / 2][D];  // value pairs, column order of value_col
  alignas(64) float acc[kRows][D];  // output rows, column order of value_col
  alignas(64) float m[kRows], l[kRows], alpha[kRows];
  int col[D];  // value_col(d)

  Scratch() {
    for (int d = 0; d < D; ++d) col[d] = value_col(d);
  }
};

template <int D, int NR>
void run_item(const Problem& p, const Item& it, Scratch<D>& w) {
  const int64_t G = p.G, rows = it.n_pos * G, prefix = p.prefix[it.b];
  const int64_t n_keys = prefix + it.i0 + it.n_pos;  // keys the item's last position sees
  const int64_t* slots = p.idx + it.b * p.Lk;
  const uint16_t* kh = p.k + it.h * p.head_stride;
  const uint16_t* vh = p.v + it.h * p.head_stride;
  for (int r = 0; r < 16 * NR; ++r) {
    const bool live = r < rows;
    const int64_t tok = p.q_start[it.b] + it.i0 + r / G;
    const uint32_t* qr = live ? reinterpret_cast<const uint32_t*>(p.q + (tok * p.H + it.h * G + r % G) * D) : nullptr;
    for (int x = 0; x < D / 2; ++x) w.qp[x][r] = live ? qr[x] : 0u;
    w.qpos[r] = live ? static_cast<int32_t>(prefix + it.i0 + r / G) : INT_MAX;
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.f;
  }
  std::fill(&w.acc[0][0], &w.acc[0][0] + 16 * NR * D, 0.f);
  const __m512 scale = _mm512_set1_ps(p.scale), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t first_pos = prefix + it.i0;

  for (int64_t k0 = 0; k0 < n_keys; k0 += kKeys) {
    const int64_t n = std::min<int64_t>(kKeys, n_keys - k0);
    const uint16_t* krow[kKeys];
    const uint16_t* vrow[kKeys];
    for (int t = 0; t < kKeys; ++t) {  // past the last key: slot 0, the pool's zeroed dummy row (masked)
      const int64_t slot = t < n ? slots[k0 + t] : 0;
      krow[t] = kh + slot * p.slot_stride;
      vrow[t] = vh + slot * p.slot_stride;
    }
    // scores
    for (int t0 = 0; t0 < kKeys; t0 += kScoreKeys) {
      __m512 a[kScoreKeys][NR];
      for (int j = 0; j < kScoreKeys; ++j)
        for (int v = 0; v < NR; ++v) a[j][v] = _mm512_setzero_ps();
      for (int x = 0; x < D / 2; ++x) {
        __m512bh qv[NR];
        for (int v = 0; v < NR; ++v) qv[v] = (__m512bh)_mm512_load_si512(&w.qp[x][16 * v]);
        for (int j = 0; j < kScoreKeys; ++j) {
          const __m512bh kb = (__m512bh)bcast_pair(krow[t0 + j] + 2 * x);
          for (int v = 0; v < NR; ++v) a[j][v] = _mm512_dpbf16_ps(a[j][v], qv[v], kb);
        }
      }
      for (int j = 0; j < kScoreKeys; ++j)
        for (int v = 0; v < NR; ++v) _mm512_store_ps(&w.s[t0 + j][16 * v], _mm512_mul_ps(a[j][v], scale));
    }
    // causal mask (and keys past the last) where some row does not see the whole block
    const bool diagonal = k0 + kKeys - 1 > first_pos;
    if (diagonal) {
      for (int t = 0; t < kKeys; ++t) {
        const __m512i kpos = _mm512_set1_epi32(t < n ? static_cast<int32_t>(k0 + t) : INT_MAX);
        for (int v = 0; v < NR; ++v) {
          const __mmask16 seen = _mm512_cmple_epi32_mask(kpos, _mm512_load_si512(&w.qpos[16 * v]));
          _mm512_store_ps(&w.s[t][16 * v], _mm512_mask_mov_ps(neg_inf, seen, _mm512_load_ps(&w.s[t][16 * v])));
        }
      }
    }
    // online softmax, lane-wise
    for (int v = 0; v < NR; ++v) {
      __m512 mx = _mm512_load_ps(&w.m[16 * v]);
      const __m512 m_old = mx;
      for (int t = 0; t < kKeys; ++t) mx = _mm512_max_ps(mx, _mm512_load_ps(&w.s[t][16 * v]));
      __m512 sum = _mm512_setzero_ps();
      for (int t = 0; t < kKeys; ++t) {
        const __m512 sv = _mm512_load_ps(&w.s[t][16 * v]);
        __m512 pr = exp16(_mm512_sub_ps(sv, mx));
        if (diagonal) pr = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(sv, neg_inf, _CMP_NEQ_OQ), pr);
        _mm512_store_ps(&w.s[t][16 * v], pr);
        sum = _mm512_add_ps(sum, pr);
      }
      const __m512 alpha = exp16(_mm512_sub_ps(m_old, mx));  // ~0 on the first block (m_old = -inf)
      _mm512_store_ps(&w.alpha[16 * v], alpha);
      _mm512_store_ps(&w.l[16 * v], _mm512_fmadd_ps(_mm512_load_ps(&w.l[16 * v]), alpha, sum));
      _mm512_store_ps(&w.m[16 * v], mx);
    }
    // probabilities as bfloat16 pairs of keys; value rows interleaved in pairs
    for (int u = 0; u < kKeys / 2; ++u) {
      for (int v = 0; v < NR; ++v) {
        const __m256i a = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(&w.s[2 * u][16 * v]));
        const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(&w.s[2 * u + 1][16 * v]));
        _mm256_store_si256(reinterpret_cast<__m256i*>(&w.pp[u][16 * v]), _mm256_unpacklo_epi16(a, b));
        _mm256_store_si256(reinterpret_cast<__m256i*>(&w.pp[u][16 * v + 8]), _mm256_unpackhi_epi16(a, b));
      }
      for (int c = 0; c < D / 32; ++c) {
        const __m512i a = _mm512_loadu_si512(vrow[2 * u] + 32 * c);
        const __m512i b = _mm512_loadu_si512(vrow[2 * u + 1] + 32 * c);
        _mm512_store_si512(&w.vp[u][32 * c], _mm512_unpacklo_epi16(a, b));
        _mm512_store_si512(&w.vp[u][32 * c + 16], _mm512_unpackhi_epi16(a, b));
      }
    }
    // values: a few rows' accumulators in registers over the block
    constexpr int kCols = D / 16, kRowBlock = kCols >= 16 ? 1 : 16 / kCols;
    for (int r0 = 0; r0 < rows; r0 += kRowBlock) {
      __m512 a[kRowBlock][kCols];
      int lane[kRowBlock];
      for (int j = 0; j < kRowBlock; ++j) {
        lane[j] = prob_lane(r0 + j);
        const __m512 al = _mm512_set1_ps(w.alpha[r0 + j]);
        for (int c = 0; c < kCols; ++c) a[j][c] = _mm512_mul_ps(_mm512_load_ps(&w.acc[r0 + j][16 * c]), al);
      }
      for (int u = 0; u < kKeys / 2; ++u) {
        __m512bh vv[kCols];
        for (int c = 0; c < kCols; ++c) vv[c] = (__m512bh)_mm512_load_si512(&w.vp[u][16 * c]);
        for (int j = 0; j < kRowBlock; ++j) {
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w.pp[u][lane[j]]));
          for (int c = 0; c < kCols; ++c) a[j][c] = _mm512_dpbf16_ps(a[j][c], pb, vv[c]);
        }
      }
      for (int j = 0; j < kRowBlock; ++j)
        for (int c = 0; c < kCols; ++c) _mm512_store_ps(&w.acc[r0 + j][16 * c], a[j][c]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tok = p.q_start[it.b] + it.i0 + r / G;
    uint16_t* dst = p.out + (tok * p.H + it.h * G + r % G) * D;
    const float inv = 1.f / w.l[r];  // > 0: every row sees key 0
    for (int d = 0; d < D; ++d) dst[d] = c10::BFloat16(w.acc[r][w.col[d]] * inv).x;
  }
}

template <int D>
void run_all(const Problem& p, const std::vector<Item>& items) {
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {  // each thread takes the next item (longest first)
      std::unique_ptr<Scratch<D>> w(new Scratch<D>);
      for (size_t i = next++; i < items.size(); i = next++) {
        switch (items[i].row_vecs) {
          case 1: run_item<D, 1>(p, items[i], *w); break;
          case 2: run_item<D, 2>(p, items[i], *w); break;
          case 3: run_item<D, 3>(p, items[i], *w); break;
          default: run_item<D, 4>(p, items[i], *w);
        }
      }
    }
  });
}

bool extend_attention_avx512(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                             const at::Tensor& idx, const at::Tensor& prefix, const at::Tensor& extend,
                             double scale, at::Tensor& out) {
  const int64_t D = q.size(2), H = q.size(1), KVH = k_buf.size(1), G = H / KVH;
  if (q.scalar_type() != at::kBFloat16 || G > kRows || !(D == 32 || D == 64 || D == 128)) return false;
  const int64_t B = idx.size(0);
  std::vector<int64_t> q_start(B + 1, 0);
  const int64_t* pre = prefix.data_ptr<int64_t>();
  const int64_t* ext = extend.data_ptr<int64_t>();
  std::vector<Item> items;
  for (int64_t b = 0; b < B; ++b) {
    q_start[b + 1] = q_start[b] + ext[b];
    // the request's positions in as few items as fit, of equal size (32 positions x 3 heads: two
    // items of 48 rows, not 63 + 33 in 128 lanes)
    const int64_t cap = kRows / G, n_items = (ext[b] + cap - 1) / cap;
    const int64_t per_item = (ext[b] + n_items - 1) / std::max<int64_t>(n_items, 1);  // <= cap
    for (int64_t i0 = 0; i0 < ext[b]; i0 += per_item)
      for (int64_t h = 0; h < KVH; ++h) {
        const int64_t n_pos = std::min(per_item, ext[b] - i0);
        items.push_back({b, h, i0, n_pos, (pre[b] + i0 + n_pos) * n_pos, static_cast<int>((n_pos * G + 15) / 16)});
      }
  }
  TORCH_CHECK(q_start[B] == q.size(0), "extend_lens must sum to q's rows");
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const Problem p{H, D, KVH, G, idx.size(1), k_buf.stride(0), k_buf.stride(1),
                  reinterpret_cast<const uint16_t*>(q.data_ptr()), reinterpret_cast<const uint16_t*>(k_buf.data_ptr()),
                  reinterpret_cast<const uint16_t*>(v_buf.data_ptr()), idx.data_ptr<int64_t>(), pre, q_start.data(),
                  reinterpret_cast<uint16_t*>(out.data_ptr()), static_cast<float>(scale)};
  if (D == 32) run_all<32>(p, items);
  else if (D == 64) run_all<64>(p, items);
  else run_all<128>(p, items);
  return true;
}

#else
bool extend_attention_avx512(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, double, at::Tensor&) {
  return false;
}
#endif

// Whether this build runs the op for this dtype and head size (else the caller uses SDPA).
bool extend_attention_supported(bool bf16, int64_t head_dim) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return bf16 && (head_dim == 32 || head_dim == 64 || head_dim == 128);
#else
  (void)bf16;
  (void)head_dim;
  return false;
#endif
}

at::Tensor extend_attention(const at::Tensor& q, const at::Tensor& k_buf, const at::Tensor& v_buf,
                            const at::Tensor& kv_indices, const at::Tensor& prefix_lens,
                            const at::Tensor& extend_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_buf.dim() == 3 && v_buf.dim() == 3, "q, k_buf, v_buf must be 3-d");
  TORCH_CHECK(q.scalar_type() == k_buf.scalar_type() && k_buf.scalar_type() == v_buf.scalar_type(),
              "q, k_buf and v_buf must share a dtype");
  TORCH_CHECK(k_buf.sizes() == v_buf.sizes() && k_buf.strides() == v_buf.strides(), "k_buf and v_buf must have one layout");
  TORCH_CHECK(k_buf.stride(2) == 1, "k_buf rows must be contiguous");
  TORCH_CHECK(q.size(1) % k_buf.size(1) == 0 && q.size(2) == k_buf.size(2), "q and the pool disagree on heads");
  TORCH_CHECK(kv_indices.dim() == 2 && kv_indices.scalar_type() == at::kLong, "kv_indices must be [B, Lk] int64");
  TORCH_CHECK(prefix_lens.scalar_type() == at::kLong && extend_lens.scalar_type() == at::kLong &&
                  prefix_lens.numel() == kv_indices.size(0) && extend_lens.numel() == kv_indices.size(0),
              "prefix_lens and extend_lens must be [B] int64");
  TORCH_CHECK(extend_attention_supported(q.scalar_type() == at::kBFloat16, q.size(2)),
              "extend_attention: this build covers bfloat16 with head_dim 32, 64 or 128 on AVX512-BF16");
  auto out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  const auto qc = q.contiguous(), idx = kv_indices.contiguous();
  const auto pre = prefix_lens.contiguous(), ext = extend_lens.contiguous();
  TORCH_CHECK(extend_attention_avx512(qc, k_buf, v_buf, idx, pre, ext, scale, out), "extend_attention: unsupported");
  return out;
}

}  // namespace
}  // namespace research_rt

TORCH_LIBRARY_FRAGMENT(research_rt, m) {
  m.def("extend_attention(Tensor q, Tensor k_buf, Tensor v_buf, Tensor kv_indices, Tensor prefix_lens, Tensor extend_lens, float scale) -> Tensor");
  m.def("extend_attention_supported(bool bf16, int head_dim) -> bool", &research_rt::extend_attention_supported);
}

TORCH_LIBRARY_IMPL(research_rt, CPU, m) { m.impl("extend_attention", &research_rt::extend_attention); }
