"""`yatdeploy serve`: load the models, build the app, run uvicorn."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from yatdeploy import backends
from yatdeploy.errors import YatDeployError, option
from yatdeploy.progress import Progress

if TYPE_CHECKING:
    from yatdeploy.serving.model import ServedModel, UnavailableModel
    from yatdeploy.serving.repository import ModelSource


def load_models(path: str | Path, backend_name: str | None, intra_op_threads: int, progress: Progress,
                only: str | None = None, config=None) -> tuple[list[ServedModel], list[UnavailableModel]]:
    """The model versions at `path` that load (`only`: of that model alone, with `config`, a ModelConfig, instead
    of its config.pbtxt when given), and those of a repository that do not, with the reason. A single model
    file that does not load is a YatDeployError."""
    from yatdeploy.serving.model import UnavailableModel
    from yatdeploy.serving.repository import discover

    if backend_name is not None:
        backends.get(backend_name)  # an unknown --backend is the command's mistake, not a model's
    models: list[ServedModel] = []
    unavailable: list[UnavailableModel] = []
    for source in discover(path, only, config):
        try:
            models.append(_load_model(source, backend_name, intra_op_threads, progress))
        except YatDeployError as exc:
            if Path(path).is_file():
                raise
            unavailable.append(UnavailableModel(source.name, source.version, exc.text))
    if not models and only is None:
        raise YatDeployError(f"{path}: no model could be loaded: " + "; ".join(m.reason for m in unavailable))
    return models, unavailable


def repository_names(path: str | Path) -> list[str]:
    """The names of the models at `path` (a repository's model folders, or a single file's stem)."""
    from yatdeploy.serving.repository import discover

    return sorted({source.name for source in discover(path)})


def _startup_models(path: str | Path, backend_name: str | None, intra_op_threads: int, progress: Progress,
                    control_mode: str, load: list[str], known: list[str], exit_on_error: bool = False,
                    ) -> tuple[list[ServedModel], list[UnavailableModel]]:
    """What the server serves from the start: every model (control mode none), or those `load` names (explicit;
    "*" for all) among `known`, the repository's. Mode none with nothing that loads is a YatDeployError: such a
    server could never serve; so is any model that does not load with `exit_on_error` (Triton's --exit-on-error)."""
    from yatdeploy.serving.repository import skipped_folders

    for folder in skipped_folders(path):
        print(f"yatdeploy serve: skipping folder '{folder}': its name is not valid UTF-8, so it is no model (a model "
              "name is text in URLs, JSON and metrics; rename it)", file=sys.stderr, flush=True)
    if control_mode == "none":
        if load:
            raise YatDeployError(f"{option('load_model')} is for {option('model_control_mode')} explicit")
        models, unavailable = load_models(path, backend_name, intra_op_threads, progress)
    else:
        names = known if "*" in load else list(dict.fromkeys(load))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise YatDeployError(f"{option('load_model')} {unknown[0]}: no such model in {path} (models: "
                                 f"{', '.join(known)})")
        models, unavailable = [], []
        for name in names:
            loaded, failed = load_models(path, backend_name, intra_op_threads, progress, only=name)
            models += loaded
            unavailable += failed
    if exit_on_error and unavailable:
        for model in models:
            model.close()
        raise YatDeployError(f"not starting ({option('exit_on_error')} is true): a model did not load: "
                             + "; ".join(m.reason for m in unavailable))
    for model in unavailable:
        print(f"yatdeploy serve: not serving {model.reason}", file=sys.stderr, flush=True)
    return models, unavailable


def _load_model(source: ModelSource, backend_name: str | None, intra_op_threads: int,
                progress: Progress) -> ServedModel:
    """The model `source` loaded, or a YatDeployError naming the model and its file as a client may read them
    (repository paths, not the server's)."""
    try:
        return _open_model(source, backend_name, intra_op_threads, progress)
    except YatDeployError as exc:
        raise YatDeployError(source.public(exc.message), exc.hint and source.public(exc.hint)) from None


def _open_model(source: ModelSource, backend_name: str | None, intra_op_threads: int,
                progress: Progress) -> ServedModel:
    from yatdeploy.serving.model import ServedModel

    if source.error is not None:
        raise YatDeployError(source.error)
    # --backend for every model, else the model's config.pbtxt, else the fastest that works here.
    name = backend_name or source.backend
    backend = backends.get(name) if name else backends.default()
    try:
        backends.check_file(backend, source.path)
    except YatDeployError as exc:
        raise YatDeployError(f"model '{source.name}': {exc.message}") from None
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
            raise YatDeployError(f"model '{source.name}': {source.shown} does not load: "
                                 f"{type(exc).__name__}: {first}") from None


def _exit_normally(signum: int, frame) -> None:
    raise SystemExit(0)


# The request line and headers of one request; a longer head is refused with 431 and the connection closed.
MAX_REQUEST_HEAD_BYTES = 64 << 10


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of `host` at `port` (as uvicorn would bind them), for uvicorn to listen
    on; a YatDeployError when the host does not resolve or the port is taken."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise YatDeployError(f"{option('host')} {host}: not an address to listen on ({exc})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            listener = socket.socket(family, kind, proto)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            listener.bind(address)
    except OSError as exc:
        for listener in sockets:
            listener.close()
        raise YatDeployError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return sockets


def _http_protocol() -> type | str:
    """uvicorn's HTTP protocol, with the request head bounded to MAX_REQUEST_HEAD_BYTES. httptools has no such
    bound and joins a long header's pieces again on every read: one huge header stalled every client."""
    if importlib.util.find_spec("httptools") is None:
        return "h11"  # bounded by h11_max_incomplete_event_size
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHeadProtocol(HttpToolsProtocol):
        reading_head = False  # between a request's first byte and the end of its headers
        began_in_this_read = False
        head_bytes = 0  # the head's bytes read after the read that began it

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.reading_head, self.began_in_this_read, self.head_bytes = True, True, 0

        def on_headers_complete(self) -> None:
            self.reading_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            self.began_in_this_read = False
            super().data_received(data)
            if not self.reading_head or self.began_in_this_read or self.transport.is_closing():
                return
            self.head_bytes += len(data)
            if self.head_bytes > MAX_REQUEST_HEAD_BYTES:
                self.reading_head = False
                body = json.dumps({"error": f"the request's headers exceed {MAX_REQUEST_HEAD_BYTES} bytes"}).encode()
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json"
                                     b"\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                self.transport.close()

    return BoundedHeadProtocol


def serve(path: str | Path, *, host: str, port: int, grpc_port: int, backend: str | None, settings,
          http_settings, load: list[str], intra_op_threads: int, log_level: str, progress: Progress,
          exit_on_error: bool = False) -> None:
    """Serve the models at `path` over HTTP on `port` and gRPC on `grpc_port` (0: no gRPC). `settings`: the
    InferenceServer's (batching overrides, control mode, readiness), `http_settings`: the HTTP app's.
    `exit_on_error`: a model that does not load at start-up ends the command (Triton's --exit-on-error); without
    it, the server serves what loads and reports the rest."""
    for module in ("fastapi", "uvicorn", "prometheus_client", *(("grpc",) if grpc_port else ())):
        if importlib.util.find_spec(module) is None:
            raise YatDeployError(f"serving needs {module}", "pip install 'yatdeploy[service]'")
    import uvicorn

    from yatdeploy.serving.app import create_app
    from yatdeploy.serving.core import InferenceServer

    sockets = _listening_sockets(host, port)  # before loading: a taken port is said at once
    if grpc_port:
        for probe in _listening_sockets(host, grpc_port):
            probe.close()
    known = repository_names(path)
    models, unavailable = _startup_models(path, backend, intra_op_threads, progress, settings.control_mode, load,
                                          known, exit_on_error)

    def loader(name: str, config=None):
        return load_models(path, backend, intra_op_threads, progress, only=name, config=config)

    server_core = InferenceServer(models, unavailable, settings=settings, loader=loader,
                                  repository_models=known)
    companions = ()
    if grpc_port:
        from yatdeploy.serving.grpc_service import GrpcFrontEnd

        companions = (GrpcFrontEnd(server_core, host, grpc_port, http_settings.max_body_bytes,
                                   http_settings.body_budget),)
    app = create_app(server_core, http_settings, companions)
    # uvicorn ends a graceful shutdown by raising the signal again under the handler it found: end with
    # status 0 then, every request having been answered (also for a SIGTERM before uvicorn starts).
    signal.signal(signal.SIGTERM, _exit_normally)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    serving_log = logging.getLogger("yatdeploy.serving")
    serving_log.addHandler(handler)
    serving_log.setLevel(log_level.upper())  # info: one JSON access-log line per request
    # Everything loaded so far (torch, ONNX, the sessions) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise stall every request for ~0.2 s now and then.
    gc.collect()
    gc.freeze()
    names = ", ".join(m.name for m in models) or "no model yet (load them through the repository API)"
    progress.say(f"serving {names} on http://{host}:{port}" + (f" and grpc://{host}:{grpc_port}" if grpc_port else ""))
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=_http_protocol(), h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        timeout_graceful_shutdown=30, access_log=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully
        pass
    except OSError as exc:  # listen() lost a race for the port to another process since the bind above
        if server.started:
            raise
        raise YatDeployError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    if not server.started:
        raise YatDeployError(f"the server did not start (see the error above; gRPC port {grpc_port})")
