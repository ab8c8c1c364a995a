// The float32 YatGemm with its own AVX-512 GEMM micro-kernel: W is packed once into column panels,
// each 8 x 32 output block is accumulated in registers and the Yat epilogue is applied there, before
// the block is stored. Used when the CPU has AVX-512F; yat_gemm_cpu.cc falls back to OpenBLAS otherwise.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/yat_gemm_cpu.h"

namespace yat {

bool CpuHasAvx512();

// W [n, k] as panels of kPanelWidth columns, each stored k-major ([k][kPanelWidth]), zero-padded, and
// the row norms |w_n|² padded to whole panels.
struct PackedWeights {
  static constexpr int kPanelWidth = 32;
  int64_t n = 0;
  int64_t k = 0;
  int64_t panels = 0;
  std::vector<float> data;
  std::vector<float> w_sq;
};

void PackWeights(const float* w, int64_t n, int64_t k, PackedWeights* out);

// Requires CpuHasAvx512(). b may be null.
void YatGemmAvx512(const Problem& p, const float* x, const PackedWeights& w, const float* b, float* y,
                   const ParallelFor& parallel_for);

}  // namespace yat
