"""`yatdeploy demo --lm`'s own parts: a tiny Yat character LM, the text it trains on (shipped with the package),
training, its character vocabulary as a tokenizer.json, and a prompt decoded greedily in PyTorch and ONNX Runtime,
then with the KV cache (yatdeploy.decoding) against the full recompute, each timed per token. `yatdeploy.api.demo(
lm=True)` runs it: these parts, and the API's exports (dynamic batch and sequence length; a decoder with its KV
cache in an ONNX Runtime GenAI folder) and validate between them.

The model is what an nmn user writes: a YatEmbed lookup plus learned positions, causal MultiHeadYatAttention,
a YatNMN block, and the tied head YatEmbed.attend, which becomes one YatGemm node like the YatNMN.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from nmn.torch import MultiHeadYatAttention, YatEmbed, YatNMN
from torch import nn

from yatdeploy import backends, genai
from yatdeploy.decoding import Decoder
from yatdeploy.exporting import ExportResult
from yatdeploy.loading import LoadedModel
from yatdeploy.progress import Progress
from yatdeploy.validation import ValidationReport

TEXT_FILE = "yat_notes.txt"  # yatdeploy/data/: the project's own prose, nothing downloaded
CONTEXT = 64  # the longest sequence the learned positions cover
WIDTH, HEADS, WINDOW = 48, 4, 32
INPUT = "ids"
PROMPT = "The yat neuron "
GENAI_FOLDER = "genai"  # the decoder export with its KV cache, an ONNX Runtime GenAI model folder
ARCH = "yatdeploy.demo_lm:build_lm_model"  # how the saved state_dict is loaded (--arch)
INPUT_SPEC = f"{INPUT}:int64[batch=1,seq={WINDOW}]"  # exported with dynamic batch and length


@cache
def corpus() -> str:
    return resources.files("yatdeploy").joinpath("data", TEXT_FILE).read_text(encoding="utf-8")


@cache
def vocabulary() -> tuple[str, ...]:
    return tuple(sorted(set(corpus())))


def encode(text: str) -> list[int]:
    index = {c: i for i, c in enumerate(vocabulary())}
    return [index[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(vocabulary()[i] for i in ids)


class CharYatLM(nn.Module):
    def __init__(self, vocabulary_size: int, width: int = WIDTH, heads: int = HEADS, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = YatEmbed(vocabulary_size, width)
        self.position = nn.Embedding(context, width)
        self.norm = nn.LayerNorm(width)
        self.attention = MultiHeadYatAttention(width, heads)
        self.mlp = YatNMN(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        h = self.embed(ids) + self.position(torch.arange(length, device=ids.device))
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        h = h + self.attention(self.norm(h), mask=causal[None, None])
        h = h + self.mlp(h)
        return self.embed.attend(h)


def build_lm_model() -> nn.Module:
    """The --arch entry point: the demo LM's architecture for the shipped text's vocabulary."""
    return CharYatLM(len(vocabulary()))


def train(model: nn.Module, steps: int, seed: int, progress: Progress) -> float:
    data = torch.tensor(encode(corpus()))
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        starts = torch.randint(0, len(data) - WINDOW - 1, (32,), generator=generator)
        x = torch.stack([data[s:s + WINDOW] for s in starts])
        y = torch.stack([data[s + 1:s + WINDOW + 1] for s in starts])
        loss = nn.functional.cross_entropy(model(x).reshape(-1, len(vocabulary())), y.reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % max(1, steps // 4) == 0:
            progress.say(f"  step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return float(loss.detach())


def write_tokenizer(folder: Path) -> Path:
    """The character vocabulary as a tokenizer.json ONNX Runtime GenAI loads (id = the character's index)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / genai.TOKENIZER_JSON
    path.write_text(json.dumps(genai.character_tokenizer(vocabulary()).content), encoding="utf-8")
    return path


def greedy(step, prompt: str, length: int) -> str:
    """`length` characters after `prompt`, each the argmax of `step(ids)` at the last position, over the last
    WINDOW characters (the length it was trained on)."""
    ids = encode(prompt)
    for _ in range(length):
        ids.append(int(np.argmax(step(np.array([ids[-WINDOW:]], dtype=np.int64))[0, -1])))
    return decode(ids[len(encode(prompt)):])


@dataclass(frozen=True)
class Timed:
    """A greedy continuation and the median time a new token took (ms; the run over the prompt left out)."""

    text: str
    ms_per_token: float


def timed_full_recompute(run, prompt: str, length: int) -> Timed:
    """`length` characters after `prompt`, `run(ids)` over the whole sequence so far at each step (no cache)."""
    ids, seconds = encode(prompt), []
    for _ in range(length):
        started = time.perf_counter()
        logits = run(np.array([ids], dtype=np.int64))
        seconds.append(time.perf_counter() - started)
        ids.append(int(np.argmax(logits[0, -1])))
    return Timed(decode(ids[len(encode(prompt)):]), 1000 * float(np.median(seconds[1:])))


def timed_with_cache(decoder: Decoder, prompt: str, length: int) -> Timed:
    """`length` characters after `prompt`: the prompt run once into the cache, then one token per step."""
    tokens, seconds = [int(np.argmax(decoder.prefill([encode(prompt)])[0]))], []
    while len(tokens) < length:
        started = time.perf_counter()
        logits = decoder.step([tokens[-1]])
        seconds.append(time.perf_counter() - started)
        tokens.append(int(np.argmax(logits[0])))
    return Timed(decode(tokens), 1000 * float(np.median(seconds)))


@dataclass
class LmDemoResult:
    model_path: Path
    onnx_path: Path
    repository: Path
    final_loss: float
    export: ExportResult
    report: ValidationReport
    prompt: str
    torch_text: str
    onnx_text: str
    backend: str
    train_seconds: float
    export_seconds: float
    validate_seconds: float
    cached_export: ExportResult  # the decoder with its KV cache, in the ONNX Runtime GenAI folder
    cached_torch_text: str  # PyTorch, the whole sequence recomputed: the reference for the two below
    with_cache: Timed  # ONNX Runtime, the KV cache
    without_cache: Timed  # ONNX Runtime, the export without a cache, the whole sequence at each step

    @property
    def cache_agrees(self) -> bool:
        return self.cached_torch_text == self.with_cache.text == self.without_cache.text


@dataclass(frozen=True)
class Trained:
    model_path: Path  # the state_dict, for ARCH
    final_loss: float
    seconds: float


def train_and_save(out: Path, steps: int, seed: int, progress: Progress) -> Trained:
    """[1/4]: the LM trained for `steps` on the shipped text, its state_dict saved to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    progress.say(f"[1/4] training a Yat character LM on {len(corpus())} characters of yatdeploy's own notes "
                 f"({len(vocabulary())} symbols, {steps} steps)")
    torch.manual_seed(seed)
    model = build_lm_model()
    started = time.perf_counter()
    final_loss = train(model, steps, seed, progress)
    seconds = time.perf_counter() - started
    model_path = out / "lm.pt"
    torch.save(model.state_dict(), model_path)
    return Trained(model_path, final_loss, seconds)


def decode_prompt(trained: Trained, loaded: LoadedModel, export: ExportResult, cached: ExportResult,
                  report: ValidationReport, validate_seconds: float, progress: Progress,
                  continuation: int = 80) -> LmDemoResult:
    """[4/4]: PROMPT continued greedily for `continuation` characters in PyTorch and on the default backend (each
    step over the last WINDOW characters), then up to the context with the KV cache and without, timed."""
    progress.say(f"[4/4] greedy decoding of {PROMPT!r}, {continuation} characters")
    backend = backends.default()
    runner = backend.open(export.path, backends.Options())

    def torch_step(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded.module(torch.from_numpy(ids)).numpy()

    torch_text = greedy(torch_step, PROMPT, continuation)
    onnx_text = greedy(lambda ids: runner.run({INPUT: ids})[0], PROMPT, continuation)
    length = cached.decoder.context_length - len(PROMPT)
    progress.say(f"[4/4] {length} characters to the context of {cached.decoder.context_length}, with the KV cache "
                 "and without")
    decoder = Decoder(backend.open(cached.path, backends.Options()), cached.decoder)
    torch_full = timed_full_recompute(torch_step, PROMPT, length).text
    with_cache = timed_with_cache(decoder, PROMPT, length)
    without_cache = timed_full_recompute(lambda ids: runner.run({INPUT: ids})[0], PROMPT, length)
    return LmDemoResult(trained.model_path, export.path, export.repository_entry.parent, trained.final_loss, export,
                        report, PROMPT, torch_text, onnx_text, backend.name, trained.seconds,
                        export.seconds + cached.seconds, validate_seconds, cached, torch_full, with_cache,
                        without_cache)
