// CPU kernels of yat.YatGemm, one per dtype of spec::kCpuDtypes (yatdeploy/spec.py's IMPLEMENTATIONS["cpu"]:
// every dtype the op admits, because ONNX Runtime never falls back from a registered library to the
// model's function).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/yat_gemm_avx512.h"
#include "cpu/yat_gemm_cpu.h"
#include "common/yat_gemm_ort.h"
#include "yat_gemm_spec.h"

namespace yat {
namespace {

using Ort::Custom::Tensor;

ParallelFor OrtParallelFor(OrtKernelContext* context) {
  return [context](int64_t count, const std::function<void(int64_t)>& task) {
    if (count <= 1) {
      for (int64_t i = 0; i < count; ++i) task(i);
      return;
    }
    auto trampoline = [](void* data, size_t index) {
      (*static_cast<const std::function<void(int64_t)>*>(data))(static_cast<int64_t>(index));
    };
    Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(
        context, trampoline, static_cast<size_t>(count), 0, const_cast<std::function<void(int64_t)>*>(&task)));
  };
}

void SerialFor(int64_t count, const std::function<void(int64_t)>& task) {
  for (int64_t i = 0; i < count; ++i) task(i);
}

int64_t Workers() { return std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency())); }

// Below this many multiply-adds a batched product runs on the calling thread: a pool round trip costs more than
// the second core saves (attention at decode with a short past).
constexpr int64_t kBatchedSerialWork = int64_t{1} << 18;

// Runs slice(s, inner) for each slice s of a batched problem: across the pool, each slice on one thread, when there
// are slices for every worker; else one slice after another, each cut into tasks on the pool (`inner`).
void ForEachSlice(const Dims& d, const ParallelFor& pool_for,
                  const std::function<void(int64_t, const ParallelFor&)>& slice) {
  const int64_t batches = d.Batches();
  const ParallelFor serial = SerialFor;
  if (batches * d.m * d.n * d.k < kBatchedSerialWork) {
    for (int64_t s = 0; s < batches; ++s) slice(s, serial);
  } else if (batches >= Workers()) {
    pool_for(batches, [&](int64_t s) { slice(s, serial); });
  } else {
    for (int64_t s = 0; s < batches; ++s) slice(s, pool_for);
  }
}

// The slices' operands: X's, W's and Y's first element of slice s.
template <typename T>
struct Slices {
  const Dims& d;
  const T* x;
  const T* w;
  T* y;
  const T* X(int64_t s) const { return x + d.x_slice[static_cast<size_t>(s)] * d.m * d.k; }
  const T* W(int64_t s) const { return w + d.w_slice[static_cast<size_t>(s)] * d.n * d.k; }
  T* Y(int64_t s) const { return y + s * d.m * d.n; }
};

// W as a constant initializer, if it is one: lets a kernel prepare W once per session.
const OrtValue* ConstantWeight(const OrtApi* api, const OrtKernelInfo* info) {
  int is_constant = 0;
  const OrtValue* value = nullptr;
  Ort::Status status{api->KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &value)};
  return status.IsOK() && is_constant ? value : nullptr;
}

// float32 uses the AVX-512 micro-kernel where the CPU has it, unless YATDEPLOY_CPU_KERNEL=blas asks for
// the OpenBLAS path (which the tests use to check both).
bool UseAvx512ForFloat() {
  const char* choice = std::getenv("YATDEPLOY_CPU_KERNEL");
  if (choice != nullptr && std::string(choice) == "blas") return false;
  return CpuHasAvx512();
}

template <typename T>
struct NativeKernel {  // float and double
  static constexpr bool kIsFloat = std::is_same_v<T, float>;

  NativeKernel(const OrtApi* api, const OrtKernelInfo* info)
      : attributes_(Attributes::Read(info)), avx512_(kIsFloat && UseAvx512ForFloat()) {
    if (const OrtValue* w = ConstantWeight(api, info)) {
      Ort::ConstValue value(w);
      const auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
      int64_t n = 0, k = 0;
      if (AsMatrix(shape, &n, &k)) {  // a constant batched W of several slices is prepared per run
        constant_w_ = value.GetTensorData<T>();
        Prepare(constant_w_, n, k, &w_sq_, &packed_);
      }
    }
  }

