"""The YatGemm GPU runbook: one command that checks the Triton kernels on a GPU and times them.

    python3 benchmarks/gpu/run_yat_gemm.py --out-dir DIR [--quick] [--kernels DIR] [--budget-s S]
    python benchmarks/gpu/run_yat_gemm.py --cpu-check --out-dir DIR    # no GPU: what CI runs

1. Builds the AOT artifacts (yatdeploy.gpu.aot) for sm_90a and sm_80 into a temporary folder with the
   local triton, unless --kernels names a folder built elsewhere (e.g. by the package build).
2. Correctness against a float64 reference, on well-conditioned inputs (|x| ≈ |w| ≈ 1, x and w nearly
   orthogonal, bias ≈ 1: nothing cancels) and, reported apart, on rows with x ≈ w (the expanded distance
   |x|² + |w|² − 2x·w cancels): every element must lie within the float32 rounding bound of the sums
   (tests/test_gpu_kernel.py's), and the largest relative error is recorded.
   - the JIT kernels (yatdeploy.gpu.yat_gemm), every tile config, float32/float16/bfloat16;
   - the AOT artifacts launched through the CUDA driver as the ONNX Runtime host launches them
     (custom_ops/src/cuda/gpu_kernels.cc: the cubin for this GPU's arch, row_sq_norm then yat_gemm or the
     split-K pair, the aligned variant when its divisibility assumptions hold) and as TensorRT launches
     the plugin's (yatdeploy/trt/plugin_logic.py: the yat_gemm_trt PTX, arguments in TensorRT's order,
     grid/block/dynamic shared memory from the manifest), plus the sm_80 PTX JIT-compiled by the driver.
3. Timing with CUDA events, after warm-up, median of --reps samples, each sample one call captured in a
   CUDA graph (GPU time, no Python launch overhead) with L2 flushed before it: the JIT kernel (its
   chosen config, |w|² precomputed as for a constant W; and with |w|² computed per call), cuBLAS
   (torch.matmul in the same dtype; float32 with TF32 off), nmn's eager YatNMN forward (or, when nmn
   is not importable, yatdeploy's eager reference; the JSON says which) and torch.compile of it. Then,
   while the time budget lasts, a tile sweep (the JIT kernel per config, and the TensorRT entry per
   tactic through the driver).
4. Writes DIR/<date>-<h100|h200|gpu>.json: device, versions, the exact command, cases
   [{m, k, n, dtype, yat_ms, cublas_ms, eager_ms, compiled_ms, ratio_vs_cublas, max_rel_err, ...}],
   the sweep and every correctness check. It is rewritten after each step, so a run cut short still
   leaves what it measured. Exit status 1 when a correctness check failed.

--cpu-check runs the same code paths without a GPU: Triton's interpreter, tiny shapes, the AOT build of
a few entries with their ORT and TensorRT launch plans checked against the PTX parameter lists (no
launch), no timing. tests/test_gpu_runbook.py runs it, so that this script can't rot.
"""

from __future__ import annotations

import os
import sys

CPU_CHECK = "--cpu-check" in sys.argv[1:]
# triton reads TRITON_INTERPRET when kernels are decorated: decide before anything imports it.
if CPU_CHECK:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the device machine runs the checkout without installing it

import numpy as np  # noqa: E402
import torch  # noqa: E402

from yatdeploy.gpu import TILE_CONFIGS, choose_config, row_sq_norms, yat_gemm  # noqa: E402
from yatdeploy.gpu.configs import split_k_slices  # noqa: E402
from yatdeploy.ops.torch_op import yat_gemm_reference  # noqa: E402
from yatdeploy.trt import plugin_logic  # noqa: E402

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (64, 4096, 4096), (4096, 4096, 4096), (8192, 4096, 14336),
          (16384, 768, 3072), (8, 768, 50304)]  # (M, K, N); the last is an LM head
QUICK_SHAPES = [(1, 4096, 4096), (64, 4096, 4096), (4096, 4096, 4096), (8, 768, 50304)]
CPU_SHAPES = [(1, 64, 48), (5, 96, 40)]
# 16-bit first: if the time budget runs out, it runs out on float32 (the slowest, CUDA-core products).
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUICK_DTYPES = ("float16", "float32")
# Correctness shapes: ragged (generic variant), aligned, M=1 with a long K (split-K), large tiles.
CHECK_SHAPES = [(5, 300, 70), (64, 256, 192), (1, 4096, 512), (130, 512, 1024)]
CPU_CHECK_SHAPES = [(5, 40, 33), (3, 64, 48)]
EPS = 2.0**-17  # exactly representable, so float32 kernels and float64 references use the same value
ALPHA = 1.25
REFERENCE_ROWS = 512  # rows of a large case compared with float64
L2_FLUSH_BYTES = 256 << 20
DEFAULT_DYNAMIC_SHARED = 48 * 1024
# The AOT entries the CPU check builds (kernel, cc, dtype, variant, config).
CPU_CHECK_JOBS = [("row_sq_norm", 90, "float16", "generic", None),
                  ("yat_gemm", 90, "float16", "generic", "small_m"),
                  ("yat_gemm_split_k_partial", 90, "float16", "generic", "small_m_split_k"),
                  ("yat_gemm_split_k_epilogue", 90, "float16", "generic", "small_m_split_k"),
                  ("yat_gemm_trt", 90, "float16", "generic", "small_m")]


