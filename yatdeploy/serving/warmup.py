"""Model warmup, Triton's `model_warmup`: a loaded model runs its config's samples before it is served. Stage: load
(server.load_models runs warm_up on each model it opens, before the InferenceServer deploys it, so that the model's
readiness says not ready until it is warmed; a load request answers once its models are warmed).

Each sample (repository.WarmupSample) gives every input of the model: its datatype and dims (the batch dimension left
out when the model batches: `batch_size` rows are sent) and its data:

- zero_data: zeros (False, and empty strings for BYTES);
- random_data: numbers from a fixed seed, normal for floats and integers in [0, 100) or within the input's limits
  (an integer input the model looks up in a table), random booleans, and BYTES as strings of 1-8 decimal digits;
- input_data_file: the raw little-endian bytes of one row in row-major order (a BYTES element as a 4-byte length
  and its bytes), read from the version folder's warmup/ folder; the file must hold exactly the dims' elements
  and must not lead out of that folder (a symbolic link out of it is refused).

A sample's one row is repeated `batch_size` times; it runs `count` times (at least once). The model runs it directly,
not through the batcher, so warmup counts nowhere: not in the statistics, not in the metrics (as Triton, whose
statistics leave warmup out). A sample whose inputs do not fit the model, or whose run fails, makes the model fail
to load with a reason naming the sample.
"""

from __future__ import annotations

import math
import os

import numpy as np

from yatdeploy.errors import YatDeployError
from yatdeploy.progress import Progress
from yatdeploy.serving.datatypes import DATATYPES
from yatdeploy.serving.model import ServedModel
from yatdeploy.serving.protocol import InferRequest, InvalidInput
from yatdeploy.serving.repository import WARMUP_FOLDER, WarmupInput, WarmupSample

RANDOM_SEED = 0
RANDOM_INTEGERS = (0, 100)  # random_data's integers, where the input has no limits of its own


def warm_up(model: ServedModel, progress: Progress) -> None:
    """Run every warmup sample of `model`'s config; a YatDeployError naming the model and the sample that failed."""
    for sample in model.source.warmup:
        with progress.step(f"warming up {model.name} (version {model.version}): sample '{sample.name}'"):
            feeds = sample_feeds(model, sample)
            for _ in range(max(1, sample.count)):
                try:
                    model.run(feeds)
                except Exception as exc:  # the runtime's own error: the model does not load
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise _failed(model, sample, f"its run failed: {type(exc).__name__}: {first}") from None


def _failed(model: ServedModel, sample: WarmupSample, problem: str) -> YatDeployError:
    return YatDeployError(f"model '{model.name}': warmup sample '{sample.name}': {problem}")


def sample_feeds(model: ServedModel, sample: WarmupSample) -> dict[str, np.ndarray]:
    """The feeds of `sample`, checked as a request's inputs are (names, datatypes, shapes, limits)."""
    rng = np.random.default_rng(RANDOM_SEED)
    inputs, datatypes = {}, {}
    batch = (sample.batch_size,) if model.max_batch_size > 0 else ()
    for given in sample.inputs:
        row = _row(model, sample, given, rng)
        inputs[given.name] = np.broadcast_to(row, batch + row.shape).copy() if batch else row
        datatypes[given.name] = given.datatype
    try:
        feeds, _ = model.check(InferRequest(id=None, inputs=inputs, input_datatypes=datatypes))
    except InvalidInput as exc:
        raise _failed(model, sample, exc.message) from None
    return feeds


def _row(model: ServedModel, sample: WarmupSample, given: WarmupInput, rng: np.random.Generator) -> np.ndarray:
    dtype = DATATYPES[given.datatype]
    count = math.prod(given.dims)
    if given.data == "zero_data":
        return np.full(given.dims, b"", dtype=object) if dtype == object else np.zeros(given.dims, dtype)
    if given.data == "random_data":
        return _random(model, given, dtype, rng)
    data = _read_file(model, sample, given)
    if dtype != object:
        if len(data) != count * dtype.itemsize:
            raise _failed(model, sample, f"input '{given.name}': {given.file} holds {len(data)} bytes, dims "
                                         f"{list(given.dims)} of {given.datatype} take {count * dtype.itemsize}")
        return np.frombuffer(data, dtype).reshape(given.dims).copy()
    elements, at = [], 0
    while at + 4 <= len(data) and len(elements) < count:
        size = int.from_bytes(data[at:at + 4], "little")
        elements.append(data[at + 4:at + 4 + size])
        at += 4 + size
    if len(elements) != count or at != len(data):
        raise _failed(model, sample, f"input '{given.name}': {given.file} does not hold exactly {count} BYTES "
                                     "elements (each a 4-byte little-endian length, then its bytes)")
    row = np.empty(count, dtype=object)
    row[:] = elements
    return row.reshape(given.dims)


def _random(model: ServedModel, given: WarmupInput, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if dtype == object:
        digits = [str(v) for v in rng.integers(0, 10**8, size=math.prod(given.dims))]
        row = np.empty(len(digits), dtype=object)
        row[:] = [d.encode() for d in digits]
        return row.reshape(given.dims)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=given.dims).astype(np.bool_)
    if dtype.kind in "iu":
        limits = model.limits.get(given.name)
        low, high = limits.values if limits is not None and limits.values is not None else RANDOM_INTEGERS
        return rng.integers(low, high, size=given.dims).astype(dtype)
    return rng.standard_normal(given.dims).astype(dtype)


def _read_file(model: ServedModel, sample: WarmupSample, given: WarmupInput) -> bytes:
    """The bytes of `given`'s input_data_file, in the version folder's warmup/ folder and nowhere else."""
    folder = model.source.path.parent / WARMUP_FOLDER
    path = folder / given.file
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise _failed(model, sample, f"input '{given.name}': input_data_file {given.file!r} leads out of the "
                                     f"version's {WARMUP_FOLDER}/ folder: refused")
    if not path.exists() or path.is_dir():
        raise _failed(model, sample, f"input '{given.name}': input_data_file {given.file!r}: no such file in the "
                                     f"version's {WARMUP_FOLDER}/ folder")
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise _failed(model, sample, f"input '{given.name}': input_data_file {given.file!r}: "
                                     f"{exc.strerror or exc}") from None
