// What the matmul ops (MatMul4Bit, MatMul8Bit) share: their kernel object, which keeps the
// accuracy_level attribute (4: int8 activations; 0: fp32), and their output for x's rows.

#pragma once

#include <cstdint>

#include "ort_abi.h"

namespace linearize {

struct MatMulKernel {
  const Api* api;
  int64_t accuracy;
};

inline void* create_matmul_kernel(const CustomOp*, const Api* api, const void* info) {
  auto* kernel = new MatMulKernel{api, 0};
  using GetInt = Status (*)(const void*, const char*, int64_t*);
  check(api, fn<GetInt>(api, kKernelInfoGetAttributeInt64)(info, "accuracy_level",
                                                           &kernel->accuracy));
  return kernel;
}

// The output y [..., N] of x [..., K] (the leading axes as x's); `rows`: their product.
inline float* matmul_output(const Api* api, void* context, const Tensor& x, int64_t N,
                            int64_t* rows) {
  int64_t M = 1, dims[8];
  for (size_t i = 0; i + 1 < x.rank; ++i) M *= (dims[i] = x.dims[i]);
  dims[x.rank - 1] = N;
  *rows = M;
  return output(api, context, 0, dims, x.rank);
}

}  // namespace linearize
