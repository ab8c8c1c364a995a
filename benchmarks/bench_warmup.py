"""Warmup benchmark: a model's first client request against its steady state, with and without model_warmup,
measured in the same run.

Writes a repository of two copies of one model with a noticeable first-run cost in ONNX Runtime (a stack of
convolutions, whose first run allocates and picks its kernels): "cold" (no warmup) and "warm" (config.pbtxt
model_warmup: one random sample of the request's shape). For each of `--rounds` rounds it starts `yatdeploy serve`
on 127.0.0.1 afresh, sends each model its first request over HTTP (tritonclient), then 50 more; prints the first
request's latency, the steady state's median and their ratio for each model (median over the rounds); --json FILE
writes them with the machine.

    python benchmarks/bench_warmup.py [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

CHANNELS, SIZE, LAYERS = 32, 64, 6
STEADY = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _repository(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, weights, current, channels = [], [], "x", 3
    for i in range(LAYERS):
        weights.append(numpy_helper.from_array(
            (rng.standard_normal((CHANNELS, channels, 3, 3)) / 8).astype(np.float32), f"w{i}"))
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes += [helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [out])]
        current, channels = out, CHANNELS
    value = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(
        nodes, "convs", [value("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [value("y", TensorProto.FLOAT, ["N", CHANNELS, SIZE, SIZE])], weights),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    warmup = (f'model_warmup [ {{ name: "random" batch_size: 1 inputs {{ key: "x" value: {{ data_type: TYPE_FP32 '
              f'dims: [ 3, {SIZE}, {SIZE} ] random_data: true }} }} }} ]')
    for name, extra in (("cold", ""), ("warm", warmup)):
        (folder / name / "1").mkdir(parents=True)
        onnx.save(model, str(folder / name / "1" / "model.onnx"))
        (folder / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
            f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 3, {SIZE}, {SIZE} ] }} ]\n'
            f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {CHANNELS}, {SIZE}, {SIZE} ] }} ]\n{extra}\n')
    return folder


def _serve(repo: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "yatdeploy", "serve", str(repo), "--port", str(port),
                                "--grpc-port", "0", "--threads", "1", "--log-level", "warning"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def _round(repo: Path) -> dict:
    import tritonclient.http as client

    port = _free_port()
    server = _serve(repo, port)
    try:
        connection = client.InferenceServerClient(f"127.0.0.1:{port}")
        connection.is_server_ready()  # the connection opened before anything is measured
        x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
        figures = {}
        for model in ("cold", "warm"):
            seconds = []
            for _ in range(1 + STEADY):
                given = client.InferInput("x", list(x.shape), "FP32")
                given.set_data_from_numpy(x)
                began = time.perf_counter()
                connection.infer(model, [given])
                seconds.append(time.perf_counter() - began)
            figures[model] = {"first_ms": seconds[0] * 1e3, "steady_p50_ms": float(np.median(seconds[1:])) * 1e3}
        return figures
    finally:
        server.terminate()
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers to measure (default 3)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        repo = _repository(Path(folder))
        rounds = [_round(repo) for _ in range(args.rounds)]
    results = {}
    for model in ("cold", "warm"):
        first = float(np.median([r[model]["first_ms"] for r in rounds]))
        steady = float(np.median([r[model]["steady_p50_ms"] for r in rounds]))
        results[model] = {"first_request_ms": round(first, 2), "steady_p50_ms": round(steady, 2),
                          "first_over_steady": round(first / steady, 2)}
        print(f"{model} ({'model_warmup' if model == 'warm' else 'no warmup'}): first request {first:.2f} ms, "
              f"steady p50 {steady:.2f} ms, first/steady {first / steady:.2f}")
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "model": f"{LAYERS} 3x3 convolutions of {CHANNELS} channels on {SIZE}x{SIZE}, batch 1, one thread",
              "client": "tritonclient HTTP, one request at a time", "rounds": rounds, "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
