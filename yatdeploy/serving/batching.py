"""Dynamic batching: one bounded queue per model, drained into batches run off the event loop.

A batch takes what is waiting, up to max_batch_size items, and waits at most max_queue_delay for more
(default 0: a lone request never waits). Requests are concatenated along the batch dimension and the
outputs split back by each request's batch size, so answers are never mixed up. A full queue answers
503 at once. Only a model whose requests may be merged (ServedModel.merges_requests: a batch dimension
and dynamic batching) is batched; any other runs each request on its own, in arrival order.

On shutdown, flush() ends the waiting: what is queued runs at once, without the delay.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from yatdeploy.serving.metrics import Metrics
from yatdeploy.serving.model import ServedModel
from yatdeploy.serving.protocol import Unavailable


@dataclass
class Pending:
    feeds: dict[str, np.ndarray]
    batch: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    def key(self) -> tuple:
        """Requests can share a batch when their inputs agree in everything but the batch size."""
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(self.feeds.items()))


@dataclass
class Result:
    outputs: list[np.ndarray]
    queue_s: float
    compute_s: float


class DynamicBatcher:
    def __init__(self, model: ServedModel, metrics: Metrics, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch_size = max(1, max_batch_size if model.merges_requests else 1)
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=max(1, max_queue_size))
        self._held: Pending | None = None  # taken from the queue but not fitting the last batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{model.name}")
        self._task: asyncio.Task | None = None
        self._flushing: asyncio.Future[None] | None = None  # done once flush() was called
        self._waiting = 0
        self._stopped = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._flushing = self._flushing or loop.create_future()
        self._task = loop.create_task(self._serve(), name=f"batcher-{self.model.name}")

    def waiting(self) -> int:
        """Requests submitted and not yet running, a batch still gathering included (Triton's pending count)."""
        return self._waiting

    def flush(self) -> None:
        """Stop waiting for batches to fill: run what is queued, and all that comes later, at once."""
        self.max_queue_delay_s = 0.0
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().create_future()
        if not self._flushing.done():
            self._flushing.set_result(None)

    async def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)
        left = [self._held] if self._held is not None else []
        while not self.queue.empty():
            left.append(self.queue.get_nowait())
        for pending in left:  # none once the server drained its requests; answered all the same
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"model '{self.model.name}' is shutting down"))

    async def submit(self, feeds: dict[str, np.ndarray], batch: int) -> Result:
        if self._stopped:  # a request that found the model just before it was unloaded
            raise Unavailable(f"model '{self.model.name}' version {self.model.version} was unloaded")
        # Every request not yet running counts, those a gathering batch holds included (as Triton's queue size).
        if self._waiting >= self.queue.maxsize:
            raise Unavailable(f"model '{self.model.name}' is overloaded: its queue of "
                                     f"{self.queue.maxsize} requests is full")
        pending = Pending(feeds, batch, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(pending)  # never full: it holds at most the _waiting requests
        self._waiting += 1
        return await pending.future

    async def _next(self, timeout: float | None) -> Pending | None:
        if self._held is not None:
            pending, self._held = self._held, None
            return pending
        if timeout is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0 or self._flushing is None or self._flushing.done():
                return None
        getter = asyncio.ensure_future(self.queue.get())
        await asyncio.wait((getter, self._flushing), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()  # asyncio.Queue keeps an item whose getter was cancelled
        return None

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            batch = [first]
            size = first.batch
            deadline = time.perf_counter() + self.max_queue_delay_s
            while size < self.max_batch_size:
                following = await self._next(deadline - time.perf_counter())
                if following is None:
                    break
                if following.key() != first.key() or size + following.batch > self.max_batch_size:
                    self._held = following
                    break
                batch.append(following)
                size += following.batch
            started = time.perf_counter()
            self._waiting -= len(batch)
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, batch)
            except Exception as exc:  # the model failed: every request of the batch gets the error
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            compute_s = time.perf_counter() - started
            self.metrics.record_batch(self.model.name, self.model.version, size, compute_s)
            offset = 0
            for pending in batch:
                part = [o[offset:offset + pending.batch] for o in outputs] if len(batch) > 1 else outputs
                offset += pending.batch
                if not pending.future.done():  # the client may have gone
                    pending.future.set_result(Result(part, started - pending.enqueued, compute_s))

    def _run(self, batch: list[Pending]) -> list[np.ndarray]:
        if len(batch) == 1:
            return self.model.run(batch[0].feeds)
        feeds = {name: np.concatenate([p.feeds[name] for p in batch]) for name in batch[0].feeds}
        return self.model.run(feeds)
