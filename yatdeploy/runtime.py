"""ONNX Runtime sessions for the project: the one place that decides how a model is run.

Backends, as named on the command line:
- `ort-cpu`: ONNX Runtime on the CPU with yatdeploy's custom-op library (fused YatGemm kernels);
- `ort-cuda`: ONNX Runtime's CUDA provider with the library's CUDA kernels;
- `ort-function`: plain ONNX Runtime on the CPU, YatGemm inlined from the model's ONNX function;
- `tensorrt`: a TensorRT engine (yatdeploy.trt), YatGemm as yatdeploy's plugin; never the default,
  since it builds an engine first unless one is given.

A library is registered only when it has a kernel for every YatGemm node of the model on the
session's providers: ONNX Runtime never falls back from a registered library to the function, so
otherwise the session runs the function and one log line says why.
"""

from __future__ import annotations

import ctypes
import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
import onnx

try:
    import onnxruntime as ort
except ImportError:  # neither the cpu nor the gpu extra is installed
    ort = None

from yatdeploy import dtypes, native
from yatdeploy.errors import OnnxModelError, YatDeployError
from yatdeploy.spec import ONNX_BFLOAT16, ONNX_DOUBLE, ONNX_FLOAT, ONNX_FLOAT16, YAT_GEMM

if TYPE_CHECKING:
    from yatdeploy.trt.engine import BatchProfile

log = logging.getLogger("yatdeploy.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ORT_LOG_ERRORS_ONLY = 3

# The kernels each library registers, per provider (custom_ops/src/*_op.cc).
CPU_LIBRARY_KERNELS = {CPU: frozenset({ONNX_FLOAT, ONNX_DOUBLE, ONNX_FLOAT16, ONNX_BFLOAT16})}
CUDA_LIBRARY_KERNELS = {**CPU_LIBRARY_KERNELS, CUDA: frozenset({ONNX_FLOAT, ONNX_FLOAT16, ONNX_BFLOAT16})}


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    providers: tuple[str, ...]
    library: str | None  # "cpu", "cuda" or None (function only)
    kind: str = "onnxruntime"  # or "tensorrt"

    def library_path(self) -> Path | None:
        if self.library == "cpu":
            return native.ort_library_path()
        if self.library == "cuda":
            return native.ort_cuda_library_path()
        return None

    def library_kernels(self) -> Mapping[str, frozenset[int]]:
        return {"cpu": CPU_LIBRARY_KERNELS, "cuda": CUDA_LIBRARY_KERNELS}.get(self.library or "", {})

    def availability(self) -> str | None:
        """None when usable here, otherwise why not."""
        if self.kind == "tensorrt":
            from yatdeploy.trt.engine import availability

            return availability()
        if ort is None:
            return "onnxruntime is not installed (pip install 'yatdeploy[cpu]' or 'yatdeploy[gpu]')"
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return f"this onnxruntime has no {', '.join(missing)} (install onnxruntime-gpu)"
        if self.library is not None and self.library_path() is None:
            what = "with CUDA kernels " if self.library == "cuda" else ""
            return f"yatdeploy's custom-op library {what}was not built (see `yatdeploy doctor`)"
        if CUDA in self.providers and gpu_count() == 0:
            return "no NVIDIA GPU is visible"
        return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("ort-cpu", "ONNX Runtime, CPU, yatdeploy's fused YatGemm kernels", (CPU,), "cpu"),
        Backend("ort-cuda", "ONNX Runtime, CUDA, yatdeploy's fused YatGemm kernels", (CUDA, CPU), "cuda"),
        Backend("ort-function", "ONNX Runtime, CPU, YatGemm inlined from the model's ONNX function", (CPU,), None),
        Backend("tensorrt", "TensorRT engine, YatGemm as yatdeploy's plugin (ahead-of-time PTX kernel)", (), None,
                kind="tensorrt"),
    )
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise YatDeployError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def default_backend() -> Backend:
    """The fastest backend that works here."""
    for name in ("ort-cuda", "ort-cpu", "ort-function"):
        if BACKENDS[name].availability() is None:
            return BACKENDS[name]
    raise YatDeployError(f"no ONNX Runtime backend works here: {BACKENDS['ort-function'].availability()}")


def gpu_count() -> int:
    """NVIDIA GPUs the driver reports (0 without a driver); asks libcuda directly, needing no toolkit."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def yat_gemm_node_types(model: onnx.ModelProto) -> set[int]:
    from yatdeploy.attach import node_elem_types

    return set(node_elem_types(model).values())


def library_decision(backend: Backend, node_types: set[int], yat_version: int | None) -> tuple[bool, str]:
    """Whether to register the backend's library for a model, and the reason in one line."""
    if backend.library is None:
        return False, "YatGemm runs as the model's ONNX function (backend ort-function)"
    if not node_types:
        return False, "the model has no YatGemm nodes; the custom-op library is not needed"
    if yat_version is not None and yat_version != YAT_GEMM.version:
        return False, (f"the model imports YatGemm version {yat_version}, the library implements "
                       f"{YAT_GEMM.version}: YatGemm runs as the model's ONNX function")
    if backend.library_path() is None:
        return False, "the custom-op library was not built: YatGemm runs as the model's ONNX function"
    kernels = backend.library_kernels()
    uncovered = sorted(t for t in node_types if not any(t in kernels.get(p, ()) for p in backend.providers))
    if uncovered:
        names = ", ".join(dtypes.by_onnx(t).name for t in uncovered)
        return False, f"the library has no {names} YatGemm kernel: YatGemm runs as the model's ONNX function"
    on_cpu = sorted(t for t in node_types if t not in kernels.get(backend.providers[0], ()))
    if on_cpu:
        names = ", ".join(dtypes.by_onnx(t).name for t in on_cpu)
        return True, f"{names} YatGemm nodes run on the library's CPU kernels (no {backend.providers[0]} kernel)"
    return True, f"YatGemm runs as the library's {backend.providers[0]} kernel"


