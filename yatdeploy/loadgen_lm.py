"""Measuring a served language model: the load generator of `yatdeploy bench --lm`, a client of any
OpenAI-compatible completions endpoint (ours, vLLM's, Triton's OpenAI frontend), and the in-process floor of the
same decoder export beside it.

Closed loop: at each concurrency N, N clients on keep-alive HTTP/1.1 connections, each sending its next
`POST /v1/completions` when its last stream has ended. The requests cycle through a mix, every prompt length with
every output length (default 16/64/128 × 16/64/128): random token-id prompts (no tokenizer needed; ids below
loadgen.SAMPLE_INT_HIGH, a fresh prompt each request), `max_tokens`, `ignore_eos: true` (every token asked for is
generated), `temperature: 0`, `stream: true` with `stream_options: {"include_usage": true}`. The answer is read as
server-sent events as they arrive: `data: {...}` chunks whose `choices` carry the tokens, a usage chunk, then
`data: [DONE]`.

Per request: TTFT = the first chunk with a choice − the send; TPOT = (the last such chunk − the first) / (tokens − 1);
tokens = the usage chunk's completion_tokens (else the chunks with a choice). A request fails on a transport error,
a status other than 200, an error event, a stream without `[DONE]`, or a token count other than its max_tokens.
Per step, after `warmup` unmeasured seconds, over the requests sent in the measured window (`seconds` long, or until
`requests` were sent and answered): TTFT and TPOT p50/p99 (TTFT also per prompt length), output tokens/s (the tokens
whose chunks arrived in the window / its length, whichever request they belong to) and the errors.

The floor (`measure_floor`): the export at `lm_export` in this process at the server's intra-op threads, stepped over
the same mix at batch 1 by yatdeploy's loop (decoding.Decoder on the default backend, spinning off, greedy: what the
server's generation engine runs) and by ONNX Runtime GenAI from the folder's genai_config.json (its session options
have no spinning entry: its pool spins), taking turns request by request after a warm-up pass: the prefill (the
prompt in, the first token chosen) per prompt length, and each request's mean decode step, as TPOT counts it.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from yatdeploy.errors import YatDeployError
from yatdeploy.loadgen import (
    SAMPLE_INT_HIGH,
    Connection,
    body_pieces,
    chart,
    get_json,
    html_page,
    http_address,
    percentile,
    read_head,
)

DEFAULT_CONCURRENCIES = (1, 8, 32)
DEFAULT_PROMPT_TOKENS = (16, 64, 128)
DEFAULT_MAX_TOKENS = (16, 64, 128)
FLOOR_ROUNDS = 3  # timed passes over the mix, after one warm-up pass
DONE = b"[DONE]"


@dataclass(frozen=True)
class LmRequest:
    """One kind of request of the mix."""

    prompt_tokens: int
    max_tokens: int


def request_mix(prompt_tokens: list[int], max_tokens: list[int]) -> list[LmRequest]:
    """Every prompt length with every output length."""
    return [LmRequest(p, m) for p in prompt_tokens for m in max_tokens]


@dataclass
class Answer:
    """One streamed answer as the client read it."""

    sent: float  # perf_counter() before the request was written
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with a choice
    usage_tokens: int | None = None  # the usage chunk's completion_tokens
    done: bool = False  # data: [DONE] read
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunks)

    def arrivals(self) -> list[tuple[float, float]]:
        """(time, tokens) per chunk: the tokens shared evenly when a server puts several in one chunk."""
        share = self.tokens / len(self.chunks) if self.chunks else 0.0
        return [(t, share) for t in self.chunks]


@dataclass
class LmStep:
    """One concurrency's measured requests and what they measured."""

    concurrency: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0  # the measured window
    output_tokens: float = 0.0  # tokens whose chunks arrived in the window
    tokens_requested: int = 0  # max_tokens summed over the measured requests
    tokens_received: int = 0  # the tokens their answers counted
    prompt_tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list, repr=False)
    tpot_ms: list[float] = field(default_factory=list, repr=False)
    ttft_by_prompt_ms: dict[int, list[float]] = field(default_factory=dict, repr=False)
    first_error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds else 0.0

    def record(self, request: LmRequest, answer: Answer) -> None:
        """One measured request and its answer."""
        self.requests += 1
        self.tokens_requested += request.max_tokens
        self.prompt_tokens += request.prompt_tokens
        error = answer.error
        if error is None:
            self.tokens_received += answer.tokens
            if not answer.chunks:
                error = "the stream had no chunk with a choice"
            elif answer.tokens != request.max_tokens:
                error = f"{answer.tokens} token(s) answered for max_tokens {request.max_tokens} with ignore_eos"
        if error is not None:
            self.errors += 1
            self.first_error = self.first_error or error
            return
        ttft = (answer.chunks[0] - answer.sent) * 1e3
        self.ttft_ms.append(ttft)
        self.ttft_by_prompt_ms.setdefault(request.prompt_tokens, []).append(ttft)
        if answer.tokens > 1:
            self.tpot_ms.append((answer.chunks[-1] - answer.chunks[0]) * 1e3 / (answer.tokens - 1))

    def summary(self) -> dict:
        def ms(values: list[float], q: float) -> float | None:
            value = percentile(values, q)
            return None if value is None else round(value, 4)

        return {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                "seconds": round(self.seconds, 3), "output_tokens": round(self.output_tokens, 1),
                "tokens_per_second": round(self.tokens_per_second, 1),
                "tokens_requested": self.tokens_requested, "tokens_received": self.tokens_received,
                "prompt_tokens": self.prompt_tokens,
                "ttft_p50_ms": ms(self.ttft_ms, 50), "ttft_p99_ms": ms(self.ttft_ms, 99),
                "tpot_p50_ms": ms(self.tpot_ms, 50), "tpot_p99_ms": ms(self.tpot_ms, 99),
                "ttft_by_prompt": {str(p): {"requests": len(v), "p50_ms": ms(v, 50), "p99_ms": ms(v, 99)}
                                   for p, v in sorted(self.ttft_by_prompt_ms.items())},
                "first_error": self.first_error}


