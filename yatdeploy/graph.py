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
from yatdeploy.spec import YAT_GEMM

DYNAMIC = -1

# Metadata keys yatdeploy writes into every export (stage 3) and validation reads back.
META_PREFIX = "yatdeploy."
META_INPUT_SHAPE = META_PREFIX + "input_shape"  # one float input's example shape (also written for older readers)
META_INPUTS = META_PREFIX + "inputs"  # JSON: every input's name, dtype and dims (inputs.InputSpec)
META_DTYPE = META_PREFIX + "dtype"
META_SOURCE_SHA256 = META_PREFIX + "source_sha256"
META_SOURCE_FORMAT = META_PREFIX + "source_format"
META_YAT_LAYERS = META_PREFIX + "yat_layers"


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@dataclass
class TensorSignature:
    """A model's input or output, for every backend, build-engine's signature file and the server."""

    name: str
    dtype: str  # dtypes' spelling ("float32"), else ONNX's in lower case ("int64")
    shape: list[int]  # DYNAMIC (-1) for a dimension that is not fixed, the batch one included

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol's name for the dtype ("FP32")."""
        return dtypes.row(self.dtype).v2

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


@dataclass(frozen=True)
class GraphInput:
    """An input a caller feeds, as the graph declares it, every fact read at once (`declared_inputs`)."""

    name: str
    dtype: str  # dtype_name's spelling
    dims: tuple[int | str, ...]  # each dimension: its fixed size, else its name in the graph (dim_param; "" for none)


def declared_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs a caller feeds (graph_inputs), each with its name, dtype and dimensions."""
    return [GraphInput(v.name, dtype_name(v.type.tensor_type.elem_type),
                       tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                             for d in v.type.tensor_type.shape.dim))
            for v in graph_inputs(model)]


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


def yat_gemm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == YAT_GEMM.name and n.domain == YAT_GEMM.domain]


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def node_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of each YatGemm node's X, keyed by node name (shape inference fills gaps)."""
    types = _value_types(model)
    nodes = yat_gemm_nodes(model)
    if any(n.input[0] not in types for n in nodes):
        inferred = onnx.shape_inference.infer_shapes(model)
        types.update(_value_types(inferred))
    result: dict[str, int] = {}
    for node in nodes:
        if node.input[0] not in types:
            raise OnnxModelError(f"YatGemm node {node.name!r}: the dtype of input {node.input[0]!r} is unknown")
        result[node.name] = types[node.input[0]]
    return result
