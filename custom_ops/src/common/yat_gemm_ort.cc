// What every YatGemm kernel shares, whatever its provider: the attributes as the node carries them and the
// operands' shape checks.
#include "common/yat_gemm_ort.h"

#include <string>

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
