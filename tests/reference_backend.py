"""A backend for the tests: the model run by onnx.reference.ReferenceEvaluator (YatGemm as the model's ONNX
function). It is one module, registered with one line (backends.register(BACKEND)), as any new backend is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from yatdeploy import backends, graph
from yatdeploy.errors import OnnxModelError


class ReferenceRunner:
    max_batch = None

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inputs = [graph.signature(v) for v in graph.graph_inputs(model)]
        self.outputs = [graph.signature(v) for v in model.graph.output]
        self._evaluator = ReferenceEvaluator(model)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(self._evaluator.run(None, dict(feeds)))
        except Exception as exc:
            raise OnnxModelError(f"the ONNX reference evaluator failed: {exc}") from exc

    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> backends.YatGemmExecution:
        return backends.YatGemmExecution("ONNX function", "YatGemm ran as the ONNX function (onnx.reference)")


class ReferenceBackend:
    name = "onnx-reference"
    description = "onnx.reference.ReferenceEvaluator, YatGemm as the model's ONNX function"
    default_rank = None
    files = {".onnx": "an ONNX model"}
    triton_platform = "onnxruntime_onnx"
    triton_backend = "python"
    builder = None  # it builds no engines

    def availability(self) -> str | None:
        return None

    def open(self, model: str | Path | onnx.ModelProto, options: backends.Options) -> ReferenceRunner:
        return ReferenceRunner(model if isinstance(model, onnx.ModelProto) else graph.load_onnx(model))


BACKEND = ReferenceBackend()
