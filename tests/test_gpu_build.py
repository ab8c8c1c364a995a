"""The GPU kernels' place in the package build and in the ONNX Runtime CUDA op, checked without a GPU.

The AOT compile runs without torch (as in the build's isolated environment); the C++ launch table the
build generates from the manifest is the manifest; the CUDA op's host logic (tile config, variant, grid,
workspace, the argument array in each entry's parameter order, the artifact per compute capability) is
called through the library's introspection functions (ctypes) and compared with the manifest and
yatdeploy.gpu.configs. Nothing here launches a kernel.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from yatdeploy import native
from yatdeploy.gpu import host_table
from yatdeploy.gpu.configs import TILE_CONFIGS, cdiv, choose_config, split_k_slices

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")  # the library's dtype codes 0, 1, 2
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.mark.slow
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


# --- the launch table generator (yatdeploy/gpu/host_table.py) ---------------------------------------------


def _entry(**changes) -> dict:
    config = TILE_CONFIGS["small_m"]
    entry = {
        "kernel": "yat_gemm", "arch": "sm_80", "dtype": "float16", "config": "small_m", "variant": "aligned",
        "float32_precision": None, "tile": config.as_dict(), "entry": "yat_gemm_kernel",
        "ptx": "k.ptx", "cubin": "k.cubin",
        "params": [{"name": n, "type": t} for n, t in [("x_ptr", "*fp16"), ("M", "i32"), ("eps", "fp32")]],
        "constants": {"stride_xk": 1}, "divisible_by_16": ["x_ptr"], "block": [128, 1, 1],
        "grid": ["cdiv(M, 16) * cdiv(N, 64)", "k_slices", "1"], "shared_memory_bytes": 1024,
    }
    entry.update(changes)
    return entry


def test_the_generated_table_lists_each_entry_in_parameter_order():
    manifest = {"triton_version": "3.7.1", "entries": [_entry(), _entry(kernel="yat_gemm_trt")]}
    header = host_table.cpp_header(manifest)
    assert header.count("Kernel::kYatGemm, 80, Dtype::kFloat16, 3, true, ") == 1  # the TensorRT entry is not the host's
    assert "{Param::kX, Param::kM, Param::kEps}" in header
    assert "(1u << int(Param::kX))" in header and "{{16, 64, false}, {0, 0, true}, {0, 0, false}}" in header
    assert host_table.grid_terms("cdiv(N, 64)") == (0, 64, False)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"params": [{"name": "stride_q", "type": "i32"}]}, "unknown to the ORT host"),
        ({"params": [{"name": "M", "type": "fp32"}]}, "the host passes i32"),
        ({"tile": {**TILE_CONFIGS["small_m"].as_dict(), "block_k": 32}}, "is not configs.py's"),
        ({"constants": {"stride_xk": 2}}, "not 1"),
        ({"grid": ["cdiv(K, 16)", "1", "1"]}, "is not cdiv"),
        ({"divisible_by_16": ["w_ptr"]}, "not a parameter"),
    ],
)
def test_the_generator_refuses_what_the_host_cant_launch(change, message):
    with pytest.raises(host_table.ManifestError, match=message):
        host_table.cpp_header({"entries": [_entry(**change)]})


# --- the CUDA op's host logic, from the installed library ------------------------------------------------


@pytest.fixture(scope="module")
def cuda_library():
    path = native.ort_cuda_library_path()
    manifest = native.gpu_kernels_manifest()
    if path is None or manifest is None:
        pytest.skip("the CUDA custom op and the GPU kernels were not built (no nvcc or no triton at install)")
    native.preload_dependencies()
    library = ctypes.CDLL(str(path))  # loads without a GPU or driver: libcuda.so.1 is opened at first launch
    library.yatdeploy_gpu_choose_config.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    library.yatdeploy_gpu_config_name.restype = ctypes.c_char_p
    library.yatdeploy_gpu_describe_entry.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    library.yatdeploy_gpu_describe_plan.argtypes = [
        ctypes.c_int, *[ctypes.c_int64] * 3, *[ctypes.c_uint64] * 5, ctypes.c_float, ctypes.c_float,
        ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
    return library, manifest


def _entries(library) -> list[dict]:
    out = ctypes.create_string_buffer(1 << 16)
    described = []
    for i in range(library.yatdeploy_gpu_entry_count()):
        assert library.yatdeploy_gpu_describe_entry(i, out, len(out)) == 0
        described.append(json.loads(out.value))
    return described


def test_the_librarys_launch_table_is_the_installed_manifest(cuda_library):
    library, manifest = cuda_library
    expected = host_table.host_entries(manifest)
    built = _entries(library)
    assert len(built) == len(expected) > 0
    for got, e in zip(built, expected):
        assert got["entry"] == e["entry"] and got["cubin"] == e["cubin"] and got["ptx"] == e["ptx"]
        assert got["params"] == [p["name"] for p in e["params"]], e["cubin"]
        assert (got["block"], got["shared_memory_bytes"]) == (e["block"][0], e["shared_memory_bytes"])
        assert got["divisible_by_16"] == [n for n in host_table.PARAMS if n in e["divisible_by_16"]]
        assert got["grid"] == [list(host_table.grid_terms(g)) for g in e["grid"]]
        assert (got["arch"], got["config"], got["aligned"]) == (host_table.ARCHS[e["arch"]], e["config"],
                                                                e["variant"] == "aligned")
        assert DTYPES[got["dtype"]] == e["dtype"] and list(host_table.KERNELS)[got["kernel"]] == e["kernel"]
    kernels_dir = native.gpu_kernels_dir()
    for e in expected:
        assert (kernels_dir / e["cubin"]).is_file() and (kernels_dir / e["ptx"]).is_file()


def test_the_cpp_chooser_is_choose_config(cuda_library):
    library, _ = cuda_library
    ms = (1, 2, 15, 16, 17, 63, 64, 65, 1000, 4096)
    ns = (1, 63, 64, 65, 131 * 64, 131 * 64 + 1, 132 * 64, 4096, 50304)
    ks = (0, 1, 63, 64, 1023, 1024, 1025, 4096)
    for m, n, k, (code, dtype) in itertools.product(ms, ns, ks, enumerate(DTYPES)):
        got = library.yatdeploy_gpu_config_name(library.yatdeploy_gpu_choose_config(m, n, k, code)).decode()
        assert got == choose_config(m, n, k, dtype).name, (m, n, k, dtype)


def _plan(library, dtype, m, n, k, *, x=0x10000, w=0x20000, b=0x30000, y=0x40000, w_sq=0, eps=1e-5, alpha=1.0,
          cc=(9, 0), workspace=0x50000):
    out = ctypes.create_string_buffer(1 << 16)
    status = library.yatdeploy_gpu_describe_plan(DTYPES.index(dtype), m, n, k, x, w, b, y, w_sq, eps, alpha,
                                                 *cc, workspace, out, len(out))
    assert status in (0, 1)
    if status == 1:
        return out.value.decode()
    plan = json.loads(out.value)
    for launch in plan["launches"]:  # float32 values are printed with 9 digits: read them back as float32
        launch["args"] = [float(np.float32(a)) if host_table.PARAMS[p][1] == "fp32" else a
                          for p, a in zip(launch["params"], launch["args"])]
    return plan


def _expected_arch(cc: tuple[int, int], archs: set[str]) -> tuple[str, bool]:
    """(manifest arch, JIT-compiled PTX?) as docs/gpu-kernel.md states the ORT host's choice."""
    if cc == (9, 0) and "sm_90a" in archs:
        return "sm_90a", False
    return "sm_80", cc[0] != 8


