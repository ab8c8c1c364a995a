"""The YatGemm TensorRT plugin, defined with `tensorrt.plugin`; importing this module registers it.

- register: output shape [..., N] in X's dtype, after checking ranks and dtypes (W [N, K] only: a batched
  W, attention's scores, needs a launch per slice, which an ahead-of-time plugin can't make; it is refused);
- autotune: X, W, B and Y in X's dtype (float32, float16 or bfloat16), linear layout, and as tactics the
  tile configurations of the Triton kernels that fit this dtype and this GPU (plugin_logic.TACTICS);
- aot_impl: for the tactic TensorRT is timing or has chosen, the PTX of the installed `yat_gemm_trt`
  entry (yatdeploy/gpu/aot.py, `native.gpu_kernels_manifest()`) for this GPU's arch, dtype and K/N
  alignment; its grid (the manifest's formula on M and N), block (32·num_warps), dynamic shared memory,
  and the int32 arguments between the inputs and the output (M, N, K and eps/alpha's bit patterns).

The plugin is ahead-of-time only: TensorRT embeds the PTX in the engine, so the engine runs without
Python and without this module (trtexec, Triton's tensorrt_plan backend). TensorRT's ONNX parser
picks it for every YatGemm node carrying plugin_namespace="yat" (TensorRT >= 10.15; older parsers
inline the model's ONNX function instead, which yatdeploy.trt.engine detects and refuses).

This needs TensorRT (>= 10.9 for ahead-of-time plugins); the logic it runs lives in plugin_logic.
No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions' annotations
as classes to tell tensors from attributes (tests/test_trt_plugin.py checks the signatures).
"""

import functools

import tensorrt as trt
import tensorrt.plugin as trtp

from yatdeploy.errors import YatDeployError
from yatdeploy.trt import plugin_logic as logic


def _type_name(dtype: trt.DataType) -> str:
    return dtype.name


@functools.cache
def _device() -> tuple[str, int]:
    """(manifest arch, shared-memory limit for tactics) of the GPU TensorRT builds for."""
    _, manifest = logic.kernels()
    device = logic.current_device()
    if device is None:
        raise YatDeployError("the CUDA driver reports no GPU: TensorRT builds an engine on the GPU that will run it")
    capability, shared = device
    arch = logic.arch_for(capability, manifest)
    return arch, logic.shared_memory_limit(arch, shared)


def _check(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc) -> logic.PluginType:
    # One kernel per node (an ahead-of-time plugin): W [N, K] only, a batched W is refused naming why.
    return logic.check_inputs([x.ndim, w.ndim, b.ndim], [_type_name(t.dtype) for t in (x, w, b)], batched_w=False)


def _constant(expr) -> int | None:
    return expr.constant_value() if expr.is_constant else None


@trtp.register(logic.PLUGIN_ID)
def yat_gemm_desc(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc, eps: float,
                  alpha: float) -> trtp.TensorDesc:
    _check(x, w, b)
    return trtp.from_shape_expr(tuple(logic.output_dims(list(x.shape_expr), list(w.shape_expr))), dtype=x.dtype)


@trtp.autotune(logic.PLUGIN_ID)
def yat_gemm_autotune(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc,
                      outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    kind = _check(x, w, b)
    _, manifest = logic.kernels()
    arch, shared = _device()
    tactics = logic.tactics(manifest, arch, kind.dtype, shared)
    if not tactics:
        raise YatDeployError(f"no tile configuration of YatGemm's GPU kernels runs {kind.dtype} on {arch} within "
                             f"{shared} bytes of shared memory (${logic.ENV_MAX_SHARED_MEMORY} lowers that limit)")
    return [trtp.AutoTuneCombination(logic.io_types(kind), "LINEAR", tactics)]


@trtp.aot_impl(logic.PLUGIN_ID)
def yat_gemm_aot_impl(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc, eps: float, alpha: float,
                      outputs: tuple[trtp.TensorDesc],
                      tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    kind = _check(x, w, b)
    folder, manifest = logic.kernels()
    arch, _ = _device()
    x_dims = list(x.shape_expr)
    m = logic.rows(x_dims, trtp.ShapeExpr(1))
    k = x_dims[-1]
    n = w.shape_expr[0]
    entry = logic.select_entry(manifest, arch, kind.dtype, tactic, logic.variant_for(_constant(k), _constant(n)))

    launch = logic.launch(entry, m, n, k)
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x, params.block_y, params.block_z = launch.block
    params.shared_mem = launch.shared_memory

    args = logic.extra_args(entry, m, n, k, eps, alpha)
    extra = trtp.SymIntExprs(len(args))
    for i, arg in enumerate(args):
        extra[i] = trtp.SymInt32(arg)
    return entry["entry"], logic.read_ptx(folder, entry), params, extra
