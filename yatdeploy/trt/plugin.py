"""The YatGemm TensorRT plugin, defined with `tensorrt.plugin`; importing this module registers it.

- register: output shape [..., N] in X's dtype, after checking ranks and dtypes;
- autotune: X, W, B and Y in one dtype (float32, float16 or bfloat16), linear layout;
- aot_impl: the PTX entry for that dtype (plugins/yat_gemm/yat_gemm_plugin.cu, built with the package),
  its grid and block, and the scalar arguments (M, K, N and eps/alpha's bit patterns).

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

from yatdeploy.trt import plugin_logic as logic


@functools.cache
def _ptx() -> str:
    return logic.read_ptx()


def _type_name(dtype: trt.DataType) -> str:
    return dtype.name


@trtp.register(logic.PLUGIN_ID)
def yat_gemm_desc(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc, eps: float,
                  alpha: float) -> trtp.TensorDesc:
    logic.check_inputs([x.ndim, w.ndim, b.ndim], [_type_name(t.dtype) for t in (x, w, b)])
    return trtp.from_shape_expr(tuple(logic.output_dims(list(x.shape_expr), list(w.shape_expr))), dtype=x.dtype)


@trtp.autotune(logic.PLUGIN_ID)
def yat_gemm_autotune(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc,
                      outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    return [trtp.AutoTuneCombination(logic.autotune_types(), "LINEAR")]


@trtp.aot_impl(logic.PLUGIN_ID)
def yat_gemm_aot_impl(x: trtp.TensorDesc, w: trtp.TensorDesc, b: trtp.TensorDesc, eps: float, alpha: float,
                      outputs: tuple[trtp.TensorDesc],
                      tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    kernel = logic.check_inputs([x.ndim, w.ndim, b.ndim], [_type_name(t.dtype) for t in (x, w, b)]).kernel
    x_dims = list(x.shape_expr)
    m = logic.rows(x_dims, trtp.ShapeExpr(1))
    k = x_dims[-1]
    n = w.shape_expr[0]
    if n.is_constant:
        logic.check_static_limits(n.constant_value())

    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y = logic.launch_grid(m, n)
    params.block_x, params.block_y, params.block_z = logic.block_dims()
    params.shared_mem = 0  # the kernel's shared memory is static

    args = logic.extra_args(m, k, n, eps, alpha)
    extra = trtp.SymIntExprs(len(args))
    for i, arg in enumerate(args):
        extra[i] = trtp.SymInt32(arg)
    return kernel, _ptx(), params, extra
