"""`ort-cpu`: ONNX Runtime on the CPU with yatdeploy's custom-op library (fused YatGemm kernels)."""

from yatdeploy.backends.ort import CPU, OrtBackend

BACKEND = OrtBackend("ort-cpu", "ONNX Runtime, CPU, yatdeploy's fused YatGemm kernels", (CPU,), "cpu", default_rank=1)
