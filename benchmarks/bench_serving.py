"""Serving benchmark: the service against in-process ONNX Runtime and against KServe's own server, dynamic batching
on vs off, HTTP and gRPC.

Starts `yatdeploy serve` on 127.0.0.1 twice (batching on, then off) and, where kserve is installed (the test
extra), KServe's Python ModelServer on the same ONNX Runtime session (benchmarks/kserve_server.py: the baseline,
which has no dynamic batching); drives each over HTTP and over gRPC with the same load generator as `yatdeploy
bench` and, where `make perf-analyzer` installed it, with NVIDIA's perf_analyzer at the same concurrencies, and
writes benchmarks/results/<date>-serving.json with the machine, versions, commands and the ratios against KServe
measured in the same run. The load generators share the machine's cores with the servers.

    python benchmarks/bench_serving.py MODEL.onnx [--duration 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from bench_cpu_yatgemm import _cpu  # the sibling script: one reading of /proc/cpuinfo
from served import free_port, wait_ready  # the sibling module: the server process

from yatdeploy.loadgen import format_steps, run_bench
from yatdeploy.progress import Progress


def _serve(model: Path, port: int, grpc_port: int, extra: list[str], kserve: bool = False) -> subprocess.Popen:
    if kserve:
        command = [sys.executable, str(Path(__file__).parent / "kserve_server.py"), str(model), "--http-port",
                   str(port), "--grpc-port", str(grpc_port), *extra]
    else:
        command = [sys.executable, "-m", "yatdeploy", "serve", str(model), "--port", str(port), "--grpc-port",
                   str(grpc_port), "--log-level", "warning", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(process, port)
    return process


def _perf_analyzer():
    """tools/perf_analyzer.py's PerfAnalyzer (binary, env), or None with the reason."""
    path = Path(__file__).resolve().parents[1] / "tools" / "perf_analyzer.py"
    spec = importlib.util.spec_from_file_location("yatdeploy_tools_perf_analyzer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.find()


def _perf_analyzer_run(tool, url: str, protocol: str, model: str, concurrency: int, seconds: float,
                       extra: tuple[str, ...] = ()) -> dict:
    """perf_analyzer at one concurrency (`extra`: more of its options): its CSV row (throughput, latencies in µs) and
    the command."""
    report = Path(f"/tmp/yatdeploy-perf-analyzer-{os.getpid()}.csv")
    command = [str(tool.binary), "-m", model, "-u", url, "-i", protocol, "-f", str(report), "--concurrency-range",
               str(concurrency), "--measurement-mode", "time_windows", "--measurement-interval",
               str(int(seconds * 1000)), "--stability-percentage", "50", "--max-trials", "6", *extra]
    done = subprocess.run(command, env=tool.env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"command": shlex.join(command), "error": (done.stdout + done.stderr)[-2000:]}
    with report.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    report.unlink()
    return {"command": shlex.join(command), "inferences_per_second": float(row["Inferences/Second"]),
            **{f"p{q}_us": int(row[f"p{q} latency"]) for q in (50, 90, 95, 99)}}


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
    perf_analyzer, why_not = _perf_analyzer()
    if perf_analyzer is None:
        progress.say(f"perf_analyzer: not run ({why_not})")
    configurations = [
        ("batching_on", ["--threads", args.threads], [1, 16, 32], False),
        ("batching_off", ["--threads", args.threads, "--no-batching"], [1, 16, 32], False),
    ]
    if importlib.util.find_spec("kserve") is not None:
        configurations.append(("kserve", ["--threads", args.threads], [1, 16, 32], True))
    else:
        progress.say("kserve: not run (not installed: pip install 'yatdeploy[test]')")
    for label, extra, concurrencies, kserve in configurations:
        port, grpc_port = free_port(), free_port()
        server = _serve(args.model, port, grpc_port, extra, kserve)
        try:
            for protocol, url in (("http", f"http://127.0.0.1:{port}"), ("grpc", f"grpc://127.0.0.1:{grpc_port}")):
                what = "kserve_server.py" if kserve else "yatdeploy serve"
                progress.say(f"{label}, {protocol}: {what} {args.model} {' '.join(extra)}")
                result = run_bench(url, name, concurrencies=concurrencies, rates=[], seconds=args.duration,
                                   warmup=2.0, batch=1, binary=True, max_inflight=256,
                                   onnx=args.model if 1 in concurrencies else None, progress=progress)
                print(format_steps(result.steps))
                runs[f"{label}_{protocol}"] = {"server_args": extra, **result.to_json()}
                if perf_analyzer is not None and not kserve:  # KServe has no statistics extension, which it needs
                    target = url.split("://")[1]
                    runs[f"{label}_{protocol}"]["perf_analyzer"] = {
                        str(c): _perf_analyzer_run(perf_analyzer, target, protocol, name, c, args.duration / 2)
                        for c in concurrencies}
        finally:
            server.terminate()
            server.wait(timeout=30)

    summary = {}
    for protocol in ("http", "grpc"):
        on = {s["concurrency"]: s for s in runs[f"batching_on_{protocol}"]["steps"]}
        off = {s["concurrency"]: s for s in runs[f"batching_off_{protocol}"]["steps"]}
        summary[protocol] = {
            "batch1_server_p50_us": on[1]["p50_us"],
            "batch1_in_process_p50_us": runs[f"batching_on_{protocol}"]["in_process_p50_us"],
            "batch1_server_overhead_us": runs[f"batching_on_{protocol}"]["server_overhead_p50_us"],
            "c32_batching_on_inferences_per_s": on[32]["inferences_per_second"],
            "c32_batching_off_inferences_per_s": off[32]["inferences_per_second"],
            "c32_batching_speedup": on[32]["inferences_per_second"] / off[32]["inferences_per_second"],
            "c32_batching_on_p99_us": on[32]["p99_us"],
            "c32_batching_off_p99_us": off[32]["p99_us"],
            "c16_batching_off_inferences_per_s": off[16]["inferences_per_second"],
        }
        if f"kserve_{protocol}" in runs:
            kserve = {s["concurrency"]: s for s in runs[f"kserve_{protocol}"]["steps"]}
            for c in (1, 16, 32):
                summary[protocol][f"kserve_c{c}_inferences_per_s"] = kserve[c]["inferences_per_second"]
            summary[protocol]["kserve_c1_p50_us"] = kserve[1]["p50_us"]
            for c in (16, 32):  # the goal: unbatched >= KServe's (which doesn't batch)
                summary[protocol][f"c{c}_batching_off_vs_kserve"] = \
                    off[c]["inferences_per_second"] / kserve[c]["inferences_per_second"]
                summary[protocol][f"c{c}_batching_on_vs_kserve"] = \
                    on[c]["inferences_per_second"] / kserve[c]["inferences_per_second"]
        analyzed = runs[f"batching_on_{protocol}"].get("perf_analyzer", {})
        for concurrency, figures in analyzed.items():
            summary[protocol][f"perf_analyzer_c{concurrency}_inferences_per_s"] = figures.get("inferences_per_second")
            summary[protocol][f"perf_analyzer_c{concurrency}_p50_us"] = figures.get("p50_us")
    summary["grpc_vs_http_c32_batching_on"] = (summary["grpc"]["c32_batching_on_inferences_per_s"]
                                               / summary["http"]["c32_batching_on_inferences_per_s"])
    result = {
        "date": dt.date.today().isoformat(),
        "command": "python " + shlex.join(sys.argv),
        "machine": {**_cpu(), "logical_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {d: metadata.version(d) for d in ("onnxruntime", "fastapi", "uvicorn", "grpcio", "numpy", "kserve")
                     if importlib.util.find_spec(d) is not None},
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
