// RingAttention: one token's softmax readout over a layer's ring of kept keys and values, as one
// onnxruntime custom op (domain "linearize"). The step graph's own ops for the same readout
// (engine/step.py, `_softmax_readout`) are its reference, and what the graph runs where this library
// is not built.
//
// Why: the graph reads each ring once per query head (R one-row products over the same keys) and
// runs ~12 small nodes over the scores; here every key and value row is read once for the R query
// heads that share it, and the mask, max, exp and sums run in the same pass (AVX2 + FMA).
// Keys are scored four rows at a time and the weighted values summed in registers, the rows
// asked for ahead of the reads (at 8k the default's wide windows take 6.3 MB a layer per token).
//
// Inputs (float32, but the rings' keys and values, float32, float16 or int8; B rows, each a
// sequence of its own: 1 in the one-sequence step):
//   0 q            [B, Hkv, R, K]  the queries, scaled by 1/sqrt(K)
//   1 q_sink       [B, Hkv, R, K]  the queries that score the ring's first `front` slots
//   2 keys         [B, Hkv, C, K]  the ring's keys (float32, float16 or int8, as the values)
//   3 values       [B, Hkv, C, K]  the ring's values (as wide as the keys)
//   4 mask         [C] or [B, C]   added to the ring's scores (0 or -inf)
//   5 key          [B, Hkv, 1, K]  the new token's key
//   6 value        [B, Hkv, 1, K]  the new token's value
//   7 window_mask  [C + 1]         (retained) 0 on the window's slots, -inf on the retained cache
//   8 inwindow     [C + 1, 1]      (retained) 1 on the window's slots, 0 on the retained cache
//   9 key_scales   [B, Hkv, C, K / 32]  (int8 rings: RingAttentionInt8) each group of 32 codes'
//  10 value_scales [B, Hkv, C, K / 32]  scale (llama.cpp's q8_0: a key or value is code · scale)
// Attributes: front (slots scored by q_sink), retained (0 / 1).
// Outputs:
//   0 num        [B, Hkv, R, K]    sum_c e^(s_c - m) v_c over the ring and the new token
//   1 den        [B, Hkv, R, 1]    sum_c e^(s_c - m)
//   2 attention  [B, Hkv, C + 1]   (retained; else [B, Hkv, 0]) each slot's softmax weight
//                                  renormalised over the window, summed over the R heads
// with m the largest score (retained: the largest in the window). The key heads (of every row)
// are split over onnxruntime's intra-op threads, a ring of kSplit slots or more in two parts.
// float16 rings are widened to float32 as they are read (F16C), int8 codes converted and
// multiplied by their group's scale; the arithmetic is float32.
//
// onnxruntime's C ABI: ort_abi.h.

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "ort_abi.h"
#include "simd.h"

namespace linearize {
namespace {

// ---- the arithmetic ------------------------------------------------------------------------

// e^x for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 polynomial (Cephes'
// coefficients, ~1 ulp), times 2^n; 0 below -87.3 (and for -inf: a masked slot).
inline __m256 exp8(__m256 x) {
  const __m256 zero_below = _mm256_set1_ps(-87.33654f);
  __m256 small = _mm256_cmp_ps(x, zero_below, _CMP_LT_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, zero_below);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(small, y);
}

// The rows kAhead rows on, asked for before they are read: the rings stream from memory (they
// outgrow the caches: the default's wide windows are 6.3 MB a layer at 8k), where the hardware's
// own prefetch alone left the kernel ~20 % slower (cold rings, one thread).
constexpr int64_t kAhead = 32;

template <typename T>
inline void prefetch_rows(const T* rows, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(rows);
  for (int64_t b = 0; b < elements * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(bytes + b, _MM_HINT_T0);
}

// int8 rings: a scale per group of kGroup lanes of a row (llama.cpp's q8_0 blocks), the row's
// K / kGroup scales in a float32 array beside the codes.
constexpr int64_t kGroup = 32;

template <typename T>
constexpr bool kCodes = std::is_same_v<T, int8_t>;

// Lanes [8j, 8j + 8) of row c of a ring of K-wide rows, as float32: int8 codes times their
// group's scale (`scales`, K / kGroup a row; not read for float rings).
template <typename T>
inline __m256 lanes(const T* rows, const float* scales, int64_t K, int64_t c, int64_t j) {
  const __m256 x = load8(rows + c * K + 8 * j);
  if constexpr (kCodes<T>)
    return _mm256_mul_ps(x, _mm256_broadcast_ss(scales + c * (K / kGroup) + j / (kGroup / 8)));
  else
    return x;
}

// Query rows · one key row, R heads at once: two partial sums per head (chains of J / 2 FMAs).
template <int R, int KT, typename T>
inline void dot_row(const float* qq, const T* rows, const float* scales, int64_t c, int64_t K,
                    float* out, int64_t stride) {
  const int64_t J = (KT ? KT : K) / 8;
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= J; j += 2) {
    __m256 k0 = lanes(rows, scales, K, c, j), k1 = lanes(rows, scales, K, c, j + 1);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + r * K + 8 * j), k0, a[r]);
      b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + r * K + 8 * j + 8), k1, b[r]);
    }
  }
  if (j < J) {
    __m256 k0 = lanes(rows, scales, K, c, j);
    for (int r = 0; r < R; ++r)
      a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + r * K + 8 * j), k0, a[r]);
  }
  for (int r = 0; r < R; ++r) out[r * stride] = sum8(_mm256_add_ps(a[r], b[r]));
}

