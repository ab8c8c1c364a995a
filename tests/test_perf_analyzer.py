"""NVIDIA's perf_analyzer, the real binary (tritonclient 2.48.0 wheel), completes runs against `yatdeploy serve`.

perf_analyzer reads the model's metadata and /config, sends inferences, and reads /stats before and after every
measurement window: it aborts unless the statistics carry every field Triton's do with matching counts. The binary
is put into .venv/tools/perf_analyzer by `make perf-analyzer` (tools/perf_analyzer.py); without it these tests skip.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")

from tests.servers import Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _load_tool():
    """tools/perf_analyzer.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("yatdeploy_tools_perf_analyzer", REPO / "tools" / "perf_analyzer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


perf_analyzer = _load_tool()

# The protocols perf_analyzer is run over (its -i value); the `target` fixture points -u at Server.url or grpc_url.
PROTOCOLS = [
    pytest.param("http", id="http"),
    pytest.param("grpc", id="grpc"),
]

# Settings that keep each run short on a small, noisy machine: 1 s windows, and a stability criterion so loose
# that the first three windows of a concurrency level count as stable (perf_analyzer would otherwise keep measuring
# and, after --max-trials windows, give up with an error).
QUICK = ["--measurement-mode", "time_windows", "--measurement-interval", "1000", "--stability-percentage", "1000",
         "--max-trials", "6"]


@pytest.fixture(scope="module")
def tool():
    found, reason = perf_analyzer.find()
    if found is None:
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def model(exported_mlp) -> Path:
    """The session's mlp test model (served as "mlp": input "input" [-1, 16] FP32, output "output" [-1, 5])."""
    return exported_mlp.onnx


@dataclass
class Target:
    server: Server
    protocol: str  # perf_analyzer's -i
    url: str  # perf_analyzer's -u

    def counts(self) -> tuple[int, int]:
        """The server's (successful requests, inferences) for mlp, from /v2/models/mlp/stats."""
        status, body = self.server.get("/v2/models/mlp/stats")
        assert status == 200, body
        stats = json.loads(body)["model_stats"][0]
        return stats["inference_stats"]["success"]["count"], stats["inference_count"]


@pytest.fixture(scope="module", params=PROTOCOLS)
def target(request, tool, model):
    protocol = request.param
    server = Server(model, "--log-level", "warning")
    yield Target(server, protocol, server.url if protocol == "http" else server.grpc_url)
    server.stop()


@dataclass
class Run:
    output: str
    rows: list[dict[str, str]]  # the -f CSV report, a row per concurrency
    requests: int  # the client requests perf_analyzer counted in its reported windows, all levels together


def run(tool, target: Target, tmp_path: Path, *args: str) -> Run:
    """Run perf_analyzer against `target` with `args`; assert it succeeded and return its report."""
    report = tmp_path / "report.csv"
    command = [str(tool.binary), "-m", "mlp", "-u", target.url, "-i", target.protocol, "-f", str(report), *QUICK,
               *args]
    try:
        result = subprocess.run(command, env=tool.env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"perf_analyzer ran past 120 s: {' '.join(command)}\n{exc.stdout}\n{exc.stderr}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} exited with {result.returncode}:\n{output}\n" \
                                   f"server log:\n{target.server.output()[-3000:]}"
    with report.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    # "Request count" under "Client:" for every level ("Successful request count" is the server's figure)
    requests = sum(int(n) for n in re.findall(r"^\s*Request count: (\d+)", result.stdout, flags=re.MULTILINE))
    return Run(output, rows, requests)


def check_rows(done: Run, concurrencies: list[int]) -> None:
    assert [int(row["Concurrency"]) for row in done.rows] == concurrencies, done.output
    for row in done.rows:
        assert float(row["Inferences/Second"]) > 0, row
        assert int(row["p50 latency"]) > 0 and int(row["p99 latency"]) >= int(row["p50 latency"]), row


def test_a_concurrency_sweep_completes_and_the_server_counts_it(tool, target, tmp_path):
    """The default perf_analyzer run: binary tensors, no --shape (the input's only variable dim is the batch)."""
    before, _ = target.counts()
    done = run(tool, target, tmp_path, "--concurrency-range", "1:4:3")
    after, _ = target.counts()
    check_rows(done, [1, 4])
    assert done.requests > 0
    # perf_analyzer also sends requests outside the windows it reports (warm-up, unstable windows): at least as many
    assert after - before >= done.requests, done.output


def test_batched_requests_with_given_data(tool, target, tmp_path):
    """Batches of 4 from a --input-data file, without shared memory; over HTTP as binary and as JSON tensors
    (both ways: --input/output-tensor-format), over gRPC as its raw tensors."""
    rows = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"data": [{"input": row.tolist()} for row in rows]}))
    for tensors in ("binary", "json") if target.protocol == "http" else ("raw",):
        formats = ["--input-tensor-format", tensors, "--output-tensor-format", tensors] if tensors != "raw" else []
        before, inferences_before = target.counts()
        done = run(tool, target, tmp_path, "--concurrency-range", "2", "-b", "4", "--input-data", str(data),
                   "--shared-memory", "none", *formats)
        after, inferences_after = target.counts()
        check_rows(done, [2])
        assert after - before >= done.requests > 0, (tensors, done.output)
        assert inferences_after - inferences_before >= 4 * done.requests, done.output  # every request carried 4 rows
