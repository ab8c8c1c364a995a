"""The check stage's helper: the limits an exported graph sets on its inputs, found once in its lookups.

A Gather of an initializer whose indices are an integer input (through reshapes and casts) bounds that input's
values to [0, the table's rows): an embedding's vocabulary. One whose indices are `Range(start, T, 1)` with T a
symbolic dim read off a `Shape` (learned positions `arange(T)`) bounds that dim to the rows: a position table's
length. `with_graph_limits` records them with the inputs (a dim's `max`, an input's `values`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx.numpy_helper

from yatdeploy.errors import InputSpecError, option
from yatdeploy.graph import GraphInput
from yatdeploy.inputs import INTEGER_TYPES, InputSpec, check_specs

# Ops that pass an integer tensor's values on unchanged (reshaped, reordered, repeated, or cast between
# integer types): ids reaching a Gather through them are the ids as sent.
_SAME_VALUES = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand"}
# Ops that pass a shape's entry on as a number.
_SAME_NUMBER = {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze"}


@dataclass(frozen=True)
class _Bound:
    limit: int
    why: str  # "the model's position table 'position.weight' has 64 rows"


class _Graph:
    """The main graph's producers, constants and symbolic dims, for tracing where a Gather's indices come from."""

    def __init__(self, model: onnx.ModelProto, feeds: Sequence[GraphInput]) -> None:
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.inputs = {f.name: f for f in feeds}
        self.shapes = {v.name: v.type.tensor_type.shape.dim
                       for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]
                       if v.type.HasField("tensor_type")}

    def _through(self, name: str, ops: set[str]) -> str:
        while (node := self.producer.get(name)) is not None and node.op_type in ops and node.input:
            name = node.input[0]
        return name

    def table_rows(self, name: str, axis: int) -> tuple[str, int] | None:
        """The constant table a Gather reads, and its size along `axis`."""
        name = self._through(name, {"Identity", "Cast"})
        if name in self.initializers:
            dims = list(self.initializers[name].dims)
        elif (node := self.producer.get(name)) is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            dims = list(value.dims) if value is not None else []
        else:
            return None
        return (name, dims[axis]) if -len(dims) <= axis < len(dims) else None

    def integer_input(self, name: str) -> str | None:
        """The integer graph input whose values `name` holds unchanged, if any."""
        name = self._through(name, _SAME_VALUES)
        feed = self.inputs.get(name)
        return name if feed is not None and feed.dtype in INTEGER_TYPES else None

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return onnx.numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else onnx.numpy_helper.to_array(value)
        return None

    def symbolic_dim(self, name: str) -> str | None:
        """The symbolic dim (its dim_param) whose size `name` holds: Shape(x)[d] taken by Shape's start/end or
        by a Gather of the shape, where x's dim d is symbolic."""
        node = self.producer.get(self._through(name, _SAME_NUMBER))
        if node is None:
            return None
        if node.op_type == "Gather":
            index = self.constant(node.input[1])
            shape = self.producer.get(self._through(node.input[0], {"Identity"}))
            if shape is None or shape.op_type != "Shape" or index is None or index.size != 1 or \
                    any(a.name in ("start", "end") for a in shape.attribute):
                return None
            return self._dim_param(shape.input[0], int(index.reshape(())))
        if node.op_type == "Shape":
            attrs = {a.name: a.i for a in node.attribute}
            dims = self.shapes.get(node.input[0])
            if dims is None or "start" not in attrs:
                return None
            start, end = attrs["start"], attrs.get("end", len(dims))
            start, end = (start + len(dims) if start < 0 else start), (end + len(dims) if end < 0 else end)
            return self._dim_param(node.input[0], start) if end - start == 1 else None
        return None

    def _dim_param(self, name: str, index: int) -> str | None:
        dims = self.shapes.get(name)
        if dims is None or not -len(dims) <= index < len(dims):
            return None
        return dims[index].dim_param or None

    def position_dim(self, name: str) -> str | None:
        """The symbolic dim T when `name` holds Range(start, T, 1) (positions arange(T)), passed on unchanged."""
        node = self.producer.get(self._through(name, _SAME_VALUES))
        if node is None or node.op_type != "Range":
            return None
        start, delta = self.constant(node.input[0]), self.constant(node.input[2])
        if start is None or delta is None or start.size != 1 or delta.size != 1 or int(delta.reshape(())) != 1 \
                or int(start.reshape(())) < 0:
            return None
        return self.symbolic_dim(node.input[1])


def limits_from_graph(model: onnx.ModelProto,
                      feeds: Sequence[GraphInput]) -> tuple[dict[str, _Bound], dict[str, _Bound]]:
    """What the exported graph's lookups bound: each integer input that indexes a table (a Gather of an
    initializer: an embedding) takes values in [0, the smallest such table's rows); each symbolic dim T that
    positions arange(T) index a table by is at most that table's rows. (input name -> bound of its values,
    dim_param -> bound of the dim)."""
    traced = _Graph(model, feeds)
    values: dict[str, _Bound] = {}
    dims: dict[str, _Bound] = {}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        table = traced.table_rows(node.input[0], axis)
        if table is None:
            continue
        name, rows = table
        if (ids := traced.integer_input(node.input[1])) is not None:
            if ids not in values or rows < values[ids].limit:
                values[ids] = _Bound(rows, f"the model's embedding table '{name}' has {rows} rows")
        elif (dim := traced.position_dim(node.input[1])) is not None:
            if dim not in dims or rows < dims[dim].limit:
                dims[dim] = _Bound(rows, f"the model's position table '{name}' has {rows} rows")
    return values, dims


def with_graph_limits(specs: Sequence[InputSpec], model: onnx.ModelProto,
                      feeds: Sequence[GraphInput]) -> list[InputSpec]:
    """`specs` (fitted to `model`'s graph, whose inputs are `feeds`) with the limits limits_from_graph finds: an
    integer input's values, and a dim's maximum, unless the user declared a smaller one (a larger one is refused)."""
    values, dims = limits_from_graph(model, feeds)
    out = []
    for spec, feed in zip(specs, feeds):
        fitted = []
        for dim, declared in zip(feed.dims, spec.dims):
            bound = dims.get(dim) if isinstance(dim, str) and dim and declared.label is not None else None
            if bound is None:
                fitted.append(declared)
            elif declared.max is not None and declared.max > bound.limit:
                raise InputSpecError(f"input '{spec.name}': dim {declared.label} is declared up to {declared.max}, "
                                     f"but {bound.why}", f"declare at most {declared.label}={declared.size}:"
                                                         f"{bound.limit} in {option('inputs')}")
            else:
                fitted.append(replace(declared, max=min(bound.limit, declared.max or bound.limit)))
        bound = values.get(spec.name)
        out.append(replace(spec, dims=tuple(fitted), values=(0, bound.limit) if bound is not None else spec.values))
    return check_specs(out)
