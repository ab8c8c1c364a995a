#include "cpu/yat_gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include <cblas.h>

#include "yat_gemm_spec.h"

namespace yat {
namespace {

// Rows per task. A task runs one single-threaded GEMM over its rows and all N columns (or a column
// block when there are too few rows to keep every thread busy), then the epilogue on that tile.
constexpr int64_t kRowsPerTask = 128;
constexpr int64_t kMinColumnsPerTask = 256;

struct Tile {
  int64_t row0, rows, col0, cols;
};

std::vector<Tile> Tiles(const Problem& p) {
  const int64_t workers = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  std::vector<Tile> tiles;
  const int64_t row_tasks = (p.m + kRowsPerTask - 1) / kRowsPerTask;
  int64_t col_tasks = 1;
  if (row_tasks < workers) {
    col_tasks = std::max<int64_t>(1, std::min<int64_t>(workers, p.n / kMinColumnsPerTask));
  }
  const int64_t cols_per_task = (p.n + col_tasks - 1) / col_tasks;
  for (int64_t r = 0; r < p.m; r += kRowsPerTask) {
    for (int64_t c = 0; c < p.n; c += cols_per_task) {
      tiles.push_back({r, std::min(kRowsPerTask, p.m - r), c, std::min(cols_per_task, p.n - c)});
    }
  }
  return tiles;
}

inline void Gemm(const Tile& t, const Problem& p, const float* x, const float* w, float* y, int64_t ldy) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(t.rows), static_cast<blasint>(t.cols),
                    static_cast<blasint>(p.k), 1.0f, x + t.row0 * p.k, static_cast<blasint>(p.k), w + t.col0 * p.k,
                    static_cast<blasint>(p.k), 0.0f, y, static_cast<blasint>(ldy));
}

inline void Gemm(const Tile& t, const Problem& p, const double* x, const double* w, double* y, int64_t ldy) {
  scipy_cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(t.rows), static_cast<blasint>(t.cols),
                    static_cast<blasint>(p.k), 1.0, x + t.row0 * p.k, static_cast<blasint>(p.k), w + t.col0 * p.k,
                    static_cast<blasint>(p.k), 0.0, y, static_cast<blasint>(ldy));
}

template <typename T>
inline T SquaredNorm(const T* v, int64_t k) {
  T sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += v[i] * v[i];
  return sum;
}

// y[i, j] holds x_i·w_j on entry and the Yat score on exit; nmn's operation order.
template <typename T>
inline void Epilogue(const Tile& t, const Problem& p, const T* x_sq, const T* b, const T* w_sq, T* y, int64_t ldy) {
  const T eps = static_cast<T>(p.eps);
  const T alpha = static_cast<T>(p.alpha);
  for (int64_t i = 0; i < t.rows; ++i) {
    T* row = y + i * ldy;
    const T xx = x_sq[i];
    const T* ww = w_sq + t.col0;
    const T* bb = b ? b + t.col0 : nullptr;
    for (int64_t j = 0; j < t.cols; ++j) {
      const T dot = row[j];
      const T z = bb ? dot + bb[j] : dot;
      const T dist = std::max(xx + ww[j] - T(2) * dot, T(0));
      row[j] = z * z / (dist + eps) * alpha;
    }
  }
}

template <typename T>
void NativeYatGemm(const Problem& p, const T* x, const T* w, const T* b, const T* w_sq, T* y,
                   const ParallelFor& parallel_for) {
  const std::vector<Tile> tiles = Tiles(p);
  parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t index) {
    const Tile& t = tiles[static_cast<size_t>(index)];
    std::vector<T> x_sq(static_cast<size_t>(t.rows));
    for (int64_t i = 0; i < t.rows; ++i) x_sq[static_cast<size_t>(i)] = SquaredNorm(x + (t.row0 + i) * p.k, p.k);
    T* out = y + t.row0 * p.n + t.col0;
    Gemm(t, p, x, w, out, p.n);
    Epilogue(t, p, x_sq.data(), b, w_sq, out, p.n);
  });
}

inline float Bf16ToFloat(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline uint16_t FloatToBf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if (std::isnan(value)) return static_cast<uint16_t>((word >> 16) | 0x40);  // keep it a NaN
  word += 0x7FFF + ((word >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(word >> 16);
}

inline float F16ToFloat(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

inline uint16_t FloatToF16(float value) {
  const _Float16 h = static_cast<_Float16>(value);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

inline float FiniteMax(Half type) {
  return type == Half::kFloat16 ? spec::kFloat16FiniteMax : spec::kBFloat16FiniteMax;
}

}  // namespace

void UseSingleThreadedBlas() {
  // The tasks, run on ONNX Runtime's thread pool, are the parallelism: one BLAS thread per task.
  scipy_openblas_set_num_threads(1);
}

void RowSquaredNorms(const float* w, int64_t n, int64_t k, float* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = SquaredNorm(w + j * k, k);
}

void RowSquaredNorms(const double* w, int64_t n, int64_t k, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = SquaredNorm(w + j * k, k);
}

void YatGemm(const Problem& p, const float* x, const float* w, const float* b, const float* w_sq, float* y,
             const ParallelFor& parallel_for) {
  NativeYatGemm(p, x, w, b, w_sq, y, parallel_for);
}

void YatGemm(const Problem& p, const double* x, const double* w, const double* b, const double* w_sq, double* y,
             const ParallelFor& parallel_for) {
  NativeYatGemm(p, x, w, b, w_sq, y, parallel_for);
}

float HalfToFloat(Half type, uint16_t bits) {
  return type == Half::kFloat16 ? F16ToFloat(bits) : Bf16ToFloat(bits);
}

uint16_t FloatToHalfSaturated(Half type, float value) {
  if (!std::isnan(value)) {
    const float limit = FiniteMax(type);
    value = std::min(std::max(value, -limit), limit);
  }
  return type == Half::kFloat16 ? FloatToF16(value) : FloatToBf16(value);
}

void YatGemmHalf(Half type, const Problem& p, const uint16_t* x, const float* w, const float* b, const float* w_sq,
                 uint16_t* y, const ParallelFor& parallel_for) {
  const std::vector<Tile> tiles = Tiles(p);
  parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t index) {
    const Tile& t = tiles[static_cast<size_t>(index)];
    std::vector<float> x_tile(static_cast<size_t>(t.rows * p.k));
    for (int64_t i = 0; i < t.rows * p.k; ++i) x_tile[static_cast<size_t>(i)] = HalfToFloat(type, x[t.row0 * p.k + i]);
    std::vector<float> x_sq(static_cast<size_t>(t.rows));
    for (int64_t i = 0; i < t.rows; ++i) x_sq[static_cast<size_t>(i)] = SquaredNorm(x_tile.data() + i * p.k, p.k);
    std::vector<float> out(static_cast<size_t>(t.rows * t.cols));
    Tile local = t;
    local.row0 = 0;  // x_tile starts at the tile's first row
    Gemm(local, p, x_tile.data(), w, out.data(), t.cols);
    Epilogue(t, p, x_sq.data(), b, w_sq, out.data(), t.cols);
    for (int64_t i = 0; i < t.rows; ++i) {
      uint16_t* dst = y + (t.row0 + i) * p.n + t.col0;
      const float* src = out.data() + i * t.cols;
      for (int64_t j = 0; j < t.cols; ++j) dst[j] = FloatToHalfSaturated(type, src[j]);
    }
  });
}

}  // namespace yat
