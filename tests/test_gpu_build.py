"""The GPU kernels' place in the package build, checked without a GPU: the AOT compile runs without torch
(as in the build's isolated environment)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@needs_triton
def test_aot_runs_without_torch(tmp_path):
    """`python -m yatdeploy.gpu.aot` with only triton and the source tree: torch can't be imported."""
    script = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["torch"] = None  # any `import torch` now fails
        sys.argv = ["aot", "--out", {str(tmp_path)!r}, "--arch", "80", "--dtype", "bfloat16",
                    "--config", "small_m", "--variant", "generic"]
        try:
            runpy.run_module("yatdeploy.gpu.aot", run_name="__main__")
        except SystemExit as exit:
            assert not exit.code, exit.code
        assert sys.modules["torch"] is None
        print("no torch")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("no torch")
    entries = json.loads((tmp_path / "manifest.json").read_text())["entries"]
    gemm = next(e for e in entries if e["kernel"] == "yat_gemm")
    # The saturation limit came from yatdeploy.spec, not torch.finfo.
    assert gemm["constants"]["SATURATE"] is True and gemm["constants"]["FINITE_MAX"] == 3.3895313892515355e38
    assert (tmp_path / gemm["cubin"]).stat().st_size > 0
