"""A model's inputs: what the user declares at export (`InputSpec`), and what an ONNX model's record says.

An input is a name, a dtype (a float type, int32, int64 or bool) and dims; a dim is fixed, or dynamic with a
label (`batch`, `seq`), the size of the example and, where known, the largest size the model takes. Inputs
that share a label share the dimension. An integer input that indexes an embedding table also has the values
it may take, [0, the table's rows). The export records the specs, limits included, in the model's metadata
(the limits found in the exported graph: exporting/limits.py); validation reads them back (`model_specs`, or,
for other ONNX files, what the graph says) and runs its cases on them (yatdeploy.cases); the server refuses
requests outside the limits (`InputLimits`, `recorded_limits`, `file_metadata`). numpy and onnx only (no torch).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from yatdeploy import dtypes, graph
from yatdeploy.errors import InputSpecError, OnnxModelError, option
from yatdeploy.graph import META_DTYPE, META_INPUT_SHAPE, META_INPUTS, metadata

BATCH_LABEL = "batch"
INTEGER_TYPES = ("int32", "int64")
INPUT_TYPES = (*dtypes.NAMES, *INTEGER_TYPES, "bool")


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
    feeds = graph.declared_inputs(model)
    if not feeds:
        raise OnnxModelError("the model has no inputs to feed")
    recorded = metadata(model)
    record = _recorded_specs(recorded)
    if given is not None:
        return _with_recorded_limits(fit_to_graph(list(given), feeds), record or [])
    if record is not None:
        try:
            return fit_to_graph(record, feeds)
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxModelError(f"the model's metadata {META_INPUTS} is damaged ({exc})") from None
    if META_INPUT_SHAPE in recorded and len(feeds) == 1:  # exports of yatdeploy 0.1 before several inputs
        shape = tuple(int(d) for d in recorded[META_INPUT_SHAPE].split(","))
        return fit_to_graph([_from_graph(feeds[0], shape)], feeds)
    return [_from_graph(f, None) for f in feeds]


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


def _dtype_of(feed: graph.GraphInput) -> str:
    if feed.dtype not in INPUT_TYPES:
        raise OnnxModelError(f"the model's input '{feed.name}' is {feed.dtype}; yatdeploy feeds "
                             f"{', '.join(INPUT_TYPES)}")
    return feed.dtype


def _free_label(feed: graph.GraphInput, i: int) -> str:
    """The label of the graph's free dim `i`: its name in the graph, else `batch` (the first) or NAME_dimI."""
    name = feed.dims[i]
    return name if isinstance(name, str) and name else BATCH_LABEL if i == 0 else f"{feed.name}_dim{i}"


def _from_graph(feed: graph.GraphInput, shape: Sequence[int] | None) -> InputSpec:
    dims = []
    for i, dim in enumerate(feed.dims):
        if isinstance(dim, int):
            dims.append(Dim(dim))
        elif shape is not None and i < len(shape):
            dims.append(Dim(shape[i], _free_label(feed, i)))
        elif i == 0:
            dims.append(Dim(1, _free_label(feed, i)))
        else:
            raise InputSpecError(f"the model's input '{feed.name}' has a dynamic dimension {i} of unknown size",
                                 f"pass {option('inputs')} with its size")
    return InputSpec(feed.name, _dtype_of(feed), tuple(dims))


def fit_to_graph(specs: list[InputSpec], feeds: Sequence[graph.GraphInput]) -> list[InputSpec]:
    """`specs` checked against the graph's inputs (graph.declared_inputs) and taking what the graph decides: its
    dtypes, its one input's name for the shorthand's, the batch a model fixes, a label for a dim it leaves free."""
    if [s.name for s in specs] != [f.name for f in feeds]:
        if len(specs) == 1 and len(feeds) == 1:  # the shorthand names its one input; the model's name wins
            specs = [InputSpec(feeds[0].name, specs[0].dtype, specs[0].dims)]
        else:
            raise InputSpecError(f"inputs {', '.join(s.name for s in specs)} given; the model's are "
                                 f"{', '.join(f.name for f in feeds)}")
    checked = []
    for spec, feed in zip(specs, feeds):
        if len(spec.dims) != len(feed.dims):
            raise InputSpecError(f"input '{feed.name}' {','.join(map(str, spec.shape))} has rank {len(spec.dims)}; "
                                 f"the model's input '{feed.name}' has rank {len(feed.dims)}")
        fitted = []
        for i, (want, dim) in enumerate(zip(spec.dims, feed.dims)):
            if isinstance(dim, int):
                if i == 0 and want.label == BATCH_LABEL:  # the shorthand's batch on a model with a fixed one
                    want = Dim(dim)
                elif dim != want.size:
                    raise InputSpecError(f"input '{feed.name}' {','.join(map(str, spec.shape))}: dimension {i} is "
                                         f"{want.size}, the model's input '{feed.name}' has {dim}")
            elif want.label is None:  # free in the graph: validated at several sizes, this one the example's
                want = Dim(want.size, _free_label(feed, i))
            fitted.append(want)
        checked.append(InputSpec(spec.name, _dtype_of(feed), tuple(fitted), spec.values))
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
