"""Facts read from an ONNX graph's signature, each decided here and nowhere else.

The batch dimension: a tensor has one when its first dimension is not fixed, whatever that dimension
is called (`batch` as yatdeploy exports it, `N` or `batch_size` as `torch.onnx.export(dynamic_axes=...)`
users write it, `s0` from a torch.export program) or when it has no name at all. A fixed first
dimension is never a batch dimension, so inputs are only ever merged or split along a dimension the
model declares free.
"""

from __future__ import annotations

import onnx

DYNAMIC = -1


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
