// MatMul4Bit: x · Wᵀ for a 4-bit weight in groups of 32 with any zero points, as one onnxruntime
// custom op (domain "linearize"). Each weight is w = q·s + b per group: the codes q (0..15) as
// MatMulNBits packs them (element 2i in byte i's low nibble), the group's scale s and its base
// b = −z·s (the value code 0 stands for; z the zero point: a whole number or, on Q4_1's grid,
// any float). The scales and bases are float32 or, as a Q4_1 file's, float16 (both of one type;
// models/quantize.py puts Q4_1's grid on float16 values, so a model's float-grid weights run
// with 20 bytes a group of 32, not 24). The graph's own ops for the same product (MatMulNBits
// on the codes, plus the offset term (x summed per group)·Oᵀ: models/quantize.py,
// `_NBitsLinear`) are its reference.
//
// Why: with float zero points the graph runs four nodes beside MatMulNBits for the offset term
// (a group sum, a reshape, an fp32 matmul, an add), a fifth of each linear's time. Here the group
// sums come with the activations' quantization, and the bases are read beside the scales.
//
// Inputs:  0 x        float [..., K]    rows of activations
//          1 codes    uint8 [N, K/32, 16]
//          2 scales   float or float16 [N, K/32]
//          3 bases    as the scales [N, K/32]
// Attribute: accuracy_level: 4 quantizes each group of 32 activations to int8 (scale
//   max|x| / 127, rounded to nearest even: MatMulNBits' int8 arithmetic, the codes' products in
//   integers); 0 multiplies in fp32 (the reference's numbers).
// Output:  0 y        float [..., N]
// The outputs are split over onnxruntime's intra-op threads in blocks of kChunk.
//
// onnxruntime's C ABI: ort_abi.h.

#include <immintrin.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "ort_abi.h"
#include "simd.h"

namespace linearize {
namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kChunk = 64;  // outputs per task of the intra-op threads
// Weight rows asked for ahead of the one read (_mm_prefetch: its codes, scales and bases): the
// weights stream from memory once a token. Measured on the default's 1k step, the same model
// and graph, alternating blocks: 2 / 4 / 8 / 16 rows ahead 3.4 / 5.7 / 4.5–4.8 / 3.1 % faster.
constexpr int64_t kAhead = 4;

// ---- int8 arithmetic -------------------------------------------------------------------------

// One row's activations, quantized per group of 32: the codes qx (each pair of groups laid out as
// [even elements of both][odd elements of both], 64 bytes, so one 32-byte load meets a 32-byte
// load of two groups' low or high nibbles), the scale dx, 8·Σqx (the codes' centre, taken off in
// integers: the products of the codes less 8, −8..7, err half as much as of the codes, 0..15)
// and the exact sum Σx (for the bases, and the centre's share 8·s·Σx).
struct Quantized {
  int8_t* q;
  float* dx;
  int32_t* centre;
  float* sums;
};

inline int64_t quantized_bytes(int64_t groups) { return 64 * ((groups + 1) / 2); }

void quantize_row(const float* x, int64_t groups, Quantized out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + kGroup * g;
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + 8 * j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float inverse = amax > 0 ? 127.0f / amax : 0.0f;
    out.dx[g] = amax / 127.0f;
    int8_t* q = out.q + 64 * (g / 2) + 16 * (g % 2);
    int32_t codes = 0;
    float sum = 0;
    for (int i = 0; i < 16; ++i) {
      const int even = static_cast<int>(std::nearbyint(xg[2 * i] * inverse));
      const int odd = static_cast<int>(std::nearbyint(xg[2 * i + 1] * inverse));
      q[i] = static_cast<int8_t>(even);
      q[32 + i] = static_cast<int8_t>(odd);
      codes += even + odd;
      sum += xg[2 * i] + xg[2 * i + 1];
    }
    out.centre[g] = 8 * codes;
    out.sums[g] = sum;
  }
}

// A group's scale or base: float32, or float16 (uint16_t) widened.
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return _cvtsh_ss(v); }

