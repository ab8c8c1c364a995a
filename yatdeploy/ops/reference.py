"""YatGemm in eager torch: the reference semantics and the operand checks, shared by the torch op
(ops/torch_op.py) and its CUDA implementation (gpu/launch.py), which the op imports lazily."""

from __future__ import annotations

import torch
from torch import Tensor

from yatdeploy import dtypes
from yatdeploy.spec import YAT_GEMM

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


def check_operands(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    if x.dtype not in _ADMITTED:
        raise TypeError(f"YatGemm: X has dtype {x.dtype}; admitted are {sorted(map(str, _ADMITTED))}")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError("YatGemm: X, W and B must share one dtype")
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"YatGemm: X {tuple(x.shape)} and W {tuple(w.shape)} do not fit ([..., K] and [N, K])")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"YatGemm: B has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
