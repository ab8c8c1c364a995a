// CUDA kernels of yat.YatGemm for ONNX Runtime's CUDA execution provider, one per dtype of spec::kCudaDtypes
// (yatdeploy/spec.py's IMPLEMENTATIONS["cuda"]: float, float16, bfloat16).
// They launch the Triton kernels compiled ahead of time (yatdeploy/gpu/, cuda/gpu_kernels.{h,cc}) on the stream
// ONNX Runtime gives the kernel, and nothing else. A double node has no CUDA kernel here; yatdeploy's
// runtime routes such models to the library's CPU kernels or the function.
#include <cuda.h>

#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cuda/cuda_ops.h"
#include "cuda/cuda_driver.h"
#include "cuda/gpu_kernels.h"
#include "common/yat_gemm_ort.h"
#include "yat_gemm_spec.h"

namespace yat {
namespace {

using Ort::Custom::Tensor;

CUdeviceptr DevicePointer(const void* p) { return reinterpret_cast<CUdeviceptr>(p); }

// Device memory from ONNX Runtime's allocator for this input's device, given back when the scope ends.
// The scratch buffer is allocated on the kernel's stream and freed right after the launches are queued, as
// ONNX Runtime's own CUDA kernels free theirs: the CUDA arena orders reuse on the stream.
class Workspace {
 public:
  Workspace(OrtKernelContext* context, const OrtMemoryInfo* memory, size_t bytes) {
    if (bytes == 0) return;
    const OrtApi& api = Ort::GetApi();
    Ort::ThrowOnError(api.KernelContext_GetAllocator(context, memory, &allocator_));
    Ort::ThrowOnError(api.KernelContext_GetScratchBuffer(context, memory, bytes, &data_));
    if (data_ == nullptr) throw std::runtime_error("ONNX Runtime gave no workspace of " + std::to_string(bytes) + " bytes");
  }
  ~Workspace() {
    if (data_ != nullptr) allocator_->Free(allocator_, data_);
    if (allocator_ != nullptr) Ort::GetApi().ReleaseAllocator(allocator_);
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  CUdeviceptr pointer() const { return DevicePointer(data_); }

 private:
  OrtAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
};

template <typename T, gpu::Dtype kDtype>
struct CudaKernel {
  CudaKernel(const OrtApi* api, const OrtKernelInfo* info) : attributes_(Attributes::Read(info)) {
    // |w|² is kept per session when W is a constant initializer (ONNX Runtime says so at kernel creation):
    // computed on the first run into device memory from the session's allocator, reused after.
    int is_constant = 0;
    const OrtValue* value = nullptr;
    Ort::Status constant{api->KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &value)};
    if (constant.IsOK() && is_constant) {
      Ort::Status status{api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator_)};
      if (!status.IsOK()) allocator_ = nullptr;  // then |w|² is computed per run
    }
  }

  ~CudaKernel() {
    if (allocator_ != nullptr) {
      if (w_sq_ != nullptr) allocator_->Free(allocator_, w_sq_);
      Ort::GetApi().ReleaseAllocator(allocator_);
    }
  }

  Ort::Status Compute(OrtKernelContext* context, const Tensor<T>& x, const Tensor<T>& w,
                      std::optional<const Tensor<T>*> b, Tensor<T>& y) {
    Operands<T> operands;
    if (Ort::Status status = BeginCompute(x, w, b, y, &operands); !status.IsOK() || operands.Empty()) return status;
    const auto& [d, bias, out] = operands;
    try {
      Ort::KernelContext kernel_context(context);
      const auto stream = static_cast<CUstream>(kernel_context.GetGPUComputeStream());
      cuda::ScopedStreamContext scope(stream);
      const gpu::ArchChoice arch = gpu::DeviceArch(scope.device());
      gpu::Problem problem{kDtype,
                           d.m,
                           d.n,
                           d.k,
                           DevicePointer(x.Data()),
                           DevicePointer(w.Data()),
                           DevicePointer(bias),
                           DevicePointer(out),
                           0,
                           attributes_.eps,
                           attributes_.alpha};
      const Ort::ConstMemoryInfo memory = kernel_context.GetInput(0).GetTensorMemoryInfo();
      if (d.batched) {
        RunSlices(context, memory, d, problem, arch, stream);
        return Ort::Status{nullptr};
      }
      problem.w_sq = CachedRowNorms(problem, arch, stream);
      const size_t bytes = gpu::MakePlan(problem, arch, 0).workspace_bytes;
      Workspace workspace(context, memory, bytes);
      gpu::RunPlan(gpu::MakePlan(problem, arch, workspace.pointer()), stream);
    } catch (const std::exception& error) {
      return Ort::Status((std::string("YatGemm (CUDA): ") + error.what()).c_str(), ORT_EP_FAIL);
    }
    return Ort::Status{nullptr};
  }