// How a block of groups is read: all 8 groups of it (kWhole); the row's last n < 8 groups, the
// scales and bases read 8 wide into the next rows' and the lanes past the n-th zeroed (kTail);
// the same where the 8-wide read would leave the weight (kLastTail, the weight's last rows:
// the n values copied out, slower).
enum Span { kWhole, kTail, kLastTail };

// Eight scales or bases from p, those past the block's n-th zeroed (`keep`: all ones on the
// block's lanes); kLastTail reads only the n.
template <Span kSpan, typename S>
inline __m256 load_span(const S* p, int n, __m256 keep) {
  if constexpr (kSpan == kWhole) return load8(p);
  if constexpr (kSpan == kTail) return _mm256_and_ps(load8(p), keep);
  S padded[8] = {};
  for (int i = 0; i < n; ++i) padded[i] = p[i];
  return load8(padded);
}

// Groups g..g+n−1 (n = 8 but for a tail) of a weight row against one quantized row, into
// `acc` lane by lane: s·dx·(Σq·qx − centre) + (8·s + b)·Σx. A tail reads its last odd group's
// codes alone (16 bytes) and takes 0 for the centres and sums past the row's n groups, so they
// add nothing.
template <Span kSpan, typename S>
inline __m256 block_int8(const uint8_t* codes, const S* s, const S* b, int64_t g, int n,
                         const Quantized& x, __m256 acc) {
  constexpr bool tail = kSpan != kWhole;
  const __m256i low = _mm256_set1_epi8(0x0F);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i first_n =  // (a tail's groups)
      _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 keep = _mm256_castsi256_ps(first_n);
  const int pairs = tail ? (n + 1) / 2 : 4;
  // (the row's own buffers, each 8 longer than its groups: see matmul)
  const __m256 dx = tail ? _mm256_and_ps(load8(x.dx + g), keep) : load8(x.dx + g);
  const __m256 sums_x = tail ? _mm256_and_ps(load8(x.sums + g), keep) : load8(x.sums + g);
  const __m256i centre = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.centre + g));
  const __m256i centre_n = tail ? _mm256_and_si256(centre, first_n) : centre;
  __m256i p[4];
  for (int k = 0; k < 4; ++k) {
    if (tail && k >= pairs) {
      p[k] = _mm256_setzero_si256();
      continue;
    }
    const uint8_t* c2 = codes + 16 * (g + 2 * k);  // two groups' codes
    const __m256i c =
        tail && 2 * k + 1 == n
            ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c2)))
            : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c2));
    const int8_t* q = x.q + 32 * (g + 2 * k);
    const __m256i lo = _mm256_and_si256(c, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
#ifdef __AVX512VNNI__  // the same sums (no int16 here saturates: |2 · 15 · 127| · 2 < 2^15)
    p[k] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, q0), hi, q1);
#else
    const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, q0), _mm256_maddubs_epi16(hi, q1));
    p[k] = _mm256_madd_epi16(t, ones);  // 4 lanes per group
#endif
  }
  __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  sums = _mm256_sub_epi32(_mm256_permutevar8x32_epi32(sums, order), centre_n);  // in order
  const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), dx);
  const __m256 sv = load_span<kSpan>(s + g, n, keep);
  const __m256 bv = load_span<kSpan>(b + g, n, keep);
  const __m256 offset = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), sv, bv);  // 8·s + b
  return _mm256_fmadd_ps(offset, sums_x, _mm256_fmadd_ps(sv, t, acc));
}

// One output: a weight row's codes, scales and bases against one quantized row; `ends`: an
// 8-wide read of its tail's scales would leave the weight (its last rows; all, for G < 8).
// (One row at a time: four rows a pass, sharing the activations' loads and one final
// reduction, ran the default's 1k step 16 % slower, 14.9 against 12.8 ms, though alone on
// cycled weights 20 % faster.)
template <typename S>
float dot_int8(const uint8_t* codes, const S* s, const S* b, int64_t G, const Quantized& x,
               bool ends) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) acc = block_int8<kWhole>(codes, s, b, g, 8, x, acc);
  const int n = static_cast<int>(G - g);
  if (n && ends) acc = block_int8<kLastTail>(codes, s, b, g, n, x, acc);
  if (n && !ends) acc = block_int8<kTail>(codes, s, b, g, n, x, acc);
  return sum8(acc);
}

