// The inner loops of research_rt::extend_attention (extend_attention.cpp states the op): one work item,
// one request x one KV head x up to 64 / G positions, whose G query heads x positions are the lanes
// ("rows") of NR <= 4 vectors, so the online softmax is lane-wise. Keys go in blocks of 32; the two
// products of each block come in two flavours (`Products`), picked per CPU by extend_attention.cpp:
//   kPairs  VDPBF16PS on bfloat16 pairs: query pairs (packed once per item) times each key's pair
//           broadcast from its pool row; probabilities rounded to bfloat16 pairs of keys (as flash
//           attention rounds P for its second matmul) times value rows interleaved in pairs.
//   kFloat  FMAs on float32: the block's keys and values widened once into scratch, queries and
//           probabilities kept in float32. Twice VDPBF16PS's flop rate where it issues at a quarter of
//           the FMA's rate (the Xeon of benchmarks/RESULTS.md); half of it where both issue alike.
//           The only flavour for a float32 pool (element type T = float; the others take bfloat16
//           bits, T = uint16_t).
//   kTiles  AMX tiles. The scores transposed, S^T = K Q^T: the block's key rows, copied contiguous,
//           are the A operand, the query pairs of kPairs are B, and S^T lands in `s`'s [key][row]
//           layout. The values acc += P V: P rounded to bfloat16 as kPairs does, transposed to
//           row-major (the A operand), and the value rows interleaved in pairs (B). Where the CPU
//           has AMX.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "amx_linear.h"
#include "vec_math.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define RESEARCH_RT_EXTEND_TILES 1
#endif

namespace research_rt {
namespace extend {

enum class Products { kPairs, kFloat, kTiles };

constexpr int kMaxRowVecs = 4;  // row vectors per item: up to 64 lanes of (position, query head)
constexpr int kRows = 16 * kMaxRowVecs;
constexpr int kKeys = 32;  // keys per online-softmax update
constexpr int kScoreKeys = 4;  // keys whose scores are accumulated together

// The head sizes run_items is instantiated for (`Scratch` and the loops take D at compile time)
inline bool head_dim_supported(int64_t D) { return D == 32 || D == 64 || D == 128; }

// Request b's positions i0 .. i0 + n_pos - 1 (rows: positions x the G query heads of KV head h) over
// the request's first n_keys keys, causally: position prefix[b] + i sees keys 0 .. prefix[b] + i.
struct Item {
  int64_t b, h, i0, n_pos, n_keys, cost;
  int row_vecs;  // ceil(n_pos * G / 16)
};

struct Problem {
  int64_t H, D, KVH, G, Lk, slot_stride, head_stride;
  const void* q;  // T: bfloat16 bits (uint16_t) or float, as q, k, v and out
  const void* k;
  const void* v;
  const int64_t* idx;
  const int64_t* prefix;
  const int64_t* q_start;
  void* out;
  float scale;
};

inline float to_float(uint16_t x) { return c10::BFloat16(x, c10::BFloat16::from_bits()); }
inline float to_float(float x) { return x; }
template <typename T>
inline T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else return c10::BFloat16(x).x;
}

// kPairs: the lane of row r inside the interleaved probability pairs (VPUNPCK{L,H}WD of 256 bits).
inline int prob_lane(int r) {
  const int n = r / 16, l = r % 16;
  const int slot = l < 4 ? l : l < 8 ? l + 4 : l < 12 ? l - 4 : l;
  return n * 16 + slot;
}

// kPairs: index in a row's value accumulators of output column d: a pair of value rows interleaved
// by VPUNPCK{L,H}WD keeps columns 8L..8L+3 (low) and 8L+4..8L+7 (high) of each 128-bit lane L.
inline int value_col(int d) {
  const int c = d / 32, rem = d % 32, lane = rem / 8, w = rem % 8;
  return (2 * c + w / 4) * 16 + 4 * lane + w % 4;
}

template <int D>
struct Scratch {
  alignas(64) uint32_t qp[D / 2][kRows];  // kPairs, kTiles: query pairs, lane = row
  alignas(64) uint16_t kb[kKeys][D];  // kTiles: the block's keys, contiguous
  alignas(64) uint16_t prow[kRows][kKeys];  // kTiles: probabilities, row-major bfloat16
  alignas(64) uint32_t vpair[kKeys / 2][D];  // kTiles: value pairs (keys 2u, 2u+1) per column
  alignas(64) float qf[D][kRows];  // kFloat: queries, lane = row
  alignas(64) float kf[kKeys][D];  // kFloat: the block's keys, widened
  alignas(64) float vf[kKeys][D];  // kFloat: the block's values, widened
  alignas(64) int32_t qpos[kRows];  // each row's position (INT_MAX: an unused lane sees every key)
  alignas(64) float s[kKeys][kRows];  // scaled scores, then probabilities
  alignas(64) uint32_t pp[kKeys / 2][kRows];  // kPairs: probability pairs (keys 2u, 2u+1), lane = prob_lane(row)
  alignas(64) uint32_t vp[kKeys / 2][D];  // kPairs: value pairs, column order of value_col
  alignas(64) float acc[kRows][D];  // output rows (kPairs: column order of value_col)
  alignas(64) float m[kRows], l[kRows], alpha[kRows];
  int col[D];  // value_col(d)

