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
// The weight comes in blocks of 8 rows, each group's 8 rows side by side (the exporter's layout,
// engine/step.py Kernel4Bit): per group, the 8 rows' integer sums reduce into one vector whose
// lanes are the 8 outputs, so no row pays a horizontal sum, and no block of groups is left part
// empty at a row's end (K = 576: 18 groups, 8 + 8 + 2 a row at a time). Measured against a row
// at a time, the weight in cache: 576 × 960 35.1 → 22.5 µs, 576 × 3072 76.7 → 45.5, 1536 × 576
// 24.7 → 20.6.
//
// Inputs:  0 x        float [..., K]    rows of activations
//          1 codes    uint8 [N/8, K/32, 8, 16]   row 8b + r's group g: codes[b, g, r]
//          2 scales   float or float16 [N/8, K/32, 8]
//          3 bases    as the scales [N/8, K/32, 8]
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

#include "matmul.h"
#include "ort_abi.h"
#include "simd.h"

namespace linearize {
namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kChunk = 64;  // outputs per task of the intra-op threads (8 blocks)
constexpr int64_t kAhead = 1;  // blocks of 8 rows asked for ahead of the one read

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

// Group g of a block of 8 rows against one quantized row, weighed into the 8 outputs' acc: per
// pair of rows, their 16 bytes of codes side by side in one vector (lanes 0-3 the first row's,
// 4-7 the second's) against the group's activations in both halves.
template <typename S>
inline __m256 group_int8(const uint8_t* codes, const S* s, const S* b, int64_t g,
                         const Quantized& x, __m256 acc) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const int8_t* pair = x.q + 64 * (g / 2) + 16 * (g % 2);  // (the group's even elements)
  const __m256i even = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
  const __m256i odd = _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 32)));
  const uint8_t* cg = codes + 8 * 16 * g;
  __m256i p[4];
  for (int k = 0; k < 4; ++k) {  // rows 2k, 2k + 1
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cg + 32 * k));
    const __m256i lo = _mm256_and_si256(c, low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
#ifdef __AVX512VNNI__  // the same sums (no int16 here saturates: |2 · 15 · 127| · 2 < 2^15)
    p[k] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, even), hi, odd);
#else
    const __m256i t =
        _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd));
    p[k] = _mm256_madd_epi16(t, _mm256_set1_epi16(1));  // 4 lanes per row
#endif
  }
  // Rows 0, 2, 4, 6 in the low half, 1, 3, 5, 7 in the high half; then in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  sums = _mm256_sub_epi32(_mm256_permutevar8x32_epi32(sums, order),
                          _mm256_set1_epi32(x.centre[g]));
  const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(x.dx[g]));
  const __m256 sv = load8(s + 8 * g), bv = load8(b + 8 * g);
  const __m256 offset = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), sv, bv);  // 8·s + b
  return _mm256_fmadd_ps(offset, _mm256_set1_ps(x.sums[g]), _mm256_fmadd_ps(sv, t, acc));
}

// A block's 8 outputs against one quantized row; with `ahead`, the bytes from the block's start
// to the one kAhead blocks on, whose codes, scales and bases each group asks for as it goes
// (the weights stream from memory once a token: the hardware's prefetcher alone left the 1k
// step.s linears 12 % slower).
template <typename S>
__m256 block_int8(const uint8_t* codes, const S* s, const S* b, int64_t G, const Quantized& x,
                  int64_t ahead) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    if (ahead) {
      const char* c = reinterpret_cast<const char*>(codes + 128 * g) + ahead;
      _mm_prefetch(c, _MM_HINT_T0);
      _mm_prefetch(c + 64, _MM_HINT_T0);
      if (g % 4 == 0) {  // (8 scales and bases of a group: 4 groups a line in float16)
        const int64_t step = ahead / 16 * static_cast<int64_t>(sizeof(S));
        _mm_prefetch(reinterpret_cast<const char*>(s + 8 * g) + step, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(b + 8 * g) + step, _MM_HINT_T0);
      }
    }
    acc = group_int8(codes, s, b, g, x, acc);
  }
  return acc;
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

// Row r of a block against one split row: its groups' codes 128 bytes apart, its scales and
// bases 8 apart.
template <typename S>
float row_fp32(const uint8_t* codes, const S* s, const S* b, int64_t G, int r, const float* split,
               const float* sums) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float bases = 0;
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* cg = codes + 8 * 16 * g + 16 * r;
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cg));
    const __m128i lo = _mm_and_si128(c, low), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
    const float* xg = split + kGroup * g;
    __m256 t = _mm256_mul_ps(widened(lo), _mm256_loadu_ps(xg));
    t = _mm256_fmadd_ps(widened(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xg + 8), t);
    t = _mm256_fmadd_ps(widened(hi), _mm256_loadu_ps(xg + 16), t);
    t = _mm256_fmadd_ps(widened(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xg + 24), t);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(scalar(s[8 * g + r])), t, acc);
    bases += scalar(b[8 * g + r]) * sums[g];
  }
  return sum8(acc) + bases;
}

// ---- the matmul ------------------------------------------------------------------------------

