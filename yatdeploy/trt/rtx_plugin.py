"""YatGemm as a TensorRT-for-RTX plugin: an IPluginV3 with an IPluginCreatorV3One creator, `YatGemm` v1 in
namespace `yat`, defined in Python (TensorRT for RTX has no `tensorrt.plugin` and no ahead-of-time plugins).

Build time (any machine): output shape [..., N] in X's dtype ([..., M, N] for a batched W, the leading
dimensions broadcast); float32, float16 or bfloat16 in linear layout,
every tensor in X's type (the network is strongly typed); as tactics the tile configurations of the GPU
kernels that fit every target's shared memory (plugin_logic.TACTICS); eps and alpha as FLOAT32 fields,
serialized into the engine.

Run time (an RTX-class GPU, compute capability 8.0 or newer): enqueue launches the installed `yat_gemm_trt`
kernel (yatdeploy/gpu/aot.py; its sm_80 PTX, which the driver JIT-compiles for 8.6, 8.9 and 12.x) through
the driver API, with the grid, block, shared memory and int32 arguments plugin_logic computes, as the
data-center plugin's aot_impl hands them to TensorRT. An engine with this plugin therefore needs Python and
this module registered (`register()`) wherever it runs. enqueue has not run on a GPU yet (docs/tensorrt.md).

Importing this module needs tensorrt_rtx_bindings; the logic it runs lives in plugin_logic.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np
import tensorrt_rtx_bindings as trt

from yatdeploy.errors import YatDeployError
from yatdeploy.trt import plugin_logic as logic
from yatdeploy.trt.plugin_logic import PLUGIN_NAME

_FLOAT_TYPES = {getattr(trt.DataType, t.trt): t.dtype for t in logic.PLUGIN_TYPES}
# The PTX the plugin launches on every RTX target (8.0 and newer, 9.0 excluded): sm_80, JIT-compiled above 8.0.
RUNTIME_ARCH = "sm_80"

# The most dynamic shared memory a tactic may use: the smallest opt-in limit among the engine's targets,
# set by the builder (yatdeploy.trt.rtx) before it parses; None until then (the arch's default).
target_shared_memory: int | None = None

# What every create_plugin call received, (node name, phase, eps, alpha): the builder's record of the fields.
created: list[tuple[str, str, float, float]] = []


def _field(value: float, name: str) -> trt.PluginField:
    return trt.PluginField(name, np.array([value], dtype=np.float32), trt.PluginFieldType.FLOAT32)


class YatGemmPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
    def __init__(self, eps: float, alpha: float, dtype: str | None = None, tactic: int = 0) -> None:
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.plugin_name = PLUGIN_NAME
        self.plugin_version = logic.PLUGIN_VERSION
        self.plugin_namespace = logic.PLUGIN_NAMESPACE
        self.num_outputs = 1
        self.eps, self.alpha = float(eps), float(alpha)
        self.dtype = dtype  # known from configure_plugin on
        self.tactic = tactic  # 0: TensorRT chose none (a build without a GPU does not time tactics)

    def get_capability_interface(self, type):  # noqa: A002  (TensorRT's parameter name)
        return self

    def clone(self) -> YatGemmPlugin:
        return YatGemmPlugin(self.eps, self.alpha, self.dtype, self.tactic)

    # --- build -------------------------------------------------------------------------------------------

    def get_output_data_types(self, input_types):
        return [input_types[0]]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        x, w = inputs[0], inputs[1]

        def broadcast(a, b):  # a leading dimension known to be 1 takes the other's; else the larger (MatMul's rule)
            if a.is_constant() and a.get_constant_value() == 1:
                return b
            if b.is_constant() and b.get_constant_value() == 1:
                return a
            return expr_builder.operation(trt.DimensionOperation.MAX, a, b)

        dims = logic.output_dims([x[i] for i in range(len(x))], [w[i] for i in range(len(w))], broadcast)
        out = trt.DimsExprs(len(dims))
        for i, dim in enumerate(dims):
            out[i] = dim
        return [out]

    def supports_format_combination(self, pos, in_out, num_inputs):
        desc = in_out[pos].desc
        return (desc.format == trt.TensorFormat.LINEAR and desc.type in _FLOAT_TYPES
                and desc.type == in_out[0].desc.type)

    def configure_plugin(self, inputs, outputs):
        descs = [i.desc for i in inputs]
        self.dtype = logic.check_inputs([len(d.dims) for d in descs], [d.type.name for d in descs], batched_w=True).dtype

    def get_workspace_size(self, inputs, outputs):
        return 0

    def get_valid_tactics(self):
        if self.dtype is None or native_manifest() is None:
            return []
        limit = target_shared_memory or logic.DEFAULT_MAX_SHARED_MEMORY[RUNTIME_ARCH]
        return logic.tactics(native_manifest(), RUNTIME_ARCH, self.dtype, limit)

    def get_fields_to_serialize(self):
        return trt.PluginFieldCollection([_field(self.eps, "eps"), _field(self.alpha, "alpha")])

    # --- run ---------------------------------------------------------------------------------------------

    def set_tactic(self, tactic):
        self.tactic = int(tactic)

    def on_shape_change(self, inputs, outputs):
        self.dtype = _FLOAT_TYPES[inputs[0].type]

    def attach_to_context(self, context):
        return self.clone()

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        # One launch of the 2-D kernel per slice (W [N, K]: one), on the slices' pointers, in order on the stream.
        # A batched grid, all slices in one launch, is future work.
        work = logic.slices(list(input_desc[0].dims), list(input_desc[1].dims))
        if not work.offsets:
            return
        m, n, k = work.m, work.n, work.k
        kind = logic.plugin_type(input_desc[0].type.name)
        _, manifest = logic.kernels()
        tactic = self.tactic or logic.tactics(manifest, RUNTIME_ARCH, kind.dtype, logic.DEFAULT_DYNAMIC_SHARED_LIMIT)[0]
        # Slice offsets are whole rows of K (X, W) or N (Y) elements: the aligned variant stays aligned per slice.
        entry = logic.select_entry(manifest, RUNTIME_ARCH, kind.dtype, tactic, logic.variant_for(k, n))
        launch = logic.launch(entry, m, n, k)
        args = logic.extra_args(entry, m, n, k, self.eps, self.alpha)
        x, w, b = (int(p) for p in inputs[:3])
        y = int(outputs[0])
        for x_offset, w_offset, y_offset in work.offsets:
            _driver().launch(entry, launch, [x + x_offset * kind.itemsize, w + w_offset * kind.itemsize, b], args,
                             y + y_offset * kind.itemsize, stream)


def native_manifest() -> dict | None:
    from yatdeploy import native

    return native.gpu_kernels_manifest()


class YatGemmCreator(trt.IPluginCreatorV3One):
    def __init__(self) -> None:
        trt.IPluginCreatorV3One.__init__(self)
        self.name = PLUGIN_NAME
        self.plugin_version = logic.PLUGIN_VERSION
        self.plugin_namespace = logic.PLUGIN_NAMESPACE
        self.field_names = trt.PluginFieldCollection(
            [trt.PluginField(name, np.array([], dtype=np.float32), trt.PluginFieldType.FLOAT32)
             for name in logic.ATTRIBUTES])

    def create_plugin(self, name, fields, phase):
        values = {f.name: float(np.asarray(f.data, dtype=np.float32).reshape(-1)[0]) for f in fields}
        missing = [a for a in logic.ATTRIBUTES if a not in values]
        if missing:
            raise YatDeployError(f"YatGemm plugin {name!r}: no {', '.join(missing)} field")
        created.append((name, phase.name, values["eps"], values["alpha"]))
        return YatGemmPlugin(values["eps"], values["alpha"])


@functools.cache
def register() -> YatGemmCreator:
    """Register the creator with TensorRT for RTX's plugin registry (once per process)."""
    creator = YatGemmCreator()
    if not trt.get_plugin_registry().register_creator(creator, logic.PLUGIN_NAMESPACE):
        raise YatDeployError(f"TensorRT for RTX refused to register the {logic.PLUGIN_ID} plugin creator")
    return creator


