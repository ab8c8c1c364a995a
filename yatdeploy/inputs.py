"""A model's inputs: what the user declares at export (`InputSpec`), and the cases validation runs.

An input is a name, a dtype (a float type, int32, int64 or bool) and dims; a dim is fixed, or dynamic with a
label (`batch`, `seq`), the size of the example and, where known, the largest size the model takes. Inputs
that share a label share the dimension. An integer input that indexes an embedding table also has the values
it may take, [0, the table's rows). The export records the specs, limits included, in the model's metadata
(`limits_from_graph` finds them in the exported graph); validation reads them back (or, for other ONNX files,
reads what the graph says) and runs random cases at several sizes of every dynamic dim (its maximum
included), plus the user's arrays; the server refuses requests outside the limits (`InputLimits`). numpy and
onnx only (no torch): the CLI reads DEFAULT_BATCHES for its help.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from yatdeploy import dtypes, graph
from yatdeploy.errors import InputSpecError, OnnxModelError, option
from yatdeploy.graph import META_DTYPE, META_INPUT_SHAPE, META_INPUTS, metadata

DEFAULT_BATCHES = (1, 7, 32)
BATCH_LABEL = "batch"
INTEGER_TYPES = ("int32", "int64")
INPUT_TYPES = (*dtypes.NAMES, *INTEGER_TYPES, "bool")
# Integer inputs are drawn from [low, high): the smallest embedding table's size when the model has one
# (validation finds it), else this range.
DEFAULT_INT_RANGE = (0, 16)


@dataclass(frozen=True)
class Dim:
    size: int  # the example's size
    label: str | None = None  # None: fixed at `size`; else dynamic, shared by every dim of this label
    max: int | None = None  # a dynamic dim's largest size ('seq=16:1024', or a position table's rows); None: any

    def __str__(self) -> str:
        if self.label is None:
            return str(self.size)
        return f"{self.label}={self.size}" + (f":{self.max}" if self.max is not None else "")

    def as_json(self) -> list:
        return [self.size, self.label] if self.max is None else [self.size, self.label, self.max]


@dataclass(frozen=True)
class InputLimits:
    """What a model takes of an input beyond its dtype and dims, checked before it runs (the server's 400).

    `values`: [low, high) of an integer input that indexes an embedding table: [0, its rows). ONNX's Gather
    would also take -rows..-1, counting from the end, but PyTorch's embedding refuses negative ids: a negative
    id would get an answer the model never gives, so it is outside too. `max_dims`: per dimension of the
    model's shape (the batch one included), the largest size the model takes, None where any."""

    values: tuple[int, int] | None = None
    max_dims: tuple[int | None, ...] = ()

    def __bool__(self) -> bool:
        return self.values is not None or any(m is not None for m in self.max_dims)

    def problem(self, name: str, array: np.ndarray) -> str | None:
        """Why `array` is outside the limits (the first dim too long, else the first value outside), or None."""
        for i, (size, most) in enumerate(zip(array.shape, self.max_dims)):
            if most is not None and size > most:
                return f"input '{name}': dim {i} is {size}, longer than the model's maximum of {most}"
        if self.values is None or array.size == 0 or array.dtype.kind not in "iu":
            return None
        low, high = self.values
        if array.min() >= low and array.max() < high:
            return None
        at = np.unravel_index(int(np.argmax((array < low) | (array >= high))), array.shape)
        return (f"input '{name}': value {array[at]} at [{', '.join(map(str, at))}] is outside [{low}, {high}) "
                "(the embedding's vocabulary)")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # one of INPUT_TYPES
    dims: tuple[Dim, ...]
    values: tuple[int, int] | None = None  # an integer input's valid values, [low, high) (InputLimits.values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)

    @property
    def limits(self) -> InputLimits:
        return InputLimits(self.values, tuple(d.max for d in self.dims))

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype}[{','.join(map(str, self.dims))}]"

    def as_json(self) -> dict:
        record = {"name": self.name, "dtype": self.dtype, "dims": [d.as_json() for d in self.dims]}
        if self.values is not None:
            record["values"] = list(self.values)
        return record

    @staticmethod
    def from_json(raw: Mapping) -> InputSpec:
        """An `as_json` record; records of exports before the limits (no maximum, no values) read too."""
        dims = tuple(Dim(int(d[0]), d[1], None if len(d) < 3 or d[2] is None else int(d[2])) for d in raw["dims"])
        values = raw.get("values")
        return InputSpec(str(raw["name"]), str(raw["dtype"]), dims,
                         None if values is None else (int(values[0]), int(values[1])))


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.:/-]*?)\s*:\s*(\w+)\s*\[(.*)\]\s*$")
_LABEL = re.compile(r"^[A-Za-z_]\w*$")


