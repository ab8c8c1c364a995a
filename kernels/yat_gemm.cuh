// The YatGemm CUDA kernel, shared by the ONNX Runtime custom-op library (custom_ops/) and the
// TensorRT plugin (plugins/yat_gemm/, whose entry points nvcc compiles to PTX).
//
//   Y[m, n] = alpha * (x_m · w_n + b_n)² / (|x_m − w_n|² + eps)
//
// All arithmetic is float32 whatever the storage type. The distance is accumulated directly as
// Σ (x − w)², not expanded as |x|² + |w|² − 2 x·w, so it stays accurate when x ≈ w (the spec allows a
// kernel to be more accurate than the expanded form, never less).
//
// Launch geometry (also stated in yatdeploy/trt/plugin_logic.py, which TensorRT's launch parameters
// come from; tests/test_trt_plugin.py checks the two agree): one block of kThreadsX x kThreadsY
// threads per kTileM x kTileN tile of Y; grid.x walks the rows (M, up to 2^31 - 1 tiles), grid.y the
// output units (N, up to 65535 tiles).
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

inline constexpr int kTileM = 64;
inline constexpr int kTileN = 64;
inline constexpr int kTileK = 16;
inline constexpr int kThreadsX = 16;
inline constexpr int kThreadsY = 16;

inline dim3 GridFor(int64_t m, int32_t n) {
  return dim3(static_cast<unsigned>((m + kTileM - 1) / kTileM), static_cast<unsigned>((n + kTileN - 1) / kTileN));
}
inline dim3 BlockDim() { return dim3(kThreadsX, kThreadsY); }

// Launches on `stream`; returns the launch error (cudaSuccess when queued).
cudaError_t LaunchYatGemm(DType dtype, const GemmArgs& args, cudaStream_t stream);

}  // namespace yat::cuda
