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

// The most rows of X YatGemmAvx512Rows takes.
inline constexpr int64_t kAvx512FewRows = 4;

// Y [m, n] (row stride ldy) for m <= kAvx512FewRows rows of X against W [n, k] read as it is, unpacked: each row of
// W is read once, for |w_n|² and its m dot products together. For a W used once with few rows of X (a batched
// W: attention's keys at decode, M = 1), where packing W would cost as much as the product. Requires
// CpuHasAvx512(); single-threaded (the caller splits the columns). b may be null.
void YatGemmAvx512Rows(const Problem& p, const float* x, const float* w, const float* b, float* y, int64_t ldy);

}  // namespace yat
