"""Measuring a served model: the load generator of `yatdeploy bench` and benchmarks/bench_serving.py, a client
of any Open Inference Protocol endpoint (ours or Triton's), over HTTP or gRPC.

Closed loop: N clients, each sending its next request when the last one answers, for each N in a
list of concurrencies. Open loop: requests sent at a fixed rate whatever the answers, latency counted
from each request's scheduled time so that queueing is not hidden. Payloads are binary tensors by
default. Warm-up requests are excluded. The report has throughput, p50/p90/p95/p99 latency and errors
per step, the server's queue and compute time from its statistics endpoint when it has one, and, given
the ONNX file, the in-process ONNX Runtime time of the same batch, so the server's overhead is a figure
of its own.
"""

from __future__ import annotations

import asyncio
import csv
import json
import statistics
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from yatdeploy.errors import YatDeployError
from yatdeploy.serving.datatypes import DATATYPES
from yatdeploy.serving.protocol import BYTES, HEADER_LENGTH, tensor_bytes

# perf_analyzer's CSV columns (latencies in µs), then ours.
CSV_COLUMNS = [
    "Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue",
    "Server Compute Input", "Server Compute Infer", "Server Compute Output", "Client Recv",
    "p50 latency", "p90 latency", "p95 latency", "p99 latency", "Requests", "Errors", "Request Rate",
]