# --- the report --------------------------------------------------------------------------------------

@dataclass
class Report:
    path: Path
    data: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fail(self, what: str) -> None:
        self.data.setdefault("failures", []).append(what)
        print(f"FAILED: {what}", flush=True)

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n")
        tmp.replace(self.path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value)} is not JSON")


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


# --- inputs, reference, error ---------------------------------------------------------------------------

def make_inputs(m: int, k: int, n: int, dtype: torch.dtype, device: str, seed: int):
    """Well-conditioned operands: |x| ≈ |w| ≈ 1 and nearly orthogonal (distance ≈ 2), bias ≈ 1."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(m, k, generator=g, device=device) / math.sqrt(k)).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) / math.sqrt(k)).to(dtype)
    b = (1.0 + 0.1 * torch.randn(n, generator=g, device=device)).to(dtype)
    return x, w, b


def near_rows(x: torch.Tensor, w: torch.Tensor, rows: list[int], seed: int) -> torch.Tensor:
    """A copy of x whose `rows` are w's rows plus 1 % noise: x ≈ w, the expanded distance cancels."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    near = x.clone()
    n, k = w.shape
    for r in rows:
        noise = torch.randn(k, generator=g, device=x.device) * (0.01 / math.sqrt(k))
        near[r] = (w[r % n].float() + noise).to(x.dtype)
    return near


def sample_rows(m: int) -> list[int]:
    if m <= REFERENCE_ROWS:
        return list(range(m))
    return sorted({round(i * (m - 1) / (REFERENCE_ROWS - 1)) for i in range(REFERENCE_ROWS)})


def error_bound(x64, w64, b64, eps, alpha, dtype: torch.dtype):
    """A rigorous bound on |y − y64| for float32 sums (γ = (K + 8)·2⁻²⁴ each) carried through the formula
    without linearising, plus one rounding to `dtype` (tests/test_gpu_kernel.py's bound)."""
    k = x64.shape[-1]
    dot, abs_dot = x64 @ w64.T, x64.abs() @ w64.abs().T
    x_sq, w_sq = (x64 * x64).sum(-1, keepdim=True), (w64 * w64).sum(-1)
    dist = (x_sq + w_sq - 2 * dot).clamp(min=0)
    gamma = (k + 8) * 2.0**-24
    z = (dot + b64).abs()
    z_error = gamma * (abs_dot + b64.abs())
    dist_error = gamma * (x_sq + w_sq + 2 * abs_dot)
    y = abs(alpha) * z**2 / (dist + eps)
    worst = abs(alpha) * (z + z_error) ** 2 / ((dist - dist_error).clamp(min=0) + eps)
    least = abs(alpha) * (z - z_error).clamp(min=0) ** 2 / (dist + dist_error + eps)
    out = torch.finfo(dtype)
    # The GPU rounds to nearest (eps/2); the interpreter truncates float32 -> bfloat16 (a full eps).
    unit = out.eps if (CPU_CHECK and dtype == torch.bfloat16) else out.eps / 2
    return torch.maximum(worst - y, y - least) + y * unit + out.smallest_normal


def compare(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rows: list[int],
            only: list[int] | None = None) -> dict:
    """Max relative error against float64 on `rows` of x (restricted to the (row, row % N) elements of
    `only`, the x ≈ w pairs), and whether every element is within the rounding bound."""
    index = torch.tensor(rows, device=x.device)
    x64, w64 = x.index_select(0, index).double(), w.double()
    b64 = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=x.device)
    want = yat_gemm_reference(x64, w64, b64, EPS, ALPHA)
    got = y.index_select(0, index).double()
    bound = error_bound(x64, w64, b64, EPS, ALPHA, x.dtype)
    if only is not None:
        pick = [rows.index(r) for r in only]
        cols = torch.tensor([r % w.shape[0] for r in only], device=x.device)
        pick_t = torch.tensor(pick, device=x.device)
        want, got, bound = (t[pick_t, cols] for t in (want, got, bound))
    err = (got - want).abs()
    finite = torch.isfinite(want)
    rel = (err[finite] / want[finite].abs().clamp(min=torch.finfo(torch.float64).tiny))
    return {
        "max_rel_err": _round(rel.max().item() if rel.numel() else 0.0, 3),
        "max_err_over_bound": _round((err / bound).max().item(), 3),
        "within_bound": bool(torch.isfinite(got).all().item() and (err <= bound).all().item()),
    }


