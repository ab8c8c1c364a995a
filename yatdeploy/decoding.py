"""Generation over a decoder export (yatdeploy.decoder's contract) on any backend: a `Decoder` session holds one
batch's KV cache, takes its prompts at once (`prefill`), then one token per sequence at a time (`step`), and
`generate` runs greedy decoding over both. Decoder validation, the LM server and the benchmark step it.

Prompts of different lengths share one batch with LEFT padding, as ONNX Runtime GenAI and Hugging Face do: each
prompt is right-aligned, its pads have attention_mask 0, and its positions are cumsum(attention_mask) - 1 clipped at
0, so every sequence's last column is a real token and each step appends one column to all of them. The presents
a run gives are the next run's pasts. Works with logits "all" and "last" (only the last position is read).

numpy and a backend's runner (yatdeploy.backends): this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yatdeploy import backends, dtypes
from yatdeploy.decoder import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, DecoderLayout, layout_of
from yatdeploy.errors import OnnxModelError, YatDeployError, option


@dataclass
class Cache:
    """One batch's state between runs: the keys and values of every layer and the attention mask they go with."""

    past: list[np.ndarray]  # in DecoderLayout.past_names() order (key, value per layer): [batch, heads, length, hd]
    attention_mask: np.ndarray  # int64 [batch, length]: 0 on each sequence's left padding

    @property
    def batch(self) -> int:
        return int(self.attention_mask.shape[0])

    @property
    def length(self) -> int:
        """Columns held, padding included: the past length of the next run."""
        return int(self.attention_mask.shape[1])

    def pads(self) -> list[int]:
        """Each sequence's left padding."""
        return [int(n) for n in self.length - self.attention_mask.sum(axis=1)]

    def next_positions(self) -> np.ndarray:
        """int64 [batch]: the position of each sequence's next token (its real tokens so far)."""
        return self.attention_mask.sum(axis=1).astype(np.int64)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.past)

    def select(self, rows: Sequence[int]) -> Cache:
        """The cache of these sequences only (the others ended), without the leading columns that are padding in
        every one left."""
        rows = list(rows)
        mask = self.attention_mask[rows]
        real = mask.any(axis=0)
        start = int(np.argmax(real)) if real.any() else mask.shape[1]
        return Cache([p[rows, :, start:] for p in self.past], mask[:, start:])

    def joined(self, other: Cache) -> Cache:
        """This batch and `other` as one (sequences that started apart): the shorter left-padded to the longer."""
        length = max(self.length, other.length)
        return Cache([np.concatenate([_left_padded(a, length), _left_padded(b, length)], axis=0)
                      for a, b in zip(self.past, other.past)],
                     np.concatenate([_left_padded(self.attention_mask, length),
                                     _left_padded(other.attention_mask, length)], axis=0))


def _left_padded(array: np.ndarray, length: int) -> np.ndarray:
    """`array` (a past [batch, heads, length, hd] or a mask [batch, length]) with zero columns in front to `length`."""
    axis = 2 if array.ndim == 4 else 1
    missing = length - array.shape[axis]
    if missing == 0:
        return array
    shape = list(array.shape)
    shape[axis] = missing
    return np.concatenate([np.zeros(shape, array.dtype), array], axis=axis)


@dataclass
class Generation:
    """What `Decoder.generate` gives: per sequence the new tokens, and the logits each was chosen from."""

    prompts: list[list[int]]
    tokens: list[list[int]]  # the argmax of each step's logits, per sequence
    logits: np.ndarray  # [batch, steps, vocab] in the export dtype: the last real position's, one row per step
    pads: list[int]  # each prompt's left padding in the batch


