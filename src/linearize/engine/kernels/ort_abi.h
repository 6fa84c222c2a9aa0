// The part of onnxruntime's C ABI that linearize's custom ops use, declared here rather than
// through onnxruntime's headers, which its Python wheel does not ship: a custom op's callbacks
// (the OrtCustomOp layout of version 13) and the functions of the OrtApi table the ops call, by
// their place in the table. The library asks for the table of version 18 (onnxruntime 1.18, the
// oldest the package allows), which holds every place below.

#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace linearize {

constexpr uint32_t kApiVersion = 18;  // the OrtApi table asked for
constexpr uint32_t kOpVersion = 13;   // the OrtCustomOp layout below
constexpr int kFloat = 1;             // ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
constexpr int kUint8 = 2;             // ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
constexpr int kInt8 = 3;              // ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
constexpr int kFloat16 = 10;          // ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16

using Status = void*;  // OrtStatus*: null on success

struct Api {
  void* table[275];
};

// Places in the OrtApi table.
enum : int {
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,  // since version 17
};

struct ApiBase {
  const Api* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};

struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const Api*, const void* info);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void* kernel, void* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
};

template <typename F>
F fn(const Api* api, int place) {
  return reinterpret_cast<F>(api->table[place]);
}

struct Tensor {
  void* data;
  int64_t dims[8];
  size_t rank;
};

inline void check(const Api* api, Status status) {
  if (status) {
    fn<void (*)(Status)>(api, kReleaseStatus)(status);
    std::abort();  // a shape or type the exporter never writes
  }
}

inline Tensor input(const Api* api, void* context, size_t index) {
  const void* value = nullptr;
  check(api, fn<Status (*)(void*, size_t, const void**)>(api, kKernelContextGetInput)(
                 context, index, &value));
  void* info = nullptr;
  check(api, fn<Status (*)(const void*, void**)>(api, kGetTensorTypeAndShape)(value, &info));
  Tensor t{};
  check(api, fn<Status (*)(const void*, size_t*)>(api, kGetDimensionsCount)(info, &t.rank));
  if (t.rank > 8) std::abort();
  check(api, fn<Status (*)(const void*, int64_t*, size_t)>(api, kGetDimensions)(
                 info, t.dims, t.rank));
  fn<void (*)(void*)>(api, kReleaseTensorTypeAndShapeInfo)(info);
  void* data = nullptr;
  check(api, fn<Status (*)(const void*, void**)>(api, kGetTensorMutableData)(value, &data));
  t.data = data;
  return t;
}

inline float* output(const Api* api, void* context, size_t index, const int64_t* dims, size_t rank) {
  void* value = nullptr;
  check(api, fn<Status (*)(void*, size_t, const int64_t*, size_t, void**)>(
                 api, kKernelContextGetOutput)(context, index, dims, rank, &value));
  void* data = nullptr;
  check(api, fn<Status (*)(const void*, void**)>(api, kGetTensorMutableData)(value, &data));
  return static_cast<float*>(data);
}


template <typename T>
T* data(const Tensor& t) {
  return static_cast<T*>(t.data);
}

// body(user, i) for i in [0, total), over the session's intra-op threads (sequential with one),
// or with `api` null (the ctypes entries) on the calling thread.
inline void parallel_for(const Api* api, void* context, void (*body)(void*, size_t), size_t total,
                         void* user) {
  if (api == nullptr) {
    for (size_t i = 0; i < total; ++i) body(user, i);
    return;
  }
  using ParallelFor = Status (*)(void*, void (*)(void*, size_t), size_t, size_t, void*);
  check(api, fn<ParallelFor>(api, kKernelContextParallelFor)(context, body, total, 0, user));
}

// A custom op as onnxruntime sees it (`op`, first, so that its callbacks find the rest): every
// input and output required, on the CPU; the inputs of the types `input_types` lists (null:
// every one float32), the outputs float32.
struct Op {
  CustomOp op;
  const char* name;
  size_t inputs, outputs;
  const int* input_types;
};

inline const Op& op_of(const CustomOp* op) { return *reinterpret_cast<const Op*>(op); }

template <typename Kernel>
Op custom_op(const char* name, size_t inputs, size_t outputs, const int* input_types,
             void* (*create)(const CustomOp*, const Api*, const void*),
             void (*compute)(void*, void*)) {
  Op o;
  std::memset(&o, 0, sizeof o);
  o.name = name;
  o.inputs = inputs;
  o.outputs = outputs;
  o.input_types = input_types;
  CustomOp& op = o.op;
  op.version = kOpVersion;
  op.CreateKernel = create;
  op.GetName = [](const CustomOp* self) { return op_of(self).name; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };
  op.GetInputType = [](const CustomOp* self, size_t i) {
    const int* types = op_of(self).input_types;
    return types ? types[i] : kFloat;
  };
  op.GetInputTypeCount = [](const CustomOp* self) { return op_of(self).inputs; };
  op.GetOutputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const CustomOp* self) { return op_of(self).outputs; };
  op.KernelCompute = compute;
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return 0; };   // required
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };  // required
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };       // default
  return o;
}

// The custom ops of the library (registered together in the domain "linearize"): RingAttention
// on float32 rings, and on float16 ones (the same name, its keys and values typed float16);
// RingAttentionInt8 on int8 rings with their scales;
// MatMul4Bit with float32 scales and bases, and with float16 ones (the same name again);
// MatMul8Bit (Q8_0's grid: an int4 model's head).
const CustomOp* ring_attention_op();
const CustomOp* ring_attention_half_op();
const CustomOp* ring_attention_int8_op();
const CustomOp* matmul_4bit_op();
const CustomOp* matmul_4bit_half_op();
const CustomOp* matmul_8bit_op();

}  // namespace linearize