class CompletionsEndpoint:
    """An OpenAI-compatible /v1/completions endpoint over raw HTTP/1.1 keep-alive connections."""

    def __init__(self, url: str, model: str | None) -> None:
        self.host, self.port = http_address(url, "http://HOST:PORT (an OpenAI-compatible server)")
        self.base = f"http://{self.host}:{self.port}"
        if model is None:  # the server's first model
            served = get_json(self.base, "/v1/models").get("data") or []
            if not served:
                raise YatDeployError(f"{self.base}/v1/models lists no model", "give the model's name (--model)")
            model = str(served[0]["id"])
        self.model = model
        self._head = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                      "Content-Type: application/json\r\nAccept: text/event-stream\r\n")

    def request(self, kind: LmRequest, rng: np.random.Generator) -> bytes:
        """A request of `kind` with a fresh random prompt, ready to write."""
        body = orjson.dumps({
            "model": self.model, "prompt": rng.integers(0, SAMPLE_INT_HIGH, kind.prompt_tokens).tolist(),
            "max_tokens": kind.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}})
        return f"{self._head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    async def connect(self) -> Connection:
        return await asyncio.open_connection(self.host, self.port)

    async def exchange(self, connection: Connection, request: bytes) -> tuple[Answer, Connection]:
        """One request and its stream, read to its end: the answer, and a connection fit for the next request."""
        reader, writer = connection
        answer = Answer(sent=time.perf_counter())
        try:
            writer.write(request)
            await writer.drain()
            status, length, chunked = await read_head(reader)
            if status != 200:
                body = b"".join([piece async for piece in body_pieces(reader, length, chunked)])
                answer.error = f"HTTP {status}: {body[:300].decode(errors='replace')}"
                return answer, connection
            pending = b""
            async for piece in body_pieces(reader, length, chunked):
                now = time.perf_counter()
                pending = (pending + piece).replace(b"\r\n", b"\n")
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    _read_event(event, now, answer)
            if pending.strip():
                _read_event(pending, time.perf_counter(), answer)
            if not answer.done and answer.error is None:
                answer.error = "the stream ended without data: [DONE]"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            answer.error = f"{type(exc).__name__}: {exc}"
            writer.close()
            return answer, await self.connect()
        return answer, connection

    async def close(self, connection: Connection) -> None:
        connection[1].close()


