"""The backends: one module each, registered here; validate, serve, demo, doctor and bench use only
this registry and the interface in base.py.

A new backend is one module (a `BACKEND` object implementing base.Backend) and one entry in _MODULES.
"""

from __future__ import annotations

from pathlib import Path

from yatdeploy.backends import ort_cpu, ort_cuda, ort_function, tensorrt, tensorrt_rtx
from yatdeploy.backends.base import Backend, Options, Runner, YatGemmExecution
from yatdeploy.errors import YatDeployError

__all__ = ["Backend", "Options", "Runner", "YatGemmExecution", "all", "check_file", "default", "get", "names",
           "register", "unregister"]

# In the order validate runs them and doctor lists them.
_MODULES = (ort_cpu, ort_cuda, ort_function, tensorrt, tensorrt_rtx)

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is registered already")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


for _module in _MODULES:
    register(_module.BACKEND)


def names() -> list[str]:
    return list(_REGISTRY)


def all() -> list[Backend]:  # noqa: A001  (backends.all(), beside backends.names())
    return list(_REGISTRY.values())


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise YatDeployError(f"unknown backend {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def default() -> Backend:
    """The fastest backend that works here (the lowest default_rank available)."""
    ranked = sorted((b for b in _REGISTRY.values() if b.default_rank is not None), key=lambda b: b.default_rank)
    for backend in ranked:
        if backend.availability() is None:
            return backend
    last = ranked[-1] if ranked else None
    raise YatDeployError("no default backend works here"
                         + (f": {last.name}: {last.availability()}" if last is not None else ""))


def check_file(backend: Backend, path: str | Path) -> None:
    """A YatDeployError when `backend` does not open files like `path` (a TensorRT engine on ONNX Runtime)."""
    path = Path(path)
    if path.suffix in backend.files:
        return
    takers = [b for b in _REGISTRY.values() if path.suffix in b.files]
    if not takers:
        raise YatDeployError(f"{path.name}: no backend opens {path.suffix or 'extension-less'} files")
    what = takers[0].files[path.suffix]
    raise YatDeployError(f"{path.name} is {what}; it runs on the {' or '.join(b.name for b in takers)} backend, "
                         f"not {backend.name}")
