"""LM decode benchmark: a Yat GPT exported with its KV cache, the same model without it, and GPT-2 with its cache.

In one run, in ONNX Runtime on the CPU, at each intra-op thread count and context length:

  yat cache, ort-cpu       the Yat GPT exported with --kv-cache (yatdeploy.decoder's contract), YatGemm as the
                           custom-op library's kernel (backend ort-cpu)
  yat cache, ort-function  the same file, YatGemm as the model's ONNX function (backend ort-function)
  yat no cache             today's export (ids [batch, seq], every position's logits), recomputing the whole prefix
                           for each token (ort-cpu)
  gpt2 cache               the anchor: transformers' GPT2LMHeadModel of the same shape, random weights, exported
                           with its KV cache by torch.onnx.export(dynamo=True) (needs transformers; skipped without)

Decode is timed in steady state: a random prompt of context − 1 tokens is prefilled once, then the step that reads
that past and one new token (attention over `context` keys; the no-cache model runs `context` tokens) is run again
and again from the same past, warm-up steps first; the figure is the median step, timed as ONNX Runtime's own
`InferenceSession.run` on numpy arrays of the session the backend opened (what yatdeploy's Runner.run adds on top,
numpy to OrtValues and back, is recorded beside it as `*_via_runner_ms`). Prefill: one prompt of --prefill tokens
into an empty cache. ORT GenAI (when onnxruntime_genai is importable and the export folder has a
genai_config.json, which export writes): its greedy generator against yatdeploy's own loop (decoding.Decoder) over a
session of the same file, threads and backend (the library when the config names it), each generating --generate
tokens after a 16-token prompt, tokens/s. The variants take turns round by round, so drifting
machine load hits all alike; every session runs with intra-op spinning off (they share the cores in turns).

The Yat GPT: YatEmbed tokens plus learned positions (nn.Embedding over arange), blocks of LayerNorm →
MultiHeadYatAttention (causal mask tril) → residual → LayerNorm → YatNMN(width, 4·width) → Linear(4·width, width)
→ residual, a final LayerNorm and the tied head YatEmbed.attend. When a goal of issue 22 is missed (or with
--profile always), ONNX Runtime's profiler says which ops take the time at the largest context and at prefill.

    python benchmarks/bench_lm.py [--threads 1,2] [--contexts 16,128,512,1024] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere in the checkout
    sys.path.insert(0, str(ROOT))

# The goals of issue 22 ("Performance"): limits on ratios.
GOAL_FLAT = 1.5  # decode step at the largest context ≤ 1.5 × the step at the smallest
GOAL_VS_GPT2 = 1.2  # Yat with cache ≤ 1.2 × GPT-2 with cache, at every context
GOAL_PREFILL = 1.2  # Yat prefill ≤ 1.2 × GPT-2's
GOAL_GENAI = 1.1  # ORT GenAI's time per token ≤ 1.1 × yatdeploy's own loop's
GENAI_PROMPT = 16
PROFILE_WARMUP = 3
YAT_BACKENDS = ("ort-cpu", "ort-function")


def build_yat_gpt(layers: int, width: int, heads: int, vocab: int, positions: int, seed: int = 0):
    """The Yat GPT, as an nmn user writes one, with random weights (alpha as trained models have it, not 1)."""
    import torch
    from nmn.torch import MultiHeadYatAttention, YatEmbed, YatNMN
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.attn = MultiHeadYatAttention(width, heads)
            self.up, self.down = YatNMN(width, 4 * width), nn.Linear(4 * width, width)

        def forward(self, x, mask):
            x = x + self.attn(self.ln1(x), mask=mask)
            return x + self.down(self.up(self.ln2(x)))

    class YatGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = YatEmbed(vocab, width)
            self.pos = nn.Embedding(positions, width)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(width)

        def forward(self, ids):
            t = ids.shape[1]
            x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
            mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()[None, None]
            for block in self.blocks:
                x = block(x, mask)
            return self.tok.attend(self.ln_f(x))

    torch.manual_seed(seed)
    model = YatGPT().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MultiHeadYatAttention) and module.alpha is not None:
                module.alpha.fill_(1.7)
    return model


def export_gpt2(layers: int, width: int, heads: int, vocab: int, positions: int, path: Path) -> tuple[dict, object]:
    """transformers' GPT-2 of the shape, random weights, exported with its KV cache under the decoder contract's names
    (the notes: the TorchScript exporter fails on transformers 5.x's GPT-2, dynamo=True works): what the export was,
    and the decoder layout it follows."""
    import contextlib
    import io
    import warnings

    import torch
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

    from yatdeploy.decoder import DecoderLayout

    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=positions)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    layout = DecoderLayout(layers=layers, heads=heads, head_dim=width // heads, hidden_size=width, vocab_size=vocab,
                           context_length=positions, position_ids=True, logits="all", dtype="float32")

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            input_ids, attention_mask, position_ids, *past = inputs
            cache = DynamicCache(config=config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    batch, seq, past = 2, 3, 5  # sizes torch.export neither specialises nor unifies
    ids = torch.randint(0, vocab, (batch, seq))
    examples = (ids, torch.ones(batch, past + seq, dtype=torch.int64),
                torch.arange(past, past + seq)[None].expand(batch, seq).contiguous(),
                *[torch.randn(batch, heads, past, width // heads) for _ in range(2 * layers)])
    auto = torch.export.Dim.AUTO
    shapes = ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, *[{0: auto, 2: auto}] * (2 * layers))
    started = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(WithCache(), examples, dynamo=True, opset_version=20, optimize=True,
                                    input_names=layout.input_names(), output_names=layout.output_names(),
                                    dynamic_shapes=(shapes,), report=False, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    facts = {"attn_implementation": config._attn_implementation, "export_s": round(time.perf_counter() - started, 1),
             "nodes": len(program.model_proto.graph.node)}
    return facts, layout


# ---------------------------------------------------------------------------------------------------------- feeding


@dataclass
class Variant:
    """One model on one backend at one thread count, and how to feed it at a context length."""

    key: str  # "yat_cache_ort_cpu", "yat_cache_ort_function", "yat_no_cache", "gpt2_cache"
    label: str
    runner: object  # a yatdeploy backend Runner
    cached: bool
    vocab: int
    layout: object | None = None  # DecoderLayout for a cached model

    def prefill_feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """A prompt into an empty cache."""
        lay = self.layout
        empty = np.zeros((ids.shape[0], lay.heads, 0, lay.head_dim), np.float32)
        return self._feeds(ids, 0, [empty] * (2 * lay.layers))

    def _feeds(self, ids: np.ndarray, past_len: int, past: list[np.ndarray]) -> dict[str, np.ndarray]:
        batch, seq = ids.shape
        values = [ids, np.ones((batch, past_len + seq), np.int64)]
        if self.layout.position_ids:
            values.append(np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy())
        return dict(zip(self.layout.input_names(), [*values, *past]))

    def step_feeds(self, context: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """The feeds of one decode step at `context`: a past of context − 1 tokens (prefilled here) and one token;
        for the model without a cache, `context` tokens."""
        if not self.cached:
            return {self.runner.inputs[0].name: rng.integers(0, self.vocab, (1, context), dtype=np.int64)}
        prompt = rng.integers(0, self.vocab, (1, context - 1), dtype=np.int64)
        presents = self.runner.run(self.prefill_feeds(prompt))[1:]
        return self._feeds(rng.integers(0, self.vocab, (1, 1), dtype=np.int64), context - 1, presents)


def turns(work: dict[str, Callable[[], object]], warmup: int, samples: int, budget_s: float,
          min_samples: int = 5) -> dict[str, list[float]]:
    """Each callable timed in turns, round by round, ms per call: `warmup` untimed calls each first, then rounds until
    each has `samples` (one past `budget_s` of its own time stops at `min_samples`)."""
    for call in work.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in work}
    while True:
        pending = [n for n, t in times.items()
                   if len(t) < samples and (len(t) < min_samples or sum(t) / 1e3 < budget_s)]
        if not pending:
            return times
        for name in pending:
            started = time.perf_counter()
            work[name]()
            times[name].append((time.perf_counter() - started) * 1e3)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


# --------------------------------------------------------------------------------------------------- profiling


def profile_ops(backend_name: str, path: Path, threads: int, feeds: dict[str, np.ndarray] | Callable,
                runs: int) -> dict:
    """ONNX Runtime's profiler over `runs` runs after PROFILE_WARMUP: each op type's kernel time in a run (the median
    over the runs), largest first."""
    from yatdeploy import backends

    with tempfile.TemporaryDirectory(prefix="bench-lm-profile-") as folder:
        runner = backends.get(backend_name).open(path, backends.Options(
            intra_op_threads=threads, allow_spinning=False, profile_to=Path(folder) / "profile"))
        values = feeds(runner) if callable(feeds) else feeds  # may run the model (a prefill for the past)
        for _ in range(runs + PROFILE_WARMUP):
            runner.run(values)
        events = json.loads(Path(runner.inner.end_profiling()).read_text())
    # Per run, kernel time per op type; then each op's median over the runs: robust to a run the machine preempted.
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-runs:]
    per_run: list[dict[str, float]] = [{} for _ in model_runs]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        at = next((i for i, run in enumerate(model_runs) if run["ts"] <= event["ts"] <= run["ts"] + run["dur"]), None)
        if at is not None:  # not the prefill the feeds needed, nor a warm-up run
            op = event.get("args", {}).get("op_name", "?")
            per_run[at][op] = per_run[at].get(op, 0.0) + event["dur"]
    medians = {op: statistics.median(run.get(op, 0.0) for run in per_run) for op in set().union(*per_run)}
    total = sum(medians.values()) or 1.0
    timed_runs = len(model_runs)
    ops = [{"op": op, "ms_per_run": round(us / 1e3, 4), "share": round(us / total, 4)}
           for op, us in sorted(medians.items(), key=lambda item: -item[1])]
    return {"backend": backend_name, "threads": threads, "runs": timed_runs,
            "kernel_ms_per_run": round(total / 1e3, 4), "ops": ops}


# --------------------------------------------------------------------------------------------------- the record


def _cpu() -> dict:
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {"cpu": fields.get("model name", platform.processor()),
            "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "avx512f": "avx512f" in fields.get("flags", "").split(),
            "platform": platform.platform(), "python": platform.python_version()}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _library() -> dict | None:
    from yatdeploy import native

    path = native.ort_library_path()
    if path is None:
        return None
    sources = sorted((ROOT / "custom_ops" / "src" / "cpu").glob("*"))
    newest = max((p.stat().st_mtime for p in sources), default=None)
    return {"path": str(path),
            "built": dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_sources_changed": None if newest is None else
            dt.datetime.fromtimestamp(newest, dt.timezone.utc).isoformat(timespec="seconds")}


@dataclass
class Record:
    settings: dict
    decode: list[dict] = field(default_factory=list)
    prefill: list[dict] = field(default_factory=list)
    genai: dict = field(default_factory=dict)
    goals: list[dict] = field(default_factory=list)
    profiles: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=_ints, default=[1, 2], help="intra-op thread counts (default 1,2)")
    parser.add_argument("--contexts", type=_ints, help="decode contexts (default 16,128,512,1024; --quick 16,128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--positions", type=int, default=1024, help="the position table's rows (the context length)")
    parser.add_argument("--prefill", type=int, help="prompt tokens for the prefill time (default 512; --quick 128)")
    parser.add_argument("--generate", type=int, help="tokens generated for ORT GenAI vs our loop (default 256)")
    parser.add_argument("--steps", type=int, help="timed decode steps per case (default 50; --quick 8)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 5; --quick 2)")
    parser.add_argument("--budget", type=float, help="seconds per case at most, after 5 samples (default 20)")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer steps, contexts 16,128")
    parser.add_argument("--no-anchor", action="store_true", help="skip GPT-2 even when transformers is installed")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="ONNX Runtime's per-op profile when a goal is missed (auto), always or never")
    parser.add_argument("--note", default="", help="a line about the machine or the run, kept in the JSON")
    parser.add_argument("--keep", type=Path, help="keep the exports in this folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    quick = args.quick
    args.contexts = args.contexts or ([16, 128] if quick else [16, 128, 512, 1024])
    args.prefill = args.prefill or (128 if quick else 512)
    args.generate = args.generate or (32 if quick else 256)
    args.steps = args.steps or (8 if quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 5)
    args.budget = args.budget or (5.0 if quick else 20.0)
    if max(args.contexts) > args.positions or args.prefill > args.positions:
        parser.error(f"contexts and --prefill must be at most --positions ({args.positions})")
    if min(args.contexts) < 2 or args.width % args.heads:
        parser.error("contexts must be at least 2 and --width a multiple of --heads")
    return args


# --------------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()

    import onnxruntime as ort
    import torch

    import yatdeploy
    from yatdeploy import backends

    torch.set_num_threads(max(args.threads))
    missing = [name for name in YAT_BACKENDS if backends.get(name).availability() is not None]
    if missing:
        print(f"{', '.join(missing)}: {backends.get(missing[0]).availability()}", file=sys.stderr)
        return 2
    shape = dict(layers=args.layers, width=args.width, heads=args.heads, vocab=args.vocab, positions=args.positions)
    record = Record(settings={**shape, "threads": args.threads, "contexts": args.contexts, "prefill": args.prefill,
                              "generate": args.generate, "genai_prompt": GENAI_PROMPT, "steps": args.steps,
                              "warmup": args.warmup, "budget_s": args.budget, "quick": args.quick,
                              "spinning": False, "dtype": "float32", "batch": 1})
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-lm-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        exports = _export_all(args, shape, folder, record, yatdeploy)
        _measure(args, exports, record, backends)
        record.goals = goals(record, args.contexts)
        print_summary(record)
        missed = [g for g in record.goals if g["met"] is False]
        if args.profile == "always" or (args.profile == "auto" and missed):
            print("\nwhere the time goes (ONNX Runtime's profiler, 1 thread: kernel time per op type)", flush=True)
            record.profiles = profiles(args, exports)
            print_profiles(record.profiles)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    result = {
        "date": started_at.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.timezone.utc) - started_at).total_seconds(), 1),
        "command": "python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "commit": _git("rev-parse", "HEAD"),
        "tree_changed": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {**_cpu(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "note": args.note},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "onnx": _version("onnx"), "numpy": np.__version__,
                     "nmn": _version("nmn"), "transformers": _version("transformers"),
                     "onnxruntime_genai": _version("onnxruntime-genai"), "yatdeploy": _version("yatdeploy")},
        "library": _library(),
        "settings": record.settings,
        "decode": record.decode,
        "prefill": record.prefill,
        "genai": record.genai,
        "goals": record.goals,
        "profiles": record.profiles,
        "skipped": record.skipped,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 0


@dataclass
class Exports:
    yat_cache: Path
    yat_full: Path
    gpt2: Path | None
    layout: object
    gpt2_layout: object | None
    genai: Path | None  # the export folder when it has a genai_config.json and onnxruntime_genai imports


def _export_all(args, shape: dict, folder: Path, record: Record, yatdeploy) -> Exports:
    def say(text: str) -> None:
        print(text, flush=True)

    model = build_yat_gpt(**shape)
    say(f"exporting the Yat GPT ({args.layers} layers, width {args.width}, {args.heads} heads, vocab {args.vocab}) "
        "with its KV cache...")
    started = time.perf_counter()
    cached = yatdeploy.export(model, path=folder / "yat_cache" / "model.onnx", kv_cache=True, validate=False)
    record.settings["yat_cache_export"] = {"export_s": round(time.perf_counter() - started, 1),
                                           "yat_gemm_nodes": cached.yat_gemm_nodes,
                                           "yat_gemm_kinds": cached.yat_gemm_kinds,
                                           "nodes": len(cached.model.graph.node)}
    say("exporting it without the cache (dynamic seq)...")
    started = time.perf_counter()
    full = yatdeploy.export(model, ["ids:int64[batch=1,seq=16]"], folder / "yat_full" / "model.onnx", validate=False)
    record.settings["yat_no_cache_export"] = {"export_s": round(time.perf_counter() - started, 1),
                                              "yat_gemm_nodes": full.yat_gemm_nodes,
                                              "nodes": len(full.model.graph.node)}
    gpt2 = gpt2_layout = None
    if args.no_anchor:
        record.skipped.append("gpt2: --no-anchor")
    elif _version("transformers") is None:
        message = "gpt2: transformers is not installed (pip install transformers): no anchor, no ratios against it"
        record.skipped.append(message)
        print(f"skipped {message}", file=sys.stderr)
    else:
        say("exporting GPT-2 of the same shape with its KV cache (torch.onnx.export, dynamo=True)...")
        gpt2 = folder / "gpt2" / "model.onnx"
        record.settings["gpt2_export"], gpt2_layout = export_gpt2(args.layers, args.width, args.heads, args.vocab,
                                                                  args.positions, gpt2)
    genai = None
    if not (cached.path.parent / "genai_config.json").exists():
        message = "genai: the export folder has no genai_config.json (yatdeploy's export does not write one yet)"
        record.skipped.append(message)
    elif _version("onnxruntime-genai") is None:
        message = "genai: onnxruntime_genai is not installed (pip install onnxruntime-genai)"
        record.skipped.append(message)
    else:
        genai, message = cached.path.parent, None
    if genai is None:
        print(f"skipped {message}", file=sys.stderr)
    return Exports(cached.path, full.path, gpt2, cached.decoder, gpt2_layout, genai)


def _variants(exports: Exports, threads: int, backends, vocab: int, record: Record) -> list[Variant]:
    """The sessions at `threads`; one that can't run its model (a library without the kernel the export needs) is
    left out, and the record says why."""
    from yatdeploy.errors import YatDeployError

    options = backends.Options(intra_op_threads=threads, allow_spinning=False)
    wanted = [(f"yat_cache_{name.replace('-', '_')}", f"yat cache {name}", name, exports.yat_cache, True,
               exports.layout) for name in YAT_BACKENDS]
    wanted.append(("yat_no_cache", "yat no cache ort-cpu", "ort-cpu", exports.yat_full, False, None))
    if exports.gpt2 is not None:
        wanted.append(("gpt2_cache", "gpt2 cache", "ort-function", exports.gpt2, True, exports.gpt2_layout))
    found = []
    for key, label, backend, path, cached, layout in wanted:
        try:
            variant = Variant(key, label, backends.get(backend).open(path, options), cached, vocab, layout)
            variant.step_feeds(4, np.random.default_rng(0))  # a prompt and a step: does it run?
        except YatDeployError as exc:
            message = f"{label}, {threads} thread(s): {exc}"
            record.skipped.append(message)
            print(f"skipped {message}", file=sys.stderr, flush=True)
            continue
        found.append(variant)
    return found


def _measure(args, exports: Exports, record: Record, backends) -> None:
    rng = np.random.default_rng(0)
    for threads in args.threads:
        variants = _variants(exports, threads, backends, args.vocab, record)
        for context in args.contexts:
            feeds = {v.key: v.step_feeds(context, rng) for v in variants}
            work = {v.key: (lambda v=v: v.runner.inner.run(None, feeds[v.key])) for v in variants}
            via_runner = variants[0]  # what yatdeploy's Runner.run adds (numpy to OrtValues and back)
            work[f"{via_runner.key}_via_runner"] = lambda v=via_runner: v.runner.run(feeds[v.key])
            times = turns(work, args.warmup, args.steps, args.budget)
            row = {"threads": threads, "context": context, **{f"{k}_ms": _median(t) for k, t in times.items()},
                   "samples": {k: len(t) for k, t in times.items()}}
            _ratios(row, "gpt2_cache_ms")
            record.decode.append(row)
            print(f"threads {threads} context {context:>5}: " + "  ".join(
                f"{v.label} {row[v.key + '_ms']:.3f} ms" for v in variants)
                + f"  (through Runner.run: {row[via_runner.key + '_via_runner_ms']:.3f} ms)", flush=True)
        prompt = rng.integers(0, args.vocab, (1, args.prefill), dtype=np.int64)
        cached = [v for v in variants if v.cached]
        prefill_feeds = {v.key: v.prefill_feeds(prompt) for v in cached}
        times = turns({v.key: (lambda v=v: v.runner.inner.run(None, prefill_feeds[v.key])) for v in cached},
                      max(1, args.warmup // 2), max(5, args.steps // 3), args.budget)
        row = {"threads": threads, "tokens": args.prefill, **{f"{k}_ms": _median(t) for k, t in times.items()},
               "samples": {k: len(t) for k, t in times.items()}}
        _ratios(row, "gpt2_cache_ms")
        record.prefill.append(row)
        print(f"threads {threads} prefill {args.prefill}: " + "  ".join(
            f"{v.label} {row[v.key + '_ms']:.2f} ms" for v in cached), flush=True)
        if exports.genai is not None:
            record.genai.setdefault("runs", []).append(_genai(args, exports, threads, rng))
        del variants


def _ratios(row: dict, anchor: str) -> None:
    if anchor not in row:
        return
    for key in [k for k in row if k.endswith("_ms") and k != anchor and "_via_" not in k]:
        row[key[:-3] + "_vs_gpt2"] = round(row[key] / row[anchor], 3)


def _genai(args, exports: Exports, threads: int, rng: np.random.Generator) -> dict:
    """ORT GenAI's generator against our loop over a session of the same file, threads and spinning (on, as GenAI's),
    on the backend its config asks for: the library (ort-cpu) or the function (ort-function)."""
    import onnxruntime_genai as og

    from yatdeploy import backends
    from yatdeploy.errors import YatDeployError
    from yatdeploy.loadgen_lm import genai_folder, genai_generate

    folder = genai_folder(exports.genai, threads, exports.genai.parent)
    library = "custom_ops_library" in (folder / "genai_config.json").read_text()
    backend = "ort-cpu" if library else "ort-function"
    try:
        runner = backends.get(backend).open(exports.yat_cache, backends.Options(intra_op_threads=threads))
        model = og.Model(str(folder))
    except (YatDeployError, RuntimeError) as exc:
        return {"threads": threads, "loop_backend": backend, "skipped": str(exc)}
    from yatdeploy.decoding import Decoder

    loop = Decoder(runner, exports.layout)
    prompt = rng.integers(0, args.vocab, (1, GENAI_PROMPT), dtype=np.int64)
    new = args.generate
    # Our loop is fed GenAI's tokens (Decoder.generate's `forced`): the same work, where GenAI's min_length kept the
    # pad token from being chosen. Its own argmax must match GenAI's tokens at every other step.
    tokens = genai_generate(og, model, prompt, new)
    chosen: list[int] = []

    def run_loop():
        chosen[:] = loop.generate([prompt[0].tolist()], new, forced=[tokens[:-1]]).tokens[0]

    times = turns({"genai": lambda: genai_generate(og, model, prompt, new), "loop": run_loop}, 1,
                  5 if not args.quick else 2, args.budget * 3, min_samples=2)
    genai_ms, loop_ms = statistics.median(times["genai"]), statistics.median(times["loop"])
    pad = json.loads((folder / "genai_config.json").read_text())["model"].get("pad_token_id", 0)
    differ = [i for i, (a, b) in enumerate(zip(tokens, chosen)) if a != b]
    row = {"threads": threads, "prompt": GENAI_PROMPT, "new_tokens": new,
           "genai_tokens_per_s": round(new / genai_ms * 1e3, 1), "loop_tokens_per_s": round(new / loop_ms * 1e3, 1),
           "genai_vs_loop": round(genai_ms / loop_ms, 3),
           "same_tokens": len(tokens) == len(chosen) and all(chosen[i] == pad for i in differ),
           "pad_token_kept_out": len(differ), "library": library, "loop_backend": backend, "spinning": True}
    if not row["same_tokens"]:
        row["tokens"] = {"prompt": prompt[0].tolist(), "genai": tokens, "loop": chosen}
    print(f"threads {threads} generate {new}: ORT GenAI {row['genai_tokens_per_s']} tokens/s, our loop "
          f"{row['loop_tokens_per_s']} tokens/s (same tokens: {row['same_tokens']})", flush=True)
    del model, runner
    return row


def goals(record: Record, contexts: list[int]) -> list[dict]:
    """Issue 22's goals, each per Yat backend and thread count: value, limit, met (None when not measured)."""
    found = []
    low, high = min(contexts), max(contexts)
    for backend in YAT_BACKENDS:
        key = f"yat_cache_{backend.replace('-', '_')}"
        for threads in sorted({r["threads"] for r in record.decode}):
            rows = {r["context"]: r for r in record.decode if r["threads"] == threads}
            ran = f"{key}_ms" in rows[low] and f"{key}_ms" in rows[high]
            flat = rows[high][f"{key}_ms"] / rows[low][f"{key}_ms"] if ran else None
            found.append(_goal(f"decode at context {high} ≤ {GOAL_FLAT}× at {low}", backend, threads, flat, GOAL_FLAT))
            if "gpt2_cache_ms" in rows[low]:  # the same ratio of the anchor, for scale
                found[-1]["gpt2_value"] = round(rows[high]["gpt2_cache_ms"] / rows[low]["gpt2_cache_ms"], 3)
            ratios = {c: r[f"{key}_vs_gpt2"] for c, r in rows.items() if f"{key}_vs_gpt2" in r}
            worst = max(ratios, key=ratios.get) if len(ratios) == len(rows) else None
            found.append(_goal(f"decode ≤ {GOAL_VS_GPT2}× GPT-2 with cache at every context"
                               + (f" (worst: {worst})" if worst is not None else ""), backend, threads,
                               None if worst is None else ratios[worst], GOAL_VS_GPT2))
            prefill = next(r for r in record.prefill if r["threads"] == threads)
            found.append(_goal(f"prefill of {prefill['tokens']} ≤ {GOAL_PREFILL}× GPT-2's", backend, threads,
                               prefill.get(f"{key}_vs_gpt2"), GOAL_PREFILL))
    runs = [r for r in record.genai.get("runs", []) if "genai_vs_loop" in r]
    for run in runs or [None]:
        found.append(_goal(f"ORT GenAI within {GOAL_GENAI}× of our loop (time per token)",
                           run["loop_backend"] if run else "ort-cpu", run["threads"] if run else None,
                           run["genai_vs_loop"] if run else None, GOAL_GENAI))
    return found