def _read_event(event: bytes, now: float, answer: Answer) -> None:
    """One server-sent event: its data lines, a chunk of the completion, its usage, an error or [DONE]."""
    data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
    if not data:
        return  # a comment or an event without data (a keep-alive)
    if data == DONE:
        answer.done = True
        return
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        answer.error = answer.error or f"not JSON in the stream: {data[:120]!r}"
        return
    if not isinstance(chunk, dict):
        answer.error = answer.error or f"not a completion chunk: {data[:120]!r}"
        return
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        answer.error = answer.error or f"error event: {message}"
        return
    if chunk.get("choices"):
        answer.chunks.append(now)
    usage = chunk.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        answer.usage_tokens = int(usage["completion_tokens"])


async def closed_loop(endpoint: CompletionsEndpoint, concurrency: int, mix: list[LmRequest], seconds: float,
                      requests: int | None, warmup: float, rng: np.random.Generator) -> LmStep:
    """One step: `concurrency` clients for `warmup` seconds, then measured for `seconds` (or until `requests`
    measured requests were sent and answered)."""
    step = LmStep(concurrency)
    kinds = itertools.cycle([mix[i] for i in rng.permutation(len(mix))])
    connections = [await endpoint.connect() for _ in range(concurrency)]
    arrivals: list[tuple[float, float]] = []
    started = 0  # measured requests sent
    measure_from = time.perf_counter() + warmup
    stop = measure_from + seconds if requests is None else float("inf")

    async def client(connection: Connection) -> None:
        nonlocal started
        while True:
            now = time.perf_counter()
            measured = now >= measure_from
            if now >= stop or (measured and requests is not None and started >= requests):
                await endpoint.close(connection)
                return
            started += measured
            kind = next(kinds)
            answer, connection = await endpoint.exchange(connection, endpoint.request(kind, rng))
            arrivals.extend(answer.arrivals())
            if measured:
                step.record(kind, answer)

    await asyncio.gather(*(client(c) for c in connections))
    end = stop if requests is None else time.perf_counter()
    step.seconds = end - measure_from
    step.output_tokens = sum(tokens for at, tokens in arrivals if measure_from <= at < end)
    return step


# ------------------------------------------------------------------------------------------------- the floor


