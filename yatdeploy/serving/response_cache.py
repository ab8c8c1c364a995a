"""The response cache, Triton's: a model version's answers kept by a hash of everything that decides them, so that
a repeated request is answered without the batcher or the model. Stage: inference (InferenceServer.infer looks a
request up once it is checked, before the batcher, and stores the answer after a successful run).

It is on where the server has one (`serve --cache-config local,size=BYTES`, Triton's flag form) and the model asks
for it (config.pbtxt `response_cache { enable: true }`); either alone caches nothing, as in Triton.

The key is a BLAKE2b-256 digest over, each field length-prefixed: the model's name and version and the loaded
instance (a reloaded model never answers from its predecessor's entries); every input's name, datatype, numpy dtype,
shape and bytes (a BYTES tensor by its elements, each with its type and length); the outputs asked for, in order,
with their binary flags and classification counts (or "every output" with the request's binary default); and the
request's parameters but those that decide only when or whether it runs (ANSWER_NEUTRAL: `timeout`, `priority`).
What is stored is the answer's outputs (name, array, binary flag) as the request chose them, copied read-only.

The cache is one LRU bounded by bytes, shared by every model (as Triton's local cache): an entry counts its arrays'
bytes (a BYTES element its length plus an 8-byte reference), its output names and its key; an entry larger than the
whole cache is not stored. It is thread-safe (one lock around its table).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import orjson

from yatdeploy.errors import YatDeployError, option
from yatdeploy.serving.protocol import INLINE_BYTES, InferRequest

# Request parameters that change when or whether a request runs, never its answer: left out of the key.
ANSWER_NEUTRAL = frozenset({"timeout", "priority"})
CACHE_KINDS = ("local",)  # Triton's cache implementations yatdeploy has

Outputs = tuple[tuple[str, np.ndarray, bool], ...]  # an answer's outputs: name, array, sent as binary


def parse_cache_config(text: str) -> int:
    """The cache's size in bytes from `--cache-config`'s value in Triton's form, `local,size=BYTES`; a
    YatDeployError for anything else."""
    kind, _, settings = text.partition(",")
    expected = "expected local,size=BYTES (Triton's form, e.g. local,size=1048576)"
    if kind.strip() not in CACHE_KINDS:
        raise YatDeployError(f"{option('cache_config')} {text}: cache '{kind.strip()}' is not one yatdeploy has "
                             f"({', '.join(CACHE_KINDS)}); {expected}")
    values = dict(item.partition("=")[::2] for item in settings.split(",")) if settings else {}
    size = values.pop("size", "").strip()
    if values or not size.isascii() or not size.isdigit() or int(size) < 1:
        raise YatDeployError(f"{option('cache_config')} {text}: {expected}, with a size of at least 1 byte")
    return int(size)


def _element_bytes(array: np.ndarray) -> int:
    if array.dtype != object:
        return array.nbytes
    return sum(8 + len(v if isinstance(v, bytes) else str(v).encode()) for v in array.reshape(-1))


def entry_size(key: bytes, outputs: Outputs) -> int:
    """What an entry counts against the cache's size."""
    return len(key) + sum(len(name.encode()) + _element_bytes(array) for name, array, _ in outputs)


class _Hash:
    def __init__(self) -> None:
        self.digest = hashlib.blake2b(digest_size=32)

    def field(self, data: bytes | memoryview) -> None:
        self.digest.update(len(data).to_bytes(8, "little"))
        self.digest.update(data)

    def text(self, value: str) -> None:
        self.field(value.encode("utf-8", "surrogatepass"))


def request_key(owner: int, model: str, version: str, request: InferRequest) -> bytes:
    """The cache key of `request` to the loaded model instance `owner` (`model`, `version`)."""
    h = _Hash()
    h.field(owner.to_bytes(8, "little"))
    h.text(model)
    h.text(version)
    for name in sorted(request.inputs):
        array = request.inputs[name]
        h.text(name)
        h.text(request.input_datatypes[name])
        h.text(array.dtype.str)
        h.text(repr(tuple(array.shape)))
        if array.dtype == object:
            for value in array.reshape(-1):
                if isinstance(value, bytes):
                    h.field(b"b")
                    h.field(value)
                else:
                    h.field(b"s")
                    h.text(str(value))
        else:
            h.field(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
    if request.outputs is None:
        h.field(b"every output")
        h.field(b"1" if request.binary_default else b"0")
    else:
        for asked in request.outputs:
            h.text(asked.name)
            h.field(b"1" if asked.binary else b"0")
            h.text(str(asked.class_count))
    parameters = {k: v for k, v in request.parameters.items() if k not in ANSWER_NEUTRAL}
    h.field(orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS, default=repr))
    return h.digest.digest()


@dataclass
class _Entry:
    owner: int
    outputs: Outputs
    size: int


class ResponseCache:
    """An LRU of answers bounded by `capacity` bytes, thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity {capacity}")
        self.capacity = capacity
        self.used = 0
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Outputs | None:
        """The stored outputs for `key` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.outputs

    def put(self, key: bytes, owner: int, outputs) -> bool:
        """Store a read-only copy of `outputs` under `key`, evicting the least recently used entries to make room;
        False (nothing stored) for an answer larger than the whole cache."""
        size = entry_size(key, outputs)
        if size > self.capacity:
            return False
        kept = []
        for name, array, binary in outputs:
            copy = np.array(array, copy=True, order="C")
            copy.flags.writeable = False
            kept.append((name, copy, binary))
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.used -= old.size
            while self.used + size > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self.used -= evicted.size
            self._entries[key] = _Entry(owner, tuple(kept), size)
            self.used += size
        return True

    def forget(self, owner: int) -> None:
        """Drop every entry of the model instance `owner` (unloaded)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.owner == owner]:
                self.used -= self._entries.pop(key).size


@dataclass
class Lookup:
    """One request's look-up: its key, the stored outputs on a hit, and the time spent in the cache (Triton's
    cache_hit duration: the look-up; cache_miss: the look-up and the insertion)."""

    cache: ResponseCache
    owner: int
    key: bytes
    outputs: Outputs | None
    seconds: float

    @property
    def hit(self) -> bool:
        return self.outputs is not None

    def store(self, outputs) -> None:
        began = time.perf_counter()
        self.cache.put(self.key, self.owner, outputs)
        self.seconds += time.perf_counter() - began


async def look_up(cache: ResponseCache, owner: int, model: str, version: str, request: InferRequest) -> Lookup:
    """`request` looked up in `cache`; a large request's inputs are hashed in a worker thread (hashlib releases the
    GIL), so that the event loop goes on meanwhile."""
    began = time.perf_counter()
    large = sum(a.nbytes for a in request.inputs.values()) + request.reference_bytes() > INLINE_BYTES
    if large:
        key = await asyncio.to_thread(request_key, owner, model, version, request)
    else:
        key = request_key(owner, model, version, request)
    outputs = cache.get(key)
    return Lookup(cache, owner, key, outputs, time.perf_counter() - began)
