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

from yatdeploy import dtypes
from yatdeploy.spec import YAT_GEMM

OP_QUALNAME = "yatdeploy::yat_gemm"

_FLOAT32_ACCUMULATED = frozenset(dtypes.by_onnx(t).torch for t in YAT_GEMM.float32_accumulated)
_ADMITTED = frozenset(dtypes.by_onnx(t).torch for t in YAT_GEMM.dtypes)


def yat_gemm_reference(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    """The semantics of YAT_GEMM in eager torch; the operation order follows nmn's YatNMN."""
    out_dtype = x.dtype
    acc_dtype = torch.float32 if out_dtype in _FLOAT32_ACCUMULATED else out_dtype
    x_acc = x.to(acc_dtype)
    w_acc = w.to(acc_dtype)
    dot = torch.matmul(x_acc, w_acc.t())
    z = dot + b.to(acc_dtype) if b is not None else dot
    x_sq = torch.sum(x_acc * x_acc, dim=-1, keepdim=True)
    w_sq = torch.sum(w_acc * w_acc, dim=-1)
    dist = (x_sq + w_sq - 2 * dot).clamp(min=0.0)
    y = z * z / (dist + eps) * alpha
    if out_dtype in _FLOAT32_ACCUMULATED:
        limits = torch.finfo(out_dtype)
        y = y.clamp(min=limits.min, max=limits.max)
    return y.to(out_dtype)


def _check_operands(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    if x.dtype not in _ADMITTED:
        raise TypeError(f"YatGemm: X has dtype {x.dtype}; admitted are {sorted(map(str, _ADMITTED))}")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError("YatGemm: X, W and B must share one dtype")
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"YatGemm: X {tuple(x.shape)} and W {tuple(w.shape)} do not fit ([..., K] and [N, K])")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"YatGemm: B has shape {tuple(b.shape)}, expected ({w.shape[0]},)")


@torch.library.custom_op(OP_QUALNAME, mutates_args=())
def yat_gemm(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    _check_operands(x, w, b)
    return yat_gemm_reference(x, w, b, eps, alpha)


@yat_gemm.register_fake
def _yat_gemm_fake(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    _check_operands(x, w, b)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


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
        _check_operands(x, w, b)
        return yat_gemm_reference(x, w, b, eps, alpha)
    return kernel(x, w, b, eps, alpha)


if _triton_importable():
    yat_gemm.register_kernel("cuda")(_yat_gemm_cuda)
