"""ONNX Runtime sessions for the project: one place that decides how a model is run.

Backends are named as on the command line. Today there is one: `ort-function`, plain ONNX Runtime on
the CPU with YatGemm inlined from the model-local function. The custom-op library adds `ort-cpu` and
`ort-cuda` (see the issues in docs/roadmap.md).
"""

from __future__ import annotations

import ctypes
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

from yatdeploy.errors import OnnxModelError, YatDeployError

_BFLOAT16 = onnx.TensorProto.BFLOAT16
_ORT_LOG_ERRORS_ONLY = 3


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    providers: tuple[str, ...]
    uses_custom_op_library: bool

    def availability(self) -> str | None:
        """None when usable here, otherwise why not."""
        if ort is None:
            return "onnxruntime is not installed (pip install 'yatdeploy[cpu]' or 'yatdeploy[gpu]')"
        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            return f"ONNX Runtime here lacks {', '.join(missing)}"
        return None


BACKENDS: dict[str, Backend] = {
    "ort-function": Backend(
        "ort-function",
        "ONNX Runtime, CPU, YatGemm inlined from the model's ONNX function",
        ("CPUExecutionProvider",),
        uses_custom_op_library=False,
    ),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise YatDeployError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def available_backends() -> list[Backend]:
    return [b for b in BACKENDS.values() if b.availability() is None]


def create_session(model: str | Path | bytes, backend: Backend, intra_op_threads: int = 0) -> "ort.InferenceSession":
    reason = backend.availability()
    if reason:
        raise YatDeployError(f"backend {backend.name} is not available: {reason}")
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    options.intra_op_num_threads = intra_op_threads
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(backend.providers))
    except Exception as exc:
        raise OnnxModelError(f"ONNX Runtime ({backend.name}) can't load the model: {str(exc).strip().splitlines()[0]}") from exc


def _to_ort_value(array: np.ndarray) -> "ort.OrtValue":
    if array.dtype == ml_dtypes.bfloat16:
        # ONNX Runtime's numpy bridge has no bfloat16; hand it the raw 16-bit pattern.
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(array).view(np.uint16), onnx_element_type=_BFLOAT16
        )
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))


def _from_ort_value(value: "ort.OrtValue") -> np.ndarray:
    if value.element_type() == _BFLOAT16:
        shape = tuple(value.shape())
        count = int(np.prod(shape, dtype=np.int64))
        raw = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else []
        return np.array(raw, dtype=np.uint16).view(ml_dtypes.bfloat16).reshape(shape)
    return value.numpy()


def run(session: "ort.InferenceSession", feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run a session on numpy inputs of any admitted dtype, bfloat16 included."""
    ort_feeds = {name: _to_ort_value(array) for name, array in feeds.items()}
    try:
        outputs = session.run_with_ort_values(None, ort_feeds)
    except Exception as exc:
        raise OnnxModelError(f"ONNX Runtime failed to run the model: {str(exc).strip().splitlines()[0]}") from exc
    return [_from_ort_value(v) for v in outputs]
