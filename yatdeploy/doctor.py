"""`yatdeploy doctor`: what this installation can do."""

from __future__ import annotations

import platform
from importlib import metadata

from yatdeploy import __version__, backends, native
from yatdeploy.backends import ort
from yatdeploy.trt import plugin_logic

_DISTRIBUTIONS = ("torch", "nmn", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "onnxruntime-gpu", "numpy",
                  "scipy-openblas32", "tensorrt")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def gpu_kernels() -> list[dict] | None:
    """The AOT kernel artifacts as absolute paths, one per manifest entry; None when not built."""
    folder = native.gpu_kernels_dir()
    manifest = native.gpu_kernels_manifest()
    if folder is None or manifest is None:
        return None
    return [
        {"arch": e["arch"], "dtype": e["dtype"], "config": e["config"], "ptx": str(folder / e["ptx"]),
         "cubin": str(folder / e["cubin"]), "kernel": e["kernel"], "variant": e["variant"]}
        for e in manifest["entries"]
    ]


def _gpu_kernels_summary(report: dict) -> str:
    kernels = report["gpu_kernels"]
    if kernels is None:
        return "not built (needs nvcc and triton at install: docs/gpu-kernel.md)"
    arches = ", ".join(sorted({k["arch"] for k in kernels}))
    dtypes = ", ".join(sorted({k["dtype"] for k in kernels}))
    count = f"{len(kernels)} kernel{'' if len(kernels) == 1 else 's'}"
    return f"{report['gpu_kernels_dir']} ({count}: {arches}; {dtypes})"


def collect() -> dict:
    kernels_dir = native.gpu_kernels_dir()
    cpu_library = native.ort_library_path()
    cuda_library = native.ort_cuda_library_path()
    info = native.build_info()
    gpus = native.gpu_count()
    return {
        "yatdeploy": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {dist: _version(dist) for dist in _DISTRIBUTIONS},
        "onnxruntime_providers": ort.available_providers(),
        "ort_custom_ops_library": str(cpu_library) if cpu_library else None,
        "ort_custom_ops_cuda_library": str(cuda_library) if cuda_library else None,
        "cuda_kernels_built": bool(info.get("cuda_kernels_built", False)) and cuda_library is not None,
        "cuda_architectures": info.get("cuda_architectures"),
        "ort_headers_api_version": info.get("ort_api_version"),
        # The YatGemm kernels compiled ahead of time (Triton PTX and cubin), which both GPU hosts launch.
        "gpu_kernels_dir": str(kernels_dir) if kernels_dir else None,
        "gpu_kernels": gpu_kernels(),
        # The TensorRT plugin is yatdeploy.trt.plugin, registered on import; it runs the gpu_kernels too.
        "trt_plugin_definition": plugin_logic.describe(),
        "gpu": {"present": gpus > 0, "count": gpus},
        "backends": {
            b.name: {"available": b.availability() is None, "reason": b.availability(), "description": b.description}
            for b in backends.all()
        },
    }


def format_text(report: dict) -> str:
    lines = [f"yatdeploy {report['yatdeploy']} on Python {report['python']} ({report['platform']})", "", "packages:"]
    for dist, version in report["versions"].items():
        lines.append(f"  {dist:<18} {version or 'not installed'}")
    lines += ["", "native build:"]
    lines.append(f"  custom-op library      {report['ort_custom_ops_library'] or 'not built'}")
    cuda = report["ort_custom_ops_cuda_library"] or "not built"
    if report["cuda_kernels_built"]:
        cuda += f" (architectures {report['cuda_architectures']})"
    lines.append(f"  with CUDA kernels      {cuda}")
    lines.append(f"  ORT headers API        {report['ort_headers_api_version'] or '-'}")
    lines.append(f"  GPU kernels (AOT)      {_gpu_kernels_summary(report)}")
    gpu = report["gpu"]
    lines += ["", f"GPU: {gpu['count']} NVIDIA GPU(s) visible" if gpu["present"] else "GPU: none visible"]
    lines.append(f"ONNX Runtime providers: {', '.join(report['onnxruntime_providers']) or '-'}")
    lines += ["", "backends:"]
    for name, backend in report["backends"].items():
        state = "available" if backend["available"] else f"unavailable: {backend['reason']}"
        lines.append(f"  {name:<13} {state}")
    return "\n".join(lines)
