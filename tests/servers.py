"""The service as the end-to-end tests run it: `yatdeploy serve` in its own process on 127.0.0.1 (Server), and
what several test modules share about such servers: the models they serve (export_mlp, strings_repository),
the answers to compare with (reference) and the liveness probe (liveness_during).

Tests of the serving core itself, without a process or a socket, are in tests/test_serving_core.py.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")

REPO = Path(__file__).resolve().parents[1]
LIVENESS_BOUND_S = 0.1  # issue 20: liveness answers within 100 ms during any request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`yatdeploy serve` in its own process, on a free port of 127.0.0.1.

    It is waited for until /v2/health/{wait_for} answers 200: "ready" by default, "live" for a repository
    with a model that can't load. With `log`, its output goes to that file and can be read while it runs.
    """

    def __init__(self, path: Path, *args: str, wait_for: str = "ready", log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        if log is None:  # a file, never a pipe: the access log (a line per request) would fill a pipe and block it
            handle, name = tempfile.mkstemp(prefix="yatdeploy-serve-", suffix=".log")
            os.close(handle)
            log = Path(name)
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "yatdeploy", "serve", str(path), "--port", str(self.port), "--grpc-port",
             str(self.grpc_port), "--threads", "1", *args],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
        )
        out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self._rest()}")
            try:
                if urllib.request.urlopen(f"http://{self.url}/v2/health/{wait_for}", timeout=1).status == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not {wait_for} in 60 s")

    def output(self) -> str:
        """What the server printed so far (with `log`)."""
        return self.log.read_text() if self.log is not None else ""

    def _rest(self) -> str:
        return self.output() if self.log is not None else self.process.stdout.read()

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            out, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        return self.output() if self.log is not None else out

    def post(self, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://{self.url}{path}", data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def pending(self, model: str) -> int | None:
        """`model`'s requests awaiting execution, as /metrics gives them (Triton's pending-request gauge), or None
        when it shows none for the model."""
        prefix = f'nv_inference_pending_request_count{{model="{model}"'
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(prefix):
                return int(float(line.rsplit(" ", 1)[1]))
        return None


def export_mlp(folder: Path) -> Path:
    """tests.model_zoo.yat_mlp exported into `folder` by the CLI: mlp.onnx, its repository repo/mlp, and
    mlp16.onnx (float16)."""
    import torch

    from tests.model_zoo import yat_mlp
    from yatdeploy.cli import main

    torch.save(yat_mlp(), folder / "mlp.pt")
    assert main(["export", "-q", str(folder / "mlp.pt"), "-o", str(folder / "mlp.onnx"), "--input-shape", "1,16",
                 "--no-validate", "--repository", str(folder / "repo"), "--name", "mlp"]) == 0
    assert main(["export", "-q", str(folder / "mlp.pt"), "-o", str(folder / "mlp16.onnx"), "--input-shape", "1,16",
                 "--dtype", "float16", "--no-validate"]) == 0
    return folder


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The model at `path` run on `x` by ONNX Runtime in process (its input named "input"): what a server answers."""
    from yatdeploy import backends
    from yatdeploy.backends import ort

    session = ort.create_session(path, backends.get("ort-cpu"))
    return ort.run(session, {"input": x})[0]


def strings_repository(folder: Path) -> Path:
    """A repository in `folder` of the model "strings": text BYTES [N, 2] and flag BOOL [N, 2] -> same BYTES,
    number INT32 (the text parsed), negated BOOL."""
    import onnx
    from onnx import TensorProto, helper

    from yatdeploy.packaging import write_repository

    value = helper.make_tensor_value_info
    nodes = [helper.make_node("Identity", ["text"], ["same"]),
             helper.make_node("Cast", ["text"], ["number"], to=TensorProto.INT32),
             helper.make_node("Not", ["flag"], ["negated"])]
    model = helper.make_model(helper.make_graph(
        nodes, "strings", [value("text", TensorProto.STRING, ["N", 2]), value("flag", TensorProto.BOOL, ["N", 2])],
        [value("same", TensorProto.STRING, ["N", 2]), value("number", TensorProto.INT32, ["N", 2]),
         value("negated", TensorProto.BOOL, ["N", 2])]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "strings.onnx"))
    write_repository(folder / "repo", "strings", folder / "strings.onnx", op_library=None)
    return folder / "repo"


def mixed_strings(count: int) -> np.ndarray:
    """`count` strings of varied lengths and scripts, the empty string included."""
    words = ["", "a", "hé", "日本語", "x" * 17, "\x00nul\x00", "🙂"]
    return np.array([words[i % len(words)] for i in range(count)], dtype=object)


def length_prefixed(values) -> bytes:
    """BYTES elements in Triton's binary form."""
    return b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in values)


def live_status(port: int) -> int:
    """/v2/health/live's status, asked on a new connection (as a probe asks it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/v2/health/live")
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status


@dataclass(frozen=True)
class Liveness:
    """What /v2/health/live probes saw while one request ran: each probe's round trip (seconds, in order), how
    long the request took, and what it returned."""

    probe_s: list[float]
    request_s: float
    result: object

    def not_blocked(self) -> bool:
        """The event loop kept answering while the request was decoded, run and encoded: probes were answered
        throughout (3 or more), their median is under the issue's 100 ms, and no probe waited as much as a third
        of the request (a loop blocked by the work makes one probe wait for 70-98 % of it, measured with the work
        moved onto the loop). The slowest probe is measured, not bounded, by benchmarks/bench_liveness.py: a
        loaded 2-core CI machine can stall any single round trip past 100 ms for reasons not the server's."""
        ordered = sorted(self.probe_s)
        return (len(ordered) >= 3 and ordered[len(ordered) // 2] < LIVENESS_BOUND_S
                and ordered[-1] < self.request_s / 3)

    def __str__(self) -> str:
        ordered = sorted(self.probe_s)
        return (f"{len(ordered)} probes, median {ordered[len(ordered) // 2] if ordered else float('nan'):.4f} s, "
                f"slowest {max(ordered, default=float('nan')):.4f} s, request {self.request_s:.3f} s")


def liveness_during(port: int, send, tries: int = 3) -> Liveness:
    """/v2/health/live round trips (each on a new connection, as a probe makes it) seen from another thread while
    `send()` runs; `send()` is run again, up to `tries` times in all, while the probes saw the loop blocked. A
    blocked loop is blocked on every try; a scheduler stall on a loaded machine is not."""
    for _ in range(tries):
        liveness = _probed(port, send)
        if liveness.not_blocked():
            break
    return liveness


def _probed(port: int, send) -> Liveness:
    probe_s: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            began = time.perf_counter()
            assert live_status(port) == 200
            probe_s.append(time.perf_counter() - began)
            time.sleep(0.01)

    prober = threading.Thread(target=probe)
    prober.start()
    began = time.perf_counter()
    try:
        result = send()
    finally:
        request_s = time.perf_counter() - began
        done.set()
        prober.join()
    return Liveness(probe_s, request_s, result)
