"""`yatdeploy build-engine`: a TensorRT engine from a yatdeploy ONNX export, YatGemm as the plugin.

The pure parts (profile checks, preparing the ONNX graph for the parser, the signature file, the
check that every YatGemm node became the plugin) import without TensorRT and are tested here; the
build itself needs TensorRT and a GPU and says so, naming what is missing, when either is absent.

Next to every engine goes `<engine>.json` (ENGINE_SIGNATURE): its input and output names, dtypes and
shapes, the batch profile, and the versions and GPU it was built with, so that validation and serving
can describe an engine without TensorRT.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from yatdeploy import dtypes, graph, native
from yatdeploy.errors import OnnxModelError, YatDeployError, option
from yatdeploy.files import file_sha256, write_atomically, writing
from yatdeploy.graph import TensorSignature, load_onnx, node_elem_types, yat_gemm_nodes
from yatdeploy.progress import QUIET, Progress
from yatdeploy.spec import MATH_ATTRIBUTES, PLUGIN_NAMESPACE, PLUGIN_VERSION, YAT_GEMM
from yatdeploy.trt import plugin_logic

RUNTIME = "tensorrt"  # an engine's runtime, as its signature records it: the backend that runs it
MIN_TENSORRT = (10, 15)  # ahead-of-time Python plugins (10.9) and the parser's plugin_namespace override (10.15)
SIGNATURE_SUFFIX = ".json"
WORKSPACE_DEFAULT_MB = 4096


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    def check(self) -> BatchProfile:
        if self.min < 1 or not self.min <= self.opt <= self.max:
            raise YatDeployError(f"batch profile min {self.min}, opt {self.opt}, max {self.max}: "
                                 f"need 1 <= {option('min_batch')} <= {option('opt_batch')} <= {option('max_batch')}")
        return self

    @staticmethod
    def covering(batches: list[int]) -> BatchProfile:
        """The profile an engine needs to run all these batch sizes, tuned for the largest."""
        return BatchProfile(min(batches), max(batches), max(batches)).check()


@dataclass
class EngineSignature:
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    profile: BatchProfile
    yat_gemm_nodes: int
    plugin_layers: int
    onnx_sha256: str
    tensorrt: str = ""  # the version of the runtime below
    gpu: str = ""  # the GPU it was built on ("" for a TensorRT for RTX engine built without one)
    built: dict = field(default_factory=dict)
    runtime: str = RUNTIME  # or yatdeploy.trt.rtx.RUNTIME
    compute_capabilities: list[str] = field(default_factory=list)  # TensorRT for RTX's targets; [] its default
    plugin_fields: list[dict] = field(default_factory=list)  # per plugin layer: node, eps, alpha as received

    def write(self, engine_path: Path) -> Path:
        """Write the signature beside `engine_path`, whole or not at all."""
        path = signature_path(engine_path)
        write_atomically(path, (json.dumps(asdict(self), indent=2) + "\n").encode())
        return path

    @staticmethod
    def of_build(prepared: PreparedModel, profile: BatchProfile, plugin_layers: int, onnx_path: Path, version: str,
                 gpu: str = "", **more) -> EngineSignature:
        """The signature of an engine just built from `prepared` (the ONNX file at `onnx_path`)."""
        built = {"host": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **more.pop("built", {})}
        return EngineSignature(inputs=[prepared.input], outputs=prepared.outputs, profile=profile,
                               yat_gemm_nodes=prepared.yat_gemm_nodes, plugin_layers=plugin_layers,
                               onnx_sha256=file_sha256(onnx_path), tensorrt=version, gpu=gpu, built=built, **more)

    @staticmethod
    def read(engine_path: Path) -> EngineSignature:
        path = signature_path(engine_path)
        try:
            raw = json.loads(path.read_text())
            return EngineSignature(
                inputs=[TensorSignature(**t) for t in raw["inputs"]],
                outputs=[TensorSignature(**t) for t in raw["outputs"]],
                profile=BatchProfile(**raw["profile"]),
                **{k: raw[k] for k in ("yat_gemm_nodes", "plugin_layers", "onnx_sha256", "tensorrt", "gpu", "built")},
                **{k: raw[k] for k in ("runtime", "compute_capabilities", "plugin_fields") if k in raw},
            )
        except FileNotFoundError:
            raise YatDeployError(f"{path}: missing; yatdeploy writes it beside every engine it builds "
                                 "(rebuild with `yatdeploy build-engine`)") from None
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise YatDeployError(f"{path}: not a yatdeploy engine signature ({exc})") from None


def signature_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + SIGNATURE_SUFFIX)


def write_engine(output: Path, engine: bytes, signature: EngineSignature) -> None:
    """The engine and its signature beside it, both written in full before either takes its place (files.writing),
    so a full disk or Ctrl-C leaves the previous pair, or nothing, never one without the other."""
    with writing(signature_path(output)) as signature_partial, writing(output) as engine_partial:
        signature_partial.write_text(json.dumps(asdict(signature), indent=2) + "\n")
        engine_partial.write_bytes(engine)


def engine_runtime(engine_path: Path) -> str:
    """The runtime an engine was built for, from its signature (RUNTIME when that can't be read: the
    tensorrt backend then says what is wrong with it)."""
    try:
        return str(json.loads(signature_path(Path(engine_path)).read_text()).get("runtime", RUNTIME))
    except (OSError, ValueError, AttributeError):
        return RUNTIME


# --- preparing the ONNX graph for TensorRT's parser --------------------------------------------------

@dataclass
class PreparedModel:
    model: onnx.ModelProto
    input: TensorSignature
    outputs: list[TensorSignature]
    yat_gemm_nodes: int
    notes: list[str]


def prepare_model(model: onnx.ModelProto) -> PreparedModel:
    """A copy of `model` whose every YatGemm node the plugin can take, or an error naming the node.

    The parser hands the plugin only the attributes a node has and only the inputs it has, and the plugin
    takes exactly X, W, B, eps and alpha; so missing eps/alpha get the spec's defaults, a missing B (a
    bias-free node written by hand) becomes zeros, and plugin_namespace/plugin_version are set so that
    the parser picks the plugin over the model's ONNX function.
    """
    model = copy.deepcopy(model)
    initializers = {i.name: i for i in model.graph.initializer}
    inputs = graph.graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxModelError(f"the model has {len(inputs)} inputs; build-engine handles one (a yatdeploy export)")
    signature = graph.signature(inputs[0])
    supported = [t.dtype for t in plugin_logic.PLUGIN_TYPES]
    types = node_elem_types(model)
    notes: list[str] = []
    nodes = yat_gemm_nodes(model)
    for index, node in enumerate(nodes):
        where = f"YatGemm node '{node.name or index}'"
        elem_type = types.get(node.name)
        dtype = signature.dtype if elem_type is None else graph.dtype_name(elem_type)
        if dtype not in supported:
            raise OnnxModelError(f"{where} is {dtype}; the TensorRT plugin has {', '.join(supported)} kernels "
                                 f"(export with {option('dtype')} float32, float16 or bfloat16)")
        attrs = {a.name: a for a in node.attribute}
        for name in MATH_ATTRIBUTES:
            if name not in attrs:
                node.attribute.append(helper.make_attribute(name, float(YAT_GEMM.attribute(name).default)))
                notes.append(f"{where}: no {name} attribute, the spec's default {YAT_GEMM.attribute(name).default} used")
        for name, value in (("plugin_namespace", PLUGIN_NAMESPACE), ("plugin_version", PLUGIN_VERSION)):
            if name in attrs and helper.get_attribute_value(attrs[name]).decode() != value:
                raise OnnxModelError(f"{where}: {name} is {helper.get_attribute_value(attrs[name]).decode()!r}, "
                                     f"yatdeploy's plugin is {value!r}")
            if name not in attrs:
                node.attribute.append(helper.make_attribute(name, value))
        if len(node.input) < 3 or not node.input[2]:
            w = initializers.get(node.input[1])
            if w is None:
                raise OnnxModelError(f"{where} has no bias input and its weight is not a constant: the TensorRT "
                                     "plugin takes X, W and B (re-export with yatdeploy, which always writes B)")
            zeros = numpy_helper.from_array(np.zeros(w.dims[0], dtype=dtypes.by_name(dtype).numpy),
                                            f"{node.input[1]}__yat_zero_bias")
            model.graph.initializer.append(zeros)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = zeros.name
            notes.append(f"{where}: no bias input, zeros used")
    if signature.dtype not in supported:
        raise OnnxModelError(f"the model's input is {signature.dtype}; TensorRT here takes {', '.join(supported)}")
    if len(signature.shape) < 1 or any(d < 0 for d in signature.shape[1:]):
        raise OnnxModelError(f"input '{signature.name}' has shape {signature.shape}: every dimension after the "
                             "batch must be fixed")
    return PreparedModel(model, signature, [graph.signature(o) for o in model.graph.output], len(nodes), notes)


def profile_shapes(prepared: PreparedModel, profile: BatchProfile) -> tuple[list[int], list[int], list[int]]:
    """Min, opt and max input shapes for the optimisation profile."""
    profile.check()
    batch, *rest = prepared.input.shape
    if not graph.has_batch_dim(prepared.input.shape) and (profile.min, profile.max) != (batch, batch):
        raise YatDeployError(f"the model's batch dimension is fixed at {batch} (exported with {option('dynamic_batch', False)}); "
                             f"use {option('min_batch')} {batch} {option('opt_batch')} {batch} {option('max_batch')} {batch}")
    return [profile.min, *rest], [profile.opt, *rest], [profile.max, *rest]


def check_plugin_layers(layer_types: list[str], yat_gemm_nodes: int) -> int:
    """How many plugin layers the parsed network has; an error when some YatGemm node did not become one.

    `layer_types` are TensorRT LayerType names. A parser that does not pick the plugin (TensorRT < 10.15,
    or the plugin not registered) silently inlines the model's ONNX function: the engine would work, but
    it would not run the fused kernel, and that must not pass for the plugin.
    """
    plugins = sum(1 for t in layer_types if t.startswith("PLUGIN"))
    if plugins < yat_gemm_nodes:
        raise YatDeployError(
            f"TensorRT's parser turned {plugins} of {yat_gemm_nodes} YatGemm nodes into the plugin and inlined "
            "the ONNX function for the rest; the fused kernel needs TensorRT >= 10.15 with the plugin registered"
        )
    return plugins


# --- what this machine has -----------------------------------------------------------------------------

def import_tensorrt():
    """The tensorrt module, or an error saying how to get it."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError when the wheel is there but libnvinfer is not
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise YatDeployError(
            f"TensorRT is not installed here (import tensorrt failed: {detail})",
            "pip install 'yatdeploy[tensorrt]' on a machine that can reach NVIDIA's package index, "
            "with a GPU and its driver",
        ) from None
    version = tuple(int(p) for p in tensorrt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise YatDeployError(f"TensorRT {tensorrt.__version__} is too old: yatdeploy's plugin needs "
                             f"{'.'.join(map(str, MIN_TENSORRT))} or newer")
    return tensorrt


def availability() -> str | None:
    """None when engines can be built and run here, otherwise why not (the first missing piece)."""
    try:
        import_tensorrt()
    except YatDeployError as exc:
        return exc.text
    if native.gpu_count() == 0:
        return "no NVIDIA GPU is visible (TensorRT builds and runs engines on the GPU)"
    if native.gpu_kernels_manifest() is None:
        return "the YatGemm GPU kernels the plugin runs were not built (yatdeploy was installed without nvcc or triton)"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA (the tensorrt backend keeps its buffers in torch CUDA tensors)"
    return None


def require_build_environment() -> object:
    trt = import_tensorrt()
    if native.gpu_count() == 0:
        raise YatDeployError("no NVIDIA GPU is visible: TensorRT builds an engine on the GPU that will run it")
    plugin_logic.kernels()
    return trt


# --- building ------------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    path: Path
    signature: EngineSignature
    seconds: float
    notes: list[str]


def _progress_monitor(trt, progress: Progress):
    """TensorRT's build phases as progress lines (IProgressMonitor, TensorRT >= 10)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()
            if parent_phase is None:
                progress.say(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            if phase_name in self.started and len(self.started) <= 2:
                progress.say(f"  {phase_name}: {time.perf_counter() - self.started[phase_name]:.1f} s")

    return Monitor()


def build_engine(onnx_path: str | Path, output: str | Path, profile: BatchProfile, *,
                 timing_cache: Path | None = None, workspace_mb: int = WORKSPACE_DEFAULT_MB,
                 verbose: bool = False, progress: Progress = QUIET) -> BuildResult:
    onnx_path, output = Path(onnx_path), Path(output)
    prepared = prepare_model(load_onnx(onnx_path))
    shapes = profile_shapes(prepared, profile)
    trt = require_build_environment()
    import yatdeploy.trt.plugin  # noqa: F401  registers the plugin with TensorRT

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 11 is always strongly typed (the flag is gone); 10.x needs it asked for.
    for flag in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):
        if hasattr(trt.NetworkDefinitionCreationFlag, flag):
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with progress.step(f"parsing {onnx_path.name}"):
        if not parser.parse(prepared.model.SerializeToString(), str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise OnnxModelError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0] if errors else 'no detail'}")
    layer_types = [network.get_layer(i).type.name for i in range(network.num_layers)]
    plugin_layers = check_plugin_layers(layer_types, prepared.yat_gemm_nodes)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if progress.enabled and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, progress)
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(prepared.input.name, *shapes)
    config.add_optimization_profile(optimisation)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    progress.say(f"building the engine for batch {profile.min}..{profile.max} (opt {profile.opt})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise YatDeployError(f"TensorRT could not build the engine (its messages are above; {option('verbose', True)} shows more)")
    if timing_cache is not None:
        write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))

    import torch

    signature = EngineSignature.of_build(prepared, profile, plugin_layers, onnx_path, trt.__version__,
                                         gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    write_engine(output, bytes(serialized), signature)
    return BuildResult(output, signature, time.perf_counter() - started, prepared.notes)
