"""Stage 3b, cache (with `kv_cache`): the rewritten causal LM made a decoder that takes and gives its KV cache.

The user's model is not edited. As the rewrite stage swaps YatNMN for YatGemm, this one swaps, in the rewritten copy:
- each MultiHeadYatAttention for `CachedYatAttention`: the same projections and math, its keys and values appended
  to the past ones it is handed, its scores one batched YatGemm of the queries against every key (the spherical form,
  whose distance is nmn's 2 − 2q·k, stays decomposed), one causal-and-padding mask built from the attention_mask;
- the learned position table (the nn.Embedding or YatEmbed the example run fed `arange(seq)`) for a lookup of
  position_ids.
`DecoderModule` then runs the model with the decoder contract's inputs and outputs (yatdeploy.decoder). What the
example run shows can't be mapped (cross-attention, no causal mask, layers that differ in heads) is refused with
one line naming the module; `verify_cached` then checks that prompt-then-steps with the cache computes what the
model computes in full, which refuses any position or mask form not mapped.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from nmn.torch.attention import MultiHeadYatAttention
from torch import Tensor, nn

from yatdeploy.decoder import (
    ATTENTION_MASK,
    BATCH,
    INPUT_IDS,
    PAST,
    POSITION_IDS,
    SEQ,
    TOTAL,
    DecoderLayout,
)
from yatdeploy.errors import UnsupportedLayerError, YatDeployError
from yatdeploy.exporting.example import ExampleRun
from yatdeploy.exporting.rewrite import Rewritten, YatEmbedLayer, decomposed_note, is_nmn_layer
from yatdeploy.exporting.settle import SettledInputs
from yatdeploy.inputs import Dim, InputSpec
from yatdeploy.ops.torch_op import yat_gemm
from yatdeploy.progress import QUIET, Progress

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
DEFAULT_CONTEXT = 2048  # the context length of a model without a position table, unless declared


@dataclass
class CacheContext:
    """What one decoder call hands its attention layers: set by DecoderModule.forward, read in call order."""

    allowed: Tensor | None = None  # [batch, 1, seq, past + seq] bool: causal and not padding, one for every layer
    position_ids: Tensor | None = None  # [batch, seq] int64
    past: list[Tensor] = field(default_factory=list)  # key, value per layer
    presents: list[Tensor] = field(default_factory=list)
    calls: int = 0  # attention calls so far in this forward


class CachedYatAttention(nn.Module):
    """nmn's MultiHeadYatAttention (self-attention, causal) with a KV cache; its math as nmn's, in nmn's order."""

    def __init__(self, attention: MultiHeadYatAttention, context: CacheContext) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.out_proj = attention.out_proj
        self.heads, self.head_dim, self.embed_dim = attention.num_heads, attention.head_dim, attention.embed_dim
        self.eps = float(attention.epsilon)
        self.normalize_qk = bool(attention._normalize_qk)
        self.spherical = bool(attention._spherical)
        self.compute_dtype = attention.compute_dtype
        scale = 1.0
        if attention.use_alpha:
            if attention._constant_alpha_value is not None:
                scale = float(attention._constant_alpha_value)
            elif attention.alpha is not None:
                scale = float(attention.alpha.detach().float().reshape(-1)[0])
        self.scale = scale  # alpha or the constant scale; nmn divides by √head_dim too
        self.context = [context]  # in a list: not a submodule, not state

    def _linear(self, x: Tensor, projection: nn.Linear) -> Tensor:
        target = self.compute_dtype or x.dtype
        bias = None if projection.bias is None else projection.bias.to(target)
        return F.linear(x.to(target), projection.weight.to(target), bias)

    def _heads(self, x: Tensor) -> Tensor:  # [batch, seq, embed] → [batch, heads, seq, head_dim]
        return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                mask: Tensor | None = None, **_: object) -> Tensor:
        context = self.context[0]
        layer = context.calls
        context.calls += 1
        batch, seq, _ = query.shape
        q = self._heads(self._linear(query, self.q_proj))
        k = self._heads(self._linear(query, self.k_proj))
        v = self._heads(self._linear(query, self.v_proj))
        if self.normalize_qk:
            q, k = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
        k = torch.cat([context.past[2 * layer], k.to(context.past[2 * layer].dtype)], dim=2)
        v = torch.cat([context.past[2 * layer + 1], v.to(context.past[2 * layer + 1].dtype)], dim=2)
        context.presents += [k, v]
        out_dtype = q.dtype
        k = k.to(out_dtype)
        if self.spherical:
            scores = self._spherical_scores(q.float(), k.float())
        else:
            # One YatGemm of the queries against every key, alpha and nmn's 1/√head_dim folded into its alpha; B as
            # zeros, not absent (the YatGemm function reads B: ops/onnx_function.py). In a 16-bit model the node is
            # 16-bit as the model's other YatGemm nodes (one ONNX function per model): float32 inside, the scores
            # saturated and rounded to the 16-bit type; the softmax then runs in float32 as nmn's.
            scores = yat_gemm(q, k, k.new_zeros(k.shape[-2]), self.eps, self.scale / math.sqrt(self.head_dim))
            scores = scores.float() if out_dtype in _SIXTEEN_BIT else scores
        # A finite floor, not -inf: a padding query (left padding) sees no key, and -inf there would make NaN that
        # later layers multiply by its zero weight. Every other row has its own key, so exp(floor − max) is 0.
        scores = scores.masked_fill(~context.allowed, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1).to(out_dtype)
        x = (weights @ v.to(out_dtype)).transpose(1, 2).reshape(batch, seq, self.embed_dim)
        return self._linear(x, self.out_proj) if self.out_proj is not None else x


    def _spherical_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """nmn's spherical form: unit q and k, the distance 2 − 2q·k (not YatGemm's |q|² + |k|² − 2q·k)."""
        q = q / torch.sqrt(torch.sum(q**2, dim=-1, keepdim=True) + self.eps)
        k = k / torch.sqrt(torch.sum(k**2, dim=-1, keepdim=True) + self.eps)
        dot = q @ k.transpose(-1, -2)
        return dot.square() / (((2.0 - 2.0 * dot).clamp(min=0.0) + self.eps) * self.head_dim**0.5) * self.scale


