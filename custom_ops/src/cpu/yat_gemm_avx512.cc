#include "cpu/yat_gemm_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <thread>

// Only the functions marked with this attribute use AVX-512; nothing else in this file (and no
// template shared with other files) is compiled for it, so the library still loads on older CPUs.
#define YAT_AVX512 __attribute__((target("avx512f,fma")))

namespace yat {
namespace {

constexpr int kPanel = PackedWeights::kPanelWidth;  // two 16-float registers wide
constexpr int kRowsPerBlock = 8;                     // 8 x 2 accumulators of the 32 registers
constexpr int64_t kRowsPerTask = 64;                 // X rows kept in L2 while the task walks its panels
constexpr int64_t kPanelsPerTask = 8;                // 256 columns of W per task

struct EpilogueArgs {
  const float* x_sq;  // per row of the block
  const float* w_sq;  // per column of the panel (padded)
  const float* b;     // per column of the panel, or null
  int valid_columns;  // < kPanel on the last panel
  float eps;
  float alpha;
};

template <int kRows>
YAT_AVX512 void Block(const float* x, int64_t k, const float* panel, const EpilogueArgs& e, float* y, int64_t ldy) {
  __m512 acc[kRows][2];
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 w0 = _mm512_loadu_ps(panel + kk * kPanel);
    const __m512 w1 = _mm512_loadu_ps(panel + kk * kPanel + 16);
    for (int i = 0; i < kRows; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * k + kk]);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
    }
  }
  const __m512 zero = _mm512_setzero_ps();
  const __m512 two = _mm512_set1_ps(2.0f);
  const __m512 eps = _mm512_set1_ps(e.eps);
  const __m512 alpha = _mm512_set1_ps(e.alpha);
  for (int h = 0; h < 2; ++h) {
    const int valid = std::min(16, std::max(0, e.valid_columns - 16 * h));
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    if (mask == 0) continue;
    const __m512 w_sq = _mm512_loadu_ps(e.w_sq + 16 * h);
    const __m512 bias = e.b ? _mm512_maskz_loadu_ps(mask, e.b + 16 * h) : zero;
    for (int i = 0; i < kRows; ++i) {
      const __m512 dot = acc[i][h];
      const __m512 z = _mm512_add_ps(dot, bias);
      const __m512 norms = _mm512_add_ps(_mm512_set1_ps(e.x_sq[i]), w_sq);
      const __m512 dist = _mm512_max_ps(_mm512_fnmadd_ps(two, dot, norms), zero);
      const __m512 score = _mm512_mul_ps(_mm512_div_ps(_mm512_mul_ps(z, z), _mm512_add_ps(dist, eps)), alpha);
      _mm512_mask_storeu_ps(y + i * ldy + 16 * h, mask, score);
    }
  }
}

using BlockFn = void (*)(const float*, int64_t, const float*, const EpilogueArgs&, float*, int64_t);
constexpr BlockFn kBlocks[kRowsPerBlock + 1] = {nullptr,   Block<1>, Block<2>, Block<3>, Block<4>,
                                                Block<5>, Block<6>, Block<7>, Block<8>};

YAT_AVX512 float SquaredNorm(const float* v, int64_t k) {
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 a = _mm512_loadu_ps(v + i);
    sum = _mm512_fmadd_ps(a, a, sum);
  }
  if (i < k) {
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (k - i)) - 1u), v + i);
    sum = _mm512_fmadd_ps(a, a, sum);
  }
  return _mm512_reduce_add_ps(sum);
}

// Row j of W against the kRows rows of X: |w_j|² and the dot products, each summed over K in one register.
template <int kRows>
YAT_AVX512 void FewRows(const Problem& p, const float* x, const float* x_sq, const float* w, const float* b, float* y,
                        int64_t ldy) {
  const int64_t k = p.k;
  const int64_t tail = k % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1u);
  for (int64_t j = 0; j < p.n; ++j) {
    const float* row = w + j * k;
    __m512 norm = _mm512_setzero_ps();
    __m512 dot[kRows];
    for (int i = 0; i < kRows; ++i) dot[i] = _mm512_setzero_ps();
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
      const __m512 wv = _mm512_loadu_ps(row + kk);
      norm = _mm512_fmadd_ps(wv, wv, norm);
      for (int i = 0; i < kRows; ++i) dot[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * k + kk), wv, dot[i]);
    }
    if (tail) {
      const __m512 wv = _mm512_maskz_loadu_ps(tail_mask, row + kk);
      norm = _mm512_fmadd_ps(wv, wv, norm);
      for (int i = 0; i < kRows; ++i) {
        dot[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask, x + i * k + kk), wv, dot[i]);
      }
    }
    const float w_sq = _mm512_reduce_add_ps(norm);
    const float bias = b ? b[j] : 0.0f;
    for (int i = 0; i < kRows; ++i) {
      // The block kernel's epilogue, in scalar form: the same operations in the same order.
      const float d = _mm512_reduce_add_ps(dot[i]);
      const float z = d + bias;
      const float dist = std::max(std::fma(-2.0f, d, x_sq[i] + w_sq), 0.0f);
      y[i * ldy + j] = z * z / (dist + p.eps) * p.alpha;
    }
  }
}

