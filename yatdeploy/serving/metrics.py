"""Prometheus metrics, with Triton's names where they fit, and per-model statistics for /stats.

Triton's counters are exposed exactly as Triton names them (`nv_inference_request_success`, no `_total`:
Prometheus' Python client would add that suffix to every counter, so dashboards and alerts written for
Triton would not find them); yatdeploy's own histograms go through the client.

A decoder's generation (serving.generation) is measured as vLLM's server measures it, under vLLM's names
(`vllm:time_to_first_token_seconds`, ...: `GenerationMetrics`, its observer), with vLLM's `model_name` label
and the served `version`; its running and waiting sequences and KV-cache use are read from the engines at
scrape time (`GenerationGauges`), and its counts are added to the statistics (`generation_json`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from yatdeploy.serving.generation import FINISH_LENGTH, FINISH_STOP, GenerationEngine, GenerationObserver

if TYPE_CHECKING:
    from yatdeploy.serving.response_cache import Lookup

FINISH_ABORT = "abort"  # vLLM's finished_reason for a request its client cancelled

_LABELS = ("model", "version")
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# vLLM's labels are model_name and engine (its data-parallel engine's index); a served version has one engine.
_LM_LABELS = ("model_name", "version")
# vLLM's buckets (vllm/v1/metrics/loggers.py), with finer ones below its smallest: a small model on a CPU
# answers in well under vLLM's first bucket (1 ms for the first token, 10 ms between tokens).
_FINE = (0.0001, 0.00025, 0.0005)
_TTFT_BUCKETS = (*_FINE, 0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (*_FINE, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_COUNT_BUCKETS = tuple(m * 10**e for e in range(6) for m in (1, 2, 5))  # vLLM's 1-2-5 series


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def as_json(self) -> dict:
        return {"count": self.count, "ns": self.ns}


# Triton's inference_stats phases: compute_input is the time to read a request's tensors into the model's
# inputs (parsing and checking them here), compute_infer the model's run, compute_output the time to write
# the response. Each successful request counts once in every phase, as perf_analyzer requires.
COMPUTE_PHASES = ("compute_input", "compute_infer", "compute_output")  # also batch_stats' fields
PHASES = ("success", "fail", "queue", *COMPUTE_PHASES, "cache_hit", "cache_miss")


@dataclass
class ModelStats:
    """Triton's statistics extension, per model: counts and cumulative nanoseconds per phase, per batch size."""

    phases: dict[str, Duration] = field(default_factory=lambda: {p: Duration() for p in PHASES})
    # per executed batch size: compute_input / compute_infer / compute_output of the batches of that size
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0  # ms since the epoch of the last successful request
    # requests whose caller was cancelled (an HTTP client gone, a gRPC call cancelled or past its deadline), and
    # how long they had been in the server: yatdeploy's `cancel` beside Triton's fields
    cancel: Duration = field(default_factory=Duration)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


# Triton's counters: name -> help.
TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (batch items)",
    "nv_inference_exec_count": "Number of model executions performed (batches)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_input_duration_us": "Cumulative compute input duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
    "nv_inference_compute_output_duration_us": "Cumulative inference compute output duration in microseconds",
}
# Triton's response-cache counters, shown when the server has a cache (serve --cache-config): name -> help.
CACHE_COUNTERS = {
    "nv_cache_num_hits_per_model": "Number of response cache hits per model",
    "nv_cache_num_misses_per_model": "Number of response cache misses per model",
    "nv_cache_hit_duration_per_model": "Total cache hit duration per model, in microseconds (the look-up)",
    "nv_cache_miss_duration_per_model": "Total cache miss duration per model, in microseconds (the look-up and the "
                                        "insertion)",
}


# yatdeploy's counters rendered as Triton's are (no `_total`): name -> help.
OWN_COUNTERS = {
    "yatdeploy_inference_request_cancelled": "Number of inference requests whose client cancelled or went away "
                                             "before their answer (taken out of the queue unless running)",
}


