"""Response-cache benchmark: the latency of a cache hit against a miss and against the same model without the cache,
over HTTP and gRPC, at concurrency 1, measured in the same run on the same server.

Writes a repository of two copies of one model (x FP32 [N, 1024] through 4 dense layers of 1024, a few ms on one core):
"cached" (config.pbtxt `response_cache { enable: true }`) and "plain" (no cache), starts `yatdeploy serve
--cache-config local,size=64MB` on 127.0.0.1, and drives it with tritonclient in a loop, one request at a time:
hits (the same request again and again to "cached"), misses (a new request each time to "cached": the look-up,
the run and the insertion) and the baseline (the same request again and again to "plain"). Prints the p50/p99 in
µs and the ratios hit/baseline and miss/baseline, beside the server's round trip with no inference (liveness on the
same client: the floor a hit can approach); --json FILE writes them with the machine.

Where `make perf-analyzer` installed NVIDIA's perf_analyzer, it measures the issue's figure too: perf_analyzer at
concurrency 1 sends the same generated input every time (its default data, made once), so every request but the first
to "cached" is a hit; against "plain" the same. Triton's published figure for an HTTP cache hit is p50 256 µs, on
other hardware: the ratios to the baseline and to the floor are the comparable numbers.

    python benchmarks/bench_response_cache.py [--requests 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from bench_serving import _perf_analyzer, _perf_analyzer_run  # the sibling script: perf_analyzer found and run once
from served import free_port, yatdeploy_serve  # the sibling module: the server process

WIDTH = 1024
LAYERS = 4


def _repository(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, current = [], [], "x"
    for i in range(LAYERS):
        weights.append(numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / 16).astype(np.float32), f"w{i}"))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [out])]
        current = out
    value = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(nodes, "dense", [value("x", TensorProto.FLOAT, ["N", WIDTH])],
                                                [value("y", TensorProto.FLOAT, ["N", WIDTH])], weights),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for name, extra in (("cached", "response_cache { enable: true }"), ("plain", "")):
        (folder / name / "1").mkdir(parents=True)
        onnx.save(model, str(folder / name / "1" / "model.onnx"))
        (folder / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
            f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n'
            f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]\n{extra}\n')
    return folder


def _latencies(client, module, model: str, requests: int, vary: bool) -> list[float]:
    rng = np.random.default_rng(1)
    fixed = rng.standard_normal((1, WIDTH)).astype(np.float32)
    seconds = []
    for i in range(requests + requests // 10):  # the first tenth warms up, unmeasured
        x = rng.standard_normal((1, WIDTH)).astype(np.float32) if vary else fixed
        given = module.InferInput("x", [1, WIDTH], "FP32")
        given.set_data_from_numpy(x)
        began = time.perf_counter()
        client.infer(model, [given])
        if i >= requests // 10:
            seconds.append(time.perf_counter() - began)
    return seconds


def _liveness(client, requests: int) -> list[float]:
    """The server's round trip with no inference at all (is_server_live on the same client): the floor a hit can
    approach, whatever the cache does."""
    seconds = []
    for i in range(requests + requests // 10):
        began = time.perf_counter()
        client.is_server_live()
        if i >= requests // 10:
            seconds.append(time.perf_counter() - began)
    return seconds


def _summary(seconds: list[float]) -> dict:
    us = np.array(seconds) * 1e6
    return {"p50_us": round(float(np.percentile(us, 50)), 1), "p99_us": round(float(np.percentile(us, 99)), 1),
            "requests": len(us)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per case (default 2000)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    port, grpc_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = yatdeploy_serve(_repository(Path(folder)), "--threads", "1", "--log-level", "warning",
                                 "--cache-config", f"local,size={64 << 20}", port=port, grpc_port=grpc_port)
        try:
            results: dict = {}
            for protocol, module, url in (("http", http_client, f"127.0.0.1:{port}"),
                                          ("grpc", grpc_client, f"127.0.0.1:{grpc_port}")):
                client = module.InferenceServerClient(url)
                cases = {"hit": _summary(_latencies(client, module, "cached", args.requests, vary=False)),
                         "miss": _summary(_latencies(client, module, "cached", args.requests, vary=True)),
                         "baseline_no_cache": _summary(_latencies(client, module, "plain", args.requests, vary=False)),
                         "floor_liveness": _summary(_liveness(client, args.requests))}
                base = cases["baseline_no_cache"]["p50_us"]
                cases["hit_over_floor_p50"] = round(cases["hit"]["p50_us"] / cases["floor_liveness"]["p50_us"], 3)
                cases["hit_over_baseline_p50"] = round(cases["hit"]["p50_us"] / base, 3)
                cases["miss_over_baseline_p50"] = round(cases["miss"]["p50_us"] / base, 3)
                results[protocol] = cases
                print(f"{protocol}: hit p50 {cases['hit']['p50_us']} µs (p99 {cases['hit']['p99_us']}), miss p50 "
                      f"{cases['miss']['p50_us']} µs, no cache p50 {base} µs: hit/baseline "
                      f"{cases['hit_over_baseline_p50']}, miss/baseline {cases['miss_over_baseline_p50']}; liveness round trip "
                      f"p50 {cases['floor_liveness']['p50_us']} µs: hit/floor {cases['hit_over_floor_p50']}")
            tool, reason = _perf_analyzer()
            for protocol, url in (("http", f"127.0.0.1:{port}"), ("grpc", f"127.0.0.1:{grpc_port}")):
                if tool is None:
                    results[protocol]["perf_analyzer"] = {"skipped": reason}
                    continue
                measured = {model: _perf_analyzer_run(tool, url, protocol, model, 1, 3.0)
                            for model in ("cached", "plain")}
                if all("p50_us" in row for row in measured.values()):
                    measured["hit_over_baseline_p50"] = round(measured["cached"]["p50_us"] /
                                                              measured["plain"]["p50_us"], 3)
                results[protocol]["perf_analyzer"] = measured
                print(f"{protocol} perf_analyzer: cached p50 {measured['cached'].get('p50_us')} µs, plain p50 "
                      f"{measured['plain'].get('p50_us')} µs")
            stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/cached/stats").read())
            inference = stats["model_stats"][0]["inference_stats"]
            results["server_cache_counts"] = {"cache_hit": inference["cache_hit"]["count"],
                                              "cache_miss": inference["cache_miss"]["count"]}
        finally:
            server.terminate()
            server.wait(30)
    from importlib import metadata

    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "loadavg_after": os.getloadavg()},
              "versions": {name: metadata.version(name) for name in ("onnxruntime", "tritonclient", "uvicorn",
                                                                     "fastapi", "grpcio")},
              "model": f"{LAYERS} dense layers of {WIDTH} (MatMul+Tanh), batch 1, one intra-op thread",
              "client": "tritonclient in a loop, concurrency 1", "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
