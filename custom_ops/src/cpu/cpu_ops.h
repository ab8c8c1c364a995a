// The CPU implementation's ONNX Runtime kernels (spec::kCpuDtypes on spec::kCpuProvider).
#pragma once

#include "common/yat_gemm_ort.h"

namespace yat {

// One op per dtype of spec::kCpuDtypes. The first call also makes OpenBLAS single-threaded (the kernels
// parallelise through ONNX Runtime's thread pool).
OpList CreateCpuKernels();

}  // namespace yat
