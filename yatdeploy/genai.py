"""The ONNX Runtime GenAI folder of a decoder export (packaging, right after the export): beside the ONNX file,
`genai_config.json` (yatdeploy.decoder's layout in GenAI's terms), the tokenizer when one is given (tokenizer.json
and tokenizer_config.json) and, with ops "library", the custom-op library and the OpenBLAS it links (copied as
packaging.copy_op_library copies them for a Triton repository), so that `onnxruntime_genai.Model(folder)` loads it
and generates. With ops "function" the config names no library and nothing is copied: GenAI's ONNX Runtime inlines
YatGemm's ONNX function.

What onnxruntime-genai 0.18 takes, as checked (docs/language-models.md):
- model type "decoder" runs Optimum's names (yatdeploy.decoder); `past_key_names` are "%d" patterns.
- `session_options.custom_ops_library` must be a path inside the model folder (no `..`): the library's file name.
- `eos_token_id` must be an id of the vocabulary, or a list of them: an empty list when the tokenizer has no end
  token; bos and pad ids default to 0, as GenAI's own defaults do. GenAI 0.18 also ends a sequence when it picks
  the pad id (benchmarks/bench_lm.py found it), so without an end token a generation stops at the first pad id the
  model picks: name a pad token in the tokenizer, or set `min_length`, to run to max_length.
- Its tokenizer reads tokenizer.json models "BPE" and "Unigram" (WordPiece and WordLevel fail to load) and needs a
  tokenizer_config.json beside it, which may be `{}`.

This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yatdeploy import files
from yatdeploy.decoder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    PAST_KEY,
    PAST_VALUE,
    POSITION_IDS,
    PRESENT_KEY,
    PRESENT_VALUE,
    DecoderLayout,
)
from yatdeploy.errors import YatDeployError, option

GENAI_CONFIG = "genai_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_TYPE = "decoder"
BYTES = "bytes"  # --tokenizer bytes: token id = the UTF-8 byte's value
OPS_CHOICES = ("library", "function")  # YatGemm in GenAI: the custom-op library's kernels, or the ONNX function
TOKENIZER_MODELS = ("BPE", "Unigram")  # the tokenizer.json models GenAI 0.18's tokenizer loads


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte value in a byte-level
    tokenizer.json (printable Latin-1 bytes as themselves, the others shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


@dataclass(frozen=True)
class Tokenizer:
    """A tokenizer for the folder: tokenizer.json's content, tokenizer_config.json's, and what genai_config.json
    takes from them."""

    source: str  # where it came from, for messages
    content: dict  # tokenizer.json
    config: dict = field(default_factory=dict)  # tokenizer_config.json
    size: int = 0  # the largest token id + 1
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def check_fits(self, layout: DecoderLayout) -> None:
        if self.size > layout.vocab_size:
            raise YatDeployError(f"{option('tokenizer')} {self.source}: ids up to {self.size - 1}, but the model's "
                                 f"vocabulary has {layout.vocab_size} tokens",
                                 "give the tokenizer the model was trained with")


def _byte_level(vocab: dict[str, int], source: str) -> Tokenizer:
    """A byte-level BPE tokenizer.json with no merges: each vocabulary entry one token."""
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    content = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
               "pre_tokenizer": level, "post_processor": None, "decoder": level,
               "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                         "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                         "ignore_merges": False, "vocab": vocab, "merges": []}}
    return Tokenizer(source, content, {}, max(vocab.values(), default=-1) + 1)


def byte_tokenizer() -> Tokenizer:
    """`--tokenizer bytes`: token id = the value of each UTF-8 byte of the text (256 tokens)."""
    symbols = _byte_symbols()
    return _byte_level({symbols[b]: b for b in range(256)}, BYTES)


def character_tokenizer(characters: Sequence[str]) -> Tokenizer:
    """One token per character, id = its index in `characters` (a character LM's vocabulary). Each character must
    be one UTF-8 byte (ASCII): a byte-level tokenizer needs merges, and ids for their parts, for longer ones."""
    symbols = _byte_symbols()
    wide = [c for c in characters if len(c.encode()) != 1]
    if wide:
        raise YatDeployError(f"a character tokenizer takes characters of one UTF-8 byte (ASCII); not {wide[0]!r}")
    if len(set(characters)) != len(characters):
        raise YatDeployError("a character tokenizer's characters must be distinct")
    return _byte_level({symbols[c.encode()[0]]: i for i, c in enumerate(characters)}, "characters")


def _read_json(path: Path, what: str) -> dict:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise YatDeployError(f"{option('tokenizer')} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise YatDeployError(f"{option('tokenizer')} {path}: {what} is not JSON ({exc})") from None
    if not isinstance(content, dict):
        raise YatDeployError(f"{option('tokenizer')} {path}: {what} is not a JSON object")
    return content


def _token_ids(content: dict, path: Path) -> dict[str, int]:
    """tokenizer.json's tokens and their ids: the model's vocabulary and the added tokens."""
    model = content.get("model")
    if not isinstance(model, dict) or "vocab" not in model:
        raise YatDeployError(f"{option('tokenizer')} {path}: not a Hugging Face tokenizers file (no model.vocab)",
                             "give the tokenizer.json that tokenizers' Tokenizer.save writes")
    kind = model.get("type")
    if kind not in TOKENIZER_MODELS:
        raise YatDeployError(f"{option('tokenizer')} {path}: a {kind} tokenizer; ONNX Runtime GenAI 0.18 reads "
                             f"{' and '.join(TOKENIZER_MODELS)} tokenizers only")
    vocab = model["vocab"]
    try:
        ids = ({piece: i for i, (piece, _score) in enumerate(vocab)} if kind == "Unigram"
               else {str(piece): int(i) for piece, i in vocab.items()})
        ids.update({str(t["content"]): int(t["id"]) for t in content.get("added_tokens") or []})
    except (AttributeError, KeyError, TypeError, ValueError):
        raise YatDeployError(f"{option('tokenizer')} {path}: its {kind} vocabulary is malformed") from None
    if any(i < 0 for i in ids.values()):
        raise YatDeployError(f"{option('tokenizer')} {path}: a negative token id")
    return ids


def _special(config: dict, name: str, ids: dict[str, int], path: Path) -> int | None:
    """tokenizer_config.json's `name` ("eos_token": a string, or a dict with its content) as an id."""
    token = config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    if token not in ids:
        raise YatDeployError(f"{option('tokenizer')} {path}: {TOKENIZER_CONFIG}'s {name} {token!r} is not a token "
                             f"of {path.name}")
    return ids[token]


def read_tokenizer(source: str | Path) -> Tokenizer:
    """`--tokenizer`: BYTES, or a Hugging Face tokenizers file (its tokenizer_config.json beside it, when there is
    one, gives the bos, eos and pad tokens). Checked before the model loads; against its vocabulary after."""
    if str(source) == BYTES:
        return byte_tokenizer()
    path = Path(source)
    if not path.is_file():
        raise YatDeployError(f"{option('tokenizer')} {path}: no such file",
                             f"a Hugging Face tokenizer.json, or {BYTES} for token id = UTF-8 byte")
    content = _read_json(path, "it")
    ids = _token_ids(content, path)
    beside = path.with_name(TOKENIZER_CONFIG)
    config = _read_json(beside, TOKENIZER_CONFIG) if beside.is_file() else {}
    special = {name: _special(config, f"{name}_token", ids, path) for name in ("bos", "eos", "pad")}
    return Tokenizer(str(path), content, config, max(ids.values(), default=-1) + 1,
                     special["bos"], special["eos"], special["pad"])


def check_ops(ops: str) -> str:
    if ops not in OPS_CHOICES:
        raise YatDeployError(f"{option('genai_ops')} {ops!r}: one of {', '.join(OPS_CHOICES)}")
    return ops


def genai_config(onnx_name: str, layout: DecoderLayout, tokenizer: Tokenizer | None = None,
                 library: str | None = None) -> dict:
    """genai_config.json for the decoder export `onnx_name` (a file name in the folder); `library`: the custom-op
    library's file name in the folder, or None for YatGemm as the ONNX function."""
    inputs = {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK}
    if layout.position_ids:
        inputs["position_ids"] = POSITION_IDS
    # The decoder contract's per-layer names, their layer as GenAI's "%d".
    inputs.update(past_key_names=PAST_KEY.format("%d"), past_value_names=PAST_VALUE.format("%d"))
    outputs = {"logits": LOGITS, "present_key_names": PRESENT_KEY.format("%d"),
               "present_value_names": PRESENT_VALUE.format("%d")}
    session_options: dict = {"log_id": "yatdeploy", "provider_options": []}
    if library is not None:
        session_options["custom_ops_library"] = library
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    return {
        "model": {
            "type": MODEL_TYPE,
            "context_length": layout.context_length,
            "vocab_size": layout.vocab_size,
            "bos_token_id": 0 if bos is None else bos,
            "eos_token_id": [] if eos is None else eos,  # no end token (GenAI still stops at the pad id)
            "pad_token_id": pad if pad is not None else eos if eos is not None else 0,
            "decoder": {
                "filename": onnx_name,
                "head_size": layout.head_dim,
                "hidden_size": layout.hidden_size,
                "num_attention_heads": layout.heads,
                "num_key_value_heads": layout.heads,
                "num_hidden_layers": layout.layers,
                "inputs": inputs,
                "outputs": outputs,
                "session_options": session_options,
            },
        },
        "search": {"max_length": layout.context_length, "min_length": 0, "do_sample": False, "num_beams": 1,
                   "num_return_sequences": 1, "top_k": 1, "top_p": 1.0, "temperature": 1.0,
                   "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0, "early_stopping": True,
                   "past_present_share_buffer": False},  # the graph concatenates its cache: no shared buffer
    }


@dataclass(frozen=True)
class GenaiFolder:
    """What write_folder wrote: the folder `onnxruntime_genai.Model` takes, and its files besides the model."""

    folder: Path
    written: tuple[Path, ...]
    library: str | None  # custom_ops_library as the config names it; None: YatGemm as the ONNX function
    note: str | None = None  # why a library was asked for and not written


def write_folder(onnx_path: str | Path, layout: DecoderLayout, *, tokenizer: Tokenizer | None = None,
                 ops: str = "library") -> GenaiFolder:
    """Make the ONNX file's folder an ONNX Runtime GenAI model folder (the module's docstring says what goes in)."""
    from yatdeploy import native
    from yatdeploy.packaging import copy_op_library

    onnx_path = Path(onnx_path)
    folder = onnx_path.parent
    check_ops(ops)
    if tokenizer is not None:
        tokenizer.check_fits(layout)
    written: list[Path] = []
    library, note = None, None
    if ops == "library":
        built = native.ort_library_path()
        if built is None:
            note = "the custom-op library is not built: genai_config.json names none (YatGemm as the ONNX function)"
        else:
            written += copy_op_library(built, folder)
            library = built.name
    if tokenizer is not None:
        for name, content in ((TOKENIZER_JSON, tokenizer.content), (TOKENIZER_CONFIG, tokenizer.config)):
            files.write_atomically(folder / name, json.dumps(content, ensure_ascii=False).encode())
            written.append(folder / name)
    config = genai_config(onnx_path.name, layout, tokenizer, library)
    files.write_atomically(folder / GENAI_CONFIG, json.dumps(config, indent=2).encode())
    written.append(folder / GENAI_CONFIG)
    return GenaiFolder(folder, tuple(written), library, note)
