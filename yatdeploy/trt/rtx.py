"""`yatdeploy build-engine --backend tensorrt-rtx`: TensorRT for RTX engines, built on any machine.

TensorRT for RTX (PyPI: tensorrt-rtx-cu13-libs and -bindings, module tensorrt_rtx_bindings) builds engines
ahead of time without a GPU, for RTX-class GPUs: compute capabilities 7.5, 8.0, 8.6, 8.9, 12.0 and 12.1
(no 9.0: an H100/H200 takes the data-center TensorRT). By default YatGemm runs as TensorRT's own layers:
its parser inlines the model's ONNX function, and the engine needs nothing else. With `yat_plugin`, every
YatGemm node becomes yatdeploy's plugin (trt/rtx_plugin.py), whose enqueue launches yatdeploy's GPU kernel.

The packaging trap: the RTX parser dlopens the unversioned `libtensorrt_rtx.so` when it meets a plugin
node, and the wheel ships only `libtensorrt_rtx.so.1`; the process then aborts. The dynamic linker reads
LD_LIBRARY_PATH only at process start, so a plugin build runs in a child process whose LD_LIBRARY_PATH holds
a folder with a `libtensorrt_rtx.so` link to the wheel's library (`_library_folder`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import util
from pathlib import Path

from yatdeploy.errors import OnnxModelError, YatDeployError, option
from yatdeploy.files import file_sha256
from yatdeploy.graph import load_onnx
from yatdeploy.progress import QUIET, Progress
from yatdeploy.trt import plugin_logic
from yatdeploy.trt.engine import (
    BatchProfile,
    BuildResult,
    EngineSignature,
    PreparedModel,
    check_plugin_layers,
    prepare_model,
    profile_shapes,
    write_engine,
)

RUNTIME = "tensorrt-rtx"
# TensorRT for RTX's targets (its ComputeCapability members), as the CLI takes them: "86" is SM86.
COMPUTE_CAPABILITIES = ("75", "80", "86", "89", "120", "121")
# Compute capabilities of GPUs it does not target, and what does.
OTHER_RUNTIME = {"90": "H100/H200 (9.0)", "100": "B200 (10.0)", "103": "B300 (10.3)"}
# The most dynamic shared memory a block may opt into, per target (bounds the plugin's tactics).
MAX_SHARED_MEMORY = {"75": 65536, "80": 166912, "86": 101376, "89": 101376, "120": 101376, "121": 101376}
PLUGIN_MIN_CAPABILITY = 80  # yatdeploy's GPU kernels need 8.0 (plugin_logic.MIN_COMPUTE_CAPABILITY)
LIBRARY = "libtensorrt_rtx.so"


def parse_compute_capability(text: str) -> str:
    """"86", "8.6", "sm_86" or "SM86" as TensorRT for RTX's target "86", or an error naming the targets."""
    value = text.strip().lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
    if value in COMPUTE_CAPABILITIES:
        return value
    if value in OTHER_RUNTIME:
        raise YatDeployError(f"compute capability {text}: {OTHER_RUNTIME[value]} is not a TensorRT for RTX target",
                             f"build for it with the data-center TensorRT ({option('backend')} tensorrt)")
    raise YatDeployError(f"compute capability {text}: TensorRT for RTX targets "
                         f"{', '.join(COMPUTE_CAPABILITIES)} (8.6 may be written 86, 8.6 or sm_86)")


def import_tensorrt_rtx():
    """The tensorrt_rtx_bindings module, or an error saying how to get it."""
    try:
        import tensorrt_rtx_bindings
    except Exception as exc:  # ImportError, or OSError when the libraries' wheel is missing
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise YatDeployError(f"TensorRT for RTX is not installed here (import tensorrt_rtx_bindings failed: {detail})",
                             "pip install 'yatdeploy[tensorrt-rtx]'") from None
    return tensorrt_rtx_bindings


def build_availability() -> str | None:
    """None when engines can be built here (no GPU needed), otherwise why not."""
    try:
        import_tensorrt_rtx()
    except YatDeployError as exc:
        return str(exc)  # with the way to install it
    return None


def availability() -> str | None:
    """None when TensorRT for RTX engines can run here, otherwise why not (the first missing piece)."""
    reason = build_availability()
    if reason:
        return reason
    device = plugin_logic.current_device()
    if device is None:
        return "no NVIDIA GPU is visible (TensorRT for RTX builds engines without one, but runs them on one)"
    (major, minor), _ = device
    if f"{major}{minor}" not in COMPUTE_CAPABILITIES:
        return (f"the GPU has compute capability {major}.{minor}, which TensorRT for RTX does not target "
                "(use the tensorrt backend)")
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA (the runner keeps its buffers in torch CUDA tensors)"
    return None


