// What the ONNX Runtime kernels of yat.YatGemm (lite custom-op API) share, whatever their provider: the
// attributes, the operand checks, the start of Compute, and one op per dtype of a spec table.
#pragma once

#include <cstddef>
#include <iterator>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "onnxruntime_lite_custom_op.h"
#include "yat_gemm_spec.h"

namespace yat {

// eps and alpha as the node carries them (defaults from the spec).
struct Attributes {
  float eps;
  float alpha;
  static Attributes Read(const OrtKernelInfo* info);
};

// The problem a node's operands pose. W [N, K]: one product of every row of X (m: the product of X's leading
// dimensions) against W. Batched W [..., N, K] (rank > 2): Y is Batches() slices [m, n], m = X's rows per slice
// (its dimension -2); slice i is X's slice x_slice[i] ([m, k]) against W's slice w_slice[i] ([n, k]), the leading
// dimensions broadcast as MatMul's (a broadcast dimension reads the same slice again). A batched W whose leading
// dimensions are all 1 poses the unbatched problem, and is given as one.
struct Dims {
  int64_t m = 0;
  int64_t k = 0;
  int64_t n = 0;
  bool batched = false;
  std::vector<int64_t> x_slice;  // batched only: one entry per slice of Y (none when a leading dimension is 0)
  std::vector<int64_t> w_slice;
  int64_t Batches() const { return batched ? static_cast<int64_t>(x_slice.size()) : 1; }
};

// W's rows and columns when it is one matrix: [N, K], or batched with every leading dimension 1.
bool AsMatrix(const std::vector<int64_t>& w, int64_t* n, int64_t* k);

// Checks X [..., M, K] against W [N, K] or [..., N, K] and B [N] (yatdeploy/ops/reference.py's output_shape and
// check_operands); fills the problem and Y's shape, or answers an error naming the shapes.
Ort::Status CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>* b,
                        Dims* dims, std::vector<int64_t>* y);

// What a kernel's Compute works on, once BeginCompute has checked the operands and allocated Y.
template <typename T>
struct Operands {
  Dims d;
  const T* bias = nullptr;  // null when the node has no B
  T* out = nullptr;
  // Y has no values (a batched Y may have none through an empty leading dimension): nothing to compute.
  bool Empty() const { return d.m == 0 || d.n == 0 || d.Batches() == 0; }
};

// The common start of every kernel's Compute: checks the operands and allocates Y.
template <typename T>
Ort::Status BeginCompute(const Ort::Custom::Tensor<T>& x, const Ort::Custom::Tensor<T>& w,
                         const std::optional<const Ort::Custom::Tensor<T>*>& b, Ort::Custom::Tensor<T>& y,
                         Operands<T>* operands) {
  const std::vector<int64_t>* b_shape = b.has_value() && *b ? &(*b)->Shape() : nullptr;
  std::vector<int64_t> y_shape;
  Dims& d = operands->d;
  Ort::Status status = CheckShapes(x.Shape(), w.Shape(), b_shape, &d, &y_shape);
  if (!status.IsOK()) return status;
  operands->bias = b_shape ? (*b)->Data() : nullptr;
  operands->out = y.Allocate(y_shape);
  return Ort::Status{nullptr};
}

// The kernels of one implementation (cpu/cpu_ops.h, cuda/cuda_ops.h), as register.cc adds them to the domain.
using OpList = std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>;

// One op per dtype of a spec table (spec::kCpuDtypes, spec::kCudaDtypes): KernelFor<type>::type is its kernel
// struct. A dtype the table lists without a KernelFor specialisation is a compile error, so the library
// registers exactly the coverage yatdeploy/spec.py states.
template <template <spec::ElemType> class KernelFor, const auto& kTypes, std::size_t... I>
OpList CreateKernelsOf(const char* provider, std::index_sequence<I...>) {
  OpList ops;
  (ops.emplace_back(Ort::Custom::CreateLiteCustomOp<typename KernelFor<kTypes[I]>::type>(spec::kOpName, provider,
                                                                                         spec::kVersion)),
   ...);
  return ops;
}
template <template <spec::ElemType> class KernelFor, const auto& kTypes>
OpList CreateKernels(const char* provider) {
  return CreateKernelsOf<KernelFor, kTypes>(provider, std::make_index_sequence<std::size(kTypes)>{});
}

}  // namespace yat
