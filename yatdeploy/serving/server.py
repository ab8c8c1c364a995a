"""`yatdeploy serve`: load the models, build the app, run uvicorn."""

from __future__ import annotations

import gc
import importlib.util
import logging
from pathlib import Path

from yatdeploy import runtime
from yatdeploy.errors import YatDeployError
from yatdeploy.progress import Progress


def load_models(path: str | Path, backend_name: str | None, intra_op_threads: int, progress: Progress):
    from yatdeploy.serving.model import ServedModel
    from yatdeploy.serving.repository import discover

    models = []
    for source in discover(path):
        # --backend for every model, else the model's config.pbtxt, else the fastest that works here.
        name = backend_name or source.backend
        backend = runtime.get_backend(name) if name else runtime.default_backend()
        if source.path.suffix == ".plan" and backend.kind != "tensorrt":
            raise YatDeployError(f"model {source.name}: {source.path.name} is a TensorRT engine; it runs on the "
                                 f"tensorrt backend, not {backend.name}")
        reason = backend.availability()
        if reason:
            raise YatDeployError(f"model {source.name}: backend {backend.name} is not available: {reason}")
        with progress.step(f"loading {source.name} (version {source.version}) on {backend.name}"):
            models.append(ServedModel(source, backend, intra_op_threads))
    return models


def serve(path: str | Path, *, host: str, port: int, backend: str | None, settings, intra_op_threads: int,
          log_level: str, progress: Progress) -> None:
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            raise YatDeployError(f"serving needs {module}", "pip install 'yatdeploy[service]'")
    import uvicorn

    from yatdeploy.serving.app import create_app

    models = load_models(path, backend, intra_op_threads, progress)
    app = create_app(models, settings)
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
