"""CPU benchmark: YatGemm from yatdeploy's custom-op library vs. the ONNX function vs. a plain MatMul.

All three run in ONNX Runtime in this one process, on the same shapes, float32, with the same
number of intra-op threads, so the ratios compare like with like. Prints a table and writes JSON
(machine, versions, command) under benchmarks/results/.

    python benchmarks/bench_cpu_yatgemm.py [--threads 2] [--repeat 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from yatdeploy import native
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.spec import YAT_GEMM

SHAPES = [(1, 1024, 1024), (64, 1024, 1024), (256, 1024, 4096), (2048, 768, 3072)]


def yat_gemm_model(w: np.ndarray, b: np.ndarray) -> bytes:
    n, k = w.shape
    node = helper.make_node(YAT_GEMM.name, ["X", "W", "B"], ["Y"], domain=YAT_GEMM.domain, eps=1e-5, alpha=1.0)
    graph = helper.make_graph(
        [node], "yat_gemm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    attach_yat_gemm_function(model)
    return model.SerializeToString()


def matmul_model(w: np.ndarray) -> bytes:
    n, k = w.shape
    # W stored as [K, N], so the baseline is a plain GEMM with no transpose.
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wt"], ["Y"])], "matmul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def session(model: bytes, threads: int, library: Path | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Sessions take turns: a pool left spinning after its run would steal the next session's cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def interleaved_medians(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], repeat: int,
                        budget_s: float, warmup: int = 3, min_rounds: int = 5) -> dict[str, float]:
    """Median ms per session, the sessions run in turn each round, so drifting machine load hits all alike
    (bench_attention_scores.py times its sessions with it too)."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeat and (rounds < min_rounds or time.perf_counter() - started < budget_s):
        for name, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}


def _cpu() -> dict:
    fields: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return {"cpu": fields.get("model name", platform.processor()), "cpu_family": fields.get("cpu family"),
            "cpu_model": fields.get("model"), "avx512f": "avx512f" in fields.get("flags", "").split()}


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds per case (fewer if a case is slow)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per case at most, after 5 rounds")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<date>-cpu.json)")
    args = parser.parse_args()

    library = native.ort_library_path()
    if library is None:
        print("the custom-op library is not built (run `yatdeploy doctor`)", file=sys.stderr)
        return 2
    native.preload_dependencies()
    rng = np.random.default_rng(0)
    cases = []
    print(f"{'M':>5} {'K':>5} {'N':>5} {'matmul ms':>10} {'library ms':>11} {'function ms':>12} "
          f"{'lib/matmul':>11} {'fn/matmul':>10} {'fn/lib':>7}")
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        b = rng.standard_normal(n, dtype=np.float32) * 0.1
        yat = yat_gemm_model(w, b)
        sessions = {
            "matmul_ms": session(matmul_model(w), args.threads, None),
            "library_ms": session(yat, args.threads, library),
            "function_ms": session(yat, args.threads, None),
        }
        timings = interleaved_medians(sessions, {"X": x}, args.repeat, args.budget)
        case = {"m": m, "k": k, "n": n, "dtype": "float32", **{key: round(v, 4) for key, v in timings.items()}}
        case["library_vs_matmul"] = round(timings["library_ms"] / timings["matmul_ms"], 3)
        case["function_vs_matmul"] = round(timings["function_ms"] / timings["matmul_ms"], 3)
        case["function_vs_library"] = round(timings["function_ms"] / timings["library_ms"], 3)
        cases.append(case)
        print(f"{m:>5} {k:>5} {n:>5} {timings['matmul_ms']:>10.3f} {timings['library_ms']:>11.3f} "
              f"{timings['function_ms']:>12.3f} {case['library_vs_matmul']:>11.3f} {case['function_vs_matmul']:>10.3f} "
              f"{case['function_vs_library']:>7.2f}", flush=True)

    result = {
        "date": dt.date.today().isoformat(),
        "command": "python " + shlex.join(sys.argv),
        "commit": _git_commit(),
        "machine": {**_cpu(), "logical_cpus": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version()},
        # The library's float32 path: its AVX-512 micro-kernel, or OpenBLAS (custom_ops/README.md).
        "float32_cpu_path": "blas" if os.environ.get("YATDEPLOY_CPU_KERNEL") == "blas" or not _cpu()["avx512f"]
        else "avx512",
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                     "blas": "scipy-openblas32 " + metadata.version("scipy-openblas32")},
        "threads": args.threads,
        "library": str(library),
        "cases": cases,
    }
    out = args.out or Path(__file__).parent / "results" / f"{result['date']}-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