# --- the CUDA driver, for the AOT artifacts --------------------------------------------------------------

class Driver:
    """cuModuleLoadData / cuLaunchKernel through ctypes on torch's context and current stream, as the
    ORT host (custom_ops/src/cuda/cuda_driver.cc) and TensorRT launch the artifacts."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        torch.empty(1, device="cuda")  # the primary context, current on this thread
        self.functions: dict[tuple[str, str], ctypes.c_void_p] = {}
        self.modules: list[ctypes.c_void_p] = []

    def check(self, code: int, what: str) -> None:
        if code != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(code, ctypes.byref(text))
            raise RuntimeError(f"{what}: CUDA error {code} {text.value.decode() if text.value else ''}")

    def version(self) -> str:
        version = ctypes.c_int()
        self.check(self.lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        return f"{version.value // 1000}.{version.value % 1000 // 10}"

    def function(self, path: Path, entry: str, shared: int) -> ctypes.c_void_p:
        key = (str(path), entry)
        if key not in self.functions:
            image = path.read_bytes() + (b"\0" if path.suffix == ".ptx" else b"")
            module = ctypes.c_void_p()
            self.check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(image)),
                       f"cuModuleLoadData({path.name})")
            self.modules.append(module)
            function = ctypes.c_void_p()
            self.check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, entry.encode()),
                       f"cuModuleGetFunction({entry})")
            if shared > DEFAULT_DYNAMIC_SHARED:  # as the ORT host does; TensorRT must do the same (open)
                self.check(self.lib.cuFuncSetAttribute(function, 8, ctypes.c_int(shared)),
                           f"cuFuncSetAttribute({entry}, MAX_DYNAMIC_SHARED_SIZE_BYTES={shared})")
            self.functions[key] = function
        return self.functions[key]

    def launch(self, function, grid, block, shared: int, args: list) -> None:
        holders = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        gx, gy, gz = (int(g) for g in grid)
        self.check(self.lib.cuLaunchKernel(function, gx, gy, gz, int(block[0]), int(block[1]), int(block[2]),
                                           int(shared), stream, holders, None), "cuLaunchKernel")


def _ctypes_arg(param: dict, value):
    if param["type"].startswith("*"):
        return ctypes.c_uint64(int(value))
    if param["type"] == "i32":
        return ctypes.c_int32(int(value))
    if param["type"] == "fp32":
        return ctypes.c_float(float(value))
    raise ValueError(f"parameter type {param['type']}")


_PTX_SIZES = {"u64": 8, "u32": 4, "f32": 4, "b32": 4, "s32": 4}


@dataclass
class Launch:
    entry: dict
    file: str  # the artifact loaded: its PTX or its cubin
    grid: tuple
    args: list  # ctypes values in the entry's parameter order

    def check_against_ptx(self, folder: Path) -> None:
        """The PTX declares exactly these parameters, of these sizes (what a launch passes)."""
        ptx = (folder / self.entry["ptx"]).read_text()
        declared = plugin_logic.ptx_entries(ptx)[self.entry["entry"]]
        sizes = [ctypes.sizeof(a) for a in self.args]
        if [_PTX_SIZES[t] for t in declared] != sizes:
            raise AssertionError(f"{self.entry['ptx']}: the PTX takes {declared}, the launch passes sizes {sizes}")


@dataclass
class Artifacts:
    folder: Path
    manifest: dict

    def find(self, kernel: str, arch: str, dtype: str, config: str | None, variant: str) -> dict | None:
        for e in self.manifest["entries"]:
            if (e["kernel"], e["arch"], e["dtype"], e["config"], e["variant"]) == (kernel, arch, dtype, config, variant) \
                    and e.get("float32_precision") in (None, "ieee"):
                return e
        return None


def _hints_hold(entry: dict, values: dict) -> bool:
    return all(int(values[name]) % 16 == 0 for name in entry["divisible_by_16"])


def ort_plan(art: Artifacts, arch: str, use_ptx: bool, x, w, b, y, config_name: str | None = None) -> tuple[list[Launch], list]:
    """The ONNX Runtime host's launches (custom_ops/src/cuda/gpu_kernels.cc MakePlan): |w|² by row_sq_norm into
    the workspace, then yat_gemm or the split-K pair; per kernel the aligned entry when its divisibility
    assumptions hold, else the generic one. Returns the launches and the buffers they use."""
    (m, k), n = x.shape, w.shape[0]
    dtype = str(x.dtype).removeprefix("torch.")
    config = TILE_CONFIGS[config_name] if config_name else choose_config(m, n, k, dtype)
    w_sq = torch.empty(n, dtype=torch.float32, device=x.device)
    buffers = [w_sq]
    values = {"x_ptr": x.data_ptr(), "w_ptr": w.data_ptr(), "b_ptr": b.data_ptr() if b is not None else 0,
              "w_sq_ptr": w_sq.data_ptr(), "y_ptr": y.data_ptr(), "M": m, "N": n, "K": k,
              "stride_xm": k, "stride_wn": k, "stride_ym": n, "has_bias": int(b is not None),
              "eps": EPS, "alpha": ALPHA, "k_slices": 1, "k_per_slice": 0}
    kernels = [("row_sq_norm", None)]
    if config.split_k > 1:
        slices, per_slice = split_k_slices(k, config)
        partial_dot = torch.empty((slices, m, n), dtype=torch.float32, device=x.device)
        partial_x_sq = torch.empty((slices, m), dtype=torch.float32, device=x.device)
        buffers += [partial_dot, partial_x_sq]
        values.update(k_slices=slices, k_per_slice=per_slice, partial_dot_ptr=partial_dot.data_ptr(),
                      partial_x_sq_ptr=partial_x_sq.data_ptr())
        kernels += [("yat_gemm_split_k_partial", config.name), ("yat_gemm_split_k_epilogue", config.name)]
    else:
        kernels.append(("yat_gemm", config.name))
    launches = []
    for kernel, name in kernels:
        entry = art.find(kernel, arch, dtype, name, "aligned")
        if entry is None or not _hints_hold(entry, values):
            entry = art.find(kernel, arch, dtype, name, "generic")
        if entry is None:
            raise LookupError(f"no {kernel} {arch} {dtype} {name} entry")
        grid = tuple(plugin_logic.grid_value(g, values) for g in entry["grid"])
        args = [_ctypes_arg(p, values[p["name"]]) for p in entry["params"]]
        launches.append(Launch(entry, entry["ptx"] if use_ptx else entry["cubin"], grid, args))
    return launches, buffers


def trt_plan(art: Artifacts, arch: str, tactic: int, x, w, b, y) -> Launch:
    """The launch TensorRT makes of the plugin's aot_impl result: the yat_gemm_trt PTX, inputs, int32
    extra args, outputs (yatdeploy/trt/plugin_logic.py, the functions aot_impl calls)."""
    (m, k), n = x.shape, w.shape[0]
    dtype = str(x.dtype).removeprefix("torch.")
    variant = plugin_logic.variant_for(k, n)
    if art.find(plugin_logic.TRT_KERNEL, arch, dtype, plugin_logic.tactic(tactic).config, variant) is None:
        raise LookupError(f"no {plugin_logic.TRT_KERNEL} {arch} {dtype} tactic {tactic} {variant} entry")
    entry = plugin_logic.select_entry(art.manifest, arch, dtype, tactic, variant)
    launch = plugin_logic.launch(entry, m, n, k)
    extra = plugin_logic.extra_args(entry, m, n, k, EPS, ALPHA)
    args = [ctypes.c_uint64(t.data_ptr()) for t in (x, w, b)] + [ctypes.c_int32(v) for v in extra]
    args.append(ctypes.c_uint64(y.data_ptr()))
    return Launch(entry, entry["ptx"], launch.grid, args)


def run_launches(driver: Driver, art: Artifacts, launches: list[Launch]) -> None:
    for launch in launches:
        e = launch.entry
        function = driver.function(art.folder / launch.file, e["entry"], e["shared_memory_bytes"])
        driver.launch(function, launch.grid, e["block"], e["shared_memory_bytes"], launch.args)


def build_artifacts(out: Path, quick: bool, workers: int) -> Artifacts:
    """python -m yatdeploy.gpu.aot into `out`, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if CPU_CHECK:
        code = ("import json, sys; from pathlib import Path; from yatdeploy.gpu import aot; "
                "aot.build(Path(sys.argv[1]), [aot.KernelJob(*j) for j in json.loads(sys.argv[2])])")
        command = [sys.executable, "-c", code, str(out), json.dumps(CPU_CHECK_JOBS)]
    else:
        archs = ["90"] if quick else ["90", "80"]
        dtypes = list(QUICK_DTYPES) if quick else list(DTYPES)
        command = [sys.executable, "-m", "yatdeploy.gpu.aot", "--out", str(out), "--arch", *archs,
                   "--dtype", *dtypes, "--jobs", str(workers)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command[:3])} ... failed:\n{(done.stdout + done.stderr)[-4000:]}")
    return Artifacts(out, json.loads((out / "manifest.json").read_text()))


