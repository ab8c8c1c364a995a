// The YatGemm GPU kernels compiled ahead of time from Triton (yatdeploy/gpu/aot.py), as the ONNX Runtime
// CUDA op launches them: which artifact suits the device, which tile config and variant suit the
// problem, the workspace, and the launches (cuLaunchKernel with each entry's exact parameter order).
//
// Everything about the artifacts comes from yat_gemm_kernels.h, which the build generates from their
// manifest.json and yatdeploy/gpu/configs.py (yatdeploy/gpu/host_table.py). The artifacts themselves are
// read at run time from the gpu_kernels/ folder installed beside this library.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "yat_gemm_kernels.h"

namespace yat::gpu {

using gpu_kernels::Dtype;
using gpu_kernels::Kernel;
using gpu_kernels::Param;

// Which artifacts a device runs: the cubin of `arch` (80: sm_80 on compute capability 8.x; 90: sm_90a on
// 9.0 only), or, for a device no cubin was built for (9.x other than 9.0 without sm_90a, 10.x, 12.x...),
// the sm_80 PTX compiled by the driver's JIT.
struct ArchChoice {
  int arch = 0;
  bool ptx = false;
};
// Throws std::runtime_error for a device older than compute capability 8.0, or one nothing built fits.
ArchChoice ChooseArch(int cc_major, int cc_minor);
// ChooseArch for a device's compute capability (asked once per device).
ArchChoice DeviceArch(CUdevice device);

// configs.choose_config: an index into gpu_kernels::kConfigs.
int ChooseConfig(int64_t m, int64_t n, int64_t k, Dtype dtype);

// configs.split_k_slices: the slice count and the K elements per slice (whole K tiles).
struct SplitK {
  int64_t slices;
  int64_t k_per_slice;
};
SplitK SplitKSlices(int64_t k, const gpu_kernels::Config& config);

// The values an entry's parameters are read from, by Param, each in the type the kernel takes.
struct ArgValues {
  CUdeviceptr pointers[static_cast<int>(Param::kCount)] = {};
  int32_t i32[static_cast<int>(Param::kCount)] = {};
  float f32[static_cast<int>(Param::kCount)] = {};

  void* Address(Param p);
  uint64_t Bits(Param p) const;  // a pointer's or an integer's value (for the alignment check)
};

struct Problem {
  Dtype dtype;
  int64_t m, n, k;         // X [m, k], W [n, k], Y [m, n]: contiguous, row-major
  CUdeviceptr x, w, b, y;  // b is 0 when the node has no B (the kernels then get has_bias = 0)
  CUdeviceptr w_sq;        // |w|² (float32 [n]) when the caller keeps it for a constant W, else 0
  float eps, alpha;
};

struct Launch {
  int entry;  // index into gpu_kernels::kEntries
  unsigned grid[3];
};

struct Plan {
  int config = -1;
  ArchChoice arch;
  int64_t k_slices = 1;
  int64_t k_per_slice = 0;
  // float32 |w|² [n] (when the problem has none) and the split-K partial sums [k_slices, m, n] and
  // [k_slices, m], each at a 256-byte aligned offset.
  size_t workspace_bytes = 0;
  int launch_count = 0;
  Launch launches[3];
  ArgValues values;
};

// What to launch for `problem` on a device running `arch`, with `workspace_bytes` of device memory at
// `workspace` (plan once with workspace 0 to learn the size). norms_only: just |w|² into problem.w_sq.
// The aligned variant of a kernel is taken when every value it assumes divisible by 16 is; else the
// generic one. Throws std::runtime_error for sizes the kernels can't take (32-bit parameters, grid limits).
Plan MakePlan(const Problem& problem, ArchChoice arch, CUdeviceptr workspace, bool norms_only = false);

// Launches the plan on `stream`, whose context must be current. Each artifact is loaded on first use
// (cuLibraryLoadData) and each kernel's dynamic shared memory above 48 KiB opted into per context.
// Throws cuda::CudaError naming the failing driver call, or std::runtime_error for a missing artifact.
void RunPlan(const Plan& plan, CUstream stream);

// Where the artifacts are read from: $YATDEPLOY_GPU_KERNELS_DIR, else gpu_kernels/ beside this library.
std::string KernelsFolder();

}  // namespace yat::gpu
