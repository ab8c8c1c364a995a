// YatGemm on the CPU, independent of ONNX Runtime: the GEMM core comes from OpenBLAS and the Yat
// epilogue is applied to each output tile right after the GEMM that produced it, while it is in cache.
#pragma once

#include <cstdint>
#include <functional>

namespace yat {

// Runs task(i) for i in [0, count), possibly in parallel.
using ParallelFor = std::function<void(int64_t count, const std::function<void(int64_t)>& task)>;

struct Problem {
  int64_t m;  // rows of X (all leading dimensions)
  int64_t k;
  int64_t n;
  float eps;
  float alpha;
};

// Called once, by CreateCpuKernels (cpu/cpu_ops.h).
void UseSingleThreadedBlas();

// |w_n|² for each row of W [n, k].
void RowSquaredNorms(const float* w, int64_t n, int64_t k, float* out);
void RowSquaredNorms(const double* w, int64_t n, int64_t k, double* out);

// Y = YatGemm(X, W, B) for float and double. b may be null (zero bias); w_sq holds |w_n|².
void YatGemm(const Problem& p, const float* x, const float* w, const float* b, const float* w_sq, float* y,
             const ParallelFor& parallel_for);
void YatGemm(const Problem& p, const double* x, const double* w, const double* b, const double* w_sq, double* y,
             const ParallelFor& parallel_for);

// 16-bit storage, float32 arithmetic: x and y are raw float16 or bfloat16 bits; w and b are already
// float (converted once per session when W is constant). Results saturate to the type's finite range.
enum class Half { kFloat16, kBFloat16 };
void YatGemmHalf(Half type, const Problem& p, const uint16_t* x, const float* w, const float* b, const float* w_sq,
                 uint16_t* y, const ParallelFor& parallel_for);

float HalfToFloat(Half type, uint16_t bits);
uint16_t FloatToHalfSaturated(Half type, float value);

}  // namespace yat
