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
    dot = torch.matmul(x_acc, w_acc.transpose(-1, -2))  # [..., M, N]: matmul's broadcasting of the leading dims
    z = dot + b.to(acc_dtype) if b is not None else dot
    x_sq = torch.sum(x_acc * x_acc, dim=-1, keepdim=True)  # [..., M, 1]
    w_sq = torch.sum(w_acc * w_acc, dim=-1).unsqueeze(-2)  # [..., 1, N]
    dist = (x_sq + w_sq - 2 * dot).clamp(min=0.0)
    y = (z * z / (dist + eps) * alpha).reshape(dot.shape)  # a 1-D X: [N], as matmul gives it
    if out_dtype in _FLOAT32_ACCUMULATED:
        limits = torch.finfo(out_dtype)
        y = y.clamp(min=limits.min, max=limits.max)
    return y.to(out_dtype)


def check_operands(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    if x.dtype not in _ADMITTED:
        raise TypeError(f"YatGemm: X has dtype {x.dtype}; admitted are {sorted(map(str, _ADMITTED))}")
    if w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError("YatGemm: X, W and B must share one dtype")
    output_shape(tuple(x.shape), tuple(w.shape))
    if b is not None and tuple(b.shape) != (w.shape[-2],):
        raise ValueError(f"YatGemm: B has shape {tuple(b.shape)}, expected ({w.shape[-2]},)")


def output_shape(x: tuple, w: tuple) -> tuple:
    """Y's shape for X `x` and W `w` (sizes, or torch's symbolic sizes), as YAT_GEMM states it: X [..., M, K] against
    W [N, K] (every row of X), or batched, W [..., N, K] with the leading dims broadcast as matmul broadcasts them."""
    if len(w) < 2 or len(x) < 1 or x[-1] != w[-1] or (len(w) > 2 and len(x) < 2):
        raise ValueError(f"YatGemm: X {x} and W {w} do not fit ([..., K] and [N, K], or batched "
                         "[..., M, K] and [..., N, K])")
    if len(w) == 2:
        return (*x[:-1], w[0])
    try:
        lead = tuple(torch.broadcast_shapes(torch.Size(x[:-2]), torch.Size(w[:-2])))
    except RuntimeError:
        raise ValueError(f"YatGemm: the leading dims of X {x} and W {w} do not broadcast") from None
    return (*lead, x[-2], w[-2])
