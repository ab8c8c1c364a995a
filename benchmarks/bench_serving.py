"""Serving benchmark: the service against in-process ONNX Runtime, and dynamic batching on vs off.

Starts `yatdeploy serve` on 127.0.0.1 twice (batching on, then off), drives it with the same load
generator as `yatdeploy bench`, and writes benchmarks/results/<date>-serving.json with the machine,
versions and commands. The load generator shares the machine's cores with the server.

    python benchmarks/bench_serving.py MODEL.onnx [--duration 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

from bench_cpu_yatgemm import _cpu  # the sibling script: one reading of /proc/cpuinfo

from yatdeploy.progress import Progress
from yatdeploy.serving.bench import format_steps, run_bench


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "yatdeploy", "serve", str(model), "--port", str(port), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--threads", default="1", help="the server's ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    name = args.model.stem
    progress = Progress()
    runs = {}
    for label, extra, concurrencies, onnx in (
        ("batching_on", ["--threads", args.threads], [1, 32], args.model),
        ("batching_off", ["--threads", args.threads, "--no-batching"], [32], None),
    ):
        port = _free_port()
        server = _serve(args.model, port, extra)
        try:
            progress.say(f"{label}: yatdeploy serve {args.model} {' '.join(extra)}")
            result = run_bench(f"http://127.0.0.1:{port}", name, concurrencies=concurrencies, rates=[],
                               seconds=args.duration, warmup=2.0, batch=1, binary=True, max_inflight=256,
                               onnx=onnx, progress=progress)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(format_steps(result.steps))
        runs[label] = {"server_args": extra, **result.to_json()}

    on = {s["concurrency"]: s for s in runs["batching_on"]["steps"]}
    off = {s["concurrency"]: s for s in runs["batching_off"]["steps"]}
    summary = {
        "batch1_server_p50_us": on[1]["p50_us"],
        "batch1_in_process_p50_us": runs["batching_on"]["in_process_p50_us"],
        "batch1_server_overhead_us": runs["batching_on"]["server_overhead_p50_us"],
        "c32_batching_on_inferences_per_s": on[32]["inferences_per_second"],
        "c32_batching_off_inferences_per_s": off[32]["inferences_per_second"],
        "c32_batching_speedup": on[32]["inferences_per_second"] / off[32]["inferences_per_second"],
        "c32_batching_on_p99_us": on[32]["p99_us"],
        "c32_batching_off_p99_us": off[32]["p99_us"],
    }
    result = {
        "date": dt.date.today().isoformat(),
        "command": "python " + shlex.join(sys.argv),
        "machine": {**_cpu(), "logical_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {d: metadata.version(d) for d in ("onnxruntime", "fastapi", "uvicorn", "numpy")},
        "summary": summary,
        "runs": runs,
    }
    out = args.out or Path(__file__).parent / "results" / f"{result['date']}-serving.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
