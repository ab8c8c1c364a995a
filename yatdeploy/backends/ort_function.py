"""`ort-function`: plain ONNX Runtime on the CPU, YatGemm inlined from the model's ONNX function."""

from yatdeploy.backends.ort import CPU, OrtBackend

BACKEND = OrtBackend("ort-function", "ONNX Runtime, CPU, YatGemm inlined from the model's ONNX function", (CPU,), None,
                     default_rank=2)