template <typename S>
struct Work {
  int64_t M, N, groups;
  const uint8_t* codes;
  const S* scales;
  const S* bases;
  float* y;
  bool int8;
  // int8: the quantized rows (quantize_row)
  int8_t* q;
  float* floats;
  int32_t* centre;
  // fp32: the split rows and their group sums (split_row)
  const float* split;
  const float* sums;

  Quantized row(int64_t m) const {
    return {q + m * quantized_bytes(groups), floats + 2 * m * groups, centre + m * groups,
            floats + (2 * m + 1) * groups};
  }
};

// The outputs of one task: kChunk / 8 blocks of 8 rows, for every row of activations.
template <typename S>
void outputs(void* user, size_t task) {
  const Work<S>& w = *static_cast<const Work<S>*>(user);
  const int64_t G = w.groups, blocks = w.N / 8;
  const int64_t first = static_cast<int64_t>(task) * (kChunk / 8);
  const int64_t last = first + kChunk / 8 < blocks ? first + kChunk / 8 : blocks;
  for (int64_t blk = first; blk < last; ++blk) {
    const uint8_t* codes = w.codes + blk * G * 8 * 16;
    const S *s = w.scales + blk * G * 8, *b = w.bases + blk * G * 8;
    for (int64_t m = 0; m < w.M; ++m) {
      float* y = w.y + m * w.N + 8 * blk;
      if (w.int8) {
        const int64_t ahead = m == 0 && blk + kAhead < blocks ? kAhead * G * 8 * 16 : 0;
        _mm256_storeu_ps(y, block_int8(codes, s, b, G, w.row(m), ahead));
      } else {
        for (int r = 0; r < 8; ++r)
          y[r] = row_fp32(codes, s, b, G, r, w.split + m * G * kGroup, w.sums + m * G);
      }
    }
  }
}

// y [M, N] = x [M, K] · Wᵀ, the outputs over onnxruntime's threads (api null: serially).
template <typename S>
void matmul(const Api* api, void* context, const float* x, int64_t M, int64_t K, int64_t N,
            const uint8_t* codes, const S* scales, const S* bases, bool int8, float* y) {
  const int64_t G = K / kGroup;
  // (Reused across calls on a thread: no allocation per token.)
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> floats;
  thread_local std::vector<int32_t> centre;
  Work<S> w{M, N, G, codes, scales, bases, y, int8, nullptr, nullptr, nullptr, nullptr, nullptr};
  if (int8) {
    q.resize(static_cast<size_t>(M * quantized_bytes(G)));
    floats.resize(static_cast<size_t>(2 * M * G));
    centre.resize(static_cast<size_t>(M * G));
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

template <typename S>
void compute(void* kernel_ptr, void* context) {
  const MatMulKernel& kernel = *static_cast<MatMulKernel*>(kernel_ptr);
  const Api* api = kernel.api;
  Tensor x = input(api, context, 0), codes = input(api, context, 1);
  Tensor scales = input(api, context, 2), bases = input(api, context, 3);
  const int64_t N = 8 * codes.dims[0], G = codes.dims[1], K = G * kGroup;
  if (codes.rank != 4 || codes.dims[2] != 8 || codes.dims[3] != 16 || x.rank < 1 ||
      x.dims[x.rank - 1] != K)
    std::abort();
  int64_t M;
  float* y = matmul_output(api, context, x, N, &M);
  matmul(api, context, data<float>(x), M, K, N, data<uint8_t>(codes), data<S>(scales),
         data<S>(bases), kernel.accuracy != 0, y);
}

}  // namespace

const CustomOp* matmul_4bit_op() {
  static const int types[4] = {kFloat, kUint8, kFloat, kFloat};
  static const Op op =
      custom_op<MatMulKernel>("MatMul4Bit", 4, 1, types, create_matmul_kernel, compute<float>);
  return &op.op;
}

const CustomOp* matmul_4bit_half_op() {
  static const int types[4] = {kFloat, kUint8, kFloat16, kFloat16};
  static const Op op =
      custom_op<MatMulKernel>("MatMul4Bit", 4, 1, types, create_matmul_kernel,
                              compute<uint16_t>);
  return &op.op;
}

}  // namespace linearize

// A plain entry for tests and benchmarks (ctypes): the same arithmetic on numpy arrays, on the
// calling thread. `int8`: 1 for accuracy level 4, 0 for fp32; `half`: the scales and bases
// float16 (else float32).
extern "C" __attribute__((visibility("default"))) int linearize_matmul_4bit(
    const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* codes, const void* scales,
    const void* bases, int64_t int8, int64_t half, float* y) {
  if (K % linearize::kGroup || N % 8 || M < 0 || N < 0) return 1;
  if (half)
    linearize::matmul(nullptr, nullptr, x, M, K, N, codes, static_cast<const uint16_t*>(scales),
                      static_cast<const uint16_t*>(bases), int8 != 0, y);
  else
    linearize::matmul(nullptr, nullptr, x, M, K, N, codes, static_cast<const float*>(scales),
                      static_cast<const float*>(bases), int8 != 0, y);
  return 0;
}
