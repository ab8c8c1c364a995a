"""`yatdeploy bench` against a server that is not yatdeploy's: KServe's own Python ModelServer
(benchmarks/kserve_server.py, the baseline of benchmarks/bench_serving.py), over HTTP and gRPC.

KServe answers binary requests with a chunked body (Transfer-Encoding: chunked, no Content-Length); the load
generator read only Content-Length bodies, so the chunk sizes were taken for the next status line and the run
ended in an internal error (IndexError)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.servers import REPO, free_port
from yatdeploy.cli import EXIT_OK, main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("kserve") is None, reason="kserve is not installed (the test extra)"),
]


@pytest.fixture(scope="module")
def kserve_server(exported_mlp):
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "kserve_server.py"), str(exported_mlp.onnx), "--name", "mlp",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/mlp/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"KServe's server exited: {process.stderr.read()[-2000:]}")
                time.sleep(0.2)
        else:
            pytest.fail("KServe's server did not become ready in 60 s")
        yield http_port, grpc_port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("protocol,payload", [("http", "binary"), ("http", "json"), ("grpc", "binary")])
def test_bench_measures_kserves_server_too(kserve_server, tmp_path, protocol, payload):
    http_port, grpc_port = kserve_server
    url = f"http://127.0.0.1:{http_port}" if protocol == "http" else f"grpc://127.0.0.1:{grpc_port}"
    extra = ["--json-payload"] if payload == "json" else []
    status = main(["bench", "-q", url, "--model", "mlp", "--concurrency", "1,4", "--duration", "1", "--warmup", "0.3",
                   "--out", str(tmp_path), *extra])
    assert status == EXIT_OK
    steps = json.loads((tmp_path / "bench.json").read_text())["steps"]
    assert [s["concurrency"] for s in steps] == [1, 4]
    assert all(s["errors"] == 0 and s["requests"] > 0 for s in steps), steps
