// MatMul8Bit: x · Wᵀ for an 8-bit weight in groups of 32 on Q8_0's grid (codes 1..255 around
// 128, a float32 scale a group: w = (q − 128)·s; an int4 model's head, models/quantize.py), as
// one onnxruntime custom op (domain "linearize"). Its reference: MatMulNBits with 8 bits (the
// same codes and scales, no zero-point input: 128 is its default).
//
// Why: MatMulNBits' int8 arithmetic ran the default model's head (49,152 × 576, 31.9 MB) in
// 2.07 ms a token with the weight in cache and 2.23 out of it, where reading as many bytes
// takes 1.27 ms: its arithmetic, not the memory, bounded it. Here the weight comes in blocks of
// 8 rows, each group's 8 rows side by side (the exporter's layout, engine/step.py Kernel8Bit):
// a group's 32 products per row are one VNNI instruction (AVX2: two), and the 8 rows' sums are
// reduced together into one vector whose lanes are the 8 outputs; no horizontal sum per row,
// and no block of groups left part empty at a row's end (18 groups: 8 + 8 + 2).
//
// Inputs:  0 x        float [..., K]    rows of activations
//          1 codes    uint8 [N/8, K/32, 8, 32]   row 8b + r's group g: codes[b, g, r]
//          2 scales   float [N/8, K/32, 8]
// Attribute: accuracy_level: 4 quantizes each group of 32 activations to int8 (scale
//   max|x| / 127, rounded to nearest even, as MatMulNBits and MatMul4Bit do) and multiplies in
//   integers; 0 multiplies the dequantized codes in fp32 (the reference's numbers).
// Output:  0 y        float [..., N]
// The outputs are split over onnxruntime's intra-op threads in chunks of kChunk.
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
// (No software prefetch: the blocks are one sequential stream, which the hardware's prefetcher
// follows; prefetching two blocks ahead made the head 30-45 % slower.)

// One row of activations in int8 (accuracy_level 4): per group its 32 codes in order, its scale
// and 128 · (sum of its codes), what the codes' offset takes off each group's integer sum.
struct Quantized {
  const int8_t* q;
  const float* dx;
  const int32_t* centre;
};

void quantize_row(const float* x, int64_t groups, int8_t* q, float* dx, int32_t* centre) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const float* xg = x + kGroup * g;
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + 8 * j)));
    const float amax = max8(m);
    const float inverse = amax > 0 ? 127.0f / amax : 0.0f;
    dx[g] = amax / 127.0f;
    int32_t codes = 0;
    for (int i = 0; i < kGroup; ++i) {
      const int v = static_cast<int>(std::nearbyint(xg[i] * inverse));
      q[kGroup * g + i] = static_cast<int8_t>(v);
      codes += v;
    }
    centre[g] = 128 * codes;
  }
}

// Σ code · q over one group's 32 entries in 8 int32 lanes; AVX2 without VNNI: Σ (code − 128) · q.
inline __m256i products(const uint8_t* codes, __m256i x) {
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
#ifdef __AVX512VNNI__  // (no saturation: the offset leaves with the centre)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, x);
#else  // maddubs multiplies unsigned by signed bytes into int16 pairs: |w| · (q with w's sign)
  // stays within ±2 · 127 · 127, where code · q would saturate (255 · 127 · 2 > 2^15).
  const __m256i w = _mm256_xor_si256(c, _mm256_set1_epi8(static_cast<char>(0x80)));  // code − 128
  const __m256i t = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(t, _mm256_set1_epi16(1));
#endif
}

// The 8 vectors' lane sums, in order: each vector's 8 lanes added, the 8 at once.
inline __m256i lane_sums(const __m256i p[8]) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
  // a: vectors 0-3's lanes 0-3 summed in its low half, their lanes 4-7 in its high half; b: 4-7.
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                          _mm256_permute2x128_si256(a, b, 0x31));
}

// A block of 8 outputs against one quantized row: per group, the 8 rows' integer sums in one
// vector, weighed by the rows' scales and the group's activation scale.
__m256 block_int8(const uint8_t* codes, const float* s, int64_t G, const Quantized& x) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i xg = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + kGroup * g));
    const uint8_t* cg = codes + 8 * kGroup * g;
    __m256i p[8];
    for (int r = 0; r < 8; ++r) p[r] = products(cg + kGroup * r, xg);
    __m256i sums = lane_sums(p);
#ifdef __AVX512VNNI__
    sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(x.centre[g]));
#endif
    const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(x.dx[g]));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8 * g), t, acc);
  }
  return acc;
}

