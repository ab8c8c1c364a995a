"""The inference server, whatever the transport: the models it serves, their batchers and statistics, the
repository's control (load, unload, index), and inference: one call (InferenceServer.infer) from a request in
its wire form to its answer's, with its accounting (statistics, metrics, the access log).

The HTTP app (app.py) and the gRPC service (grpc_service.py) only decode and encode their wire formats and map
the kinds of ProtocolError this object raises to their status codes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

import numpy as np
import orjson

from yatdeploy import __version__
from yatdeploy.decoding import Decoder
from yatdeploy.errors import OnnxModelError, YatDeployError
from yatdeploy.serving.batching import DynamicBatcher
from yatdeploy.serving.generation import GenerationEngine, GenerationSettings
from yatdeploy.serving.metrics import Metrics
from yatdeploy.serving.model import ServedModel, UnavailableModel
from yatdeploy.serving.protocol import (
    HTTP_STATUS,
    INLINE_BYTES,
    InferRequest,
    Internal,
    InvalidInput,
    NotFound,
    ProtocolError,
    Unavailable,
)
from yatdeploy.serving.repository import CONTROL_MODES, config_from_json
from yatdeploy.serving.response_cache import Lookup, ResponseCache, look_up
from yatdeploy.serving.shared_memory import SharedMemoryRegions
from yatdeploy.serving.text import TextCodec
from yatdeploy.serving.tracing import ServerLog, TelemetrySettings, Tracing

log = logging.getLogger("yatdeploy.serving")

SERVER_NAME = "yatdeploy"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration", "model_repository",
              "logging", "trace", "system_shared_memory"]
CLIENT_GONE = 499  # the status of an answer nobody reads any more (nginx's "client closed request")
# How long an unload waits for the requests a version still holds before it stops the version's batcher.
UNLOAD_DRAIN_S = 30.0
NAME_MAX = 255  # the longest file name (a path component) in bytes, as Linux and Triton take it

# Loads one model of the repository, with a ModelConfig to use instead of its config.pbtxt or None: the versions
# that load and those that do not, with the reason.
Loader = Callable[[str, object], tuple[list[ServedModel], list[UnavailableModel]]]
Answer = TypeVar("Answer")


@dataclass
class Deployed:
    """A version being served: the model, its batcher, and the requests it holds (queued or running)."""

    model: ServedModel
    batcher: DynamicBatcher
    generator: GenerationEngine | None = None  # a decoder export's generation (serving.generation)
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    # This loaded instance in the response cache's keys (a reloaded model never answers from its predecessor's).
    cache_owner: int = field(default_factory=itertools.count().__next__)


@dataclass
class InferResult:
    """A request answered: what to send back (output name, array, send it as binary) and how long it took."""

    model: ServedModel
    request: InferRequest
    outputs: list[tuple[str, np.ndarray, bool]]
    batch: int
    queue_s: float
    compute_s: float
    input_s: float
    cache: Lookup | None = None  # the response cache's look-up, for a model that uses the cache
    shared: dict[str, dict] = field(default_factory=dict)  # outputs written to shared memory: what the answer says

    def output_bytes(self) -> int:
        return sum(array.nbytes for _, array, _ in self.outputs)


@dataclass
class ServerSettings:
    """What the server's command line overrides in every model (None: each model's own), its control mode and
    its readiness."""

    max_batch_size: int | None = None
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    dynamic_batching: bool = True
    control_mode: str = "none"
    # Triton's --strict-readiness: ready only while every model asked for is served (True), or once started,
    # serving what could be loaded (False).
    strict_readiness: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)  # for every decoder export
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)  # logging and tracing (serving.tracing)
    response_cache_bytes: int = 0  # serve --cache-config's size; 0: no response cache, whatever models ask


class InferenceServer:
    def __init__(self, models: list[ServedModel], unavailable: list[UnavailableModel] | None = None, *,
                 settings: ServerSettings | None = None, loader: Loader | None = None,
                 repository_models: list[str] | None = None) -> None:
        """`models` are served from the start, `unavailable` ones are reported with their reason. `loader` and
        `repository_models` (every model name of the repository) make the repository controllable."""
        self.settings = settings or ServerSettings()
        if self.settings.control_mode not in CONTROL_MODES:
            raise ValueError(f"control mode {self.settings.control_mode!r}")
        self.metrics = Metrics()
        self.shared_memory = SharedMemoryRegions()  # the shared-memory extension's regions
        self.log = ServerLog(self.settings.telemetry)  # Triton's log settings
        self.tracing = Tracing(self.settings.telemetry)  # Triton's trace settings, the requests' spans
        self.cache = ResponseCache(self.settings.response_cache_bytes) if self.settings.response_cache_bytes else None
        self.metrics.response_cache = self.cache is not None
        self._initial = list(models)
        self._loader = loader
        self._known = sorted(set(repository_models or []) | {m.name for m in [*models, *(unavailable or [])]})
        self._served: dict[str, dict[str, Deployed]] = {}
        self._failed: dict[str, list[UnavailableModel]] = {}
        for model in unavailable or []:
            self._failed.setdefault(model.name, []).append(model)
        self._unloaded: set[str] = set()
        self._control = asyncio.Lock()
        self.started = False

    # -- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batchers of the models loaded so far (needs the running event loop)."""
        for model in self._initial:
            self._deploy(model)
        self._initial = []
        self.started = True

    def flush(self) -> None:
        """Let every batcher run what it holds at once (shutting down: nothing waits for a batching delay)."""
        for versions in self._served.values():
            for deployed in versions.values():
                deployed.batcher.flush()

    async def stop(self) -> None:
        """Run what every batcher holds, then stop them and close the models (as an unload does, without waiting:
        the transports have drained their requests by now)."""
        self.flush()
        async with self._control:  # no load or unload half done meanwhile
            served, self._served = self._served, {}
            for versions in served.values():
                for deployed in versions.values():
                    await self._close(deployed)
        self.tracing.close()  # the trace files written, the exporters flushed
        self.shared_memory.close()
        self.log.close()

    def _deploy(self, model: ServedModel) -> Deployed:
        s = self.settings
        model.override_batching(max_batch_size=s.max_batch_size, max_queue_delay_us=s.max_queue_delay_us,
                                max_queue_size=s.max_queue_size, dynamic_batching=s.dynamic_batching)
        batcher = DynamicBatcher(model, self.metrics, max_batch_size=model.max_batch_size,
                                 max_queue_delay_s=model.max_queue_delay_us / 1e6, policies=model.queue_policy)
        batcher.start()
        deployed = Deployed(model, batcher, self._generator(model))
        deployed.drained.set()
        self._served.setdefault(model.name, {})[model.version] = deployed
        self.metrics.deployed(model.name, model.version, batcher.waiting)
        if deployed.generator is not None:
            self.metrics.watch_generation(model.name, model.version, deployed.generator)
        return deployed

    def _generator(self, model: ServedModel) -> GenerationEngine | None:
        if model.decoder is None:
            return None
        return GenerationEngine(Decoder(model.runner, model.decoder), TextCodec.beside(model.source.path),
                                self.settings.generation, name=model.name,
                                observer=self.metrics.generation_observer(model.name, model.version))

    # -- lookup ---------------------------------------------------------------------------------------------

    def deployed(self, name: str, version: str | None = None) -> Deployed:
        """The version asked for (None: the newest served); NotFound for one never heard of, Unavailable for one
        not ready."""
        versions = self._served.get(name)
        if not versions:
            if name in self._failed:
                raise Unavailable(f"model '{name}' is not ready: {self._reasons(name)}")
            if name in self._known:
                raise Unavailable(f"model '{name}' is not loaded" + (" (unloaded)" if name in self._unloaded else ""))
            raise NotFound(unknown_model(name))
        if version is None or version == "":
            return versions[max(versions, key=int)]
        if version not in versions:
            failed = [m for m in self._failed.get(name, []) if m.version == version]
            if failed:
                raise Unavailable(f"model '{name}' version {version} is not ready: {failed[0].reason}")
            raise NotFound(f"{unknown_model(name, version)} (served: {', '.join(sorted(versions, key=int))})")
        return versions[version]

    def model(self, name: str, version: str | None = None) -> ServedModel:
        return self.deployed(name, version).model

    def generator(self, name: str, version: str | None = None) -> GenerationEngine:
        """The version's generation; InvalidInput for a model that is not a decoder export."""
        deployed = self.deployed(name, version)
        if deployed.generator is None:
            raise InvalidInput(f"model '{name}' does not generate: it is not a language model exported with its KV "
                               "cache (yatdeploy export --kv-cache)")
        return deployed.generator

    def generators(self) -> list[GenerationEngine]:
        """Every served version's generation (the newest version's first for each model)."""
        return [d.generator for versions in self._served.values()
                for _, d in sorted(versions.items(), key=lambda item: -int(item[0])) if d.generator is not None]

    def _reasons(self, name: str) -> str:
        return "; ".join(m.reason for m in self._failed.get(name, []))

    def is_ready(self) -> bool:
        """Started and, with strict readiness (Triton's default), every model asked for served; without it, once
        started, whatever could be loaded. HTTP's /v2/health/ready and gRPC's ServerReady both answer this."""
        return self.started and (not self.settings.strict_readiness or not self._failed)

    def model_ready(self, name: str, version: str | None = None) -> tuple[bool, str | None]:
        """Whether the model (version) is ready; when not, why. NotFound for a name never heard of."""
        if name not in self._known and name not in self._served:
            raise NotFound(unknown_model(name))
        try:
            self.deployed(name, version)
        except ProtocolError as exc:
            return False, exc.message
        return True, None

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def metadata(self, name: str, version: str | None = None) -> dict:
        metadata = self.model(name, version).metadata()
        if version is None:
            metadata["versions"] = sorted(self._served[name], key=int)
        return metadata

    def config(self, name: str, version: str | None = None) -> dict:
        return self.model(name, version).config()

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict]:
        """Triton's model_stats entries: every served version of every model, of one model, or one version."""
        if name is None:
            chosen = [d.model for versions in self._served.values() for d in versions.values()]
        elif version is None or version == "":
            self.deployed(name)
            chosen = [d.model for d in self._served[name].values()]
        else:
            chosen = [self.model(name, version)]
        return [self.metrics.stats_json(m.name, m.version) for m in sorted(chosen, key=lambda m: (m.name,
                                                                                                  int(m.version)))]

    # -- repository -----------------------------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict]:
        """Triton's repository index: every model of the repository, each served version READY, a failed one
        UNAVAILABLE with the reason, an unloaded one UNAVAILABLE "unloaded", one never loaded by name alone."""
        entries: list[dict] = []
        for name in self._known:
            for version in sorted(self._served.get(name, {}), key=int):
                entries.append({"name": name, "version": version, "state": "READY", "reason": ""})
            if not ready_only:
                entries += [{"name": name, "version": m.version, "state": "UNAVAILABLE", "reason": m.reason}
                            for m in self._failed.get(name, [])]
                if name not in self._served and name not in self._failed:
                    entries.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"}
                                   if name in self._unloaded else {"name": name})
        return entries

    def _controllable(self, action: str) -> None:
        if self.settings.control_mode != "explicit" or self._loader is None:
            raise InvalidInput(f"explicit model {action} is not allowed: the server runs with model control mode "
                               "'none' (start it with --model-control-mode explicit)")

    async def load(self, name: str, config_json: str | None = None, files: list[str] | None = None) -> None:
        """Load (or reload) `name` from the repository: its versions are read again and swapped in once all have
        loaded; the versions they replace finish the requests they hold. `config_json`: a ModelConfig in JSON to
        use instead of the model's config.pbtxt (Triton's load `config` parameter). InvalidInput says why not
        (Internal, as Triton's, for a sent file whose name no file system takes)."""
        self._controllable("load")
        if files:
            unwritable = [f for f in files
                          if any(len(part.encode()) > NAME_MAX for part in f.removeprefix("file:").split("/"))]
            if unwritable:  # Triton fails writing such a file into its copy of the model: INTERNAL, in its words
                raise Internal(f"failed to load '{name}': failed to poll from model repository: a file name sent "
                               f"with the request has a path component longer than {NAME_MAX} bytes "
                               f"({unwritable[0][:48]!r}...)")
            raise InvalidInput(f"failed to load '{name}': model files sent with the request ({files[0]!r}) are not "
                               "supported: put them in the repository")
        async with self._control:
            try:
                config = config_from_json(config_json) if config_json is not None else None
                models, failed = await asyncio.to_thread(self._loader, name, config)
            except YatDeployError as exc:
                raise InvalidInput(f"failed to load '{name}': {exc.text}") from None
            if failed:
                for model in models:
                    model.close()
                raise InvalidInput(f"failed to load '{name}': " + "; ".join(m.reason for m in failed))
            old = self._served.pop(name, {})
            self._failed.pop(name, None)
            self._unloaded.discard(name)
            if name not in self._known:
                self._known = sorted([*self._known, name])
            for model in models:
                self._deploy(model)
            await self._retire(old.values())
        log.info("loaded model '%s' (versions %s)", name, ", ".join(m.version for m in models))

    async def unload(self, name: str) -> None:
        """Stop serving `name`: new requests are Unavailable at once, those it holds are answered first."""
        self._controllable("unload")
        async with self._control:
            if name not in self._known:
                raise InvalidInput(f"failed to unload '{name}': no such model in the repository")
            old = self._served.pop(name, {})
            self._failed.pop(name, None)
            self._unloaded.add(name)
            await self._retire(old.values())
        log.info("unloaded model '%s'", name)

    async def _retire(self, versions) -> None:
        for deployed in versions:
            deployed.batcher.flush()
            try:
                await asyncio.wait_for(deployed.drained.wait(), UNLOAD_DRAIN_S)
            except asyncio.TimeoutError:
                log.warning("model '%s' version %s: requests still running after %.0f s; stopping it anyway",
                            deployed.model.name, deployed.model.version, UNLOAD_DRAIN_S)
            await self._close(deployed)

    async def _close(self, deployed: Deployed) -> None:
        """A version no longer served: its batcher stopped, its gauges gone, its model closed."""
        await deployed.batcher.stop()
        if deployed.generator is not None:
            await asyncio.get_running_loop().run_in_executor(None, deployed.generator.stop)
        self.metrics.forget(deployed.model.name, deployed.model.version)
        if self.cache is not None:
            self.cache.forget(deployed.cache_owner)
        deployed.model.close()

    # -- inference ------------------------------------------------------------------------------------------

    async def infer(self, name: str, version: str | None, decode: Callable[[ServedModel], Awaitable[InferRequest]],
                    encode: Callable[[InferResult], Awaitable[Answer]], *, request_id: str | None = None) -> Answer:
        """One inference request, from its transport's wire form to its answer's: the model `name` (`version`;
        None: the newest served), the request as `decode(model)` reads it, checked, queued in the model's
        batcher (its `priority` and `timeout` parameters as the model's queue policies take them), its outputs
        chosen (and classified), and `encode(result)`'s answer.

        Counted once in the statistics and metrics, and written to the access log: input time is from the call
        to the checked request, output time is encode's. A model that is not served is NotFound or Unavailable
        before anything is read (neither counted nor logged); any later failure is raised as the ProtocolError
        to answer, counted and logged (a failure of the server as Internal). `request_id`: the request's id
        before it is decoded (gRPC's message id), for the access log of a request that does not decode."""
        started = time.perf_counter()
        deployed = self.deployed(name, version)
        request: InferRequest | None = None
        try:
            request = await decode(deployed.model)
            shared = SharedMemoryRegions.shared_bytes(request)
            if shared:
                await off_loop_when(shared > INLINE_BYTES, None, self.shared_memory.read_inputs, request)
            result = await self._run(deployed, request, started)
            if shared:
                result.shared = await off_loop_when(shared > INLINE_BYTES, None, self.shared_memory.write_outputs,
                                                    request, result.outputs)
            writing = time.perf_counter()
            answer = await encode(result)
            output_s = time.perf_counter() - writing
        except asyncio.CancelledError:  # the client went away or cancelled: its request left the queue
            self._cancelled(deployed.model, request.id if request is not None else request_id, started)
            raise
        except Exception as exc:
            raise self._failure(deployed.model, request.id if request is not None else request_id, exc,
                                started) from None
        model = result.model
        self.metrics.record_request(model.name, model.version, True, time.perf_counter() - started, result.queue_s,
                                    result.compute_s, result.input_s, output_s, cache=result.cache)
        access_log(model.name, model.version, request.id, 200, started, result.batch, result.queue_s, result.compute_s)
        return answer

    async def _run(self, deployed: Deployed, request: InferRequest, started: float) -> InferResult:
        model = deployed.model
        feeds, batch = model.check(request)
        input_s = time.perf_counter() - started
        lookup = None
        if self.cache is not None and model.source.response_cache:  # a hit skips the batcher and the model
            lookup = await look_up(self.cache, deployed.cache_owner, model.name, model.version, request)
            if lookup.hit:
                return InferResult(model, request, list(lookup.outputs), batch, 0.0, 0.0, input_s, lookup)
        deployed.in_flight += 1
        deployed.drained.clear()
        try:
            result = await deployed.batcher.submit(feeds, batch, priority=request.priority,
                                                   timeout_us=request.timeout_us)
        finally:
            deployed.in_flight -= 1
            if deployed.in_flight == 0:
                deployed.drained.set()
        wanted = {o.name: o for o in request.outputs} if request.outputs is not None else None
        outputs = []
        for info, array in zip(model.outputs, result.outputs):
            if wanted is None:
                outputs.append((info.name, array, request.binary_default))
            elif info.name in wanted:
                asked = wanted[info.name]
                if asked.class_count:
                    array = classify(array, asked.class_count, has_batch=model.max_batch_size > 0, name=info.name,
                                     labels=model.labels.get(info.name, ()))
                outputs.append((info.name, array, asked.binary))
        if lookup is not None:
            lookup.store(outputs)
        return InferResult(model, request, outputs, batch, result.queue_s, result.compute_s, input_s, lookup)

    def _cancelled(self, model: ServedModel, request_id: str | None, started: float) -> None:
        """A request whose caller was cancelled (an HTTP client gone, a gRPC call cancelled or past its deadline):
        counted in the statistics' `cancel` and written to the access log as 499, nginx's "client closed"."""
        self.metrics.record_cancel(model.name, model.version, time.perf_counter() - started)
        access_log(model.name, model.version, request_id, CLIENT_GONE, started, error="the client went away")

    def _failure(self, model: ServedModel, request_id: str | None, exc: Exception, started: float) -> ProtocolError:
        """A failed inference as the error to answer, counted and logged once: a client's mistake in its
        access-log line, a server failure as an error of its own, with the traceback for a bug of ours."""
        client_error = True
        if isinstance(exc, ProtocolError):
            error = exc
        elif isinstance(exc, OnnxModelError):
            error, client_error = Internal(exc.text), False
            log.error("model %s: 500 %s", model.name, error.message)
        else:
            error = Internal(f"internal error: {type(exc).__name__}: {exc}")
            client_error = False
            log.exception("model %s: 500 %s", model.name, error.message)
        self.metrics.record_request(model.name, model.version, False, time.perf_counter() - started)
        access_log(model.name, model.version, request_id, HTTP_STATUS[type(error)], started,
                   error=error.message if client_error else None)
        return error


