// Entry point ONNX Runtime calls when the library is registered: adds the yat domain with every kernel the
// library was built with (cpu/ always; cuda/ when built with YATDEPLOY_WITH_CUDA). Registration only: the
// kernels live in cpu/ and cuda/, what they share in common/.
#include <mutex>
#include <string>
#include <vector>

#include "common/yat_gemm_ort.h"
#include "cpu/cpu_ops.h"
#ifdef YATDEPLOY_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif
#include "yat_gemm_spec.h"

namespace {
std::mutex registry_mutex;

// Created once, on the first registration (after the API is initialised); shared by every session.
const yat::OpList& Kernels() {
  static const yat::OpList kernels = [] {
    yat::OpList all = yat::CreateCpuKernels();
#ifdef YATDEPLOY_WITH_CUDA
    for (auto& op : yat::CreateCudaKernels()) all.push_back(std::move(op));
#endif
    return all;
  }();
  return kernels;
}

// A domain must outlive the sessions it was added to.
std::vector<Ort::CustomOpDomain>& Domains() {
  static std::vector<Ort::CustomOpDomain> domains;
  return domains;
}
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An ONNX Runtime older than the headers the library was built with (e.g. an older Triton's): it has no
    // API of this version, but its first one can still carry the error instead of a crash.
    const OrtApi* first = api_base->GetApi(1);
    const std::string message = "yatdeploy's custom-op library needs ONNX Runtime 1." +
                                std::to_string(ORT_API_VERSION) + " or newer (its API version " +
                                std::to_string(ORT_API_VERSION) + "); this is ONNX Runtime " +
                                api_base->GetVersionString();
    return first != nullptr ? first->CreateStatus(ORT_FAIL, message.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  try {
    std::lock_guard<std::mutex> lock(registry_mutex);
    Ort::CustomOpDomain domain{yat::spec::kDomain};
    for (const auto& op : Kernels()) domain.Add(op.get());
    Ort::UnownedSessionOptions(options).Add(domain);
    Domains().push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::Status(e.what(), e.GetOrtErrorCode()).release();
  } catch (const std::exception& e) {
    return Ort::Status(e.what(), ORT_FAIL).release();
  }
  return nullptr;
}
