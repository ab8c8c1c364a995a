"""benchmarks/bench_liveness.py runs end to end on a real server and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_bench_liveness_measures_busy_and_idle_probes(tmp_path):
    out = tmp_path / "liveness.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_liveness.py"), "--requests", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())["figures"]
    assert figures["request"]["count"] == 2 and figures["busy"]["count"] == figures["idle"]["count"] >= 1
    assert "slowest probe while busy / slowest idle probe" in done.stdout
