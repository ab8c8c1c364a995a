"""The input cases validation runs: random batches at several sizes of every dynamic dim, and the user's arrays.

Random cases (`random_cases`) are drawn from a model's input specs (`yatdeploy.inputs`): one per batch size,
then each other dynamic dim at other sizes, its maximum included; the export draws its example the same way
(`random_inputs`). The user's .npy/.npz arrays (`load_input_cases`) are checked against the specs. No torch:
the CLI reads DEFAULT_BATCHES for its help.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yatdeploy import dtypes
from yatdeploy.errors import InputSpecError, option
from yatdeploy.inputs import INTEGER_TYPES, InputSpec

DEFAULT_BATCHES = (1, 7, 32)
# Integer inputs are drawn from [low, high): the smallest embedding table's size when the model has one
# (validation finds it), else this range.
DEFAULT_INT_RANGE = (0, 16)


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
