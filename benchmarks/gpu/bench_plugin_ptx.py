"""Time the YatGemm TensorRT plugin's PTX kernel against cuBLAS at the same shape and dtype, in one run.

No TensorRT needed: the PTX is loaded with cupy.RawModule and launched with the plugin's own grid, block
and arguments (yatdeploy/trt/plugin_logic.py); cuBLAS is cupy.matmul. CUDA events, warm-up, median of
--repeat runs. Prints one line per case with the ratio to cuBLAS and writes --out as JSON.

    python benchmarks/gpu/bench_plugin_ptx.py --ptx /tmp/n/yat_gemm_plugin.ptx --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from yatdeploy.trt import plugin_logic as logic  # noqa: E402

SHAPES = [(1, 4096, 4096), (64, 4096, 4096), (4096, 4096, 4096), (16384, 768, 3072)]
DTYPES = {"float32": cp.float32, "float16": cp.float16}


def _time(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def bench_case(kernel, cp_dtype, m: int, k: int, n: int, repeat: int) -> tuple[float, float]:
    """(plugin kernel ms, cuBLAS ms) on fresh random inputs of this shape and dtype."""
    x = (cp.random.standard_normal((m, k), dtype=cp.float32) * 0.5).astype(cp_dtype)
    w = (cp.random.standard_normal((n, k), dtype=cp.float32) * 0.5).astype(cp_dtype)
    b = (cp.random.standard_normal(n, dtype=cp.float32) * 0.1).astype(cp_dtype)
    y = cp.empty((m, n), dtype=cp_dtype)
    grid = tuple(int(g) for g in logic.launch_grid(m, n))
    scalars = [np.int32(v) for v in logic.extra_args(m, k, n, 1e-5, 1.0)]

    def yat() -> None:
        kernel(grid, logic.block_dims()[:2], (x, w, b, *scalars, y))

    return _time(yat, repeat), _time(lambda: cp.matmul(x, w.T), repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptx", required=True, type=Path)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    module = cp.RawModule(path=str(args.ptx))
    cases = []
    for dtype, cp_dtype in DTYPES.items():
        kernel = module.get_function(next(t.kernel for t in logic.PLUGIN_TYPES if t.dtype == dtype))
        for m, k, n in SHAPES:
            yat_ms, cublas_ms = bench_case(kernel, cp_dtype, m, k, n, args.repeat)
            case = {"m": m, "k": k, "n": n, "dtype": dtype, "yat_ms": round(yat_ms, 4),
                    "cublas_ms": round(cublas_ms, 4), "ratio_vs_cublas": round(yat_ms / cublas_ms, 2)}
            cases.append(case)
            print(f"{dtype:8} M={m:<6} K={k:<5} N={n:<6} plugin {yat_ms:9.3f} ms  cuBLAS {cublas_ms:8.3f} ms  "
                  f"ratio {yat_ms / cublas_ms:6.2f}", flush=True)
    if args.out:
        device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        args.out.write_text(json.dumps({"device": device, "cupy": cp.__version__, "cases": cases}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
