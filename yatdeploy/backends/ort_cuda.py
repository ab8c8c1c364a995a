"""`ort-cuda`: ONNX Runtime's CUDA provider with the custom-op library's CUDA kernels."""

from yatdeploy.backends.ort import CPU, CUDA, OrtBackend

BACKEND = OrtBackend("ort-cuda", "ONNX Runtime, CUDA, yatdeploy's fused YatGemm kernels", (CUDA, CPU), "cuda",
                     default_rank=0)