class PositionLookup(nn.Module):
    """A learned position table read at position_ids ([batch, seq]) instead of at arange(seq)."""

    def __init__(self, table: Tensor, context: CacheContext) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.context = [context]

    def forward(self, _positions: Tensor) -> Tensor:
        return F.embedding(self.context[0].position_ids, self.table)


class DecoderModule(nn.Module):
    """The model with the decoder contract: (input_ids, attention_mask[, position_ids], past...) → (logits,
    present...), as yatdeploy.decoder lays it out."""

    def __init__(self, model: nn.Module, context: CacheContext, layout: DecoderLayout) -> None:
        super().__init__()
        self.model = model
        self.context = [context]
        self.layout = layout

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:  # one tuple: torch.export's dynamic shapes are per input
        input_ids, attention_mask, *rest = inputs
        context = self.context[0]
        positions = 1 if self.layout.position_ids else 0
        context.position_ids = rest[0] if positions else None
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        query_at = torch.arange(seq, device=input_ids.device) + (total - seq)  # each query's place in the sequence
        causal = torch.arange(total, device=input_ids.device)[None, :] <= query_at[:, None]  # [seq, total]
        context.allowed = causal[None, None] & (attention_mask > 0)[:, None, None, :]
        context.past = list(rest[positions:])
        context.presents = []
        context.calls = 0
        logits = self.model(input_ids)
        if context.calls != self.layout.layers:
            raise YatDeployError(f"the model ran {context.calls} attention calls, not the {self.layout.layers} "
                                 "its example run made")
        if self.layout.logits == "last":
            logits = logits[:, -1:, :]
        return (logits, *context.presents)


