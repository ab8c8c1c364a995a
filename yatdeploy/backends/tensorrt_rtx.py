"""`tensorrt-rtx`: a TensorRT for RTX engine (yatdeploy.trt.rtx) on an RTX-class GPU; builds engines on any machine.

YatGemm runs as the engine has it: TensorRT's own layers (the inlined ONNX function, the default) or
yatdeploy's plugin (an engine built with yat_plugin). Never the default backend; it builds an engine first
unless one is given (Options.engine, or a .plan opened as the model).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from yatdeploy.backends.base import DEFAULT_OPTIONS, BuildOptions, EngineInfo, Options, YatGemmExecution
from yatdeploy.backends.engine import (
    FILES,
    PLAN_SUFFIX,
    PlanBuilder,
    TensorRTRunner,
    batch_profile,
    describe,
    plan_to_open,
)
from yatdeploy.errors import YatDeployError
from yatdeploy.trt import rtx
from yatdeploy.trt.engine import EngineSignature
from yatdeploy.trt.runner import EngineRunner


class TensorRTRtxRunner(TensorRTRunner):
    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> YatGemmExecution:
        layers = self.engine.signature.plugin_layers
        kernel = "TensorRT-RTX plugin" if layers else "TensorRT-RTX layers (ONNX function)"
        return YatGemmExecution(kernel, self.engine.describe_yat_gemm())


class TensorRTRtxBuilder(PlanBuilder):
    """TensorRT for RTX's engines, built without a GPU for the targets asked for (its portable engine by default),
    YatGemm as TensorRT's own layers or, with yat_plugin, yatdeploy's plugin."""

    options = {"compute_capabilities": f"its portable engine, for {', '.join(rtx.COMPUTE_CAPABILITIES)}",
               "yat_plugin": "off, YatGemm as TensorRT's own layers"}
    repository_refusal = ("a TensorRT for RTX engine can't go in a Triton repository (Triton's TensorRT backend runs "
                          "the data-center TensorRT)")

    def where(self, signature: EngineSignature) -> str:
        return f"for {', '.join(signature.compute_capabilities) or 'its default targets'}"

    def build(self, onnx_path: Path, output: Path, options: BuildOptions) -> EngineInfo:
        options.refuse_others(self.runtime, self.options,
                              "TensorRT for RTX builds without a GPU, with no timing cache or workspace limit")
        capabilities = tuple(dict.fromkeys(rtx.parse_compute_capability(c) for c in options.compute_capabilities))
        profile = batch_profile(options.batch_profile)
        options.progress.say(f"building a TensorRT for RTX engine from {onnx_path}")
        result = rtx.build_rtx_engine(onnx_path, output, profile,
                                      rtx.RtxOptions(capabilities, options.yat_plugin, options.verbose),
                                      options.progress)
        return describe(result.path, result.signature, self.where(result.signature), result.seconds, result.notes)


class TensorRTRtxBackend:
    name = rtx.RUNTIME
    description = "TensorRT for RTX engine (RTX-class GPUs), YatGemm as its own layers or yatdeploy's plugin"
    default_rank = None
    files = FILES
    triton_platform = "tensorrt_plan"
    triton_backend = "tensorrt"
    builder = TensorRTRtxBuilder(rtx.RUNTIME)

    def availability(self) -> str | None:
        return rtx.availability()

    def open(self, model: str | Path | onnx.ModelProto, options: Options = DEFAULT_OPTIONS) -> TensorRTRtxRunner:
        """`options.engine`, or `model` itself when it is a .plan, or an engine built now (for this GPU's
        default targets, YatGemm as TensorRT's layers) for `options.batch_profile` (default
        base.DEFAULT_BATCH_PROFILE)."""
        reason = self.availability()
        if reason:
            raise YatDeployError(f"backend {self.name} is not available: {reason}")
        plan = plan_to_open(self.name, model, options)
        if plan is None:
            plan = Path(tempfile.mkdtemp(prefix="yatdeploy-rtx-")) / f"model{PLAN_SUFFIX}"
            rtx.build_rtx_engine(model, plan, batch_profile(options.batch_profile), progress=options.progress)
        if EngineSignature.read(plan).plugin_layers:
            from yatdeploy.trt import rtx_plugin

            rtx_plugin.register()  # the engine's plugin layers are created by this creator as it loads
        with options.progress.step(f"loading {plan}"):
            return TensorRTRtxRunner(EngineRunner(plan, trt=rtx.import_tensorrt_rtx()))


BACKEND = TensorRTRtxBackend()