  Scratch() {
    for (int d = 0; d < D; ++d) col[d] = value_col(d);
  }
};

#ifdef RESEARCH_RT_EXTEND_TILES
// Seven tiles of 16 rows x 64 bytes. Scores (tile_scores): 0-3 S^T for row vectors 0-3 (16 keys x 16
// rows, float32), 4 the keys (16 keys x 32 head dims), 5 and 6 the query pairs (16 dim pairs x 16
// rows), alternating. Values (tile_values): 0 and 1 accumulators, 4 probabilities, 5 and 6 value pairs.
inline void configure_tiles() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16};
  } config;
  _tile_loadconfig(&config);
}

// s[t][row] = q_row . k_t (unscaled) for the block's keys, by tiles
template <int D, int NR>
inline void tile_scores(Scratch<D>& w) {
  constexpr int64_t kQStride = kRows * 4;  // bytes between dim pairs in qp
  for (int kt = 0; kt < kKeys / 16; ++kt) {
    _tile_zero(0);
    if constexpr (NR > 1) _tile_zero(1);
    if constexpr (NR > 2) _tile_zero(2);
    if constexpr (NR > 3) _tile_zero(3);
    for (int db = 0; db < D / 32; ++db) {
      _tile_loadd(4, &w.kb[16 * kt][32 * db], D * 2);
      _tile_loadd(5, &w.qp[16 * db][0], kQStride);
      _tile_dpbf16ps(0, 4, 5);
      if constexpr (NR > 1) {
        _tile_loadd(6, &w.qp[16 * db][16], kQStride);
        _tile_dpbf16ps(1, 4, 6);
      }
      if constexpr (NR > 2) {
        _tile_loadd(5, &w.qp[16 * db][32], kQStride);
        _tile_dpbf16ps(2, 4, 5);
      }
      if constexpr (NR > 3) {
        _tile_loadd(6, &w.qp[16 * db][48], kQStride);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    _tile_stored(0, &w.s[16 * kt][0], kRows * 4);
    if constexpr (NR > 1) _tile_stored(1, &w.s[16 * kt][16], kRows * 4);
    if constexpr (NR > 2) _tile_stored(2, &w.s[16 * kt][32], kRows * 4);
    if constexpr (NR > 3) _tile_stored(3, &w.s[16 * kt][48], kRows * 4);
  }
}

// prow: each row's 32 probabilities as bfloat16, row-major; vpair: value rows 2u, 2u+1 interleaved
template <int D, int NR>
inline void tile_stage(Scratch<D>& w, const uint16_t* const* vrow) {
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                         22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int v = 0; v < NR; ++v) {
    __m512i a[16];  // a[u] lane r: (p[2u][r], p[2u + 1][r])
    for (int u = 0; u < kKeys / 2; ++u) {
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(&w.s[2 * u + 1][16 * v]),
                                                        _mm512_load_ps(&w.s[2 * u][16 * v]));
      a[u] = _mm512_permutexvar_epi16(pairs, both);
    }
    transpose16(a);  // a[r]: row r's 32 probabilities
    for (int r = 0; r < 16; ++r) _mm512_store_si512(&w.prow[16 * v + r][0], a[r]);
  }
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                      6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int u = 0; u < kKeys / 2; ++u) {
    for (int c = 0; c < D / 32; ++c) {
      const __m512i x = _mm512_loadu_si512(vrow[2 * u] + 32 * c), y = _mm512_loadu_si512(vrow[2 * u + 1] + 32 * c);
      _mm512_store_si512(&w.vpair[u][32 * c], _mm512_permutex2var_epi16(x, lo, y));
      _mm512_store_si512(&w.vpair[u][32 * c + 16], _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// acc[row] = alpha[row] * acc[row] + P[row] V, by tiles (tile 4: P rows, 5 and 6: value pairs, 0 and
// 1: the accumulators of two column blocks in turn)
template <int D, int NR>
inline void tile_values(Scratch<D>& w, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 al = _mm512_set1_ps(w.alpha[r]);
    for (int c = 0; c < D / 16; ++c)
      _mm512_store_ps(&w.acc[r][16 * c], _mm512_mul_ps(_mm512_load_ps(&w.acc[r][16 * c]), al));
  }
  for (int v = 0; v < NR; ++v) {
    _tile_loadd(4, &w.prow[16 * v][0], kKeys * 2);
    for (int c = 0; c < D / 16; c += 2) {
      _tile_loadd(0, &w.acc[16 * v][16 * c], D * 4);
      _tile_loadd(5, &w.vpair[0][16 * c], D * 4);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(1, &w.acc[16 * v][16 * c + 16], D * 4);
      _tile_loadd(6, &w.vpair[0][16 * c + 16], D * 4);
      _tile_dpbf16ps(1, 4, 6);
      _tile_stored(0, &w.acc[16 * v][16 * c], D * 4);
      _tile_stored(1, &w.acc[16 * v][16 * c + 16], D * 4);
    }
  }
}
#endif

// scores[t][row] = scale * q_row . k_t for the block's 32 keys
template <int D, int NR, Products P, typename T>
inline void block_scores(Scratch<D>& w, const T* const* krow, __m512 scale) {
  if constexpr (P == Products::kTiles) {
#ifdef RESEARCH_RT_EXTEND_TILES
    tile_scores<D, NR>(w);
#endif
    for (int t = 0; t < kKeys; ++t)
      for (int v = 0; v < NR; ++v)
        _mm512_store_ps(&w.s[t][16 * v], _mm512_mul_ps(_mm512_load_ps(&w.s[t][16 * v]), scale));
    return;
  }
  for (int t0 = 0; t0 < kKeys; t0 += kScoreKeys) {
    __m512 a[kScoreKeys][NR];
    for (int j = 0; j < kScoreKeys; ++j)
      for (int v = 0; v < NR; ++v) a[j][v] = _mm512_setzero_ps();
    if constexpr (P == Products::kPairs) {
      for (int x = 0; x < D / 2; ++x) {
        __m512bh qv[NR];
        for (int v = 0; v < NR; ++v) qv[v] = (__m512bh)_mm512_load_si512(&w.qp[x][16 * v]);
        for (int j = 0; j < kScoreKeys; ++j) {
          const __m512bh kb = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(krow[t0 + j] + 2 * x));
          for (int v = 0; v < NR; ++v) a[j][v] = _mm512_dpbf16_ps(a[j][v], qv[v], kb);
        }
      }
    } else {
      for (int x = 0; x < D; ++x) {
        __m512 qv[NR];
        for (int v = 0; v < NR; ++v) qv[v] = _mm512_load_ps(&w.qf[x][16 * v]);
        for (int j = 0; j < kScoreKeys; ++j) {
          const __m512 kb = _mm512_set1_ps(w.kf[t0 + j][x]);
          for (int v = 0; v < NR; ++v) a[j][v] = _mm512_fmadd_ps(qv[v], kb, a[j][v]);
        }
      }
    }
    for (int j = 0; j < kScoreKeys; ++j)
      for (int v = 0; v < NR; ++v) _mm512_store_ps(&w.s[t0 + j][16 * v], _mm512_mul_ps(a[j][v], scale));
  }
}

// acc[row] = alpha[row] * acc[row] + sum_t probs[t][row] * v_t
template <int D, Products P>
inline void block_values(Scratch<D>& w, int64_t rows) {
  // a few rows' accumulators in registers over the block
  constexpr int kCols = D / 16, kRowBlock = kCols >= 16 ? 1 : 16 / kCols;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    __m512 a[kRowBlock][kCols];
    for (int j = 0; j < kRowBlock; ++j) {
      const __m512 al = _mm512_set1_ps(w.alpha[r0 + j]);
      for (int c = 0; c < kCols; ++c) a[j][c] = _mm512_mul_ps(_mm512_load_ps(&w.acc[r0 + j][16 * c]), al);
    }
    if constexpr (P == Products::kPairs) {
      int lane[kRowBlock];
      for (int j = 0; j < kRowBlock; ++j) lane[j] = prob_lane(static_cast<int>(r0) + j);
      for (int u = 0; u < kKeys / 2; ++u) {
        __m512bh vv[kCols];
        for (int c = 0; c < kCols; ++c) vv[c] = (__m512bh)_mm512_load_si512(&w.vp[u][16 * c]);
        for (int j = 0; j < kRowBlock; ++j) {
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(w.pp[u][lane[j]]));
          for (int c = 0; c < kCols; ++c) a[j][c] = _mm512_dpbf16_ps(a[j][c], pb, vv[c]);
        }
      }
    } else {
      for (int t = 0; t < kKeys; ++t) {
        __m512 vv[kCols];
        for (int c = 0; c < kCols; ++c) vv[c] = _mm512_load_ps(&w.vf[t][16 * c]);
        for (int j = 0; j < kRowBlock; ++j) {
          const __m512 pb = _mm512_set1_ps(w.s[t][r0 + j]);
          for (int c = 0; c < kCols; ++c) a[j][c] = _mm512_fmadd_ps(pb, vv[c], a[j][c]);
        }
      }
    }
    for (int j = 0; j < kRowBlock; ++j)
      for (int c = 0; c < kCols; ++c) _mm512_store_ps(&w.acc[r0 + j][16 * c], a[j][c]);
  }
}

