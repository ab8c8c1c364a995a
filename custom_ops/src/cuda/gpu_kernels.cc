#include "cuda/gpu_kernels.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "cuda/cuda_driver.h"
#include "yat_gemm_spec.h"

namespace yat::gpu {

using gpu_kernels::Config;
using gpu_kernels::Entry;
using gpu_kernels::kConfigs;
using gpu_kernels::kEntries;
using gpu_kernels::kEntryCount;
using gpu_kernels::ParamKind;

namespace {

constexpr size_t kWorkspaceAlignment = 256;
// Kernels asking for more dynamic shared memory than this must opt in (cuFuncSetAttribute).
constexpr unsigned kDefaultSharedMemoryLimit = 48 * 1024;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t AlignUp(size_t bytes) { return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment; }

const char* ParamName(Param p) { return gpu_kernels::kParamNames[static_cast<int>(p)]; }

int32_t ToInt32(int64_t value, const char* what) {
  if (value < 0 || value > std::numeric_limits<int32_t>::max()) {
    throw std::runtime_error(std::string(what) + " = " + std::to_string(value) +
                             " does not fit the kernels' 32-bit parameters");
  }
  return static_cast<int32_t>(value);
}

bool HasArch(int arch) {
  for (int i = 0; i < kEntryCount; ++i) {
    if (kEntries[i].arch == arch) return true;
  }
  return false;
}

int FindEntry(Kernel kernel, int arch, Dtype dtype, int config, bool aligned) {
  for (int i = 0; i < kEntryCount; ++i) {
    const Entry& e = kEntries[i];
    if (e.kernel == kernel && e.arch == arch && e.dtype == dtype && e.config == config && e.aligned == aligned) {
      return i;
    }
  }
  return -1;
}

bool HintsHold(const Entry& e, const ArgValues& values) {
  for (int p = 0; p < static_cast<int>(Param::kCount); ++p) {
    if ((e.divisible_by_16 >> p & 1u) && values.Bits(static_cast<Param>(p)) % 16 != 0) return false;
  }
  return true;
}

// The aligned entry when its divisibility assumptions hold, else the generic one.
int SelectEntry(Kernel kernel, int arch, Dtype dtype, int config, const ArgValues& values) {
  const int aligned = FindEntry(kernel, arch, dtype, config, true);
  if (aligned >= 0 && HintsHold(kEntries[aligned], values)) return aligned;
  const int generic = FindEntry(kernel, arch, dtype, config, false);
  if (generic < 0) {
    throw std::runtime_error(std::string("no ") + (aligned >= 0 ? "generic " : "") +
                             gpu_kernels::kKernelNames[static_cast<int>(kernel)] + " kernel was built for sm_" +
                             std::to_string(arch) + ", " + gpu_kernels::kDtypeNames[static_cast<int>(dtype)] +
                             (config >= 0 ? std::string(", ") + kConfigs[config].name : std::string()));
  }
  if (!HintsHold(kEntries[generic], values)) {
    throw std::runtime_error(std::string(kEntries[generic].entry) + ": a value its build assumes divisible by 16 is not");
  }
  return generic;
}

Launch MakeLaunch(int entry, const Plan& plan, int64_t m, int64_t n) {
  Launch launch{entry, {1, 1, 1}};
  for (int d = 0; d < 3; ++d) {
    const gpu_kernels::GridDim& g = kEntries[entry].grid[d];
    int64_t size = 1;
    if (g.cdiv_m) size *= CeilDiv(m, g.cdiv_m);
    if (g.cdiv_n) size *= CeilDiv(n, g.cdiv_n);
    if (g.times_k_slices) size *= plan.k_slices;
    if (size > (d == 0 ? kMaxGridX : kMaxGridYZ)) {
      throw std::runtime_error(std::string(kEntries[entry].entry) + ": grid dimension " + std::to_string(d) + " = " +
                               std::to_string(size) + " is beyond CUDA's limit");
    }
    launch.grid[d] = static_cast<unsigned>(size);
  }
  return launch;
}

std::string ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error(path + " can't be read: the GPU kernels are installed in gpu_kernels/ beside the "
                             "library (or set YATDEPLOY_GPU_KERNELS_DIR to their folder)");
  }
  return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

// Process-wide: each artifact is loaded once (cuLibraryLoadData gives a context-independent library);
// each kernel's function is looked up, and its shared-memory limit raised, once per context.
class Loader {
 public:
  static Loader& Instance() {
    static Loader* loader = new Loader();  // never destroyed: sessions may outlive static destruction
    return *loader;
  }

