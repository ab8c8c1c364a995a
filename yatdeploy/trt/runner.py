"""Running a TensorRT engine on numpy inputs: the `tensorrt` backend of validate and serve.

The engine is deserialized without importing yatdeploy.trt.plugin: an ahead-of-time plugin's kernel
is inside the engine, and running it this way shows that it needs nothing else (as in trtexec or
Triton). Device buffers are torch CUDA tensors, on torch's current stream.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import ml_dtypes
import numpy as np

from yatdeploy.errors import OnnxModelError, YatDeployError, option
from yatdeploy.trt.engine import BatchProfile, EngineSignature, availability, build_engine, import_tensorrt


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _to_device(array: np.ndarray, dtype: str):
    import torch

    if dtype == "bfloat16":
        host = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        host = torch.from_numpy(np.ascontiguousarray(array))
    return host.to("cuda", non_blocking=False)


def _to_numpy(tensor, dtype: str) -> np.ndarray:
    import torch

    host = tensor.cpu()
    if dtype == "bfloat16":
        return host.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return host.numpy()


class EngineRunner:
    def __init__(self, engine_path: str | Path, trt=None) -> None:
        """`trt`: the TensorRT module that runs the engine (default: the data-center `tensorrt`, checked
        here; a caller passing tensorrt_rtx_bindings has checked TensorRT for RTX's availability)."""
        if trt is None:
            reason = availability()
            if reason:
                raise YatDeployError(f"the tensorrt backend is not available: {reason}")
            trt = import_tensorrt()
        self.path = Path(engine_path)
        self.signature = EngineSignature.read(self.path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise OnnxModelError(f"{self.path}: TensorRT can't load this engine (built by TensorRT "
                                 f"{self.signature.tensorrt or '?'} for {self.signature.gpu or '?'}); rebuild it here")
        self.context = self.engine.create_execution_context()
        self._lock = threading.Lock()  # one execution context: one run at a time

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import torch

        batch = next(iter(feeds.values())).shape[0]
        profile = self.signature.profile
        if not profile.min <= batch <= profile.max:
            raise OnnxModelError(f"batch {batch} is outside the engine's profile {profile.min}..{profile.max} "
                                 f"(rebuild with other {option('min_batch')}/{option('max_batch')})")
        with self._lock:
            keep = []
            for info in self.signature.inputs:
                tensor = _to_device(feeds[info.name], info.dtype)
                keep.append(tensor)
                self.context.set_input_shape(info.name, tuple(tensor.shape))
                self.context.set_tensor_address(info.name, tensor.data_ptr())
            outputs = []
            for info in self.signature.outputs:
                shape = tuple(self.context.get_tensor_shape(info.name))
                tensor = torch.empty(shape, dtype=_torch_dtype(info.dtype), device="cuda")
                outputs.append(tensor)
                self.context.set_tensor_address(info.name, tensor.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise OnnxModelError(f"TensorRT failed to run {self.path.name} on batch {batch}")
            stream.synchronize()
            return [_to_numpy(t, info.dtype) for t, info in zip(outputs, self.signature.outputs)]

    def describe_yat_gemm(self) -> str:
        s = self.signature
        if s.plugin_layers == 0:
            return (f"YatGemm runs as {s.runtime}'s own layers (the inlined ONNX function): {s.yat_gemm_nodes} "
                    f"YatGemm node(s), {s.runtime} {s.tensorrt}")
        return (f"YatGemm runs as the {s.runtime} plugin: {s.plugin_layers} plugin layer(s) for {s.yat_gemm_nodes} "
                f"YatGemm node(s), {s.runtime} {s.tensorrt}" + (f" on {s.gpu}" if s.gpu else ""))


def open_engine(onnx_model: str | Path, engine: str | Path | None, profile: BatchProfile) -> EngineRunner:
    """A runner for `engine`, or for an engine built now from `onnx_model` (kept in a temporary folder)."""
    if engine is not None:
        return EngineRunner(engine)
    reason = availability()
    if reason:
        raise YatDeployError(f"the tensorrt backend is not available: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="yatdeploy-engine-"))
    result = build_engine(onnx_model, folder / "model.plan", profile)
    return EngineRunner(result.path)
