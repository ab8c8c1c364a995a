"""Launching the Triton YatGemm kernels on torch tensors: CUDA tensors on the GPU, CPU tensors under
Triton's interpreter."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor
from triton.runtime.jit import JITFunction

from yatdeploy.gpu import kernel
from yatdeploy.gpu.common import (
    KERNEL_DTYPES,
    ROW_SQ_NORM_BLOCK_K,
    ROW_SQ_NORM_BLOCK_N,
    ROW_SQ_NORM_NUM_WARPS,
    Float32Precision,
    dot_input_precision,
    output_saturation,
)
from yatdeploy.gpu.configs import TileConfig, cdiv, choose_config, split_k_slices
from yatdeploy.ops.reference import check_operands, output_shape, yat_gemm_reference

GPU_DTYPES = tuple(getattr(torch, name) for name in KERNEL_DTYPES)


def interpreting() -> bool:
    """Whether the kernels were decorated under TRITON_INTERPRET=1 (triton reads it at decoration)."""
    return not isinstance(kernel.yat_gemm_kernel, JITFunction)


def _check_device(*tensors: Tensor | None) -> torch.device:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"YatGemm: operands on different devices: {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return device
    if device.type == "cpu":
        raise RuntimeError(
            "yatdeploy.gpu runs CPU tensors only under Triton's interpreter, and triton reads TRITON_INTERPRET "
            "when functions are decorated: set TRITON_INTERPRET=1 before triton and yatdeploy.gpu are first "
            "imported (and keep it set), or pass CUDA tensors"
        )
    raise RuntimeError(f"yatdeploy.gpu: no Triton kernel for device {device}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in GPU_DTYPES:
        raise TypeError(
            f"yatdeploy.gpu: no GPU kernel for {dtype} (the kernels are float32, float16 and bfloat16); "
            "float64 runs on torch's reference implementation"
        )


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    # The interpreter's bfloat16 tl.dot multiplies raw bit patterns (triton issue 11584).
    return dtype == torch.bfloat16 and interpreting()


def row_sq_norms(w: Tensor) -> Tensor:
    """|w|² per row of W [N, K], in float32: compute once and pass to yat_gemm when W is constant."""
    _check_dtype(w.dtype)
    _check_device(w)
    n, k = w.shape
    w_sq = torch.empty(n, dtype=torch.float32, device=w.device)
    if n == 0:
        return w_sq
    kernel.row_sq_norm_kernel[(cdiv(n, ROW_SQ_NORM_BLOCK_N),)](
        w, w_sq, n, k, w.stride(0), w.stride(1),
        BLOCK_N=ROW_SQ_NORM_BLOCK_N, BLOCK_K=ROW_SQ_NORM_BLOCK_K, num_warps=ROW_SQ_NORM_NUM_WARPS,
    )
    return w_sq


def yat_gemm(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    eps: float,
    alpha: float,
    *,
    w_sq: Tensor | None = None,
    config: TileConfig | None = None,
    float32_precision: Float32Precision = "ieee",
) -> Tensor:
    """YatGemm (yatdeploy/spec.py) with the Triton kernels. X [..., K], W [N, K], B [N] or None; or batched,
    X [..., M, K] and W [..., N, K] with the leading dims broadcast as matmul's (attention scores).

    `w_sq`: row_sq_norms(w), when the caller keeps it for a constant W [N, K]. `config`: a tile configuration
    (default: choose_config by shape). `float32_precision`: "ieee" (exact float32 products) or "tf32x3"
    (three TF32 tensor-core products; its accuracy is still to be measured on a GPU).
    """
    check_operands(x, w, b)
    _check_dtype(x.dtype)
    device = _check_device(x, w, b, w_sq)
    n, k = w.shape[-2:]
    y = torch.empty(output_shape(tuple(x.shape), tuple(w.shape)), dtype=x.dtype, device=device)
    if y.numel() == 0:
        return y
    options = dict(config=config, float32_precision=float32_precision)
    if w.dim() == 2:
        _launch_2d(x.reshape(-1, k), w, b, w_sq, y.view(-1, n), eps, alpha, **options)
        return y
    if w_sq is not None:
        raise ValueError("w_sq is kept for a W [N, K]; a batched W's norms are computed per slice")
    # Batched W: the 2-D kernels once per slice of Y, on views of the broadcast operands (a broadcast dimension
    # is a stride of 0: nothing is copied). A batched grid, all slices in one launch, is future work.
    lead = y.shape[:-2]
    xs = x.expand(*lead, *x.shape[-2:])
    ws = w.expand(*lead, *w.shape[-2:])
    for index in itertools.product(*map(range, lead)):
        _launch_2d(xs[index], ws[index], b, None, y[index], eps, alpha, **options)
    return y


def _launch_2d(x2d: Tensor, w: Tensor, b: Tensor | None, w_sq: Tensor | None, y: Tensor, eps: float, alpha: float, *,
               config: TileConfig | None, float32_precision: Float32Precision) -> None:
    """Y [M, N] (a view, written in place) for X [M, K] and W [N, K], any strides, neither empty."""
    m, (n, k) = x2d.shape[0], w.shape
    if w_sq is None:
        w_sq = row_sq_norms(w)
    elif w_sq.shape != (n,) or w_sq.dtype != torch.float32:
        raise ValueError(f"w_sq must be float32 of shape ({n},), got {w_sq.dtype} {tuple(w_sq.shape)}")
    config = config or choose_config(m, n, k, x2d.dtype)
    saturate, finite_max = output_saturation(x2d.dtype)
    has_bias = int(b is not None)
    # A stand-in pointer of X's dtype when there is no bias; the kernels never read it.
    b_arg = b if b is not None else x2d
    dot_constexprs = dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        INPUT_PRECISION=dot_input_precision(x2d.dtype, float32_precision),
        UPCAST_DOT_OPERANDS=upcast_dot_operands(x2d.dtype),
    )
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    tiles = cdiv(m, config.block_m) * cdiv(n, config.block_n)
    k_slices, k_per_slice = split_k_slices(k, config)
    if k_slices <= 1:
        kernel.yat_gemm_kernel[(tiles,)](
            x2d, w, b_arg, w_sq, y, m, n, k,
            x2d.stride(0), x2d.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
            has_bias, eps, alpha,
            **dot_constexprs, SATURATE=saturate, FINITE_MAX=finite_max, **launch,
        )
    else:
        partial_dot = torch.empty((k_slices, m, n), dtype=torch.float32, device=x2d.device)
        partial_x_sq = torch.empty((k_slices, m), dtype=torch.float32, device=x2d.device)
        kernel.yat_gemm_split_k_partial_kernel[(tiles, k_slices)](
            x2d, w, partial_dot, partial_x_sq, m, n, k, k_per_slice,
            x2d.stride(0), x2d.stride(1), w.stride(0), w.stride(1),
            **dot_constexprs, **launch,
        )
        kernel.yat_gemm_split_k_epilogue_kernel[(tiles,)](
            partial_dot, partial_x_sq, b_arg, w_sq, y, m, n, k_slices,
            y.stride(0), y.stride(1), has_bias, eps, alpha,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUP_M=config.group_m,
            SATURATE=saturate, FINITE_MAX=finite_max, num_warps=config.num_warps,
        )


def op_cuda_kernel(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float) -> Tensor:
    """`yatdeploy::yat_gemm` on CUDA tensors: the Triton kernel, or the reference for float64."""
    if x.dtype in GPU_DTYPES:
        return yat_gemm(x, w, b, eps, alpha)
    check_operands(x, w, b)
    return yat_gemm_reference(x, w, b, eps, alpha)
