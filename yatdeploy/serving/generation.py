"""Serving stage, generation: a decoder export (yatdeploy.decoder) generating for many clients at once, with
continuous batching over its KV cache.

One scheduler thread per served decoder owns one batch: the running sequences' caches held as one left-padded
`decoding.Cache`. Each turn it drops the sequences whose clients went away, admits waiting prompts (one prefill run
for all of them, their caches then joined to the batch's), and runs one decoding step for every running sequence
at once; a sequence that ends (its end token, a stop token or string, max_tokens) leaves the batch at once and its
cache with it (`Cache.select`). Sampling is per sequence (greedy at temperature 0; else temperature, top_k, top_p
from the sequence's own seeded generator, so a seed gives the same tokens whatever else runs).

The KV cache's memory is bounded (`GenerationSettings.kv_cache_bytes`): a prompt is admitted when the batch, padded
to its longest possible sequence, still fits; until then it waits, and after `queue_timeout_s` (or at once when it
could never fit, or the queue is full) it is refused as Unavailable (503). A prompt longer than the context, or
max_tokens past it, is InvalidInput (400) naming the limit.

Clients read a `Stream`: an async iterator of `TokenEvent`s, fed from the scheduler thread through the client's
event loop; `Stream.cancel()` (a client that disconnects or cancels) removes its sequence before the next step.
The transports (the OpenAI and generate endpoints, gRPC's ModelStreamInfer) only encode these events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from yatdeploy.decoder import DecoderLayout
from yatdeploy.decoding import Cache, Decoder
from yatdeploy.serving.protocol import Internal, InvalidInput, Unavailable
from yatdeploy.serving.text import IncrementalText, TextCodec

log = logging.getLogger("yatdeploy.serving")

DEFAULT_KV_CACHE_MB = 1024
DEFAULT_MAX_RUNNING = 64
DEFAULT_MAX_WAITING = 256
DEFAULT_QUEUE_TIMEOUT_S = 30.0
DEFAULT_PREFILL_TOKENS = 4096  # the padded prompt tokens one prefill run takes at most (one prompt always fits)

FINISH_STOP, FINISH_LENGTH = "stop", "length"  # OpenAI's finish reasons


@dataclass(frozen=True)
class GenerationSettings:
    kv_cache_bytes: int = DEFAULT_KV_CACHE_MB << 20
    max_running: int = DEFAULT_MAX_RUNNING
    max_waiting: int = DEFAULT_MAX_WAITING
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S
    prefill_tokens: int = DEFAULT_PREFILL_TOKENS


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence chooses its tokens and when it ends (OpenAI's names and defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def check(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidInput(f"max_tokens {self.max_tokens!r}: a whole number of at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidInput(f"temperature {self.temperature}: from 0 to 100")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p {self.top_p}: greater than 0, at most 1")
        if self.top_k < 0:
            raise InvalidInput(f"top_k {self.top_k}: 0 (all) or more")
        if any(not s for s in self.stop):
            raise InvalidInput("stop: an empty stop string")


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as a client reads it."""

    token_id: int | None  # None for the event that only ends a stream (a stop string's held-back text)
    text: str  # the text this token adds ("" when it completes nothing yet, or without a tokenizer)
    index: int  # its place in the generation, from 0
    finish_reason: str | None = None  # FINISH_STOP or FINISH_LENGTH on the last event


