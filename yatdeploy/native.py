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
import struct
from dataclasses import dataclass
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
    lib_dir = _openblas_lib_dir()
    if lib_dir is None:
        return
    for candidate in sorted(lib_dir.glob("libscipy_openblas*.so*")):
        ctypes.CDLL(str(candidate), mode=ctypes.RTLD_GLOBAL)
        return


@dataclass(frozen=True)
class ElfDynamic:
    """What the dynamic loader reads from a shared library: the libraries it needs (DT_NEEDED) and where it looks
    for them first (DT_RUNPATH, else the older DT_RPATH), as written (`$ORIGIN` unexpanded)."""

    needed: tuple[str, ...]
    runpath: tuple[str, ...]


_DT_NEEDED, _DT_RPATH, _DT_RUNPATH = 1, 15, 29
_SHT_DYNAMIC = 6


def elf_dynamic(path: str | Path) -> ElfDynamic:
    """Read the dynamic section of a 64-bit ELF file (the libraries built here and the wheels' are), with no tool
    (readelf, patchelf) needed. ValueError for anything else."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] not in (1, 2):
        raise ValueError(f"{path}: not a 64-bit ELF file")
    order = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(order + "Q", data, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", data, 0x3A)
    sections = [struct.unpack_from(order + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed: list[str] = []
    runpath: list[str] = []
    rpath: list[str] = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if kind != _SHT_DYNAMIC:
            continue
        strings = sections[link][4]

        def string(at: int, strings: int = strings) -> str:
            start = strings + at
            return data[start:data.index(b"\0", start)].decode()

        for entry in range(offset, offset + size, 16):
            tag, value = struct.unpack_from(order + "qQ", data, entry)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                needed.append(string(value))
            elif tag in (_DT_RUNPATH, _DT_RPATH):
                (runpath if tag == _DT_RUNPATH else rpath).extend(p for p in string(value).split(":") if p)
    return ElfDynamic(tuple(needed), tuple(runpath or rpath))


def _expand_origin(entry: str, library: Path) -> Path:
    origin = str(library.resolve().parent)
    return Path(entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin))


def _openblas_lib_dir() -> Path | None:
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return Path(scipy_openblas32.get_lib_dir())


def library_dependencies(library: str | Path) -> dict[str, Path]:
    """The shared libraries that `library` needs from outside the system, by the name it asks for (DT_NEEDED), and
    theirs in turn: what has to travel with it to load on another machine. A name counts when its RUNPATH finds it
    (`$ORIGIN` expanded) or, for OpenBLAS, in scipy-openblas32 (where a library in a build folder finds it only
    through preload_dependencies). Whatever else it needs (libc, libstdc++, libgcc_s, libm) is the target system's."""
    found: dict[str, Path] = {}
    pending = [Path(library).resolve()]
    while pending:
        current = pending.pop()
        dynamic = elf_dynamic(current)
        folders = [_expand_origin(entry, current) for entry in dynamic.runpath]
        for name in dynamic.needed:
            if name in found:
                continue
            places = list(folders)
            if name.startswith("libscipy_openblas") and (openblas := _openblas_lib_dir()) is not None:
                places.append(openblas)
            path = next((folder / name for folder in places if (folder / name).is_file()), None)
            if path is None:
                if name.startswith("libscipy_openblas"):
                    raise FileNotFoundError(f"{current} needs {name}, which is neither in its RUNPATH "
                                            f"({':'.join(dynamic.runpath) or 'none'}) nor in scipy-openblas32")
                continue
            found[name] = path.resolve()
            pending.append(found[name])
    return found


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
