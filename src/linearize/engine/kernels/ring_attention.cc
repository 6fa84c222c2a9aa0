// RingAttention: one token's softmax readout over a layer's ring of kept keys and values, as one
// onnxruntime custom op (domain "linearize"). The step graph's own ops for the same readout
// (engine/step.py, `_softmax_readout`) are its reference, and what the graph runs where this library
// is not built.
//
// Why: the graph reads each ring once per query head (R one-row products over the same keys) and
// runs ~12 small nodes over the scores; here every key and value row is read once for the R query
// heads that share it, and the mask, max, exp and sums run in the same pass (AVX2 + FMA).
//
// Inputs (float32; B rows, each a sequence of its own: 1 in the one-sequence step):
//   0 q            [B, Hkv, R, K]  the queries, scaled by 1/sqrt(K)
//   1 q_sink       [B, Hkv, R, K]  the queries that score the ring's first `front` slots
//   2 keys         [B, Hkv, C, K]  the ring's keys
//   3 values       [B, Hkv, C, K]  the ring's values (as wide as the keys)
//   4 mask         [C] or [B, C]   added to the ring's scores (0 or -inf)
//   5 key          [B, Hkv, 1, K]  the new token's key
//   6 value        [B, Hkv, 1, K]  the new token's value
//   7 window_mask  [C + 1]         (retained) 0 on the window's slots, -inf on the retained cache
//   8 inwindow     [C + 1, 1]      (retained) 1 on the window's slots, 0 on the retained cache
// Attributes: front (slots scored by q_sink), retained (0 / 1).
// Outputs:
//   0 num        [B, Hkv, R, K]    sum_c e^(s_c - m) v_c over the ring and the new token
//   1 den        [B, Hkv, R, 1]    sum_c e^(s_c - m)
//   2 attention  [B, Hkv, C + 1]   (retained; else [B, Hkv, 0]) each slot's softmax weight
//                                  renormalised over the window, summed over the R heads
// with m the largest score (retained: the largest in the window). The key heads (of every row)
// are split over onnxruntime's intra-op threads.
//
// onnxruntime's C ABI: ort_abi.h.

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ort_abi.h"

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

inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Query rows · one key row, R heads at once: two partial sums per head (chains of J / 2 FMAs).
template <int R, int KT>
inline void dot_row(const float* qq, const float* row, int64_t K, float* out, int64_t stride) {
  const int64_t J = (KT ? KT : K) / 8;
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= J; j += 2) {
    __m256 k0 = _mm256_loadu_ps(row + 8 * j), k1 = _mm256_loadu_ps(row + 8 * j + 8);
    for (int r = 0; r < R; ++r) {
      a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + r * K + 8 * j), k0, a[r]);
      b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + r * K + 8 * j + 8), k1, b[r]);
    }
  }
  if (j < J) {
    __m256 k0 = _mm256_loadu_ps(row + 8 * j);
    for (int r = 0; r < R; ++r)
      a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qq + r * K + 8 * j), k0, a[r]);
  }
  for (int r = 0; r < R; ++r) out[r * stride] = sum8(_mm256_add_ps(a[r], b[r]));
}

