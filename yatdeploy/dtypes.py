"""One table for the floating dtypes the project handles, in each library's spelling."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch
from onnx import TensorProto


@dataclass(frozen=True)
class FloatType:
    name: str  # the CLI spelling
    torch: torch.dtype
    onnx: int
    numpy: np.dtype
    ort: str  # the type string ONNX Runtime reports, e.g. "tensor(float)"


FLOAT_TYPES: tuple[FloatType, ...] = (
    FloatType("float32", torch.float32, TensorProto.FLOAT, np.dtype(np.float32), "tensor(float)"),
    FloatType("float64", torch.float64, TensorProto.DOUBLE, np.dtype(np.float64), "tensor(double)"),
    FloatType("float16", torch.float16, TensorProto.FLOAT16, np.dtype(np.float16), "tensor(float16)"),
    FloatType(
        "bfloat16", torch.bfloat16, TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16), "tensor(bfloat16)"
    ),
)

NAMES = tuple(t.name for t in FLOAT_TYPES)


def by_name(name: str) -> FloatType:
    for t in FLOAT_TYPES:
        if t.name == name:
            return t
    raise KeyError(name)


def by_torch(dtype: torch.dtype) -> FloatType:
    for t in FLOAT_TYPES:
        if t.torch == dtype:
            return t
    raise KeyError(str(dtype))


def by_onnx(elem_type: int) -> FloatType:
    for t in FLOAT_TYPES:
        if t.onnx == elem_type:
            return t
    raise KeyError(TensorProto.DataType.Name(elem_type))