// Query rows · two key rows (independent chains: a single row's FMAs wait on each other).
template <int R, int KT, typename T>
inline void dot_rows2(const float* q, const T* rows, const float* scales, int64_t c, int64_t K,
                      float* out, int64_t stride) {
  const int64_t J = (KT ? KT : K) / 8;
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m256 k0 = lanes(rows, scales, K, c, j), k1 = lanes(rows, scales, K, c + 1, j);
    for (int r = 0; r < R; ++r) {
      __m256 q8 = _mm256_loadu_ps(q + r * K + 8 * j);
      a[r] = _mm256_fmadd_ps(q8, k0, a[r]);
      b[r] = _mm256_fmadd_ps(q8, k1, b[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    out[r * stride] = sum8(a[r]);
    out[r * stride + 1] = sum8(b[r]);
  }
}

// Query rows · four key rows, R heads at once (R <= 3: 4R accumulators in registers), the
// four sums of each head reduced together.
template <int R, int KT, typename T>
inline void dot_rows4(const float* q, const T* rows, const float* scales, int64_t c, int64_t K,
                      float* out, int64_t stride) {
  const int64_t J = (KT ? KT : K) / 8;
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < 4; ++n) a[r][n] = _mm256_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    const __m256 k0 = lanes(rows, scales, K, c, j), k1 = lanes(rows, scales, K, c + 1, j);
    const __m256 k2 = lanes(rows, scales, K, c + 2, j), k3 = lanes(rows, scales, K, c + 3, j);
    for (int r = 0; r < R; ++r) {
      const __m256 q8 = _mm256_loadu_ps(q + r * K + 8 * j);
      a[r][0] = _mm256_fmadd_ps(q8, k0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(q8, k1, a[r][1]);
      a[r][2] = _mm256_fmadd_ps(q8, k2, a[r][2]);
      a[r][3] = _mm256_fmadd_ps(q8, k3, a[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    _mm_storeu_ps(out + r * stride, sum8x4(a[r][0], a[r][1], a[r][2], a[r][3]));
}

// One key head's slots [c0, c1) and, with `own`, the new token (column C of the scratch rows
// w, R rows of W = C + 1): its R query heads' scores, the mask added; m[r] the largest score
// (with a retained cache: the largest in the window). KT: the head size when known at compile
// time (0: K). T: the ring's element type (float, or uint16_t for float16).
template <int R, int KT, typename T>
void scores(const float* q, const float* qs, const T* keys, const float* key_scales,
            const float* mask,
            const float* key, const float* window_mask, int64_t C, int64_t K_, int64_t front,
            bool retained, int64_t c0, int64_t c1, bool own, float* w, float* m) {
  const int64_t K = KT ? KT : K_, W = C + 1;
  // Each key row read once for the R heads; the first `front` by the sink queries.
  int64_t c = c0;
  for (; c < front && c < c1; ++c) dot_row<R, KT>(qs, keys, key_scales, c, K, w + c, W);
  if constexpr (R <= 3)
    for (; c + 4 <= c1; c += 4) {
      if constexpr (sizeof(T) <= 2)  // (float32 rings' keys measured slower with it)
        if (c + kAhead + 4 <= c1) {
          prefetch_rows(keys + (c + kAhead) * K, 4 * K);
          if constexpr (kCodes<T>) prefetch_rows(key_scales + (c + kAhead) * (K / kGroup), 4 * K / kGroup);
        }
      dot_rows4<R, KT>(q, keys, key_scales, c, K, w + c, W);
    }
  for (; c + 2 <= c1; c += 2) dot_rows2<R, KT>(q, keys, key_scales, c, K, w + c, W);
  for (; c < c1; ++c) dot_row<R, KT>(q, keys, key_scales, c, K, w + c, W);
  if (own) dot_row<R, KT>(q, key, nullptr, 0, K, w + C, W);
  for (int r = 0; r < R; ++r) {
    float* wr = w + r * W;
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t i = c0;
    for (; i + 8 <= c1; i += 8) {
      __m256 s = _mm256_add_ps(_mm256_loadu_ps(wr + i), _mm256_loadu_ps(mask + i));
      _mm256_storeu_ps(wr + i, s);
      if (retained) s = _mm256_add_ps(s, _mm256_loadu_ps(window_mask + i));
      top8 = _mm256_max_ps(top8, s);
    }
    float top = max8(top8);
    for (; i < c1; ++i) {
      wr[i] += mask[i];
      const float s = retained ? wr[i] + window_mask[i] : wr[i];
      top = s > top ? s : top;
    }
    if (own) {
      const float s = retained ? wr[C] + window_mask[C] : wr[C];
      top = s > top ? s : top;
    }
    m[r] = top;
  }
}

// Value rows are weighed kBlock at a time, JB vectors of each at a time (the block's rows stay in
// L1 between the parts).
constexpr int64_t kBlock = 16;

// acc (R x K) += the weights w (R rows of W) · value rows [b0, b1), lanes [8 j0, 8 (j0 + JB)):
// R x JB accumulators in registers (R <= 3: 12, with the R weights and a row's 8 lanes AVX2's 16).
template <int R, int JB, typename T>
inline void weigh_rows(const T* values, const float* value_scales, const float* w, int64_t W,
                       int64_t K, int64_t j0, int64_t b0, int64_t b1, int64_t end,
                       float* acc_rows) {
  __m256 acc[R][JB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < JB; ++j) acc[r][j] = _mm256_load_ps(acc_rows + r * K + 8 * (j0 + j));
  for (int64_t c = b0; c < b1; ++c) {
    if (j0 == 0 && c + kAhead < end) {
      prefetch_rows(values + (c + kAhead) * K, K);
      if constexpr (kCodes<T>) prefetch_rows(value_scales + (c + kAhead) * (K / kGroup), K / kGroup);
    }
    __m256 wc[R];
    for (int r = 0; r < R; ++r) wc[r] = _mm256_broadcast_ss(w + r * W + c);
    for (int j = 0; j < JB; ++j) {
      const __m256 v8 = lanes(values, value_scales, K, c, j0 + j);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm256_fmadd_ps(wc[r], v8, acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < JB; ++j) _mm256_store_ps(acc_rows + r * K + 8 * (j0 + j), acc[r][j]);
}

// The same columns' weights e^(s - m) in place, their sums (den[r]; with a retained cache also
// the window's part, inside[r]) and the values' weighted sums (num, R x K): each value row read
// once for the R heads.
template <int R, int KT, typename T>
void weigh(const T* values, const float* value_scales, const float* value,
           const float* inwindow, int64_t C,
           int64_t K_, bool retained, int64_t c0, int64_t c1, bool own, const float* m, float* w,
           float* num, float* den, float* inside) {
  const int64_t K = KT ? KT : K_, J = K / 8, W = C + 1;
  for (int r = 0; r < R; ++r) {
    float* wr = w + r * W;
    const __m256 m8 = _mm256_set1_ps(m[r]);
    __m256 total8 = _mm256_setzero_ps(), in8 = _mm256_setzero_ps();
    int64_t c = c0;
    for (; c + 8 <= c1; c += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(wr + c), m8));
      _mm256_storeu_ps(wr + c, e);
      total8 = _mm256_add_ps(total8, e);
      if (retained) in8 = _mm256_fmadd_ps(e, _mm256_loadu_ps(inwindow + c), in8);
    }
    float total = sum8(total8), in = sum8(in8);
    for (; c < c1; ++c) {
      wr[c] = std::exp(wr[c] - m[r]);
      total += wr[c];
      if (retained) in += wr[c] * inwindow[c];
    }
    if (own) {
      wr[C] = std::exp(wr[C] - m[r]);
      total += wr[C];
      if (retained) in += wr[C] * inwindow[C];
    }
    den[r] = total;
    if (retained) inside[r] = in;
  }
  alignas(32) float acc_rows[R * 64 * 8];  // R x K (K <= 512)
  for (int64_t i = 0; i < R * K; ++i) acc_rows[i] = 0;
  // (R <= 3: whole rows, 24 accumulators, measured faster than halves for float32 rings, and
  // for the others where AVX-512's 32 registers hold them: 2.64 -> 2.29 ms, six 8k float16
  // windows)
#ifdef __AVX512VL__
  constexpr int64_t JB = R <= 3 ? 8 : (R <= 6 ? 2 : 1);
#else
  constexpr int64_t JB = R <= 3 ? (sizeof(T) == 4 ? 8 : 4) : (R <= 6 ? 2 : 1);
#endif
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < c1 ? b0 + kBlock : c1;
    if (J % JB == 0)
      for (int64_t j0 = 0; j0 < J; j0 += JB)
        weigh_rows<R, JB>(values, value_scales, w, W, K, j0, b0, b1, c1, acc_rows);
    else
      for (int64_t j0 = 0; j0 < J; ++j0)
        weigh_rows<R, 1>(values, value_scales, w, W, K, j0, b0, b1, c1, acc_rows);
  }
  for (int r = 0; r < R; ++r)
    for (int64_t j = 0; j < J; ++j) {
      __m256 a = _mm256_load_ps(acc_rows + r * K + 8 * j);
      if (own)
        a = _mm256_fmadd_ps(_mm256_set1_ps(w[r * W + C]), _mm256_loadu_ps(value + 8 * j), a);
      _mm256_storeu_ps(num + r * K + 8 * j, a);
    }
}

// Each column's softmax weight renormalised over the window (inside[r]: the R heads' in-window
// totals), summed over the R heads: columns [c0, c1), and C with `own`.
void attention_of(const float* w, int64_t R, int64_t C, int64_t c0, int64_t c1, bool own,
                  const float* inside, float* attention) {
  const int64_t W = C + 1;
  float scale[8];
  for (int64_t r = 0; r < R; ++r) scale[r] = 1.0f / inside[r];
  int64_t c = c0;
  for (; c + 8 <= c1; c += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t r = 0; r < R; ++r)
      a = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * W + c), _mm256_set1_ps(scale[r]), a);
    _mm256_storeu_ps(attention + c, a);
  }
  for (; c < c1; ++c) {
    float a = 0;
    for (int64_t r = 0; r < R; ++r) a += w[r * W + c] * scale[r];
    attention[c] = a;
  }
  if (own) {
    float a = 0;
    for (int64_t r = 0; r < R; ++r) a += w[r * W + C] * scale[r];
    attention[C] = a;
  }
}

template <typename T>
struct Stages {
  decltype(&scores<1, 0, T>) scores;
  decltype(&weigh<1, 0, T>) weigh;
};

template <int R, int KT, typename T>
constexpr Stages<T> stages_of() {
  return {scores<R, KT, T>, weigh<R, KT, T>};
}

template <int KT, typename T>
Stages<T> stages_for_size(int64_t R) {
  switch (R) {
    case 1: return stages_of<1, KT, T>();
    case 2: return stages_of<2, KT, T>();
    case 3: return stages_of<3, KT, T>();
    case 4: return stages_of<4, KT, T>();
    case 5: return stages_of<5, KT, T>();
    case 6: return stages_of<6, KT, T>();
    case 7: return stages_of<7, KT, T>();
    case 8: return stages_of<8, KT, T>();
    default: return {nullptr, nullptr};
  }
}

template <typename T>
Stages<T> stages_for(int64_t R, int64_t K) {
  return K == 64 ? stages_for_size<64, T>(R) : stages_for_size<0, T>(R);
}

struct Kernel {
  const Api* api;
  int64_t front;
  int64_t retained;
};

// Rings of at least kSplit slots are read in two parts, so that two threads share a key head
// (the default's wide windows: 3 key heads, two threads); shorter ones a key head per task.
constexpr int64_t kSplit = 2048;

// The readout of every row's key heads, over rings of T.
template <typename T>
struct Readout {
  Stages<T> run;
  int64_t H, R, C, K, front;
  bool retained;
  int64_t mask_stride;
  const float *q, *qs;
  const T *keys, *values;
  const float *key_scales, *value_scales;  // (int8 rings: K / kGroup a row; else null)
  const float *mask, *key, *value, *window_mask, *inwindow;
  float *num, *den, *attention;
  // Per call: the weights (B·H rows of R x (C + 1)) and, per (row, key head, part), R maxima,
  // sums, in-window sums and R x K weighted values.
  float *w = nullptr, *m = nullptr, *sums = nullptr, *inside = nullptr, *partial = nullptr;
  int64_t parts = 1;
};

// The scales of the rows from element `offset` of a ring on (none for float rings).
inline const float* head_scales(const float* scales, int64_t offset) {
  return scales ? scales + offset / kGroup : nullptr;
}

// Part p of key head i's columns: [c0, c1), and the new token in the last part.
template <typename T>
void columns(const Readout<T>& a, int64_t p, int64_t* c0, int64_t* c1) {
  const int64_t size = (a.C + a.parts - 1) / a.parts;
  *c0 = p * size < a.C ? p * size : a.C;
  *c1 = *c0 + size < a.C ? *c0 + size : a.C;
}

template <typename T>
void score_part(void* user, size_t task) {
  const Readout<T>& a = *static_cast<const Readout<T>*>(user);
  const int64_t t = static_cast<int64_t>(task), i = t / a.parts, p = t % a.parts, b = i / a.H;
  const int64_t R = a.R, K = a.K, C = a.C;
  int64_t c0, c1;
  columns(a, p, &c0, &c1);
  a.run.scores(a.q + i * R * K, a.qs + i * R * K, a.keys + i * C * K,
               head_scales(a.key_scales, i * C * K), a.mask + b * a.mask_stride,
               a.key + i * K, a.window_mask, C, K, a.front, a.retained, c0, c1,
               p == a.parts - 1, a.w + i * R * (C + 1), a.m + t * R);
}

// Part t's weights and sums into num (R x K) and den (R); its in-window sums into `inside`.
template <typename T>
void weigh_into(const Readout<T>& a, int64_t t, float* num, float* den) {
  const int64_t i = t / a.parts, p = t % a.parts, R = a.R, K = a.K, C = a.C;
  int64_t c0, c1;
  columns(a, p, &c0, &c1);
  // (every part weighs with the head's largest score: the parts' maxima merged into part 0's)
  a.run.weigh(a.values + i * C * K, head_scales(a.value_scales, i * C * K), a.value + i * K, a.inwindow, C, K, a.retained, c0, c1,
              p == a.parts - 1, a.m + i * a.parts * R, a.w + i * R * (C + 1), num, den,
              a.inside + t * R);
}

template <typename T>
void weigh_part(void* user, size_t task) {
  const Readout<T>& a = *static_cast<const Readout<T>*>(user);
  const int64_t t = static_cast<int64_t>(task);
  weigh_into(a, t, a.partial + t * a.R * a.K, a.sums + t * a.R);
}

template <typename T>
void attention_part(void* user, size_t task) {
  const Readout<T>& a = *static_cast<const Readout<T>*>(user);
  const int64_t t = static_cast<int64_t>(task), i = t / a.parts, p = t % a.parts;
  int64_t c0, c1;
  columns(a, p, &c0, &c1);
  attention_of(a.w + i * a.R * (a.C + 1), a.R, a.C, c0, c1, p == a.parts - 1,
               a.inside + i * a.parts * a.R, a.attention + i * (a.C + 1));
}

// A whole key head in one task (one part).
template <typename T>
void key_head(void* user, size_t task) {
  const Readout<T>& a = *static_cast<const Readout<T>*>(user);
  const int64_t i = static_cast<int64_t>(task);
  score_part<T>(user, task);
  weigh_into(a, i, a.num + i * a.R * a.K, a.den + i * a.R);
  if (a.retained) attention_part<T>(user, task);
}

// B rows of H key heads: over onnxruntime's intra-op threads, or (`api` null) on this one.
template <typename T>
void readout(const Api* api, void* context, int64_t B, Readout<T> a) {
  const int64_t heads = B * a.H, R = a.R, K = a.K;
  a.parts = a.C >= kSplit ? 2 : 1;
  const int64_t tasks = heads * a.parts;
  // Per calling thread: sequences held on one engine step concurrently through one session.
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(heads * R * (a.C + 1) + tasks * R * (K + 3)));
  a.w = scratch.data();
  a.m = a.w + heads * R * (a.C + 1);
  a.sums = a.m + tasks * R;
  a.inside = a.sums + tasks * R;
  a.partial = a.inside + tasks * R;
  if (a.parts == 1) {
    parallel_for(api, context, key_head<T>, static_cast<size_t>(tasks), &a);
    return;
  }
  parallel_for(api, context, score_part<T>, static_cast<size_t>(tasks), &a);
  for (int64_t i = 0; i < heads; ++i) {  // each head's largest score, into its part 0
    float* m = a.m + i * a.parts * R;
    for (int64_t p = 1; p < a.parts; ++p)
      for (int64_t r = 0; r < R; ++r) m[r] = m[p * R + r] > m[r] ? m[p * R + r] : m[r];
  }
  parallel_for(api, context, weigh_part<T>, static_cast<size_t>(tasks), &a);
  for (int64_t i = 0; i < heads; ++i) {  // the parts' sums
    for (int64_t r = 0; r < R; ++r) {
      float den = 0, inside = 0;
      for (int64_t p = 0; p < a.parts; ++p) {
        den += a.sums[(i * a.parts + p) * R + r];
        inside += a.inside[(i * a.parts + p) * R + r];
      }
      a.den[i * R + r] = den;
      for (int64_t p = 0; p < a.parts; ++p) a.inside[(i * a.parts + p) * R + r] = inside;
      for (int64_t k = 0; k < K; ++k) {
        float sum = 0;
        for (int64_t p = 0; p < a.parts; ++p)
          sum += a.partial[((i * a.parts + p) * R + r) * K + k];
        a.num[(i * R + r) * K + k] = sum;
      }
    }
  }
  if (a.retained) parallel_for(api, context, attention_part<T>, static_cast<size_t>(tasks), &a);
}