# --- timing -----------------------------------------------------------------------------------------------

class Timer:
    def __init__(self, reps: int, warmup: int) -> None:
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> tuple[float, str]:
        """(median ms per call, how): each sample one call after an L2 flush; the call replayed from a CUDA
        graph when it can be captured (GPU time only), else launched directly."""
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize()
        graph, how = None, "stream"
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
            run, how = graph.replay, "cuda_graph"
        except Exception:  # not capturable: time the direct launch
            graph, run = None, fn
            torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        for start, end in events:
            self.flush.zero_()  # the GPU is busy with this while the call is enqueued
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
        del graph
        return statistics.median(samples), how


# --- the run ----------------------------------------------------------------------------------------------

def versions(driver: Driver | None) -> dict:
    import triton

    found = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "triton": triton.__version__, "numpy": np.__version__}
    try:
        import nmn

        found["nmn"] = getattr(nmn, "__version__", "unknown")
    except ImportError:
        found["nmn"] = None
    if driver is not None:
        found["cuda_driver"] = driver.version()
    return found


def import_nmn():
    """nmn's YatNMN, from the environment or from a carried pure-Python wheel (ROOT/.whl/nmn-*.whl)."""
    try:
        from nmn.torch import YatNMN
        return YatNMN
    except ImportError:
        pass
    for wheel in sorted((ROOT / ".whl").glob("nmn-*.whl")):
        sys.path.insert(0, str(wheel))  # a pure-Python wheel imports from the zip
        try:
            from nmn.torch import YatNMN
            return YatNMN
        except ImportError:
            sys.path.remove(str(wheel))
    return None


