"""Facts read from an ONNX graph's signature, each decided here and nowhere else.

The batch dimension: a tensor has one when its first dimension is not fixed, whatever that dimension
is called (`batch` as yatdeploy exports it, `N` or `batch_size` as `torch.onnx.export(dynamic_axes=...)`
users write it, `s0` from a torch.export program) or when it has no name at all. A fixed first
dimension is never a batch dimension, so inputs are only ever merged or split along a dimension the
model declares free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from yatdeploy import dtypes
from yatdeploy.errors import OnnxModelError
from yatdeploy.serving.datatypes import datatype_of

DYNAMIC = -1


@dataclass
class TensorSignature:
    """A model's input or output, for every backend, build-engine's signature file and the server."""

    name: str
    dtype: str  # dtypes' spelling ("float32"), else ONNX's in lower case ("int64")
    shape: list[int]  # DYNAMIC (-1) for a dimension that is not fixed, the batch one included

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol's name for the dtype ("FP32")."""
        return datatype_of(dtypes.by_name(self.dtype).numpy)

    def as_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def dtype_name(elem_type: int) -> str:
    try:
        return dtypes.by_onnx(elem_type).name
    except KeyError:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def signature(value: onnx.ValueInfoProto) -> TensorSignature:
    return TensorSignature(value.name, dtype_name(value.type.tensor_type.elem_type), dims(value))


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file, or an OnnxModelError saying why it is not one."""
    path = Path(path)
    if not path.exists():
        raise OnnxModelError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxModelError(f"{path}: not a file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise OnnxModelError(f"{path}: not an ONNX model (it does not parse as a ModelProto)") from exc
    if not model.graph.node and not model.graph.output:
        raise OnnxModelError(f"{path}: not an ONNX model (no graph)")
    return model


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller feeds: the graph's inputs that are not initializers."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def dims(value: onnx.ValueInfoProto) -> list[int]:
    """The tensor's dimensions, DYNAMIC (-1) for any that is not a fixed number."""
    return [d.dim_value if d.HasField("dim_value") else DYNAMIC for d in value.type.tensor_type.shape.dim]


def has_batch_dim(shape: list[int] | tuple[int, ...]) -> bool:
    """Whether a shape (as `dims` gives it) starts with a free dimension, i.e. a batch dimension."""
    return len(shape) > 0 and shape[0] == DYNAMIC


def value_has_batch_dim(value: onnx.ValueInfoProto) -> bool:
    return has_batch_dim(dims(value))


def model_has_batch_dim(model: onnx.ModelProto) -> bool:
    """Whether every input and output of the model has a batch dimension (so batches can be merged)."""
    values = [*graph_inputs(model), *model.graph.output]
    return bool(values) and all(value_has_batch_dim(v) for v in values)
