"""`yatdeploy serve`: the settings, checked (`ServeSettings`); load the models, build the app, run uvicorn, in this
thread (`serve`: the command) or in a background one (`start`: a `ServerHandle` for Python callers)."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from yatdeploy import backends
from yatdeploy.errors import YatDeployError, option
from yatdeploy.progress import Progress
from yatdeploy.serving.generation import DEFAULT_KV_CACHE_MB, DEFAULT_MAX_RUNNING
from yatdeploy.serving.repository import CONTROL_MODES

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
    if control_mode == "none":  # ServeSettings refuses `load` in this mode
        models, unavailable = load_models(path, backend_name, intra_op_threads, progress)
    else:
        names = known if "*" in load else list(dict.fromkeys(load))
        unknown = [name for name in names if name not in known]
        if unknown:
            raise YatDeployError(f"{option('load_models')} {unknown[0]}: no such model in {path} (models: "
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
    """The model `source` loaded and warmed up (its config's model_warmup, before it can be served), or a
    YatDeployError naming the model and its file as a client may read them (repository paths, not the server's)."""
    from yatdeploy.serving.warmup import warm_up

    try:
        model = _open_model(source, backend_name, intra_op_threads, progress)
        try:
            warm_up(model, progress)
        except BaseException:
            model.close()
            raise
        return model
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

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # A body framed both by Transfer-Encoding and by Content-Length is read as the Transfer-Encoding says
            # (RFC 9112 section 6.3; Triton answers it so), not refused by llhttp: on_headers_complete then drops
            # the Content-Length and closes the connection after the answer, as the RFC asks of a server.
            self.parser.set_dangerous_leniencies(lenient_chunked_length=True)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.reading_head, self.began_in_this_read, self.head_bytes = True, True, 0

        def on_headers_complete(self) -> None:
            self.reading_head = False
            names = {name for name, _ in self.headers}
            framed_twice = b"transfer-encoding" in names and b"content-length" in names
            if framed_twice:
                self.headers[:] = [(name, value) for name, value in self.headers if name != b"content-length"]
            super().on_headers_complete()
            if framed_twice and self.cycle is not None:
                self.cycle.keep_alive = False

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


@dataclass(frozen=True)
class ServeSettings:
    """Everything `yatdeploy serve` takes besides the models' path, checked when made: the keywords of
    `yatdeploy.api.serve`, the command's flags. None: each model's own (its config.pbtxt, else the defaults)."""

    host: str = "127.0.0.1"
    port: int = 8000  # HTTP
    grpc_port: int = 8001  # Triton's; 0: no gRPC
    backend: str | None = None  # for every model; None: its config.pbtxt's, else the fastest that works
    model_control_mode: str = "none"  # none: serve every model; explicit: load_models, then load/unload on request
    load_models: tuple[str, ...] = ()  # explicit mode: the models loaded at start-up ("*": all)
    strict_readiness: bool | str = True  # Triton's: ready only while every model asked for is served
    exit_on_error: bool | str = False  # Triton's: a model that does not load at start-up ends the start
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    dynamic_batching: bool = True
    cors_origins: tuple[str, ...] = ()  # origins browsers may call from ("*": any)
    max_body_mb: float = 64.0  # the largest request body
    max_inflight_body_mb: float = 256.0  # request bodies held at once, over HTTP and gRPC
    threads: int | None = None  # ONNX Runtime intra-op threads per model; None: all cores but one
    kv_cache_mb: float = DEFAULT_KV_CACHE_MB  # each decoder's KV cache at most (serving.generation)
    max_sequences: int = DEFAULT_MAX_RUNNING  # the sequences each decoder generates at once
    log_level: str = "info"  # info: one JSON access-log line per inference request
    # Triton's --trace-config entries (serving.tracing): mode=opentelemetry, opentelemetry,url=..., level=, rate=
    trace_config: tuple[str, ...] = ()
    settings_file_dir: str | None = None  # where clients may name the log and trace files; None: nowhere
    cache_config: str | None = None  # Triton's local,size=BYTES: the response cache; None: none

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the checked values replace the given ones
        for name in ("max_batch_size", "max_queue_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise YatDeployError(f"{option(name)} {value}: must be at least 1")
        if self.max_queue_delay_us is not None and self.max_queue_delay_us < 0:
            raise YatDeployError(f"{option('max_queue_delay_us')} {self.max_queue_delay_us}: must be >= 0")
        if not 0 < self.port < 65536:
            raise YatDeployError(f"{option('port')} {self.port}: not a port number")
        if not 1 / (1 << 20) <= self.max_body_mb <= 1 << 16:  # NaN fails too
            raise YatDeployError(f"{option('max_body_mb')} {self.max_body_mb}: must be more than 0 and at most "
                                 "65536 (64 GB)")
        if not 1 / (1 << 20) <= self.max_inflight_body_mb <= 1 << 20:  # NaN fails too
            raise YatDeployError(f"{option('max_inflight_body_mb')} {self.max_inflight_body_mb}: must be more than "
                                 "0 and at most 1048576 (1 TB)")
        if not 0 <= self.grpc_port < 65536 or self.grpc_port == self.port:
            raise YatDeployError(f"{option('grpc_port')} {self.grpc_port}: not a port number other than "
                                 f"{option('port')}'s (0: no gRPC)")
        for name in ("strict_readiness", "exit_on_error"):
            set_(self, name, _boolean(name, getattr(self, name)))
        if self.model_control_mode not in CONTROL_MODES:
            raise YatDeployError(f"{option('model_control_mode')} {self.model_control_mode}: one of "
                                 f"{', '.join(CONTROL_MODES)}")
        set_(self, "load_models", _names(self.load_models))
        set_(self, "cors_origins", _names(self.cors_origins))
        if self.load_models and self.model_control_mode != "explicit":
            raise YatDeployError(f"{option('load_models')} is for {option('model_control_mode')} explicit")
        if self.log_level not in LOG_LEVELS:
            raise YatDeployError(f"{option('log_level')} {self.log_level}: one of {', '.join(LOG_LEVELS)}")
        set_(self, "trace_config", _names(self.trace_config))
        if self.settings_file_dir is not None and not Path(self.settings_file_dir).is_dir():
            raise YatDeployError(f"{option('settings_file_dir')} {self.settings_file_dir}: no such folder")
        try:
            self.telemetry()
        except ValueError as exc:
            raise YatDeployError(f"{option('trace_config')} {exc}") from None
        if not 1 <= self.kv_cache_mb <= 1 << 20:  # NaN fails too
            raise YatDeployError(f"{option('kv_cache_mb')} {self.kv_cache_mb}: must be at least 1 and at most 1048576")
        if not 1 <= self.max_sequences <= 4096:
            raise YatDeployError(f"{option('max_sequences')} {self.max_sequences}: must be from 1 to 4096")
        if self.cache_config is not None:
            from yatdeploy.serving.response_cache import parse_cache_config

            parse_cache_config(self.cache_config)
        cores = len(os.sched_getaffinity(0))
        if self.threads is not None and not 1 <= self.threads <= 4 * cores:
            raise YatDeployError(f"{option('threads')} {self.threads}: must be between 1 and {4 * cores} (4 x the "
                                 f"{cores} cores usable)")

    @property
    def intra_op_threads(self) -> int:
        return self.threads if self.threads is not None else max(1, len(os.sched_getaffinity(0)) - 1)

    def telemetry(self):
        """The logging and tracing part (serving.tracing.TelemetrySettings)."""
        from yatdeploy.serving.tracing import TelemetrySettings

        files = Path(self.settings_file_dir).resolve() if self.settings_file_dir is not None else None
        return TelemetrySettings.parse(self.log_level, files, self.trace_config)

    def server_settings(self):
        """The InferenceServer's part (serving.core.ServerSettings)."""
        from yatdeploy.serving.core import ServerSettings
        from yatdeploy.serving.generation import GenerationSettings
        from yatdeploy.serving.response_cache import parse_cache_config

        return ServerSettings(max_batch_size=self.max_batch_size, max_queue_delay_us=self.max_queue_delay_us,
                              max_queue_size=self.max_queue_size, dynamic_batching=self.dynamic_batching,
                              control_mode=self.model_control_mode, strict_readiness=self.strict_readiness,
                              response_cache_bytes=parse_cache_config(self.cache_config) if self.cache_config else 0,
                              telemetry=self.telemetry(),
                              generation=GenerationSettings(kv_cache_bytes=int(self.kv_cache_mb * 2**20),
                                                            max_running=self.max_sequences))

    def http_settings(self):
        """The HTTP app's part (serving.app.HttpSettings)."""
        from yatdeploy.serving.app import HttpSettings

        return HttpSettings(max_body_bytes=int(self.max_body_mb * (1 << 20)), cors_origins=self.cors_origins,
                            max_inflight_body_bytes=int(self.max_inflight_body_mb * (1 << 20)))


LOG_LEVELS = ("debug", "info", "warning", "error")


def _boolean(name: str, value: bool | str) -> bool:
    """A boolean setting, or its text as Triton's command line spells it: true/false, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "on", "1", "false", "off", "0"):
        raise YatDeployError(f"{option(name)} {value}: must be true or false")
    return text in ("true", "on", "1")


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


class ServerHandle:
    """A started server: `url` (http://HOST:PORT) and `grpc_url` (grpc://HOST:PORT, None without gRPC);
    `stop()` shuts it down gracefully (every request answered), as does leaving its `with` block. `serve`
    runs it in this thread until a signal stops it; `start` in a background thread of this process."""

    def __init__(self, server, sockets: list[socket.socket], settings: ServeSettings, app, core) -> None:
        self._server = server  # uvicorn.Server
        self._app = app  # the FastAPI app: its state.loop, once its lifespan started
        self._core = core  # the InferenceServer
        self._sockets = sockets
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.settings = settings
        self.url = f"http://{settings.host}:{settings.port}"
        self.grpc_url = f"grpc://{settings.host}:{settings.grpc_port}" if settings.grpc_port else None

    @property
    def running(self) -> bool:
        return self._server.started and not self._server.should_exit and (self._thread is None or
                                                                            self._thread.is_alive())

    def _run(self) -> None:
        try:
            self._server.run(sockets=self._sockets)
        except BaseException as exc:  # said by start() or stop(), in the caller's thread
            self._failure = exc

    def _not_started(self) -> YatDeployError:
        where = f"{self.url}" + (f" and gRPC port {self.settings.grpc_port}" if self.settings.grpc_port else "")
        return YatDeployError(f"the server did not start on {where} (its error is logged above)")

    def start(self) -> ServerHandle:
        self._thread = threading.Thread(target=self._run, name="yatdeploy-serve", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            time.sleep(0.01)
        if not self._server.started:  # uvicorn ends a failed start-up with SystemExit: not the caller's program
            self._thread.join()
            for sock in self._sockets:
                sock.close()
            if isinstance(self._failure, Exception) and not isinstance(self._failure, YatDeployError):
                raise self._not_started() from self._failure
            if isinstance(self._failure, YatDeployError):
                raise self._failure
            raise self._not_started()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop serving: what the batchers hold runs at once (no batching delay is waited out), every request in
        flight is answered (a grace of 30 s), then the models close. A YatDeployError if it has not stopped
        within `timeout` seconds."""
        core_loop = getattr(getattr(self._app, "state", None), "loop", None)
        if core_loop is not None and not core_loop.is_closed():
            try:
                core_loop.call_soon_threadsafe(self._core.flush)
            except RuntimeError:  # the loop closed meanwhile: nothing left to flush
                pass
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise YatDeployError(f"the server at {self.url} did not stop within {timeout:g} s")

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _prepare(path: str | Path, settings: ServeSettings, progress: Progress) -> ServerHandle:
    """The server for the models at `path`, its sockets bound and its start-up models loaded, not yet serving."""
    for module in ("fastapi", "uvicorn", "prometheus_client", *(("grpc",) if settings.grpc_port else ())):
        if importlib.util.find_spec(module) is None:
            raise YatDeployError(f"serving needs {module}", "pip install 'yatdeploy[service]'")
    import uvicorn

    from yatdeploy.serving.app import create_app
    from yatdeploy.serving.core import InferenceServer

    host, port, grpc_port = settings.host, settings.port, settings.grpc_port
    backend, threads = settings.backend, settings.intra_op_threads
    sockets = _listening_sockets(host, port)  # before loading: a taken port is said at once
    try:
        if grpc_port:
            for probe in _listening_sockets(host, grpc_port):
                probe.close()
        known = repository_names(path)
        models, unavailable = _startup_models(path, backend, threads, progress, settings.model_control_mode,
                                              list(settings.load_models), known, settings.exit_on_error)
    except BaseException:
        for listener in sockets:
            listener.close()
        raise

    def loader(name: str, config=None):
        return load_models(path, backend, threads, progress, only=name, config=config)

    server_core = InferenceServer(models, unavailable, settings=settings.server_settings(), loader=loader,
                                  repository_models=known)
    http_settings = settings.http_settings()
    companions = ()
    if grpc_port:
        from yatdeploy.serving.grpc_service import GrpcFrontEnd

        companions = (GrpcFrontEnd(server_core, host, grpc_port, http_settings.max_body_bytes,
                                   http_settings.body_budget),)
    app = create_app(server_core, http_settings, companions)
    server_core.log.apply()  # the serving log on stderr at --log-level (info: one JSON access-log line a request)
    names = ", ".join(m.name for m in models) or "no model yet (load them through the repository API)"
    progress.say(f"serving {names} on http://{host}:{port}" + (f" and grpc://{host}:{grpc_port}" if grpc_port else ""))
    config = uvicorn.Config(
        app, host=host, port=port, log_level=settings.log_level,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=_http_protocol(), h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        timeout_graceful_shutdown=30, access_log=False,
    )
    return ServerHandle(uvicorn.Server(config), sockets, settings, app, server_core)


def start(path: str | Path, settings: ServeSettings, progress: Progress) -> ServerHandle:
    """Serve the models at `path` in a background thread of this process; returns once the server answers."""
    return _prepare(path, settings, progress).start()


def serve(path: str | Path, settings: ServeSettings, progress: Progress) -> ServerHandle:
    """Serve the models at `path` over HTTP and gRPC in this thread (`yatdeploy serve`) until SIGTERM or Ctrl-C,
    which end it gracefully, every request answered. With `settings.exit_on_error`, a model that does not load at
    start-up ends the command (Triton's --exit-on-error); without it, the server serves what loads and reports the
    rest."""
    handle = _prepare(path, settings, progress)
    server = handle._server
    # uvicorn ends a graceful shutdown by raising the signal again under the handler it found: end with
    # status 0 then, every request having been answered (also for a SIGTERM before uvicorn starts).
    signal.signal(signal.SIGTERM, _exit_normally)
    # Everything loaded so far (torch, ONNX, the sessions) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise stall every request for ~0.2 s now and then.
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=handle._sockets)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down gracefully
        pass
    except OSError as exc:  # listen() lost a race for the port to another process since the bind above
        if server.started:
            raise
        raise YatDeployError(f"cannot listen on {settings.host} port {settings.port}: {exc.strerror or exc}") from None
    except SystemExit as exc:  # uvicorn ends a start-up that failed (the gRPC port taken since it was probed)
        if server.started:
            raise
        raise handle._not_started() from exc
    if not server.started:
        raise handle._not_started()
    return handle
