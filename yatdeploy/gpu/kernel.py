"""The YatGemm GPU kernels, in Triton.

    Y = alpha * (X·Wᵀ + B)² / (max(|X|² + |W|² − 2·X·Wᵀ, 0) + eps)      (yatdeploy/spec.py)

X [M, K], W [N, K] and Y [M, N] are addressed through explicit strides. The dot product runs on
tensor cores (`tl.dot`) with a float32 accumulator; |x|² is summed in float32 from the same X tiles
inside the K loop; |w|² comes in precomputed (`row_sq_norm_kernel`, once per constant W). The epilogue
applies the Yat formula to the accumulator before the one store of Y.

Kernels:
- `yat_gemm_kernel`: one pass, grid (tiles,).
- `yat_gemm_split_k_partial_kernel` + `yat_gemm_split_k_epilogue_kernel`: split-K for small M, grid
  (tiles, slices) then (tiles,). The epilogue needs the whole dot product and |x|², so the first
  kernel writes float32 partial sums per K slice and the second sums them (in slice order:
  deterministic, no atomics) before applying it.
- `row_sq_norm_kernel`: |w|² per row of W, in float32, grid (cdiv(N, ROW_BLOCK_N),).
- `yat_gemm_trt_kernel`: the one-pass kernel with TensorRT's ahead-of-time plugin ABI (inputs, then
  int32 scalars, then the output; no buffer beyond the plugin's I/O), so |w|² is summed from the W tiles
  inside the K loop and eps/alpha arrive as the 16-bit halves of their float32 bits.

triton reads TRITON_INTERPRET when these functions are decorated, i.e. when this module is first
imported: under it they are interpreter functions that run on CPU tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coordinates(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of output tile `pid`, visiting GROUP_M tile rows per column sweep."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_tile_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (pid % tiles_per_group) % group_rows
    tile_n = (pid % tiles_per_group) // group_rows
    return tile_m, tile_n


@triton.jit
def _dot_and_x_sq(
    x_ptr, w_ptr, M, N, k_begin, k_end,
    stride_xm, stride_xk, stride_wn, stride_wk,
    tile_m, tile_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT_OPERANDS: tl.constexpr, W_SQ_FROM_TILES: tl.constexpr,
):
    """X·Wᵀ [BLOCK_M, BLOCK_N], |x|² [BLOCK_M] and, with W_SQ_FROM_TILES, |w|² [BLOCK_N] (else zeros)
    over K in [k_begin, k_end), all float32."""
    # Rows past M (columns past N) wrap onto valid ones so that only K needs a load mask; their
    # results are never stored.
    rows = (tile_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    cols = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    ks = k_begin + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    wt_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_in = (k0 + tl.arange(0, BLOCK_K)) < k_end
        x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
        wt = tl.load(wt_ptrs, mask=k_in[:, None], other=0.0)
        x32 = x.to(tl.float32)
        x_sq += tl.sum(x32 * x32, axis=1)
        if W_SQ_FROM_TILES:
            wt32 = wt.to(tl.float32)
            w_sq += tl.sum(wt32 * wt32, axis=0)
        if UPCAST_DOT_OPERANDS:
            # Only under the interpreter, for bfloat16: its tl.dot multiplies the raw bit patterns
            # (triton issue 11584). bf16 -> f32 is exact and tensor cores accumulate in f32 anyway.
            dot = tl.dot(x32, wt.to(tl.float32), dot, input_precision="ieee")
        else:
            dot = tl.dot(x, wt, dot, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
    return dot, x_sq, w_sq


@triton.jit
def _load_w_sq(w_sq_ptr, N, tile_n, BLOCK_N: tl.constexpr):
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(w_sq_ptr + cols, mask=cols < N, other=0.0)


@triton.jit
def _yat_epilogue_store(
    dot, x_sq, w_sq, b_ptr, y_ptr, M, N, stride_ym, stride_yn, has_bias, eps, alpha,
    tile_m, tile_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SATURATE: tl.constexpr, FINITE_MAX: tl.constexpr,
):
    """Y = alpha·(dot + b)² / (max(|x|² + |w|² − 2·dot, 0) + eps), saturated for 16-bit Y, stored."""
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < N
    # b_ptr may be null when has_bias is 0: a load whose mask is all false reads nothing.
    bias = tl.load(b_ptr + cols, mask=col_in & (has_bias != 0), other=0.0).to(tl.float32)
    z = dot + bias[None, :]
    # NaN must survive the clamps, as it does in torch.clamp (a plain max drops it).
    dist = tl.maximum(x_sq[:, None] + w_sq[None, :] - 2.0 * dot, 0.0, propagate_nan=tl.PropagateNan.ALL)
    y = tl.div_rn(z * z, dist + eps) * alpha
    if SATURATE:
        y = tl.clamp(y, -FINITE_MAX, FINITE_MAX, propagate_nan=tl.PropagateNan.ALL)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=(rows[:, None] < M) & col_in[None, :])


@triton.jit
def yat_gemm_kernel(
    x_ptr, w_ptr, b_ptr, w_sq_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    has_bias, eps, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT_OPERANDS: tl.constexpr,
    SATURATE: tl.constexpr, FINITE_MAX: tl.constexpr,
):
    tile_m, tile_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dot, x_sq, _ = _dot_and_x_sq(
        x_ptr, w_ptr, M, N, 0, K, stride_xm, stride_xk, stride_wn, stride_wk, tile_m, tile_n,
        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT_OPERANDS, False,
    )
    _yat_epilogue_store(
        dot, x_sq, _load_w_sq(w_sq_ptr, N, tile_n, BLOCK_N), b_ptr, y_ptr, M, N, stride_ym, stride_yn,
        has_bias, eps, alpha, tile_m, tile_n, BLOCK_M, BLOCK_N, SATURATE, FINITE_MAX,
    )


@triton.jit
def yat_gemm_split_k_partial_kernel(
    x_ptr, w_ptr, partial_dot_ptr, partial_x_sq_ptr,
    M, N, K, k_per_slice,
    stride_xm, stride_xk, stride_wn, stride_wk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT_OPERANDS: tl.constexpr,
):
    """Slice program_id(1) of K: partial_dot[slice, M, N] and partial_x_sq[slice, M], contiguous f32."""
    tile_m, tile_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_slice = tl.program_id(1)
    k_begin = k_slice * k_per_slice
    k_end = min(k_begin + k_per_slice, K)
    dot, x_sq, _ = _dot_and_x_sq(
        x_ptr, w_ptr, M, N, k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk, tile_m, tile_n,
        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT_OPERANDS, False,
    )
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    slice_base = k_slice.to(tl.int64) * M
    dot_ptrs = partial_dot_ptr + (slice_base + rows[:, None]) * N + cols[None, :]
    tl.store(dot_ptrs, dot, mask=row_in[:, None] & (cols[None, :] < N))
    # Every tile column computes the same |x|² slice; the first one writes it.
    tl.store(partial_x_sq_ptr + slice_base + rows, x_sq, mask=row_in & (tile_n == 0))


@triton.jit
def yat_gemm_split_k_epilogue_kernel(
    partial_dot_ptr, partial_x_sq_ptr, b_ptr, w_sq_ptr, y_ptr,
    M, N, k_slices,
    stride_ym, stride_yn,
    has_bias, eps, alpha,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    SATURATE: tl.constexpr, FINITE_MAX: tl.constexpr,
):
    tile_m, tile_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    tile_in = row_in[:, None] & (cols[None, :] < N)
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dot_ptrs = partial_dot_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    x_sq_ptrs = partial_x_sq_ptr + rows
    slice_rows = tl.cast(M, tl.int64)
    for _ in range(0, k_slices):
        dot += tl.load(dot_ptrs, mask=tile_in, other=0.0)
        x_sq += tl.load(x_sq_ptrs, mask=row_in, other=0.0)
        dot_ptrs += slice_rows * N
        x_sq_ptrs += slice_rows
    _yat_epilogue_store(
        dot, x_sq, _load_w_sq(w_sq_ptr, N, tile_n, BLOCK_N), b_ptr, y_ptr, M, N, stride_ym, stride_yn,
        has_bias, eps, alpha, tile_m, tile_n, BLOCK_M, BLOCK_N, SATURATE, FINITE_MAX,
    )


@triton.jit
def row_sq_norm_kernel(
    w_ptr, w_sq_ptr, N, K, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w_sq[n] = Σ_k float32(W[n, k])² for the BLOCK_N rows of program_id(0)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + ks[None, :] * stride_wk
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, mask=row_in[:, None] & ((k0 + ks)[None, :] < K), other=0.0).to(tl.float32)
        total += tl.sum(w * w, axis=1)
        w_ptrs += BLOCK_K * stride_wk
    tl.store(w_sq_ptr + rows, total, mask=row_in)


@triton.jit
def _float_from_halves(high, low):
    """The float32 whose bit pattern is (high << 16) | low, both in [0, 0xFFFF]."""
    bits = (high.to(tl.uint32) << 16) | low.to(tl.uint32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def yat_gemm_trt_kernel(
    x_ptr, w_ptr, b_ptr,
    M, N, K, eps_high, eps_low, alpha_high, alpha_low,
    y_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT_OPERANDS: tl.constexpr,
    SATURATE: tl.constexpr, FINITE_MAX: tl.constexpr,
):
    """yat_gemm_kernel laid out for TensorRT's ahead-of-time plugins (yatdeploy/trt/plugin_logic.py).

    TensorRT launches an AOT plugin kernel with its inputs (X, W, B), then the plugin's int32 extra
    arguments, then its outputs (Y), and offers no workspace or persistent buffer: so |w|² comes from
    the W tiles inside the K loop (each tile row of programs recomputes it: BLOCK_N·BLOCK_K squares per
    K step beside the BLOCK_M·BLOCK_N·BLOCK_K products), eps and alpha arrive as the non-negative 16-bit
    halves of their float32 bits, and X, W, Y are contiguous row-major (strides K, K, N). B is always
    present: the plugin takes it as an input.
    """
    eps = _float_from_halves(eps_high, eps_low)
    alpha = _float_from_halves(alpha_high, alpha_low)
    tile_m, tile_n = _tile_coordinates(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    dot, x_sq, w_sq = _dot_and_x_sq(
        x_ptr, w_ptr, M, N, 0, K, K, 1, K, 1, tile_m, tile_n,
        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT_OPERANDS, True,
    )
    _yat_epilogue_store(
        dot, x_sq, w_sq, b_ptr, y_ptr, M, N, N, 1, 1, eps, alpha,
        tile_m, tile_n, BLOCK_M, BLOCK_N, SATURATE, FINITE_MAX,
    )