class TritonCounter:
    """One of Triton's counters, per (model, version), rendered in Prometheus' text format under its own name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.values: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def inc(self, model: str, version: str, amount: float = 1.0) -> None:
        with self.lock:
            self.values[model, version] = self.values.get((model, version), 0.0) + amount

    def render(self) -> str:
        with self.lock:
            values = sorted(self.values.items())
        help_text = (TRITON_COUNTERS | CACHE_COUNTERS | OWN_COUNTERS)[self.name]
        lines = [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} counter"]
        lines += [f'{self.name}{{model="{_escape(m)}",version="{_escape(v)}"}} {value!r}' for (m, v), value in values]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class GenerationMetrics(GenerationObserver):
    """One served decoder version's generation, as vLLM's server reports it: an observer of its engine (called
    on the engine's scheduler thread; prometheus_client's metrics are thread-safe)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        labels = (model, version)
        self._ttft = metrics.time_to_first_token.labels(*labels)
        self._itl = metrics.inter_token_latency.labels(*labels)
        self._tpot = metrics.time_per_output_token.labels(*labels)
        self._prompt_tokens = metrics.prompt_tokens.labels(*labels)
        self._generation_tokens = metrics.generation_tokens.labels(*labels)
        self._prompt_lengths = metrics.request_prompt_tokens.labels(*labels)
        self._generation_lengths = metrics.request_generation_tokens.labels(*labels)
        self._success = {reason: metrics.request_success.labels(*labels, reason)
                         for reason in (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)}

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)
        self._generation_tokens.inc()

    def next_token(self, seconds: float) -> None:
        self._itl.observe(seconds)
        self._tpot.observe(seconds)
        self._generation_tokens.inc()

    def finished(self, prompt_tokens: int, generated: int, reason: str) -> None:
        self._prompt_tokens.inc(prompt_tokens)
        self._prompt_lengths.observe(prompt_tokens)
        self._generation_lengths.observe(generated)
        self._success[reason].inc()

    def cancelled(self, prompt_tokens: int, generated: int) -> None:
        """A cancelled request, as vLLM counts one: finished_reason "abort", its prompt tokens counted too."""
        self.finished(prompt_tokens, generated, FINISH_ABORT)