def parse_input(text: str) -> InputSpec:
    """'NAME:DTYPE[DIM,...]', a dim being a size (fixed), LABEL=SIZE (dynamic) or LABEL=SIZE:MAX (dynamic, at
    most MAX): 'ids:int64[batch=1,seq=32]', 'ids:int64[batch=1,seq=16:1024]'."""
    match = _SPEC.match(text)
    if not match:
        raise InputSpecError(f"{option('inputs')} {text!r}: expected NAME:DTYPE[DIM,...], e.g. 'ids:int64[batch=1,seq=32]'")
    name, dtype, body = match.groups()
    if dtype not in INPUT_TYPES:
        raise InputSpecError(f"{option('inputs')} {text!r}: dtype {dtype!r} is not one of {', '.join(INPUT_TYPES)}")
    dims = []
    for part in (p.strip() for p in body.split(",")) if body.strip() else ():
        label, _, sizes = part.rpartition("=")
        size, colon, most = sizes.partition(":")
        if label and not _LABEL.match(label):
            raise InputSpecError(f"{option('inputs')} {text!r}: dim {part!r}: a label is a name, e.g. seq=32")
        if not size.isdigit() or int(size) < 1 or (colon and not most.isdigit()):
            raise InputSpecError(f"{option('inputs')} {text!r}: dim {part!r}: expected a size >= 1, LABEL=SIZE or "
                                 "LABEL=SIZE:MAX")
        if colon and not label:
            raise InputSpecError(f"{option('inputs')} {text!r}: dim {part!r}: only a dynamic dim has a maximum "
                                 "(LABEL=SIZE:MAX, e.g. seq=16:1024)")
        if colon and int(most) < int(size):
            raise InputSpecError(f"{option('inputs')} {text!r}: dim {part!r}: its maximum {most} is below the "
                                 f"example's size {size}")
        dims.append(Dim(int(size), label or None, int(most) if colon else None))
    return check_specs([InputSpec(name, dtype, tuple(dims))])[0]


def from_shape(shape: Sequence[int], dtype: str, *, dynamic_batch: bool = True, name: str = "input") -> InputSpec:
    """The `--input-shape` shorthand: one input of `dtype`, its first dim the dynamic batch unless told not."""
    dims = [Dim(int(s)) for s in shape]
    if dims and dynamic_batch:
        dims[0] = Dim(dims[0].size, BATCH_LABEL)
    return InputSpec(name, dtype, tuple(dims))


def check_specs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """Distinct names; every label with one size throughout (the example must agree with itself), and one
    maximum, which every dim of the label gets wherever it is given."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputSpecError(f"input names repeat: {', '.join(names)}")
    sizes: dict[str, tuple[int, str]] = {}
    maxima: dict[str, tuple[int, str]] = {}
    for spec in specs:
        for dim in spec.dims:
            if dim.label is None:
                continue
            first = sizes.setdefault(dim.label, (dim.size, spec.name))
            if first[0] != dim.size:
                raise InputSpecError(f"dim {dim.label} is {first[0]} in {first[1]} and {dim.size} in {spec.name}: "
                                     "dims of one label are one dimension, of one size in the example")
            if dim.max is not None:
                most = maxima.setdefault(dim.label, (dim.max, spec.name))
                if most[0] != dim.max:
                    raise InputSpecError(f"dim {dim.label} has the maximum {most[0]} in {most[1]} and {dim.max} in "
                                         f"{spec.name}: dims of one label are one dimension, of one maximum")
    return [replace(s, dims=tuple(replace(d, max=maxima[d.label][0]) if d.label in maxima else d for d in s.dims))
            for s in specs]


def parse_int_ranges(texts: Sequence[str]) -> dict[str, tuple[int, int]]:
    """'NAME=LO:HI' each: integer inputs drawn from [LO, HI)."""
    ranges = {}
    for text in texts:
        name, _, span = text.partition("=")
        low, _, high = span.partition(":")
        try:
            lo, hi = int(low), int(high)
        except ValueError:
            raise InputSpecError(f"{option('int_ranges')} {text!r}: expected NAME=LO:HI, e.g. ids=0:256") from None
        if not name or lo >= hi:
            raise InputSpecError(f"{option('int_ranges')} {text!r}: need a name and LO < HI")
        ranges[name] = (lo, hi)
    return ranges


# --- the ONNX model's inputs -----------------------------------------------------------------------------

def model_specs(model: onnx.ModelProto, given: Sequence[InputSpec] | None = None) -> list[InputSpec]:
    """The model's inputs with example sizes: `given` (checked against the graph), else the export's record,
    else the graph's fixed dims (a free first dim gets size 1 and the batch label)."""
    values = graph.graph_inputs(model)
    if not values:
        raise OnnxModelError("the model has no inputs to feed")
    recorded = metadata(model)
    record = _recorded_specs(recorded)
    if given is not None:
        return _with_recorded_limits(_check_against_graph(list(given), values), record or [])
    if record is not None:
        try:
            return _check_against_graph(record, values)
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxModelError(f"the model's metadata {META_INPUTS} is damaged ({exc})") from None
    if META_INPUT_SHAPE in recorded and len(values) == 1:  # exports of yatdeploy 0.1 before several inputs
        shape = tuple(int(d) for d in recorded[META_INPUT_SHAPE].split(","))
        return _check_against_graph([_from_value(values[0], shape)], values)
    return [_from_value(v, None) for v in values]