  void Prepare(const T* w, int64_t n, int64_t k, std::vector<T>* w_sq, PackedWeights* packed) const {
    if constexpr (kIsFloat) {
      if (avx512_) {
        PackWeights(w, n, k, packed);
        return;
      }
    }
    w_sq->resize(static_cast<size_t>(n));
    RowSquaredNorms(w, n, k, w_sq->data());
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& x, const Tensor<T>& w,
                      std::optional<const Tensor<T>*> b, Tensor<T>& y) {
    Operands<T> operands;
    if (Ort::Status status = BeginCompute(x, w, b, y, &operands); !status.IsOK() || operands.Empty()) return status;
    const auto& [d, bias, out] = operands;
    if (d.batched) return ComputeBatched(context, Slices<T>{d, x.Data(), w.Data(), out}, bias);
    std::vector<T> w_sq_run;
    PackedWeights packed_run;
    const std::vector<T>* w_sq = &w_sq_;
    const PackedWeights* packed = &packed_;
    if (w.Data() != constant_w_) {  // W is not the initializer seen at session creation
      Prepare(w.Data(), d.n, d.k, &w_sq_run, &packed_run);
      w_sq = &w_sq_run;
      packed = &packed_run;
    }
    const Problem problem{d.m, d.k, d.n, attributes_.eps, attributes_.alpha};
    if constexpr (kIsFloat) {
      if (avx512_) {
        YatGemmAvx512(problem, x.Data(), *packed, bias, out, OrtParallelFor(context));
        return Ort::Status{nullptr};
      }
    }
    YatGemm(problem, x.Data(), w.Data(), bias, w_sq->data(), out, OrtParallelFor(context));
    return Ort::Status{nullptr};
  }

  // Batched W: every slice's W is seen once, so it is prepared per slice, on the thread that computes it.
  Ort::Status ComputeBatched(OrtKernelContext* context, const Slices<T>& slices, const T* bias) const {
    const Dims& d = slices.d;
    const Problem problem{d.m, d.k, d.n, attributes_.eps, attributes_.alpha};
    const ParallelFor pool_for = OrtParallelFor(context);
    if constexpr (kIsFloat) {
      if (avx512_ && d.m <= kAvx512FewRows) {
        // Few rows (decode): no packing; tasks of whole slices, or of column blocks when slices are few.
        const int64_t blocks = d.Batches() >= Workers() ? 1 : std::min(Workers(), (d.n + 255) / 256);
        const int64_t cols = (d.n + blocks - 1) / blocks;
        const auto task = [&](int64_t t) {
          const int64_t s = t / blocks, col0 = (t % blocks) * cols;
          Problem part = problem;
          part.n = std::min(cols, d.n - col0);
          YatGemmAvx512Rows(part, slices.X(s), slices.W(s) + col0 * d.k, bias ? bias + col0 : nullptr,
                            slices.Y(s) + col0, d.n);
        };
        const int64_t tasks = d.Batches() * blocks;
        if (d.Batches() * d.m * d.n * d.k < kBatchedSerialWork) {
          SerialFor(tasks, task);
        } else {
          pool_for(tasks, task);
        }
        return Ort::Status{nullptr};
      }
    }
    ForEachSlice(d, pool_for, [&](int64_t s, const ParallelFor& inner) {
      std::vector<T> w_sq;
      PackedWeights packed;
      Prepare(slices.W(s), d.n, d.k, &w_sq, &packed);
      if constexpr (kIsFloat) {
        if (avx512_) {
          YatGemmAvx512(problem, slices.X(s), packed, bias, slices.Y(s), inner);
          return;
        }
      }
      YatGemm(problem, slices.X(s), slices.W(s), bias, w_sq.data(), slices.Y(s), inner);
    });
    return Ort::Status{nullptr};
  }

  Attributes attributes_;
  bool avx512_;
  const T* constant_w_ = nullptr;
  std::vector<T> w_sq_;
  PackedWeights packed_;  // float with AVX-512 only
};

