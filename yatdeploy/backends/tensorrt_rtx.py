"""`tensorrt-rtx`: a TensorRT for RTX engine (yatdeploy.trt.rtx) on an RTX-class GPU.

YatGemm runs as the engine has it: TensorRT's own layers (the inlined ONNX function, the default) or
yatdeploy's plugin (an engine built with yat_plugin). Never the default backend; it builds an engine first
unless one is given (Options.engine, or a .plan opened as the model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from yatdeploy.backends.base import DEFAULT_OPTIONS, Options, YatGemmExecution
from yatdeploy.backends.tensorrt import DEFAULT_PROFILE, TensorRTRunner
from yatdeploy.errors import YatDeployError
from yatdeploy.trt import rtx
from yatdeploy.trt.engine import BatchProfile, EngineSignature
from yatdeploy.trt.runner import EngineRunner


class TensorRTRtxRunner(TensorRTRunner):
    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> YatGemmExecution:
        layers = self.engine.signature.plugin_layers
        kernel = "TensorRT-RTX plugin" if layers else "TensorRT-RTX layers (ONNX function)"
        return YatGemmExecution(kernel, self.engine.describe_yat_gemm())


class TensorRTRtxBackend:
    name = rtx.RUNTIME
    description = "TensorRT for RTX engine (RTX-class GPUs), YatGemm as its own layers or yatdeploy's plugin"
    default_rank = None
    files = {".onnx": "an ONNX model", ".plan": "a TensorRT engine"}
    triton_platform = "tensorrt_plan"
    triton_backend = "tensorrt"

    def availability(self) -> str | None:
        return rtx.availability()

    def open(self, model: str | Path | onnx.ModelProto, options: Options = DEFAULT_OPTIONS) -> TensorRTRtxRunner:
        """`options.engine`, or `model` itself when it is a .plan, or an engine built now (for this GPU's
        default targets, YatGemm as TensorRT's layers) for `options.batch_profile` (default 1..64)."""
        reason = self.availability()
        if reason:
            raise YatDeployError(f"backend {self.name} is not available: {reason}")
        if not isinstance(model, (str, Path)):
            raise YatDeployError(f"the {self.name} backend builds its engine from an ONNX file: pass a path")
        plan = options.engine or (Path(model) if Path(model).suffix == ".plan" else None)
        if plan is None:
            profile = BatchProfile(*(options.batch_profile or DEFAULT_PROFILE)).check()
            plan = Path(tempfile.mkdtemp(prefix="yatdeploy-rtx-")) / "model.plan"
            rtx.build_rtx_engine(model, plan, profile, progress=options.progress)
        signature = EngineSignature.read(Path(plan))
        if signature.runtime != rtx.RUNTIME:
            raise YatDeployError(f"{plan} was built for {signature.runtime}, not {rtx.RUNTIME}")
        if signature.plugin_layers:
            from yatdeploy.trt import rtx_plugin

            rtx_plugin.register()  # the engine's plugin layers are created by this creator as it loads
        with options.progress.step(f"loading {plan}"):
            return TensorRTRtxRunner(EngineRunner(plan, trt=rtx.import_tensorrt_rtx()))


BACKEND = TensorRTRtxBackend()
