// What every YatGemm kernel shares, whatever its provider: the attributes as the node carries them and the
// operands' shape checks.
#include "common/yat_gemm_ort.h"

#include <algorithm>
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

namespace {
Ort::Status Invalid(const std::string& message) { return Ort::Status(message.c_str(), ORT_INVALID_ARGUMENT); }

int64_t Product(std::vector<int64_t>::const_iterator begin, std::vector<int64_t>::const_iterator end) {
  int64_t product = 1;
  for (auto it = begin; it != end; ++it) product *= *it;
  return product;
}
}  // namespace

bool AsMatrix(const std::vector<int64_t>& w, int64_t* n, int64_t* k) {
  if (w.size() < 2 || Product(w.begin(), w.end() - 2) != 1) return false;
  *n = w[w.size() - 2];
  *k = w.back();
  return true;
}

Ort::Status CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>* b,
                        Dims* dims, std::vector<int64_t>* y) {
  const bool batched_w = w.size() > 2;
  if (x.empty() || w.size() < 2 || x.back() != w.back() || (batched_w && x.size() < 2)) {
    return Invalid("YatGemm: X " + ShapeText(x) + " and W " + ShapeText(w) +
                   " do not fit [..., K] and [N, K], or batched [..., M, K] and [..., N, K]");
  }
  const int64_t n = w[w.size() - 2];
  if (b != nullptr && (b->size() != 1 || (*b)[0] != n)) {
    return Invalid("YatGemm: B is " + ShapeText(*b) + ", expected [" + std::to_string(n) + "]");
  }
  dims->k = w.back();
  dims->n = n;
  dims->batched = false;
  dims->x_slice.clear();
  dims->w_slice.clear();
  if (!batched_w) {
    dims->m = Product(x.begin(), x.end() - 1);
    *y = x;
    y->back() = n;
    return Ort::Status{nullptr};
  }
  // Batched: the leading dimensions (all but the last two) broadcast right-aligned, as numpy's and MatMul's do;
  // a missing or size-1 dimension of one side is stretched, with a slice stride of 0.
  const size_t x_lead = x.size() - 2, w_lead = w.size() - 2, lead = std::max(x_lead, w_lead);
  std::vector<int64_t> out(lead), x_stride(lead, 0), w_stride(lead, 0);
  int64_t x_step = 1, w_step = 1;
  for (size_t i = lead; i-- > 0;) {
    const size_t from_end = lead - i;  // 1 for the innermost leading dimension
    const int64_t xd = from_end <= x_lead ? x[x_lead - from_end] : 1;
    const int64_t wd = from_end <= w_lead ? w[w_lead - from_end] : 1;
    if (xd != wd && xd != 1 && wd != 1) {
      return Invalid("YatGemm: the leading dimensions of X " + ShapeText(x) + " and W " + ShapeText(w) +
                     " do not broadcast");
    }
    out[i] = xd == 1 ? wd : xd;
    x_stride[i] = xd == 1 ? 0 : x_step;
    w_stride[i] = wd == 1 ? 0 : w_step;
    x_step *= xd;
    w_step *= wd;
  }
  dims->m = x[x.size() - 2];
  y->assign(out.begin(), out.end());
  y->push_back(dims->m);
  y->push_back(n);
  if (w_step == 1) {  // one W for every slice: every row of X against it, the unbatched problem
    dims->m = Product(x.begin(), x.end() - 1);
    return Ort::Status{nullptr};
  }
  dims->batched = true;
  const int64_t batches = Product(out.begin(), out.end());
  dims->x_slice.resize(static_cast<size_t>(batches));
  dims->w_slice.resize(static_cast<size_t>(batches));
  std::vector<int64_t> index(lead, 0);
  int64_t xs = 0, ws = 0;
  for (int64_t s = 0; s < batches; ++s) {
    dims->x_slice[static_cast<size_t>(s)] = xs;
    dims->w_slice[static_cast<size_t>(s)] = ws;
    for (size_t i = lead; i-- > 0;) {  // the next index, innermost dimension fastest
      xs += x_stride[i];
      ws += w_stride[i];
      if (++index[i] < out[i]) break;
      xs -= x_stride[i] * out[i];
      ws -= w_stride[i] * out[i];
      index[i] = 0;
    }
  }
  return Ort::Status{nullptr};
}

}  // namespace yat