def _recorded_specs(recorded: Mapping[str, str]) -> list[InputSpec] | None:
    """The export's record of the inputs (META_INPUTS), None without one; an OnnxModelError if it is damaged."""
    if META_INPUTS not in recorded:
        return None
    try:
        return [InputSpec.from_json(r) for r in json.loads(recorded[META_INPUTS])]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise OnnxModelError(f"the model's metadata {META_INPUTS} is damaged ({exc})") from None


def _with_recorded_limits(specs: list[InputSpec], record: list[InputSpec]) -> list[InputSpec]:
    """`specs` (the user's, checked against the graph) with the limits the export recorded where they give none."""
    by_name = {r.name: r for r in record}
    merged = []
    for spec in specs:
        was = by_name.get(spec.name)
        if was is None or len(was.dims) != len(spec.dims):
            merged.append(spec)
            continue
        dims = tuple(replace(d, max=old.max) if d.label is not None and d.max is None else d
                     for d, old in zip(spec.dims, was.dims))
        merged.append(replace(spec, dims=dims, values=spec.values or was.values))
    return check_specs(merged)


def recorded_limits(recorded: Mapping[str, str]) -> dict[str, InputLimits]:
    """Each input's limits as the export recorded them in the metadata `recorded` (graph.metadata, or
    file_metadata); none for a model without the record."""
    return {s.name: s.limits for s in _recorded_specs(recorded) or [] if s.limits}


_METADATA_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["metadata_props"].number


def _varint(file) -> int | None:
    value = shift = 0
    while True:
        byte = file.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint of more than 10 bytes")


def file_metadata(path: str | Path) -> dict[str, str]:
    """An ONNX file's metadata_props, read without parsing its graph, which holds the weights: the model's
    top-level fields are walked and all but the metadata skipped over. An OnnxModelError if the file is not a
    well-formed ModelProto there."""
    kept = bytearray()
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            file.seek(0)
            while (key := _varint(file)) is not None:
                start = file.tell()
                wire = key & 7
                if wire == 0:
                    if _varint(file) is None:
                        raise ValueError("the file ends inside a field")
                elif wire in (1, 5):
                    file.seek(8 if wire == 1 else 4, 1)
                elif wire == 2:
                    length = _varint(file)
                    if length is None:
                        raise ValueError("the file ends inside a field")
                    if key >> 3 == _METADATA_FIELD:
                        entry = file.read(length)
                        kept += _encode_varint(key) + _encode_varint(length) + entry
                    else:
                        file.seek(length, 1)
                else:
                    raise ValueError(f"wire type {wire} at byte {start}")
                if file.tell() > size:
                    raise ValueError("the file ends inside a field")
        model = onnx.ModelProto()
        model.ParseFromString(bytes(kept))
    except (OSError, ValueError, DecodeError) as exc:
        raise OnnxModelError(f"{Path(path).name}: its metadata can't be read ({exc})") from None
    return metadata(model)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


# --- limits found in the exported graph -------------------------------------------------------------------

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

    def __init__(self, model: onnx.ModelProto) -> None:
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.inputs = {v.name: v for v in graph.graph_inputs(model)}
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
        value = self.inputs.get(name)
        return name if value is not None and graph.dtype_name(value.type.tensor_type.elem_type) in INTEGER_TYPES \
            else None

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


