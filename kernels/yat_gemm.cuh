// The YatGemm CUDA kernel, shared by the ONNX Runtime custom-op library (custom_ops/) and the
// TensorRT plugin (plugins/, which compiles kernels/yat_gemm.cu to PTX).
//
//   Y[m, n] = alpha * (x_m · w_n + b_n)² / (|x_m − w_n|² + eps)
//
// All arithmetic is float32 whatever the storage type. The distance is accumulated directly as
// Σ (x − w)², not expanded as |x|² + |w|² − 2 x·w, so it stays accurate when x ≈ w (the spec allows a
// kernel to be more accurate than the expanded form, never less).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace yat::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GemmArgs {
  const void* x;  // [m, k]
  const void* w;  // [n, k]
  const void* b;  // [n] or nullptr
  void* y;        // [m, n]
  int64_t m;
  int32_t k;
  int32_t n;
  float eps;
  float alpha;
};

// Output tile per thread block and threads per block; the launch grid is derived from these.
inline constexpr int kTileM = 64;
inline constexpr int kTileN = 64;
inline constexpr int kTileK = 16;
inline constexpr int kThreadsX = 16;
inline constexpr int kThreadsY = 16;

inline dim3 GridFor(int64_t m, int32_t n) {
  return dim3(static_cast<unsigned>((n + kTileN - 1) / kTileN), static_cast<unsigned>((m + kTileM - 1) / kTileM));
}
inline dim3 BlockDim() { return dim3(kThreadsX, kThreadsY); }

// Launches on `stream`; returns the launch error (cudaSuccess when queued).
cudaError_t LaunchYatGemm(DType dtype, const GemmArgs& args, cudaStream_t stream);

}  // namespace yat::cuda