def eager_forward(YatNMN, x, w, b):
    """(callable, description) of the eager YatNMN forward for these weights, or yatdeploy's reference."""
    if YatNMN is None:
        return (lambda xx: yat_gemm_reference(xx, w, b, EPS, ALPHA)), "yatdeploy.ops.torch_op.yat_gemm_reference"
    n, k = w.shape
    layer = YatNMN(k, n, bias=True, alpha=True, epsilon=EPS, device=w.device).to(w.dtype)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
        layer.alpha.fill_(ALPHA)
    layer.eval()
    return layer, "nmn.torch.YatNMN.forward"


def check_jit(report: Report, device: str, dtypes: list[str], quick: bool) -> None:
    """The JIT kernels on the check shapes with the config they choose, and every config on one shape.
    (Each config and shape class is a Triton JIT compile of 1-3 s; the AOT checks cover every config too.)"""
    results = report.data.setdefault("correctness", {}).setdefault("jit", [])
    shapes = CPU_CHECK_SHAPES if CPU_CHECK else (CHECK_SHAPES[:2] if quick else CHECK_SHAPES)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for si, (m, k, n) in enumerate(shapes):
            x, w, b = make_inputs(m, k, n, dtype, device, seed=100 + si)
            near = near_rows(x, w, list(range(0, m, 2)), seed=200 + si)
            every = si == 1 and not quick  # the aligned shape
            for config in [None, *(TILE_CONFIGS if every else ())]:
                row = {"m": m, "k": k, "n": n, "dtype": dtype_name, "config": config or "auto"}
                try:
                    cfg = TILE_CONFIGS[config] if config else None
                    y = yat_gemm(x, w, b, EPS, ALPHA, config=cfg)
                    row.update(compare(y, x, w, b, list(range(m))))
                    y_near = yat_gemm(near, w, b, EPS, ALPHA, config=cfg)
                    result = compare(y_near, near, w, b, list(range(m)), only=list(range(0, m, 2)))
                    row.update({f"{key}_near": value for key, value in result.items()})
                    ok = row["within_bound"] and row["within_bound_near"]
                except Exception as exc:
                    row["error"], ok = f"{type(exc).__name__}: {exc}", False
                results.append(row)
                if not ok:
                    report.fail(f"jit {row}")
    report.write()


