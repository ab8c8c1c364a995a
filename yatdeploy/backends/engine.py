"""What the two TensorRT backends (`tensorrt`, `tensorrt-rtx`) share: the engine file and its signature, the plan a
backend opens, the batch profile it builds for, the runner, and an engine described as build-engine says it and a
repository entry is written from it.

A TensorRT engine is a `.plan` with its signature beside it (yatdeploy.trt.engine.EngineSignature), whose `runtime`
names the backend that runs it: that is how each backend's builder knows its own engines (`PlanBuilder.owns`).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from yatdeploy.backends.base import DEFAULT_BATCH_PROFILE, EngineInfo, Options, YatGemmExecution
from yatdeploy.errors import YatDeployError
from yatdeploy.trt.engine import BatchProfile, EngineSignature, engine_runtime, signature_path
from yatdeploy.trt.runner import EngineRunner

PLAN_SUFFIX = ".plan"
FILES = {".onnx": "an ONNX model", PLAN_SUFFIX: "a TensorRT engine"}


def batch_profile(value: tuple[int, int, int] | None) -> BatchProfile:
    """The (min, opt, max) batch profile asked for (DEFAULT_BATCH_PROFILE when None), checked."""
    return BatchProfile(*(value or DEFAULT_BATCH_PROFILE)).check()


def plan_to_open(backend: str, model: str | Path | onnx.ModelProto, options: Options) -> Path | None:
    """The engine `backend` opens: `options.engine`, or `model` itself when it is a .plan; None when it is to build
    one from the ONNX model. A YatDeployError for a model that is no path, or an engine another runtime built."""
    if not isinstance(model, (str, Path)):
        raise YatDeployError(f"the {backend} backend builds its engine from an ONNX file: pass a path")
    plan = options.engine or (Path(model) if Path(model).suffix == PLAN_SUFFIX else None)
    if plan is None:
        return None
    runtime = EngineSignature.read(Path(plan)).runtime
    if runtime != backend:
        raise YatDeployError(f"{plan} was built for {runtime}: open it with that backend, not {backend}")
    return Path(plan)


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


def describe(path: Path, signature: EngineSignature, where: str, seconds: float = 0.0,
             notes: tuple[str, ...] | list[str] = ()) -> EngineInfo:
    """The engine at `path` with its `signature`; `where`: what it was built for (the GPU, the targets)."""
    yat_gemm = (f"{signature.plugin_layers} YatGemm plugin layer(s)" if signature.plugin_layers
                else f"{signature.yat_gemm_nodes} YatGemm node(s) as TensorRT layers")
    profile = signature.profile
    return EngineInfo(
        path=path, backend=signature.runtime, inputs=signature.inputs, outputs=signature.outputs,
        batch_profile=(profile.min, profile.opt, profile.max), files=(path, signature_path(path)),
        summary=(f"{yat_gemm}, batch {profile.min}..{profile.max}, {signature.runtime} {signature.tensorrt}, "
                 f"{where}"),
        seconds=seconds, notes=tuple(notes))


class PlanBuilder:
    """What the TensorRT builders share: the .plan they write, and knowing their own engines by the runtime the
    signature names (`runtime`: their backend's name)."""

    suffix = PLAN_SUFFIX
    instance_kind = "KIND_GPU"
    repository_refusal: str | None = None

    def __init__(self, runtime: str) -> None:
        self.runtime = runtime

    def owns(self, engine: Path) -> bool:
        return engine_runtime(engine) == self.runtime

    def where(self, signature: EngineSignature) -> str:
        """What an engine was built for, as build-engine says it."""
        raise NotImplementedError

    def read(self, engine: Path) -> EngineInfo:
        signature = EngineSignature.read(Path(engine))
        if signature.runtime != self.runtime:
            raise YatDeployError(f"{engine} was built for {signature.runtime}, not {self.runtime}")
        return describe(Path(engine), signature, self.where(signature))
