"""`tensorrt`: a TensorRT engine (yatdeploy.trt), YatGemm as yatdeploy's plugin.

Never the default, since it builds an engine first unless one is given (Options.engine, or a .plan
opened as the model).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from yatdeploy.backends.base import DEFAULT_OPTIONS, Options, YatGemmExecution
from yatdeploy.errors import YatDeployError
from yatdeploy.trt import engine
from yatdeploy.trt.runner import EngineRunner, open_engine

DEFAULT_PROFILE = (1, 8, 64)


class TensorRTRunner:
    """An EngineRunner as a backends.Runner."""

    def __init__(self, runner: EngineRunner) -> None:
        self.engine = runner
        signature = runner.signature
        self.inputs = signature.inputs
        self.outputs = signature.outputs
        self.max_batch = signature.profile.max

    def run(self, feeds):
        return self.engine.run(dict(feeds))

    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> YatGemmExecution:
        layers = self.engine.signature.plugin_layers
        problem = None
        if layers < nodes:
            problem = (f"the engine has {layers} plugin layers for {nodes} YatGemm nodes: the rest run the inlined "
                       "ONNX function")
        return YatGemmExecution("TensorRT plugin", self.engine.describe_yat_gemm(), problem=problem)


class TensorRTBackend:
    name = "tensorrt"
    description = "TensorRT engine, YatGemm as yatdeploy's plugin (ahead-of-time PTX kernel)"
    default_rank = None
    files = {".onnx": "an ONNX model", ".plan": "a TensorRT engine"}
    triton_platform = "tensorrt_plan"
    triton_backend = "tensorrt"

    def availability(self) -> str | None:
        return engine.availability()

    def open(self, model: str | Path | onnx.ModelProto, options: Options = DEFAULT_OPTIONS) -> TensorRTRunner:
        """`options.engine`, or `model` itself when it is a .plan, or an engine built now from the ONNX model for
        `options.batch_profile` (default 1..64)."""
        if not isinstance(model, (str, Path)):
            raise YatDeployError("the tensorrt backend builds its engine from an ONNX file: pass a path")
        plan = options.engine
        if plan is None and Path(model).suffix == ".plan":
            plan = Path(model)
        if plan is not None and engine.engine_runtime(Path(plan)) != self.name:
            raise YatDeployError(f"{plan} was built for {engine.engine_runtime(Path(plan))}: "
                                 f"open it with that backend, not {self.name}")
        reason = self.availability()
        if reason:
            raise YatDeployError(f"backend {self.name} is not available: {reason}")
        profile = engine.BatchProfile(*(options.batch_profile or DEFAULT_PROFILE)).check()
        step = "building a TensorRT engine" if plan is None else f"loading {plan}"
        with options.progress.step(step):
            return TensorRTRunner(open_engine(model, plan, profile))


BACKEND = TensorRTBackend()