def limits_from_graph(model: onnx.ModelProto) -> tuple[dict[str, _Bound], dict[str, _Bound]]:
    """What the exported graph's lookups bound: each integer input that indexes a table (a Gather of an
    initializer: an embedding) takes values in [0, the smallest such table's rows); each symbolic dim T that
    positions arange(T) index a table by is at most that table's rows. (input name -> bound of its values,
    dim_param -> bound of the dim)."""
    traced = _Graph(model)
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


def with_graph_limits(specs: Sequence[InputSpec], model: onnx.ModelProto) -> list[InputSpec]:
    """`specs` (checked against `model`'s graph) with the limits limits_from_graph finds: an integer input's
    values, and a dim's maximum, unless the user declared a smaller one (a larger one is refused)."""
    values, dims = limits_from_graph(model)
    out = []
    for spec, value in zip(specs, graph.graph_inputs(model)):
        fitted = []
        for dim, declared in zip(value.type.tensor_type.shape.dim, spec.dims):
            bound = dims.get(dim.dim_param) if dim.dim_param and declared.label is not None else None
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


def _dtype_of(value: onnx.ValueInfoProto) -> str:
    name = graph.dtype_name(value.type.tensor_type.elem_type)
    if name not in INPUT_TYPES:
        raise OnnxModelError(f"the model's input '{value.name}' is {name}; yatdeploy feeds {', '.join(INPUT_TYPES)}")
    return name


def _from_value(value: onnx.ValueInfoProto, shape: Sequence[int] | None) -> InputSpec:
    dims = []
    for i, dim in enumerate(value.type.tensor_type.shape.dim):
        label = dim.dim_param or None
        if dim.HasField("dim_value"):
            dims.append(Dim(dim.dim_value))
        elif shape is not None and i < len(shape):
            dims.append(Dim(shape[i], label or (BATCH_LABEL if i == 0 else f"{value.name}_dim{i}")))
        elif i == 0:
            dims.append(Dim(1, label or BATCH_LABEL))
        else:
            raise InputSpecError(f"the model's input '{value.name}' has a dynamic dimension {i} of unknown size",
                                 f"pass {option('inputs')} with its size")
    return InputSpec(value.name, _dtype_of(value), tuple(dims))


def _check_against_graph(specs: list[InputSpec], values: list[onnx.ValueInfoProto]) -> list[InputSpec]:
    if [s.name for s in specs] != [v.name for v in values]:
        if len(specs) == 1 and len(values) == 1:  # the shorthand names its one input; the model's name wins
            specs = [InputSpec(values[0].name, specs[0].dtype, specs[0].dims)]
        else:
            raise InputSpecError(f"inputs {', '.join(s.name for s in specs)} given; the model's are "
                                 f"{', '.join(v.name for v in values)}")
    checked = []
    for spec, value in zip(specs, values):
        dims = value.type.tensor_type.shape.dim
        if len(spec.dims) != len(dims):
            raise InputSpecError(f"input '{value.name}' {','.join(map(str, spec.shape))} has rank {len(spec.dims)}; "
                                 f"the model's input '{value.name}' has rank {len(dims)}")
        fitted = []
        for i, (want, dim) in enumerate(zip(spec.dims, dims)):
            if dim.HasField("dim_value"):
                if i == 0 and want.label == BATCH_LABEL:  # the shorthand's batch on a model with a fixed one
                    want = Dim(dim.dim_value)
                elif dim.dim_value != want.size:
                    raise InputSpecError(f"input '{value.name}' {','.join(map(str, spec.shape))}: dimension {i} is "
                                         f"{want.size}, the model's input '{value.name}' has {dim.dim_value}")
            elif want.label is None:  # free in the graph: validated at several sizes, this one the example's
                want = Dim(want.size, dim.dim_param or (BATCH_LABEL if i == 0 else f"{value.name}_dim{i}"))
            fitted.append(want)
        checked.append(InputSpec(spec.name, _dtype_of(value), tuple(fitted), spec.values))
    return check_specs(checked)


def precision(model: onnx.ModelProto) -> str:
    """The float dtype the model computes in: the export's record, else its first float input's or output's."""
    recorded = metadata(model).get(META_DTYPE)
    if recorded in dtypes.NAMES:
        return recorded
    for value in [*graph.graph_inputs(model), *model.graph.output]:
        name = graph.dtype_name(value.type.tensor_type.elem_type)
        if name in dtypes.NAMES:
            return name
    raise OnnxModelError("the model has no floating-point input or output to compare")


