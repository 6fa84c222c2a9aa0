// MatMul4Bit: x · Wᵀ for a 4-bit weight in groups of 32 with any zero points, as one onnxruntime
// custom op (domain "linearize"). Each weight is w = (q − 8)·s + o per group: the codes q (0..15)
// as MatMulNBits packs them (element 2i in byte i's low nibble), the group's scale s and its
// offset o = (8 − z)·s (z the zero point: a whole number or, on Q4_1's grid, any float). The
// graph's own ops for the same product (MatMulNBits on the codes, plus the offset term
// (x summed per group)·Oᵀ: models/quantize.py, `_NBitsLinear`) are its reference.
//
// Why: with float zero points the graph runs four nodes beside MatMulNBits for the offset term
// (a group sum, a reshape, an fp32 matmul, an add), a fifth of each linear's time. Here the group
// sums come with the activations' quantization, and the offsets are read beside the scales.
//
// Inputs:  0 x        float [..., K]    rows of activations
//          1 codes    uint8 [N, K/32, 16]
//          2 scales   float [N, K/32]
//          3 offsets  float [N, K/32]
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

inline int32_t sum4_i32(__m128i v) {
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4E));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xB1));
  return _mm_cvtsi128_si32(v);
}

// ---- int8 arithmetic -------------------------------------------------------------------------

// One row's activations, quantized per group of 32: the codes qx (each pair of groups laid out as
// [even elements of both][odd elements of both], 64 bytes, so one 32-byte load meets a 32-byte
// load of two groups' low or high nibbles), the scale dx, 8·Σqx (the codes' centre, taken off in
// integers) and the exact sum Σx (for the offsets).
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

// One group: Σ q·qx over its 32 codes (q unsigned 0..15, qx signed).
inline int32_t group_dot(const uint8_t* codes, const int8_t* q) {
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i lo = _mm_and_si128(c, low), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
  const __m128i even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i odd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32));
  const __m128i t = _mm_add_epi16(_mm_maddubs_epi16(lo, even), _mm_maddubs_epi16(hi, odd));
  return sum4_i32(_mm_madd_epi16(t, _mm_set1_epi16(1)));
}

// One output: a weight row's codes, scales and offsets against one quantized row.
float dot_int8(const uint8_t* codes, const float* s, const float* o, int64_t groups,
               const Quantized& x) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) {  // eight groups: one vector of their integer sums
    __m256i p[4];
    for (int k = 0; k < 4; ++k) {
      const __m256i c =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * (g + 2 * k)));
      const int8_t* q = x.q + 32 * (g + 2 * k);
      const __m256i lo = _mm256_and_si256(c, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
      const __m256i t = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32))));
      p[k] = _mm256_madd_epi16(t, ones);  // 4 lanes per group
    }
    __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    sums = _mm256_permutevar8x32_epi32(sums, order);  // groups g..g+7 in order
    const __m256i centre = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.centre + g));
    sums = _mm256_sub_epi32(sums, centre);
    const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_loadu_ps(x.dx + g));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(s + g), t, acc);
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(o + g), _mm256_loadu_ps(x.sums + g), acc);
  }
  float y = sum8(acc);
  for (; g < groups; ++g) {
    const int32_t i = group_dot(codes + 16 * g, x.q + 64 * (g / 2) + 16 * (g % 2)) - x.centre[g];
    y += s[g] * (x.dx[g] * static_cast<float>(i)) + o[g] * x.sums[g];
  }
  return y;
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

inline __m256 centred(__m128i bytes) {  // 8 codes → (q − 8) as floats
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(8)));
}

float dot_fp32(const uint8_t* codes, const float* s, const float* o, int64_t groups,
               const float* split, const float* sums) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  float offsets = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16 * g));
    const __m128i lo = _mm_and_si128(c, low), hi = _mm_and_si128(_mm_srli_epi16(c, 4), low);
    const float* xg = split + kGroup * g;
    __m256 t = _mm256_mul_ps(centred(lo), _mm256_loadu_ps(xg));
    t = _mm256_fmadd_ps(centred(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xg + 8), t);
    t = _mm256_fmadd_ps(centred(hi), _mm256_loadu_ps(xg + 16), t);
    t = _mm256_fmadd_ps(centred(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xg + 24), t);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), t, acc);
    offsets += o[g] * sums[g];
  }
  return sum8(acc) + offsets;
}

// ---- the product -----------------------------------------------------------------------------

struct Work {
  int64_t M, N, groups;
  const uint8_t* codes;
  const float* scales;
  const float* offsets;
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

void outputs(void* user, size_t task) {
  const Work& w = *static_cast<const Work*>(user);
  const int64_t first = static_cast<int64_t>(task) * kChunk;
  const int64_t last = first + kChunk < w.N ? first + kChunk : w.N;
  const int64_t G = w.groups;
  for (int64_t n = first; n < last; ++n) {
    const uint8_t* codes = w.codes + n * G * 16;
    const float *s = w.scales + n * G, *o = w.offsets + n * G;
    for (int64_t m = 0; m < w.M; ++m)
      w.y[m * w.N + n] = w.int8
                             ? dot_int8(codes, s, o, G, w.row(m))
                             : dot_fp32(codes, s, o, G, w.split + m * G * kGroup, w.sums + m * G);
  }
}

// y = x · Wᵀ for M rows; `api` and `context` null: on the calling thread alone.
void matmul(const Api* api, void* context, const float* x, int64_t M, int64_t K, int64_t N,
            const uint8_t* codes, const float* scales, const float* offsets, bool int8, float* y) {
  const int64_t G = K / kGroup;
  // Per thread: a session run from several threads at once gives each its own.
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> floats;
  thread_local std::vector<int32_t> centre;
  Work w{M, N, G, codes, scales, offsets, y, int8, nullptr, nullptr, nullptr, nullptr, nullptr};
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
  parallel_for(api, context, outputs, static_cast<size_t>((N + kChunk - 1) / kChunk), &w);
}

struct Kernel {
  const Api* api;
  int64_t accuracy;
};

void compute(void* kernel_ptr, void* context) {
  const Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
  const Api* api = kernel.api;
  Tensor x = input(api, context, 0), codes = input(api, context, 1);
  Tensor scales = input(api, context, 2), offsets = input(api, context, 3);
  const int64_t N = codes.dims[0], G = codes.dims[1], K = G * kGroup;
  if (codes.rank != 3 || codes.dims[2] != 16 || x.rank < 1 || x.dims[x.rank - 1] != K) std::abort();
  int64_t M = 1, dims[8];
  for (size_t i = 0; i + 1 < x.rank; ++i) M *= (dims[i] = x.dims[i]);
  dims[x.rank - 1] = N;
  float* y = output(api, context, 0, dims, x.rank);
  matmul(api, context, data<float>(x), M, K, N, data<uint8_t>(codes), data<float>(scales),
         data<float>(offsets), kernel.accuracy != 0, y);
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
  static const Op op = custom_op<Kernel>("MatMul4Bit", 4, 1, types, create_kernel, compute);
  return &op.op;
}

}  // namespace linearize

// A plain entry for tests and benchmarks (ctypes): the same arithmetic on numpy arrays, on the
// calling thread. `int8`: 1 for accuracy level 4, 0 for fp32.
extern "C" __attribute__((visibility("default"))) int linearize_matmul_4bit(
    const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* codes, const float* scales,
    const float* offsets, int64_t int8, float* y) {
  if (K % linearize::kGroup || M < 0 || N < 0) return 1;
  linearize::matmul(nullptr, nullptr, x, M, K, N, codes, scales, offsets, int8 != 0, y);
  return 0;
}