template <typename T>
void compute(void* kernel_ptr, void* context) {
  Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const Api* api = kernel.api;
  Tensor q = input(api, context, 0), qs = input(api, context, 1), keys = input(api, context, 2);
  Tensor values = input(api, context, 3), mask = input(api, context, 4);
  Tensor key = input(api, context, 5), value = input(api, context, 6);
  Tensor window_mask = input(api, context, 7), inwindow = input(api, context, 8);
  const int64_t B = q.dims[0], H = q.dims[1], R = q.dims[2], K = q.dims[3], C = keys.dims[2];
  const Stages<T> run = stages_for<T>(R, K);
  if (q.rank != 4 || keys.rank != 4 || K % 8 || K > 64 * 8 || !run.scores) std::abort();
  const float *key_scales = nullptr, *value_scales = nullptr;
  if constexpr (kCodes<T>) {  // the codes' scales, [B, Hkv, C, K / kGroup]
    if (K % kGroup) std::abort();
    key_scales = data<float>(input(api, context, 9));
    value_scales = data<float>(input(api, context, 10));
  }
  // One mask for a sequence, or one per row of the rows' step.
  const int64_t mask_stride = mask.rank == 2 ? C : 0;
  const int64_t num_dims[4] = {B, H, R, K}, den_dims[4] = {B, H, R, 1};
  const int64_t attention_dims[3] = {B, H, kernel.retained ? C + 1 : 0};
  float* num = output(api, context, 0, num_dims, 4);
  float* den = output(api, context, 1, den_dims, 4);
  float* attention = output(api, context, 2, attention_dims, 3);
  const Readout<T> a{run, H, R, C, K, kernel.front, kernel.retained != 0, mask_stride,
                     data<float>(q), data<float>(qs), data<T>(keys), data<T>(values),
                     key_scales, value_scales, data<float>(mask), data<float>(key),
                     data<float>(value), data<float>(window_mask), data<float>(inwindow), num,
                     den, attention};
  readout(api, context, B, a);
}