def genai_folder(export: Path, threads: int, into: Path) -> Path:
    """A copy of the export folder whose genai_config.json asks for `threads` intra-op threads (ORT GenAI's session
    options have no spinning entry: its pool spins, as ORT's does by default)."""
    folder = into / f"genai-{threads}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(export, folder)
    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def genai_generate(og, model, prompt: np.ndarray, new_tokens: int, stamps: list[float] | None = None) -> list[int]:
    """ORT GenAI's greedy generation of exactly `new_tokens` after `prompt` (int [1, length]). `stamps`: gets
    perf_counter() before the prompt goes in and after each token is chosen (the first after the prefill: GenAI's
    append_tokens runs the prompt, each later generate_next_token one decode step)."""
    params = og.GeneratorParams(model)
    # min_length = max_length: a fixed length. GenAI 0.18 ends a sequence at an end token, and with none
    # (eos_token_id []) at the pad token; min_length keeps that token from being chosen instead.
    length = prompt.shape[1] + new_tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    if stamps is not None:
        stamps.append(time.perf_counter())
    generator.append_tokens(prompt.astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        if stamps is not None:
            stamps.append(time.perf_counter())
    return tokens


def loop_generate(decoder, prompt: list[int], new_tokens: int, stamps: list[float]) -> list[int]:
    """yatdeploy's loop at batch 1, greedy, as the server's generation engine steps a sequence: `stamps` gets
    perf_counter() before the prefill and after each token is chosen."""
    stamps.append(time.perf_counter())
    logits, cache = decoder.run_prefill([prompt])
    tokens = [int(np.argmax(logits[0].astype(np.float32)))]
    stamps.append(time.perf_counter())
    for _ in range(new_tokens - 1):
        logits, cache = decoder.run_step(cache, tokens[-1:])
        tokens.append(int(np.argmax(logits[0].astype(np.float32))))
        stamps.append(time.perf_counter())
    return tokens


@dataclass
class FloorTimes:
    """One engine's figures over the mix."""

    prefill_ms: dict[int, list[float]] = field(default_factory=dict)  # per prompt length
    step_ms: list[float] = field(default_factory=list)  # per request: its mean decode step

    def add(self, request: LmRequest, stamps: list[float]) -> None:
        self.prefill_ms.setdefault(request.prompt_tokens, []).append((stamps[1] - stamps[0]) * 1e3)
        if len(stamps) > 2:
            self.step_ms.append((stamps[-1] - stamps[1]) * 1e3 / (len(stamps) - 2))

    def summary(self) -> dict:
        return {"prefill_ms": {str(p): round(statistics.median(v), 4) for p, v in sorted(self.prefill_ms.items())},
                "step_p50_ms": round(percentile(self.step_ms, 50), 4) if self.step_ms else None,
                "step_p99_ms": round(percentile(self.step_ms, 99), 4) if self.step_ms else None,
                "requests": len(self.step_ms)}


@dataclass
class Floor:
    """The in-process floor of the export: yatdeploy's loop and ORT GenAI on it."""

    export: str
    backend: str
    threads: int
    rounds: int
    loop: FloorTimes
    genai: FloorTimes | None
    genai_skipped: str | None = None
    genai_library: bool | None = None  # GenAI ran YatGemm as the custom-op library (else the ONNX function)

    def to_json(self) -> dict:
        genai = ({"skipped": self.genai_skipped} if self.genai is None else
                 {**self.genai.summary(), "library": self.genai_library, "spinning": True})
        return {"export": self.export, "backend": self.backend, "threads": self.threads, "rounds": self.rounds,
                "loop": {**self.loop.summary(), "spinning": False}, "genai": genai}


def measure_floor(export: Path, mix: list[LmRequest], threads: int, rounds: int = FLOOR_ROUNDS,
                  seed: int = 0) -> Floor:
    """The floor of this module's docstring: yatdeploy's loop and ORT GenAI take turns request by request over the
    mix, a warm-up pass first, then `rounds` timed passes."""
    from yatdeploy import backends
    from yatdeploy.decoding import Decoder

    backend = backends.default()
    decoder = Decoder.open(export, backend.name, backends.Options(intra_op_threads=threads, allow_spinning=False))
    if any(r.prompt_tokens + r.max_tokens > decoder.layout.context_length for r in mix):
        raise YatDeployError(f"the mix's longest request ({max(r.prompt_tokens + r.max_tokens for r in mix)} tokens) "
                             f"is past the export's context of {decoder.layout.context_length} tokens")
    floor = Floor(str(export), backend.name, threads, rounds, FloorTimes(), None)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="yatdeploy-floor-") as scratch:
        genai = _open_genai(export, threads, Path(scratch), floor)
        for timed in [False] + [True] * rounds:
            for request in mix:
                prompt = rng.integers(0, SAMPLE_INT_HIGH, request.prompt_tokens).tolist()
                stamps: list[float] = []
                loop_generate(decoder, prompt, request.max_tokens, stamps)
                if timed:
                    floor.loop.add(request, stamps)
                if genai is not None:
                    og, model = genai
                    stamps = []
                    genai_generate(og, model, np.array([prompt]), request.max_tokens, stamps)
                    if timed:
                        floor.genai.add(request, stamps)
        genai = None  # GenAI's model, closed before its scratch folder goes
    return floor


def _open_genai(export: Path, threads: int, scratch: Path, floor: Floor):
    """(onnxruntime_genai, its model of the export folder at `threads`), or None with the reason in `floor`."""
    if not (export.parent / "genai_config.json").is_file():
        floor.genai_skipped = f"{export.parent} has no genai_config.json (export it with --kv-cache)"
        return None
    try:
        import onnxruntime_genai as og
    except ImportError:
        floor.genai_skipped = "onnxruntime_genai is not installed (pip install onnxruntime-genai)"
        return None
    folder = genai_folder(export.parent, threads, scratch)
    try:
        model = og.Model(str(folder))
    except RuntimeError as exc:
        floor.genai_skipped = f"ORT GenAI can't load {export.parent}: {str(exc).strip().splitlines()[0]}"
        return None
    floor.genai = FloorTimes()
    floor.genai_library = "custom_ops_library" in (folder / "genai_config.json").read_text()
    return og, model


