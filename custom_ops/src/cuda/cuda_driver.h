// The CUDA driver API as the YatGemm CUDA op uses it, loaded at run time from the NVIDIA driver's
// libcuda.so.1 with dlopen instead of linked: the library then loads (and its host logic can be tested)
// on machines without a driver, and builds without the toolkit's libcuda stub, which pip-installed
// toolkits don't ship. cuda.h gives the types and the ABI: each function is looked up under the
// name cuda.h maps it to (cuCtxPushCurrent -> cuCtxPushCurrent_v2), with cuda.h's signature.
#pragma once

#include <cuda.h>

#include <stdexcept>
#include <string>

namespace yat::cuda {

#define YAT_CUDA_DRIVER_FUNCTIONS(X)                                                                   \
  X(cuInit)                                                                                            \
  X(cuGetErrorName)                                                                                    \
  X(cuGetErrorString)                                                                                  \
  X(cuStreamGetCtx)                                                                                    \
  X(cuCtxGetCurrent)                                                                                   \
  X(cuCtxPushCurrent)                                                                                  \
  X(cuCtxPopCurrent)                                                                                   \
  X(cuCtxGetDevice)                                                                                    \
  X(cuDeviceGetAttribute)                                                                              \
  X(cuLibraryLoadData)                                                                                 \
  X(cuLibraryUnload)                                                                                   \
  X(cuLibraryGetKernel)                                                                                \
  X(cuKernelGetFunction)                                                                               \
  X(cuFuncSetAttribute)                                                                                \
  X(cuLaunchKernel)                                                                                    \
  X(cuStreamSynchronize)

struct Driver {
#define YAT_DECLARE_DRIVER_FUNCTION(name) decltype(&::name) name = nullptr;
  YAT_CUDA_DRIVER_FUNCTIONS(YAT_DECLARE_DRIVER_FUNCTION)
#undef YAT_DECLARE_DRIVER_FUNCTION
};

// A failed driver call, or a driver that can't be loaded; the message says which and why.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// libcuda.so.1's functions, loaded and cuInit'ed on the first call; throws CudaError when the driver is
// missing or lacks a function (CUDA 12.0 drivers have all of them).
const Driver& GetDriver();

// Throws CudaError("<what> failed: CUDA_ERROR_NAME (description)") unless result is CUDA_SUCCESS.
void Check(CUresult result, const std::string& what);

// Makes the context of `stream` current for the scope (pushes it when another is current, pops it at the
// end); the stream ONNX Runtime gives a kernel belongs to the device's primary context.
class ScopedStreamContext {
 public:
  explicit ScopedStreamContext(CUstream stream);
  ~ScopedStreamContext();
  ScopedStreamContext(const ScopedStreamContext&) = delete;
  ScopedStreamContext& operator=(const ScopedStreamContext&) = delete;

  CUcontext context() const { return context_; }
  CUdevice device() const { return device_; }

 private:
  CUcontext context_ = nullptr;
  CUdevice device_ = 0;
  bool pushed_ = false;
};

}  // namespace yat::cuda
