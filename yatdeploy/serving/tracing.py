"""Logging and tracing, whatever the transport: Triton's logging extension (`ServerLog`: the settings of
GET/POST /v2/logging and gRPC LogSettings, honoured by the serving log), its trace extension (`Tracing`: the global
and per-model settings of /v2[/models/NAME]/trace/setting and gRPC TraceSetting, and which requests they trace),
and the OpenTelemetry spans of a traced request: one per request, a child of the client's W3C `traceparent`, with
children for its decoding, its wait in the queue, its batch's run and its answer's encoding.

The batcher's worker thread never touches OpenTelemetry: a request's spans are made on the event loop once it is
answered, with explicit start and end times from the durations InferResult carries (input_s, queue_s,
compute_s), laid end to end from the request's start. opentelemetry-sdk is imported only once a request is traced.

Files: a client may name the log file (log_file) or the trace file (trace_file) only inside the folder the
server was started with (--settings-file-dir), and only by a relative name; without it, neither changes over the
API. Triton lets any client name any path, which makes its logging and trace endpoints a way to write files
wherever the server may.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from yatdeploy.serving.protocol import InvalidInput

# An answered request's result (core.InferResult, which imports this module): outputs, batch, input_s, queue_s,
# compute_s.
InferResult = Any

log = logging.getLogger("yatdeploy.serving")

LOG_FORMATS = ("default", "ISO8601")
TRACE_LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
TRACE_MODES = ("triton", "opentelemetry")
DEFAULT_OTLP_URL = "http://localhost:4318/v1/traces"  # Triton's default collector (OTLP over HTTP)
_UINT32_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class TelemetrySettings:
    """What `yatdeploy serve` says of logging and tracing: the log level (--log-level), the folder clients may
    name files in (--settings-file-dir; None: they can't) and Triton's --trace-config entries, parsed (`parse`)."""

    log_level: str = "info"
    files: Path | None = None
    trace_mode: str = "triton"
    otlp_url: str = DEFAULT_OTLP_URL
    trace: dict[str, Any] = field(default_factory=dict)  # the global trace settings given, as Tracing's fields

    @staticmethod
    def parse(log_level: str, files: Path | None, trace_config: tuple[str, ...]) -> TelemetrySettings:
        """serve's --log-level, --settings-file-dir (resolved) and --trace-config entries as Triton spells them:
        `mode=triton|opentelemetry`, a global setting `level=`, `rate=`, `count=`, `file=`, `log-frequency=`
        (also as `triton,file=...`), and `opentelemetry,url=...`. A ValueError names the entry that is wrong."""
        mode, url, trace = "triton", DEFAULT_OTLP_URL, {}
        names = {"level": "trace_level", "rate": "trace_rate", "count": "trace_count", "file": "trace_file",
                 "log-frequency": "log_frequency"}
        for entry in trace_config:
            scope, _, setting = entry.rpartition(",")
            key, equals, value = setting.partition("=")
            if not equals or scope not in ("", "triton", "opentelemetry"):
                raise ValueError(f"{entry!r}: [MODE,]SETTING=VALUE (MODE: triton or opentelemetry)")
            if key == "mode" and not scope:
                if value not in TRACE_MODES:
                    raise ValueError(f"{entry!r}: mode is one of {', '.join(TRACE_MODES)}")
                mode = value
            elif key == "url" and scope == "opentelemetry":
                if not value.startswith(("http://", "https://")):
                    value = "http://" + value  # Triton takes host:port/path
                url = value
            elif key in names and scope != "opentelemetry":
                name = names[key]
                try:
                    trace[name] = _TRACE_CHECKS[name]([value] if name == "trace_level" else value, name)
                except InvalidInput as exc:
                    raise ValueError(f"{entry!r}: {exc.message}") from None
            else:
                raise ValueError(f"{entry!r}: unknown setting {key!r} (level, rate, count, file, "
                                 "log-frequency, mode; opentelemetry,url)")
        return TelemetrySettings(log_level, files, mode, url, trace)


def _client_file(value: object, name: str, files: Path | None, current: str) -> str:
    """A file a client names (`name`: its setting): unchanged, "" (none), or a relative name inside `files`."""
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string, not {value!r}")
    if value in ("", current):
        return value
    if files is None:
        raise InvalidInput(f"'{name}': the server does not let clients choose files (it would let any client have "
                           "it write a file of its choosing); start it with --settings-file-dir DIR to allow names "
                           "inside DIR")
    path = (files / value).resolve()
    if Path(value).is_absolute() or not path.is_relative_to(files) or path == files:
        raise InvalidInput(f"'{name}' {value!r}: a file name inside the server's settings file folder, without "
                           "'..' or an absolute path")
    return value


def _where(value: str, files: Path | None) -> Path:
    """Where a file setting writes: a client's name inside `files`, the operator's path as given."""
    return files / value if files is not None and not Path(value).is_absolute() else Path(value)


# -- logging ------------------------------------------------------------------------------------------------

class _LevelFilter(logging.Filter):
    """Drops the records of the levels switched off (log_warning, log_error) that the logger's level lets by."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        return min(record.levelno, logging.ERROR) not in self.dropped


class ServerLog:
    """The serving log ("yatdeploy.serving": the access log, one JSON line per inference at INFO, and the
    server's warnings and errors) under Triton's log settings: log_info, log_warning, log_error (each level on or
    off), log_verbose_level (above 0: DEBUG too), log_format ("default": the message alone; "ISO8601": after
    an ISO 8601 UTC time and the level's letter) and log_file ("": standard error)."""

    def __init__(self, settings: TelemetrySettings | None = None) -> None:
        settings = settings or TelemetrySettings()
        level = settings.log_level
        self.files = settings.files
        self.values: dict[str, Any] = {"log_file": "", "log_info": level in ("debug", "info"),
                                       "log_warning": level != "error", "log_error": True,
                                       "log_verbose_level": 1 if level == "debug" else 0, "log_format": "default"}
        self._filter = _LevelFilter()
        self._handler: logging.Handler | None = None

    def settings(self) -> dict[str, Any]:
        return dict(self.values)

    def update(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply `changes` (every one checked before any applies; None: unchanged); the settings after.
        InvalidInput names a setting that is unknown or has a wrong value."""
        checked = dict(self.values)
        for name, value in changes.items():
            if name not in checked:
                raise InvalidInput(f"unknown log setting '{name}' (the settings: {', '.join(self.values)})")
            if value is None:
                continue
            if name in ("log_info", "log_warning", "log_error"):
                if type(value) is not bool:
                    raise InvalidInput(f"'{name}' must be true or false, not {value!r}")
            elif name == "log_verbose_level":
                if type(value) is not int or not 0 <= value <= _UINT32_MAX:
                    raise InvalidInput(f"'{name}' must be a whole number from 0 to {_UINT32_MAX}, not {value!r}")
            elif name == "log_format":
                if value not in LOG_FORMATS:
                    raise InvalidInput(f"'{name}' must be one of {', '.join(LOG_FORMATS)}, not {value!r}")
            else:
                value = _client_file(value, name, self.files, self.values["log_file"])
            checked[name] = value
        self.values = checked
        self.apply()
        return self.settings()

    def apply(self) -> None:
        """The serving logger as the settings say, with one handler of ours however many servers the process
        starts."""
        values = self.values
        serving_log = logging.getLogger("yatdeploy.serving")
        ours = [h for h in serving_log.handlers if getattr(h, "yatdeploy_serving", False)]
        file = values["log_file"]
        wanted = str(_where(file, self.files).resolve()) if file else None
        handler = ours[0] if ours else None
        if handler is None or getattr(handler, "baseFilename", None) != wanted:
            for old in ours:
                serving_log.removeHandler(old)
                if old is self._handler and isinstance(old, logging.FileHandler):
                    old.close()
            handler = logging.FileHandler(wanted, encoding="utf-8") if wanted else logging.StreamHandler()
            handler.yatdeploy_serving = True
            serving_log.addHandler(handler)
        self._handler = handler
        handler.setFormatter(_IsoFormatter("%(asctime)s %(levelname).1s %(message)s")
                             if values["log_format"] == "ISO8601" else logging.Formatter("%(message)s"))
        if self._filter not in handler.filters:
            handler.addFilter(self._filter)
        self._filter.dropped = ({logging.WARNING} if not values["log_warning"] else set()) | \
                               ({logging.ERROR} if not values["log_error"] else set())
        levels = [(values["log_verbose_level"] > 0, logging.DEBUG), (values["log_info"], logging.INFO),
                  (values["log_warning"], logging.WARNING), (values["log_error"], logging.ERROR)]
        serving_log.setLevel(next((level for on, level in levels if on), logging.CRITICAL + 10))

    def close(self) -> None:
        if isinstance(self._handler, logging.FileHandler):
            self._handler.flush()


class _IsoFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


# -- trace settings -----------------------------------------------------------------------------------------

def _one(value: object, name: str) -> str:
    """A trace setting's one value: a string (or a list of one, as gRPC sends every value)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and type(value) is not bool:
        value = str(value)
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string (or a list of one), not {value!r}")
    return value


def _whole(value: object, name: str, least: int) -> int:
    text = _one(value, name)
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or number < least or number > _UINT32_MAX:
        raise InvalidInput(f"'{name}' must be a whole number from {least} to {_UINT32_MAX}, not {text!r}")
    return number


def _trace_level(value: object, name: str) -> tuple[str, ...]:
    levels = value if isinstance(value, list) else [value]
    if not levels or not all(isinstance(v, str) and v in TRACE_LEVELS for v in levels):
        raise InvalidInput(f"'{name}' must be a list of {', '.join(TRACE_LEVELS)}, not {value!r}")
    if "OFF" in levels and len(set(levels)) > 1:
        raise InvalidInput(f"'{name}': OFF can't go with another level ({levels})")
    return tuple(dict.fromkeys(levels))


_TRACE_CHECKS: dict[str, Callable[[object, str], Any]] = {
    "trace_level": _trace_level, "trace_rate": lambda v, n: _whole(v, n, 1),
    "trace_count": lambda v, n: -1 if _one(v, n) == "-1" else _whole(v, n, 0),
    "trace_file": _one, "log_frequency": lambda v, n: _whole(v, n, 0),
}


@dataclass
class TraceSettings:
    """One scope's trace settings (global, or a model's) and its sampling state: every `trace_rate`-th request
    of the scope is traced, the first included, while `trace_count` (-1: no limit) is left."""

    trace_level: tuple[str, ...] = ("OFF",)
    trace_rate: int = 1000  # Triton's defaults
    trace_count: int = -1
    trace_file: str = ""
    log_frequency: int = 0
    seen: int = field(default=0, compare=False)

    def as_json(self, mode: str) -> dict[str, Any]:
        """As Triton answers: strings, the level a list of them."""
        return {"trace_level": list(self.trace_level), "trace_rate": str(self.trace_rate),
                "trace_count": str(self.trace_count), "trace_file": self.trace_file,
                "log_frequency": str(self.log_frequency), "trace_mode": mode}

    def sample(self) -> bool:
        if self.trace_level == ("OFF",) or self.trace_count == 0:
            return False
        self.seen += 1
        if (self.seen - 1) % self.trace_rate:
            return False
        if self.trace_count > 0:
            self.trace_count -= 1
        return True


_SETTINGS = tuple(f.name for f in fields(TraceSettings) if f.name != "seen")


class Tracing:
    """Triton's trace settings, global and per model, which decide the requests traced (`begin`), and their
    OpenTelemetry spans: exported by OTLP over HTTP in mode opentelemetry, else written as JSON lines to the
    trace_file (one span a line; every log_frequency traces to TRACE_FILE.0, .1, ..., or to TRACE_FILE when the
    server stops with log_frequency 0)."""

    def __init__(self, settings: TelemetrySettings | None = None) -> None:
        settings = settings or TelemetrySettings()
        self.mode, self.otlp_url, self.files = settings.trace_mode, settings.otlp_url, settings.files
        self._initial = TraceSettings(**settings.trace)
        self.global_ = replace(self._initial)
        self.models: dict[str, TraceSettings] = {}
        self._provider = None
        self._extra: list = []  # exporters added by add_exporter before the provider exists
        self._sinks: dict[str, _TraceFile] = {}

    # -- settings -------------------------------------------------------------------------------------------

    def settings(self, model: str | None = None) -> dict[str, Any]:
        return self.models.get(model, self.global_).as_json(self.mode) if model else self.global_.as_json(self.mode)

    def update(self, changes: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        """Apply `changes` to the global settings or `model`'s (a model's start as a copy of the global ones;
        no changes at all for a model: it follows the global ones again); a setting given None (gRPC: no value)
        goes back to the global value (the start value, for the global settings). InvalidInput names a setting
        that is unknown or has a wrong value."""
        if model and not changes:
            self.models.pop(model, None)
            return self.settings(model)
        current = self.models.get(model, self.global_) if model else self.global_
        checked = replace(current, seen=0)
        for name, value in changes.items():
            if name == "trace_mode":
                if value is not None and _one(value, name) != self.mode:
                    raise InvalidInput(f"'trace_mode' is {self.mode}, set when the server starts (--trace-config "
                                       "mode=...)")
                continue
            if name not in _SETTINGS:
                raise InvalidInput(f"unknown trace setting '{name}' (the settings: {', '.join(_SETTINGS)})")
            if value is None:
                setattr(checked, name, getattr(self.global_ if model else self._initial, name))
            elif name == "trace_file":
                setattr(checked, name, _client_file(_one(value, name), name, self.files, current.trace_file))
            else:
                setattr(checked, name, _TRACE_CHECKS[name](value, name))
        if checked.trace_level != ("OFF",):
            self._ensure_sdk()
        if model:
            self.models[model] = checked
        else:
            self.global_ = checked
        return self.settings(model)

    # -- requests -------------------------------------------------------------------------------------------

    def begin(self, model: str, version: str | None, carrier: Callable[[], dict[str, str]],
              transport: str) -> RequestTrace | _Untraced:
        """A request to `model` starts: its trace when the settings sample it (`carrier()`: its headers or
        metadata, read only then, for its traceparent), else UNTRACED."""
        scope = self.models.get(model, self.global_)
        if not scope.sample():
            return UNTRACED
        provider = self._ensure_sdk()
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        headers = {key.lower(): value for key, value in carrier().items() if isinstance(value, str)}
        parent = TraceContextTextMapPropagator().extract(headers)
        tracer = provider.get_tracer("yatdeploy.serving")
        started_ns = time.time_ns()
        span = tracer.start_span(f"{transport} infer {model}", context=parent, kind=trace.SpanKind.SERVER,
                                 start_time=started_ns,
                                 attributes={"model_name": model, "model_version": version or "",
                                             "transport": transport})
        return RequestTrace(self, tracer, span, started_ns, time.perf_counter(), scope)

    def add_exporter(self, exporter) -> None:
        """Export every span to `exporter` too, as it ends (an OpenTelemetry SpanExporter: the tests' in-memory
        one)."""
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        self._ensure_sdk().add_span_processor(SimpleSpanProcessor(exporter))

    def _ensure_sdk(self):
        if self._provider is None:
            try:
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
            except ImportError:
                raise InvalidInput("tracing needs opentelemetry-sdk: pip install 'yatdeploy[service]'") from None
            self._provider = TracerProvider(resource=Resource.create({"service.name": "yatdeploy"}))
            if self.mode == "opentelemetry":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                from opentelemetry.sdk.trace.export import BatchSpanProcessor

                self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.otlp_url)))
        return self._provider

    def _written(self, scope: TraceSettings, spans: list) -> None:
        """A finished trace's spans into the scope's trace file (mode triton, with a file)."""
        if self.mode != "triton" or not scope.trace_file:
            return
        path = str(_where(scope.trace_file, self.files))
        sink = self._sinks.setdefault(path, _TraceFile(Path(path)))
        sink.add([span.to_json(indent=None) for span in spans], scope.log_frequency)

    def close(self) -> None:
        """The server stops: what the trace files still hold is written, the exporters flushed."""
        for sink in self._sinks.values():
            sink.close()
        self._sinks = {}
        if self._provider is not None:
            self._provider.shutdown()


