"""The GPU runbook (benchmarks/gpu/run_yat_gemm.py) in its --cpu-check mode, so that it can't rot between
the rare runs on a GPU: Triton's interpreter, tiny shapes, the AOT build of a few entries and their ONNX
Runtime and TensorRT launch plans checked against the PTX parameter lists, the results file written."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the GPU runbook's CPU check in a subprocess

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_yat_gemm.py"
CASE_KEYS = {"m", "k", "n", "dtype", "yat_ms", "cublas_ms", "eager_ms", "compiled_ms", "ratio_vs_cublas", "max_rel_err"}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory) -> dict:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'yatdeploy[gpu-kernels]')")
    out = tmp_path_factory.mktemp("runbook")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-check", "--out-dir", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = out.glob("*-cpu-check.json")
    return json.loads(path.read_text())


def test_the_cpu_check_passes_and_records_what_it_ran(cpu_check):
    report = cpu_check
    assert report["failures"] == []
    command = report["command"].split()  # as run
    assert report["device"].startswith("cpu") and command[1].endswith("benchmarks/gpu/run_yat_gemm.py")
    assert command[2] == "--cpu-check"
    assert {"python", "torch", "triton"} <= set(report["versions"])
    assert report["eager_impl"].startswith(("nmn.torch.YatNMN", "yatdeploy.ops.torch_op.yat_gemm_reference"))
    assert report["aot"]["entries"] >= 5


def test_cases_have_the_issues_fields(cpu_check):
    cases = cpu_check["cases"]
    assert {c["dtype"] for c in cases} == {"float32", "float16", "bfloat16"}
    for case in cases:
        assert CASE_KEYS <= set(case), case
        assert case["within_bound"] and case["within_bound_near"], case  # well-conditioned and x ≈ w rows
        assert case["yat_ms"] is None  # no timing without a GPU


def test_jit_checks_cover_every_tile_config(cpu_check):
    from yatdeploy.gpu.configs import TILE_CONFIGS

    jit = cpu_check["correctness"]["jit"]
    assert all(row["within_bound"] and row["within_bound_near"] for row in jit)
    for dtype in ("float32", "float16", "bfloat16"):
        assert {row["config"] for row in jit if row["dtype"] == dtype} == {"auto", *TILE_CONFIGS}


def test_aot_launch_plans_of_both_hosts_are_checked(cpu_check):
    checked = [row for row in cpu_check["correctness"]["aot"] if "skipped" not in row]
    assert all("error" not in row for row in cpu_check["correctness"]["aot"])
    ort = [row for row in checked if row["host"] == "ort"]
    trt = [row for row in checked if row["host"] == "trt"]
    # ORT: |w|² then the GEMM, or then the split-K pair; TensorRT: the yat_gemm_trt entry alone.
    assert any(row["entries"][0].startswith("row_sq_norm") and row["entries"][1].startswith("yat_gemm.") for row in ort)
    assert any([e.split(".")[0] for e in row["entries"]] == ["row_sq_norm", "yat_gemm_split_k_partial",
                                                             "yat_gemm_split_k_epilogue"] for row in ort)
    assert trt and all(len(row["entries"]) == 1 and row["entries"][0].startswith("yat_gemm_trt.") for row in trt)
    assert not any(row["launched"] for row in checked)