def _expected_plan(manifest, dtype, m, n, k, x, w, b, y, w_sq, eps, alpha, cc, workspace) -> dict:
    """The plan from the manifest and configs alone: what the C++ host must do."""
    entries = host_table.host_entries(manifest)
    arch, ptx = _expected_arch(cc, {e["arch"] for e in entries})
    config = choose_config(m, n, k, dtype)
    split = config.split_k > 1
    k_slices, k_per_slice = split_k_slices(k, config) if split else (1, 0)
    align = lambda size: -(-size // 256) * 256  # noqa: E731
    offset, values = 0, {"x_ptr": x, "w_ptr": w, "b_ptr": b, "y_ptr": y, "w_sq_ptr": w_sq, "M": m, "N": n, "K": k,
                         "k_per_slice": k_per_slice, "k_slices": k_slices, "stride_xm": k, "stride_wn": k,
                         "stride_ym": n, "has_bias": int(b != 0), "eps": float(np.float32(eps)),
                         "alpha": float(np.float32(alpha)), "partial_dot_ptr": 0, "partial_x_sq_ptr": 0}
    if not w_sq:
        values["w_sq_ptr"] = workspace
        offset += align(4 * n)
    if split:
        values["partial_dot_ptr"] = workspace + offset
        offset += align(4 * k_slices * m * n)
        values["partial_x_sq_ptr"] = workspace + offset
        offset += align(4 * k_slices * m)
    kernels = (["row_sq_norm"] if not w_sq else []) + (
        ["yat_gemm_split_k_partial", "yat_gemm_split_k_epilogue"] if split else ["yat_gemm"])
    launches = []
    for kernel in kernels:
        candidates = {e["variant"]: e for e in entries if (e["kernel"], e["arch"], e["dtype"]) == (kernel, arch, dtype)
                      and e["config"] == (None if kernel == "row_sq_norm" else config.name)}
        aligned = candidates.get("aligned")
        use = aligned if aligned and all(values[p] % 16 == 0 for p in aligned["divisible_by_16"]) else candidates["generic"]
        scope = {"cdiv": cdiv, "M": m, "N": n, "k_slices": k_slices}
        launches.append({
            "entry": use["entry"], "file": use["ptx"] if ptx else use["cubin"],
            "grid": [eval(g, scope) for g in use["grid"]], "block": use["block"][0],  # noqa: S307
            "shared_memory_bytes": use["shared_memory_bytes"], "params": [p["name"] for p in use["params"]],
            "args": [values[p["name"]] for p in use["params"]],
        })
    return {"config": config.name, "arch": host_table.ARCHS[arch], "ptx": ptx, "k_slices": k_slices,
            "k_per_slice": k_per_slice, "workspace_bytes": offset, "launches": launches}


PROBLEMS = [
    # dtype, m, n, k, overrides
    ("float16", 4096, 4096, 4096, {}),  # large, aligned
    ("float32", 300, 130, 96, {}),  # ragged K and N: generic
    ("bfloat16", 64, 4096, 4096, {"b": 0}),  # no bias: has_bias 0, b null
    ("float16", 1, 4096, 4096, {}),  # decode: split-K with its workspace
    ("float16", 16, 4096, 4096, {"w_sq": 0x60000}),  # |w|² cached: no row_sq_norm
    ("float16", 8, 50304, 768, {}),  # LM head: small_m without split
    ("float16", 256, 1024, 1024, {"x": 0x10002}),  # X not 16-byte aligned: generic gemm, aligned norms
    ("float32", 5, 7, 3, {"cc": (8, 6)}),  # Ampere consumer: sm_80 cubin
    ("float16", 5, 64, 64, {"cc": (12, 0)}),  # newer than any cubin: sm_80 PTX through the JIT
    ("float16", 5, 64, 64, {"cc": (9, 0), "eps": 0.25, "alpha": -3.5}),
]


@pytest.mark.parametrize("dtype,m,n,k,overrides", PROBLEMS)
def test_the_cuda_ops_plan_follows_the_manifest(cuda_library, dtype, m, n, k, overrides):
    library, manifest = cuda_library
    arguments = {"x": 0x10000, "w": 0x20000, "b": 0x30000, "y": 0x40000, "w_sq": 0, "eps": 1e-5, "alpha": 1.0,
                 "cc": (9, 0), "workspace": 0x50000, **overrides}
    got = _plan(library, dtype, m, n, k, **arguments)
    assert isinstance(got, dict), got
    assert got == _expected_plan(manifest, dtype, m, n, k, **arguments)


def test_the_cuda_op_refuses_what_the_kernels_cant_take(cuda_library):
    library, _ = cuda_library
    assert "compute capability 8.0 or newer; this GPU has 7.5" in _plan(library, "float16", 4, 4, 4, cc=(7, 5))
    assert "does not fit the kernels' 32-bit parameters" in _plan(library, "float16", 2**31, 64, 64)
    assert "32-bit" in _plan(library, "float32", 64, 64, 2**31)