// fp32: the 8 outputs of a block, each Σ w · x with w = (code − 128) · s rounded as the
// reference dequantizes it (the products then the reference's; only their sums' order differs).
__m256 block_fp32(const uint8_t* codes, const float* s, int64_t G, const float* x) {
  const __m256 offset = _mm256_set1_ps(128.0f);
  alignas(32) float out[8];
  for (int r = 0; r < 8; ++r) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* c = codes + kGroup * (8 * g + r);
      const __m256 scale = _mm256_set1_ps(s[8 * g + r]);
      for (int j = 0; j < 4; ++j) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * j));
        const __m256 q = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), offset);
        acc = _mm256_fmadd_ps(_mm256_mul_ps(q, scale), _mm256_loadu_ps(x + kGroup * g + 8 * j),
                              acc);
      }
    }
    out[r] = sum8(acc);
  }
  return _mm256_load_ps(out);
}

struct Work {
  int64_t M, N, groups;
  const uint8_t* codes;
  const float* scales;
  const float* x;
  float* y;
  bool int8;
  // int8: the quantized rows (quantize_row)
  const int8_t* q;
  const float* dx;
  const int32_t* centre;

  Quantized row(int64_t m) const {
    return {q + m * groups * kGroup, dx + m * groups, centre + m * groups};
  }
};

void outputs(void* user, size_t task) {
  const Work& w = *static_cast<const Work*>(user);
  const int64_t G = w.groups, blocks = w.N / 8;
  const int64_t first = static_cast<int64_t>(task) * kChunk / 8;
  const int64_t last = first + kChunk / 8 < blocks ? first + kChunk / 8 : blocks;
  for (int64_t b = first; b < last; ++b) {
    const uint8_t* codes = w.codes + b * G * 8 * kGroup;
    const float* s = w.scales + b * G * 8;
    for (int64_t m = 0; m < w.M; ++m)
      _mm256_storeu_ps(w.y + m * w.N + 8 * b,
                       w.int8 ? block_int8(codes, s, G, w.row(m))
                              : block_fp32(codes, s, G, w.x + m * G * kGroup));
  }
}

void matmul(const Api* api, void* context, const float* x, int64_t M, int64_t K, int64_t N,
            const uint8_t* codes, const float* scales, bool int8, float* y) {
  const int64_t G = K / kGroup;
  // (Reused across calls on a thread: no allocation per token.)
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> dx;
  thread_local std::vector<int32_t> centre;
  Work w{M, N, G, codes, scales, x, y, int8, nullptr, nullptr, nullptr};
  if (int8) {
    q.resize(static_cast<size_t>(M * G * kGroup));
    dx.resize(static_cast<size_t>(M * G));
    centre.resize(static_cast<size_t>(M * G));
    for (int64_t m = 0; m < M; ++m)
      quantize_row(x + m * K, G, q.data() + m * G * kGroup, dx.data() + m * G,
                   centre.data() + m * G);
    w.q = q.data();
    w.dx = dx.data();
    w.centre = centre.data();
  }
  parallel_for(api, context, outputs, static_cast<size_t>((N + kChunk - 1) / kChunk), &w);
}

void compute(void* kernel_ptr, void* context) {
  const MatMulKernel& kernel = *static_cast<MatMulKernel*>(kernel_ptr);
  const Api* api = kernel.api;
  Tensor x = input(api, context, 0), codes = input(api, context, 1);
  Tensor scales = input(api, context, 2);
  const int64_t N = 8 * codes.dims[0], G = codes.dims[1], K = G * kGroup;
  if (codes.rank != 4 || codes.dims[2] != 8 || codes.dims[3] != kGroup || x.rank < 1 ||
      x.dims[x.rank - 1] != K)
    std::abort();
  int64_t M;
  float* y = matmul_output(api, context, x, N, &M);
  matmul(api, context, data<float>(x), M, K, N, data<uint8_t>(codes), data<float>(scales),
         kernel.accuracy != 0, y);
}

}  // namespace

const CustomOp* matmul_8bit_op() {
  static const int types[3] = {kFloat, kUint8, kFloat};
  static const Op op =
      custom_op<MatMulKernel>("MatMul8Bit", 3, 1, types, create_matmul_kernel, compute);
  return &op.op;
}

}  // namespace linearize

// The same product without onnxruntime (tests/engine/test_matmul_8bit.py calls it through
// ctypes): y [M, N] = x [M, K] · Wᵀ, the weight in the op's blocks of 8 rows, serially; 0 on
// success.
extern "C" __attribute__((visibility("default"))) int linearize_matmul_8bit(
    const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* codes, const float* scales,
    int64_t int8, float* y) {
  if (K % linearize::kGroup || N % 8 || M < 0 || N < 0) return 1;
  linearize::matmul(nullptr, nullptr, x, M, K, N, codes, scales, int8 != 0, y);
  return 0;
}
