// CUDA kernels of yat.YatGemm for ONNX Runtime's CUDA execution provider: float, float16, bfloat16.
// The kernel itself lives in kernels/yat_gemm.cu, shared with the TensorRT plugin. A double node has
// no CUDA kernel here; yatdeploy's runtime routes such models to the CPU kernels or the function.
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "yat_gemm.cuh"
#include "yat_gemm_ort.h"
#include "yat_gemm_spec.h"

namespace yat {
namespace {

using Ort::Custom::Tensor;

template <typename T, cuda::DType kType>
struct CudaKernel {
  CudaKernel(const OrtApi*, const OrtKernelInfo* info) : attributes_(Attributes::Read(info)) {}

  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& x, const Tensor<T>& w,
                      std::optional<const Tensor<T>*> b, Tensor<T>& y) {
    Dims d;
    const T* bias = nullptr;
    T* out = nullptr;
    if (Ort::Status status = BeginCompute(x, w, b, y, &d, &bias, &out); !status.IsOK()) return status;
    if (d.k > std::numeric_limits<int32_t>::max() || d.n > std::numeric_limits<int32_t>::max()) {
      return Ort::Status("YatGemm (CUDA): K and N must fit in 32 bits", ORT_INVALID_ARGUMENT);
    }
    const cuda::GemmArgs args{x.Data(), w.Data(), bias, out, d.m, static_cast<int32_t>(d.k), static_cast<int32_t>(d.n),
                              attributes_.eps, attributes_.alpha};
    auto stream = static_cast<cudaStream_t>(Ort::KernelContext(context).GetGPUComputeStream());
    const cudaError_t error = cuda::LaunchYatGemm(kType, args, stream);
    if (error != cudaSuccess) {
      return Ort::Status((std::string("YatGemm (CUDA): launch failed: ") + cudaGetErrorString(error)).c_str(),
                         ORT_EP_FAIL);
    }
    return Ort::Status{nullptr};
  }

  Attributes attributes_;
};

constexpr const char* kCuda = "CUDAExecutionProvider";

}  // namespace

OpList CreateCudaKernels() {
  OpList ops;
  ops.emplace_back(
      Ort::Custom::CreateLiteCustomOp<CudaKernel<float, cuda::DType::kFloat32>>(spec::kOpName, kCuda, spec::kVersion));
  ops.emplace_back(Ort::Custom::CreateLiteCustomOp<CudaKernel<Ort::Float16_t, cuda::DType::kFloat16>>(
      spec::kOpName, kCuda, spec::kVersion));
  ops.emplace_back(Ort::Custom::CreateLiteCustomOp<CudaKernel<Ort::BFloat16_t, cuda::DType::kBFloat16>>(
      spec::kOpName, kCuda, spec::kVersion));
  return ops;
}

}  // namespace yat