  CUfunction Function(int entry, bool ptx, CUcontext context) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto key = std::make_tuple(entry, ptx, context);
    if (auto found = functions_.find(key); found != functions_.end()) return found->second;
    const cuda::Driver& driver = cuda::GetDriver();
    const Entry& e = kEntries[entry];
    CUkernel kernel = Kernel(e, ptx);
    CUfunction function = nullptr;
    cuda::Check(driver.cuKernelGetFunction(&function, kernel), std::string("cuKernelGetFunction(") + e.entry + ")");
    if (e.shared_memory_bytes > kDefaultSharedMemoryLimit) {
      cuda::Check(driver.cuFuncSetAttribute(function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                            static_cast<int>(e.shared_memory_bytes)),
                  std::string("cuFuncSetAttribute(") + e.entry + ", MAX_DYNAMIC_SHARED_SIZE_BYTES = " +
                      std::to_string(e.shared_memory_bytes) + ")");
    }
    functions_.emplace(key, function);
    return function;
  }

 private:
  CUkernel Kernel(const Entry& e, bool ptx) {
    const std::string file = ptx ? e.ptx : e.cubin;
    auto found = kernels_.find(file);
    if (found != kernels_.end()) return found->second;
    const cuda::Driver& driver = cuda::GetDriver();
    const std::string path = KernelsFolder() + "/" + file;
    const std::string image = ReadFile(path);  // PTX: NUL-terminated by c_str()
    CUlibrary library = nullptr;
    cuda::Check(driver.cuLibraryLoadData(&library, image.c_str(), nullptr, nullptr, 0, nullptr, nullptr, 0),
                "cuLibraryLoadData(" + path + ")");
    CUkernel kernel = nullptr;
    cuda::Check(driver.cuLibraryGetKernel(&kernel, library, e.entry),
                std::string("cuLibraryGetKernel(") + file + ", " + e.entry + ")");
    kernels_.emplace(file, kernel);  // the library stays loaded for the life of the process
    return kernel;
  }

  std::mutex mutex_;
  std::map<std::string, CUkernel> kernels_;
  std::map<std::tuple<int, bool, CUcontext>, CUfunction> functions_;
};

}  // namespace

void* ArgValues::Address(Param p) {
  const int i = static_cast<int>(p);
  switch (gpu_kernels::kParamKinds[i]) {
    case ParamKind::kPointer:
      return &pointers[i];
    case ParamKind::kI32:
      return &i32[i];
    case ParamKind::kF32:
      return &f32[i];
  }
  return nullptr;
}

uint64_t ArgValues::Bits(Param p) const {
  const int i = static_cast<int>(p);
  switch (gpu_kernels::kParamKinds[i]) {
    case ParamKind::kPointer:
      return pointers[i];
    case ParamKind::kI32:
      return static_cast<uint32_t>(i32[i]);
    case ParamKind::kF32:
      return 0;  // never assumed divisible
  }
  return 0;
}