def check_aot(report: Report, art: Artifacts, driver: Driver | None, device: str, dtypes: list[str]) -> None:
    """The AOT artifacts, launched as the ORT host and TensorRT launch them; under --cpu-check only the
    launch plans are built and checked against the PTX parameter lists."""
    results = report.data.setdefault("correctness", {}).setdefault("aot", [])
    archs = sorted({e["arch"] for e in art.manifest["entries"]})
    shapes = CPU_CHECK_SHAPES if CPU_CHECK else CHECK_SHAPES
    capability = torch.cuda.get_device_capability() if driver else (9, 0)
    # (host, arch, load the PTX?) as each host would on this GPU, plus sm_80 PTX as a newer GPU gets it.
    combos = []
    for arch in archs:
        if arch == "sm_90a" and tuple(capability) != (9, 0):
            continue
        combos.append(("ort", arch, arch == "sm_80" and tuple(capability) >= (9, 0)))
        combos.append(("trt", arch, True))
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for si, (m, k, n) in enumerate(shapes):
            x, w, b = make_inputs(m, k, n, dtype, device, seed=300 + si)
            for host, arch, use_ptx in combos:
                # The driver JIT-compiles each PTX it loads (about a second each): the sm_80 PTX, which only
                # GPUs newer than 9.0 would load, is checked in float16 only.
                if arch == "sm_80" and use_ptx and not CPU_CHECK and dtype_name != "float16":
                    continue
                if host == "ort":
                    variants = [None, *TILE_CONFIGS]
                else:
                    variants = [t.id for t in plugin_logic.TACTICS if dtype_name in t.dtypes]
                for choice in variants:
                    row = {"host": host, "arch": arch, "loads": "ptx" if use_ptx else "cubin", "m": m, "k": k, "n": n,
                           "dtype": dtype_name, "config": choice if host == "ort" else plugin_logic.tactic(choice).config}
                    if host == "ort" and choice is None:
                        row["config"] = f"auto ({choose_config(m, n, k, dtype_name).name})"
                    y = torch.full((m, n), float("nan"), dtype=dtype, device=device)  # poison
                    try:
                        if host == "ort":
                            launches, buffers = ort_plan(art, arch, use_ptx, x, w, b, y, choice)
                        else:
                            launches, buffers = [trt_plan(art, arch, choice, x, w, b, y)], []
                        row["entries"] = [f"{launch.entry['ptx'].removesuffix('.ptx')}" for launch in launches]
                        for launch in launches:
                            launch.check_against_ptx(art.folder)
                        if driver is None:
                            row["launched"] = False
                            ok = True
                        else:
                            run_launches(driver, art, launches)
                            torch.cuda.synchronize()
                            row["launched"] = True
                            row.update(compare(y, x, w, b, list(range(m))))
                            ok = row["within_bound"]
                        del buffers
                    except LookupError as exc:  # not built (e.g. --quick, or the CPU check's few entries)
                        row["skipped"] = str(exc)
                        ok = True
                    except Exception as exc:
                        row["error"], ok = f"{type(exc).__name__}: {exc}", False
                    results.append(row)
                    if not ok:
                        report.fail(f"aot {row}")
    report.write()


def time_cases(report: Report, timer: Timer | None, shapes, dtypes: list[str], device: str, budget_s: float) -> None:
    """The cases table: the JIT kernel, cuBLAS, eager and torch.compile, with correctness per case."""
    YatNMN = import_nmn()
    cases = report.data.setdefault("cases", [])
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for si, (m, k, n) in enumerate(shapes):
            case = {"m": m, "k": k, "n": n, "dtype": dtype_name, "config": choose_config(m, n, k, dtype_name).name}
            cases.append(case)
            print(f"case {dtype_name} M={m} K={k} N={n} ({case['config']})", flush=True)
            try:
                x, w, b = make_inputs(m, k, n, dtype, device, seed=si)
                w_sq = row_sq_norms(w)
                rows = sample_rows(m)
                with torch.no_grad():
                    y = yat_gemm(x, w, b, EPS, ALPHA, w_sq=w_sq)
                    case.update(compare(y, x, w, b, rows))
                    del y
                    near_set = rows[: min(len(rows), 64)]
                    near = near_rows(x, w, near_set, seed=500 + si)
                    result = compare(yat_gemm(near, w, b, EPS, ALPHA, w_sq=w_sq), near, w, b, rows, only=near_set)
                    case.update({f"{key}_near": value for key, value in result.items()})
                    del near
                    eager, case["eager"] = eager_forward(YatNMN, x, w, b)
                    case["eager_max_rel_err"] = compare(eager(x), x, w, b, rows)["max_rel_err"]
                    if not case["within_bound"]:
                        report.fail(f"case {dtype_name} {m}x{k}x{n}: the JIT kernel is outside the rounding bound")
                    if timer is not None:
                        _time_case(report, timer, case, x, w, b, w_sq, eager, rows, budget_s)
                    else:
                        for key in ("yat_ms", "cublas_ms", "eager_ms", "compiled_ms", "ratio_vs_cublas"):
                            case[key] = None
                    del eager
            except Exception as exc:
                case["error"] = f"{type(exc).__name__}: {exc}"
                report.fail(f"case {dtype_name} {m}x{k}x{n}: {case['error']}")
                traceback.print_exc()
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
            report.write()


