"""`tensorrt`: a TensorRT engine (yatdeploy.trt), YatGemm as yatdeploy's plugin; builds engines (build-engine).

Never the default, since it builds an engine first unless one is given (Options.engine, or a .plan
opened as the model).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from yatdeploy.backends.base import DEFAULT_OPTIONS, BuildOptions, EngineInfo, Options
from yatdeploy.backends.engine import FILES, PlanBuilder, TensorRTRunner, batch_profile, describe, plan_to_open
from yatdeploy.errors import YatDeployError, option
from yatdeploy.trt import engine
from yatdeploy.trt.runner import open_engine

TIMING_CACHE_SUFFIX = ".timing-cache"


class TensorRTBuilder(PlanBuilder):
    """The data-center TensorRT's engines, for the GPU they are built on, every YatGemm node as the plugin (its
    ahead-of-time kernel inside the engine)."""

    options = {"timing_cache": f"<engine>{TIMING_CACHE_SUFFIX}", "workspace_mb": f"{engine.WORKSPACE_DEFAULT_MB} MB"}

    def where(self, signature: engine.EngineSignature) -> str:
        return signature.gpu

    def build(self, onnx_path: Path, output: Path, options: BuildOptions) -> EngineInfo:
        options.refuse_others(self.runtime, self.options, "the data-center TensorRT builds for the GPU it runs on, "
                                                          "every YatGemm node as the plugin")
        workspace_mb = engine.WORKSPACE_DEFAULT_MB if options.workspace_mb is None else options.workspace_mb
        if workspace_mb < 1:
            raise YatDeployError(f"{option('workspace_mb')} {workspace_mb}: must be at least 1")
        # The build checks the model and the profile before it looks for TensorRT, so a bad model or profile is
        # reported as such on any machine.
        profile = batch_profile(options.batch_profile)
        timing_cache = options.timing_cache or output.with_name(output.name + TIMING_CACHE_SUFFIX)
        options.progress.say(f"building a TensorRT engine from {onnx_path}")
        result = engine.build_engine(onnx_path, output, profile, timing_cache=Path(timing_cache),
                                     workspace_mb=workspace_mb, verbose=options.verbose, progress=options.progress)
        return describe(result.path, result.signature, f"{self.where(result.signature)}; timing cache {timing_cache}",
                        result.seconds, result.notes)


class TensorRTBackend:
    name = engine.RUNTIME
    description = "TensorRT engine, YatGemm as yatdeploy's plugin (ahead-of-time PTX kernel)"
    default_rank = None
    files = FILES
    triton_platform = "tensorrt_plan"
    triton_backend = "tensorrt"
    builder = TensorRTBuilder(engine.RUNTIME)

    def availability(self) -> str | None:
        return engine.availability()

    def open(self, model: str | Path | onnx.ModelProto, options: Options = DEFAULT_OPTIONS) -> TensorRTRunner:
        """`options.engine`, or `model` itself when it is a .plan, or an engine built now from the ONNX model for
        `options.batch_profile` (default base.DEFAULT_BATCH_PROFILE)."""
        plan = plan_to_open(self.name, model, options)
        reason = self.availability()
        if reason:
            raise YatDeployError(f"backend {self.name} is not available: {reason}")
        profile = batch_profile(options.batch_profile)
        step = "building a TensorRT engine" if plan is None else f"loading {plan}"
        with options.progress.step(step):
            return TensorRTRunner(open_engine(model, plan, profile))


BACKEND = TensorRTBackend()
