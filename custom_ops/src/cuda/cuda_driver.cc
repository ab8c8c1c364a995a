#include "cuda/cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

namespace yat::cuda {
namespace {

#define YAT_STRINGIFY_EXPANDED(x) YAT_STRINGIFY(x)
#define YAT_STRINGIFY(x) #x

std::string ErrorText(const Driver& driver, CUresult result, const std::string& what) {
  std::string text = what + " failed: CUresult " + std::to_string(static_cast<int>(result));
  const char* name = nullptr;
  const char* description = nullptr;
  if (driver.cuGetErrorName(result, &name) == CUDA_SUCCESS && name != nullptr) text += std::string(" ") + name;
  if (driver.cuGetErrorString(result, &description) == CUDA_SUCCESS && description != nullptr) {
    text += std::string(" (") + description + ")";
  }
  return text;
}

Driver LoadDriver() {
  // RTLD_NOLOAD first: ONNX Runtime's CUDA provider has normally loaded the driver already.
  void* handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (handle == nullptr) handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    throw CudaError(std::string("the NVIDIA driver's libcuda.so.1 can't be loaded (") + (why ? why : "unknown") +
                    "); the YatGemm CUDA kernels need an NVIDIA driver (r570 or newer)");
  }
  Driver driver;
  // Each member is named as cuda.h maps the function, so the name looked up is the ABI declared.
#define YAT_RESOLVE_DRIVER_FUNCTION(name)                                                                    \
  driver.name = reinterpret_cast<decltype(driver.name)>(dlsym(handle, YAT_STRINGIFY_EXPANDED(name)));        \
  if (driver.name == nullptr) {                                                                              \
    throw CudaError("the NVIDIA driver has no " YAT_STRINGIFY_EXPANDED(name) "; the YatGemm CUDA kernels need a " \
                    "driver of CUDA 12.8 (r570) or newer");                                                   \
  }
  YAT_CUDA_DRIVER_FUNCTIONS(YAT_RESOLVE_DRIVER_FUNCTION)
#undef YAT_RESOLVE_DRIVER_FUNCTION
  if (CUresult result = driver.cuInit(0); result != CUDA_SUCCESS) throw CudaError(ErrorText(driver, result, "cuInit"));
  return driver;
}

}  // namespace

const Driver& GetDriver() {
  // Not a function-local static initialised by LoadDriver: a failed load must be retried and reported
  // again, not turned into a permanently half-initialised object.
  static std::mutex mutex;
  static Driver driver;
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mutex);
  if (!loaded) {
    driver = LoadDriver();
    loaded = true;
  }
  return driver;
}

void Check(CUresult result, const std::string& what) {
  // A result comes from a driver call, so the driver is loaded by now.
  if (result != CUDA_SUCCESS) throw CudaError(ErrorText(GetDriver(), result, what));
}

ScopedStreamContext::ScopedStreamContext(CUstream stream) {
  const Driver& driver = GetDriver();
  Check(driver.cuStreamGetCtx(stream, &context_), "cuStreamGetCtx");
  if (context_ == nullptr) throw CudaError("ONNX Runtime's compute stream has no CUDA context");
  CUcontext current = nullptr;
  Check(driver.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
  if (current != context_) {
    Check(driver.cuCtxPushCurrent(context_), "cuCtxPushCurrent");
    pushed_ = true;
  }
  try {
    Check(driver.cuCtxGetDevice(&device_), "cuCtxGetDevice");
  } catch (...) {
    if (pushed_) {
      CUcontext popped = nullptr;
      driver.cuCtxPopCurrent(&popped);
    }
    throw;
  }
}

ScopedStreamContext::~ScopedStreamContext() {
  if (pushed_) {
    CUcontext popped = nullptr;
    GetDriver().cuCtxPopCurrent(&popped);  // nothing to do about a failure in a destructor
  }
}

}  // namespace yat::cuda