@dataclass(frozen=True)
class Cached:
    """The decoder to export: the module, its layout, and the facts the export reports."""

    module: DecoderModule
    layout: DecoderLayout
    attention_paths: tuple[str, ...]
    position_path: str | None
    scores_as_yat_gemm: int  # attention layers whose scores are one YatGemm node
    spherical: tuple[str, ...]  # attention layers whose scores stay decomposed (nmn's spherical 2 − 2q·k distance)

    def notes(self, rewritten: Rewritten) -> tuple[str, ...]:
        """The rewrite stage's notes, its list of decomposed layers without the attention now cached as YatGemm."""
        assert rewritten.rewrite is not None
        kept = [n for n in rewritten.notes if n != decomposed_note(rewritten.rewrite.decomposed_layers)]
        scored = set(self.attention_paths) - set(self.spherical)
        decomposed = [p for p in rewritten.rewrite.decomposed_layers if p not in scored]
        named = [f"{p} (spherical scores)" if p in self.spherical else p for p in decomposed]
        return (*kept, *([decomposed_note(named)] if named else []))


@dataclass
class _Seen:
    """What the example run showed of the model's attention and embeddings."""

    attention_calls: list[str] = field(default_factory=list)
    masks: dict[str, Tensor | None] = field(default_factory=dict)
    cross: set[str] = field(default_factory=set)
    lookups: dict[str, Tensor] = field(default_factory=dict)  # embedding path → the indices it was given


def _watch(model: nn.Module, ids: Tensor) -> _Seen:
    seen = _Seen()
    handles = []

    def on_attention(path: str):
        def hook(_module, args, kwargs):
            query = args[0] if args else kwargs.get("query")
            key = args[1] if len(args) > 1 else kwargs.get("key")
            value = args[2] if len(args) > 2 else kwargs.get("value")
            mask = args[3] if len(args) > 3 else kwargs.get("mask")
            seen.attention_calls.append(path)
            keys = key if key is not None else query
            if keys is not query or (value is not None and value is not keys):
                seen.cross.add(path)
            seen.masks[path] = None if mask is None else mask.detach().clone()
        return hook

    def on_lookup(path: str):
        def hook(_module, args):
            if args and isinstance(args[0], Tensor):
                seen.lookups[path] = args[0].detach().clone()
        return hook

    for path, sub in model.named_modules():
        if isinstance(sub, MultiHeadYatAttention):
            handles.append(sub.register_forward_pre_hook(on_attention(path), with_kwargs=True))
        elif isinstance(sub, (nn.Embedding, YatEmbedLayer)):
            handles.append(sub.register_forward_pre_hook(on_lookup(path)))
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _is_arange(indices: Tensor, length: int) -> bool:
    if indices.dtype.is_floating_point or indices.dim() == 0 or indices.shape[-1] != length:
        return False
    expected = torch.arange(length, device=indices.device)
    return bool((indices == expected).all())


def _check_causal(path: str, mask: Tensor | None, seq: int) -> None:
    if mask is None:
        raise UnsupportedLayerError(path, "mask", "it is called without a mask, so it is not causal and a KV cache "
                                                  "does not apply; pass the causal mask torch.ones(t, t).tril()")
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    try:
        same = bool((torch.broadcast_to(mask.to(torch.bool), (*mask.shape[:-2], seq, seq)) == causal).all())
    except RuntimeError:
        same = False
    if not same:
        raise UnsupportedLayerError(path, "mask", f"the mask it is given ({tuple(mask.shape)}) is not the causal "
                                                  f"mask tril(ones({seq}, {seq})); yatdeploy maps causal masks "
                                                  "only (padding comes from attention_mask)")


def _replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    if path == "":
        return new
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)
    return model