# --- the library trap ----------------------------------------------------------------------------------

def _library_folder() -> Path:
    """A folder holding `libtensorrt_rtx.so`, a link to the wheel's `libtensorrt_rtx.so.1`, for the child's
    LD_LIBRARY_PATH (in the user's cache; the installed package is never written to)."""
    spec = util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        raise YatDeployError("TensorRT for RTX's libraries (tensorrt_rtx_libs) are not installed",
                             "pip install 'yatdeploy[tensorrt-rtx]'")
    real = Path(next(iter(spec.submodule_search_locations))) / f"{LIBRARY}.1"
    if not real.is_file():
        raise YatDeployError(f"{real}: missing from the tensorrt_rtx_libs package")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for base in (cache / "yatdeploy", Path(tempfile.gettempdir()) / f"yatdeploy-{os.getuid()}"):
        folder = base / "tensorrt-rtx-lib" / file_sha256(real)[:16]
        link = folder / LIBRARY
        try:
            if not (link.is_symlink() and Path(os.readlink(link)) == real):
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / f"{LIBRARY}.{os.getpid()}"
                partial.unlink(missing_ok=True)
                partial.symlink_to(real)
                os.replace(partial, link)
            return folder
        except OSError:
            continue
    raise YatDeployError(f"no writable folder for the {LIBRARY} link (tried $XDG_CACHE_HOME and the temp folder)")


# --- building ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RtxOptions:
    compute_capabilities: tuple[str, ...] = ()  # () builds TensorRT for RTX's default portable engine
    yat_plugin: bool = False
    verbose: bool = False


def _strip_plugin_attributes(prepared: PreparedModel) -> None:
    """Without the plugin, the parser must take every YatGemm node's ONNX function, even in a process where
    the plugin's creator is registered: a node without plugin_namespace is not offered to plugins."""
    for node in prepared.model.graph.node:
        kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        if len(kept) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)


def _failure(messages: list[str], capabilities: tuple[str, ...]) -> YatDeployError:
    """TensorRT's build errors, said in terms of what the user chose."""
    text = " ".join(messages)
    if "FP32 GEMM is not supported" in text:
        return YatDeployError("compute capability 7.5 (Turing): TensorRT for RTX has no float32 GEMM there, and the "
                              "model has one (YatGemm's ONNX function computes in float32 for float16 exports too)",
                              f"target 8.0 or newer: {option('compute_capabilities')} 80 86 89 120")
    if "HW-specific datatypes" in text and "75" in capabilities:
        return YatDeployError("compute capability 7.5 (Turing) has no bfloat16: export in float16 or float32, or "
                              "target 8.0 or newer")
    detail = messages[-1] if messages else "no message"
    return YatDeployError(f"TensorRT for RTX could not build the engine: {detail}")


