"""What the Triton kernels' launcher (launch.py, on torch tensors) and their ahead-of-time build (aot.py)
share, without torch.

The package build runs aot.py in scikit-build's isolated build environment, which has triton but not
torch, so this module imports only the standard library and yatdeploy.spec. dtypes are named as torch
and the CLI name them ("float16"); the functions here take such a name or a torch.dtype (whose str() is
"torch.float16").
"""

from __future__ import annotations

from typing import Literal

from yatdeploy.spec import FINITE_MAX, IMPLEMENTATIONS, ONNX_BFLOAT16, ONNX_FLOAT, ONNX_FLOAT16, YAT_GEMM

Float32Precision = Literal["ieee", "tf32x3"]
FLOAT32_PRECISIONS: tuple[Float32Precision, ...] = ("ieee", "tf32x3")

# The dtypes that have a GPU kernel, by name, with their ONNX element types: the spec's "cuda" coverage
# (spec.IMPLEMENTATIONS), in its order (the C++ launch table's Dtype enum). float64 has none: the library
# decides where it runs (docs/gpu-kernel.md).
_NAMES = {ONNX_FLOAT: "float32", ONNX_FLOAT16: "float16", ONNX_BFLOAT16: "bfloat16"}
KERNEL_DTYPES: dict[str, int] = {_NAMES[t]: t for t in IMPLEMENTATIONS["cuda"].dtypes}

# row_sq_norm_kernel's tile and launch: one program per ROW_SQ_NORM_BLOCK_N rows of W.
ROW_SQ_NORM_BLOCK_N = 64
ROW_SQ_NORM_BLOCK_K = 64
ROW_SQ_NORM_NUM_WARPS = 4


def dtype_name(dtype: object) -> str:
    """"float16" for "float16" or torch.float16."""
    return str(dtype).removeprefix("torch.")


def output_saturation(dtype: object) -> tuple[bool, float]:
    """(SATURATE, FINITE_MAX) for the kernels: 16-bit results clamp to the dtype's finite range."""
    elem_type = KERNEL_DTYPES.get(dtype_name(dtype))
    if elem_type in YAT_GEMM.float32_accumulated:
        return True, FINITE_MAX[elem_type]
    return False, 0.0


def dot_input_precision(dtype: object, float32_precision: Float32Precision) -> str:
    """tl.dot's input_precision: the float32 mode for float32, "ieee" for 16-bit operands (which ignore
    it; one value keeps their compile key single)."""
    if float32_precision not in FLOAT32_PRECISIONS:
        raise ValueError(f"float32_precision must be one of {FLOAT32_PRECISIONS}, not {float32_precision!r}")
    return float32_precision if dtype_name(dtype) == "float32" else "ieee"
