"""Where the native build put things: the ONNX Runtime custom-op libraries, the ahead-of-time compiled
GPU kernels (Triton PTX/cubin and their manifest) and the build facts.

The build (CMake, run by the package install) installs them into `yatdeploy/_native/` of the
installed package; an editable install keeps them in site-packages while the Python sources stay in
the checkout, so they are looked up through the distribution's file list as well.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from importlib import metadata
from pathlib import Path

CPU_LIBRARY = "libyatdeploy_ort.so"
CUDA_LIBRARY = "libyatdeploy_ort_cuda.so"
BUILD_INFO = "build_info.json"
# The AOT kernels' folder inside _native/, and its index (yatdeploy/gpu/aot.py writes both).
GPU_KERNELS_DIR = "gpu_kernels"
GPU_KERNELS_MANIFEST = "manifest.json"
ENV_LIBRARY_DIR = "YATDEPLOY_NATIVE_DIR"  # overrides the lookup (a build folder, say)


def _installed(name: str) -> Path | None:
    """The installed file `name`, a path relative to _native/ ("libyatdeploy_ort.so", "gpu_kernels/manifest.json")."""
    override = os.environ.get(ENV_LIBRARY_DIR)
    if override:
        path = Path(override) / name
        return path.resolve() if path.is_file() else None
    beside = Path(__file__).parent / "_native" / name
    if beside.is_file():
        return beside.resolve()
    # Every yatdeploy distribution on the path, not just the first: a stale metadata folder in a
    # checkout can come before the installed one.
    wanted = ("_native", *Path(name).parts)
    for dist in metadata.distributions(name="yatdeploy"):
        for entry in dist.files or []:
            if tuple(entry.parts[-len(wanted):]) == wanted:
                path = Path(str(entry.locate()))
                if path.is_file():
                    return path.resolve()
    return None


def ort_library_path() -> Path | None:
    """The CPU custom-op library (float, double, float16, bfloat16 kernels), if built."""
    return _installed(CPU_LIBRARY)


def ort_cuda_library_path() -> Path | None:
    """The library with CUDA kernels as well (built when nvcc was present), if built."""
    return _installed(CUDA_LIBRARY)


def gpu_kernels_dir() -> Path | None:
    """The folder of the YatGemm GPU kernels compiled ahead of time (PTX, cubin, manifest.json), if built.

    The package build makes it when it builds the CUDA parts (nvcc found) and triton is in the build
    environment (docs/gpu-kernel.md)."""
    manifest = _installed(f"{GPU_KERNELS_DIR}/{GPU_KERNELS_MANIFEST}")
    return manifest.parent if manifest is not None else None


def gpu_kernels_manifest() -> dict | None:
    """The AOT kernels' manifest.json (yatdeploy/gpu/aot.py), if built; its "ptx" and "cubin" names are
    relative to gpu_kernels_dir()."""
    folder = gpu_kernels_dir()
    if folder is None:
        return None
    return json.loads((folder / GPU_KERNELS_MANIFEST).read_text())


@functools.cache
def build_info() -> dict:
    path = _installed(BUILD_INFO)
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@functools.cache
def preload_dependencies() -> None:
    """Load the BLAS the library links against, so it resolves wherever the library was installed."""
    try:
        import scipy_openblas32
    except ImportError:
        return
    lib_dir = Path(scipy_openblas32.get_lib_dir())
    for candidate in sorted(lib_dir.glob("libscipy_openblas*.so*")):
        ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
        return


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