def _time_case(report: Report, timer: Timer, case: dict, x, w, b, w_sq, eager, rows: list[int],
               budget_s: float) -> None:
    m, k, n = case["m"], case["k"], case["n"]
    case["yat_ms"], case["timing"] = _ms(timer(lambda: yat_gemm(x, w, b, EPS, ALPHA, w_sq=w_sq)))
    case["yat_with_norms_ms"], _ = _ms(timer(lambda: yat_gemm(x, w, b, EPS, ALPHA)))
    case["cublas_ms"], _ = _ms(timer(lambda: torch.matmul(x, w.t())))
    case["eager_ms"], _ = _ms(timer(lambda: eager(x)))
    if report.elapsed() < budget_s:
        torch._dynamo.reset()
        compiled = torch.compile(eager)
        started = time.perf_counter()
        case["compiled_max_rel_err"] = compare(compiled(x), x, w, b, rows)["max_rel_err"]
        case["compile_s"] = round(time.perf_counter() - started, 1)
        case["compiled_ms"], _ = _ms(timer(lambda: compiled(x)))
    else:
        case["compiled_ms"] = None
        case["compiled_skipped"] = "time budget"
    case["ratio_vs_cublas"] = _ratio(case["yat_ms"], case["cublas_ms"])
    case["ratio_vs_compiled"] = _ratio(case["yat_ms"], case.get("compiled_ms"))
    case["ratio_vs_eager"] = _ratio(case["yat_ms"], case["eager_ms"])
    case["yat_tflops"] = _round(2 * m * n * k / case["yat_ms"] / 1e9, 4)
    case["cublas_tflops"] = _round(2 * m * n * k / case["cublas_ms"] / 1e9, 4)


def sweep(report: Report, timer: Timer, art: Artifacts, driver: Driver, shapes, dtypes: list[str],
          budget_s: float) -> None:
    """While the budget lasts: the JIT kernel per plausible tile config, and the TensorRT entry (|w|² from
    its tiles) per tactic, launched through the driver as TensorRT would."""
    rows = report.data.setdefault("sweep", [])
    capability = torch.cuda.get_device_capability()
    arch = plugin_logic.arch_for(capability, art.manifest)
    device = plugin_logic.current_device()
    limit = plugin_logic.shared_memory_limit(arch, device[1] if device else None)
    for dtype_name in dtypes:
        for si, (m, k, n) in enumerate(shapes):
            if report.elapsed() > budget_s:
                report.data["sweep_skipped"] = "time budget reached"
                report.write()
                return
            _sweep_shape(report, timer, art, driver, rows, arch, limit, m, k, n, dtype_name, seed=si,
                         budget_s=budget_s)
            _best_of_sweep(report, rows, m, k, n, dtype_name)
            torch.cuda.empty_cache()
            report.write()


def _sweep_shape(report: Report, timer: Timer, art: Artifacts, driver: Driver, rows: list[dict], arch: str,
                 limit: int, m: int, k: int, n: int, dtype_name: str, seed: int, budget_s: float) -> None:
    dtype = DTYPES[dtype_name]
    x, w, b = make_inputs(m, k, n, dtype, "cuda", seed=seed)
    w_sq = row_sq_norms(w)
    for name, config in TILE_CONFIGS.items():
        plausible = (m <= 16 and config.block_m <= 64) or (16 < m <= 64 and config.split_k == 1) or \
                    (m > 64 and config.split_k == 1 and config.block_m >= 64)
        if not plausible or report.elapsed() > budget_s:
            continue
        row = {"m": m, "k": k, "n": n, "dtype": dtype_name, "kernel": "jit yat_gemm", "config": name}
        try:
            row["ms"], _ = _ms(timer(lambda c=config: yat_gemm(x, w, b, EPS, ALPHA, w_sq=w_sq, config=c)))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    y = torch.empty((m, n), dtype=dtype, device="cuda")
    for tactic in plugin_logic.tactics(art.manifest, arch, dtype_name, limit):
        if report.elapsed() > budget_s:
            break
        row = {"m": m, "k": k, "n": n, "dtype": dtype_name, "kernel": f"trt yat_gemm_trt ({arch} PTX)",
               "config": plugin_logic.tactic(tactic).config, "tactic": tactic}
        try:
            launch = trt_plan(art, arch, tactic, x, w, b, y)
            row["shared_memory_bytes"] = launch.entry["shared_memory_bytes"]
            row["ms"], _ = _ms(timer(lambda one=launch: run_launches(driver, art, [one])))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)


def _best_of_sweep(report: Report, rows: list[dict], m: int, k: int, n: int, dtype: str) -> None:
    """The fastest JIT config and TensorRT tactic of this shape, into its case."""
    case = next((c for c in report.data.get("cases", []) if (c["m"], c["k"], c["n"], c["dtype"]) == (m, k, n, dtype)), None)
    if case is None:
        return
    for prefix, kind in (("jit_best", "jit"), ("trt_best", "trt")):
        timed = [r for r in rows if (r["m"], r["k"], r["n"], r["dtype"]) == (m, k, n, dtype)
                 and r["kernel"].startswith(kind) and r.get("ms")]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            case[f"{prefix}_ms"], case[f"{prefix}_config"] = best["ms"], best["config"]