  // Batched W: the 2-D kernels launched once per slice of Y, on the slices' pointers (a broadcast dimension points
  // at the same slice again), one after another on the stream, which orders their reuse of one workspace (|w|² of
  // the slice and any split-K sums). Every slice has the same M, N and K, hence the same plan apart from its
  // pointers (each plan still picks the aligned variant only where the slice's pointers allow it). A batched grid,
  // all slices in one launch, is future work: the kernels take one 2-D problem (yatdeploy/gpu/kernel.py).
  static void RunSlices(OrtKernelContext* context, const Ort::ConstMemoryInfo& memory, const Dims& d,
                        gpu::Problem problem, gpu::ArchChoice arch, CUstream stream) {
    const CUdeviceptr x = problem.x, w = problem.w, y = problem.y;
    const auto bytes = [](int64_t elements) { return static_cast<CUdeviceptr>(elements) * sizeof(T); };
    Workspace workspace(context, memory, gpu::MakePlan(problem, arch, 0).workspace_bytes);
    for (int64_t s = 0; s < d.Batches(); ++s) {
      problem.x = x + bytes(d.x_slice[static_cast<size_t>(s)] * d.m * d.k);
      problem.w = w + bytes(d.w_slice[static_cast<size_t>(s)] * d.n * d.k);
      problem.y = y + bytes(s * d.m * d.n);
      gpu::RunPlan(gpu::MakePlan(problem, arch, workspace.pointer()), stream);
    }
  }

  // |w|² of the constant W, computed once (on the first run's stream, then synchronised, so that runs on
  // other streams may read it); 0 when W is not constant or not the tensor first seen (then per run).
  CUdeviceptr CachedRowNorms(const gpu::Problem& problem, gpu::ArchChoice arch, CUstream stream) {
    if (allocator_ == nullptr) return 0;
    std::lock_guard<std::mutex> lock(mutex_);
    if (w_sq_ != nullptr) return problem.w == w_sq_for_ && problem.n == w_sq_rows_ ? DevicePointer(w_sq_) : 0;
    void* buffer = allocator_->Alloc(allocator_, static_cast<size_t>(problem.n) * sizeof(float));
    if (buffer == nullptr) return 0;
    try {
      gpu::Problem norms = problem;
      norms.w_sq = DevicePointer(buffer);
      gpu::RunPlan(gpu::MakePlan(norms, arch, 0, /*norms_only=*/true), stream);
      cuda::Check(cuda::GetDriver().cuStreamSynchronize(stream), "cuStreamSynchronize (|w|² of the constant W)");
    } catch (...) {
      allocator_->Free(allocator_, buffer);
      throw;
    }
    w_sq_ = buffer;
    w_sq_for_ = problem.w;
    w_sq_rows_ = problem.n;
    return DevicePointer(w_sq_);
  }

  Attributes attributes_;
  OrtAllocator* allocator_ = nullptr;  // set only when W is a constant initializer
  std::mutex mutex_;
  void* w_sq_ = nullptr;
  CUdeviceptr w_sq_for_ = 0;
  int64_t w_sq_rows_ = 0;
};

// The kernel of each ONNX element type the GPU kernels were compiled for; spec::kCudaDtypes says which are
// registered (a listed dtype without a specialisation here, e.g. double, fails the build).
template <spec::ElemType>
struct CudaKernelFor;
template <>
struct CudaKernelFor<spec::ElemType::kFloat> {
  using type = CudaKernel<float, gpu::Dtype::kFloat32>;
};
template <>
struct CudaKernelFor<spec::ElemType::kFloat16> {
  using type = CudaKernel<Ort::Float16_t, gpu::Dtype::kFloat16>;
};
template <>
struct CudaKernelFor<spec::ElemType::kBFloat16> {
  using type = CudaKernel<Ort::BFloat16_t, gpu::Dtype::kBFloat16>;
};

}  // namespace

OpList CreateCudaKernels() { return CreateKernels<CudaKernelFor, spec::kCudaDtypes>(spec::kCudaProvider); }

}  // namespace yat