void* create_kernel(const CustomOp*, const Api* api, const void* info) {
  auto* kernel = new Kernel{api, 0, 0};
  using GetInt = Status (*)(const void*, const char*, int64_t*);
  check(api, fn<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "front", &kernel->front));
  check(api, fn<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "retained", &kernel->retained));
  return kernel;
}

}  // namespace

const CustomOp* ring_attention_op() {
  static const Op op =
      custom_op<Kernel>("RingAttention", 9, 3, nullptr, create_kernel, compute<float>);
  return &op.op;
}

const CustomOp* ring_attention_half_op() {
  static const int types[9] = {kFloat, kFloat, kFloat16, kFloat16, kFloat,
                               kFloat, kFloat, kFloat,   kFloat};
  static const Op op =
      custom_op<Kernel>("RingAttention", 9, 3, types, create_kernel, compute<uint16_t>);
  return &op.op;
}

// int8 rings take their scales as two more inputs, so an op of its own name.
const CustomOp* ring_attention_int8_op() {
  static const int types[11] = {kFloat, kFloat, kInt8,  kInt8,  kFloat, kFloat,
                                kFloat, kFloat, kFloat, kFloat, kFloat};
  static const Op op =
      custom_op<Kernel>("RingAttentionInt8", 11, 3, types, create_kernel, compute<int8_t>);
  return &op.op;
}

}  // namespace linearize

