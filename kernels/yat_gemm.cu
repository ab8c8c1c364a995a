#include "yat_gemm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace yat::cuda {
namespace {

template <typename T>
__device__ __forceinline__ float ToFloat(T v);
template <>
__device__ __forceinline__ float ToFloat<float>(float v) { return v; }
template <>
__device__ __forceinline__ float ToFloat<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloatSaturated(float v);
template <>
__device__ __forceinline__ float FromFloatSaturated<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloatSaturated<__half>(float v) {
  return __float2half_rn(isnan(v) ? v : fminf(fmaxf(v, -65504.0f), 65504.0f));
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloatSaturated<__nv_bfloat16>(float v) {
  constexpr float kMax = 3.38953139e38f;
  return __float2bfloat16_rn(isnan(v) ? v : fminf(fmaxf(v, -kMax), kMax));
}

constexpr int kPerThreadM = kTileM / kThreadsY;  // 4 rows per thread
constexpr int kPerThreadN = kTileN / kThreadsX;  // 4 columns per thread

// One block computes a kTileM x kTileN tile of Y; each thread a 4 x 4 sub-tile, accumulating the dot
// product and the direct squared distance over K in shared-memory slices of kTileK.
template <typename T>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
YatGemmKernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
              int64_t m, int32_t k, int32_t n, float eps, float alpha) {
  __shared__ float xs[kTileK][kTileM + 1];
  __shared__ float ws[kTileK][kTileN + 1];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int32_t col0 = static_cast<int32_t>(blockIdx.x) * kTileN;

  float dot[kPerThreadM][kPerThreadN] = {};
  float dist[kPerThreadM][kPerThreadN] = {};

  for (int32_t k0 = 0; k0 < k; k0 += kTileK) {
    // 256 threads load 64 x 16 values of X and of W each: 4 per thread, out-of-range as 0.
    for (int i = tid; i < kTileM * kTileK; i += kThreadsX * kThreadsY) {
      const int r = i / kTileK;
      const int c = i % kTileK;
      const int64_t gr = row0 + r;
      const int32_t gc = k0 + c;
      xs[c][r] = (gr < m && gc < k) ? ToFloat(x[gr * k + gc]) : 0.0f;
      const int32_t gn = col0 + r;
      ws[c][r] = (gn < n && gc < k) ? ToFloat(w[static_cast<int64_t>(gn) * k + gc]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float xv[kPerThreadM];
      float wv[kPerThreadN];
#pragma unroll
      for (int i = 0; i < kPerThreadM; ++i) xv[i] = xs[kk][ty + i * kThreadsY];
#pragma unroll
      for (int j = 0; j < kPerThreadN; ++j) wv[j] = ws[kk][tx + j * kThreadsX];
#pragma unroll
      for (int i = 0; i < kPerThreadM; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThreadN; ++j) {
          dot[i][j] = fmaf(xv[i], wv[j], dot[i][j]);
          const float d = xv[i] - wv[j];
          dist[i][j] = fmaf(d, d, dist[i][j]);
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kPerThreadM; ++i) {
    const int64_t gr = row0 + ty + i * kThreadsY;
    if (gr >= m) continue;
#pragma unroll
    for (int j = 0; j < kPerThreadN; ++j) {
      const int32_t gc = col0 + tx + j * kThreadsX;
      if (gc >= n) continue;
      const float z = dot[i][j] + (b != nullptr ? ToFloat(b[gc]) : 0.0f);
      const float score = z * z / (dist[i][j] + eps) * alpha;
      y[gr * n + gc] = FromFloatSaturated<T>(score);
    }
  }
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