using FewRowsFn = void (*)(const Problem&, const float*, const float*, const float*, const float*, float*, int64_t);
constexpr FewRowsFn kFewRows[kAvx512FewRows + 1] = {nullptr, FewRows<1>, FewRows<2>, FewRows<3>, FewRows<4>};

}  // namespace

bool CpuHasAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

void PackWeights(const float* w, int64_t n, int64_t k, PackedWeights* out) {
  out->n = n;
  out->k = k;
  out->panels = (n + kPanel - 1) / kPanel;
  out->data.assign(static_cast<size_t>(out->panels * k * kPanel), 0.0f);
  out->w_sq.assign(static_cast<size_t>(out->panels * kPanel), 0.0f);
  for (int64_t col = 0; col < n; ++col) {
    float* panel = out->data.data() + (col / kPanel) * k * kPanel + col % kPanel;
    const float* row = w + col * k;
    float sum = 0.0f;
    for (int64_t kk = 0; kk < k; ++kk) {
      panel[kk * kPanel] = row[kk];
      sum += row[kk] * row[kk];
    }
    out->w_sq[static_cast<size_t>(col)] = sum;
  }
}

void YatGemmAvx512(const Problem& p, const float* x, const PackedWeights& w, const float* b, float* y,
                   const ParallelFor& pool_for) {
  // Below this many multiply-adds, waking pool threads costs more than the second core saves.
  constexpr int64_t kSerialWork = int64_t{4} << 20;
  const ParallelFor serial_for = [](int64_t count, const std::function<void(int64_t)>& task) {
    for (int64_t i = 0; i < count; ++i) task(i);
  };
  const ParallelFor& parallel_for = p.m * p.n * p.k < kSerialWork ? serial_for : pool_for;
  const int64_t row_tasks = (p.m + kRowsPerTask - 1) / kRowsPerTask;
  // Few rows: one task per thread, each a contiguous range of panels (a task costs a pool round trip).
  const int64_t workers = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  const int64_t panels_per_task =
      row_tasks < workers ? std::max<int64_t>(1, (w.panels + workers - 1) / workers) : kPanelsPerTask;
  const int64_t panel_tasks = (w.panels + panels_per_task - 1) / panels_per_task;
  // |x|² once per row, not once per task that reads the row.
  std::vector<float> x_sq_all(static_cast<size_t>(p.m));
  const auto row_norms = [&](int64_t task) {
    const int64_t end = std::min(p.m, (task + 1) * kRowsPerTask);
    for (int64_t i = task * kRowsPerTask; i < end; ++i) x_sq_all[static_cast<size_t>(i)] = SquaredNorm(x + i * p.k, p.k);
  };
  if (row_tasks == 1) {
    row_norms(0);  // a thread-pool round trip would cost more than the work
  } else {
    parallel_for(row_tasks, row_norms);
  }
  parallel_for(row_tasks * panel_tasks, [&](int64_t task) {
    const int64_t row0 = (task / panel_tasks) * kRowsPerTask;
    const int64_t rows = std::min(kRowsPerTask, p.m - row0);
    const int64_t first_panel = (task % panel_tasks) * panels_per_task;
    const int64_t last_panel = std::min(w.panels, first_panel + panels_per_task);
    const float* x_sq = x_sq_all.data() + row0;
    for (int64_t panel = first_panel; panel < last_panel; ++panel) {
      const int64_t col0 = panel * kPanel;
      const float* packed = w.data.data() + panel * p.k * kPanel;
      for (int64_t r = 0; r < rows; r += kRowsPerBlock) {
        const int block_rows = static_cast<int>(std::min<int64_t>(kRowsPerBlock, rows - r));
        const EpilogueArgs e{x_sq + r, w.w_sq.data() + col0, b ? b + col0 : nullptr,
                             static_cast<int>(std::min<int64_t>(kPanel, p.n - col0)), p.eps, p.alpha};
        kBlocks[block_rows](x + (row0 + r) * p.k, p.k, packed, e, y + (row0 + r) * p.n + col0, p.n);
      }
    }
  });
}

void YatGemmAvx512Rows(const Problem& p, const float* x, const float* w, const float* b, float* y, int64_t ldy) {
  float x_sq[kAvx512FewRows];
  for (int64_t i = 0; i < p.m; ++i) x_sq[i] = SquaredNorm(x + i * p.k, p.k);
  kFewRows[p.m](p, x, x_sq, w, b, y, ldy);
}

}  // namespace yat