# --- the CUDA driver, for enqueue --------------------------------------------------------------------

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class _Driver:
    """The few driver API calls a launch needs, on the current context; functions cached per PTX entry."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.functions: dict[str, ctypes.c_void_p] = {}
        self.lock = threading.Lock()

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise YatDeployError(f"YatGemm plugin: {what} failed (CUDA driver error {status})")

    def function(self, entry: dict) -> ctypes.c_void_p:
        with self.lock:
            if entry["ptx"] not in self.functions:
                folder, _ = logic.kernels()
                ptx = logic.read_ptx(folder, entry).encode() + b"\0"
                module, function = ctypes.c_void_p(), ctypes.c_void_p()
                self._check(self.lib.cuModuleLoadData(ctypes.byref(module), ptx), f"loading {entry['ptx']}")
                self._check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, entry["entry"].encode()),
                            f"finding {entry['entry']}")
                if entry["shared_memory_bytes"] > logic.DEFAULT_DYNAMIC_SHARED_LIMIT:
                    self._check(self.lib.cuFuncSetAttribute(function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                            ctypes.c_int(entry["shared_memory_bytes"])),
                                "raising the shared-memory limit")
                self.functions[entry["ptx"]] = function
            return self.functions[entry["ptx"]]

    def launch(self, entry: dict, launch: logic.Launch, inputs: list[int], ints: list[int], output: int,
               stream: int) -> None:
        values = [ctypes.c_void_p(p) for p in inputs] + [ctypes.c_int32(v) for v in ints] + [ctypes.c_void_p(output)]
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
        grid = [int(g) for g in launch.grid]
        self._check(self.lib.cuLaunchKernel(self.function(entry), *[ctypes.c_uint(g) for g in grid],
                                            *[ctypes.c_uint(b) for b in launch.block], ctypes.c_uint(launch.shared_memory),
                                            ctypes.c_void_p(stream), params, None), f"launching {entry['entry']}")


@functools.cache
def _driver() -> _Driver:
    return _Driver()
