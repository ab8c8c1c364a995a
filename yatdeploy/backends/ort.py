"""ONNX Runtime for the ORT backends (ort_cpu, ort_cuda, ort_function): sessions, and whether the
custom-op library serves a model.

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

import ml_dtypes
import numpy as np
import onnx

try:
    import onnxruntime as ort
except ImportError:  # neither the cpu nor the gpu extra is installed
    ort = None

from yatdeploy import dtypes, graph, native
from yatdeploy.backends.base import DEFAULT_OPTIONS, Options, YatGemmExecution
from yatdeploy.errors import OnnxModelError, YatDeployError
from yatdeploy.spec import IMPLEMENTATIONS, ONNX_BFLOAT16, YAT_GEMM

log = logging.getLogger("yatdeploy.backends.ort")

CPU = IMPLEMENTATIONS["cpu"].provider  # CPUExecutionProvider
CUDA = IMPLEMENTATIONS["cuda"].provider  # CUDAExecutionProvider
_ORT_LOG_ERRORS_ONLY = 3


def _kernels(*implementations: str) -> dict[str, frozenset[int]]:
    return {IMPLEMENTATIONS[i].provider: frozenset(IMPLEMENTATIONS[i].dtypes) for i in implementations}


# The kernels each library registers, per provider: the spec's IMPLEMENTATIONS (the CUDA build has both).
CPU_LIBRARY_KERNELS = _kernels("cpu")
CUDA_LIBRARY_KERNELS = _kernels("cpu", "cuda")


@dataclass(frozen=True)
class OrtBackend:
    """An ONNX Runtime backend: its providers, and the custom-op library it registers when that serves the model."""

    name: str
    description: str
    providers: tuple[str, ...]
    library: str | None  # "cpu", "cuda" or None (function only)
    default_rank: int | None = None
    files = {".onnx": "an ONNX model"}
    triton_platform = "onnxruntime_onnx"
    triton_backend = "onnxruntime"
    builder = None  # ONNX Runtime runs the ONNX model as it is

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
        if ort is None:
            return "onnxruntime is not installed (pip install 'yatdeploy[cpu]' or 'yatdeploy[gpu]')"
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return f"this onnxruntime has no {', '.join(missing)} (install onnxruntime-gpu)"
        if self.library is not None and self.library_path() is None:
            what = "with CUDA kernels " if self.library == "cuda" else ""
            return f"yatdeploy's custom-op library {what}was not built (see `yatdeploy doctor`)"
        if CUDA in self.providers and native.gpu_count() == 0:
            return "no NVIDIA GPU is visible"
        return None

    def open(self, model: str | Path | bytes | onnx.ModelProto, options: Options = DEFAULT_OPTIONS) -> Session:
        if isinstance(model, (str, Path)):
            # Loaded here, external data included: onnx checks that the data stays beside the model.
            model = onnx.load(str(model))
        return create_session(model, self, intra_op_threads=options.intra_op_threads,
                              allow_spinning=options.allow_spinning, profile_to=options.profile_to)


def available_providers() -> list[str]:
    """The execution providers of the installed onnxruntime (none without one)."""
    return ort.get_available_providers() if ort is not None else []


def yat_gemm_node_types(model: onnx.ModelProto) -> set[int]:
    from yatdeploy.graph import node_elem_types

    return set(node_elem_types(model).values())


def library_decision(backend: OrtBackend, node_types: set[int], yat_version: int | None) -> tuple[bool, str]:
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


class Session:
    """An ONNX Runtime session (the ORT backends' Runner), and whether YatGemm runs as our kernel in it."""

    max_batch = None

    def __init__(self, inner: ort.InferenceSession, backend: OrtBackend, uses_library: bool, reason: str,
                 model: onnx.ModelProto, *, profiling: bool = False) -> None:
        self.inner = inner
        self.backend = backend
        self.uses_library = uses_library
        self.reason = reason
        self.inputs = [graph.signature(v) for v in graph.graph_inputs(model)]
        self.outputs = [graph.signature(v) for v in model.graph.output]
        self._profiling = profiling
        self._kernel_runs: dict[str, int] | None = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on numpy inputs of any admitted dtype, bfloat16 and strings (object arrays of str) included."""
        bfloat16 = (any(a.dtype == ml_dtypes.bfloat16 for a in feeds.values())
                    or any(o.dtype == "bfloat16" for o in self.outputs))
        try:
            if not bfloat16:  # ORT's numpy path: strings too, and no OrtValue made per input and output
                return self.inner.run(None, dict(feeds))
            outputs = self.inner.run_with_ort_values(None, {n: _to_ort_value(a) for n, a in feeds.items()})
        except Exception as exc:
            raise OnnxModelError(f"ONNX Runtime failed to run the model: {str(exc).strip().splitlines()[0]}") from exc
        return [_from_ort_value(v) for v in outputs]

    def kernel_runs(self) -> dict[str, int]:
        """End profiling (create_session(profile_to=...)): YatGemm kernel runs per provider.

        An inlined function leaves no YatGemm node in the profile (its nodes are the function's body),
        so an empty result means the library's kernel did not run.
        """
        if self._kernel_runs is None:
            self._kernel_runs = _profiled_kernel_runs(Path(self.inner.end_profiling()))
        return self._kernel_runs

    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> YatGemmExecution:
        """Per the profiler when profiling (did YatGemm run as the library kernel the session was set up
        for, `nodes` x `runs` times?), else per the library decision."""
        kernel = "custom-op library kernel" if self.uses_library else "ONNX function"
        if not self._profiling:
            return YatGemmExecution(kernel, self.reason)
        kernel_runs = self.kernel_runs()
        expected_runs = nodes * runs
        if expected_runs == 0:
            return YatGemmExecution(kernel, "no YatGemm nodes ran", kernel_runs)
        problem = None
        if self.uses_library and sum(kernel_runs.values()) < expected_runs:
            problem = (f"the custom-op library was registered but the profiler saw "
                       f"{sum(kernel_runs.values())} YatGemm kernel runs, expected {expected_runs}")
        elif not self.uses_library and kernel_runs:
            problem = "YatGemm ran as a kernel although no library was registered"
        elif not self.uses_library and self.backend.library is not None:
            problem = f"the library was not used: {self.reason}"
        return YatGemmExecution(kernel, describe_kernel_runs(kernel_runs), kernel_runs, problem)


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    backend: OrtBackend,
    *,
    intra_op_threads: int = 0,
    allow_spinning: bool = True,
    profile_to: Path | None = None,
) -> Session:
    reason = backend.availability()
    if reason:
        raise YatDeployError(f"backend {backend.name} is not available: {reason}")
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
    return Session(inner, backend, use_library, why, proto, profiling=profile_to is not None)


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
    return session.run(feeds)


def _profiled_kernel_runs(profile: Path) -> dict[str, int]:
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
    model: str | Path | bytes | onnx.ModelProto, backend: OrtBackend, feeds: Mapping[str, np.ndarray]
) -> dict[str, int]:
    """Run once under ONNX Runtime's profiler: how many YatGemm kernel runs each provider made."""
    with tempfile.TemporaryDirectory(prefix="yatdeploy-profile-") as folder:
        session = create_session(model, backend, profile_to=Path(folder) / "profile")
        session.run(feeds)
        return session.kernel_runs()


def describe_kernel_runs(runs: Mapping[str, int]) -> str:
    if not runs:
        return "YatGemm ran as the inlined ONNX function"
    return "YatGemm ran as the library kernel: " + ", ".join(f"{n} node run(s) on {p}" for p, n in sorted(runs.items()))

