"""The HTTP service: Open Inference Protocol routes over FastAPI, one DynamicBatcher per model.

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
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from yatdeploy import __version__
from yatdeploy.serving.core import InferenceServer
from yatdeploy.serving.model import ServedModel
from yatdeploy.serving.protocol import (
    HEADER_LENGTH,
    INLINE_BYTES,
    BodyBudget,
    BodyClaim,
    InferRequest,
    ProtocolError,
    encode_response,
    json_length,
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
    """The whole body, or a 413 once it passes `limit` bytes (`what`: the limit's name in the message).

    The body counts in `claim` from the start: its Content-Length at once (a 503 before any of it is read when
    that passes the budget), else as its chunks arrive. An over-limit body of up to 4 × limit is read to its end
    (and dropped) before the 413 goes out, so that a client still sending it reads the answer instead of a
    broken pipe; a larger one is cut off.
    """
    declared = request.headers.get("content-length")
    declared_size = int(declared) if declared is not None and declared.isdigit() else None
    if declared_size is not None and declared_size > 4 * limit:
        raise ProtocolError(413, f"the {what} of {declared_size} bytes exceeds the limit of {limit} bytes")
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
        raise ProtocolError(413, f"the {what} exceeds the limit of {limit} bytes")
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
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)")
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
                    raise ProtocolError(413, f"the {what}, decompressed, exceeds the limit of {limit} bytes")
                if not pending and (inflater.eof or not piece):
                    break
        except zlib.error as exc:
            claim.release(len(data))
            error = exc
            continue
        if not inflater.eof:
            raise ProtocolError(400, f"the {name} request body is truncated")
        return data
    raise ProtocolError(400, f"the request body is not {name} data ({error})")


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




def create_app(server: InferenceServer, settings: HttpSettings | None = None,
               companions: tuple = ()) -> FastAPI:
    """The HTTP service of `server`. `companions`: other front ends (the gRPC service) started and stopped with
    it: objects with async start() and stop(grace)."""
    settings = settings or HttpSettings()
    metrics = server.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        for companion in companions:
            await companion.start()
        _flush_on_signals(server)
        yield
        # uvicorn has drained the in-flight HTTP requests by now; the gRPC ones get the same grace.
        server.flush()
        for companion in companions:
            await companion.stop(grace=30.0)
        await server.stop()

    app = FastAPI(title="yatdeploy inference service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=[HEADER_LENGTH, "Content-Encoding"])
    app.state.server = server

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> Response:
        return _error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Outside infer (which answers its own): the JSON answer; uvicorn then logs the traceback once.
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    # Large or compressed bodies are decompressed and decoded here, one request at a time: the event loop stays
    # free, and the memory a JSON parse takes (~10x the JSON) is held for one request at most. Large answers
    # are encoded and compressed in the other.
    parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-parse")
    answer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-answer")
    json_limit = min(settings.max_json_bytes, settings.max_body_bytes)
    budget = settings.body_budget

    async def read_request(request: Request, model: ServedModel, claim: BodyClaim) -> InferRequest:
        header_length = request.headers.get(HEADER_LENGTH)
        limit, what = (json_limit, "JSON request body") if header_length is None else \
            (settings.max_body_bytes, "request body")
        body = await _read_body(request, limit, what, claim)
        encoding = request.headers.get("content-encoding")

        def decode() -> InferRequest:
            data = _decompressed(body, encoding, limit, what, claim)
            if header_length is not None and header_length.strip() == "0":  # a raw binary request: no JSON at all
                if len(model.inputs) != 1:
                    raise ProtocolError(400, f"a raw binary request (header length 0) is for models with one "
                                             f"input; model '{model.name}' has {len(model.inputs)}")
                tensor = model.inputs[0]
                parsed = parse_raw_request(data, tensor.name, tensor.datatype, tuple(tensor.shape))
            else:
                parsed = parse_request(data, header_length, json_limit)
            # A BYTES tensor holds a reference per element besides its text.
            claim.add(sum(8 * array.size for array in parsed.inputs.values() if array.dtype == object))
            return parsed

        if len(body) <= INLINE_BYTES and (encoding or "identity").strip().lower() == "identity":
            return decode()
        return await asyncio.get_running_loop().run_in_executor(parse_pool, decode)

    async def off_loop_when(large: bool, function, *args):
        """function(*args), in the answer worker thread when `large`."""
        if not large:
            return function(*args)
        return await asyncio.get_running_loop().run_in_executor(answer_pool, function, *args)

    async def optional_json(request: Request) -> dict:
        claim = budget.claim()
        try:
            body = await _read_body(request, 1 << 20, "request body", claim)
            return json_object(body) if body.strip() else {}
        finally:
            claim.release()

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        is_ready = server.is_ready()
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json(server.server_metadata())

    @app.get("/v2/models/stats")  # every model's statistics; before /v2/models/{name}, which would take "stats"
    async def all_model_stats() -> Response:
        return _json({"model_stats": server.statistics()})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _json(server.metadata(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        is_ready, why = server.model_ready(name, version)
        answer: dict = {"name": name, "ready": is_ready}
        if why is not None:
            answer["error"] = why
        return _json(answer, 200 if is_ready else 503)

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        """Triton's repository index: every model of the repository and its state."""
        ready_only = (await optional_json(request)).get("ready", False)
        if type(ready_only) is not bool:
            raise ProtocolError(400, "'ready' must be true or false")
        return _json(server.index(ready_only))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(name: str, request: Request) -> Response:
        parameters = (await optional_json(request)).get("parameters", {})
        if not isinstance(parameters, dict):
            raise ProtocolError(400, "'parameters' must be an object")
        config = parameters.get("config")
        if config is not None and not isinstance(config, str):
            raise ProtocolError(400, "the load parameter 'config' must be a string (the model config as JSON)")
        await server.load(name, config, [key for key in parameters if key.startswith("file:")])
        return _json({})

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str, request: Request) -> Response:
        await optional_json(request)  # unload_dependents: no ensembles here, nothing depends on a model
        await server.unload(name)
        return _json({})

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> Response:
        return _json(server.config(name, version))

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None) -> Response:
        return _json({"model_stats": server.statistics(name, version)})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        started = time.perf_counter()
        deployed = server.deployed(name, version)
        parsed: InferRequest | None = None
        claim = budget.claim()  # released once the answer is sent
        try:
            parsed = await read_request(request, deployed.model, claim)
            inference = await server.infer(deployed, parsed, started)
            writing = time.perf_counter()
            large = sum(array.nbytes for _, array, _ in inference.outputs) > INLINE_BYTES
            content, header_length = await off_loop_when(large, encode_response, deployed.model.name,
                                                         deployed.model.version, parsed.id, inference.outputs)
            output_s = time.perf_counter() - writing
        except Exception as exc:  # every failure answers JSON, is counted and logged once
            claim.release()
            if isinstance(exc, ClientDisconnect):
                exc = ProtocolError(400, "the client disconnected before the end of its request")
            error = server.failed(deployed.model, parsed.id if parsed is not None else None, exc, started)
            return _error(error.status, error.message)
        except BaseException:
            claim.release()
            raise
        server.succeeded(inference, started, output_s)
        try:
            content, encoding = await off_loop_when(len(content) > INLINE_BYTES, _compressed, content,
                                                    request.headers.get("accept-encoding", ""))
        except BaseException:
            claim.release()
            raise
        claim.add(len(content), refuse=False)  # computed already: counted until sent, never refused
        headers = {} if encoding is None else {"Content-Encoding": encoding, "Vary": "Accept-Encoding"}
        if header_length is None:
            return _Answer(content, claim, media_type="application/json", headers=headers)
        # The header length is the JSON part's length before compression, as Triton gives it.
        return _Answer(content, claim, media_type="application/octet-stream",
                       headers={**headers, HEADER_LENGTH: str(header_length)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
