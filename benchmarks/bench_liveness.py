"""Liveness under large requests: how long /v2/health/live takes while the server decodes, runs and encodes a large
tensor, against the same probe on the idle server measured in the same run (issue 20's goal: every probe under
100 ms during any request).

The tests (tests/servers.py: Liveness.not_blocked) hold what can't flake, that the event loop is never blocked by
the work; the slowest probe is a timing, and a timing is this script's. It serves an identity model of FP32 [-1]
(`yatdeploy serve REPOSITORY --threads 1` on 127.0.0.1) and, from one thread, sends `--requests` round trips of an
8 MB tensor (binary in, JSON out: the heaviest encode) while another thread probes liveness on a new connection every
10 ms; then probes the idle server as many times. Prints p50/p99/max of each and the ratios.

    python benchmarks/bench_liveness.py [--requests 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from served import free_port, yatdeploy_serve  # the sibling module: the server process

GOAL_S = 0.1


def _identity_repository(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    (folder / "copy" / "1").mkdir(parents=True)
    value = helper.make_tensor_value_info
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "copy",
                                                [value("x", TensorProto.FLOAT, ["N"])],
                                                [value("y", TensorProto.FLOAT, ["N"])]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "copy" / "1" / "model.onnx"))
    (folder / "copy" / "config.pbtxt").write_text(
        'name: "copy"\nmax_batch_size: 0\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n')
    return folder


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


def _probe_s(port: int) -> float:
    began = time.perf_counter()
    if _request(port, "GET", "/v2/health/live") != 200:
        raise SystemExit("liveness answered other than 200")
    return time.perf_counter() - began


def _summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"count": len(ordered), "p50_ms": 1e3 * ordered[len(ordered) // 2],
            "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max_ms": 1e3 * ordered[-1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="large round trips to probe during (default 20)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    values = np.arange(2_000_000, dtype=np.float32) / 8
    header = json.dumps({"inputs": [{"name": "x", "shape": [len(values)], "datatype": "FP32",
                                     "parameters": {"binary_data_size": values.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": False}}]}).encode()
    body, headers = header + values.tobytes(), {"Inference-Header-Content-Length": str(len(header))}
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        server = yatdeploy_serve(_identity_repository(Path(folder)), "--threads", "1", "--log-level", "warning",
                                 port=port)
        try:
            busy, request_s, done = [], [], threading.Event()

            def probe() -> None:
                while not done.is_set():
                    busy.append(_probe_s(port))
                    time.sleep(0.01)

            prober = threading.Thread(target=probe)
            prober.start()
            for _ in range(args.requests):
                began = time.perf_counter()
                if _request(port, "POST", "/v2/models/copy/infer", body, headers) != 200:
                    raise SystemExit("the large request failed")
                request_s.append(time.perf_counter() - began)
            done.set()
            prober.join()
            idle = []
            for _ in range(len(busy)):
                idle.append(_probe_s(port))
                time.sleep(0.01)
        finally:
            server.terminate()
            server.wait(timeout=30)
    figures = {"busy": _summary(busy), "idle": _summary(idle), "request": _summary(request_s)}
    ratio = figures["busy"]["max_ms"] / figures["idle"]["max_ms"]
    for name in ("idle", "busy", "request"):
        row = figures[name]
        print(f"{name:8s} n={row['count']:4d}  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
              f"max {row['max_ms']:8.2f} ms")
    met = figures["busy"]["max_ms"] < 1e3 * GOAL_S
    print(f"slowest probe while busy / slowest idle probe: {ratio:.2f}x; goal (every probe < {GOAL_S * 1e3:.0f} ms): "
          f"{'met' if met else 'missed'}")
    if args.json:
        load = os.getloadavg()
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_after": load},
            "python": platform.python_version(), "figures": figures, "busy_over_idle_max": ratio, "goal_met": met,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
