// The ONNX Runtime kernels of yat.YatGemm (lite custom-op API), one struct per dtype and provider.
#pragma once

#include <memory>
#include <vector>

#include "onnxruntime_lite_custom_op.h"

namespace yat {

// eps and alpha as the node carries them (defaults from the spec).
struct Attributes {
  float eps;
  float alpha;
  static Attributes Read(const OrtKernelInfo* info);
};

// Checks X [..., K], W [N, K], B [N]; fills m, k, n and the output shape.
Ort::Status CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& w, const std::vector<int64_t>* b,
                        int64_t* m, int64_t* k, int64_t* n, std::vector<int64_t>* y);

using OpList = std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>;

// One op per admitted dtype (ONNX Runtime picks the kernel by the node's type).
OpList CreateCpuKernels();
#ifdef YATDEPLOY_WITH_CUDA
OpList CreateCudaKernels();
#endif

}  // namespace yat
