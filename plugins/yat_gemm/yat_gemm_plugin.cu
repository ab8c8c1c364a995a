// The YatGemm TensorRT plugin's kernels: entry points with the argument layout TensorRT's
// ahead-of-time plugins launch with, over the shared tile code in kernels/yat_gemm_tile.cuh.
// The native build compiles this file to PTX (yat_gemm_plugin.ptx); yatdeploy/trt/plugin.py hands
// that PTX, the entry's name and the launch parameters to TensorRT, which embeds them in the engine.
//
// TensorRT passes the input pointers, then the scalar "extra args" (32-bit integers only), then the
// output pointer. eps and alpha are float attributes, so each travels as the two 16-bit halves of its
// float32 bit pattern: non-negative integers whatever the float's sign, which every symbolic-integer
// path in TensorRT represents exactly.
#include <cstdint>

#include "yat_gemm_tile.cuh"

namespace {

__device__ __forceinline__ float FloatFromHalves(int32_t high, int32_t low) {
  return __uint_as_float((static_cast<uint32_t>(high) << 16) | (static_cast<uint32_t>(low) & 0xFFFFu));
}

}  // namespace

#define YAT_GEMM_TRT_ENTRY(NAME, T)                                                                          \
  extern "C" __global__ void __launch_bounds__(yat::cuda::kThreadsX * yat::cuda::kThreadsY)                 \
  NAME(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, int32_t m, int32_t k,     \
       int32_t n, int32_t eps_high, int32_t eps_low, int32_t alpha_high, int32_t alpha_low,                  \
       T* __restrict__ y) {                                                                                  \
    yat::cuda::YatGemmTile<T>(x, w, b, y, m, k, n, FloatFromHalves(eps_high, eps_low),                        \
                              FloatFromHalves(alpha_high, alpha_low));                                       \
  }

YAT_GEMM_TRT_ENTRY(yat_gemm_trt_f32, float)
YAT_GEMM_TRT_ENTRY(yat_gemm_trt_f16, __half)
YAT_GEMM_TRT_ENTRY(yat_gemm_trt_bf16, __nv_bfloat16)