// The block's keys (kFloat: widened) and values (kPairs: interleaved in pairs; kFloat: widened), and
// the probabilities as bfloat16 pairs (kPairs)
template <int D, int NR, Products P, typename T>
inline void stage_block(Scratch<D>& w, const T* const* vrow) {
  if constexpr (P == Products::kPairs) {
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
  } else {
    for (int t = 0; t < kKeys; ++t)
      for (int c = 0; c < D / 16; ++c) _mm512_store_ps(&w.vf[t][16 * c], load16(vrow[t] + 16 * c));
  }
}

template <int D, int NR, Products P, typename T>
void run_item(const Problem& p, const Item& it, Scratch<D>& w) {
  static_assert(P == Products::kFloat || std::is_same_v<T, uint16_t>, "float32 pools take kFloat");
  const int64_t G = p.G, rows = it.n_pos * G, prefix = p.prefix[it.b];
  const int64_t n_keys = it.n_keys;
  const int64_t* slots = p.idx + it.b * p.Lk;
  const T* kh = static_cast<const T*>(p.k) + it.h * p.head_stride;
  const T* vh = static_cast<const T*>(p.v) + it.h * p.head_stride;
  for (int r = 0; r < 16 * NR; ++r) {
    const bool live = r < rows;
    const int64_t tok = p.q_start[it.b] + it.i0 + r / G;
    const T* qr = live ? static_cast<const T*>(p.q) + (tok * p.H + it.h * G + r % G) * D : nullptr;
    if constexpr (P != Products::kFloat) {
      for (int x = 0; x < D / 2; ++x) w.qp[x][r] = live ? reinterpret_cast<const uint32_t*>(qr)[x] : 0u;
    } else {
      for (int x = 0; x < D; ++x) w.qf[x][r] = live ? to_float(qr[x]) : 0.f;
    }
    // the last key each row sees (an unused lane: INT_MAX, it sees every key and is never read)
    const int64_t last = prefix + it.i0 + r / G;
    w.qpos[r] = live ? static_cast<int32_t>(last) : INT_MAX;
    w.m[r] = -std::numeric_limits<float>::infinity();
    w.l[r] = 0.f;
  }
  std::fill(&w.acc[0][0], &w.acc[0][0] + 16 * NR * D, 0.f);
  const __m512 scale = _mm512_set1_ps(p.scale), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t first_pos = prefix + it.i0;

  for (int64_t k0 = 0; k0 < n_keys; k0 += kKeys) {
    const int64_t n = std::min<int64_t>(kKeys, n_keys - k0);
    const T* krow[kKeys];
    const T* vrow[kKeys];
    for (int t = 0; t < kKeys; ++t) {  // past the last key: slot 0, the pool's zeroed dummy row (masked)
      const int64_t slot = t < n ? slots[k0 + t] : 0;
      krow[t] = kh + slot * p.slot_stride;
      vrow[t] = vh + slot * p.slot_stride;
      if constexpr (P == Products::kFloat)
        for (int c = 0; c < D / 16; ++c) _mm512_store_ps(&w.kf[t][16 * c], load16(krow[t] + 16 * c));
      if constexpr (P == Products::kTiles) std::memcpy(w.kb[t], krow[t], D * 2);
    }
    block_scores<D, NR, P, T>(w, krow, scale);
    // causal mask and keys past the last, where some row does not see the whole block
    const bool diagonal = k0 + kKeys > n_keys || k0 + kKeys - 1 > first_pos;
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
    if constexpr (P == Products::kTiles) {
#ifdef RESEARCH_RT_EXTEND_TILES
      tile_stage<D, NR>(w, vrow);
      tile_values<D, NR>(w, rows);
#endif
    } else {
      stage_block<D, NR, P, T>(w, vrow);
      block_values<D, P>(w, rows);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tok = p.q_start[it.b] + it.i0 + r / G, row = tok * p.H + it.h * G + r % G;
    const auto col = [&](int d) { return P == Products::kPairs ? w.col[d] : d; };
    T* dst = static_cast<T*>(p.out) + row * D;
    const float inv = 1.f / w.l[r];  // > 0: every row sees key 0
    for (int d = 0; d < D; ++d) dst[d] = from_float<T>(w.acc[r][col(d)] * inv);
  }
}

// Whether this build and CPU run the kTiles products.
inline bool tiles_supported() {
#ifdef RESEARCH_RT_EXTEND_TILES
  return amx_available();
#else
  return false;
#endif
}

// The products for this CPU, by vendor (a fixed choice: the same machine always computes the same
// bits). Intel's AVX512-BF16 cores issue VDPBF16PS at a quarter of the FMA's rate (0.86 vs 0.22 ns per
// 512-bit instruction on the Xeon of benchmarks/RESULTS.md), so float32 FMAs do twice the flops.
// Elsewhere (AMD) the bfloat16 pairs, which stage half the bytes per block; compare both on a new
// CPU with benchmarks/bench_extend_attention.py. Where AMX runs, tiles (the flavour's own products
// are the same bits on every AMX CPU).
inline Products fastest_products() {
#ifdef RESEARCH_RT_EXTEND_TILES
  static const Products choice = amx_available()            ? Products::kTiles
                                 : __builtin_cpu_is("intel") ? Products::kFloat
                                                             : Products::kPairs;
#else
  static const Products choice = __builtin_cpu_is("intel") ? Products::kFloat : Products::kPairs;
#endif
  return choice;
}

// Runs `items` (sorted longest first) on ATen's threads, each taking the next item as it finishes.
template <int D, Products P, typename T = uint16_t>
void run_all(const Problem& p, const std::vector<Item>& items) {
  std::atomic<size_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
#ifdef RESEARCH_RT_EXTEND_TILES
      if constexpr (P == Products::kTiles) configure_tiles();
#endif
      std::unique_ptr<Scratch<D>> w(new Scratch<D>);
      for (size_t i = next++; i < items.size(); i = next++) {
        switch (items[i].row_vecs) {
          case 1: run_item<D, 1, P, T>(p, items[i], *w); break;
          case 2: run_item<D, 2, P, T>(p, items[i], *w); break;
          case 3: run_item<D, 3, P, T>(p, items[i], *w); break;
          default: run_item<D, 4, P, T>(p, items[i], *w);
        }
      }
    }
#ifdef RESEARCH_RT_EXTEND_TILES
    if constexpr (P == Products::kTiles) _tile_release();
#endif
  });
}

