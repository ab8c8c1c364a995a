"""The decoder contract: what a KV-cache language-model export takes and gives, and its layout as recorded in the
export. Decided here once; the exporter (exporting/decoder.py), the generation loops (decoding.py), the ONNX Runtime
GenAI folder (genai.py) and the server read it.

The names and layouts are Optimum's `text-generation-with-past` and ONNX Runtime GenAI's:

    inputs   input_ids                  int64 [batch, seq]
             attention_mask             int64 [batch, past + seq]    1 for a real token, 0 for padding (left)
             position_ids               int64 [batch, seq]           only where the model has learned positions
             past_key_values.{i}.key    [batch, heads, past, head_dim] in the export dtype, one pair per layer
             past_key_values.{i}.value
    outputs  logits                     [batch, seq, vocab] ([batch, 1, vocab] with logits "last")
             present.{i}.key            [batch, heads, past + seq, head_dim]
             present.{i}.value

One graph serves the prompt (past = 0: the past tensors have a 0-length dim 2) and each decoding step (seq = 1).
This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from yatdeploy.errors import OnnxModelError

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY, PAST_VALUE = "past_key_values.{}.key", "past_key_values.{}.value"
PRESENT_KEY, PRESENT_VALUE = "present.{}.key", "present.{}.value"

# The dims' names in the exported graph.
BATCH, SEQ, PAST, TOTAL = "batch", "seq", "past", "past + seq"

LOGITS_CHOICES = ("all", "last")  # every position's logits, or only the last one's (decode-only use)

META_DECODER = "yatdeploy.decoder"  # the export's metadata key: DecoderLayout as JSON


@dataclass(frozen=True)
class DecoderLayout:
    """A KV-cache export's shape facts: enough to feed it, size its cache and describe it to ONNX Runtime GenAI."""

    layers: int  # attention layers, one past/present pair each
    heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int  # the longest past + seq the model takes (its position table, else as declared)
    position_ids: bool  # whether the graph takes position_ids
    logits: str  # "all" or "last"
    dtype: str  # the export dtype: the cache's and the logits' ("float32", "float16", ...)

    def past_names(self) -> list[str]:
        return [name.format(i) for i in range(self.layers) for name in (PAST_KEY, PAST_VALUE)]

    def present_names(self) -> list[str]:
        return [name.format(i) for i in range(self.layers) for name in (PRESENT_KEY, PRESENT_VALUE)]

    def input_names(self) -> list[str]:
        return [INPUT_IDS, ATTENTION_MASK, *([POSITION_IDS] if self.position_ids else []), *self.past_names()]

    def output_names(self) -> list[str]:
        return [LOGITS, *self.present_names()]

    def cache_bytes_per_token(self) -> int:
        """Bytes of keys and values one token of one sequence holds in the cache."""
        itemsize = {"float64": 8, "float32": 4}.get(self.dtype, 2)
        return 2 * self.layers * self.heads * self.head_dim * itemsize

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DecoderLayout:
        try:
            fields = json.loads(text)
            layout = cls(**fields)
        except (TypeError, ValueError) as exc:
            raise OnnxModelError(f"the model's {META_DECODER} metadata is not a decoder layout: {exc}") from None
        if layout.logits not in LOGITS_CHOICES:
            raise OnnxModelError(f"the model's {META_DECODER} metadata has logits {layout.logits!r}")
        return layout


def layout_of(metadata: dict[str, str]) -> DecoderLayout | None:
    """The decoder layout an export records in its metadata (graph.metadata(model)), or None for another model."""
    text = metadata.get(META_DECODER)
    return None if text is None else DecoderLayout.from_json(text)
