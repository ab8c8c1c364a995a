"""YatGemm as a torch custom op: the reference implementation, the fake one used by export, and on CUDA
tensors the fused Triton kernel (yatdeploy.gpu) when triton is installed.

The CUDA kernel is registered when this module is imported but yatdeploy.gpu (and triton) are imported
only at the first call on CUDA tensors, so importing the op stays cheap and works without triton.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from yatdeploy.ops.reference import check_operands, output_shape, yat_gemm_reference

OP_QUALNAME = "yatdeploy::yat_gemm"

@torch.library.custom_op(OP_QUALNAME, mutates_args=())
def yat_gemm(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    check_operands(x, w, b)
    return yat_gemm_reference(x, w, b, eps, alpha)


@yat_gemm.register_fake
def _yat_gemm_fake(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    check_operands(x, w, b)
    return x.new_empty(output_shape(tuple(x.shape), tuple(w.shape)))


def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _fused_kernel() -> Callable[..., Tensor] | None:
    """yatdeploy.gpu's CUDA implementation, imported on first use; None (with a warning, once) when triton
    is there but the kernels can't be loaded."""
    try:
        from yatdeploy.gpu.launch import op_cuda_kernel
    except Exception as exc:  # e.g. a triton that does not match this torch
        warnings.warn(f"yatdeploy::yat_gemm: the fused GPU kernel can't be loaded ({type(exc).__name__}: {exc}); "
                      "CUDA tensors use the reference implementation", RuntimeWarning, stacklevel=2)
        return None
    return op_cuda_kernel


def _yat_gemm_cuda(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    kernel = _fused_kernel()
    if kernel is None:
        check_operands(x, w, b)
        return yat_gemm_reference(x, w, b, eps, alpha)
    return kernel(x, w, b, eps, alpha)


if _triton_importable():
    yat_gemm.register_kernel("cuda")(_yat_gemm_cuda)