def _ms(result: tuple[float, str]) -> tuple[float, str]:
    return _round(result[0], 4), result[1]


def _ratio(a: float | None, b: float | None) -> float | None:
    return _round(a / b, 3) if a and b else None


def device_tag(name: str) -> str:
    for tag in ("H100", "H200"):
        if tag in name:
            return tag.lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <date>-<device>.json")
    parser.add_argument("--quick", action="store_true",
                        help=f"dtypes {', '.join(QUICK_DTYPES)}, shapes {QUICK_SHAPES}, sm_90a only, no sweep")
    parser.add_argument("--cpu-check", action="store_true", help="no GPU: interpreter, tiny shapes, no timing")
    parser.add_argument("--kernels", type=Path, help="use these AOT artifacts (a folder with manifest.json)")
    parser.add_argument("--reps", type=int, default=50, help="timed samples per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="after this many seconds, skip torch.compile and the sweep (the device allows 600)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 12), help="AOT compile processes")
    parser.add_argument("--commit", help="the yatdeploy commit this checkout is (recorded)")
    args = parser.parse_args()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    if CPU_CHECK:
        device, driver, name = "cpu", None, "cpu (Triton interpreter)"
        path = args.out_dir / f"{today}-cpu-check.json"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-check on a machine without a GPU", file=sys.stderr)
            return 2
        device, name = "cuda", torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 cuBLAS (and eager/compiled) in IEEE float32
        torch.backends.cudnn.allow_tf32 = False
        driver = Driver()
        path = args.out_dir / f"{today}-{device_tag(name)}.json"
    report = Report(path)
    import_nmn()  # before versions(): a carried wheel is put on the path here
    report.data.update({
        "what": "YatGemm Triton kernels: correctness vs float64 (JIT and AOT as the ORT host and TensorRT launch "
                "them) and timing vs cuBLAS, eager YatNMN and torch.compile; benchmarks/gpu/run_yat_gemm.py",
        "date": today,
        "device": name,
        "capability": list(torch.cuda.get_device_capability()) if driver else None,
        "versions": versions(driver),
        "command": shlex.join(["python3", *sys.argv]),
        "commit": args.commit,
        "settings": {"eps": EPS, "alpha": ALPHA, "reps": args.reps, "warmup": args.warmup, "tf32": False,
                     "timing": "CUDA events around one call replayed from a CUDA graph, L2 flushed before each; median",
                     "inputs": "x, w ~ N(0, 1/K), bias 1 + 0.1 N(0, 1); *_near: rows x = w + 1% noise",
                     "reference_rows": REFERENCE_ROWS, "quick": args.quick, "budget_s": args.budget_s},
        "failures": [],
    })
    dtypes = list(QUICK_DTYPES) if args.quick else list(DTYPES)
    shapes = CPU_SHAPES if CPU_CHECK else (QUICK_SHAPES if args.quick else SHAPES)
    report.write()

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        art = None
        try:
            if args.kernels:
                art = Artifacts(args.kernels, json.loads((args.kernels / "manifest.json").read_text()))
            else:
                art = build_artifacts(Path(tmp) / "gpu_kernels", args.quick, args.jobs)
            report.data["aot"] = {"source": str(args.kernels) if args.kernels else "built by this run",
                                  "triton_version": art.manifest.get("triton_version"),
                                  "kernel_source_sha256": art.manifest.get("kernel_source_sha256"),
                                  "entries": len(art.manifest["entries"]),
                                  "seconds": round(time.perf_counter() - started, 1)}
            print(f"AOT: {len(art.manifest['entries'])} entries in {time.perf_counter() - started:.0f} s", flush=True)
        except Exception as exc:  # the JIT checks and the timing still run
            report.fail(f"AOT artifacts: {type(exc).__name__}: {exc}")
        report.data["eager_impl"] = "nmn.torch.YatNMN.forward" if import_nmn() else \
            "yatdeploy.ops.torch_op.yat_gemm_reference (nmn not importable)"
        check_jit(report, device, dtypes, args.quick)
        if art is not None:
            check_aot(report, art, driver, device, dtypes)
        timer = Timer(args.reps, args.warmup) if driver else None
        time_cases(report, timer, shapes, dtypes, device, args.budget_s)
        if driver and art is not None and not args.quick:
            sweep(report, timer, art, driver, shapes, dtypes, args.budget_s)
    report.write()
    print(f"wrote {path} ({len(report.data['failures'])} failures, {report.elapsed():.0f} s)", flush=True)
    return 1 if report.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