# --- input cases ------------------------------------------------------------------------------------------

@dataclass
class InputCase:
    name: str
    arrays: dict[str, np.ndarray]  # one per model input, by name

    @property
    def rows(self) -> int:
        """The first input's first dimension (the batch, where there is one)."""
        first = next(iter(self.arrays.values()))
        return int(first.shape[0]) if first.ndim else 1


def _labels(specs: Sequence[InputSpec]) -> dict[str, int]:
    return {d.label: d.size for s in specs for d in s.dims if d.label is not None}


def _batch_label(specs: Sequence[InputSpec]) -> str | None:
    first = specs[0].dims[0] if specs[0].dims else None
    return first.label if first is not None else None


def random_inputs(specs: Sequence[InputSpec], rng: np.random.Generator,
                  int_ranges: Mapping[str, tuple[int, int]] | None = None,
                  sizes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """One random array per input, by name: floats standard normal, integers within `int_ranges` (default
    DEFAULT_INT_RANGE), bools either way; dynamic dims at `sizes` (default: the example's)."""
    sizes = _labels(specs) if sizes is None else sizes
    ranges = int_ranges or {}
    arrays = {}
    for spec in specs:
        shape = tuple(sizes[d.label] if d.label is not None else d.size for d in spec.dims)
        if spec.dtype == "bool":
            arrays[spec.name] = rng.random(shape) < 0.5
        elif spec.dtype in INTEGER_TYPES:
            low, high = ranges.get(spec.name, DEFAULT_INT_RANGE)
            arrays[spec.name] = rng.integers(low, high, size=shape).astype(spec.dtype)
        else:
            arrays[spec.name] = rng.standard_normal(shape).astype(np.float32).astype(dtypes.by_name(spec.dtype).numpy)
    return arrays


def random_cases(specs: Sequence[InputSpec], batches: Sequence[int], seed: int,
                 int_ranges: Mapping[str, tuple[int, int]] | None = None) -> list[InputCase]:
    """One case per batch size (other dynamic dims at the example's size), then, for every other dynamic
    dim, cases at sizes 1 and half the example's (batch 2) and at its maximum where it has one (batch 1): a
    model that only works at the example's sequence length fails here. A fixed first dim takes one case at
    its size; a batch with a maximum is not tried past it."""
    rng = np.random.default_rng(seed)
    example = _labels(specs)
    maxima = {d.label: d.max for s in specs for d in s.dims if d.label is not None and d.max is not None}
    batch = _batch_label(specs)
    plans: list[tuple[str, dict[str, int]]] = []
    if batch is None:
        first = specs[0].dims[0].size if specs[0].dims else None
        plans.append(("random" if first is None else f"random batch {first}", dict(example)))
    else:
        if batch in maxima:
            batches = sorted({min(b, maxima[batch]) for b in batches})
        plans += [(f"random batch {b}", {**example, batch: b}) for b in batches]
    for label, size in example.items():
        if label == batch:
            continue
        tried = [(other, min(2, max(batches))) for other in sorted({1, max(1, size // 2)} - {size})]
        if maxima.get(label, size) != size:
            tried.append((maxima[label], 1))
        for other, rows in tried:
            at = {**example, label: other}
            if batch is not None:
                at[batch] = rows
            plans.append((f"random {label} {other}" + (f", batch {at[batch]}" if batch is not None else ""), at))
    return [InputCase(name, random_inputs(specs, rng, int_ranges, sizes)) for name, sizes in plans]


def _fits(spec: InputSpec, array: np.ndarray, batch: str | None) -> bool:
    if array.ndim != len(spec.dims):
        return False
    return all(d.label is not None or array.shape[i] == d.size or (i == 0 and d.label == batch)
               for i, d in enumerate(spec.dims))


def _shape_text(spec: InputSpec) -> str:
    return f"({', '.join(d.label or str(d.size) for d in spec.dims)})"


def _numeric(name: str, array: np.ndarray) -> None:
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            or array.dtype == np.bool_ or array.dtype == dtypes.by_name("bfloat16").numpy):
        raise InputSpecError(f"{option('input_files')} {name}: dtype {array.dtype} is not numeric")


def _as_input(spec: InputSpec, name: str, array: np.ndarray, batch: str | None) -> np.ndarray:
    _numeric(name, array)
    if not _fits(spec, array, batch):
        raise InputSpecError(f"{option('input_files')} {name}: shape {array.shape} does not fit the model input "
                             f"'{spec.name}' {_shape_text(spec)}")
    if spec.dtype in INTEGER_TYPES or spec.dtype == "bool":
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array) & (array == np.round(array))):
            raise InputSpecError(f"{option('input_files')} {name}: input '{spec.name}' is {spec.dtype}, the array "
                                 "holds values that are not whole numbers")
        return array.astype(spec.dtype)
    return array.astype(dtypes.by_name(spec.dtype).numpy)


def load_input_cases(paths: Sequence[str | Path], specs: Sequence[InputSpec]) -> list[InputCase]:
    """The user's arrays. One input: .npy files, and every array of an .npz, each one case. Several inputs:
    .npz files holding one array per input name, each file one case."""
    batch = _batch_label(specs)
    cases: list[InputCase] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise InputSpecError(f"{option('input_files')} {path}: no such file")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputSpecError(f"{option('input_files')} {path}: not a .npy or .npz file ({exc})") from exc
        if len(specs) == 1:
            named = [(path.name, loaded)] if isinstance(loaded, np.ndarray) else list(_npz_members(path, loaded))
            cases += [InputCase(n, {specs[0].name: _as_input(specs[0], n, a, batch)}) for n, a in named]
            continue
        if isinstance(loaded, np.ndarray):
            raise InputSpecError(f"{option('input_files')} {path.name}: the model has {len(specs)} inputs; give an "
                                 f".npz with one array per input ({', '.join(s.name for s in specs)})")
        members = dict(_npz_members(path, loaded))
        keys = {k.split("[", 1)[1].rstrip("]"): v for k, v in members.items()}
        if sorted(keys) != sorted(s.name for s in specs):
            raise InputSpecError(f"{option('input_files')} {path.name}: holds {', '.join(sorted(keys)) or 'nothing'}; "
                                 f"the model's inputs are {', '.join(s.name for s in specs)}")
        arrays = {s.name: _as_input(s, f"{path.name}[{s.name}]", keys[s.name], batch) for s in specs}
        sizes: dict[str, tuple[int, str]] = {}
        for spec in specs:
            for i, dim in enumerate(spec.dims):
                if dim.label is not None:
                    first = sizes.setdefault(dim.label, (arrays[spec.name].shape[i], spec.name))
                    if first[0] != arrays[spec.name].shape[i]:
                        raise InputSpecError(f"{option('input_files')} {path.name}: dim {dim.label} is {first[0]} in "
                                             f"{first[1]} and {arrays[spec.name].shape[i]} in {spec.name}")
        cases.append(InputCase(path.name, arrays))
    return cases


def cases_for(specs: Sequence[InputSpec], random: list[InputCase], user: list[InputCase]) -> list[InputCase]:
    """The cases to run: the random ones and every one of the user's, which must fit the model's fixed first
    dimension where it has one (none is dropped)."""
    first = specs[0].dims[0] if specs[0].dims else None
    if first is not None and first.label is None:
        for case in user:
            if case.rows != first.size:
                raise InputSpecError(
                    f"{option('input_files')} {case.name}: {case.rows} rows, but the model's input "
                    f"'{specs[0].name}' has a fixed first dimension of {first.size}",
                    "give arrays of that many rows, or export with a dynamic batch dimension",
                )
    cases = random + user
    empty = [c.name for c in cases if any(a.size == 0 for a in c.arrays.values())]
    if empty:
        raise InputSpecError(f"input case {empty[0]} holds no values: a comparison on it would compare nothing")
    return cases


def _npz_members(path: Path, archive) -> Iterator[tuple[str, np.ndarray]]:
    """Every array of an .npz, or an error naming the member that can't be read."""
    with archive:
        for key in archive.files:
            try:
                array = archive[key]
            except ValueError as exc:  # object arrays need pickle, which is never allowed here
                raise InputSpecError(f"{option('input_files')} {path.name}[{key}]: {exc}",
                                     "store plain numeric arrays") from exc
            except Exception as exc:  # a damaged member: bad CRC, truncated data, a bad .npy header
                raise InputSpecError(f"{option('input_files')} {path.name}[{key}]: can't be read "
                                     f"({type(exc).__name__}: {exc})") from exc
            yield f"{path.name}[{key}]", array