# ------------------------------------------------------------------------------------------------- the report


@dataclass
class LmBenchResult:
    url: str
    model: str
    mix: list[LmRequest]
    steps: list[LmStep]
    settings: dict
    machine: dict
    floor: Floor | None = None
    written: list[Path] = field(default_factory=list)  # the report's files, once written (write_outputs)

    def against_floor(self) -> dict | None:
        """The lowest concurrency's TPOT p50 over the loop's step p50, and its TTFT p50 for the longest prompt over
        the loop's prefill of that prompt: what the server adds to the engine's own work."""
        steps = [s for s in self.steps if s.tpot_ms]
        if self.floor is None or not steps:
            return None
        low = min(steps, key=lambda s: s.concurrency)
        longest = max(r.prompt_tokens for r in self.mix)
        loop = self.floor.loop.summary()
        tpot, ttft = percentile(low.tpot_ms, 50), percentile(low.ttft_by_prompt_ms.get(longest, []), 50)
        prefill = loop["prefill_ms"].get(str(longest))
        return {"concurrency": low.concurrency, "prompt_tokens": longest,
                "tpot_p50_ms": round(tpot, 4), "loop_step_p50_ms": loop["step_p50_ms"],
                "tpot_over_step_ms": round(tpot - loop["step_p50_ms"], 4),
                "ttft_p50_ms": None if ttft is None else round(ttft, 4), "loop_prefill_ms": prefill,
                "ttft_over_prefill": None if ttft is None or not prefill else round(ttft / prefill, 3)}

    def to_json(self) -> dict:
        return {"url": self.url, "model": self.model,
                "mix": {"prompt_tokens": sorted({r.prompt_tokens for r in self.mix}),
                        "max_tokens": sorted({r.max_tokens for r in self.mix})},
                "settings": self.settings, "machine": self.machine, "steps": [s.summary() for s in self.steps],
                "floor": None if self.floor is None else self.floor.to_json(), "against_floor": self.against_floor()}


