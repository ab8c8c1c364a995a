"""CPU benchmark: Yat attention scores as one batched YatGemm node against the decomposed path nmn's attention exports to.

The scores (q·k)² / ((‖q−k‖² + ε)·√head_dim) · alpha of queries q [batch, heads, q_len, head_dim] against keys
k [batch, heads, kv_len, head_dim], three ways, in ONNX Runtime in this one process, float32, with the same session
settings and intra-op threads:

- library: one YatGemm node (X = q, W = k, B = zeros [kv_len], as the decoder export writes it) run by yatdeploy's
  custom-op library;
- decomposed: what nmn's `yat_attention_weights` exports to, built here as a small graph: Einsum q·k, its square,
  the squared norms of q and k (Mul, ReduceSum), the distance |q|² + |k|² − 2q·k (Add, Mul, Sub), Max(·, 0), + ε,
  · √head_dim, Div, · alpha;
- function: the same YatGemm node run by plain ONNX Runtime as the model's ONNX function (no library).

Cases: decode (batch 1, q_len 1, kv_len 16/128/512/1024) and prefill (q_len = kv_len = 512), heads 4 and 12,
head_dim 64, at 1 and 2 intra-op threads. Prints a table; `--json PATH` writes the figures with the machine, the
versions, the command and the date.

    python benchmarks/bench_attention_scores.py [--repeat 200] [--budget 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench_cpu_yatgemm import _cpu, _git_commit, interleaved_medians, session  # its session settings, timing, machine facts
from yatdeploy import native
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.spec import DEFAULT_EPS, FUNCTION_OPSET, YAT_GEMM

HEAD_DIM = 64
HEADS = (4, 12)
DECODE_KV = (16, 128, 512, 1024)
PREFILL = 512
THREADS = (1, 2)
ALPHA = 1.0  # nmn's alpha (or constant scale); the YatGemm node folds 1/√head_dim into its alpha


def _inputs(heads: int, kv_len: int) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info("Q", TensorProto.FLOAT, [1, heads, "q_len", HEAD_DIM]),
            helper.make_tensor_value_info("K", TensorProto.FLOAT, [1, heads, kv_len, HEAD_DIM])]


def _scores(heads: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("S", TensorProto.FLOAT, [1, heads, "q_len", None])


def yat_gemm_model(heads: int, kv_len: int) -> bytes:
    """One YatGemm node, B zeros [kv_len] (the decoder export's form), with its ONNX function attached."""
    node = helper.make_node(YAT_GEMM.name, ["Q", "K", "B"], ["S"], domain=YAT_GEMM.domain, eps=DEFAULT_EPS,
                            alpha=ALPHA / math.sqrt(HEAD_DIM))
    graph = helper.make_graph([node], "yat_scores", _inputs(heads, kv_len), [_scores(heads)],
                              [numpy_helper.from_array(np.zeros(kv_len, np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)])
    attach_yat_gemm_function(model)
    return model.SerializeToString()


def decomposed_model(heads: int, kv_len: int) -> bytes:
    """nmn's yat_attention_weights (the non-spherical form) as its ONNX export computes it, on [b, h, len, d]."""
    const = lambda name, value: numpy_helper.from_array(np.asarray(value, np.float32), name)  # noqa: E731
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [
        helper.make_node("Einsum", ["Q", "K"], ["dot"], equation="bhqd,bhkd->bhqk"),
        helper.make_node("Mul", ["dot", "dot"], ["dot_sq"]),
        helper.make_node("Mul", ["Q", "Q"], ["q2"]),
        helper.make_node("ReduceSum", ["q2", "axes"], ["q_sq"], keepdims=1),  # [b, h, q, 1]
        helper.make_node("Mul", ["K", "K"], ["k2"]),
        helper.make_node("ReduceSum", ["k2", "axes"], ["k_sq_col"], keepdims=1),  # [b, h, k, 1]
        helper.make_node("Transpose", ["k_sq_col"], ["k_sq"], perm=[0, 1, 3, 2]),  # [b, h, 1, k]
        helper.make_node("Add", ["q_sq", "k_sq"], ["norms"]),
        helper.make_node("Mul", ["two", "dot"], ["two_dot"]),
        helper.make_node("Sub", ["norms", "two_dot"], ["dist_raw"]),
        helper.make_node("Max", ["dist_raw", "zero"], ["dist"]),
        helper.make_node("Add", ["dist", "eps"], ["dist_eps"]),
        helper.make_node("Mul", ["dist_eps", "dim_scale"], ["denominator"]),
        helper.make_node("Div", ["dot_sq", "denominator"], ["weights"]),
        helper.make_node("Mul", ["weights", "alpha"], ["S"]),
    ]
    initializers = [axes, const("two", 2.0), const("zero", 0.0), const("eps", DEFAULT_EPS),
                    const("dim_scale", math.sqrt(HEAD_DIM)), const("alpha", ALPHA)]
    graph = helper.make_graph(nodes, "decomposed_scores", _inputs(heads, kv_len), [_scores(heads)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", FUNCTION_OPSET)]).SerializeToString()


def cases() -> list[tuple[str, int, int, int]]:
    """(phase, heads, q_len, kv_len) of every case."""
    decode = [("decode", heads, 1, kv) for heads in HEADS for kv in DECODE_KV]
    prefill = [("prefill", heads, PREFILL, PREFILL) for heads in HEADS]
    return decode + prefill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=200, help="timed rounds per case (fewer if a case is slow)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds per case at most, after 10 rounds")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()

    library = native.ort_library_path()
    if library is None:
        print("the custom-op library is not built (run `yatdeploy doctor`)", file=sys.stderr)
        return 2
    native.preload_dependencies()
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'phase':>8} {'heads':>5} {'q':>4} {'kv':>5} {'thr':>3} {'library ms':>11} {'decomposed ms':>14} "
          f"{'function ms':>12} {'decomp/lib':>11} {'fn/lib':>7}")
    for phase, heads, q_len, kv_len in cases():
        feeds = {"Q": rng.standard_normal((1, heads, q_len, HEAD_DIM), dtype=np.float32),
                 "K": rng.standard_normal((1, heads, kv_len, HEAD_DIM), dtype=np.float32)}
        yat, decomposed = yat_gemm_model(heads, kv_len), decomposed_model(heads, kv_len)
        for threads in THREADS:
            sessions = {
                "library_ms": session(yat, threads, library),
                "decomposed_ms": session(decomposed, threads, None),
                "function_ms": session(yat, threads, None),
            }
            outputs = {name: sess.run(None, feeds)[0] for name, sess in sessions.items()}
            agree = max(float(np.max(np.abs(out - outputs["decomposed_ms"]) / np.maximum(np.abs(outputs["decomposed_ms"]),
                                                                                          1e-3)))
                        for out in outputs.values())
            timings = interleaved_medians(sessions, feeds, args.repeat, args.budget, warmup=5, min_rounds=10)
            row = {"phase": phase, "batch": 1, "heads": heads, "q_len": q_len, "kv_len": kv_len, "head_dim": HEAD_DIM,
                   "threads": threads, **{key: round(v, 4) for key, v in timings.items()},
                   "decomposed_vs_library": round(timings["decomposed_ms"] / timings["library_ms"], 2),
                   "function_vs_library": round(timings["function_ms"] / timings["library_ms"], 2),
                   "max_relative_difference": float(f"{agree:.2e}")}
            rows.append(row)
            print(f"{phase:>8} {heads:>5} {q_len:>4} {kv_len:>5} {threads:>3} {timings['library_ms']:>11.4f} "
                  f"{timings['decomposed_ms']:>14.4f} {timings['function_ms']:>12.4f} "
                  f"{row['decomposed_vs_library']:>11.2f} {row['function_vs_library']:>7.2f}", flush=True)

    if args.json:
        result = {
            "date": dt.date.today().isoformat(),
            "command": "python " + shlex.join(sys.argv),
            "commit": _git_commit(),
            "machine": {**_cpu(), "logical_cpus": len(os.sched_getaffinity(0)),
                        "platform": platform.platform(), "python": platform.python_version(),
                        # Other work on the machine: 1-, 5- and 15-minute load averages before and after the run.
                        "load_average": {"before": [round(v, 2) for v in load_before],
                                         "after": [round(v, 2) for v in os.getloadavg()]}},
            "float32_cpu_path": "blas" if os.environ.get("YATDEPLOY_CPU_KERNEL") == "blas" or not _cpu()["avx512f"]
            else "avx512",
            "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
                         "blas": "scipy-openblas32 " + metadata.version("scipy-openblas32")},
            "dtype": "float32",
            "session": "intra-op threads as listed, inter-op 1, intra-op spinning off (bench_cpu_yatgemm.session)",
            "timing": "median ms of session.run over interleaved rounds (the three sessions in turn)",
            "library": str(library),
            "cases": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