def cache_model(rewritten: nn.Module, ids: Tensor, logits_mode: str, dtype: str,
                context_length: int | None) -> Cached:
    """`rewritten` (the rewrite stage's copy, Yat layers as YatGemm) made a DecoderModule, or refused. `ids`: the
    example token ids [batch, seq], random (not arange) so the position table is the one lookup fed arange."""
    model = copy.deepcopy(rewritten)
    seq = ids.shape[1]
    seen = _watch(model, ids)
    others = [p for p, m in model.named_modules() if is_nmn_layer(m) and "attention" in type(m).__module__
              and not isinstance(m, MultiHeadYatAttention)]
    if others:
        raise UnsupportedLayerError(others[0], "type", f"{type(model.get_submodule(others[0])).__name__} has no "
                                                       "cached form; yatdeploy caches MultiHeadYatAttention")
    if not seen.attention_calls:
        raise YatDeployError("the model runs no MultiHeadYatAttention, so it has no KV cache to export",
                             "export it without --kv-cache")
    for path in dict.fromkeys(seen.attention_calls):
        if path in seen.cross:
            raise UnsupportedLayerError(path, "key", "it is called as cross-attention (key or value given); a "
                                                     "decoder's KV cache is for causal self-attention")
        _check_causal(path, seen.masks[path], seq)
    attentions = {path: model.get_submodule(path) for path in dict.fromkeys(seen.attention_calls)}
    shapes = {(a.num_heads, a.head_dim) for a in attentions.values()}
    if len(shapes) > 1:
        raise YatDeployError(f"the attention layers differ in heads and head size ({sorted(shapes)}); one KV cache "
                             "layout needs them equal")
    (heads, head_dim), = shapes
    positions = [p for p, indices in seen.lookups.items() if _is_arange(indices, seq) and not torch.equal(indices, ids)]
    if len(positions) > 1:
        raise YatDeployError(f"several lookups take arange(seq) ({', '.join(positions)}); yatdeploy maps one "
                             "learned position table")
    tokens = [p for p, indices in seen.lookups.items() if indices.shape == ids.shape and torch.equal(indices, ids)]
    if not tokens:
        raise YatDeployError("no embedding takes the token ids", "a decoder's first input must be its token ids")
    token_table = _table(model.get_submodule(tokens[0]))
    context = CacheContext()
    position_path = positions[0] if positions else None
    table_rows = None
    if position_path is not None:
        table = _table(model.get_submodule(position_path))
        table_rows = table.shape[0]
        model = _replace(model, position_path, PositionLookup(table, context))
    if context_length is None:
        context_length = table_rows or DEFAULT_CONTEXT
    elif table_rows is not None and context_length > table_rows:
        raise YatDeployError(f"a context of {context_length} is longer than the position table "
                             f"'{position_path}' ({table_rows} rows)")
    for path, attention in attentions.items():
        model = _replace(model, path, CachedYatAttention(attention, context))
    layout = DecoderLayout(
        layers=len(seen.attention_calls), heads=heads, head_dim=head_dim, hidden_size=heads * head_dim,
        vocab_size=int(token_table.shape[0]), context_length=int(context_length),
        position_ids=position_path is not None, logits=logits_mode, dtype=dtype,
    )
    spherical = tuple(p for p in attentions if attentions[p]._spherical)
    scored = sum(1 for p in seen.attention_calls if not attentions[p]._spherical)
    return Cached(DecoderModule(model, context, layout).eval(), layout, tuple(attentions), position_path, scored,
                  spherical)


def _table(module: nn.Module) -> Tensor:
    return module.embedding if isinstance(module, YatEmbedLayer) else module.weight.detach()


def empty_past(layout: DecoderLayout, batch: int, dtype: torch.dtype, length: int = 0) -> list[Tensor]:
    return [torch.zeros(batch, layout.heads, length, layout.head_dim, dtype=dtype)
            for _ in range(2 * layout.layers)]


def decoder_inputs(layout: DecoderLayout, ids: Tensor, past: list[Tensor]) -> tuple[Tensor, ...]:
    """The decoder's inputs for `ids` [batch, seq] after `past` (no padding): mask of ones, positions in order."""
    batch, seq = ids.shape
    before = past[0].shape[2] if past else 0
    mask = torch.ones(batch, before + seq, dtype=torch.int64)
    positions = (torch.arange(before, before + seq, dtype=torch.int64)[None].expand(batch, seq).contiguous(),)
    return (ids, mask, *(positions if layout.position_ids else ()), *past)


