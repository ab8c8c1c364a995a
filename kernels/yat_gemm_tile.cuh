// Device code of the YatGemm kernel: what one thread block computes. Included by kernels/yat_gemm.cu
// (the ONNX Runtime launcher) and plugins/yat_gemm/yat_gemm_plugin.cu (TensorRT's PTX entry points),
// so both run the same arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "yat_gemm.cuh"

namespace yat::cuda {

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

inline constexpr int kPerThreadM = kTileM / kThreadsY;  // 4 rows per thread
inline constexpr int kPerThreadN = kTileN / kThreadsX;  // 4 columns per thread

// The block at (blockIdx.x, blockIdx.y) computes rows [64·x, 64·x + 64) and output units
// [64·y, 64·y + 64) of Y; each thread a 4 x 4 sub-tile, accumulating the dot product and the direct
// squared distance over K in shared-memory slices of kTileK. Needs kThreadsX x kThreadsY threads.
template <typename T>
__device__ __forceinline__ void YatGemmTile(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ b, T* __restrict__ y, int64_t m, int32_t k,
                                            int32_t n, float eps, float alpha) {
  __shared__ float xs[kTileK][kTileM + 1];
  __shared__ float ws[kTileK][kTileN + 1];

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kThreadsX + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int32_t col0 = static_cast<int32_t>(blockIdx.y) * kTileN;

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

}  // namespace yat::cuda
