// The library's entry for onnxruntime (SessionOptions.register_custom_ops_library): every op of
// linearize's kernels, in the domain "linearize".

#include <initializer_list>

#include "ort_abi.h"

using namespace linearize;

extern "C" __attribute__((visibility("default"))) Status RegisterCustomOps(
    void* options, const ApiBase* base) {
  const Api* api = base->GetApi(kApiVersion);
  if (api == nullptr) std::abort();  // onnxruntime older than 1.18, which the package requires
  void* domain = nullptr;
  Status status =
      fn<Status (*)(const char*, void**)>(api, kCreateCustomOpDomain)("linearize", &domain);
  if (status) return status;
  using Add = Status (*)(void*, const CustomOp*);
  for (const CustomOp* op :
       {ring_attention_op(), ring_attention_half_op(), ring_attention_int8_op(), matmul_4bit_op(),
        matmul_4bit_half_op(), matmul_8bit_op()}) {
    status = fn<Add>(api, kCustomOpDomainAdd)(domain, op);
    if (status) return status;
  }
  return fn<Status (*)(void*, void*)>(api, kAddCustomOpDomain)(options, domain);
}
