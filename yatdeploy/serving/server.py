"""`yatdeploy serve`: load the models, build the app, run uvicorn."""

from __future__ import annotations

import gc
import importlib.util
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from yatdeploy import runtime
from yatdeploy.errors import YatDeployError
from yatdeploy.progress import Progress

if TYPE_CHECKING:
    from yatdeploy.serving.model import ServedModel, UnavailableModel
    from yatdeploy.serving.repository import ModelSource


def load_models(path: str | Path, backend_name: str | None, intra_op_threads: int, progress: Progress,
                ) -> tuple[list[ServedModel], list[UnavailableModel]]:
    """The models at `path` that load, and those of a repository that do not, with the reason (said once on
    stderr; the server reports them not ready). A single model file that does not load, or a repository of
    which none does, is a YatDeployError."""
    from yatdeploy.serving.model import UnavailableModel
    from yatdeploy.serving.repository import discover

    if backend_name is not None:
        runtime.get_backend(backend_name)  # an unknown --backend is the command's mistake, not a model's
    models: list[ServedModel] = []
    unavailable: list[UnavailableModel] = []
    for source in discover(path):
        try:
            models.append(_load_model(source, backend_name, intra_op_threads, progress))
        except YatDeployError as exc:
            if Path(path).is_file():
                raise
            unavailable.append(UnavailableModel(source.name, source.version, exc.message))
    if not models:
        raise YatDeployError(f"{path}: no model could be loaded: " + "; ".join(m.reason for m in unavailable))
    for model in unavailable:
        print(f"yatdeploy serve: not serving {model.reason}", file=sys.stderr, flush=True)
    return models, unavailable


def _load_model(source: ModelSource, backend_name: str | None, intra_op_threads: int,
                progress: Progress) -> ServedModel:
    from yatdeploy.serving.model import ServedModel

    if source.error is not None:
        raise YatDeployError(source.error)
    # --backend for every model, else the model's config.pbtxt, else the fastest that works here.
    name = backend_name or source.backend
    backend = runtime.get_backend(name) if name else runtime.default_backend()
    if source.path.suffix == ".plan" and backend.kind != "tensorrt":
        raise YatDeployError(f"model '{source.name}': {source.path.name} is a TensorRT engine; it runs on the "
                             f"tensorrt backend, not {backend.name}")
    reason = backend.availability()
    if reason:
        raise YatDeployError(f"model '{source.name}': backend {backend.name} is not available: {reason}")
    with progress.step(f"loading {source.name} (version {source.version}) on {backend.name}"):
        try:
            return ServedModel(source, backend, intra_op_threads)
        except YatDeployError as exc:
            if exc.message.startswith(f"model '{source.name}'"):
                raise
            raise YatDeployError(f"model '{source.name}': {exc}") from None
        except Exception as exc:  # a corrupt or unloadable model file: ONNX's, ONNX Runtime's or TensorRT's error
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise YatDeployError(f"model '{source.name}': {source.path} does not load: "
                                 f"{type(exc).__name__}: {first}") from None


def _exit_normally(signum: int, frame) -> None:
    raise SystemExit(0)


def serve(path: str | Path, *, host: str, port: int, backend: str | None, settings, intra_op_threads: int,
          log_level: str, progress: Progress) -> None:
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            raise YatDeployError(f"serving needs {module}", "pip install 'yatdeploy[service]'")
    import uvicorn

    from yatdeploy.serving.app import create_app

    models, unavailable = load_models(path, backend, intra_op_threads, progress)
    app = create_app(models, settings, unavailable)
    # uvicorn ends a graceful shutdown by raising the signal again under the handler it found: end with
    # status 0 then, every request having been answered (also for a SIGTERM before uvicorn starts).
    signal.signal(signal.SIGTERM, _exit_normally)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    serving_log = logging.getLogger("yatdeploy.serving")
    serving_log.addHandler(handler)
    serving_log.setLevel(log_level.upper())  # debug: one JSON line per request
    # Everything loaded so far (torch, ONNX, the sessions) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise stall every request for ~0.2 s now and then.
    gc.collect()
    gc.freeze()
    progress.say(f"serving {', '.join(m.name for m in models)} on http://{host}:{port}")
    uvicorn.run(
        app, host=host, port=port, log_level=log_level,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        timeout_graceful_shutdown=30, access_log=False,
    )
