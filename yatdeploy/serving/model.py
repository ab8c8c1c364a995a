"""A served model: an ONNX Runtime session (or a TensorRT engine) behind the protocol, with its
signature and checks."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from yatdeploy import dtypes, graph, runtime
from yatdeploy.errors import YatDeployError
from yatdeploy.serving.protocol import InferRequest, ProtocolError, datatype_of
from yatdeploy.serving.repository import DEFAULT_MAX_BATCH_SIZE, ModelSource, check_signature

PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension, the batch one included

    def as_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    shape = tuple(graph.dims(value))
    datatype = datatype_of(dtypes.by_onnx(value.type.tensor_type.elem_type).numpy)
    return TensorInfo(value.name, datatype, shape)


def _signature_info(tensor) -> TensorInfo:
    return TensorInfo(tensor.name, datatype_of(dtypes.by_name(tensor.dtype).numpy), tuple(tensor.shape))


@dataclass(frozen=True)
class UnavailableModel:
    """A model of the repository that could not be loaded, and why: reported, never served."""

    name: str
    version: str
    reason: str


class ServedModel:
    def __init__(self, source: ModelSource, backend: runtime.Backend, intra_op_threads: int = 0) -> None:
        self.name = source.name
        self.version = source.version
        self.source = source
        # 0: the first dimension is not a batch dimension (Triton's max_batch_size: 0).
        self.max_batch_size = source.max_batch_size
        self.max_queue_delay_us = source.max_queue_delay_us
        self.max_queue_size = source.max_queue_size
        self._engine_max_batch: int | None = None  # a TensorRT engine's largest batch
        self.backend = backend
        if backend.kind == "tensorrt":
            self._open_engine(source, backend)
        else:
            if source.path.suffix == ".plan":
                raise YatDeployError(f"model '{source.name}': {source.path.name} is a TensorRT engine; it runs on "
                                     "the tensorrt backend only")
            proto = onnx.load(str(source.path))
            self.inputs = [_tensor_info(v) for v in graph.graph_inputs(proto)]
            self.outputs = [_tensor_info(v) for v in proto.graph.output]
            # Spinning pool threads would take the event loop's core between requests.
            self.session = runtime.create_session(proto, backend, intra_op_threads=intra_op_threads,
                                                  allow_spinning=False)
        self._has_batch_dim = all(graph.has_batch_dim(t.shape) for t in [*self.inputs, *self.outputs])
        if source.config is None:  # no config.pbtxt: the signature decides, as Triton's auto-complete does
            self.max_batch_size = self.max_batch_size if self._has_batch_dim else 0
        else:
            shapes = check_signature(source, self.inputs, self.outputs)
            self.inputs = [replace(t, shape=shapes[t.name]) for t in self.inputs]
            self.outputs = [replace(t, shape=shapes[t.name]) for t in self.outputs]
        if self._engine_max_batch is not None and self.max_batch_size > 0:
            self.max_batch_size = min(self.max_batch_size, self._engine_max_batch)
        self.dynamic_batching = source.dynamic_batching

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
            self.max_queue_size = max_queue_size
        self.dynamic_batching = self.dynamic_batching and dynamic_batching

    def _open_engine(self, source: ModelSource, backend: runtime.Backend) -> None:
        from yatdeploy.trt.engine import BatchProfile

        if source.path.suffix == ".plan":
            self.session = runtime.create_engine_session(source.path, backend, engine=source.path)
        else:  # an .onnx served on TensorRT: an engine for batches 1..max_batch_size, built now
            batch = self.max_batch_size or DEFAULT_MAX_BATCH_SIZE
            self.session = runtime.create_engine_session(source.path, backend,
                                                         profile=BatchProfile(1, min(8, batch), batch))
        signature = self.session.inner.signature
        self.inputs = [_signature_info(t) for t in signature.inputs]
        self.outputs = [_signature_info(t) for t in signature.outputs]
        if graph.has_batch_dim(self.inputs[0].shape):
            self._engine_max_batch = signature.profile.max

    @property
    def platform(self) -> str:
        return TENSORRT_PLATFORM if self.backend.kind == "tensorrt" else PLATFORM

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
        if self.backend.kind == "tensorrt":
            return "TensorRT plugin"
        return "custom-op library kernel" if self.session.uses_library else "ONNX function"

    def config(self) -> dict:
        """The model's configuration as served, in Triton's JSON form (what perf_analyzer reads)."""
        strip = 1 if self.max_batch_size > 0 else 0  # Triton's dims leave out a batch dimension

        def tensor(t: TensorInfo) -> dict:
            return {"name": t.name, "data_type": "TYPE_" + t.datatype, "dims": list(t.shape[strip:])}

        config = {
            "name": self.name,
            "platform": self.platform,
            "backend": "tensorrt" if self.backend.kind == "tensorrt" else "onnxruntime",
            "max_batch_size": self.max_batch_size,
            "input": [tensor(t) for t in self.inputs],
            "output": [tensor(t) for t in self.outputs],
        }
        if self.dynamic_batching:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": self.max_queue_delay_us,
                "default_queue_policy": {"max_queue_size": self.max_queue_size},
            }
        return config

    def check(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        """The session feeds and the request's batch size; a 400 naming the problem otherwise."""
        known = {t.name: t for t in self.inputs}
        for name in request.inputs:
            if name not in known:
                raise ProtocolError(400, f"model '{self.name}' has no input '{name}' (inputs: {', '.join(known)})")
        batch = None
        for info in self.inputs:
            if info.name not in request.inputs:
                raise ProtocolError(400, f"input '{info.name}' is missing")
            array = request.inputs[info.name]
            if request.input_datatypes[info.name] != info.datatype:
                raise ProtocolError(400, f"input '{info.name}': datatype {request.input_datatypes[info.name]}, "
                                         f"the model takes {info.datatype}")
            if len(array.shape) != len(info.shape) or any(
                want != -1 and got != want for got, want in zip(array.shape, info.shape)
            ):
                raise ProtocolError(400, f"input '{info.name}': shape {list(array.shape)}, the model takes "
                                         f"{list(info.shape)}")
            if self.max_batch_size == 0:  # no batch dimension: one inference per request, as Triton counts
                batch = 1
            elif batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise ProtocolError(400, "inputs disagree on the batch size")
        if request.outputs is not None:
            names = {t.name for t in self.outputs}
            for out in request.outputs:
                if out.name not in names:
                    raise ProtocolError(400, f"model '{self.name}' has no output '{out.name}'")
        if self.max_batch_size > 0 and batch is not None and batch > self.max_batch_size:
            raise ProtocolError(400, f"batch size {batch} exceeds the model's max_batch_size {self.max_batch_size}")
        return dict(request.inputs), int(batch or 1)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return runtime.run(self.session, feeds)