@dataclass
class GenerationStats:
    """The engine's counts, as the metrics and the statistics extension read them."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_refused: int = 0
    prefill_runs: int = 0
    decode_steps: int = 0


class GenerationObserver:
    """What the engine reports as it goes (the server's metrics subclass it); every method is called on the
    scheduler thread and must not block."""

    def first_token(self, seconds: float) -> None:  # time to first token, from submission
        pass

    def next_token(self, seconds: float) -> None:  # time between a sequence's consecutive tokens
        pass

    def finished(self, prompt_tokens: int, generated: int, reason: str) -> None:
        pass

    def cancelled(self, prompt_tokens: int, generated: int) -> None:  # the client went away or gave up
        pass


class Stream:
    """One request's tokens, read with `async for` on the event loop that submitted it; `cancel()` ends it."""

    def __init__(self, engine: GenerationEngine, prompt: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(_ids)
        self.prompt = prompt
        self.params = params
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self._ended = False
        self.cancelled = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def cancel(self) -> None:
        """The client is gone (or gave up): its sequence leaves the batch before the next step."""
        if not self._ended:
            self.cancelled = True
            self._engine._wake()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._ended and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    async def collect(self) -> list[TokenEvent]:
        return [event async for event in self]

    # Called on the scheduler thread.
    def _put(self, item: TokenEvent | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: nobody reads this stream any more
            self.cancelled = True


_ids = itertools.count(1)


@dataclass
class _Sequence:
    """A running (or waiting) sequence: its stream and what the scheduler keeps for it."""

    stream: Stream
    rng: np.random.Generator
    text: IncrementalText | None
    eos: frozenset[int]
    last_token_at: float = 0.0
    held: str = ""  # text not yet given out: it might begin a stop string
    reserved: int = field(init=False)  # the tokens it may hold at most (prompt + max_tokens)

    def __post_init__(self) -> None:
        self.reserved = len(self.stream.prompt) + self.stream.params.max_tokens


class GenerationEngine:
    """Continuous batching for one decoder export (this module's docstring); `submit` from the event loop."""

    def __init__(self, decoder: Decoder, codec: TextCodec | None = None,
                 settings: GenerationSettings = GenerationSettings(), name: str = "",
                 observer: GenerationObserver | None = None) -> None:
        self.decoder = decoder
        self.layout: DecoderLayout = decoder.layout
        self.codec = codec
        self.settings = settings
        self.name = name
        self.observer = observer or GenerationObserver()
        self.stats = GenerationStats()
        self._bytes_per_token = self.layout.cache_bytes_per_token()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cache: Cache | None = None  # rows in the order of _running
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"yatdeploy-generate-{name}", daemon=True)
        self._thread.start()

    # -- the client side (event loop) ---------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> Stream:
        """A stream of the prompt's continuation; InvalidInput or Unavailable when it can't be served."""
        params.check()
        if params.stop and self.codec is None:
            raise InvalidInput(f"model '{self.name}' has no tokenizer: stop strings can't be matched (use "
                               "stop_token_ids)")
        prompt = [int(t) for t in prompt]
        context = self.layout.context_length
        if not prompt:
            raise InvalidInput("the prompt has no tokens")
        bad = next((t for t in prompt if not 0 <= t < self.layout.vocab_size), None)
        if bad is not None:
            raise InvalidInput(f"token id {bad} is outside the model's vocabulary [0, {self.layout.vocab_size})")
        if len(prompt) >= context:
            raise InvalidInput(f"the prompt has {len(prompt)} tokens; the model's context is {context} tokens, "
                               "and at least one must be left to generate")
        if len(prompt) + params.max_tokens > context:
            raise InvalidInput(f"max_tokens {params.max_tokens} with a prompt of {len(prompt)} tokens is past the "
                               f"model's context of {context} tokens (at most {context - len(prompt)})")
        stream = Stream(self, prompt, params, asyncio.get_running_loop())
        sequence = _Sequence(stream, np.random.default_rng(params.seed),
                             IncrementalText(self.codec) if self.codec is not None else None,
                             frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos or self.codec is None
                                                                 else frozenset(self.codec.eos_token_ids)))
        if self._padded_bytes(1, sequence.reserved) > self.settings.kv_cache_bytes:
            self.stats.requests_refused += 1
            raise Unavailable(f"a sequence of {sequence.reserved} tokens needs "
                              f"{self._padded_bytes(1, sequence.reserved) / 2**20:.1f} MB of KV cache, more than the "
                              f"server's {self.settings.kv_cache_bytes / 2**20:.0f} MB (--kv-cache-mb)")
        with self._lock:
            if self._stopping:
                raise Unavailable(f"model '{self.name}' is unloading")
            if len(self._waiting) >= self.settings.max_waiting:
                self.stats.requests_refused += 1
                raise Unavailable(f"{len(self._waiting)} requests already wait for model '{self.name}'")
            self._waiting.append(sequence)
            self._lock.notify()
        return stream

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of the KV-cache bound the batch's cache holds now."""
        cache = self._cache
        return 0.0 if cache is None else cache.nbytes / self.settings.kv_cache_bytes

    def stop(self) -> None:
        """Stop the scheduler: every waiting and running stream ends with Unavailable."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # -- the scheduler thread -----------------------------------------------------------------------------------

    def _padded_bytes(self, rows: int, longest: int) -> int:
        return rows * longest * self._bytes_per_token

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._lock.wait()
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception as exc:  # a failed run fails the sequences it was for, never the thread
                log.exception("model '%s': generation failed", self.name)
                self._fail(self._running, Internal(f"generation failed: {type(exc).__name__}: {exc}"))
                self._running, self._cache = [], None
        self._fail([*self._running, *self._waiting], Unavailable(f"model '{self.name}' was unloaded"))
        self._running, self._cache = [], None
        self._waiting.clear()

    def _turn(self) -> None:
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._running:  # every running sequence has a token to feed: the prefill gave the new ones theirs
            self._step()
        elif not admitted:
            with self._lock:  # only waiting sequences that don't fit yet: wait for a change or a timeout
                self._lock.wait(timeout=0.05)

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self._waiting if s.stream.cancelled]
            for sequence in gone:
                self._waiting.remove(sequence)
        for sequence in gone:
            self._cancelled(sequence)
        self._keep([s for s in self._running if not s.stream.cancelled])

    def _cancelled(self, sequence: _Sequence) -> None:
        self.stats.requests_cancelled += 1
        self.observer.cancelled(len(sequence.stream.prompt), len(sequence.stream.generated))

    def _keep(self, kept: list[_Sequence]) -> None:
        """The batch reduced to `kept` (in their order in it), their caches with them."""
        if len(kept) == len(self._running):
            return
        for sequence in self._running:
            if sequence.stream.cancelled and sequence not in kept:
                self._cancelled(sequence)
        rows = [i for i, s in enumerate(self._running) if s in kept]
        self._running = [self._running[i] for i in rows]
        self._cache = self._cache.select(rows) if self._cache is not None and rows else None

    def _admit(self) -> list[_Sequence]:
        """The waiting sequences that join now: in order, while the batch, padded to the longest sequence any of
        them may reach, stays within the KV-cache bound; those waiting too long are refused."""
        now = time.perf_counter()
        admitted: list[_Sequence] = []
        longest = max((s.reserved for s in self._running), default=0)
        prompt_tokens = 0
        with self._lock:
            while self._waiting and len(self._running) + len(admitted) < self.settings.max_running:
                candidate = self._waiting[0]
                rows = len(self._running) + len(admitted) + 1
                if self._padded_bytes(rows, max(longest, candidate.reserved)) > self.settings.kv_cache_bytes:
                    break
                width = max([len(s.stream.prompt) for s in admitted] + [len(candidate.stream.prompt)])
                if admitted and width * (len(admitted) + 1) > self.settings.prefill_tokens:
                    break
                self._waiting.popleft()
                admitted.append(candidate)
                longest = max(longest, candidate.reserved)
                prompt_tokens += len(candidate.stream.prompt)
            expired = [s for s in self._waiting if now - s.stream.submitted > self.settings.queue_timeout_s]
            for sequence in expired:
                self._waiting.remove(sequence)
        for sequence in expired:
            self.stats.requests_refused += 1
            sequence.stream._put(Unavailable(
                f"no room in model '{self.name}''s KV cache for {self.settings.queue_timeout_s:g} s "
                f"({len(self._running)} sequences running; --kv-cache-mb bounds it)"))
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> None:
        logits, cache = self.decoder.run_prefill([s.stream.prompt for s in admitted])
        self.stats.prefill_runs += 1
        self.stats.prompt_tokens += sum(len(s.stream.prompt) for s in admitted)
        self._running += admitted
        self._cache = cache if self._cache is None else self._cache.joined(cache)
        self._choose(admitted, logits)

    def _step(self) -> None:
        """One token for every running sequence, in one run."""
        assert self._cache is not None
        tokens = [s.stream.generated[-1] for s in self._running]
        logits, self._cache = self.decoder.run_step(self._cache, tokens)
        self.stats.decode_steps += 1
        self._choose(self._running, logits)

    def _choose(self, sequences: list[_Sequence], logits: np.ndarray) -> None:
        """Each sequence's next token from its row of `logits`, given out; the ended ones leave the batch."""
        now = time.perf_counter()
        ended = []
        for sequence, row in zip(sequences, logits):
            stream = sequence.stream
            token = _sample(row.astype(np.float32), stream.params, sequence.rng)
            if stream.first_token_at is None:
                stream.first_token_at = now
                self.observer.first_token(now - stream.submitted)
            else:
                self.observer.next_token(now - sequence.last_token_at)
            sequence.last_token_at = now
            if self._emit(sequence, token):
                ended.append(sequence)
        self.stats.generation_tokens += len(sequences)
        if ended:
            for sequence in ended:
                self.stats.requests_finished += 1
                self.observer.finished(len(sequence.stream.prompt), len(sequence.stream.generated),
                                       sequence.stream.finish_reason or FINISH_LENGTH)
            self._keep([s for s in self._running if s not in ended])

    def _emit(self, sequence: _Sequence, token: int) -> bool:
        """Give `token` (and the text it completes) to the client; whether the sequence ends with it."""
        stream = sequence.stream
        index = len(stream.generated)
        if token in sequence.eos:  # the end token or a stop token: not part of the text
            stream.generated.append(token)
            self._finish(sequence, FINISH_STOP, index, token)
            return True
        stream.generated.append(token)
        text = sequence.text.add(token) if sequence.text is not None else ""
        finish = FINISH_LENGTH if len(stream.generated) >= stream.params.max_tokens else None
        if stream.params.stop and sequence.text is not None:
            pending = sequence.held + text
            cut = min((at for at in (pending.find(s) for s in stream.params.stop) if at >= 0), default=-1)
            if cut >= 0:
                sequence.held = ""
                stream.finish_reason = FINISH_STOP
                stream._put(TokenEvent(token, pending[:cut], index, FINISH_STOP))
                return True
            # The last characters are held back: a stop string may begin in them.
            split = len(pending) if finish else max(0, len(pending) - (max(len(s) for s in stream.params.stop) - 1))
            text, sequence.held = pending[:split], pending[split:]
        if finish is not None:
            text += sequence.text.flush() if sequence.text is not None else ""
            stream.finish_reason = finish
        stream._put(TokenEvent(token, text, index, finish))
        return finish is not None

    def _finish(self, sequence: _Sequence, reason: str, index: int, token: int) -> None:
        stream = sequence.stream
        stream.finish_reason = reason
        tail = sequence.held + (sequence.text.flush() if sequence.text is not None else "")
        stream._put(TokenEvent(token, tail, index, reason))

    def _fail(self, sequences: Sequence[_Sequence], error: Exception) -> None:
        for sequence in sequences:
            sequence.stream._put(error)


def _sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits: the argmax at temperature 0, else drawn from the softmax of
    logits / temperature restricted to the top_k most likely and the smallest set whose probability reaches top_p."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    order = np.argsort(-scaled, kind="stable")
    if params.top_k:
        order = order[:params.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])