// `run_all` for head size D (32, 64 or 128) with `products` (0: fastest_products, 1 pairs, 2 float32,
// 3 tiles: where tiles_supported()); a float32 pool (`f32`) always takes the float32 products
inline void run_items(const Problem& p, const std::vector<Item>& items, int64_t products, bool f32) {
  if (f32) {
    if (p.D == 32) run_all<32, Products::kFloat, float>(p, items);
    else if (p.D == 64) run_all<64, Products::kFloat, float>(p, items);
    else run_all<128, Products::kFloat, float>(p, items);
    return;
  }
  const Products P = products == 1   ? Products::kPairs
                     : products == 2 ? Products::kFloat
                     : products == 3 ? Products::kTiles
                                     : fastest_products();
  if (P == Products::kTiles) {
    if (p.D == 32) run_all<32, Products::kTiles>(p, items);
    else if (p.D == 64) run_all<64, Products::kTiles>(p, items);
    else run_all<128, Products::kTiles>(p, items);
  } else if (P == Products::kPairs) {
    if (p.D == 32) run_all<32, Products::kPairs>(p, items);
    else if (p.D == 64) run_all<64, Products::kPairs>(p, items);
    else run_all<128, Products::kPairs>(p, items);
  } else {
    if (p.D == 32) run_all<32, Products::kFloat>(p, items);
    else if (p.D == 64) run_all<64, Products::kFloat>(p, items);
    else run_all<128, Products::kFloat>(p, items);
  }
}

// Items of at most 64 rows for `n` consecutive positions of request b: as few as fit, of equal size
// (32 positions x 3 heads: two items of 48 rows, not 63 + 33 in 128 lanes), for every KV head.
inline void add_items(std::vector<Item>& items, int64_t b, int64_t n, int64_t n_keys_before, int64_t G, int64_t KVH) {
  const int64_t cap = kRows / G, n_items = (n + cap - 1) / cap;
  const int64_t per_item = (n + n_items - 1) / std::max<int64_t>(n_items, 1);  // <= cap
  for (int64_t i0 = 0; i0 < n; i0 += per_item)
    for (int64_t h = 0; h < KVH; ++h) {
      const int64_t n_pos = std::min(per_item, n - i0);
      const int64_t n_keys = n_keys_before + i0 + n_pos;
      items.push_back({b, h, i0, n_pos, n_keys, n_keys * n_pos, static_cast<int>((n_pos * G + 15) / 16)});
    }
}

}  // namespace extend
}  // namespace research_rt
#endif
