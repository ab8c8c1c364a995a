"""The backends: one module each, registered here; validate, serve, demo, doctor, bench, build-engine and the
model repository's reader and writer use only this registry and the interface in base.py.

A new backend is one module (a `BACKEND` object implementing base.Backend) and one entry in _MODULES; one that
builds engines has a `builder` (base.Builder), and build-engine, the repository and serve find it here:
`builders()`, `for_file(path)` (which backend an engine file needs), `file_kinds()` and `triton_names(suffix)`.
"""

from __future__ import annotations

from pathlib import Path

from yatdeploy.backends import ort_cpu, ort_cuda, ort_function, tensorrt, tensorrt_rtx
from yatdeploy.backends.base import (
    DEFAULT_BATCH_PROFILE,
    Backend,
    Builder,
    BuildOptions,
    EngineInfo,
    Options,
    Runner,
    YatGemmExecution,
)
from yatdeploy.errors import YatDeployError

__all__ = ["DEFAULT_BATCH_PROFILE", "Backend", "BuildOptions", "Builder", "EngineInfo", "Options", "Runner",
           "YatGemmExecution", "all", "builders", "check_file", "default", "default_builder", "file_kinds",
           "for_file", "get", "names", "register", "triton_names", "unregister"]

# In the order validate runs them and doctor lists them.
_MODULES = (ort_cpu, ort_cuda, ort_function, tensorrt, tensorrt_rtx)

_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    if not isinstance(backend, Backend):
        members = sorted({n for n in vars(Backend) if not n.startswith("_")} | set(Backend.__annotations__))
        raise TypeError(f"{type(backend).__name__} is not a backends.Backend: it has no "
                        f"{', '.join(n for n in members if not hasattr(backend, n))} (builder = None: it builds no "
                        "engines)")
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


def builders() -> list[Backend]:
    """The backends that build engines (build-engine --backend), in the registry's order."""
    return [b for b in _REGISTRY.values() if b.builder is not None]


def default_builder() -> Backend:
    """The backend build-engine uses when none is named: the first builder the registry lists."""
    found = builders()
    if not found:
        raise YatDeployError("no backend builds engines")
    return found[0]


def file_kinds() -> dict[str, str]:
    """The model files the backends open, by suffix, and what each is, in the registry's order."""
    kinds: dict[str, str] = {}
    for backend in _REGISTRY.values():
        for suffix, what in backend.files.items():
            kinds.setdefault(suffix, what)
    return kinds


def for_file(path: str | Path) -> Backend | None:
    """The backend the model file at `path` needs: for an engine, the builder's whose engine it is (as the engine
    says: a TensorRT engine's signature names its runtime); None for a file that any backend opening its suffix
    runs (an ONNX model: the caller's choice, else default()). A YatDeployError for a file no backend opens or an
    engine no builder here owns."""
    path = Path(path)
    if path.suffix not in file_kinds():
        raise YatDeployError(f"{path.name}: no backend opens {path.suffix or 'extension-less'} files")
    makers = [b for b in builders() if b.builder.suffix == path.suffix]
    if not makers:
        return None
    for backend in makers:
        if backend.builder.owns(path):
            return backend
    raise YatDeployError(f"{path.name}: {file_kinds()[path.suffix]} that none of the "
                         f"{' or '.join(b.name for b in makers)} backends built")


def triton_names(suffix: str) -> list[tuple[str, str]]:
    """Triton's (backend, platform) names for a model file of this suffix in a repository: those of the backends
    that run such a file as it is (a builder's own engines; for any other backend, its files), in the registry's
    order, without repeats."""
    runs = [b for b in _REGISTRY.values()
            if (b.builder.suffix == suffix if b.builder is not None else suffix in b.files)]
    return list(dict.fromkeys((b.triton_backend, b.triton_platform) for b in runs))
