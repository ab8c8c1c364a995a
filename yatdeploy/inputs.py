"""A model's inputs: what the user declares at export (`InputSpec`), and the cases validation runs.

An input is a name, a dtype (a float type, int32, int64 or bool) and dims; a dim is fixed, or dynamic with a
label (`batch`, `seq`) and the size of the example. Inputs that share a label share the dimension. The
export records the specs in the model's metadata; validation reads them back (or, for other ONNX files,
reads what the graph says) and runs random cases at several sizes of every dynamic dim, plus the user's
arrays. numpy and onnx only (no torch): the CLI reads DEFAULT_BATCHES for its help.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

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

    def __str__(self) -> str:
        return str(self.size) if self.label is None else f"{self.label}={self.size}"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # one of INPUT_TYPES
    dims: tuple[Dim, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype}[{','.join(map(str, self.dims))}]"

    def as_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": [[d.size, d.label] for d in self.dims]}

    @staticmethod
    def from_json(raw: Mapping) -> InputSpec:
        return InputSpec(str(raw["name"]), str(raw["dtype"]), tuple(Dim(int(s), lab) for s, lab in raw["dims"]))


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.:/-]*?)\s*:\s*(\w+)\s*\[(.*)\]\s*$")
_LABEL = re.compile(r"^[A-Za-z_]\w*$")


def parse_input(text: str) -> InputSpec:
    """'NAME:DTYPE[DIM,...]', a dim being a size (fixed) or LABEL=SIZE (dynamic): 'ids:int64[batch=1,seq=32]'."""
    match = _SPEC.match(text)
    if not match:
        raise InputSpecError(f"{option('inputs')} {text!r}: expected NAME:DTYPE[DIM,...], e.g. 'ids:int64[batch=1,seq=32]'")
    name, dtype, body = match.groups()
    if dtype not in INPUT_TYPES:
        raise InputSpecError(f"{option('inputs')} {text!r}: dtype {dtype!r} is not one of {', '.join(INPUT_TYPES)}")
    dims = []
    for part in (p.strip() for p in body.split(",")) if body.strip() else ():
        label, _, size = part.rpartition("=")
        if label and not _LABEL.match(label):
            raise InputSpecError(f"{option('inputs')} {text!r}: dim {part!r}: a label is a name, e.g. seq=32")
        if not size.isdigit() or int(size) < 1:
            raise InputSpecError(f"{option('inputs')} {text!r}: dim {part!r}: expected a size >= 1 or LABEL=SIZE")
        dims.append(Dim(int(size), label or None))
    return check_specs([InputSpec(name, dtype, tuple(dims))])[0]


def from_shape(shape: Sequence[int], dtype: str, *, dynamic_batch: bool = True, name: str = "input") -> InputSpec:
    """The `--input-shape` shorthand: one input of `dtype`, its first dim the dynamic batch unless told not."""
    dims = [Dim(int(s)) for s in shape]
    if dims and dynamic_batch:
        dims[0] = Dim(dims[0].size, BATCH_LABEL)
    return InputSpec(name, dtype, tuple(dims))


def check_specs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """Distinct names; every label with one size throughout (the example must agree with itself)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputSpecError(f"input names repeat: {', '.join(names)}")
    sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        for dim in spec.dims:
            if dim.label is None:
                continue
            first = sizes.setdefault(dim.label, (dim.size, spec.name))
            if first[0] != dim.size:
                raise InputSpecError(f"dim {dim.label} is {first[0]} in {first[1]} and {dim.size} in {spec.name}: "
                                     "dims of one label are one dimension, of one size in the example")
    return list(specs)


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
    if given is not None:
        return _check_against_graph(list(given), values)
    recorded = metadata(model)
    if META_INPUTS in recorded:
        try:
            return _check_against_graph([InputSpec.from_json(r) for r in json.loads(recorded[META_INPUTS])], values)
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxModelError(f"the model's metadata {META_INPUTS} is damaged ({exc})") from None
    if META_INPUT_SHAPE in recorded and len(values) == 1:  # exports of yatdeploy 0.1 before several inputs
        shape = tuple(int(d) for d in recorded[META_INPUT_SHAPE].split(","))
        return _check_against_graph([_from_value(values[0], shape)], values)
    return [_from_value(v, None) for v in values]


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
        checked.append(InputSpec(spec.name, _dtype_of(value), tuple(fitted)))
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
    dim, cases at sizes 1 and half the example's (batch 2): a model that only works at the example's
    sequence length fails here. A fixed first dim takes one case at its size."""
    rng = np.random.default_rng(seed)
    example = _labels(specs)
    batch = _batch_label(specs)
    plans: list[tuple[str, dict[str, int]]] = []
    if batch is None:
        first = specs[0].dims[0].size if specs[0].dims else None
        plans.append(("random" if first is None else f"random batch {first}", dict(example)))
    else:
        plans += [(f"random batch {b}", {**example, batch: b}) for b in batches]
    for label, size in example.items():
        if label == batch:
            continue
        for other in sorted({1, max(1, size // 2)} - {size}):
            at = {**example, label: other}
            if batch is not None:
                at[batch] = min(2, max(batches))
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