def _build_here(onnx_path: Path, output: Path, profile: BatchProfile, options: RtxOptions,
                progress: Progress, prepared: PreparedModel | None = None) -> BuildResult:
    """The build, in this process (a plugin build: in the child, where the library trap is handled);
    `prepared`: the ONNX model as prepare_model gave it, when the caller has it already."""
    trt = import_tensorrt_rtx()
    if prepared is None:
        prepared = prepare_model(load_onnx(onnx_path))
    shapes = profile_shapes(prepared, profile)
    if not options.yat_plugin:
        _strip_plugin_attributes(prepared)
    else:
        from yatdeploy.trt import rtx_plugin

        rtx_plugin.register()
        rtx_plugin.created.clear()
        targets = options.compute_capabilities or tuple(c for c in COMPUTE_CAPABILITIES
                                                        if int(c) >= PLUGIN_MIN_CAPABILITY)
        rtx_plugin.target_shared_memory = min(MAX_SHARED_MEMORY[c] for c in targets)

    started = time.perf_counter()
    errors: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, message):
            if severity <= trt.ILogger.ERROR:
                errors.append(message)
            if options.verbose:
                print(f"[TensorRT-RTX {severity.name}] {message}", file=sys.stderr)

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # always strongly typed
    parser = trt.OnnxParser(network, logger)
    with progress.step(f"parsing {onnx_path.name}"):
        if not parser.parse(prepared.model.SerializeToString(), str(onnx_path)):
            found = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise OnnxModelError(f"TensorRT for RTX's ONNX parser rejected {onnx_path}: "
                                 f"{found[0] if found else 'no detail'}")
    layer_types = [network.get_layer(i).type.name for i in range(network.num_layers)]
    plugin_layers = check_plugin_layers(layer_types, prepared.yat_gemm_nodes) if options.yat_plugin else 0

    config = builder.create_builder_config()
    if options.compute_capabilities:
        config.num_compute_capabilities = len(options.compute_capabilities)
        for index, capability in enumerate(options.compute_capabilities):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{capability}"), index):
                raise YatDeployError(f"TensorRT for RTX refused compute capability {capability}")
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(prepared.input.name, *shapes)
    config.add_optimization_profile(optimisation)
    targets = ", ".join(options.compute_capabilities) or "its default targets"
    with progress.step(f"building for {targets}, batch {profile.min}..{profile.max}"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise _failure(errors, options.compute_capabilities)

    fields = []
    if options.yat_plugin:
        from yatdeploy.trt import rtx_plugin

        fields = [{"node": name, "eps": eps, "alpha": alpha} for name, phase, eps, alpha in rtx_plugin.created
                  if phase == "BUILD"]
    # gpu "": built without one; it runs on the compute capabilities recorded
    signature = EngineSignature.of_build(prepared, profile, plugin_layers, onnx_path, trt.__version__,
                                         built={"layers": len(layer_types)}, runtime=RUNTIME,
                                         compute_capabilities=list(options.compute_capabilities),
                                         plugin_fields=fields)
    write_engine(output, bytes(serialized), signature)
    return BuildResult(output, signature, time.perf_counter() - started, prepared.notes)


_CHILD_ERROR = "yatdeploy-rtx-error: "


def _build_in_child(onnx_path: Path, output: Path, profile: BatchProfile, options: RtxOptions,
                    progress: Progress) -> BuildResult:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(_library_folder()), env.get("LD_LIBRARY_PATH")) if p)
    request = json.dumps({"onnx": str(onnx_path), "output": str(output), "profile": list(vars(profile).values()),
                          "compute_capabilities": list(options.compute_capabilities), "verbose": options.verbose})
    code = "import sys; from yatdeploy.trt.rtx import _child_main; sys.exit(_child_main(sys.argv[1]))"
    with progress.step("building in a child process (TensorRT for RTX's parser needs libtensorrt_rtx.so)"):
        done = subprocess.run([sys.executable, "-c", code, request], env=env, capture_output=True, text=True)
    lines = done.stderr.splitlines()
    failure = next((line[len(_CHILD_ERROR):] for line in lines if line.startswith(_CHILD_ERROR)), None)
    if failure is not None:
        raise YatDeployError(failure)
    if done.returncode != 0:
        tail = "; ".join(lines[-3:]) or f"exit status {done.returncode}"
        raise YatDeployError(f"the TensorRT for RTX build process failed: {tail}")
    if options.verbose:
        print(done.stderr, file=sys.stderr, end="")
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    return BuildResult(output, EngineSignature.read(output), reply["seconds"], reply["notes"])


def _child_main(request: str) -> int:
    args = json.loads(request)
    try:
        result = _build_here(Path(args["onnx"]), Path(args["output"]), BatchProfile(*args["profile"]),
                             RtxOptions(tuple(args["compute_capabilities"]), True, args["verbose"]), QUIET)
    except YatDeployError as exc:
        print(_CHILD_ERROR + str(exc).replace("\n", " "), file=sys.stderr)
        return 2
    print(json.dumps({"seconds": result.seconds, "notes": result.notes}))
    return 0


def build_rtx_engine(onnx_path: str | Path, output: str | Path, profile: BatchProfile,
                     options: RtxOptions = RtxOptions(), progress: Progress = QUIET) -> BuildResult:
    """A TensorRT for RTX engine at `output` (and its signature, `output`.json) from a yatdeploy export.

    Checked before TensorRT is looked for: the model (prepare_model), the profile, the targets.
    """
    onnx_path, output = Path(onnx_path), Path(output)
    for capability in options.compute_capabilities:
        if capability not in COMPUTE_CAPABILITIES:
            raise YatDeployError(f"compute capability {capability}: not a TensorRT for RTX target")
    prepared = prepare_model(load_onnx(onnx_path))
    profile_shapes(prepared, profile)
    if options.yat_plugin and any(int(c) < PLUGIN_MIN_CAPABILITY for c in options.compute_capabilities):
        raise YatDeployError("yatdeploy's GPU kernels need compute capability 8.0 or newer: the plugin can't "
                             "target 7.5", f"drop 75, or build without {option('yat_plugin', True)}")
    import_tensorrt_rtx()
    if options.yat_plugin:
        return _build_in_child(onnx_path, output, profile, options, progress)
    return _build_here(onnx_path, output, profile, options, progress, prepared)