// ---- fp32 arithmetic -------------------------------------------------------------------------

// One row's activations with each group's even elements first, then its odd ones (the codes'
// order once their low and high nibbles are split), and each group's sum.
void split_row(const float* x, int64_t groups, float* split, float* sums) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + kGroup * g;
    float* out = split + kGroup * g;
    float sum = 0;
    for (int i = 0; i < 16; ++i) {
      out[i] = xg[2 * i];
      out[16 + i] = xg[2 * i + 1];
      sum += xg[2 * i] + xg[2 * i + 1];
    }
    sums[g] = sum;
  }
}

inline __m256 widened(__m128i bytes) {  // 8 codes as floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

template <typename S>
float dot_fp32(const uint8_t* codes, const S* s, const S* b, int64_t groups, const float* split,
               const float* sums) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float bases = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * g));
    const __m128i lo = _mm_and_si128(c, low), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
    const float* xg = split + kGroup * g;
    __m256 t = _mm256_mul_ps(widened(lo), _mm256_loadu_ps(xg));
    t = _mm256_fmadd_ps(widened(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xg + 8), t);
    t = _mm256_fmadd_ps(widened(hi), _mm256_loadu_ps(xg + 16), t);
    t = _mm256_fmadd_ps(widened(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xg + 24), t);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(scalar(s[g])), t, acc);
    bases += scalar(b[g]) * sums[g];
  }
  return sum8(acc) + bases;
}

// ---- the product -----------------------------------------------------------------------------

template <typename S>
struct Work {
  int64_t M, N, groups;
  const uint8_t* codes;
  const S* scales;
  const S* bases;
  float* y;
  bool int8;
  // int8: the rows' codes, then per row its groups' scales and sums, and its codes' centres
  int8_t* q;
  float* floats;
  int32_t* centre;
  // fp32: the rows split [M, K], their groups' sums [M, groups]
  const float* split;
  const float* sums;

  Quantized row(int64_t m) const {
    return {q + m * quantized_bytes(groups), floats + 2 * m * groups, centre + m * groups,
            floats + (2 * m + 1) * groups};
  }
};

// A weight row's codes, scales and bases, asked for ahead of their reads.
template <typename S>
inline void prefetch_row(const uint8_t* codes, const S* s, const S* b, int64_t G) {
  const char* c = reinterpret_cast<const char*>(codes);
  for (int64_t i = 0; i < G * 16; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(s), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(b), _MM_HINT_T0);
}

template <typename S>
void outputs(void* user, size_t task) {
  const Work<S>& w = *static_cast<const Work<S>*>(user);
  const int64_t first = static_cast<int64_t>(task) * kChunk;
  const int64_t last = first + kChunk < w.N ? first + kChunk : w.N;
  const int64_t G = w.groups;
  for (int64_t n = first; n < last; ++n) {
    const uint8_t* codes = w.codes + n * G * 16;
    const S *s = w.scales + n * G, *b = w.bases + n * G;
    if (n + kAhead < w.N) prefetch_row(codes + kAhead * G * 16, s + kAhead * G, b + kAhead * G, G);
    // (whether the row's tail, its scales read 8 wide, would read past the weight's)
    const bool ends = n * G + G / 8 * 8 + 8 > w.N * G;
    for (int64_t m = 0; m < w.M; ++m)
      w.y[m * w.N + n] = w.int8
                             ? dot_int8(codes, s, b, G, w.row(m), ends)
                             : dot_fp32(codes, s, b, G, w.split + m * G * kGroup, w.sums + m * G);
  }
}

