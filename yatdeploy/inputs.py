"""The inputs validation runs a model on: random batches and the user's arrays, fitted to the ONNX model's input.

numpy and onnx only (no torch): the CLI reads DEFAULT_BATCHES for its help.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from yatdeploy import dtypes, graph
from yatdeploy.errors import InputSpecError, OnnxModelError, option
from yatdeploy.graph import META_INPUT_SHAPE, metadata

DEFAULT_BATCHES = (1, 7, 32)


@dataclass
class InputCase:
    name: str
    array: np.ndarray


def onnx_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inputs = graph.graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxModelError(f"the model has {len(inputs)} inputs; yatdeploy validates single-input models")
    return inputs[0]


def input_dtype(model: onnx.ModelProto) -> str:
    """The CLI name of the model input's dtype; the input must be of a floating type YatGemm admits."""
    graph_input = onnx_input(model)
    try:
        return dtypes.by_onnx(graph_input.type.tensor_type.elem_type).name
    except KeyError:
        raise OnnxModelError(f"the model's input '{graph_input.name}' is not of a floating type") from None


def resolve_input_shape(model: onnx.ModelProto, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The per-sample input shape: --input-shape, else the export's record, else the model's static dims."""
    graph_input = onnx_input(model)
    dims = graph_input.type.tensor_type.shape.dim
    if given is not None:
        if len(given) != len(dims):
            raise InputSpecError(
                f"{option('input_shape')} {','.join(map(str, given))} has rank {len(given)}; the model's input "
                f"'{graph_input.name}' has rank {len(dims)}"
            )
        for i, (want, dim) in enumerate(zip(given, dims)):
            if i > 0 and dim.HasField("dim_value") and dim.dim_value != want:
                raise InputSpecError(
                    f"{option('input_shape')} {','.join(map(str, given))}: dimension {i} is {want}, "
                    f"the model's input '{graph_input.name}' has {dim.dim_value}"
                )
        return given
    recorded = metadata(model).get(META_INPUT_SHAPE)
    if recorded:
        return tuple(int(d) for d in recorded.split(","))
    shape = []
    for i, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif i == 0:
            shape.append(1)
        else:
            raise InputSpecError(
                f"the model's input '{graph_input.name}' has a dynamic dimension {i}", f"pass {option('input_shape')}"
            )
    return tuple(shape)


def random_cases(sample_shape: Sequence[int], dtype: str, batches: Sequence[int], seed: int) -> list[InputCase]:
    rng = np.random.default_rng(seed)
    np_dtype = dtypes.by_name(dtype).numpy
    cases = []
    for batch in batches:
        shape = (batch, *sample_shape[1:])
        cases.append(InputCase(f"random batch {batch}", rng.standard_normal(shape).astype(np.float32).astype(np_dtype)))
    return cases


def load_input_cases(paths: Sequence[str | Path], sample_shape: Sequence[int], dtype: str) -> list[InputCase]:
    """Arrays from .npy files and from every array in .npz files, checked against the input shape."""
    np_dtype = dtypes.by_name(dtype).numpy
    cases: list[InputCase] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise InputSpecError(f"{option('input_files')} {path}: no such file")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputSpecError(f"{option('input_files')} {path}: not a .npy or .npz file ({exc})") from exc
        named = [(path.name, loaded)] if isinstance(loaded, np.ndarray) else list(_npz_members(path, loaded))
        for name, array in named:
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise InputSpecError(f"{option('input_files')} {name}: dtype {array.dtype} is not numeric")
            if array.ndim != len(sample_shape) or tuple(array.shape[1:]) != tuple(sample_shape[1:]):
                raise InputSpecError(
                    f"{option('input_files')} {name}: shape {array.shape} does not fit the model input "
                    f"(batch, {', '.join(map(str, sample_shape[1:]))})"
                )
            cases.append(InputCase(name, array.astype(np_dtype)))
    return cases


def cases_for(graph_input: onnx.ValueInfoProto, random: list[InputCase], user: list[InputCase],
               sample_shape: Sequence[int], dtype: str, seed: int) -> list[InputCase]:
    """The cases to run: every one when the input has a batch dimension; for a fixed first dimension,
    the random cases at that size and the user's, each of which must fit it (none is dropped)."""
    shape = graph.dims(graph_input)
    if not graph.has_batch_dim(shape):
        fixed = shape[0] if shape else None
        for case in user:
            if fixed is not None and case.array.shape[0] != fixed:
                raise InputSpecError(
                    f"{option('input_files')} {case.name}: {case.array.shape[0]} rows, but the model's input "
                    f"'{graph_input.name}' has a fixed first dimension of {fixed}",
                    "give arrays of that many rows, or export with a dynamic batch dimension",
                )
        random = random_cases(sample_shape, dtype, (fixed,), seed) if fixed is not None else random[:1]
    cases = random + user
    empty = [c.name for c in cases if c.array.size == 0]
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
                raise InputSpecError(f"{option('input_files')} {path.name}[{key}]: {exc}", "store plain numeric arrays") from exc
            except Exception as exc:  # a damaged member: bad CRC, truncated data, a bad .npy header
                raise InputSpecError(f"{option('input_files')} {path.name}[{key}]: can't be read ({type(exc).__name__}: {exc})") from exc
            yield f"{path.name}[{key}]", array
