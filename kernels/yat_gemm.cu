// The ONNX Runtime side's launcher of the YatGemm kernel (kernels/yat_gemm_tile.cuh).
#include "yat_gemm.cuh"
#include "yat_gemm_tile.cuh"

namespace yat::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
YatGemmKernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
              int64_t m, int32_t k, int32_t n, float eps, float alpha) {
  YatGemmTile<T>(x, w, b, y, m, k, n, eps, alpha);
}

template <typename T>
cudaError_t Launch(const GemmArgs& a, cudaStream_t stream) {
  if (a.m == 0 || a.n == 0) return cudaSuccess;
  YatGemmKernel<T><<<GridFor(a.m, a.n), BlockDim(), 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w), static_cast<const T*>(a.b), static_cast<T*>(a.y), a.m,
      a.k, a.n, a.eps, a.alpha);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchYatGemm(DType dtype, const GemmArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return Launch<float>(args, stream);
    case DType::kFloat16:
      return Launch<__half>(args, stream);
    case DType::kBFloat16:
      return Launch<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace yat::cuda