@dataclass
class Step:
    concurrency: int | None  # closed loop
    rate: float | None  # open loop, requests/s
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    batch: int = 1
    latencies_us: list[float] = field(default_factory=list, repr=False)
    server_queue_us: float | None = None
    server_compute_us: float | None = None
    first_error: str | None = None

    @property
    def inferences_per_second(self) -> float:
        return (self.requests - self.errors) * self.batch / self.seconds if self.seconds else 0.0

    def record(self, ok: bool, since: float) -> None:
        """One measured request, its latency counted from `since` (a perf_counter reading)."""
        self.requests += 1
        if ok:
            self.latencies_us.append((time.perf_counter() - since) * 1e6)
        else:
            self.errors += 1

    def percentile(self, q: float) -> float | None:
        return percentile(self.latencies_us, q)

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "latencies_us"}
        data.update({"inferences_per_second": self.inferences_per_second,
                     **{f"p{q}_us": self.percentile(q) for q in (50, 90, 95, 99)}})
        return data


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile of `values` (numpy's linear interpolation), None when there are none."""
    return float(np.percentile(values, q)) if values else None


# Request data the load generator sends: integers from 0 (an embedding's ids, an index) up to this, exclusive.
SAMPLE_INT_HIGH = 10


def sample(shape: list[int], datatype: str, rng: np.random.Generator, name: str) -> np.ndarray:
    """Random request data of `datatype`: standard normals for floating point, integers in [0, SAMPLE_INT_HIGH)
    (valid token ids and indices, never negative), random booleans, short strings of digits for BYTES."""
    if datatype == BYTES:
        array = np.empty(shape, dtype=object)
        array.ravel()[:] = [str(v) for v in rng.integers(0, SAMPLE_INT_HIGH, size=int(np.prod(shape)))]
        return array
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise YatDeployError(f"input '{name}': unsupported datatype {datatype}")
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, SAMPLE_INT_HIGH, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _request_shape(tensor: dict, batch: int) -> list[int]:
    shape = [int(d) for d in tensor["shape"]]
    if shape and shape[0] == -1:
        shape[0] = batch
    if any(d < 0 for d in shape):
        raise YatDeployError(f"input '{tensor['name']}' has dynamic dimensions {tensor['shape']} beyond the "
                             "batch; the load generator can't pick them")
    return shape


def endpoint(url: str, model: str, batch: int, binary: bool, seed: int = 0) -> Endpoint | GrpcEndpoint:
    """The endpoint at `url`: http://HOST:PORT (HTTP/REST) or grpc://HOST:PORT (gRPC)."""
    if url.startswith("grpc://"):
        return GrpcEndpoint(url, model, batch, seed)
    return Endpoint(url, model, batch, binary, seed)


def http_address(url: str, expected: str) -> tuple[str, int]:
    """(host, port) of an http:// URL (or a bare HOST:PORT); a YatDeployError saying `expected` otherwise."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise YatDeployError(f"{url}: expected {expected}")
    return parts.hostname, parts.port or 80


def get_json(base: str, path: str) -> dict:
    """GET `base` + `path`, its JSON; a YatDeployError naming the address when it can't be had."""
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return json.loads(response.read())
    except OSError as exc:
        raise YatDeployError(f"{base}{path}: {exc}") from None


class Endpoint:
    """A v2 endpoint: its model's signature, a prepared request, raw HTTP/1.1 keep-alive connections."""

    def __init__(self, url: str, model: str, batch: int, binary: bool, seed: int = 0) -> None:
        self.host, self.port = http_address(url, "http://HOST:PORT or grpc://HOST:PORT")
        self.base = f"http://{self.host}:{self.port}"
        self.model = model
        self.batch = batch
        metadata = self.get_json(f"/v2/models/{model}")
        body, header_length = self._payload(metadata, batch, binary, seed)
        head = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n")
        if header_length is not None:
            head += f"{HEADER_LENGTH}: {header_length}\r\nContent-Type: application/octet-stream\r\n"
        else:
            head += "Content-Type: application/json\r\n"
        self.request = head.encode() + b"\r\n" + body

    def get_json(self, path: str) -> dict:
        return get_json(self.base, path)

    @staticmethod
    def _payload(metadata: dict, batch: int, binary: bool, seed: int) -> tuple[bytes, int | None]:
        rng = np.random.default_rng(seed)
        inputs, blobs = [], []
        for tensor in metadata.get("inputs", []):
            shape = _request_shape(tensor, batch)
            array = sample(shape, tensor["datatype"], rng, tensor["name"])
            entry = {"name": tensor["name"], "shape": shape, "datatype": tensor["datatype"]}
            if binary:
                blob = tensor_bytes(array)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = array.ravel().tolist() if array.dtype.kind in "biuO" else \
                    array.astype(np.float64).ravel().tolist()
            inputs.append(entry)
        header = {"inputs": inputs}
        if binary:
            header["parameters"] = {"binary_data_output": True}
        text = json.dumps(header).encode()
        return (text + b"".join(blobs), len(text)) if binary else (text, None)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        """One request on the connection and its whole answer read: the status. A ValueError when the answer is
        not HTTP/1.1."""
        writer.write(self.request)
        await writer.drain()
        status, length, chunked = await read_head(reader)
        async for _ in body_pieces(reader, length, chunked):
            pass
        return status

    def server_stats(self) -> tuple[int, int, int] | None:
        """(successful requests, queue ns, compute ns) from the statistics extension, if served."""
        try:
            stats = self.get_json(f"/v2/models/{self.model}/stats")["model_stats"][0]["inference_stats"]
            return int(stats["success"]["count"]), int(stats["queue"]["ns"]), int(stats["compute_infer"]["ns"])
        except (YatDeployError, KeyError, IndexError, TypeError, ValueError):
            return None

    async def exchange(self, connection: Connection, step: Step) -> tuple[bool, Connection]:
        """One request: whether it succeeded, and a connection fit for the next one."""
        reader, writer = connection
        try:
            status = await self.send(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            step.first_error = step.first_error or f"{type(exc).__name__}: {exc}"
            writer.close()
            return False, await self.connect()
        if status != 200 and step.first_error is None:
            step.first_error = f"HTTP {status}"
        return status == 200, connection

    async def close(self, connection: Connection) -> None:
        connection[1].close()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """An HTTP/1.1 answer's status line and headers: (status, Content-Length, whether the body is chunked). A
    ValueError when it is not HTTP/1.1, a ConnectionError when the server closed the connection."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {status_line[:80]!r}")
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value.lower()
    return int(parts[1]), length, chunked


async def body_pieces(reader: asyncio.StreamReader, length: int, chunked: bool) -> AsyncIterator[bytes]:
    """The body after `read_head`, as it arrives: a Content-Length body whole, a chunked one (as KServe's server
    sends binary answers, and every streamed answer) chunk by chunk, its trailers read."""
    if not chunked:
        yield await reader.readexactly(length)
        return
    while True:  # chunks: a hex size line, that many bytes and CRLF; a size of 0 ends them (then trailers)
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            return
        yield (await reader.readexactly(size + 2))[:-2]


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class GrpcEndpoint:
    """A v2 endpoint over gRPC (Triton's GRPCInferenceService): a prepared ModelInferRequest with raw tensors,
    as tritonclient sends it; a channel (an HTTP/2 connection) per client."""

    def __init__(self, url: str, model: str, batch: int, seed: int = 0) -> None:
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        parts = urlsplit(url)
        if not parts.hostname or parts.port is None:
            raise YatDeployError(f"{url}: expected grpc://HOST:PORT")
        self.target = f"{parts.hostname}:{parts.port}"
        self.model, self.batch = model, batch
        self._grpc, self._pb2, self._stubs = grpc, service_pb2, service_pb2_grpc
        with grpc.insecure_channel(self.target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            try:
                metadata = stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=10)
            except grpc.RpcError as exc:
                raise YatDeployError(f"{url}: model '{model}': {exc.code().name} {exc.details()}") from None
        rng = np.random.default_rng(seed)
        self.request = service_pb2.ModelInferRequest(model_name=model)
        for tensor in metadata.inputs:
            shape = _request_shape({"name": tensor.name, "shape": list(tensor.shape)}, batch)
            self.request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
            self.request.raw_input_contents.append(tensor_bytes(sample(shape, tensor.datatype, rng, tensor.name)))

    async def connect(self):
        channel = self._grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        return channel, self._stubs.GRPCInferenceServiceStub(channel)

    async def exchange(self, connection, step: Step) -> tuple[bool, object]:
        try:
            await connection[1].ModelInfer(self.request)
        except self._grpc.aio.AioRpcError as exc:
            step.first_error = step.first_error or f"{exc.code().name}: {exc.details()}"
            return False, connection
        return True, connection

    async def close(self, connection) -> None:
        await connection[0].close()

    def server_stats(self) -> tuple[int, int, int] | None:
        try:
            with self._grpc.insecure_channel(self.target) as channel:
                response = self._stubs.GRPCInferenceServiceStub(channel).ModelStatistics(
                    self._pb2.ModelStatisticsRequest(name=self.model), timeout=10)
            stats = response.model_stats[0].inference_stats
            return stats.success.count, stats.queue.ns, stats.compute_infer.ns
        except (self._grpc.RpcError, IndexError):
            return None


def _with_server_stats(endpoint: Endpoint | GrpcEndpoint, step: Step, before, after) -> None:
    if before is None or after is None or after[0] <= before[0]:
        return
    count = after[0] - before[0]
    step.server_queue_us = (after[1] - before[1]) / count / 1e3
    step.server_compute_us = (after[2] - before[2]) / count / 1e3


async def closed_loop(endpoint: Endpoint | GrpcEndpoint, concurrency: int, seconds: float, warmup: float) -> Step:
    step = Step(concurrency=concurrency, rate=None, batch=endpoint.batch)
    connections = [await endpoint.connect() for _ in range(concurrency)]
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds

    async def client(connection: Connection) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                await endpoint.close(connection)
                return
            ok, connection = await endpoint.exchange(connection, step)
            if t0 >= measure_from:
                step.record(ok, t0)

    before = None

    async def snapshot() -> None:
        nonlocal before
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        before = await asyncio.to_thread(endpoint.server_stats)

    await asyncio.gather(snapshot(), *(client(c) for c in connections))
    step.seconds = time.perf_counter() - measure_from
    _with_server_stats(endpoint, step, before, await asyncio.to_thread(endpoint.server_stats))
    return step


async def open_loop(endpoint: Endpoint | GrpcEndpoint, rate: float, seconds: float, warmup: float, max_inflight: int) -> Step:
    step = Step(concurrency=None, rate=rate, batch=endpoint.batch)
    idle: asyncio.Queue = asyncio.Queue()
    opened = 0
    start = time.perf_counter()
    measure_from = start + warmup
    total = int((warmup + seconds) * rate)
    tasks = []

    async def one(scheduled: float) -> None:
        nonlocal opened
        if idle.empty() and opened < max_inflight:
            opened += 1
            idle.put_nowait(await endpoint.connect())
        ok, connection = await endpoint.exchange(await idle.get(), step)
        idle.put_nowait(connection)
        if scheduled >= measure_from:
            step.record(ok, scheduled)  # from the scheduled time: a late send is the server's delay too

    before = None
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if before is None and scheduled >= measure_from:
            before = await asyncio.to_thread(endpoint.server_stats)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    step.seconds = seconds
    _with_server_stats(endpoint, step, before, await asyncio.to_thread(endpoint.server_stats))
    while not idle.empty():
        await endpoint.close(idle.get_nowait())
    return step


def in_process_p50_us(onnx_path: Path, batch: int, repeat: int = 200) -> float:
    """The same model and batch in ONNX Runtime in this process: the floor the server adds to."""
    from yatdeploy import backends
    from yatdeploy.serving.model import ServedModel
    from yatdeploy.serving.repository import discover

    model = ServedModel(discover(onnx_path)[0], backends.default())
    rng = np.random.default_rng(0)
    feeds = {}
    for t in model.inputs:
        shape = [batch if (i == 0 and d == -1) else d for i, d in enumerate(t.shape)]
        feeds[t.name] = sample(shape, t.datatype, rng, t.name)
    for _ in range(20):
        model.run(feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model.run(feeds)
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def write_csv(steps: list[Step], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for s in steps:
            p = [s.percentile(q) for q in (50, 90, 95, 99)]
            network = None
            if p[0] is not None and s.server_queue_us is not None and s.server_compute_us is not None:
                network = max(0.0, statistics.fmean(s.latencies_us) - s.server_queue_us - s.server_compute_us)

            def cell(value):
                return "" if value is None else str(int(round(value)))

            writer.writerow([
                s.concurrency if s.concurrency is not None else "", f"{s.inferences_per_second:.2f}", "",
                cell(network), cell(s.server_queue_us), "", cell(s.server_compute_us), "", "",
                *[cell(v) for v in p], s.requests, s.errors, "" if s.rate is None else f"{s.rate:g}",
            ])


def _polyline(points: list[tuple[float, float]], x_max: float, y_max: float, width: int, height: int) -> str:
    return " ".join(f"{40 + x / x_max * (width - 60):.1f},{height - 30 - y / y_max * (height - 50):.1f}"
                    for x, y in points)


def chart(title: str, x_label: str, series: dict[str, list[tuple[float, float]]], unit: str) -> str:
    """An SVG line chart of `series` (name: (x, y) points, each a line and its legend), the x values marked on
    the axis and the largest y in `unit`."""
    width, height = 560, 320
    xs = [x for pts in series.values() for x, _ in pts] or [1]
    ys = [y for pts in series.values() for _, y in pts] or [1]
    x_max, y_max = max(xs) or 1, (max(ys) or 1) * 1.1
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11"><text x="{width / 2}" y="14" text-anchor="middle" font-size="13">{title}</text>',
             f'<line x1="40" y1="{height - 30}" x2="{width - 20}" y2="{height - 30}" stroke="#444"/>',
             f'<line x1="40" y1="20" x2="40" y2="{height - 30}" stroke="#444"/>',
             f'<text x="{width / 2}" y="{height - 5}" text-anchor="middle">{x_label}</text>',
             f'<text x="4" y="30">{y_max:.4g} {unit}</text>']
    for i, (name, points) in enumerate(series.items()):
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{_polyline(points, x_max, y_max, width, height)}"/>')
        parts.append(f'<text x="{width - 110}" y="{34 + 14 * i}" fill="{color}">{name}</text>')
        for x, _ in points:
            parts.append(f'<text x="{40 + x / x_max * (width - 60):.1f}" y="{height - 18}" '
                         f'text-anchor="middle">{x:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def write_plot(steps: list[Step], path: Path, title: str) -> None:
    x_of = [(s.concurrency if s.concurrency is not None else s.rate or 0) for s in steps]
    x_label = "concurrency" if steps and steps[0].concurrency is not None else "request rate (1/s)"
    latency = {f"p{q}": [(x, (s.percentile(q) or 0) / 1e3) for x, s in zip(x_of, steps)] for q in (50, 90, 95, 99)}
    throughput = {"inferences/s": [(x, s.inferences_per_second) for x, s in zip(x_of, steps)]}
    path.write_text(html_page(title, [chart("latency", x_label, latency, "ms"),
                                      chart("throughput", x_label, throughput, "/s")]))


def html_page(title: str, parts: list[str]) -> str:
    """The report's page: its title, then `parts` (charts, tables) in order."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
            f"<h2>{title}</h2>{''.join(parts)}</body></html>\n")


def format_steps(steps: list[Step]) -> str:
    lines = [f"{'step':>10} {'infer/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'queue ms':>9} {'compute ms':>10} {'errors':>7}"]
    for s in steps:
        label = f"c={s.concurrency}" if s.concurrency is not None else f"r={s.rate:g}/s"

        def ms(v):
            return f"{v / 1e3:.3f}" if v is not None else "-"

        lines.append(f"{label:>10} {s.inferences_per_second:>10.1f} {ms(s.percentile(50)):>8} "
                     f"{ms(s.percentile(90)):>8} {ms(s.percentile(95)):>8} {ms(s.percentile(99)):>8} "
                     f"{ms(s.server_queue_us):>9} {ms(s.server_compute_us):>10} {s.errors:>7}")
    return "\n".join(lines)


@dataclass
class BenchResult:
    url: str
    model: str
    batch: int
    binary: bool
    steps: list[Step]
    in_process_p50_us: float | None = None
    written: list[Path] = field(default_factory=list)  # the report's files, once written (write_outputs)

    @property
    def server_overhead_p50_us(self) -> float | None:
        """Server p50 at the lowest closed-loop concurrency minus the in-process p50."""
        closed = [s for s in self.steps if s.concurrency is not None and s.latencies_us]
        if self.in_process_p50_us is None or not closed:
            return None
        return min(closed, key=lambda s: s.concurrency).percentile(50) - self.in_process_p50_us

    def to_json(self) -> dict:
        return {"url": self.url, "model": self.model, "batch": self.batch, "binary": self.binary,
                "in_process_p50_us": self.in_process_p50_us, "server_overhead_p50_us": self.server_overhead_p50_us,
                "steps": [s.summary() for s in self.steps]}


def run_bench(url: str, model: str, *, concurrencies: list[int], rates: list[float], seconds: float, warmup: float,
              batch: int, binary: bool, max_inflight: int, onnx: Path | None, progress) -> BenchResult:
    target = endpoint(url, model, batch, binary)
    steps: list[Step] = []

    async def all_steps() -> None:
        for concurrency in concurrencies:
            with progress.step(f"closed loop, {concurrency} client(s), {warmup:g} s warm-up + {seconds:g} s"):
                steps.append(await closed_loop(target, concurrency, seconds, warmup))
        for rate in rates:
            with progress.step(f"open loop, {rate:g} requests/s, {warmup:g} s warm-up + {seconds:g} s"):
                steps.append(await open_loop(target, rate, seconds, warmup, max_inflight))

    asyncio.run(all_steps())
    result = BenchResult(url, model, batch, binary, steps)
    if onnx is not None:
        with progress.step("timing the same model and batch in-process"):
            result.in_process_p50_us = in_process_p50_us(onnx, batch)
    return result


def write_outputs(result: BenchResult, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, plot_path, json_path = folder / "bench.csv", folder / "bench.html", folder / "bench.json"
    write_csv(result.steps, csv_path)
    write_plot(result.steps, plot_path, f"{result.model} at {result.url}, batch {result.batch}")
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return [csv_path, plot_path, json_path]