class GenerationGauges(Collector):
    """vLLM's scheduler gauges, read from every watched engine when /metrics is scraped."""

    def __init__(self, engines: dict[tuple[str, str], GenerationEngine]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = [
            (GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                               labels=_LM_LABELS), lambda e: e.running),
            (GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                               labels=_LM_LABELS), lambda e: e.waiting),
            (GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                               labels=_LM_LABELS), lambda e: e.kv_cache_usage),
        ]
        engines = sorted(self.engines.items())
        for family, read in families:
            for (model, version), engine in engines:
                family.add_metric([model, version], read(engine))
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.counters = {name: TritonCounter(name) for name in TRITON_COUNTERS}
        c = self.counters
        self.success, self.failure = c["nv_inference_request_success"], c["nv_inference_request_failure"]
        self.inferences, self.executions = c["nv_inference_count"], c["nv_inference_exec_count"]
        self.request_us, self.queue_us = c["nv_inference_request_duration_us"], c["nv_inference_queue_duration_us"]
        self.input_us = c["nv_inference_compute_input_duration_us"]
        self.compute_us = c["nv_inference_compute_infer_duration_us"]
        self.output_us = c["nv_inference_compute_output_duration_us"]
        self.cache_counters = {name: TritonCounter(name) for name in CACHE_COUNTERS}
        self.cancelled = TritonCounter("yatdeploy_inference_request_cancelled")
        self.response_cache = False  # whether the server has a response cache (then its counters are shown)
        self.request_seconds = Histogram("yatdeploy_request_duration_seconds", "Request time, server side",
                                         _LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("yatdeploy_queue_duration_seconds", "Time in the batching queue", _LABELS,
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("yatdeploy_compute_duration_seconds", "Time of one batch in the model",
                                         _LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("yatdeploy_batch_size", "Batch items per execution", _LABELS,
                                    buckets=_BATCH_BUCKETS, registry=r)
        # vLLM's names, in a registry of their own, shown once a decoder has been served: Counter adds `_total`
        # (vllm:prompt_tokens_total), as vLLM's prometheus_client does.
        self.lm_registry = lm = CollectorRegistry()
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", _LM_LABELS,
                                             buckets=_TTFT_BUCKETS, registry=lm)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", _LM_LABELS,
                                             buckets=_ITL_BUCKETS, registry=lm)
        self.time_per_output_token = Histogram("vllm:time_per_output_token_seconds",
                                               "Histogram of time per output token in seconds (the same "
                                               "observations as vllm:inter_token_latency_seconds).", _LM_LABELS,
                                               buckets=_ITL_BUCKETS, registry=lm)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", _LM_LABELS,
                                     registry=lm)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         _LM_LABELS, registry=lm)
        self.request_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                       (*_LM_LABELS, "finished_reason"), registry=lm)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               _LM_LABELS, buckets=_TOKEN_COUNT_BUCKETS, registry=lm)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", _LM_LABELS,
                                                   buckets=_TOKEN_COUNT_BUCKETS, registry=lm)
        self.stats: dict[tuple[str, str], ModelStats] = {}
        # Triton's nv_inference_pending_request_count: per served version, its requests awaiting execution.
        self._pending: dict[tuple[str, str], Callable[[], int]] = {}
        # Each served decoder version's generation, for vLLM's gauges and the statistics.
        self._engines: dict[tuple[str, str], GenerationEngine] = {}
        self._generated = False  # whether a decoder has been served (then vLLM's metrics are shown)
        lm.register(GenerationGauges(self._engines))

    def generation_observer(self, model: str, version: str) -> GenerationObserver:
        """What a decoder's generation reports to (serving.generation): its latencies and token counts."""
        return GenerationMetrics(self, model, version)

    def deployed(self, model: str, version: str, pending: Callable[[], int]) -> None:
        """A version now served, `pending` its count of requests awaiting execution: its metrics are shown from
        now on, at 0 until it is used (as Triton's are), and made now rather than on its first request (a
        histogram's labelled child costs ~60 µs to make: a model's first answer paid ~0.25 ms for them)."""
        self._pending[model, version] = pending
        labels = (model, version)
        for histogram in (self.request_seconds, self.queue_seconds, self.compute_seconds, self.batch_size):
            histogram.labels(*labels)
        for counter in self.counters.values():
            counter.inc(*labels, 0.0)
        self.model_stats(model, version)

    def watch_generation(self, model: str, version: str, engine: GenerationEngine) -> None:
        self._engines[model, version] = engine
        self._generated = True

    def forget(self, model: str, version: str) -> None:
        """A version no longer served: its gauges go (its counters and histograms stay, as Triton's do)."""
        self._pending.pop((model, version), None)
        self._engines.pop((model, version), None)

    def _render_pending(self) -> str:
        name = "nv_inference_pending_request_count"
        lines = [f"# HELP {name} Instantaneous number of pending requests awaiting execution per-model.",
                 f"# TYPE {name} gauge"]
        lines += [f'{name}{{model="{_escape(m)}",version="{_escape(v)}"}} {count()}'
                  for (m, v), count in sorted(self._pending.items())]
        return "\n".join(lines) + "\n"

    def exposition(self) -> bytes:
        """/metrics: Triton's counters and pending-request gauge, yatdeploy's histograms, then vLLM's metrics
        once a decoder has been served."""
        triton = "".join(c.render() for c in self.counters.values()) + self._render_pending() + \
            self.cancelled.render()
        if self.response_cache:
            triton += "".join(c.render() for c in self.cache_counters.values())
        language = generate_latest(self.lm_registry) if self._generated else b""
        return triton.encode() + generate_latest(self.registry) + language

    def model_stats(self, model: str, version: str) -> ModelStats:
        return self.stats.setdefault((model, version), ModelStats())

    def record_batch(self, model: str, version: str, items: int, compute_s: float) -> None:
        labels = (model, version)
        self.executions.inc(*labels)
        self.inferences.inc(*labels, items)
        self.batch_size.labels(*labels).observe(items)
        self.compute_seconds.labels(*labels).observe(compute_s)
        stats = self.model_stats(model, version)
        with stats.lock:
            stats.execution_count += 1
            stats.inference_count += items
            phases = stats.batches.setdefault(items, {p: Duration() for p in COMPUTE_PHASES})
            phases["compute_infer"].add(compute_s)
            # Inputs are read and outputs written per request, not per batch: the batch's entries count it
            # with the time of its run only, so that their counts agree as Triton's do.
            phases["compute_input"].add(0.0)
            phases["compute_output"].add(0.0)

    def record_request(self, model: str, version: str, ok: bool, total_s: float, queue_s: float = 0.0,
                       compute_s: float = 0.0, input_s: float = 0.0, output_s: float = 0.0,
                       cache: Lookup | None = None) -> None:
        """A request answered (`ok`) or failed. `cache`: its response-cache look-up, for a model that uses the
        cache; a hit counts as Triton counts one: in success and queue (no wait) and cache_hit, not in the compute
        phases or their counters (it ran nothing); a miss also in cache_miss."""
        labels = (model, version)
        stats = self.model_stats(model, version)
        hit = cache is not None and cache.hit
        phases = (("success", total_s), ("queue", queue_s)) + (() if hit else (
            ("compute_input", input_s), ("compute_infer", compute_s), ("compute_output", output_s)))
        if cache is not None:
            phases += (("cache_hit" if hit else "cache_miss", cache.seconds),)
            counters = self.cache_counters
            kind = "hits" if hit else "misses"
            counters[f"nv_cache_num_{kind}_per_model"].inc(*labels)
            counters[f"nv_cache_{'hit' if hit else 'miss'}_duration_per_model"].inc(*labels, cache.seconds * 1e6)
        if ok:
            self.success.inc(*labels)
            self.request_us.inc(*labels, total_s * 1e6)
            self.queue_us.inc(*labels, queue_s * 1e6)
            if not hit:
                self.compute_us.inc(*labels, compute_s * 1e6)
                self.input_us.inc(*labels, input_s * 1e6)
                self.output_us.inc(*labels, output_s * 1e6)
            self.request_seconds.labels(*labels).observe(total_s)
            self.queue_seconds.labels(*labels).observe(queue_s)
        else:
            self.failure.inc(*labels)
        with stats.lock:
            if ok:
                for phase, seconds in phases:
                    stats.phases[phase].add(seconds)
                stats.last_inference_ms = int(time.time() * 1000)
            else:
                stats.phases["fail"].add(total_s)

    def record_cancel(self, model: str, version: str, seconds: float) -> None:
        """A request whose caller was cancelled `seconds` after it came (neither a success nor a failure)."""
        self.cancelled.inc(model, version)
        stats = self.model_stats(model, version)
        with stats.lock:
            stats.cancel.add(seconds)

    def stats_json(self, model: str, version: str) -> dict:
        """One entry of Triton's model_stats: every field its statistics extension has (cache_hit and cache_miss
        count nothing for a model without the response cache)."""
        s = self.model_stats(model, version)
        with s.lock:
            return {
                "name": model,
                "version": version,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {phase: d.as_json() for phase, d in s.phases.items()},
                "batch_stats": [{"batch_size": size, **{p: d.as_json() for p, d in phases.items()}}
                                for size, phases in sorted(s.batches.items())],
                "memory_usage": [],
                "cancel": s.cancel.as_json(),
                **self.generation_json(model, version),
            }

    def generation_json(self, model: str, version: str) -> dict:
        """A served decoder's generation, as a `generation` object beside Triton's fields (none for any other
        model): the engine's counts since it started and its gauges now."""
        engine = self._engines.get((model, version))
        if engine is None:
            return {}
        return {"generation": {**asdict(engine.stats), "running": engine.running, "waiting": engine.waiting,
                               "kv_cache_usage": engine.kv_cache_usage}}
