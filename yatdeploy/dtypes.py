"""One table of the tensor dtypes the project handles, in each library's spelling.

FLOAT_TYPES are the dtypes a model is exported in (the CLI's --dtype); OTHER_TYPES are the further
tensor types the serving protocol carries. serving.datatypes (KServe v2 names) and serving.repository
(Triton's TYPE_ names) derive their tables from this one. Two modules keep their own spellings because
they may not import torch or onnx: spec.py (ONNX numbers, standard library only; tests/test_spec.py checks
them against onnx) and trt/plugin_logic.py (TensorRT names; tests/test_trt_plugin.py checks them here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from onnx import TensorProto

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str  # yatdeploy's spelling (the CLI's, for FLOAT_TYPES), also torch's: torch.<name>
    onnx: int
    numpy: np.dtype
    ort: str  # the type string ONNX Runtime reports, e.g. "tensor(float)"
    v2: str  # the Open Inference Protocol's (KServe v2) datatype, e.g. "FP32"
    tensorrt: str | None  # the tensorrt.DataType member, None where TensorRT has none

    @property
    def torch(self) -> torch.dtype:
        import torch  # on first use: the CLI reads this table for its help, without torch

        return getattr(torch, self.name)

    @property
    def triton(self) -> str:
        """The data_type in a Triton config.pbtxt, e.g. TYPE_FP32 (TYPE_STRING for BYTES)."""
        return "TYPE_STRING" if self.v2 == "BYTES" else "TYPE_" + self.v2


FloatType = DType  # the name before the table had non-float rows

FLOAT_TYPES: tuple[DType, ...] = (
    DType("float32", TensorProto.FLOAT, np.dtype(np.float32), "tensor(float)", "FP32", "FLOAT"),
    DType("float64", TensorProto.DOUBLE, np.dtype(np.float64), "tensor(double)", "FP64", None),
    DType("float16", TensorProto.FLOAT16, np.dtype(np.float16), "tensor(float16)", "FP16", "HALF"),
    DType("bfloat16", TensorProto.BFLOAT16, np.dtype(ml_dtypes.bfloat16), "tensor(bfloat16)",
          "BF16", "BF16"),
)


def _integer(name: str, onnx_type: int, v2: str, tensorrt: str | None) -> DType:
    return DType(name, onnx_type, np.dtype(name), f"tensor({name})", v2, tensorrt)


OTHER_TYPES: tuple[DType, ...] = (
    DType("bool", TensorProto.BOOL, np.dtype(np.bool_), "tensor(bool)", "BOOL", "BOOL"),
    _integer("uint8", TensorProto.UINT8, "UINT8", "UINT8"),
    _integer("uint16", TensorProto.UINT16, "UINT16", None),
    _integer("uint32", TensorProto.UINT32, "UINT32", None),
    _integer("uint64", TensorProto.UINT64, "UINT64", None),
    _integer("int8", TensorProto.INT8, "INT8", "INT8"),
    _integer("int16", TensorProto.INT16, "INT16", None),
    _integer("int32", TensorProto.INT32, "INT32", "INT32"),
    _integer("int64", TensorProto.INT64, "INT64", "INT64"),
    # Strings: numpy object arrays of str (as ONNX Runtime takes them); BYTES in the protocol, UTF-8 on the wire.
    DType("string", TensorProto.STRING, np.dtype(object), "tensor(string)", "BYTES", None),
)
TYPES: tuple[DType, ...] = FLOAT_TYPES + OTHER_TYPES

NAMES = tuple(t.name for t in FLOAT_TYPES)


def row(name: str) -> DType:
    """The row of any dtype in the table, float or not, by yatdeploy's name."""
    for t in TYPES:
        if t.name == name:
            return t
    raise KeyError(name)


def by_name(name: str) -> FloatType:
    """A float dtype (one a model is exported in) by name; KeyError for any other."""
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
