// The CUDA implementation's ONNX Runtime kernels (spec::kCudaDtypes on spec::kCudaProvider): they launch the
// Triton kernels compiled ahead of time, through the CUDA driver API.
#pragma once

#include "common/yat_gemm_ort.h"

namespace yat {

// One op per dtype of spec::kCudaDtypes.
OpList CreateCudaKernels();

}  // namespace yat