template <typename T, Half kType>
struct HalfKernel {  // Ort::Float16_t and Ort::BFloat16_t: float32 arithmetic
  HalfKernel(const OrtApi* api, const OrtKernelInfo* info) : attributes_(Attributes::Read(info)) {
    if (const OrtValue* w = ConstantWeight(api, info)) {
      Ort::ConstValue value(w);
      const auto shape = value.GetTensorTypeAndShapeInfo().GetShape();
      int64_t n = 0, k = 0;
      if (AsMatrix(shape, &n, &k)) {
        constant_w_ = value.GetTensorData<T>();
        Prepare(constant_w_, n, k, &w_float_, &w_sq_);
      }
    }
  }

  static void Prepare(const T* w, int64_t n, int64_t k, std::vector<float>* w_float, std::vector<float>* w_sq) {
    const auto* bits = reinterpret_cast<const uint16_t*>(w);
    w_float->resize(static_cast<size_t>(n * k));
    for (int64_t i = 0; i < n * k; ++i) (*w_float)[static_cast<size_t>(i)] = HalfToFloat(kType, bits[i]);
    w_sq->resize(static_cast<size_t>(n));
    RowSquaredNorms(w_float->data(), n, k, w_sq->data());
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& x, const Tensor<T>& w,
                      std::optional<const Tensor<T>*> b, Tensor<T>& y) {
    Operands<T> operands;
    if (Ort::Status status = BeginCompute(x, w, b, y, &operands); !status.IsOK() || operands.Empty()) return status;
    const auto& [d, bias, out] = operands;
    std::vector<float> b_float;
    if (bias != nullptr) {
      const auto* bits = reinterpret_cast<const uint16_t*>(bias);
      b_float.resize(static_cast<size_t>(d.n));
      for (int64_t j = 0; j < d.n; ++j) b_float[static_cast<size_t>(j)] = HalfToFloat(kType, bits[j]);
    }
    const float* b_data = bias != nullptr ? b_float.data() : nullptr;
    const Problem problem{d.m, d.k, d.n, attributes_.eps, attributes_.alpha};
    if (d.batched) {  // each slice's W converted on the thread that computes the slice
      const Slices<uint16_t> slices{d, reinterpret_cast<const uint16_t*>(x.Data()),
                                    reinterpret_cast<const uint16_t*>(w.Data()), reinterpret_cast<uint16_t*>(out)};
      ForEachSlice(d, OrtParallelFor(context), [&](int64_t s, const ParallelFor& inner) {
        std::vector<float> w_float, w_sq;
        Prepare(reinterpret_cast<const T*>(slices.W(s)), d.n, d.k, &w_float, &w_sq);
        YatGemmHalf(kType, problem, slices.X(s), w_float.data(), b_data, w_sq.data(), slices.Y(s), inner);
      });
      return Ort::Status{nullptr};
    }
    std::vector<float> w_float_run, w_sq_run;
    const std::vector<float>* w_float = &w_float_;
    const std::vector<float>* w_sq = &w_sq_;
    if (w.Data() != constant_w_) {
      Prepare(w.Data(), d.n, d.k, &w_float_run, &w_sq_run);
      w_float = &w_float_run;
      w_sq = &w_sq_run;
    }
    YatGemmHalf(kType, problem, reinterpret_cast<const uint16_t*>(x.Data()), w_float->data(), b_data, w_sq->data(),
                reinterpret_cast<uint16_t*>(out), OrtParallelFor(context));
    return Ort::Status{nullptr};
  }

  Attributes attributes_;
  const T* constant_w_ = nullptr;
  std::vector<float> w_float_;
  std::vector<float> w_sq_;
};

// The kernel of each ONNX element type; spec::kCpuDtypes says which are registered.
template <spec::ElemType>
struct CpuKernelFor;
template <>
struct CpuKernelFor<spec::ElemType::kFloat> {
  using type = NativeKernel<float>;
};
template <>
struct CpuKernelFor<spec::ElemType::kDouble> {
  using type = NativeKernel<double>;
};
template <>
struct CpuKernelFor<spec::ElemType::kFloat16> {
  using type = HalfKernel<Ort::Float16_t, Half::kFloat16>;
};
template <>
struct CpuKernelFor<spec::ElemType::kBFloat16> {
  using type = HalfKernel<Ort::BFloat16_t, Half::kBFloat16>;
};

}  // namespace

OpList CreateCpuKernels() {
  UseSingleThreadedBlas();
  return CreateKernels<CpuKernelFor, spec::kCpuDtypes>(spec::kCpuProvider);
}

}  // namespace yat