def verify_cached(cached: Cached, reference: nn.Module, ids: Tensor, steps: int = 3) -> float:
    """Prompt then `steps` single-token steps through the cache, against the model run in full on the whole
    sequence: the largest difference, relative to the logits' scale. Refuses the export when it is not rounding."""
    layout, decoder = cached.layout, cached.module
    dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    with torch.inference_mode():
        full = reference(ids)
        if not isinstance(full, Tensor) or full.dim() != 3 or full.shape[:2] != ids.shape:
            raise YatDeployError(f"the model's output is {_describe(full)}; a decoder's must be one tensor of logits "
                                 "[batch, seq, vocab]")
        prompt = ids.shape[1] - steps
        out = decoder(*decoder_inputs(layout, ids[:, :prompt], empty_past(layout, ids.shape[0], dtype)))
        got = [out[0]]
        for step in range(steps):
            at = prompt + step
            out = decoder(*decoder_inputs(layout, ids[:, at:at + 1], list(out[1:])))
            got.append(out[0])
    expected = full if layout.logits == "all" else full[:, prompt - 1:]  # "last": the prompt's last, then each step's
    cached_logits = torch.cat(got, dim=1)
    scale = float(expected.double().abs().max()) or 1.0
    error = float((cached_logits.double() - expected.double()).abs().max()) / scale
    limit = 3e-2 if dtype in _SIXTEEN_BIT else 1e-3
    if not error <= limit:
        where = f"position table '{cached.position_path}'" if cached.position_path else "no position table"
        raise YatDeployError(
            f"with its KV cache the model does not compute what it computes in full (largest difference {error:.3g} "
            f"of the logits' scale, {where}): yatdeploy maps learned positions (an nn.Embedding over arange(seq)) "
            "and causal masks (tril); the model forms one of them another way",
            "export it without --kv-cache, or form positions and the mask as nmn's examples do",
        )
    return error


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def cache_decoder(rewritten: Rewritten, settled: SettledInputs, run: ExampleRun, logits: str,
                  context_length: int | None, progress: Progress = QUIET) -> Cached:
    """Stage 3b: the rewritten model given its KV cache, and checked against the model run in full."""
    if rewritten.rewrite is None:
        raise YatDeployError(f"a {settled.reference.loaded.format} keeps no module structure, so its attention "
                             "can't be given a KV cache", "save the model with torch.save(model), or its state_dict "
                             "with --arch")
    (ids,) = run.examples
    ids = ids.to(torch.int64)
    with progress.step("giving the attention layers a KV cache"):
        cached = cache_model(rewritten.rewrite.module, ids, logits, settled.reference.dtype, context_length)
        verify_cached(cached, settled.reference.module, ids[:1] if ids.shape[1] >= 4 else _longer(ids))
    return cached


def _longer(ids: Tensor) -> Tensor:
    """An example of at least 4 tokens for the cache check (3 steps after a prompt of 1)."""
    return ids[:1].repeat(1, -(-4 // ids.shape[1]))


def decoder_specs(layout: DecoderLayout, seq: int = 1) -> tuple[InputSpec, ...]:
    """The decoder's inputs as the check stage records them (`seq`: the example's length), with their limits."""
    context_length = layout.context_length
    batch = Dim(1, BATCH)
    specs = [InputSpec(INPUT_IDS, "int64", (batch, Dim(seq, SEQ, context_length))),
             InputSpec(ATTENTION_MASK, "int64", (batch, Dim(seq, TOTAL, context_length)))]
    if layout.position_ids:
        specs.append(InputSpec(POSITION_IDS, "int64", (batch, Dim(seq, SEQ, context_length))))
    past = (batch, Dim(layout.heads), Dim(0, PAST, context_length), Dim(layout.head_dim))
    specs += [InputSpec(name, layout.dtype, past) for name in layout.past_names()]
    return tuple(specs)