def _goal(goal: str, backend: str, threads: int | None, value: float | None, limit: float) -> dict:
    return {"goal": goal, "backend": backend, "threads": threads,
            "value": None if value is None else round(value, 3), "limit": limit,
            "met": None if value is None else bool(value <= limit)}


def profiles(args, exports: Exports) -> dict:
    """Per-op kernel time at the largest context's decode step and at prefill, 1 thread: the Yat export on both
    backends, and GPT-2."""
    from yatdeploy.errors import YatDeployError

    rng = np.random.default_rng(1)
    context = max(args.contexts)
    prompt = rng.integers(0, args.vocab, (1, args.prefill), dtype=np.int64)
    runs = 3 if args.quick else 20
    found: dict[str, dict] = {}
    models = [(f"yat_cache_{b.replace('-', '_')}", b, exports.yat_cache, exports.layout) for b in YAT_BACKENDS]
    if exports.gpt2 is not None:
        models.append(("gpt2_cache", "ort-function", exports.gpt2, exports.gpt2_layout))
    for key, backend, path, layout in models:
        def step(runner, layout=layout):
            return Variant(key, key, runner, True, args.vocab, layout).step_feeds(context, rng)

        def prefill(runner, layout=layout):
            return Variant(key, key, runner, True, args.vocab, layout).prefill_feeds(prompt)

        for name, feeds, count in ((f"decode_{context}/{key}", step, runs),
                                   (f"prefill_{args.prefill}/{key}", prefill, max(3, runs // 4))):
            try:
                found[name] = profile_ops(backend, path, 1, feeds, count)
            except YatDeployError as exc:
                found[name] = {"backend": backend, "error": str(exc)}
    return found


# --------------------------------------------------------------------------------------------------- printing


COLUMNS = (("yat_cache_ort_cpu", "yat ort-cpu"), ("yat_cache_ort_function", "yat ort-fn"),
           ("yat_no_cache", "no cache"), ("gpt2_cache", "gpt2"))


def print_summary(record: Record) -> None:
    print("\nms per token (decode: the median step; prefill: the whole prompt); ×: against GPT-2 with its cache in "
          "the same run")
    rows = [*record.decode, *[{**r, "context": f"prefill {r['tokens']}"} for r in record.prefill]]
    print(f"{'threads':>7} {'context':>11} " + " ".join(f"{label:>11}" for _, label in COLUMNS) + "  "
          + " ".join(f"{label + ' ×':>13}" for key, label in COLUMNS if key != "gpt2_cache"))
    for row in rows:
        times = " ".join(f"{row[key + '_ms']:>11.3f}" if key + "_ms" in row else f"{'-':>11}" for key, _ in COLUMNS)
        ratios = " ".join(f"{row[key + '_vs_gpt2']:>13.2f}" if key + "_vs_gpt2" in row else f"{'-':>13}"
                          for key, _ in COLUMNS if key != "gpt2_cache")
        print(f"{row['threads']:>7} {row['context']!s:>11} {times}  {ratios}")
    for run in record.genai.get("runs", []):
        if "genai_vs_loop" in run:
            print(f"ORT GenAI, {run['threads']} thread(s): {run['genai_tokens_per_s']} tokens/s against our loop's "
                  f"{run['loop_tokens_per_s']} ({run['genai_vs_loop']}× the time per token)")
        else:
            print(f"ORT GenAI, {run['threads']} thread(s): not run: {run['skipped']}")
    for note in record.skipped:
        print(f"skipped {note}")
    print("\ngoals (issue 22)")
    for goal in record.goals:
        status = {True: "met", False: "NOT MET", None: "not measured"}[goal["met"]]
        value = "-" if goal["value"] is None else f"{goal['value']:.2f}"
        threads = "" if goal["threads"] is None else f", {goal['threads']} thread(s)"
        anchor = f" (GPT-2: {goal['gpt2_value']:.2f})" if "gpt2_value" in goal else ""
        print(f"  {status:>12}  {value:>6} (limit {goal['limit']})  {goal['goal']}{anchor}  "
              f"[{goal['backend']}{threads}]")


def print_profiles(found: dict) -> None:
    for name, profile in found.items():
        if "error" in profile:
            print(f"  {name}: {profile['error']}")
            continue
        top = ", ".join(f"{op['op']} {100 * op['share']:.0f}%" for op in profile["ops"][:6])
        print(f"  {name} ({profile['backend']}, {profile['kernel_ms_per_run']:.3f} ms of kernels a run): {top}")


if __name__ == "__main__":
    sys.exit(main())
