// CPU kernels of yat.YatGemm, one per dtype of spec::kCpuDtypes (yatdeploy/spec.py's IMPLEMENTATIONS["cpu"]:
// every dtype the op admits, because ONNX Runtime never falls back from a registered library to the
// model's function).
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
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
      if (shape.size() == 2) {
        constant_w_ = value.GetTensorData<T>();
        Prepare(constant_w_, shape[0], shape[1], &w_sq_, &packed_);
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
    auto [d, bias, out] = operands;
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
      if (shape.size() == 2) {
        constant_w_ = value.GetTensorData<T>();
        Prepare(constant_w_, shape[0], shape[1], &w_float_, &w_sq_);
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
    auto [d, bias, out] = operands;
    std::vector<float> w_float_run, w_sq_run;
    const std::vector<float>* w_float = &w_float_;
    const std::vector<float>* w_sq = &w_sq_;
    if (w.Data() != constant_w_) {
      Prepare(w.Data(), d.n, d.k, &w_float_run, &w_sq_run);
      w_float = &w_float_run;
      w_sq = &w_sq_run;
    }
    std::vector<float> b_float;
    if (bias != nullptr) {
      const auto* bits = reinterpret_cast<const uint16_t*>(bias);
      b_float.resize(static_cast<size_t>(d.n));
      for (int64_t j = 0; j < d.n; ++j) b_float[static_cast<size_t>(j)] = HalfToFloat(kType, bits[j]);
    }
    const Problem problem{d.m, d.k, d.n, attributes_.eps, attributes_.alpha};
    YatGemmHalf(kType, problem, reinterpret_cast<const uint16_t*>(x.Data()), w_float->data(),
                bias != nullptr ? b_float.data() : nullptr, w_sq->data(), reinterpret_cast<uint16_t*>(out),
                OrtParallelFor(context));
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