class Decoder:
    """A generation session over an opened decoder export: `prefill` then `step`, the cache in `cache`."""

    def __init__(self, runner: backends.Runner, layout: DecoderLayout, pad_token_id: int = 0) -> None:
        names = [s.name for s in runner.inputs]
        if set(names) != set(layout.input_names()) or LOGITS not in [s.name for s in runner.outputs]:
            raise OnnxModelError(f"the model's inputs ({', '.join(names)}) are not the decoder's "
                                 f"({', '.join(layout.input_names())})")
        if not 0 <= pad_token_id < layout.vocab_size:
            raise YatDeployError(f"{option('pad_token_id')} {pad_token_id}: not in the vocabulary [0, "
                                 f"{layout.vocab_size})")
        self.runner = runner
        self.layout = layout
        self.pad_token_id = pad_token_id
        self.dtype = dtypes.by_name(layout.dtype).numpy
        self._outputs = [s.name for s in runner.outputs]
        self.cache: Cache | None = None
        self.runs = 0  # runner calls so far

    @classmethod
    def open(cls, path: str | Path, backend: str | None = None,
             options: backends.Options | None = None) -> Decoder:
        """The decoder export at `path` opened on `backend` (default: backends.default())."""
        from yatdeploy.inputs import file_metadata

        layout = layout_of(file_metadata(path))
        if layout is None:
            raise YatDeployError(f"{path} is not a decoder export (no KV cache)", "export it with --kv-cache")
        chosen = backends.get(backend) if backend is not None else backends.default()
        return cls(chosen.open(Path(path), options or backends.Options()), layout)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Start a batch: the prompts (token ids, of any lengths ≥ 1) left-padded into one run over an empty cache.
        Returns each sequence's last-position logits [batch, vocab]."""
        logits, self.cache = self.run_prefill(prompts)
        return logits

    def step(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """One token per sequence appended; returns each sequence's logits for the next [batch, vocab]."""
        if self.cache is None:
            raise YatDeployError("step before prefill: start the batch with its prompts")
        logits, self.cache = self.run_step(self.cache, tokens)
        return logits

    def run_prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, Cache]:
        """`prefill` without keeping the cache: (each sequence's last logits, the new batch's cache)."""
        prompts = [list(p) for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise YatDeployError("a prompt of no tokens: each sequence needs at least one")
        width = max(len(p) for p in prompts)
        self._check_length(width)
        ids = np.full((len(prompts), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(prompts), width), np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = prompt
            mask[row, width - len(prompt):] = 1
        self._check_ids(ids)
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        empty = np.zeros((len(prompts), self.layout.heads, 0, self.layout.head_dim), self.dtype)
        return self._run(ids, mask, positions, [empty] * (2 * self.layout.layers))

    def run_step(self, cache: Cache, tokens: Sequence[int] | np.ndarray) -> tuple[np.ndarray, Cache]:
        """`step` on `cache` (kept as it is): (each sequence's next logits, the cache one token longer)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if ids.shape[0] != cache.batch:
            raise YatDeployError(f"{ids.shape[0]} tokens for a batch of {cache.batch}")
        self._check_length(cache.length + 1)
        self._check_ids(ids)
        positions = cache.next_positions()[:, None]
        mask = np.concatenate([cache.attention_mask, np.ones((cache.batch, 1), np.int64)], axis=1)
        return self._run(ids, mask, positions, cache.past)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 forced: Sequence[Sequence[int]] | None = None) -> Generation:
        """Greedy decoding: each sequence's argmax fed back, `max_new_tokens` per sequence. `forced`: tokens to feed
        instead of the argmax (per sequence, `max_new_tokens` each; a continuation scored), the argmax still
        reported in `tokens`."""
        if max_new_tokens < 1:
            raise YatDeployError(f"{option('max_new_tokens')} {max_new_tokens}: must be at least 1")
        if forced is not None and (len(forced) != len(prompts)
                                   or any(len(f) < max_new_tokens - 1 for f in forced)):
            raise YatDeployError(f"{option('forced')}: {max_new_tokens - 1} tokens for each of the "
                                 f"{len(prompts)} sequences")
        logits = [self.prefill(prompts)]
        pads = self.cache.pads()
        chosen = [np.argmax(logits[0].astype(np.float32), axis=-1)]
        for at in range(1, max_new_tokens):
            fed = chosen[-1] if forced is None else np.array([f[at - 1] for f in forced], np.int64)
            logits.append(self.step(fed))
            chosen.append(np.argmax(logits[-1].astype(np.float32), axis=-1))
        tokens = np.stack(chosen, axis=1)
        return Generation([list(p) for p in prompts], tokens.tolist(), np.stack(logits, axis=1), pads)

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, Cache]:
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        if self.layout.position_ids:
            feeds[POSITION_IDS] = positions.astype(np.int64)
        feeds.update(zip(self.layout.past_names(), past))
        outputs = dict(zip(self._outputs, self.runner.run(feeds)))
        self.runs += 1
        return outputs[LOGITS][:, -1, :], Cache([outputs[name] for name in self.layout.present_names()], mask)

    def _check_length(self, length: int) -> None:
        if length > self.layout.context_length:
            raise YatDeployError(f"{length} tokens (padding included) exceed the model's context of "
                                 f"{self.layout.context_length}")

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.layout.vocab_size):
            raise YatDeployError(f"token id {int(ids.max() if ids.max() >= self.layout.vocab_size else ids.min())} "
                                 f"is outside the vocabulary [0, {self.layout.vocab_size})")
