"""The HTTP service: Open Inference Protocol routes over FastAPI, one DynamicBatcher per model."""

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
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from yatdeploy import __version__
from yatdeploy.errors import OnnxModelError
from yatdeploy.serving.batching import DynamicBatcher
from yatdeploy.serving.metrics import Metrics
from yatdeploy.serving.model import ServedModel, UnavailableModel
from yatdeploy.serving.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    encode_response,
    json_length,
    parse_request,
)

log = logging.getLogger("yatdeploy.serving")

SERVER_NAME = "yatdeploy"
# A request whose JSON is longer is parsed in a worker thread, off the event loop.
INLINE_PARSE_BYTES = 64 << 10
EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration"]


@dataclass
class Settings:
    max_body_bytes: int = 64 << 20
    # The JSON part of a request (all of a JSON-only one): parsed, it takes ~10x its size in memory.
    # The smaller of this and max_body_bytes applies.
    max_json_bytes: int = 16 << 20
    # None: each model's own (config.pbtxt or the default).
    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    dynamic_batching: bool = True
    cors_origins: tuple[str, ...] = ()  # origins browsers may call from (CORS); "*" for any; () for none


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


async def _read_body(request: Request, limit: int, what: str = "request body") -> bytes:
    """The whole body, or a 413 once it passes `limit` bytes (`what`: the limit's name in the message).

    An over-limit body of up to 4 × limit is read to its end (and dropped) before the 413 goes out, so
    that a client still sending it reads the answer instead of a broken pipe; a larger one is cut off.
    """
    declared = request.headers.get("content-length")
    declared_size = int(declared) if declared is not None and declared.isdigit() else None
    if declared_size is not None and declared_size > 4 * limit:
        raise ProtocolError(413, f"the {what} of {declared_size} bytes exceeds the limit of {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > 4 * limit:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise ProtocolError(413, f"the {what} exceeds the limit of {limit} bytes")
    return b"".join(chunks)


# Content-Encoding of requests and responses, as tritonclient's request/response_compression_algorithm send
# and ask for them ("deflate" is zlib's format, as HTTP means it; raw deflate is taken too).
ENCODINGS = ("gzip", "deflate")
COMPRESS_MIN_BYTES = 1024  # smaller responses go out as they are, whatever the client accepts


def _decompressed(body: bytes, encoding: str | None, limit: int, what: str) -> bytes:
    """`body` decoded from its Content-Encoding, at most `limit` bytes once decoded (a small compressed body can
    hold a huge one: it is never inflated past the limit)."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ENCODINGS:
        raise ProtocolError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)")
    for wbits in ((16 + zlib.MAX_WBITS,) if name == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            error = exc
            continue
        if len(data) > limit or inflater.unconsumed_tail:
            raise ProtocolError(413, f"the {what}, decompressed, exceeds the limit of {limit} bytes")
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


def _flush_on_signals(batchers: dict[str, DynamicBatcher]) -> None:
    """On SIGTERM/SIGINT, before the server's own handler starts its graceful shutdown, let every batcher run
    what it holds at once: the shutdown waits for in-flight requests, which must not wait for a batching
    delay. Chains to the handler uvicorn installed (it restores its predecessors itself on exit)."""
    if threading.current_thread() is not threading.main_thread():
        return  # signals are the main thread's; an app run elsewhere (a test client) has none to chain to
    loop = asyncio.get_running_loop()

    def flush_all() -> None:
        for batcher in batchers.values():
            batcher.flush()

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous):
            continue

        def handler(received: int, frame, previous=previous) -> None:
            loop.call_soon_threadsafe(flush_all)
            previous(received, frame)

        signal.signal(signum, handler)


def create_app(models: list[ServedModel], settings: Settings | None = None,
               unavailable: list[UnavailableModel] | None = None) -> FastAPI:
    """The service for `models`; `unavailable` ones (failed to load) are reported not ready, with the reason."""
    settings = settings or Settings()
    metrics = Metrics()
    by_name = {m.name: m for m in models}
    failed = {m.name: m for m in unavailable or []}
    batchers: dict[str, DynamicBatcher] = {}
    for model in models:
        model.override_batching(max_batch_size=settings.max_batch_size, max_queue_delay_us=settings.max_queue_delay_us,
                                max_queue_size=settings.max_queue_size, dynamic_batching=settings.dynamic_batching)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for model in models:
            batcher = DynamicBatcher(model, metrics, max_batch_size=model.max_batch_size,
                                     max_queue_delay_s=model.max_queue_delay_us / 1e6,
                                     max_queue_size=model.max_queue_size)
            batcher.start()
            batchers[model.name] = batcher
        _flush_on_signals(batchers)
        yield
        # uvicorn has drained the in-flight requests by now.
        for batcher in batchers.values():
            batcher.flush()
            await batcher.stop()

    app = FastAPI(title="yatdeploy inference service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=[HEADER_LENGTH, "Content-Encoding"])
    app.state.metrics = metrics
    app.state.batchers = batchers

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

    # Large JSON is parsed here, one request at a time: the event loop stays free, and the memory a parse
    # takes (~10x the JSON) is held for one request at most.
    parse_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="yatdeploy-parse")
    json_limit = min(settings.max_json_bytes, settings.max_body_bytes)

    async def read_request(request: Request) -> InferRequest:
        header_length = request.headers.get(HEADER_LENGTH)
        limit, what = (json_limit, "JSON request body") if header_length is None else \
            (settings.max_body_bytes, "request body")
        body = _decompressed(await _read_body(request, limit, what), request.headers.get("content-encoding"),
                             limit, what)
        if json_length(body, header_length) <= INLINE_PARSE_BYTES:
            return parse_request(body, header_length, json_limit)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(parse_pool, parse_request, body, header_length, json_limit)

    def failure(model: ServedModel, request_id: str | None, exc: Exception, started: float) -> Response:
        """The JSON error for a failed inference, counted and logged once: a client's mistake in its access-log
        line, a server failure (500) as an error of its own, with the traceback for a bug of ours."""
        client_error = True
        if isinstance(exc, ProtocolError):
            status, message = exc.status, exc.message
        elif isinstance(exc, ClientDisconnect):
            status, message = 400, "the client disconnected before the end of its request"
        elif isinstance(exc, OnnxModelError):
            status, message, client_error = 500, exc.text, False
            log.error("model %s: 500 %s", model.name, message)
        else:
            status, message, client_error = 500, f"internal error: {type(exc).__name__}: {exc}", False
            log.exception("model %s: 500 %s", model.name, message)
        metrics.record_request(model.name, model.version, False, time.perf_counter() - started)
        _log_request(model, request_id, status, started, error=message if client_error else None)
        return _error(status, message)

    def model_for(name: str, version: str | None) -> ServedModel:
        model = by_name.get(name)
        if model is None and name in failed:
            raise ProtocolError(503, f"model '{name}' is not ready: {failed[name].reason}")
        if model is None:
            raise ProtocolError(404, f"unknown model '{name}'")
        if version is not None and version != model.version:
            raise ProtocolError(404, f"model '{name}' has no version '{version}' (served: {model.version})")
        return model

    @app.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        # As Triton's strict readiness: ready when every model of the repository is.
        is_ready = len(batchers) == len(models) and not failed
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/models/stats")  # every model's statistics; before /v2/models/{name}, which would take "stats"
    async def all_model_stats() -> Response:
        return _json({"model_stats": [metrics.stats_json(m.name, m.version) for m in models]})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return _json(model_for(name, version).metadata())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        if name in failed:
            return _json({"name": name, "ready": False, "error": f"model '{name}' is not ready: "
                                                                f"{failed[name].reason}"}, 503)
        model = model_for(name, version)
        is_ready = model.name in batchers
        return _json({"name": model.name, "ready": is_ready}, 200 if is_ready else 503)

    @app.post("/v2/repository/index")
    async def repository_index() -> Response:
        """Triton's repository index: every model found, READY or UNAVAILABLE with the reason."""
        entries = [{"name": m.name, "version": m.version, "state": "READY" if m.name in batchers else "UNAVAILABLE",
                    "reason": ""} for m in models]
        entries += [{"name": m.name, "version": m.version, "state": "UNAVAILABLE", "reason": m.reason}
                    for m in failed.values()]
        return _json(sorted(entries, key=lambda e: e["name"]))

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> Response:
        return _json(model_for(name, version).config())

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str, version: str | None = None) -> Response:
        model = model_for(name, version)
        return _json({"model_stats": [metrics.stats_json(model.name, model.version)]})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        started = time.perf_counter()
        model = model_for(name, version)
        parsed: InferRequest | None = None
        try:
            parsed = await read_request(request)
            feeds, batch = model.check(parsed)
            input_s = time.perf_counter() - started
            submitted = batchers[model.name].submit(feeds, batch)
            if parsed.timeout_us:
                try:
                    result = await asyncio.wait_for(submitted, parsed.timeout_us / 1e6)
                except asyncio.TimeoutError:
                    raise ProtocolError(504, f"the request's timeout of {parsed.timeout_us} µs expired before it "
                                             "was answered") from None
            else:
                result = await submitted
            writing = time.perf_counter()
            wanted = {o.name: o.binary for o in parsed.outputs} if parsed.outputs is not None else None
            outputs = [
                (info.name, array, wanted[info.name] if wanted is not None else parsed.binary_default)
                for info, array in zip(model.outputs, result.outputs)
                if wanted is None or info.name in wanted
            ]
            content, header_length = encode_response(model.name, model.version, parsed.id, outputs)
            output_s = time.perf_counter() - writing
        except Exception as exc:  # every failure answers JSON, is counted and logged once
            return failure(model, parsed.id if parsed is not None else None, exc, started)
        total = time.perf_counter() - started
        metrics.record_request(model.name, model.version, True, total, result.queue_s, result.compute_s, input_s,
                               output_s)
        _log_request(model, parsed.id, 200, started, batch, result.queue_s, result.compute_s)
        content, encoding = _compressed(content, request.headers.get("accept-encoding", ""))
        headers = {} if encoding is None else {"Content-Encoding": encoding, "Vary": "Accept-Encoding"}
        if header_length is None:
            return Response(content, media_type="application/json", headers=headers)
        # The header length is the JSON part's length before compression, as Triton gives it.
        return Response(content, media_type="application/octet-stream",
                        headers={**headers, HEADER_LENGTH: str(header_length)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _log_request(model: ServedModel, request_id: str | None, status: int, started: float, batch: int = 0,
                 queue_s: float = 0.0, compute_s: float = 0.0, error: str | None = None) -> None:
    """The access log: one JSON line per inference request at info level (--log-level warning silences it)."""
    if log.isEnabledFor(logging.INFO):
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "id": request_id,
                "model": model.name, "version": model.version, "status": status,
                "latency_us": round((time.perf_counter() - started) * 1e6), "batch": batch,
                "queue_us": round(queue_s * 1e6), "compute_us": round(compute_s * 1e6)}
        if error is not None:
            line["error"] = error
        log.info(orjson.dumps(line).decode())