class _TraceFile:
    """A trace file's spans, written every `log_frequency` traces to PATH.0, PATH.1, ... (0: at close, to PATH)."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines, self.traces, self.index, self.frequency = path, [], 0, 0, 0

    def add(self, lines: list[str], frequency: int) -> None:
        self.lines += lines
        self.traces += 1
        self.frequency = frequency
        if frequency and self.traces >= frequency:
            self._write(self.path.with_name(f"{self.path.name}.{self.index}"))
            self.index += 1

    def close(self) -> None:
        if self.lines:
            self._write(self.path if not self.frequency else self.path.with_name(f"{self.path.name}.{self.index}"))

    def _write(self, path: Path) -> None:
        try:
            path.write_text("".join(line + "\n" for line in self.lines), encoding="utf-8")
        except OSError as exc:
            log.error("trace file %s: %s", path, exc)
        self.lines, self.traces = [], 0


class _Untraced:
    """A request not traced: its encode as it is, nothing to end."""

    def encoder(self, encode: Callable[[InferResult], Awaitable[Any]]) -> Callable[[InferResult], Awaitable[Any]]:
        return encode

    def end(self, error: BaseException | None = None) -> None:
        pass


UNTRACED = _Untraced()


class RequestTrace:
    """A traced request: its span, open until `end`, and the timings its answer brings (`encoder`), made into
    child spans on the event loop when it ends."""

    def __init__(self, tracing: Tracing, tracer, span, started_ns: int, started: float,
                 scope: TraceSettings) -> None:
        self.tracing, self.tracer, self.span, self.scope = tracing, tracer, span, scope
        self.started_ns, self.started = started_ns, started
        self.result: InferResult | None = None
        self.encoding: tuple[float, float] | None = None  # perf_counter at encode's start and end

    def encoder(self, encode: Callable[[InferResult], Awaitable[Any]]) -> Callable[[InferResult], Awaitable[Any]]:
        """`encode`, noting the result it encodes and when."""

        async def traced(result: InferResult) -> Any:
            self.result = result
            begun = time.perf_counter()
            answer = await encode(result)
            self.encoding = (begun, time.perf_counter())
            return answer

        return traced

    def _ns(self, perf: float) -> int:
        return self.started_ns + round((perf - self.started) * 1e9)

    def end(self, error: BaseException | None = None) -> None:
        """The request answered (or failed with `error`): its children made, its span ended and written."""
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span, spans = self.span, []
        context = trace.set_span_in_context(span)
        result = self.result
        if result is not None:
            request = result.request
            span.set_attribute("request_id", request.id or "")
            span.set_attribute("batch_size", result.batch)
            if "TENSORS" in self.scope.trace_level:
                span.set_attribute("inputs", [f"{n}:{request.input_datatypes.get(n, '')}{list(a.shape)}"
                                              for n, a in request.inputs.items()])
                span.set_attribute("outputs", [f"{n}:{a.dtype}{list(a.shape)}" for n, a, _ in result.outputs])
            queued = self.started + result.input_s
            ran = queued + result.queue_s
            for name, start, stop in (("decode", self.started, queued), ("queue", queued, ran),
                                      ("compute", ran, ran + result.compute_s),
                                      *((("encode", *self.encoding),) if self.encoding else ())):
                child = self.tracer.start_span(name, context=context, start_time=self._ns(start))
                child.end(end_time=self._ns(stop))
                spans.append(child)
        if error is not None:
            message = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            span.set_status(Status(StatusCode.ERROR, message))
        span.end()
        self.tracing._written(self.scope, [*spans, span])