def run_lm_bench(url: str, model: str | None, *, concurrencies: list[int], prompt_tokens: list[int],
                 max_tokens: list[int], seconds: float, requests: int | None, warmup: float, export: Path | None,
                 threads: int, progress, seed: int = 0) -> LmBenchResult:
    target = CompletionsEndpoint(url, model)
    mix = request_mix(prompt_tokens, max_tokens)
    rng = np.random.default_rng(seed)
    load_before = os.getloadavg()
    steps: list[LmStep] = []
    window = f"{requests} requests" if requests is not None else f"{seconds:g} s"

    async def all_steps() -> None:
        for concurrency in concurrencies:
            with progress.step(f"{concurrency} stream(s), {warmup:g} s warm-up + {window}"):
                steps.append(await closed_loop(target, concurrency, mix, seconds, requests, warmup, rng))

    asyncio.run(all_steps())
    floor = None
    if export is not None:
        with progress.step(f"the same requests in-process on {threads} thread(s): yatdeploy's loop and ORT GenAI"):
            floor = measure_floor(export, mix, threads, seed=seed)
    settings = {"concurrencies": concurrencies, "seconds": None if requests is not None else seconds,
                "requests": requests, "warmup_s": warmup, "temperature": 0, "ignore_eos": True, "stream": True,
                "prompt_ids_below": SAMPLE_INT_HIGH, "seed": seed}
    machine = {"usable_cpus": len(os.sched_getaffinity(0)),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    return LmBenchResult(url, target.model, mix, steps, settings, machine, floor)


def format_lm_steps(result: LmBenchResult) -> str:
    lines = [f"{'streams':>8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
             f"{'requests':>9} {'errors':>7}   (ms)"]
    for step in result.steps:
        s = step.summary()

        def ms(key: str, s: dict = s) -> str:
            return f"{s[key]:.3f}" if s[key] is not None else "-"

        lines.append(f"{step.concurrency:>8} {s['tokens_per_second']:>9.1f} {ms('ttft_p50_ms'):>9} "
                     f"{ms('ttft_p99_ms'):>9} {ms('tpot_p50_ms'):>9} {ms('tpot_p99_ms'):>9} {step.requests:>9} "
                     f"{step.errors:>7}")
    if result.floor is not None:
        floor = result.floor.to_json()
        for name, label in (("loop", "yatdeploy's loop"), ("genai", "ORT GenAI")):
            figures = floor[name]
            if "skipped" in figures:
                lines.append(f"in-process {label}: not run: {figures['skipped']}")
                continue
            prefill = ", ".join(f"{p} tokens {v:.3f}" for p, v in figures["prefill_ms"].items())
            lines.append(f"in-process {label} ({floor['threads']} thread(s)): decode step p50 "
                         f"{figures['step_p50_ms']:.3f} ms; prefill {prefill} ms")
        against = result.against_floor()
        if against is not None:
            lines.append(f"at {against['concurrency']} stream(s): TPOT p50 − the loop's step = "
                         f"{against['tpot_over_step_ms']:.3f} ms; TTFT p50 of a {against['prompt_tokens']}-token "
                         f"prompt / the loop's prefill = {against['ttft_over_prefill']}")
    return "\n".join(lines)


def write_lm_report(result: LmBenchResult, path: Path) -> None:
    """The HTML report: TTFT, TPOT and tokens/s against concurrency (the floor's figures as flat lines), and the
    figures as a table."""
    summaries = [s.summary() for s in result.steps]
    xs = [s["concurrency"] for s in summaries]

    def line(key: str) -> list[tuple[float, float]]:
        return [(x, s[key] or 0.0) for x, s in zip(xs, summaries)]

    def flat(value: float | None) -> list[tuple[float, float]]:
        return [(x, value) for x in xs] if value is not None else []

    longest = str(max(r.prompt_tokens for r in result.mix))
    ttft = {"p50": line("ttft_p50_ms"), "p99": line("ttft_p99_ms"),
            f"p50, prompt {longest}": [(x, s["ttft_by_prompt"].get(longest, {}).get("p50_ms") or 0.0)
                                       for x, s in zip(xs, summaries)]}
    tpot = {"p50": line("tpot_p50_ms"), "p99": line("tpot_p99_ms")}
    if result.floor is not None:
        floor = result.floor.to_json()
        ttft[f"loop prefill {longest}"] = flat(floor["loop"]["prefill_ms"].get(longest))
        tpot["loop step p50"] = flat(floor["loop"]["step_p50_ms"])
        if "skipped" not in floor["genai"]:
            tpot["GenAI step p50"] = flat(floor["genai"]["step_p50_ms"])
    ttft = {k: v for k, v in ttft.items() if v}
    tpot = {k: v for k, v in tpot.items() if v}
    rows = "".join(f"<tr><td>{s['concurrency']}</td><td>{s['tokens_per_second']}</td><td>{s['ttft_p50_ms']}</td>"
                   f"<td>{s['ttft_p99_ms']}</td><td>{s['tpot_p50_ms']}</td><td>{s['tpot_p99_ms']}</td>"
                   f"<td>{s['requests']}</td><td>{s['errors']}</td></tr>" for s in summaries)
    table = ("<table border='1' cellpadding='4' style='border-collapse:collapse;font-family:sans-serif;"
             "font-size:12px'><tr><th>streams</th><th>tokens/s</th><th>TTFT p50 ms</th><th>TTFT p99 ms</th>"
             f"<th>TPOT p50 ms</th><th>TPOT p99 ms</th><th>requests</th><th>errors</th></tr>{rows}</table>")
    notes = f"<pre>{html.escape(format_lm_steps(result))}</pre>"
    path.write_text(html_page(f"{result.model} at {result.url}: streamed completions", [
        chart("time to first token", "concurrent streams", ttft, "ms"),
        chart("time per output token", "concurrent streams", tpot, "ms"),
        chart("output tokens/s", "concurrent streams", {"tokens/s": line("tokens_per_second")}, "/s"),
        table, notes]))


def write_lm_outputs(result: LmBenchResult, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    html_path, json_path = folder / "bench.html", folder / "bench.json"
    write_lm_report(result, html_path)
    json_path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return [html_path, json_path]
