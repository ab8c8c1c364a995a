"""Warmup benchmark: a model's first client request against its steady state, with and without model_warmup,
measured in the same run, on the client and in the server's access log.

The model is what yatdeploy users serve: a Yat MLP (YatNMN 512→2048, LayerNorm, YatNMN 2048→2048, LayerNorm,
YatNMN 2048→10) exported by yatdeploy.api.export and served on ort-cpu, with the YatGemm custom-op library. (Its
CPU kernels pack a constant W when the session is created, not on the first run: what warmup removes is ONNX
Runtime's first run of each input shape, which plans and allocates that shape's memory.) The repository holds
copies of it: "cold-bN" (no warmup) and "warm-bN" (config.pbtxt model_warmup: one random sample of batch_size 1),
for each client batch N of --batches, and "probe", a tiny warmed model. For each of `--rounds` rounds it starts
`yatdeploy serve --log-level info` on 127.0.0.1 afresh (its log to a file), opens the client's connection and
sends "probe" one request (so that neither the client's first connection nor the server's first request of any
model is measured), then sends each model (in an order that alternates between rounds) its first request and
STEADY more, one at a time over HTTP (tritonclient). Each model's figures: the client's first-request latency
and steady median, and the access log's latency_us and compute_us of the first request and steady median; the
figures are the medians over the rounds, with first/steady ratios.

    python benchmarks/bench_warmup.py [--rounds 5] [--batches 1,4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from served import access_lines, free_port, yatdeploy_serve  # the sibling module: the server process

FEATURES, HIDDEN, CLASSES, MAX_BATCH = 512, 2048, 10, 8
STEADY = 50
WARMUP = ('model_warmup [ { name: "random" batch_size: 1 inputs { key: "input" value: { data_type: TYPE_FP32 '
          f'dims: [ {FEATURES} ] random_data: true }} }} }} ]')


def _yat_mlp(path: Path) -> None:
    import torch
    from nmn.torch import YatNMN
    from torch import nn

    from yatdeploy import api

    torch.manual_seed(0)
    model = nn.Sequential(YatNMN(FEATURES, HIDDEN), nn.LayerNorm(HIDDEN), YatNMN(HIDDEN, HIDDEN),
                          nn.LayerNorm(HIDDEN), YatNMN(HIDDEN, CLASSES)).eval()
    api.export(model, (1, FEATURES), path, validate=False)


def _probe(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"])], "probe",
        [value("input", TensorProto.FLOAT, ["batch", FEATURES])],
        [value("output", TensorProto.FLOAT, ["batch", FEATURES])]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _entry(folder: Path, name: str, model: Path, out_dims: int, extra: str) -> None:
    (folder / name / "1").mkdir(parents=True)
    shutil.copy(model, folder / name / "1" / "model.onnx")  # a link out of the repository is refused
    (folder / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {MAX_BATCH}\n'
        f'input [ {{ name: "input" data_type: TYPE_FP32 dims: [ {FEATURES} ] }} ]\n'
        f'output [ {{ name: "output" data_type: TYPE_FP32 dims: [ {out_dims} ] }} ]\n{extra}\n')


def _repository(folder: Path, batches: list[int]) -> Path:
    files = folder / "files"
    files.mkdir()
    _yat_mlp(files / "mlp.onnx")
    _probe(files / "probe.onnx")
    repo = folder / "repo"
    _entry(repo, "probe", files / "probe.onnx", FEATURES, WARMUP)
    for batch in batches:
        _entry(repo, f"cold-b{batch}", files / "mlp.onnx", CLASSES, "")
        _entry(repo, f"warm-b{batch}", files / "mlp.onnx", CLASSES, WARMUP)
    return repo


def _infer(connection, model: str, x: np.ndarray) -> float:
    import tritonclient.http as client

    given = client.InferInput("input", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    began = time.perf_counter()
    connection.infer(model, [given])
    return time.perf_counter() - began


def _round(repo: Path, models: list[str], log: Path) -> dict:
    import tritonclient.http as client

    port = free_port()
    server = yatdeploy_serve(repo, "--threads", "1", "--log-level", "info", port=port, log=log)
    try:
        connection = client.InferenceServerClient(f"127.0.0.1:{port}")
        rng = np.random.default_rng(1)
        _infer(connection, "probe", rng.standard_normal((1, FEATURES)).astype(np.float32))
        figures = {}
        for model in models:
            batch = int(model.rsplit("-b", 1)[1])
            x = rng.standard_normal((batch, FEATURES)).astype(np.float32)
            seconds = [_infer(connection, model, x) for _ in range(1 + STEADY)]
            figures[model] = {"client_first_ms": seconds[0] * 1e3,
                              "client_steady_ms": float(np.median(seconds[1:])) * 1e3}
    finally:
        server.terminate()
        server.wait(30)
    lines: dict[str, list[dict]] = {}  # the access log's lines by model, in order
    for line in access_lines(log):
        lines.setdefault(line["model"], []).append(line)
    for model in models:
        served = lines[model]
        assert len(served) == 1 + STEADY and all(line["status"] == 200 for line in served), served[:2]
        for key in ("latency_us", "compute_us"):
            figures[model][f"server_{key[:-3]}_first_ms"] = served[0][key] / 1e3
            figures[model][f"server_{key[:-3]}_steady_ms"] = float(np.median([s[key] for s in served[1:]])) / 1e3
    return figures


def _versions() -> dict:
    import onnxruntime
    import tritonclient

    import yatdeploy
    from yatdeploy import native

    return {"yatdeploy": getattr(yatdeploy, "__version__", "?"), "onnxruntime": onnxruntime.__version__,
            "tritonclient": getattr(tritonclient, "__version__", "?"), "custom_ops": native.build_info()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="fresh servers to measure (default 5)")
    parser.add_argument("--batches", default="1,4", help="the client's batch sizes, one cold and one warm model "
                                                         "each (default 1,4; the warmup sample is batch 1)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    models = [f"{kind}-b{b}" for b in batches for kind in ("cold", "warm")]
    with tempfile.TemporaryDirectory() as folder:
        repo = _repository(Path(folder), batches)
        rounds = [_round(repo, models if r % 2 == 0 else models[::-1], Path(folder) / f"server-{r}.log")
                  for r in range(args.rounds)]
    results = {}
    for model in models:
        result = {}
        for side, key in (("client", "client"), ("server latency", "server_latency"),
                          ("server compute", "server_compute")):
            first = float(np.median([r[model][f"{key}_first_ms"] for r in rounds]))
            steady = float(np.median([r[model][f"{key}_steady_ms"] for r in rounds]))
            ratio = float(np.median([r[model][f"{key}_first_ms"] / r[model][f"{key}_steady_ms"] for r in rounds]))
            result[key] = {"first_ms": round(first, 3), "steady_p50_ms": round(steady, 3),
                           "first_over_steady": round(ratio, 2)}
            print(f"{model:8} {side:15}: first {first:7.3f} ms, steady p50 {steady:7.3f} ms, "
                  f"first/steady {ratio:5.2f}")
        results[model] = result
    report = {"date": date.today().isoformat(),
              "command": "python benchmarks/bench_warmup.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version(), "load_before": os.getloadavg()},
              "versions": _versions(),
              "model": f"Yat MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES} (3 YatNMN, 2 LayerNorm) exported by yatdeploy, "
                       f"ort-cpu with the YatGemm library, --threads 1, max_batch_size {MAX_BATCH}; warm-*: "
                       "model_warmup of one random batch-1 sample",
              "client": "tritonclient HTTP, one request at a time, the connection opened and a request to a warm "
                        "'probe' model sent before anything is measured; ratios are medians over rounds of "
                        "each round's first/steady",
              "rounds": rounds, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
