"""A served model: a backend's runner behind the protocol, with its signature and checks."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from yatdeploy import backends, dtypes, graph
from yatdeploy.decoder import DecoderLayout, layout_of
from yatdeploy.errors import YatDeployError
from yatdeploy.graph import TensorSignature
from yatdeploy.inputs import InputLimits, file_metadata, recorded_limits
from yatdeploy.packaging import DEFAULT_MAX_BATCH_SIZE, LIMIT_PREFIX, limit_parameters
from yatdeploy.serving.labels import read_labels
from yatdeploy.serving.protocol import InferRequest, InvalidInput
from yatdeploy.serving.repository import ModelSource, check_signature


@dataclass(frozen=True)
class UnavailableModel:
    """A model of the repository that could not be loaded, and why: reported, never served."""

    name: str
    version: str
    reason: str


class ServedModel:
    def __init__(self, source: ModelSource, backend: backends.Backend, intra_op_threads: int = 0) -> None:
        self.name = source.name
        self.version = source.version
        self.source = source
        # 0: the first dimension is not a batch dimension (Triton's max_batch_size: 0).
        self.max_batch_size = source.max_batch_size
        self.max_queue_delay_us = source.max_queue_delay_us
        self.queue_policy = source.queue_policy
        self.backend = backend
        # Each output's classification labels (config.pbtxt label_filename), read once, before the model file is
        # opened: serving.labels.
        self.labels: dict[str, tuple[str, ...]] = read_labels(source)
        try:
            backends.check_file(backend, source.path)
        except YatDeployError as exc:
            raise YatDeployError(f"model '{source.name}': {exc.message}") from None
        batch = self.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        # Spinning pool threads would take the event loop's core between requests; an engine built now (an
        # .onnx served on TensorRT) takes batches 1..max_batch_size.
        self.runner = backend.open(source.path, backends.Options(
            intra_op_threads=intra_op_threads, allow_spinning=False, batch_profile=(1, min(8, batch), batch)))
        self.inputs = list(self.runner.inputs)
        self.outputs = list(self.runner.outputs)
        # The largest batch, along a batch dimension, the runner takes (an engine's profile) or the inputs' limits.
        self._engine_max_batch: int | None = None
        if self.runner.max_batch is not None and graph.has_batch_dim(self.inputs[0].shape):
            self._engine_max_batch = self.runner.max_batch
        self._has_batch_dim = all(graph.has_batch_dim(t.shape) for t in [*self.inputs, *self.outputs])
        if source.config is None:  # no config.pbtxt: the signature decides, as Triton's auto-complete does
            self.max_batch_size = self.max_batch_size if self._has_batch_dim else 0
        else:
            shapes = check_signature(source, self.inputs, self.outputs)
            self.inputs = [replace(t, shape=shapes[t.name]) for t in self.inputs]
            self.outputs = [replace(t, shape=shapes[t.name]) for t in self.outputs]
        recorded = file_metadata(source.path) if source.path.suffix == ".onnx" else {}  # the export's record
        self.limits = self._limits(source, recorded)
        batch_limits = [limit.max_dims[0] for limit in self.limits.values() if limit.max_dims and self.max_batch_size]
        if any(most is not None for most in batch_limits):  # a batch with a maximum ('batch=1:8'): merged ones too
            self._engine_max_batch = min(m for m in [*batch_limits, self._engine_max_batch] if m is not None)
        if self._engine_max_batch is not None and self.max_batch_size > 0:
            self.max_batch_size = min(self.max_batch_size, self._engine_max_batch)
        self.dynamic_batching = source.dynamic_batching
        # A decoder export (export --kv-cache) also generates (serving.generation); None for any other model.
        self.decoder: DecoderLayout | None = layout_of(recorded)

    def _limits(self, source: ModelSource, recorded: dict[str, str]) -> dict[str, InputLimits]:
        """Each input's limits: the export's record in the model's metadata (`recorded`), each overridden by the
        config.pbtxt's limit parameters where it gives them (checked against the inputs here)."""
        limits = recorded_limits(recorded)
        shapes = {t.name: t.shape for t in self.inputs}
        limits = {name: limit for name, limit in limits.items()
                  if name in shapes and len(limit.max_dims) == len(shapes[name])}
        batch = (None,) if source.max_batch_size > 0 else ()
        for name, given in source.input_limits.items():
            if name not in shapes:
                raise YatDeployError(f"model '{self.name}': config.pbtxt parameters {LIMIT_PREFIX}{name}.*: the model "
                                     f"has no input '{name}' (inputs: {', '.join(shapes)})")
            was = limits.get(name, InputLimits(None, (None,) * len(shapes[name])))
            max_dims = batch + given.max_dims if given.max_dims else was.max_dims
            if len(max_dims) != len(shapes[name]):
                raise YatDeployError(f"model '{self.name}': config.pbtxt parameters {LIMIT_PREFIX}{name}.max_dims: "
                                     f"{len(given.max_dims)} sizes for the {len(shapes[name]) - len(batch)} dims of "
                                     f"input '{name}'")
            limits[name] = InputLimits(given.values if given.values is not None else was.values, max_dims)
        return {name: limit for name, limit in limits.items() if limit}

    @property
    def merges_requests(self) -> bool:
        """Whether requests are merged into one run: only along a batch dimension, with dynamic batching."""
        return self.max_batch_size > 0 and self._has_batch_dim and self.dynamic_batching

    def override_batching(self, *, max_batch_size: int | None, max_queue_delay_us: int | None,
                          max_queue_size: int | None, dynamic_batching: bool) -> None:
        """The server's settings (`serve --max-batch-size ...`) over the model's own; None keeps the model's.
        They never give a batch dimension to a model without one (max_batch_size 0)."""
        if max_batch_size is not None and self.max_batch_size > 0:
            self.max_batch_size = min(max_batch_size, self._engine_max_batch or max_batch_size)
        if max_queue_delay_us is not None:
            self.max_queue_delay_us = max_queue_delay_us
        if max_queue_size is not None:
            self.queue_policy = self.queue_policy.with_max_queue_size(max_queue_size)
        self.dynamic_batching = self.dynamic_batching and dynamic_batching

    @property
    def platform(self) -> str:
        return self.backend.triton_platform

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [t.as_json() for t in self.inputs],
            "outputs": [t.as_json() for t in self.outputs],
            "parameters": {
                "backend": self.backend.name,
                "yat_gemm": self._yat_gemm(),
                "max_batch_size": self.max_batch_size,
            },
        }

    def _yat_gemm(self) -> str:
        return self.runner.yat_gemm_execution().kernel

    def config(self) -> dict:
        """The model's configuration as served, in Triton's JSON form (what perf_analyzer reads)."""
        strip = 1 if self.max_batch_size > 0 else 0  # Triton's dims leave out a batch dimension
        formats = {t.name: t.format for t in self.source.inputs}  # as config.pbtxt gives them, if it does
        label_files = {t.name: t.label_filename for t in self.source.outputs}

        def tensor(t: TensorSignature) -> dict:
            return {"name": t.name, "data_type": dtypes.row(t.dtype).triton, "dims": list(t.shape[strip:])}

        # Triton's JSON has an input's format and an output's label_filename, their defaults too: clients read them
        config = {
            "name": self.name,
            "platform": self.platform,
            "backend": self.backend.triton_backend,
            "max_batch_size": self.max_batch_size,
            "input": [{**tensor(t), "format": formats.get(t.name, "FORMAT_NONE")} for t in self.inputs],
            "output": [{**tensor(t), "label_filename": label_files.get(t.name, "")} for t in self.outputs],
        }
        parameters = limit_parameters(self.limits, batching=strip == 1)
        if parameters:
            config["parameters"] = {key: {"string_value": value} for key, value in parameters.items()}
        if self.dynamic_batching:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": self.max_queue_delay_us,
                **self.queue_policy.as_json(),
            }
        if self.source.response_cache:
            config["response_cache"] = {"enable": True}
        return config

    def check(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        """The session feeds and the request's batch size; InvalidInput naming the problem otherwise."""
        known = {t.name: t for t in self.inputs}
        for name in request.inputs:
            if name not in known:
                raise InvalidInput(f"model '{self.name}' has no input '{name}' (inputs: {', '.join(known)})")
        batch = None
        for info in self.inputs:
            if info.name not in request.inputs:
                raise InvalidInput(f"input '{info.name}' is missing")
            array = request.inputs[info.name]
            if request.input_datatypes[info.name] != info.datatype:
                raise InvalidInput(f"input '{info.name}': datatype {request.input_datatypes[info.name]}, "
                                   f"the model takes {info.datatype}")
            if len(array.shape) != len(info.shape) or any(
                want != -1 and got != want for got, want in zip(array.shape, info.shape)
            ):
                raise InvalidInput(f"input '{info.name}': shape {list(array.shape)}, the model takes "
                                   f"{list(info.shape)}")
            limits = self.limits.get(info.name)
            if limits is not None and (problem := limits.problem(info.name, array)) is not None:
                raise InvalidInput(problem)  # what ONNX Runtime would fail on (a Gather), or answer wrongly
            if self.max_batch_size == 0:  # no batch dimension: one inference per request, as Triton counts
                batch = 1
            elif batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise InvalidInput("inputs disagree on the batch size")
        if request.outputs is not None:
            names = {t.name for t in self.outputs}
            for out in request.outputs:
                if out.name not in names:
                    raise InvalidInput(f"model '{self.name}' has no output '{out.name}'")
        if self.max_batch_size > 0 and batch is not None and batch > self.max_batch_size:
            raise InvalidInput(f"batch size {batch} exceeds the model's max_batch_size {self.max_batch_size}")
        return dict(request.inputs), int(batch or 1)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(feeds)

    def close(self) -> None:
        """Let go of the runner (its session and memory) once the model is unloaded."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()
        self.runner = None