def _load_model(model: str | Path | bytes | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(str(model), load_external_data=False)


@dataclass
class Session:
    """An ONNX Runtime session (or a TensorRT engine runner), and whether YatGemm runs as our kernel in it."""

    inner: object  # onnxruntime.InferenceSession, or yatdeploy.trt.runner.EngineRunner
    backend: Backend
    uses_library: bool
    reason: str


def create_engine_session(onnx_model: str | Path, backend: Backend, *, engine: str | Path | None = None,
                          profile: BatchProfile | None = None) -> Session:
    """The tensorrt backend's session: `engine`, or an engine built now for `profile` (default 1..64)."""
    from yatdeploy.trt.engine import BatchProfile
    from yatdeploy.trt.runner import open_engine

    runner = open_engine(onnx_model, engine, (profile or BatchProfile(1, 8, 64)).check())
    return Session(runner, backend, True, runner.describe_yat_gemm())


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    backend: Backend,
    *,
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
    profile_to: Path | None = None,
) -> Session:
    reason = backend.availability()
    if reason:
        raise YatDeployError(f"backend {backend.name} is not available: {reason}")
    if backend.kind == "tensorrt":
        if not isinstance(model, (str, Path)):
            raise YatDeployError("the tensorrt backend builds its engine from an ONNX file: pass a path")
        return create_engine_session(model, backend)
    proto = _load_model(model)
    imports = {o.domain: o.version for o in proto.opset_import}
    use_library, why = library_decision(backend, yat_gemm_node_types(proto), imports.get(YAT_GEMM.domain))
    log.info("%s: %s", backend.name, why)
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    options.intra_op_num_threads = intra_op_threads
    if not allow_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if use_library:
        native.preload_dependencies()
        options.register_custom_ops_library(str(backend.library_path()))
    if profile_to is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_to)
    source = model if isinstance(model, (bytes, str, Path)) else proto.SerializeToString()
    try:
        inner = ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), sess_options=options, providers=list(backend.providers)
        )
    except Exception as exc:
        raise OnnxModelError(
            f"ONNX Runtime ({backend.name}) can't load the model: {str(exc).strip().splitlines()[0]}"
        ) from exc
    return Session(inner, backend, use_library, why)


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype == ml_dtypes.bfloat16:
        # ONNX Runtime's numpy bridge has no bfloat16; hand it the raw 16-bit pattern.
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), onnx_element_type=ONNX_BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _from_ort_value(value: ort.OrtValue) -> np.ndarray:
    if value.element_type() == ONNX_BFLOAT16:
        shape = tuple(value.shape())
        count = int(np.prod(shape, dtype=np.int64))
        raw = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else []
        return np.array(raw, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(shape)
    return value.numpy()


def run(session: Session, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a session on numpy inputs of any admitted dtype, bfloat16 included."""
    if session.backend.kind == "tensorrt":
        return session.inner.run(dict(feeds))
    ort_feeds = {name: _to_ort_value(array) for name, array in feeds.items()}
    try:
        outputs = session.inner.run_with_ort_values(None, ort_feeds)
    except Exception as exc:
        raise OnnxModelError(f"ONNX Runtime failed to run the model: {str(exc).strip().splitlines()[0]}") from exc
    return [_from_ort_value(v) for v in outputs]


def profiled_kernel_runs(session: Session) -> dict[str, int]:
    """End a session's profiling (create_session(profile_to=...)): YatGemm kernel runs per provider.

    An inlined function leaves no YatGemm node in the profile (its nodes are the function's body),
    so an empty result means the library's kernel did not run.
    """
    profile = Path(session.inner.end_profiling())
    events = json.loads(profile.read_text())
    runs: dict[str, int] = {}
    for event in events:
        args = event.get("args", {})
        if (event.get("cat") == "Node" and args.get("op_name") == YAT_GEMM.name
                and event.get("name", "").endswith("_kernel_time")):
            provider = args.get("provider", "?")
            runs[provider] = runs.get(provider, 0) + 1
    return runs


def yat_gemm_kernel_runs(
    model: str | Path | bytes | onnx.ModelProto, backend: Backend, feeds: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Run once under ONNX Runtime's profiler: how many YatGemm kernel runs each provider made."""
    with tempfile.TemporaryDirectory(prefix="yatdeploy-profile-") as folder:
        session = create_session(model, backend, profile_to=Path(folder) / "profile")
        run(session, feeds)
        return profiled_kernel_runs(session)


def describe_kernel_runs(runs: Mapping[str, int]) -> str:
    if not runs:
        return "YatGemm ran as the inlined ONNX function"
    return "YatGemm ran as the library kernel: " + ", ".join(f"{n} node run(s) on {p}" for p, n in sorted(runs.items()))

