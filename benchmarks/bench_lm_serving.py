"""LM serving benchmark (issue 23): a Yat GPT exported with its KV cache, served by `yatdeploy serve` on 127.0.0.1,
driven by `yatdeploy bench --lm` (streamed /v1/completions at 1/8/32 streams, prompts of 16/64/128 tokens ×
max_tokens 16/64/128, ignore_eos, temperature 0) beside the in-process floor of the same export (yatdeploy's loop and
ORT GenAI at the server's threads); the issue's goals checked, and where the time goes:

  server threads   CPU seconds of each of the server's threads per step (/proc: the event loop that encodes and
                   sends the events, the generation engine's thread that runs ONNX Runtime) and of this client
  engine alone     the same closed loop on serving.generation's engine in this process, without HTTP: what the
                   engine's scheduling (prefills between steps, the batched cache) gives at each concurrency
  engine parts     in the engine alone, the time per turn of its parts: the batched decode step, the prefills of
                   joining prompts, choosing and emitting tokens, the cache's joins and selects
  batched step     decoding.Decoder's step at batch 1/8/32 over prompts of the mix left-padded to the longest:
                   the engine's step as the batch grows; ONNX Runtime's per-op profile of it at batch 1 and 8
  paired           one stream served for a few seconds, then the floor, three times: the 1-stream goals from
                   figures taken seconds apart (the machine's load alike for both)

Writes the bench's JSON with these added (--json) and its HTML report (--html). The load generator, the floor and the
engine alone share the machine's cores with the server, and other work may run beside it: the JSON has the load.

    python benchmarks/bench_lm_serving.py [--duration 10] [--threads 1] [--json FILE] [--html FILE] [--note TEXT]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere in the checkout
    sys.path.insert(0, str(ROOT))

from bench_lm import _cpu, _git, _version, build_yat_gpt  # noqa: E402  (the sibling script: the model, the record)
from served import free_port, yatdeploy_serve  # noqa: E402  (the sibling module: the server process)

from yatdeploy.progress import Progress  # noqa: E402

# Issue 23's goals.
GOAL_TPOT_OVER_STEP_MS = 0.5  # served TPOT p50 at 1 stream ≤ the in-process step + 0.5 ms
GOAL_SCALING = 4.0  # at 8 streams, tokens/s ≥ 4 × one stream's
GOAL_TPOT_RATIO = 2.0  # at 8 streams, TPOT p50 ≤ 2 × one stream's
GOAL_TTFT_RATIO, GOAL_TTFT_PLUS_MS = 1.2, 1.0  # TTFT of a 128-token prompt ≤ 1.2 × the prefill + 1 ms
PAIR_SECONDS = 4.0  # each pair: 1 stream served this long, then one in-process pass over the mix


def _threads_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process `pid`, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        found[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def _machine_busy() -> float:
    """CPU seconds every core of the machine has been busy (not idle, not waiting for I/O) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class StepProfile(Progress):
    """Progress that also records, over each step, the CPU seconds of the server's threads (its main thread runs
    the event loop; the busiest other one is the generation engine's, in which ONNX Runtime runs at these
    threads), of this process (the load generator) and of everything else on the machine."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.steps: list[dict] = []

    @contextmanager
    def step(self, what: str):
        before, mine, busy = _threads_cpu(self.pid), resource.getrusage(resource.RUSAGE_SELF), _machine_busy()
        started = time.perf_counter()
        with super().step(what):
            yield
        wall = time.perf_counter() - started
        after, done = _threads_cpu(self.pid), resource.getrusage(resource.RUSAGE_SELF)
        used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
        loop = used.pop(self.pid, 0.0)
        engine = max(used.values(), default=0.0)
        client = done.ru_utime + done.ru_stime - mine.ru_utime - mine.ru_stime
        machine = _machine_busy() - busy
        self.steps.append({
            "step": what, "wall_s": round(wall, 2), "server_event_loop_cpu_s": round(loop, 2),
            "server_engine_thread_cpu_s": round(engine, 2),
            "server_other_threads_cpu_s": round(sum(used.values()) - engine, 2), "client_cpu_s": round(client, 2),
            "machine_busy_cpu_s": round(machine, 2),
            "others_on_the_machine_cpu_s": round(machine - loop - sum(used.values()) - client, 2),
            "cores": len(os.sched_getaffinity(0))})


# The engine's parts, timed in the engine alone: (owner module, class, method, label).
ENGINE_PARTS = [("yatdeploy.serving.generation", "GenerationEngine", "_turn", "turn (all of it)"),
                ("yatdeploy.decoding", "Decoder", "run_step", "decode step (ONNX Runtime run, batched)"),
                ("yatdeploy.decoding", "Decoder", "run_prefill", "prefill (ONNX Runtime run of the joining prompts)"),
                ("yatdeploy.serving.generation", "GenerationEngine", "_choose", "choose and emit the tokens (Python)"),
                ("yatdeploy.decoding", "Cache", "joined", "cache join (prompts join the batch)"),
                ("yatdeploy.decoding", "Cache", "select", "cache select (ended sequences leave)")]


@contextmanager
def timed_parts():
    """ENGINE_PARTS wrapped with timers while inside: {label: [seconds, calls]}."""
    import importlib

    spent: dict[str, list] = {label: [0.0, 0] for *_, label in ENGINE_PARTS}
    saved = []
    for module, owner, name, label in ENGINE_PARTS:
        cls = getattr(importlib.import_module(module), owner)
        original = getattr(cls, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[_label][0] += time.perf_counter() - started
                spent[_label][1] += 1

        saved.append((cls, name, original))
        setattr(cls, name, timed)
    try:
        yield spent
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def engine_alone(export: Path, threads: int, concurrencies: list[int], mix, seconds: float, warmup: float) -> list:
    """The bench's closed loop on serving.generation's engine in this process (no HTTP), the same accounting
    (loadgen_lm's LmStep): each step's summary, with the time of the engine's parts (ENGINE_PARTS) per turn."""
    from yatdeploy import backends
    from yatdeploy.decoding import Decoder
    from yatdeploy.loadgen import SAMPLE_INT_HIGH
    from yatdeploy.loadgen_lm import Answer, LmStep
    from yatdeploy.serving.generation import GenerationEngine, SamplingParams

    decoder = Decoder.open(export, backends.default().name,
                           backends.Options(intra_op_threads=threads, allow_spinning=False))
    engine = GenerationEngine(decoder, name="bench")
    rng = np.random.default_rng(1)

    async def closed_loop(concurrency: int) -> LmStep:
        step = LmStep(concurrency)
        kinds = itertools.cycle([mix[i] for i in rng.permutation(len(mix))])
        arrivals: list[tuple[float, float]] = []
        measure_from = time.perf_counter() + warmup
        stop = measure_from + seconds

        async def client() -> None:
            while (now := time.perf_counter()) < stop:
                kind = next(kinds)
                answer = Answer(sent=time.perf_counter())
                stream = engine.submit(rng.integers(0, SAMPLE_INT_HIGH, kind.prompt_tokens).tolist(),
                                       SamplingParams(max_tokens=kind.max_tokens, temperature=0.0, ignore_eos=True))
                async for _ in stream:
                    answer.chunks.append(time.perf_counter())
                answer.done = True
                arrivals.extend(answer.arrivals())
                if now >= measure_from:
                    step.record(kind, answer)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        step.seconds = seconds
        step.output_tokens = sum(n for at, n in arrivals if measure_from <= at < stop)
        return step

    rows = []
    try:
        for concurrency in concurrencies:
            with timed_parts() as spent:
                row = asyncio.run(closed_loop(concurrency)).summary()
            turns = spent["turn (all of it)"]
            row["parts"] = {label: {"s": round(t, 3), "calls": n, "ms_per_turn": round(t / turns[1] * 1e3, 4),
                                    "share_of_turns": round(t / turns[0], 3)}
                            for label, (t, n) in spent.items() if n}
            rows.append(row)
    finally:
        engine.stop()
    return rows


def op_profiles(export: Path, threads: int, batches: list[int], prompt_tokens: list[int]) -> dict:
    """ONNX Runtime's per-op kernel time (benchmarks/bench_lm.py's profiler) of one decode step at each batch, its
    prompts the mix's lengths in turn left-padded to the longest, as the engine's batch holds them."""
    from bench_lm import profile_ops

    from yatdeploy.decoder import ATTENTION_MASK, INPUT_IDS, POSITION_IDS, layout_of
    from yatdeploy.decoding import Decoder
    from yatdeploy.inputs import file_metadata

    layout = layout_of(file_metadata(export))
    found = {}
    for batch in batches:
        def feeds(runner, batch=batch):
            rng = np.random.default_rng(3)
            lengths = [prompt_tokens[i % len(prompt_tokens)] + 32 for i in range(batch)]
            logits, cache = Decoder(runner, layout).run_prefill([rng.integers(0, 10, n).tolist() for n in lengths])
            values = {INPUT_IDS: np.argmax(logits, axis=-1).astype(np.int64)[:, None],
                      ATTENTION_MASK: np.concatenate([cache.attention_mask, np.ones((batch, 1), np.int64)], axis=1)}
            if layout.position_ids:
                values[POSITION_IDS] = cache.next_positions()[:, None]
            return {**values, **dict(zip(layout.past_names(), cache.past))}

        profile = profile_ops("ort-cpu", export, threads, feeds, 20)
        found[f"batch {batch}"] = {**profile, "ops": profile["ops"][:8]}
    return found


def batched_steps(export: Path, threads: int, batches: list[int], prompt_tokens: list[int], steps: int = 48) -> list:
    """decoding.Decoder's decode step at each batch: prompts of the mix's lengths in turn, left-padded to the longest
    (as the engine's cache holds them), `steps` steps after the prefill; the median step."""
    from yatdeploy import backends
    from yatdeploy.decoding import Decoder

    decoder = Decoder.open(export, backends.default().name,
                           backends.Options(intra_op_threads=threads, allow_spinning=False))
    rng = np.random.default_rng(2)
    rows = []
    for batch in batches:
        prompts = [rng.integers(0, 10, prompt_tokens[i % len(prompt_tokens)]).tolist() for i in range(batch)]
        logits, cache = decoder.run_prefill(prompts)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            logits, cache = decoder.run_step(cache, np.argmax(logits, axis=-1))
            times.append((time.perf_counter() - started) * 1e3)
        median = float(np.median(times[4:]))
        rows.append({"batch": batch, "context_from": cache.length - steps, "step_ms": round(median, 4),
                     "per_token_ms": round(median / batch, 4)})
    return rows


def _pair(served: dict, floor: dict) -> dict:
    """One stream served and the in-process floor measured right after it: the 1-stream goals' figures, taken
    seconds apart so that the machine's load is alike for both."""
    loop = floor["loop"]
    return {"tpot_p50_ms": served["tpot_p50_ms"], "loop_step_p50_ms": loop["step_p50_ms"],
            "genai_step_p50_ms": floor["genai"].get("step_p50_ms"),
            "tpot_over_step_ms": round(served["tpot_p50_ms"] - loop["step_p50_ms"], 4),
            "ttft_128_p50_ms": served["ttft_by_prompt"].get("128", {}).get("p50_ms"),
            "loop_prefill_128_ms": loop["prefill_ms"].get("128"), "errors": served["errors"]}


def goals(report: dict) -> list[dict]:
    steps = {s["concurrency"]: s for s in report["steps"]}
    loop, genai = report["floor"]["loop"], report["floor"]["genai"]
    one, eight = steps.get(1), steps.get(8)
    found = []

    def goal(text: str, value: float | None, limit: float | None, **extra) -> None:
        found.append({"goal": text, "value": None if value is None else round(value, 4),
                      "limit": None if limit is None else round(limit, 4),
                      "met": None if value is None or limit is None else bool(value <= limit), **extra})

    if one is not None:
        goal(f"served TPOT p50 at 1 stream ≤ in-process step + {GOAL_TPOT_OVER_STEP_MS} ms (ms)",
             one["tpot_p50_ms"], loop["step_p50_ms"] + GOAL_TPOT_OVER_STEP_MS, loop_step_p50_ms=loop["step_p50_ms"],
             genai_step_p50_ms=genai.get("step_p50_ms"))
        ttft = one["ttft_by_prompt"].get("128", {}).get("p50_ms")
        prefill = loop["prefill_ms"].get("128")
        goal(f"TTFT p50 of a 128-token prompt at 1 stream ≤ {GOAL_TTFT_RATIO} × in-process prefill + "
             f"{GOAL_TTFT_PLUS_MS} ms (ms)", ttft,
             None if prefill is None else GOAL_TTFT_RATIO * prefill + GOAL_TTFT_PLUS_MS, loop_prefill_128_ms=prefill,
             genai_prefill_128_ms=genai.get("prefill_ms", {}).get("128"))
    pairs = report.get("paired_1_stream") or []
    if pairs:
        over = float(np.median([p["tpot_over_step_ms"] for p in pairs]))
        goal(f"paired (median of {len(pairs)}): served TPOT p50 at 1 stream − in-process step ≤ "
             f"{GOAL_TPOT_OVER_STEP_MS} ms (ms)", over, GOAL_TPOT_OVER_STEP_MS)
        ttfts = [p for p in pairs if p["ttft_128_p50_ms"] is not None and p["loop_prefill_128_ms"]]
        if ttfts:
            excess = float(np.median([p["ttft_128_p50_ms"] - GOAL_TTFT_RATIO * p["loop_prefill_128_ms"]
                                      for p in ttfts]))
            goal(f"paired (median of {len(ttfts)}): TTFT p50 of a 128-token prompt − {GOAL_TTFT_RATIO} × in-process "
                 f"prefill ≤ {GOAL_TTFT_PLUS_MS} ms (ms)", excess, GOAL_TTFT_PLUS_MS)
    if one is not None and eight is not None:
        scaling = eight["tokens_per_second"] / one["tokens_per_second"] if one["tokens_per_second"] else None
        found.append({"goal": f"tokens/s at 8 streams ≥ {GOAL_SCALING} × at 1 stream (ratio)",
                      "value": None if scaling is None else round(scaling, 3), "limit": GOAL_SCALING,
                      "met": None if scaling is None else bool(scaling >= GOAL_SCALING)})
        goal(f"TPOT p50 at 8 streams ≤ {GOAL_TPOT_RATIO} × at 1 stream (ratio)",
             eight["tpot_p50_ms"] / one["tpot_p50_ms"], GOAL_TPOT_RATIO)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per step (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each step (default 2)")
    parser.add_argument("--threads", type=int, help="the server's intra-op threads (default: serve's)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=3, help="paired 1-stream/in-process measurements (default 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip the engine alone and the batched steps")
    parser.add_argument("--note", default="", help="a line about the machine or the run, kept in the JSON")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--html", type=Path, help="write the bench's HTML report here")
    parser.add_argument("--export-to", type=Path, help=argparse.SUPPRESS)  # the export's own process
    args = parser.parse_args(argv)
    if args.export_to is not None:
        return _export(args)

    import yatdeploy
    from yatdeploy.loadgen_lm import format_lm_steps, measure_floor
    from yatdeploy.serving.server import ServeSettings

    started_at = dt.datetime.now(dt.timezone.utc)
    load_before = os.getloadavg()
    threads = args.threads or ServeSettings().intra_op_threads
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="bench-lm-serving-"))
    server = None
    try:
        export = folder / "gpt" / "model.onnx"
        print(f"exporting the Yat GPT ({args.layers} layers, width {args.width}, {args.heads} heads, vocab "
              f"{args.vocab}, context {args.positions}) with its KV cache...", flush=True)
        # In a process of its own: torch stays out of this one, which measures (the floor, the engine alone).
        shape = [f"--{name}={getattr(args, name)}" for name in ("layers", "width", "heads", "vocab", "positions")]
        subprocess.run([sys.executable, __file__, "--export-to", str(export), *shape], check=True)
        port = free_port()
        server = yatdeploy_serve(export, "--log-level", "warning", "--threads", str(threads), port=port)
        profile = StepProfile(server.pid)
        result = yatdeploy.bench(f"http://127.0.0.1:{port}", lm=True, concurrencies=concurrencies,
                                 duration=args.duration, warmup=args.warmup, lm_export=export, lm_threads=threads,
                                 out=folder / "report", progress=profile)
        report = result.to_json()
        pairs = []
        for i in range(args.pairs):
            with profile.step(f"pair {i + 1}/{args.pairs}: 1 stream served for {PAIR_SECONDS:g} s, then in-process"):
                one = yatdeploy.bench(f"http://127.0.0.1:{port}", lm=True, concurrencies=[1], duration=PAIR_SECONDS,
                                      warmup=0.5)
                floor = measure_floor(export, result.mix, threads, rounds=1, seed=10 + i).to_json()
            pairs.append(_pair(one.to_json()["steps"][0], floor))
        report["paired_1_stream"] = pairs
        server.terminate()
        server.wait(timeout=30)
        print(format_lm_steps(result), flush=True)
        for row, step in zip(profile.steps, report["steps"]):  # the served steps (the floor's is the last row)
            tokens = step["tokens_per_second"] * row["wall_s"]  # the warm-up at the step's rate too
            row["engine_thread_busy"] = round(row["server_engine_thread_cpu_s"] / row["wall_s"], 3)
            row["engine_cpu_ms_per_token"] = round(row["server_engine_thread_cpu_s"] / tokens * 1e3, 4) if tokens \
                else None
        profiles: dict = {"steps": profile.steps}
        if not args.no_profile:
            print("the engine alone (no HTTP) at the same concurrencies...", flush=True)
            profiles["engine_alone"] = engine_alone(export, threads, concurrencies, result.mix, args.duration,
                                                    args.warmup)
            prompt_lengths = sorted({r.prompt_tokens for r in result.mix})
            profiles["batched_step"] = batched_steps(export, threads, concurrencies, prompt_lengths)
            profiles["ops"] = op_profiles(export, threads, [1, 8], prompt_lengths)
        report["goals"] = goals(report)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        html = folder / "report" / "bench.html"
        if args.html and html.exists():
            args.html.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(html, args.html)
        shutil.rmtree(folder, ignore_errors=True)

    record = {
        "date": started_at.isoformat(timespec="seconds"),
        "seconds": round((dt.datetime.now(dt.timezone.utc) - started_at).total_seconds(), 1),
        "command": "python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "server_command": "yatdeploy serve MODEL.onnx --grpc-port 0 --log-level warning --threads "
                          f"{threads} (a subprocess on 127.0.0.1)",
        "commit": _git("rev-parse", "HEAD"),
        "tree_changed": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "machine": {**_cpu(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()], "note": args.note},
        "versions": {name: _version(name) for name in ("onnxruntime", "onnxruntime-genai", "fastapi", "uvicorn",
                                                        "numpy", "torch", "nmn", "yatdeploy")},
        "model": {"layers": args.layers, "width": args.width, "heads": args.heads, "vocab": args.vocab,
                  "context": args.positions, "weights": "random (bench_lm.build_yat_gpt)", "dtype": "float32"},
        **report,
        "profile": profiles,
    }
    print("\ngoals (issue 23)")
    for goal in record["goals"]:
        status = {True: "met", False: "NOT MET", None: "not measured"}[goal["met"]]
        print(f"  {status:>12}  {goal['value']} (limit {goal['limit']})  {goal['goal']}")
    for pair in record.get("paired_1_stream", []):
        print(f"  paired: served TPOT p50 {pair['tpot_p50_ms']} ms vs the loop's step {pair['loop_step_p50_ms']} ms "
              f"(GenAI {pair['genai_step_p50_ms']}); TTFT p50 of 128 tokens {pair['ttft_128_p50_ms']} ms vs the "
              f"loop's prefill {pair['loop_prefill_128_ms']} ms")
    for row in profiles.get("engine_alone", []):
        print(f"  engine alone, {row['concurrency']} stream(s): {row['tokens_per_second']} tokens/s, TPOT p50 "
              f"{row['tpot_p50_ms']} ms, TTFT p50 {row['ttft_p50_ms']} ms")
    for row in profiles.get("engine_alone", []):
        print(f"  engine alone, {row['concurrency']} stream(s), per turn: " + ", ".join(
            f"{label} {part['ms_per_turn']:.3f} ms" for label, part in row["parts"].items()))
    for name, profile in profiles.get("ops", {}).items():
        print(f"  ONNX Runtime, a decode step at {name}: {profile['kernel_ms_per_run']:.3f} ms of kernels: " + ", ".join(
            f"{op['op']} {100 * op['share']:.0f} %" for op in profile["ops"][:5]))
    for row in profiles.get("batched_step", []):
        print(f"  decode step at batch {row['batch']}: {row['step_ms']} ms ({row['per_token_ms']} ms per token)")
    for row in profiles["steps"]:
        print(f"  {row['step']} ({row['wall_s']} s, {row['cores']} cores): CPU s: server event loop "
              f"{row['server_event_loop_cpu_s']}, engine thread {row['server_engine_thread_cpu_s']}, client "
              f"{row['client_cpu_s']}, others on the machine {row['others_on_the_machine_cpu_s']}"
              + (f"; the engine thread ran {100 * row['engine_thread_busy']:.0f} % of the time, "
                 f"{row['engine_cpu_ms_per_token']} ms of CPU per token" if "engine_thread_busy" in row else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwritten to {args.json}" + (f" and {args.html}" if args.html else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    import yatdeploy

    torch.set_num_threads(1)
    model = build_yat_gpt(args.layers, args.width, args.heads, args.vocab, args.positions)
    yatdeploy.export(model, path=args.export_to, kv_cache=True, validate=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