ArchChoice ChooseArch(int cc_major, int cc_minor) {
  const std::string cc = std::to_string(cc_major) + "." + std::to_string(cc_minor);
  if (cc_major < 8) {
    throw std::runtime_error("the YatGemm GPU kernels need compute capability 8.0 or newer; this GPU has " + cc);
  }
  if (cc_major == 9 && cc_minor == 0 && HasArch(90)) return {90, false};  // sm_90a: wgmma
  if (cc_major == 8 && HasArch(80)) return {80, false};                   // sm_80 cubins run on every 8.x
  if (HasArch(80)) return {80, true};                                      // newer: the driver JITs the PTX
  throw std::runtime_error("no YatGemm GPU kernel was built for compute capability " + cc +
                           " (the build made sm_90a only, which runs on 9.0 only)");
}

ArchChoice DeviceArch(CUdevice device) {
  static std::mutex mutex;
  static std::map<CUdevice, ArchChoice> known;
  std::lock_guard<std::mutex> lock(mutex);
  if (auto found = known.find(device); found != known.end()) return found->second;
  const cuda::Driver& driver = cuda::GetDriver();
  int major = 0;
  int minor = 0;
  cuda::Check(driver.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device),
              "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)");
  cuda::Check(driver.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device),
              "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)");
  const ArchChoice choice = ChooseArch(major, minor);
  known.emplace(device, choice);
  return choice;
}

int ChooseConfig(int64_t m, int64_t n, int64_t k, Dtype dtype) {
  for (const gpu_kernels::ChoiceRule& rule : gpu_kernels::kChoiceRules) {
    if ((rule.max_m < 0 || m <= rule.max_m) &&
        (rule.max_n_tiles < 0 || CeilDiv(n, kConfigs[rule.config].block_n) <= rule.max_n_tiles) &&
        (rule.min_k < 0 || k >= rule.min_k) && (rule.dtype < 0 || rule.dtype == static_cast<int>(dtype))) {
      return rule.config;
    }
  }
  return gpu_kernels::kChoiceRules[gpu_kernels::kChoiceRuleCount - 1].config;  // unconditional by construction
}

SplitK SplitKSlices(int64_t k, const Config& config) {
  const int64_t k_tiles = std::max<int64_t>(CeilDiv(k, config.block_k), 1);
  const int64_t tiles_per_slice = CeilDiv(k_tiles, config.split_k);
  return {CeilDiv(k_tiles, tiles_per_slice), tiles_per_slice * config.block_k};
}

