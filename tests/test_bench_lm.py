"""The LM decode benchmark (benchmarks/bench_lm.py) in --quick mode on a tiny Yat GPT, so that it can't rot between
full runs: it exports with and without the KV cache, times every variant, and writes the JSON a results file is.
Nothing here checks a time: the figures of a 2-core shared machine are not a test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # exports three models (GPT-2's with torch.onnx.export) in a fresh interpreter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_lm.py"
TINY = ["--quick", "--layers", "1", "--width", "32", "--heads", "4", "--vocab", "64", "--positions", "32",
        "--contexts", "8,16", "--prefill", "16", "--generate", "4", "--threads", "1", "--steps", "3", "--warmup", "1",
        "--profile", "always", "--note", "smoke test"]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-lm") / "lm.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "goals (issue 22)" in done.stdout
    return json.loads(out.read_text())


def test_the_record_says_what_ran_where(result):
    assert result["command"].split()[1].endswith("benchmarks/bench_lm.py") and "--quick" in result["command"]
    machine = result["machine"]
    assert machine["cpu"] and machine["logical_cpus"] >= 1 and machine["note"] == "smoke test"
    versions = result["versions"]
    assert versions["torch"] and versions["onnxruntime"] and "commit" in result and result["date"]
    assert result["settings"]["contexts"] == [8, 16] and result["settings"]["yat_cache_export"]["yat_gemm_kinds"]


def test_every_variant_is_timed_at_every_context_or_said_skipped(result):
    anchor = importlib.util.find_spec("transformers") is not None
    assert [(r["threads"], r["context"]) for r in result["decode"]] == [(1, 8), (1, 16)]
    for row in result["decode"]:
        for key in ("yat_cache_ort_function_ms", "yat_no_cache_ms"):
            assert row[key] > 0
        assert ("gpt2_cache_ms" in row) == anchor and ("yat_no_cache_vs_gpt2" in row) == anchor
        assert "yat_cache_ort_cpu_ms" in row or any("yat cache ort-cpu" in s for s in result["skipped"])
    [prefill] = result["prefill"]
    assert prefill["tokens"] == 16 and prefill["yat_cache_ort_function_ms"] > 0
    if not anchor:
        assert any(s.startswith("gpt2: transformers is not installed") for s in result["skipped"])


def test_the_goals_and_the_profiles_are_recorded(result):
    assert {g["goal"].split(" ")[0] for g in result["goals"]} == {"decode", "prefill", "ORT"}
    assert {g["backend"] for g in result["goals"] if g["goal"].startswith("decode")} == {"ort-cpu", "ort-function"}
    assert all(g["met"] in (True, False, None) and g["limit"] > 1 for g in result["goals"])
    profile = result["profiles"]["decode_16/yat_cache_ort_function"]
    assert profile["runs"] >= 1 and profile["ops"] and abs(sum(op["share"] for op in profile["ops"]) - 1) < 0.01
    genai = result["genai"].get("runs")
    assert genai or any(s.startswith("genai:") for s in result["skipped"])
    for run in genai or []:
        assert run.get("same_tokens", True) and ("genai_tokens_per_s" in run or "skipped" in run)