// Query rows · two key rows (independent chains: a single row's FMAs wait on each other).
template <int R, int KT>
inline void dot_rows2(const float* q, const float* row, int64_t K, float* out, int64_t stride) {
  const int64_t J = (KT ? KT : K) / 8;
  __m256 a[R], b[R];
  for (int r = 0; r < R; ++r) a[r] = b[r] = _mm256_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    __m256 k0 = _mm256_loadu_ps(row + 8 * j), k1 = _mm256_loadu_ps(row + K + 8 * j);
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

// One key head: R query heads against its C slots and the new token. KT: the head size when
// known at compile time (0: K).
template <int R, int KT>
void head(const float* q, const float* qs, const float* keys, const float* values,
          const float* mask, const float* key, const float* value, const float* window_mask,
          const float* inwindow, int64_t C, int64_t K_, int64_t front, bool retained, float* num,
          float* den, float* attention, float* w) {
  const int64_t K = KT ? KT : K_, J = K / 8, W = C + 1;
  // Scores: each key row read once for the R heads; the first `front` by the sink queries.
  int64_t c = 0;
  for (; c < front && c < C; ++c) dot_row<R, KT>(qs, keys + c * K, K, w + c, W);
  for (; c + 2 <= C; c += 2) dot_rows2<R, KT>(q, keys + c * K, K, w + c, W);
  for (; c < C; ++c) dot_row<R, KT>(q, keys + c * K, K, w + c, W);
  for (int r = 0; r < R; ++r) {
    float* wr = w + r * W;
    for (int64_t i = 0; i < C; ++i) wr[i] += mask[i];
  }
  dot_row<R, KT>(q, key, K, w + C, W);
  // e^(s - m), with m the largest score (the window's, with a retained cache).
  for (int r = 0; r < R; ++r) {
    float* wr = w + r * W;
    float m = -INFINITY;
    for (int64_t c = 0; c < W; ++c) {
      float s = retained ? wr[c] + window_mask[c] : wr[c];
      m = s > m ? s : m;
    }
    __m256 m8 = _mm256_set1_ps(m), total8 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 8 <= W; c += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(wr + c), m8));
      _mm256_storeu_ps(wr + c, e);
      total8 = _mm256_add_ps(total8, e);
    }
    float total = sum8(total8);
    for (; c < W; ++c) {
      wr[c] = std::exp(wr[c] - m);
      total += wr[c];
    }
    den[r] = total;
  }
  // The readout: each value row read once for the R heads.
  for (int64_t j0 = 0; j0 < J; j0 += 8) {
    const int64_t jn = J - j0 < 8 ? J - j0 : 8;
    __m256 acc[R][8];
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < jn; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; ++c) {
      const float* row = values + c * K + 8 * j0;
      for (int64_t j = 0; j < jn; ++j) {
        __m256 v8 = _mm256_loadu_ps(row + 8 * j);
        for (int r = 0; r < R; ++r)
          acc[r][j] = _mm256_fmadd_ps(_mm256_set1_ps(w[r * W + c]), v8, acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int64_t j = 0; j < jn; ++j) {
        __m256 own = _mm256_mul_ps(_mm256_set1_ps(w[r * W + C]),
                                   _mm256_loadu_ps(value + 8 * (j0 + j)));
        _mm256_storeu_ps(num + r * K + 8 * (j0 + j), _mm256_add_ps(acc[r][j], own));
      }
  }
  if (retained) {
    float scale[R];
    for (int r = 0; r < R; ++r) {
      float inside = 0;
      for (int64_t c = 0; c < W; ++c) inside += w[r * W + c] * inwindow[c];
      scale[r] = 1.0f / inside;
    }
    for (int64_t c = 0; c < W; ++c) {
      float a = 0;
      for (int r = 0; r < R; ++r) a += w[r * W + c] * scale[r];
      attention[c] = a;
    }
  }
}

using Head = decltype(&head<1, 0>);

template <int KT>
Head head_of(int64_t R) {
  switch (R) {
    case 1: return head<1, KT>;
    case 2: return head<2, KT>;
    case 3: return head<3, KT>;
    case 4: return head<4, KT>;
    case 5: return head<5, KT>;
    case 6: return head<6, KT>;
    case 7: return head<7, KT>;
    case 8: return head<8, KT>;
    default: return nullptr;
  }
}

Head head_for(int64_t R, int64_t K) { return K == 64 ? head_of<64>(R) : head_of<0>(R); }

struct Kernel {
  const Api* api;
  int64_t front;
  int64_t retained;
};

// The readout of every row's key heads: one task per (row, key head).
struct Readout {
  Head run;
  int64_t H, R, C, K, front;
  bool retained;
  int64_t mask_stride;
  const float *q, *qs, *keys, *values, *mask, *key, *value, *window_mask, *inwindow;
  float *num, *den, *attention;
};

void key_head(void* user, size_t task) {
  const Readout& a = *static_cast<const Readout*>(user);
  const int64_t i = static_cast<int64_t>(task), b = i / a.H, R = a.R, C = a.C, K = a.K;
  // Per thread: onnxruntime's intra-op threads, and sequences held on one engine stepping
  // concurrently through one session.
  thread_local std::vector<float> scratch;
  scratch.resize(static_cast<size_t>(R * (C + 1)));
  a.run(a.q + i * R * K, a.qs + i * R * K, a.keys + i * C * K, a.values + i * C * K,
        a.mask + b * a.mask_stride, a.key + i * K, a.value + i * K, a.window_mask, a.inwindow, C,
        K, a.front, a.retained, a.num + i * R * K, a.den + i * R,
        a.retained ? a.attention + i * (C + 1) : nullptr, scratch.data());
}