using namespace linearize;

namespace {

template <typename T>
int plain_readout(const float* q, const float* qs, const void* keys, const void* values,
                  const float* key_scales, const float* value_scales, const float* mask,
                  const float* key, const float* value, const float* window_mask,
                  const float* inwindow, int64_t H, int64_t R, int64_t C, int64_t K,
                  int64_t front, int64_t retained, float* num, float* den, float* attention) {
  const Stages<T> run = stages_for<T>(R, K);
  if (run.scores == nullptr || K % 8 || K > 64 * 8 || (kCodes<T> && K % kGroup)) return 1;
  const Readout<T> a{run,  H,  R, C, K, front, retained != 0, 0, q, qs,
                     static_cast<const T*>(keys), static_cast<const T*>(values),
                     kCodes<T> ? key_scales : nullptr, kCodes<T> ? value_scales : nullptr,
                     mask, key, value, window_mask, inwindow, num, den, attention};
  readout(nullptr, nullptr, 1, a);
  return 0;
}

}  // namespace

// A plain entry for tests and benchmarks (ctypes): the same arithmetic on numpy arrays, the
// rings (`ring`) float32 (0), float16 (1) or int8 codes (2) with their scales (K / 32 a row;
// the scales not read for float rings).
extern "C" __attribute__((visibility("default"))) int linearize_ring_attention(
    const float* q, const float* qs, const void* keys, const void* values,
    const float* key_scales, const float* value_scales, const float* mask, const float* key,
    const float* value, const float* window_mask, const float* inwindow, int64_t H, int64_t R,
    int64_t C, int64_t K, int64_t front, int64_t retained, int64_t ring, float* num, float* den,
    float* attention) {
  auto run = ring == 2 ? plain_readout<int8_t>
             : ring == 1 ? plain_readout<uint16_t>
             : ring == 0 ? plain_readout<float> : nullptr;
  if (run == nullptr) return 2;
  return run(q, qs, keys, values, key_scales, value_scales, mask, key, value, window_mask,
             inwindow, H, R, C, K, front, retained, num, den, attention);
}