// y = x · Wᵀ for M rows; `api` and `context` null: on the calling thread alone.
template <typename S>
void matmul(const Api* api, void* context, const float* x, int64_t M, int64_t K, int64_t N,
            const uint8_t* codes, const S* scales, const S* bases, bool int8, float* y) {
  const int64_t G = K / kGroup;
  // Per thread: a session run from several threads at once gives each its own.
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> floats;
  thread_local std::vector<int32_t> centre;
  Work<S> w{M, N, G, codes, scales, bases, y, int8, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (int8) {
    q.resize(static_cast<size_t>(M * quantized_bytes(G)));
    // (8 more than the rows' groups: a tail reads its row's scales and sums 8 wide)
    floats.resize(static_cast<size_t>(2 * M * G + 8));
    centre.resize(static_cast<size_t>(M * G + 8));
    w.q = q.data();
    w.floats = floats.data();
    w.centre = centre.data();
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, G, w.row(m));
  } else {
    floats.resize(static_cast<size_t>(M * (K + G)));
    for (int64_t m = 0; m < M; ++m)
      split_row(x + m * K, G, floats.data() + m * K, floats.data() + M * K + m * G);
    w.split = floats.data();
    w.sums = floats.data() + M * K;
  }
  parallel_for(api, context, outputs<S>, static_cast<size_t>((N + kChunk - 1) / kChunk), &w);
}

struct Kernel {
  const Api* api;
  int64_t accuracy;
};

template <typename S>
void compute(void* kernel_ptr, void* context) {
  const Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const Api* api = kernel.api;
  Tensor x = input(api, context, 0), codes = input(api, context, 1);
  Tensor scales = input(api, context, 2), bases = input(api, context, 3);
  const int64_t N = codes.dims[0], G = codes.dims[1], K = G * kGroup;
  if (codes.rank != 3 || codes.dims[2] != 16 || x.rank < 1 || x.dims[x.rank - 1] != K) std::abort();
  int64_t M = 1, dims[8];
  for (size_t i = 0; i + 1 < x.rank; ++i) M *= (dims[i] = x.dims[i]);
  dims[x.rank - 1] = N;
  float* y = output(api, context, 0, dims, x.rank);
  matmul(api, context, data<float>(x), M, K, N, data<uint8_t>(codes), data<S>(scales),
         data<S>(bases), kernel.accuracy != 0, y);
}

void* create_kernel(const CustomOp*, const Api* api, const void* info) {
  auto* kernel = new Kernel{api, 0};
  using GetInt = Status (*)(const void*, const char*, int64_t*);
  check(api, fn<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "accuracy_level",
                                                           &kernel->accuracy));
  return kernel;
}

}  // namespace

const CustomOp* matmul_4bit_op() {
  static const int types[4] = {kFloat, kUint8, kFloat, kFloat};
  static const Op op = custom_op<Kernel>("MatMul4Bit", 4, 1, types, create_kernel, compute<float>);
  return &op.op;
}

const CustomOp* matmul_4bit_half_op() {
  static const int types[4] = {kFloat, kUint8, kFloat16, kFloat16};
  static const Op op =
      custom_op<Kernel>("MatMul4Bit", 4, 1, types, create_kernel, compute<uint16_t>);
  return &op.op;
}

}  // namespace linearize

// A plain entry for tests and benchmarks (ctypes): the same arithmetic on numpy arrays, on the
// calling thread. `int8`: 1 for accuracy level 4, 0 for fp32; `half`: the scales and bases
// float16 (else float32).
extern "C" __attribute__((visibility("default"))) int linearize_matmul_4bit(
    const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* codes, const void* scales,
    const void* bases, int64_t int8, int64_t half, float* y) {
  if (K % linearize::kGroup || M < 0 || N < 0) return 1;
  if (half)
    linearize::matmul(nullptr, nullptr, x, M, K, N, codes, static_cast<const uint16_t*>(scales),
                      static_cast<const uint16_t*>(bases), int8 != 0, y);
  else
    linearize::matmul(nullptr, nullptr, x, M, K, N, codes, static_cast<const float*>(scales),
                      static_cast<const float*>(bases), int8 != 0, y);
  return 0;
}