// B rows of H key heads: over onnxruntime's intra-op threads, or (`api` null) on this one.
void readout(const Api* api, void* context, int64_t B, const Readout& a) {
  const size_t tasks = static_cast<size_t>(B * a.H);
  if (api == nullptr) {
    for (size_t t = 0; t < tasks; ++t) key_head(const_cast<Readout*>(&a), t);
  } else {
    parallel_for(api, context, key_head, tasks, const_cast<Readout*>(&a));
  }
}

void compute(void* kernel_ptr, void* context) {
  Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const Api* api = kernel.api;
  Tensor q = input(api, context, 0), qs = input(api, context, 1), keys = input(api, context, 2);
  Tensor values = input(api, context, 3), mask = input(api, context, 4);
  Tensor key = input(api, context, 5), value = input(api, context, 6);
  Tensor window_mask = input(api, context, 7), inwindow = input(api, context, 8);
  const int64_t B = q.dims[0], H = q.dims[1], R = q.dims[2], K = q.dims[3], C = keys.dims[2];
  Head run = head_for(R, K);
  if (q.rank != 4 || keys.rank != 4 || K % 8 || K > 64 * 8 || run == nullptr) std::abort();
  // One mask for a sequence, or one per row of the rows' step.
  const int64_t mask_stride = mask.rank == 2 ? C : 0;
  const int64_t num_dims[4] = {B, H, R, K}, den_dims[4] = {B, H, R, 1};
  const int64_t attention_dims[3] = {B, H, kernel.retained ? C + 1 : 0};
  float* num = output(api, context, 0, num_dims, 4);
  float* den = output(api, context, 1, den_dims, 4);
  float* attention = output(api, context, 2, attention_dims, 3);
  const Readout a{run, H, R, C, K, kernel.front, kernel.retained != 0, mask_stride,
                  data<float>(q), data<float>(qs), data<float>(keys), data<float>(values),
                  data<float>(mask), data<float>(key), data<float>(value),
                  data<float>(window_mask), data<float>(inwindow), num, den, attention};
  readout(api, context, B, a);
}

void* create_kernel(const CustomOp*, const Api* api, const void* info) {
  auto* kernel = new Kernel{api, 0, 0};
  using GetInt = Status (*)(const void*, const char*, int64_t*);
  check(api, fn<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "front", &kernel->front));
  check(api, fn<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "retained", &kernel->retained));
  return kernel;
}

CustomOp make_op() {
  CustomOp op;
  std::memset(&op, 0, sizeof op);
  op.version = kOpVersion;
  op.CreateKernel = create_kernel;
  op.GetName = [](const CustomOp*) { return "RingAttention"; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };
  op.GetInputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetInputTypeCount = [](const CustomOp*) -> size_t { return 9; };
  op.GetOutputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) -> size_t { return 3; };
  op.KernelCompute = compute;
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return 0; };   // required
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };  // required
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };       // default
  return op;
}

}  // namespace

const CustomOp* ring_attention_op() {
  static const CustomOp op = make_op();
  return &op;
}

}  // namespace linearize

using namespace linearize;

// A plain entry for tests and benchmarks (ctypes): the same arithmetic on numpy arrays.
extern "C" __attribute__((visibility("default"))) int linearize_ring_attention(
    const float* q, const float* qs, const float* keys, const float* values, const float* mask,
    const float* key, const float* value, const float* window_mask, const float* inwindow,
    int64_t H, int64_t R, int64_t C, int64_t K, int64_t front, int64_t retained, float* num,
    float* den, float* attention) {
  Head run = head_for(R, K);
  if (run == nullptr || K % 8 || K > 64 * 8) return 1;
  const Readout a{run,  H,   R,     C,     K,           front,    retained != 0,
                  0,    q,   qs,    keys,  values,      mask,     key,
                  value, window_mask, inwindow, num, den, attention};
  readout(nullptr, nullptr, 1, a);
  return 0;
}