Plan MakePlan(const Problem& p, ArchChoice arch, CUdeviceptr workspace, bool norms_only) {
  Plan plan;
  plan.arch = arch;
  plan.config = ChooseConfig(p.m, p.n, p.k, p.dtype);
  const Config& config = kConfigs[plan.config];
  const bool split = config.split_k > 1 && !norms_only;
  if (split) {
    const SplitK s = SplitKSlices(p.k, config);
    plan.k_slices = s.slices;
    plan.k_per_slice = s.k_per_slice;
  }

  // The workspace: |w|² when the problem has none, then the split-K partial sums.
  CUdeviceptr w_sq = p.w_sq;
  size_t offset = 0;
  if (w_sq == 0) {
    if (norms_only) throw std::runtime_error("MakePlan: norms_only needs the w_sq buffer to fill");
    w_sq = workspace + offset;
    offset += AlignUp(static_cast<size_t>(p.n) * sizeof(float));
  }
  CUdeviceptr partial_dot = 0;
  CUdeviceptr partial_x_sq = 0;
  if (split) {
    partial_dot = workspace + offset;
    offset += AlignUp(static_cast<size_t>(plan.k_slices * p.m * p.n) * sizeof(float));
    partial_x_sq = workspace + offset;
    offset += AlignUp(static_cast<size_t>(plan.k_slices * p.m) * sizeof(float));
  }
  plan.workspace_bytes = offset;

  ArgValues& v = plan.values;
  auto set_pointer = [&v](Param param, CUdeviceptr value) { v.pointers[static_cast<int>(param)] = value; };
  auto set_i32 = [&v](Param param, int64_t value) { v.i32[static_cast<int>(param)] = ToInt32(value, ParamName(param)); };
  set_pointer(Param::kX, p.x);
  set_pointer(Param::kW, p.w);
  set_pointer(Param::kB, p.b);
  set_pointer(Param::kWSq, w_sq);
  set_pointer(Param::kY, p.y);
  set_pointer(Param::kPartialDot, partial_dot);
  set_pointer(Param::kPartialXSq, partial_x_sq);
  set_i32(Param::kM, p.m);
  set_i32(Param::kN, p.n);
  set_i32(Param::kK, p.k);
  set_i32(Param::kKPerSlice, plan.k_per_slice);
  set_i32(Param::kKSlices, plan.k_slices);
  set_i32(Param::kStrideXm, p.k);
  set_i32(Param::kStrideWn, p.k);
  set_i32(Param::kStrideYm, p.n);
  set_i32(Param::kHasBias, p.b != 0 ? 1 : 0);
  v.f32[static_cast<int>(Param::kEps)] = p.eps;
  v.f32[static_cast<int>(Param::kAlpha)] = p.alpha;
  // Output tiles: the kernels' program ids are 32-bit.
  ToInt32(CeilDiv(p.m, config.block_m) * CeilDiv(p.n, config.block_n), "the number of output tiles");

  auto add = [&](Kernel kernel, int config_index) {
    const int entry = SelectEntry(kernel, arch.arch, p.dtype, config_index, v);
    plan.launches[plan.launch_count++] = MakeLaunch(entry, plan, p.m, p.n);
  };
  if (p.w_sq == 0 || norms_only) add(Kernel::kRowSqNorm, -1);
  if (norms_only) return plan;
  if (split) {
    add(Kernel::kSplitKPartial, plan.config);
    add(Kernel::kSplitKEpilogue, plan.config);
  } else {
    add(Kernel::kYatGemm, plan.config);
  }
  return plan;
}

void RunPlan(const Plan& plan, CUstream stream) {
  const cuda::Driver& driver = cuda::GetDriver();
  CUcontext context = nullptr;
  cuda::Check(driver.cuCtxGetCurrent(&context), "cuCtxGetCurrent");
  ArgValues values = plan.values;  // kernelParams point into it
  for (int i = 0; i < plan.launch_count; ++i) {
    const Launch& launch = plan.launches[i];
    const Entry& e = kEntries[launch.entry];
    CUfunction function = Loader::Instance().Function(launch.entry, plan.arch.ptx, context);
    void* args[gpu_kernels::kMaxParams];
    for (int a = 0; a < e.param_count; ++a) args[a] = values.Address(e.params[a]);
    cuda::Check(driver.cuLaunchKernel(function, launch.grid[0], launch.grid[1], launch.grid[2], e.block_x, 1, 1,
                                      e.shared_memory_bytes, stream, args, nullptr),
                std::string("cuLaunchKernel(") + (plan.arch.ptx ? e.ptx : e.cubin) + ")");
  }
}

std::string KernelsFolder() {
  if (const char* folder = std::getenv("YATDEPLOY_GPU_KERNELS_DIR"); folder != nullptr && *folder != '\0') {
    return folder;
  }
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&KernelsFolder), &info) == 0 || info.dli_fname == nullptr) {
    throw std::runtime_error("can't tell where this library was loaded from; set YATDEPLOY_GPU_KERNELS_DIR");
  }
  std::string library = info.dli_fname;
  const size_t slash = library.rfind('/');
  return (slash == std::string::npos ? std::string(".") : library.substr(0, slash)) + "/gpu_kernels";
}

}  // namespace yat::gpu