async def off_loop_when(large: bool, pool: ThreadPoolExecutor | None, function: Callable[..., Answer],
                        *args) -> Answer:
    """function(*args): in a worker thread of `pool` (None: the loop's default executor) when `large` (the event
    loop goes on meanwhile), else here."""
    if not large:
        return function(*args)
    return await asyncio.get_running_loop().run_in_executor(pool, function, *args)


def unknown_model(name: str, version: str | None = None) -> str:
    """Triton's words for a model or version it does not serve: its client examples look for this prefix."""
    return f"Request for unknown model: '{name}'" + (f" version {version}" if version else "") + " is not found"


def classify(array: np.ndarray, count: int, *, has_batch: bool, name: str, labels: Sequence[str]) -> np.ndarray:
    """Triton's classification extension: the `count` largest values of each batch item (of the whole tensor
    without a batch dimension) as BYTES "value:index", largest first; "value:index:label" where `labels` (the
    output's label file, serving.labels) has a non-empty label for the index, as Triton's."""
    if array.dtype.kind not in "fiu" and array.dtype.name != "bfloat16":
        raise InvalidInput(f"output '{name}': classification needs a numeric output, not {array.dtype}")
    rows = array.reshape(array.shape[0], -1) if has_batch else array.reshape(1, -1)
    count = min(count, rows.shape[1])
    values = rows.astype(np.float64)
    order = np.argsort(-values, axis=1, kind="stable")[:, :count]
    classes = np.empty(order.shape, dtype=object)
    for r, indices in enumerate(order):
        classes[r] = [f"{values[r, i]:f}:{i}" + (f":{labels[i]}" if i < len(labels) and labels[i] else "")
                      for i in indices]
    return classes if has_batch else classes.reshape(count)


def access_log(model: str, version: str, request_id: str | None, status: int, started: float, batch: int = 0,
               queue_s: float = 0.0, compute_s: float = 0.0, error: str | None = None) -> None:
    """The access log: one JSON line per inference request at info level (--log-level warning silences it)."""
    if log.isEnabledFor(logging.INFO):
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "id": request_id,
                "model": model, "version": version, "status": status,
                "latency_us": round((time.perf_counter() - started) * 1e6), "batch": batch,
                "queue_us": round(queue_s * 1e6), "compute_us": round(compute_s * 1e6)}
        if error is not None:
            line["error"] = error
        log.info(orjson.dumps(line).decode())
