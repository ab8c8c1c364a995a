// Entry point ONNX Runtime calls when the library is registered: adds the yat domain's kernels.
#include <mutex>
#include <string>

#include "yat_gemm_cpu.h"
#include "yat_gemm_ort.h"
#include "yat_gemm_spec.h"

namespace yat {

Attributes Attributes::Read(const OrtKernelInfo* info) {
  Attributes attributes{spec::kDefaultEps, spec::kDefaultAlpha};
  float value = 0;
  // A missing attribute is an error status: take the spec's default then.
  if (Ort::Status status{Ort::GetApi().KernelInfoGetAttribute_float(info, spec::kEpsAttribute, &value)}; status.IsOK()) {
    attributes.eps = value;
  }
  if (Ort::Status status{Ort::GetApi().KernelInfoGetAttribute_float(info, spec::kAlphaAttribute, &value)}; status.IsOK()) {
    attributes.alpha = value;
  }
  return attributes;
}

namespace {
std::string ShapeText(const std::vector<int64_t>& shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + "]";
}
}  // namespace

Ort::Status CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>* b,
                        int64_t* m, int64_t* k, int64_t* n, std::vector<int64_t>* y) {
  if (x.empty() || w.size() != 2 || x.back() != w[1]) {
    return Ort::Status(("YatGemm: X " + ShapeText(x) + " and W " + ShapeText(w) + " do not fit [..., K] and [N, K]").c_str(),
                       ORT_INVALID_ARGUMENT);
  }
  if (b != nullptr && (b->size() != 1 || (*b)[0] != w[0])) {
    return Ort::Status(("YatGemm: B is " + ShapeText(*b) + ", expected [" + std::to_string(w[0]) + "]").c_str(),
                       ORT_INVALID_ARGUMENT);
  }
  *k = w[1];
  *n = w[0];
  *m = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) *m *= x[i];
  *y = x;
  y->back() = *n;
  return Ort::Status{nullptr};
}

}  // namespace yat

namespace {
std::mutex registry_mutex;

// Created once, on the first registration (after the API is initialised); shared by every session.
const yat::OpList& Kernels() {
  static const yat::OpList kernels = [] {
    yat::UseSingleThreadedBlas();
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
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
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
