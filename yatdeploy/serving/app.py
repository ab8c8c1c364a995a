"""The HTTP service: the Open Inference Protocol's routes over FastAPI, on an InferenceServer (core.py).

V2Endpoints has one method per route (as KServe's V2Endpoints), ROUTES says which path each serves and
register_endpoints puts them on the app; create_app wires the app: life cycle, CORS, error answers, routes.
Every ProtocolError is answered as JSON {"error": message} with its kind's HTTP status (protocol.HTTP_STATUS).
The language models' routes (the OpenAI API, Triton's generate extension) are lm_endpoints.py's, put on the app
beside these.

The event loop only moves bytes: a body larger than INLINE_BYTES, or compressed, is decompressed and
decoded in a worker thread, and a large answer encoded and compressed in another, so health checks and small
requests keep being answered during any request. The bodies held at once are bounded (protocol.BodyBudget).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import signal
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from yatdeploy import __version__
from yatdeploy.serving.core import CLIENT_GONE, InferenceServer, InferResult, off_loop_when
from yatdeploy.serving.lm_endpoints import LmEndpoints, disconnected, register_lm_endpoints
from yatdeploy.serving.model import ServedModel
from yatdeploy.serving.protocol import (
    HEADER_LENGTH,
    HTTP_STATUS,
    INLINE_BYTES,
    BodyBudget,
    BodyClaim,
    InferRequest,
    InvalidInput,
    ProtocolError,
    ResourceExhausted,
    UnsupportedMediaType,
    encode_response,
    json_object,
    parse_raw_request,
    parse_request,
)

log = logging.getLogger("yatdeploy.serving")

# A compressed body is inflated this much at a time, each piece counted in the body budget as it comes.
INFLATE_STEP_BYTES = 1 << 20


@dataclass
class HttpSettings:
    max_body_bytes: int = 64 << 20
    # The JSON part of a request (all of a JSON-only one): parsed, it takes ~10x its size in memory.
    # The smaller of this and max_body_bytes applies.
    max_json_bytes: int = 16 << 20
    cors_origins: tuple[str, ...] = ()  # origins browsers may call from (CORS); "*" for any; () for none
    # The bytes of bodies held at once, over HTTP and gRPC (--max-inflight-body-mb); past it, 503 at once.
    max_inflight_body_bytes: int = 256 << 20
    body_budget: BodyBudget = field(init=False)  # the one budget of that limit, which gRPC shares

    def __post_init__(self) -> None:
        self.body_budget = BodyBudget(self.max_inflight_body_bytes)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


async def _read_body(request: Request, limit: int, what: str, claim: BodyClaim) -> bytearray:
    """The whole body, or ResourceExhausted (413) once it passes `limit` bytes (`what`: the limit's name in the
    message).

    The body counts in `claim` from the start: its Content-Length at once (Unavailable before any of it is read
    when that passes the budget), else as its chunks arrive. An over-limit body of up to 4 × limit is read to its
    end (and dropped) before the 413 goes out, so that a client still sending it reads the answer instead of a
    broken pipe; a larger one is cut off.
    """
    declared = request.headers.get("content-length")
    declared_size = int(declared) if declared is not None and declared.isdigit() else None
    if declared_size is not None and declared_size > 4 * limit:
        raise ResourceExhausted(f"the {what} of {declared_size} bytes exceeds the limit of {limit} bytes")
    counted = min(declared_size or 0, limit)
    claim.add(counted)
    body = bytearray()
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 4 * limit:
            break
        if size <= limit:
            if size > counted:
                claim.add(size - counted)
                counted = size
            body += chunk
    if size > limit:
        raise ResourceExhausted(f"the {what} exceeds the limit of {limit} bytes")
    claim.release(counted - size)  # a body shorter than announced
    return body


# Content-Encoding of requests and responses, as tritonclient's request/response_compression_algorithm send
# and ask for them ("deflate" is zlib's format, as HTTP means it; raw deflate is taken too).
ENCODINGS = ("gzip", "deflate")
COMPRESS_MIN_BYTES = 1024  # smaller responses go out as they are, whatever the client accepts


def _decompressed(body: bytearray, encoding: str | None, limit: int, what: str, claim: BodyClaim) -> bytearray:
    """`body` decoded from its Content-Encoding, at most `limit` bytes once decoded (a small compressed body can
    hold a huge one: it is never inflated past the limit), counted in `claim` as it inflates."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ENCODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)")
    for wbits in ((16 + zlib.MAX_WBITS,) if name == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
        inflater = zlib.decompressobj(wbits)
        data = bytearray()
        pending: bytes | bytearray = body
        try:
            while True:
                piece = inflater.decompress(pending, INFLATE_STEP_BYTES)
                pending = inflater.unconsumed_tail
                claim.add(len(piece))
                data += piece
                if len(data) > limit:
                    raise ResourceExhausted(f"the {what}, decompressed, exceeds the limit of {limit} bytes")
                if not pending and (inflater.eof or not piece):
                    break
        except zlib.error as exc:
            claim.release(len(data))
            error = exc
            continue
        if not inflater.eof:
            raise InvalidInput(f"the {name} request body is truncated")
        return data
    raise InvalidInput(f"the request body is not {name} data ({error})")


def _compressed(content: bytes, accept: str) -> tuple[bytes, str | None]:
    """The response body for a client that sent `accept` (Accept-Encoding): gzip or deflate when it asks for
    one and the body is worth compressing, else as it is."""
    asked = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if len(content) < COMPRESS_MIN_BYTES:
        return content, None
    if "gzip" in asked:
        return gzip.compress(content, compresslevel=1), "gzip"
    if "deflate" in asked:
        return zlib.compress(content, 1), "deflate"
    return content, None


class _Answer(Response):
    """A response that gives its request's claim on the body budget back once it is sent (or sending failed)."""

    def __init__(self, content: bytes, claim: BodyClaim, **options) -> None:
        super().__init__(content, **options)
        self.claim = claim

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.claim.release()


def _flush_on_signals(server: InferenceServer) -> None:
    """On SIGTERM/SIGINT, before the server's own handler starts its graceful shutdown, let every batcher run
    what it holds at once: the shutdown waits for in-flight requests, which must not wait for a batching
    delay. Chains to the handler uvicorn installed (it restores its predecessors itself on exit)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's; an app run elsewhere (a test client) has none to chain to
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(received: int, frame, previous=previous) -> None:
            loop.call_soon_threadsafe(server.flush)
            previous(received, frame)

        signal.signal(signum, handler)


class V2Endpoints:
    """The Open Inference Protocol's HTTP routes, with Triton's extensions, over an InferenceServer: one method
    per route (ROUTES says its path), answering JSON; a ProtocolError they raise is answered by create_app's
    handler."""

    def __init__(self, server: InferenceServer, settings: HttpSettings) -> None:
        self.server = server
        self.settings = settings
        self.budget = settings.body_budget
        self.json_limit = min(settings.max_json_bytes, settings.max_body_bytes)
        # Large or compressed bodies are decompressed and decoded in one worker thread, one request at a time: the
        # event loop stays free, and the memory a JSON parse takes (~10x the JSON) is held for one request at
        # most. Large answers are encoded and compressed in the other.
        self._parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-parse")
        self._answer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-answer")

    def close(self) -> None:
        """End the worker threads (once every request is answered)."""
        self._parse_pool.shutdown(wait=True)
        self._answer_pool.shutdown(wait=True)

    # -- health and metadata --------------------------------------------------------------------------------

    async def live(self) -> Response:
        return _json({"live": True})

    async def ready(self) -> Response:
        is_ready = self.server.is_ready()
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    async def server_metadata(self) -> Response:
        return _json(self.server.server_metadata())

    async def model_metadata(self, name: str, version: str | None = None) -> Response:
        return _json(self.server.metadata(name, version))

    async def model_ready(self, name: str, version: str | None = None) -> Response:
        is_ready, why = self.server.model_ready(name, version)
        answer: dict = {"name": name, "ready": is_ready}
        if why is not None:
            answer["error"] = why
        return _json(answer, 200 if is_ready else 503)

    async def model_config(self, name: str, version: str | None = None) -> Response:
        return _json(self.server.config(name, version))

    async def model_stats(self, name: str, version: str | None = None) -> Response:
        return _json({"model_stats": self.server.statistics(name, version)})

    async def all_model_stats(self) -> Response:
        return _json({"model_stats": self.server.statistics()})

    async def metrics(self) -> Response:
        return Response(self.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    # -- logging and trace settings (Triton's extensions; serving.tracing) ----------------------------------

    async def log_settings(self) -> Response:
        return _json(self.server.log.settings())

    async def update_log_settings(self, request: Request) -> Response:
        return _json(self.server.log.update(await self._optional_json(request)))

    async def trace_settings(self, name: str | None = None) -> Response:
        if name is not None:
            self.server.model_ready(name)  # NotFound for a model never heard of
        return _json(self.server.tracing.settings(name))

    async def update_trace_settings(self, request: Request, name: str | None = None) -> Response:
        if name is not None:
            self.server.model_ready(name)
        return _json(self.server.tracing.update(await self._optional_json(request), name))

    # -- shared memory (Triton's extension; serving.shared_memory) ------------------------------------------

    async def shm_status(self, region: str | None = None) -> Response:
        return _json(self.server.shared_memory.status(region))

    async def shm_register(self, region: str, request: Request) -> Response:
        body = await self._optional_json(request)
        unknown = sorted(set(body) - {"key", "offset", "byte_size"})
        if unknown or "key" not in body or "byte_size" not in body:
            raise InvalidInput("a shared memory register request has 'key', 'byte_size' and optionally 'offset'"
                               + (f", not '{unknown[0][:100]}'" if unknown else ""))
        self.server.shared_memory.register(region, body["key"], body.get("offset", 0), body["byte_size"])
        return _json({})

    async def shm_unregister(self, request: Request, region: str | None = None) -> Response:
        await self._optional_json(request)
        self.server.shared_memory.unregister(region)
        return _json({})

    async def cuda_shm_status(self, region: str | None = None) -> Response:
        return _json(self.server.shared_memory.cuda_status(region))

    async def cuda_shm_register(self, region: str, request: Request) -> Response:
        await self._optional_json(request)
        self.server.shared_memory.cuda_register(region)

    async def cuda_shm_unregister(self, request: Request, region: str | None = None) -> Response:
        await self._optional_json(request)  # no CUDA region is ever registered: nothing to do, as Triton
        return _json({})

    # -- repository -----------------------------------------------------------------------------------------

    async def repository_index(self, request: Request) -> Response:
        """Triton's repository index: every model of the repository and its state."""
        ready_only = (await self._optional_json(request)).get("ready", False)
        if type(ready_only) is not bool:
            raise InvalidInput("'ready' must be true or false")
        return _json(self.server.index(ready_only))

    async def repository_load(self, name: str, request: Request) -> Response:
        parameters = (await self._optional_json(request)).get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be an object")
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise InvalidInput("the load parameter 'config' must be a string (the model config as JSON)")
        await self.server.load(name, config, [key for key in parameters if key.startswith("file:")])
        return _json({})

    async def repository_unload(self, name: str, request: Request) -> Response:
        await self._optional_json(request)  # unload_dependents: no ensembles here, nothing depends on a model
        await self.server.unload(name)
        return _json({})

    async def json_body(self, request: Request) -> dict:
        """A JSON object body of at most the JSON limit, counted in the body budget while it is read and parsed
        (the language-model routes' bodies)."""
        claim = self.budget.claim()
        try:
            return json_object(await _read_body(request, self.json_limit, "JSON request body", claim))
        except ClientDisconnect:
            raise InvalidInput("the client disconnected before the end of its request") from None
        finally:
            claim.release()

    async def _optional_json(self, request: Request) -> dict:
        claim = self.budget.claim()
        try:
            body = await _read_body(request, 1 << 20, "request body", claim)
            return json_object(body) if body.strip() else {}
        finally:
            claim.release()

    # -- inference ------------------------------------------------------------------------------------------

    async def infer(self, request: Request, name: str, version: str | None = None) -> Response:
        claim = self.budget.claim()  # released once the answer is sent
        trace = self.server.tracing.begin(name, version, lambda: dict(request.headers), "http")
        watch = _ClientWatch(request)
        try:
            try:
                content, header_length = await self.server.infer(name, version,
                                                                 partial(self._decode, request, claim, watch),
                                                                 trace.encoder(self._encode))
            finally:
                watch.stop()
            content, encoding = await off_loop_when(len(content) > INLINE_BYTES, self._answer_pool, _compressed,
                                                    content, request.headers.get("accept-encoding", ""))
        except BaseException as exc:
            claim.release()
            trace.end(exc)
            if watch.gone and isinstance(exc, asyncio.CancelledError):  # counted by the server; nobody to answer
                asyncio.current_task().uncancel()
                return Response(status_code=CLIENT_GONE)
            raise
        trace.end()
        claim.add(len(content), refuse=False)  # computed already: counted until sent, never refused
        headers = {} if encoding is None else {"Content-Encoding": encoding, "Vary": "Accept-Encoding"}
        if header_length is None:
            return _Answer(content, claim, media_type="application/json", headers=headers)
        # The header length is the JSON part's length before compression, as Triton gives it.
        return _Answer(content, claim, media_type="application/octet-stream",
                       headers={**headers, HEADER_LENGTH: str(header_length)})

    async def _decode(self, request: Request, claim: BodyClaim, watch: _ClientWatch, model: ServedModel,
                      ) -> InferRequest:
        """The request's body for `model`: JSON with binary tensors after it, or a raw binary request (header
        length 0); counted in `claim` as it is read, decompressed and decoded. Once it is read, `watch` watches
        the client."""
        header_length = request.headers.get(HEADER_LENGTH)
        limit, what = (self.json_limit, "JSON request body") if header_length is None else \
            (self.settings.max_body_bytes, "request body")
        try:
            body = await _read_body(request, limit, what, claim)
        except ClientDisconnect:
            raise InvalidInput("the client disconnected before the end of its request") from None
        watch.start()
        encoding = request.headers.get("content-encoding")

        def decode() -> InferRequest:
            data = _decompressed(body, encoding, limit, what, claim)
            if header_length is not None and header_length.strip() == "0":  # a raw binary request: no JSON at all
                if len(model.inputs) != 1:
                    raise InvalidInput(f"a raw binary request (header length 0) is for models with one input; model "
                                       f"'{model.name}' has {len(model.inputs)}")
                tensor = model.inputs[0]
                parsed = parse_raw_request(data, tensor.name, tensor.datatype, tuple(tensor.shape),
                                           batched=model.max_batch_size > 0)
            else:
                parsed = parse_request(data, header_length, self.json_limit)
            claim.add(parsed.reference_bytes())
            return parsed

        inline = len(body) <= INLINE_BYTES and (encoding or "identity").strip().lower() == "identity"
        return await off_loop_when(not inline, self._parse_pool, decode)

    async def _encode(self, result: InferResult) -> tuple[bytes, int | None]:
        model = result.model
        return await off_loop_when(result.output_bytes() > INLINE_BYTES, self._answer_pool, encode_response,
                                   model.name, model.version, result.request.id, result.outputs, result.shared)


WATCH_AFTER_S = 0.005  # when _ClientWatch starts watching a request's client, after its body is read


class _ClientWatch:
    """Cancels the task answering an inference request when its client disconnects (watched once the body is read:
    the next ASGI message is then the disconnect), so that a request still queued leaves its queue unrun.

    The watching task starts WATCH_AFTER_S after the body is read, not at once: most requests are answered sooner,
    and the event loop pays ~14 µs for a task (its start, its await on the connection, its cancellation) against
    ~4.5 µs for a timer cancelled unfired (asyncio, measured on the 2-core CPU machine, 2026-12-08). A client gone
    earlier is seen as soon as the watch starts (the disconnect waits in the connection's receive)."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Future | None = None
        self.gone = False  # whether the client disconnected (and the task was cancelled)

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._watch)

    def _watch(self) -> None:
        self._timer = None
        self._watcher = asyncio.ensure_future(disconnected(self._request))
        self._watcher.add_done_callback(self._cancel)

    def _cancel(self, watcher: asyncio.Future) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            self.gone = True
            self._task.cancel()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.remove_done_callback(self._cancel)
            self._watcher.cancel()


# Every route: (method, path, V2Endpoints' method), in the order they are matched: the request path first.
ROUTES = [
    ("POST", "/v2/models/{name}/infer", "infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "infer"),
    ("GET", "/v2/health/live", "live"),
    ("GET", "/v2/health/ready", "ready"),
    ("GET", "/v2", "server_metadata"),
    ("GET", "/v2/", "server_metadata"),  # as Triton answers it
    ("GET", "/v2/models/stats", "all_model_stats"),  # before /v2/models/{name}, which would take "stats"
    ("GET", "/v2/models/{name}", "model_metadata"),
    ("GET", "/v2/models/{name}/versions/{version}", "model_metadata"),
    ("GET", "/v2/models/{name}/ready", "model_ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "model_ready"),
    ("POST", "/v2/repository/index", "repository_index"),
    ("POST", "/v2/repository/models/{name}/load", "repository_load"),
    ("POST", "/v2/repository/models/{name}/unload", "repository_unload"),
    ("GET", "/v2/models/{name}/config", "model_config"),
    ("GET", "/v2/models/{name}/versions/{version}/config", "model_config"),
    ("GET", "/v2/models/{name}/stats", "model_stats"),
    ("GET", "/v2/models/{name}/versions/{version}/stats", "model_stats"),
    ("GET", "/metrics", "metrics"),
    ("GET", "/v2/systemsharedmemory/status", "shm_status"),
    ("GET", "/v2/systemsharedmemory/region/{region}/status", "shm_status"),
    ("POST", "/v2/systemsharedmemory/region/{region}/register", "shm_register"),
    ("POST", "/v2/systemsharedmemory/unregister", "shm_unregister"),
    ("POST", "/v2/systemsharedmemory/region/{region}/unregister", "shm_unregister"),
    ("GET", "/v2/cudasharedmemory/status", "cuda_shm_status"),
    ("GET", "/v2/cudasharedmemory/region/{region}/status", "cuda_shm_status"),
    ("POST", "/v2/cudasharedmemory/region/{region}/register", "cuda_shm_register"),
    ("POST", "/v2/cudasharedmemory/unregister", "cuda_shm_unregister"),
    ("POST", "/v2/cudasharedmemory/region/{region}/unregister", "cuda_shm_unregister"),
    ("GET", "/v2/logging", "log_settings"),
    ("POST", "/v2/logging", "update_log_settings"),
    ("GET", "/v2/trace/setting", "trace_settings"),
    ("POST", "/v2/trace/setting", "update_trace_settings"),
    ("GET", "/v2/models/{name}/trace/setting", "trace_settings"),
    ("POST", "/v2/models/{name}/trace/setting", "update_trace_settings"),
]


# The request path's routes are plain Starlette routes that hand the endpoint the request and its path
# parameters: FastAPI's own routes solve and validate each endpoint's parameters on every call (~0.2 ms per request
# here, measured with cProfile at 16 clients). They are also matched first (ROUTES' order).
_HOT = {"infer"}


def register_endpoints(app: FastAPI, endpoints: V2Endpoints) -> None:
    for method, path, name in ROUTES:
        if name in _HOT:
            app.router.routes.append(Route(path, _plain(getattr(endpoints, name)), methods=[method], name=name))
        else:
            app.add_api_route(path, getattr(endpoints, name), methods=[method])


def _plain(endpoint):
    """A Starlette endpoint calling `endpoint(request, **path parameters)`."""

    async def call(request: Request) -> Response:
        return await endpoint(request, **request.path_params)

    return call


def _answer_errors(app: FastAPI) -> None:
    """Every failure answered as JSON {"error": message}: a ProtocolError with its kind's status."""

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> Response:
        return _error(HTTP_STATUS[type(exc)], exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # A bug outside inference (whose failures the core raises as Internal): the JSON answer; uvicorn then logs
        # the traceback once.
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")


def _lifespan(server: InferenceServer, companions: tuple, endpoints: V2Endpoints):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()  # for a ServerHandle in another thread to flush the batchers
        started = []
        try:
            await server.start()
            for companion in companions:
                await companion.start()
                started.append(companion)
        except BaseException:  # a companion that can't start (gRPC's port taken): what started is stopped
            for companion in started:
                await companion.stop(grace=0.0)
            await server.stop()
            endpoints.close()
            raise
        _flush_on_signals(server)
        yield
        # uvicorn has drained the in-flight HTTP requests by now; the gRPC ones get the same grace.
        server.flush()
        for companion in companions:
            await companion.stop(grace=30.0)
        await server.stop()
        endpoints.close()

    return lifespan


def create_app(server: InferenceServer, settings: HttpSettings | None = None,
               companions: tuple = ()) -> FastAPI:
    """The HTTP service of `server`. `companions`: other front ends (the gRPC service) started and stopped with
    it: objects with async start() and stop(grace)."""
    settings = settings or HttpSettings()
    endpoints = V2Endpoints(server, settings)
    app = FastAPI(title="yatdeploy inference service", version=__version__,
                  lifespan=_lifespan(server, companions, endpoints), docs_url=None, redoc_url=None)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=[HEADER_LENGTH, "Content-Encoding"])
    app.state.server = server
    _answer_errors(app)
    register_endpoints(app, endpoints)
    register_lm_endpoints(app, LmEndpoints(server, endpoints.json_body))
    return app