// --- Introspection for the tests (tests/test_gpu_build.py, through ctypes): the host logic above, which
// needs no GPU, as JSON text. Not part of the op's interface.
namespace {

using yat::gpu::Param;

std::string Quoted(const std::string& text) { return "\"" + text + "\""; }

std::string ParamList(const Param* params, int count) {
  std::string text = "[";
  for (int i = 0; i < count; ++i) {
    text += (i ? ", " : "") + Quoted(yat::gpu_kernels::kParamNames[static_cast<int>(params[i])]);
  }
  return text + "]";
}

int WriteOut(const std::string& text, char* out, size_t size) {
  if (out == nullptr || size <= text.size()) return 2;
  std::memcpy(out, text.c_str(), text.size() + 1);
  return 0;
}

// The GPU kernels' dtypes (yat_gemm_kernels.h, from yatdeploy/gpu/common.py) are the spec's CUDA coverage.
constexpr int kDtypeCount = static_cast<int>(std::size(yat::gpu_kernels::kDtypeNames));
static_assert(kDtypeCount == static_cast<int>(std::size(yat::spec::kCudaDtypes)),
              "the GPU kernels are built for exactly spec::kCudaDtypes (yatdeploy/spec.py IMPLEMENTATIONS)");

std::string DtypeChoices() {  // "0 (float32), 1 (float16) or 2 (bfloat16)"
  std::string text;
  for (int i = 0; i < kDtypeCount; ++i) {
    text += (i == 0 ? "" : i + 1 == kDtypeCount ? " or " : ", ") + std::to_string(i) + " (" +
            yat::gpu_kernels::kDtypeNames[i] + ")";
  }
  return text;
}

std::string FloatText(float value) {
  std::ostringstream stream;
  stream.precision(9);
  stream << value;
  return stream.str();
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int yatdeploy_gpu_choose_config(int64_t m, int64_t n, int64_t k, int dtype) {
  if (dtype < 0 || dtype >= kDtypeCount) return -1;
  return yat::gpu::ChooseConfig(m, n, k, static_cast<yat::gpu::Dtype>(dtype));
}

__attribute__((visibility("default"))) const char* yatdeploy_gpu_config_name(int config) {
  return config >= 0 && config < yat::gpu_kernels::kConfigCount ? yat::gpu_kernels::kConfigs[config].name : nullptr;
}

__attribute__((visibility("default"))) int yatdeploy_gpu_entry_count() { return yat::gpu_kernels::kEntryCount; }

// The generated table's entry `index` as JSON; 0 when written, 1 for a bad index, 2 when `size` is short.
__attribute__((visibility("default"))) int yatdeploy_gpu_describe_entry(int index, char* out, size_t size) {
  if (index < 0 || index >= yat::gpu_kernels::kEntryCount) return 1;
  const auto& e = yat::gpu_kernels::kEntries[index];
  std::vector<Param> hinted;
  for (int p = 0; p < static_cast<int>(Param::kCount); ++p) {
    if (e.divisible_by_16 >> p & 1u) hinted.push_back(static_cast<Param>(p));
  }
  std::string grid = "[";
  for (int d = 0; d < 3; ++d) {
    grid += std::string(d ? ", " : "") + "[" + std::to_string(e.grid[d].cdiv_m) + ", " +
            std::to_string(e.grid[d].cdiv_n) + ", " + (e.grid[d].times_k_slices ? "true" : "false") + "]";
  }
  grid += "]";
  const std::string text =
      "{\"kernel\": " + std::to_string(static_cast<int>(e.kernel)) + ", \"arch\": " + std::to_string(e.arch) +
      ", \"dtype\": " + std::to_string(static_cast<int>(e.dtype)) + ", \"config\": " +
      (e.config >= 0 ? Quoted(yat::gpu_kernels::kConfigs[e.config].name) : std::string("null")) +
      ", \"aligned\": " + (e.aligned ? "true" : "false") + ", \"entry\": " + Quoted(e.entry) +
      ", \"cubin\": " + Quoted(e.cubin) + ", \"ptx\": " + Quoted(e.ptx) + ", \"block\": " + std::to_string(e.block_x) +
      ", \"shared_memory_bytes\": " + std::to_string(e.shared_memory_bytes) + ", \"grid\": " + grid +
      ", \"divisible_by_16\": " + ParamList(hinted.data(), static_cast<int>(hinted.size())) +
      ", \"params\": " + ParamList(e.params, e.param_count) + "}";
  return WriteOut(text, out, size);
}

// The plan for a problem on a device of compute capability cc_major.cc_minor, as JSON: config, arch, whether
// the PTX is JIT-compiled, split-K slices, workspace size, and per launch the entry, its file, grid, block,
// shared memory and the argument values in the entry's parameter order. 0 when written; 1 when the host
// refuses the problem (the message is written instead); 2 when `size` is short.
__attribute__((visibility("default"))) int yatdeploy_gpu_describe_plan(int dtype, int64_t m, int64_t n, int64_t k,
                                                                       uint64_t x, uint64_t w, uint64_t b,
                                                                       uint64_t y, uint64_t w_sq, float eps,
                                                                       float alpha, int cc_major, int cc_minor,
                                                                       uint64_t workspace, char* out, size_t size) {
  try {
    if (dtype < 0 || dtype >= kDtypeCount) throw std::runtime_error("dtype must be " + DtypeChoices());
    const yat::gpu::Problem problem{static_cast<yat::gpu::Dtype>(dtype), m, n, k, x, w, b, y, w_sq, eps, alpha};
    const yat::gpu::Plan plan = yat::gpu::MakePlan(problem, yat::gpu::ChooseArch(cc_major, cc_minor), workspace);
    yat::gpu::ArgValues values = plan.values;
    std::string launches = "[";
    for (int i = 0; i < plan.launch_count; ++i) {
      const yat::gpu::Launch& launch = plan.launches[i];
      const auto& e = yat::gpu_kernels::kEntries[launch.entry];
      std::string args = "[";
      for (int a = 0; a < e.param_count; ++a) {
        const Param p = e.params[a];
        const auto kind = yat::gpu_kernels::kParamKinds[static_cast<int>(p)];
        args += (a ? ", " : "");
        if (kind == yat::gpu_kernels::ParamKind::kF32) {
          args += FloatText(*static_cast<float*>(values.Address(p)));
        } else if (kind == yat::gpu_kernels::ParamKind::kI32) {
          args += std::to_string(*static_cast<int32_t*>(values.Address(p)));
        } else {
          args += std::to_string(*static_cast<CUdeviceptr*>(values.Address(p)));
        }
      }
      args += "]";
      launches += std::string(i ? ", " : "") + "{\"entry\": " + Quoted(e.entry) + ", \"file\": " +
                  Quoted(plan.arch.ptx ? e.ptx : e.cubin) + ", \"grid\": [" + std::to_string(launch.grid[0]) + ", " +
                  std::to_string(launch.grid[1]) + ", " + std::to_string(launch.grid[2]) + "], \"block\": " +
                  std::to_string(e.block_x) + ", \"shared_memory_bytes\": " + std::to_string(e.shared_memory_bytes) +
                  ", \"params\": " + ParamList(e.params, e.param_count) + ", \"args\": " + args + "}";
    }
    launches += "]";
    const std::string text = "{\"config\": " + Quoted(yat::gpu_kernels::kConfigs[plan.config].name) +
                             ", \"arch\": " + std::to_string(plan.arch.arch) + ", \"ptx\": " +
                             (plan.arch.ptx ? "true" : "false") + ", \"k_slices\": " + std::to_string(plan.k_slices) +
                             ", \"k_per_slice\": " + std::to_string(plan.k_per_slice) + ", \"workspace_bytes\": " +
                             std::to_string(plan.workspace_bytes) + ", \"launches\": " + launches + "}";
    return WriteOut(text, out, size);
  } catch (const std::exception& error) {
    return WriteOut(error.what(), out, size) == 0 ? 1 : 2;
  }
}

}  // extern "C"
