// AVX2 helpers shared by linearize's kernels.

#pragma once

#include <immintrin.h>

namespace linearize {

// The sum of a vector's 8 floats.
inline float sum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace linearize
