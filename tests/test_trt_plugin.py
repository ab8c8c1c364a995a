"""The YatGemm TensorRT plugin, everything of it that runs without TensorRT: the Triton kernel entries it
returns (built here into a temporary folder with yatdeploy.gpu.aot), their parameters against the
arguments TensorRT passes, the launch geometry and scalar arguments per tactic, the tactics per dtype,
the checks on inputs, the signatures tensorrt.plugin will validate, and (where a GPU and driver exist)
the kernels themselves, loaded from PTX and launched exactly as TensorRT launches an ahead-of-time
plugin."""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cuda_driver import Driver, load_driver
from yatdeploy import native
from yatdeploy.errors import YatDeployError
from yatdeploy.spec import PLUGIN_NAMESPACE, YAT_GEMM
from yatdeploy.trt import plugin_logic as logic

ROOT = Path(__file__).resolve().parents[1]
TACTIC = {t.config: t.id for t in logic.TACTICS}

# The entries the tests build (kernel, cc, dtype, variant, config): a few seconds of triton.compile.
TRT_JOBS = [
    ("yat_gemm_trt", 80, "float16", "aligned", "small_m"),
    ("yat_gemm_trt", 80, "float16", "generic", "small_m"),
    ("yat_gemm_trt", 80, "float16", "aligned", "large_16bit"),
    ("yat_gemm_trt", 80, "float16", "generic", "large_16bit"),
    ("yat_gemm_trt", 90, "float16", "aligned", "large_16bit"),
    ("yat_gemm_trt", 80, "float32", "aligned", "medium_m"),
    ("yat_gemm_trt", 80, "bfloat16", "aligned", "small_m"),
]
_BUILD = """
import json, sys
from pathlib import Path
from yatdeploy.gpu import aot
aot.build(Path(sys.argv[1]), [aot.KernelJob(*job) for job in json.loads(sys.argv[2])])
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """(folder, manifest) of TRT_JOBS, compiled in a process without Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the GPU kernels can't be compiled (pip install 'yatdeploy[gpu-kernels]')")
    out = tmp_path_factory.mktemp("gpu_kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _BUILD, str(out), json.dumps(TRT_JOBS)], check=True, env=env,
                   capture_output=True, text=True)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture
def installed(built, monkeypatch) -> tuple[Path, dict]:
    """The built kernels as if installed (native.gpu_kernels_dir / gpu_kernels_manifest)."""
    folder, manifest = built
    monkeypatch.setattr(native, "gpu_kernels_dir", lambda: folder)
    monkeypatch.setattr(native, "gpu_kernels_manifest", lambda: manifest)
    return built


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- the kernel's parameters against TensorRT's argument order ------------------------------------

def test_kernel_parameters_are_inputs_then_extra_args_then_outputs():
    assert logic.INPUT_PARAMS == tuple(f"{n.lower()}_ptr" for n in logic.INPUTS)
    assert logic.OUTPUT_PARAMS == tuple(f"{t.name.lower()}_ptr" for t in YAT_GEMM.outputs)
    assert logic.KERNEL_PARAMS == (*logic.INPUT_PARAMS, *logic.EXTRA_ARGS, *logic.OUTPUT_PARAMS)
    # The Triton kernel declares them in that order, before its constexprs (read as source: no triton).
    tree = ast.parse((ROOT / "yatdeploy" / "gpu" / "kernel.py").read_text())
    (kernel,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"{logic.TRT_KERNEL}_kernel"]
    runtime = [a.arg for a in kernel.args.args if a.annotation is None or "constexpr" not in ast.unparse(a.annotation)]
    assert tuple(runtime) == logic.KERNEL_PARAMS
    assert logic.PLUGIN_ID == f"{PLUGIN_NAMESPACE}::YatGemm"


@pytest.mark.slow
def test_every_built_entry_takes_exactly_what_tensorrt_passes(built):
    folder, manifest = built
    assert len(manifest["entries"]) == len(TRT_JOBS)
    for entry in manifest["entries"]:
        logic.check_entry(entry)  # X, W, B pointers, the int32 extra args, the Y pointer
        ptx = (folder / entry["ptx"]).read_text()
        logic.check_ptx(ptx, entry)
        declared = logic.ptx_entries(ptx)[entry["entry"]]
        args = logic.extra_args(entry, 3, 5, 4, 1e-5, 1.0)
        # What TensorRT hands the kernel: a 64-bit pointer per input, a 32-bit int per extra arg, a
        # 64-bit pointer per output, nothing else (Triton's scratch parameters were cut by aot.py).
        assert declared == ["u64"] * len(logic.INPUTS) + ["u32"] * len(args) + ["u64"] * len(YAT_GEMM.outputs)


@pytest.mark.slow
def test_the_plugin_returns_the_manifests_ptx_for_each_tactic(installed):
    folder, manifest = logic.kernels()
    assert folder == installed[0]
    for config, dtype, arch, variant in [("small_m", "float16", "sm_80", "aligned"),
                                         ("small_m", "float16", "sm_80", "generic"),
                                         ("large_16bit", "float16", "sm_90a", "aligned"),
                                         ("medium_m", "float32", "sm_80", "aligned"),
                                         ("small_m", "bfloat16", "sm_80", "aligned")]:
        entry = logic.select_entry(manifest, arch, dtype, TACTIC[config], variant)
        assert (entry["kernel"], entry["config"], entry["dtype"], entry["arch"], entry["variant"]) == (
            logic.TRT_KERNEL, config, dtype, arch, variant)
        ptx = logic.read_ptx(folder, entry)
        assert ptx == (folder / entry["ptx"]).read_text()
        assert f".entry {entry['entry']}(" in ptx and f".target {arch}" in ptx
    with pytest.raises(YatDeployError, match="no yat_gemm_trt entry for sm_90a float16 small_m"):
        logic.select_entry(manifest, "sm_90a", "float16", TACTIC["small_m"], "aligned")
    with pytest.raises(YatDeployError, match="no tactic 99"):
        logic.select_entry(manifest, "sm_80", "float16", 99, "aligned")


@pytest.mark.slow
@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (7, 65, 33), (130, 70, 257), (4096, 4096, 4096), (8, 50304, 768)])
def test_launch_per_tactic_covers_every_output_once(built, m, n, k):
    _, manifest = built
    for entry in manifest["entries"]:
        tile = entry["tile"]
        launch = logic.launch(entry, m, n, k)
        tiles_m, tiles_n = _cdiv(m, tile["block_m"]), _cdiv(n, tile["block_n"])
        assert launch.grid == (tiles_m * tiles_n, 1, 1)  # one program per output tile
        assert (tiles_m - 1) * tile["block_m"] < m <= tiles_m * tile["block_m"]
        assert launch.block == (32 * tile["num_warps"], 1, 1) == tuple(entry["block"])
        assert launch.shared_memory == entry["shared_memory_bytes"] > 0
        halves = [*logic.float_halves(1e-5), *logic.float_halves(-2.0)]
        assert logic.extra_args(entry, m, n, k, 1e-5, -2.0) == [m, n, k, *halves]


def test_plugin_types_spell_tensorrt_as_the_dtype_table():
    from yatdeploy import dtypes

    # plugin_logic keeps its own spellings (it imports no torch); they must be the table's.
    for t in logic.PLUGIN_TYPES:
        assert t.trt == dtypes.by_name(t.dtype).tensorrt
        assert t.autotune == dtypes.by_name(t.dtype).v2


def test_launch_refuses_a_block_that_is_not_32_threads_per_warp():
    entry = {"ptx": "k.ptx", "grid": ["M", "1", "1"], "block": [64, 1, 1], "num_warps": 4, "shared_memory_bytes": 0}
    with pytest.raises(YatDeployError, match=r"k.ptx: block \(64, 1, 1\) is not 32·num_warps"):
        logic.launch(entry, 3, 5, 4)
    assert logic.launch({**entry, "num_warps": 2}, 3, 5, 4).block == (64, 1, 1)


@pytest.mark.slow
def test_launch_shared_memory_per_tactic(built):
    # Dynamic shared memory as Triton compiled it; above 48 KB TensorRT must raise the kernel's limit
    # (open, docs/tensorrt.md). Recorded here so that a change shows.
    _, manifest = built
    shared = {(e["arch"], e["dtype"], e["config"], e["variant"]): e["shared_memory_bytes"] for e in manifest["entries"]}
    assert shared[("sm_80", "float16", "small_m", "aligned")] <= logic.DEFAULT_DYNAMIC_SHARED_LIMIT
    assert shared[("sm_80", "float16", "large_16bit", "aligned")] > logic.DEFAULT_DYNAMIC_SHARED_LIMIT
    assert shared[("sm_80", "float32", "medium_m", "aligned")] > logic.DEFAULT_DYNAMIC_SHARED_LIMIT
    for (arch, *_), value in shared.items():
        assert value <= logic.DEFAULT_MAX_SHARED_MEMORY[arch]


class _Sym:
    """A symbolic integer with only the operators tensorrt.plugin's SymIntExpr has (no reflected ones)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def _op(self, op: str, other) -> _Sym:
        return _Sym(f"({self.text} {op} {other.text if isinstance(other, _Sym) else other})")

    def __add__(self, other):
        return self._op("+", other)

    def __mul__(self, other):
        return self._op("*", other)

    def __floordiv__(self, other):
        return self._op("//", other)


@pytest.mark.slow
def test_the_arithmetic_builds_symbolic_expressions(built):
    _, manifest = built
    entry = next(e for e in manifest["entries"] if e["config"] == "small_m")
    m = logic.rows([_Sym("d0"), _Sym("d1"), _Sym("k")], _Sym("1"))
    assert m.text == "(d0 * d1)"
    launch = logic.launch(entry, m, _Sym("n"), _Sym("k"))
    assert launch.grid[0].text == "((((d0 * d1) + 15) // 16) * ((n + 63) // 64))"
    assert launch.grid[1:] == (1, 1)
    args = logic.extra_args(entry, m, _Sym("n"), _Sym("k"), 1e-5, 2.0)
    assert [a.text if isinstance(a, _Sym) else a for a in args[:3]] == ["(d0 * d1)", "n", "k"]


def test_grid_formulas_are_evaluated_without_eval():
    assert logic.grid_value("cdiv(M, 128) * cdiv(N, 64)", {"M": 300, "N": 65}) == 3 * 2
    assert logic.grid_value("1", {}) == 1
    for bad in ("__import__('os')", "M - 1", "cdiv(M, N)", "X"):
        with pytest.raises(ValueError, match="grid formula"):
            logic.grid_value(bad, {"M": 3, "N": _Sym("n")})  # cdiv only by a constant


@pytest.mark.parametrize("value", [1e-5, 1.0, -0.84394413, 3.0e38, -1e-30, 0.0, 7.5])
def test_floats_travel_as_two_nonnegative_16_bit_halves(value):
    high, low = logic.float_halves(value)
    assert 0 <= high <= 0xFFFF and 0 <= low <= 0xFFFF
    assert logic.float_from_halves(high, low) == np.float32(value)


@pytest.mark.slow
def test_entry_and_ptx_checks_name_the_difference(built):
    folder, manifest = built
    entry = manifest["entries"][0]
    swapped = dict(entry, params=[*entry["params"][:3], entry["params"][-1], *entry["params"][3:-1]])
    with pytest.raises(YatDeployError, match="TensorRT passes"):
        logic.check_entry(swapped)  # the output before the extra args: the ORT-style order
    with pytest.raises(YatDeployError, match="takes eps"):
        logic.extra_args(dict(entry, params=[*entry["params"][:3], {"name": "eps", "type": "fp32"},
                                             entry["params"][-1]]), 1, 1, 1, 1e-5, 1.0)
    ptx = (folder / entry["ptx"]).read_text()
    with pytest.raises(YatDeployError, match="has no kernel"):
        logic.check_ptx(ptx.replace(entry["entry"], "other"), entry)
    with pytest.raises(YatDeployError, match="the manifest says"):
        logic.check_ptx(ptx, dict(entry, params=entry["params"][:-1]))


# --- tactics ---------------------------------------------------------------------------------------

def _manifest(shared: dict[tuple[str, str], int], archs=("sm_80", "sm_90a"), variants=("aligned", "generic")) -> dict:
    """A manifest of yat_gemm_trt entries with the given shared memory per (dtype, config)."""
    return {"entries": [
        {"kernel": logic.TRT_KERNEL, "arch": arch, "dtype": dtype, "config": config, "variant": variant,
         "float32_precision": "ieee" if dtype == "float32" else None, "shared_memory_bytes": value}
        for arch in archs for variant in variants for (dtype, config), value in shared.items()
    ]}


# sm_80 figures of the AOT build (yatdeploy.gpu.aot, triton 3.7.1), bytes.
SM80_SHARED = {
    ("float32", "large_16bit"): 131072, ("float32", "large_float32"): 65536, ("float32", "medium_m"): 73728,
    ("float32", "small_m"): 61440, ("float16", "large_16bit"): 65536, ("float16", "large_float32"): 32768,
    ("float16", "medium_m"): 36864, ("float16", "small_m"): 30720,
}
SM80_SHARED.update({("bfloat16", c): v for (d, c), v in list(SM80_SHARED.items()) if d == "float16"})


def test_tactics_are_the_one_pass_configs_meant_for_the_dtype():
    manifest = _manifest(SM80_SHARED)
    big = logic.DEFAULT_MAX_SHARED_MEMORY["sm_80"]
    ids = {dtype: logic.tactics(manifest, "sm_80", dtype, big) for dtype in ("float32", "float16", "bfloat16")}
    assert ids == {
        "float32": [TACTIC["large_float32"], TACTIC["medium_m"], TACTIC["small_m"]],
        "float16": [TACTIC["large_16bit"], TACTIC["medium_m"], TACTIC["small_m"]],
        "bfloat16": [TACTIC["large_16bit"], TACTIC["medium_m"], TACTIC["small_m"]],
    }
    # A device limit (or $YATDEPLOY_TRT_MAX_SHARED_MEMORY) drops what does not fit: at 48 KB float32
    # has no tactic left.
    assert logic.tactics(manifest, "sm_80", "float16", 48 * 1024) == [TACTIC["medium_m"], TACTIC["small_m"]]
    assert logic.tactics(manifest, "sm_80", "float32", 48 * 1024) == []
    # A config missing in one variant is not offered (either alignment must find its entry).
    partial = _manifest(SM80_SHARED)
    partial["entries"] = [e for e in partial["entries"] if (e["config"], e["variant"]) != ("small_m", "generic")]
    assert TACTIC["small_m"] not in logic.tactics(partial, "sm_80", "float16", big)
    # tf32x3 entries are never offered: float32 stays at float32 accuracy.
    tf32 = _manifest({("float32", "small_m"): 1024})
    for e in tf32["entries"]:
        e["float32_precision"] = "tf32x3"
    assert logic.tactics(tf32, "sm_80", "float32", big) == []


def test_tactics_cover_the_tile_configs_without_split_k():
    from yatdeploy.gpu.configs import TILE_CONFIGS, choose_config

    ids = [t.id for t in logic.TACTICS]
    assert len(set(ids)) == len(ids) and all(i > 0 for i in ids)  # tensorrt.plugin: positive ints
    one_pass = {name for name, c in TILE_CONFIGS.items() if c.split_k == 1}
    assert {t.config for t in logic.TACTICS} == one_pass
    # Whatever the Python entry would choose without split-K is offered for that dtype.
    for dtype in ("float32", "float16", "bfloat16"):
        offered = {t.config for t in logic.TACTICS if dtype in t.dtypes}
        for m, n, k in [(1, 50304, 768), (64, 4096, 4096), (4096, 4096, 4096)]:
            assert choose_config(m, n, k, dtype).name in offered


@pytest.mark.slow
def test_tactics_of_the_built_entries(built):
    _, manifest = built
    assert logic.tactics(manifest, "sm_80", "float16", 10**6) == [TACTIC["large_16bit"], TACTIC["small_m"]]
    assert logic.tactics(manifest, "sm_80", "float32", 10**6) == [TACTIC["medium_m"]]
    assert logic.tactics(manifest, "sm_90a", "float16", 10**6) == [TACTIC["large_16bit"]]


def test_shared_memory_limit(monkeypatch):
    monkeypatch.delenv(logic.ENV_MAX_SHARED_MEMORY, raising=False)
    assert logic.shared_memory_limit("sm_90a", None) == logic.DEFAULT_MAX_SHARED_MEMORY["sm_90a"]
    assert logic.shared_memory_limit("sm_80", 101376) == 101376
    monkeypatch.setenv(logic.ENV_MAX_SHARED_MEMORY, "49152")
    assert logic.shared_memory_limit("sm_90a", 232448) == 49152
    monkeypatch.setenv(logic.ENV_MAX_SHARED_MEMORY, "lots")
    with pytest.raises(YatDeployError, match="number of bytes"):
        logic.shared_memory_limit("sm_80", None)


def test_arch_and_variant_choice():
    both = _manifest({("float16", "small_m"): 1})
    assert logic.arch_for((9, 0), both) == "sm_90a"  # wgmma PTX loads on 9.0 only
    for capability in [(8, 0), (8, 6), (8, 9), (10, 0), (12, 0)]:
        assert logic.arch_for(capability, both) == "sm_80"  # mma.sync PTX, JIT-compiled by the driver
    assert logic.arch_for((9, 0), _manifest({("float16", "small_m"): 1}, archs=("sm_80",))) == "sm_80"
    with pytest.raises(YatDeployError, match="8.0 or newer; this GPU has 7.5"):
        logic.arch_for((7, 5), both)
    with pytest.raises(YatDeployError, match="no TensorRT entry"):
        logic.arch_for((8, 0), _manifest({("float16", "small_m"): 1}, archs=("sm_90a",)))
    assert logic.variant_for(4096, 14336) == "aligned"
    assert logic.variant_for(300, 64) == logic.variant_for(64, 70) == "generic"
    assert logic.variant_for(None, 64) == "generic"  # K unknown at build time


def test_missing_kernels_say_what_to_do(monkeypatch):
    monkeypatch.setattr(native, "gpu_kernels_dir", lambda: None)
    monkeypatch.setattr(native, "gpu_kernels_manifest", lambda: None)
    with pytest.raises(YatDeployError, match="were not built") as error:
        logic.kernels()
    assert "nvcc" in str(error.value) and "triton" in str(error.value)


def test_no_driver_no_device():
    if load_driver() is not None:
        pytest.skip("a CUDA driver is present here")
    assert logic.current_device() is None


# --- inputs ----------------------------------------------------------------------------------------

def test_rows_and_output_shape():
    assert logic.rows([5, 16], 1) == 5
    assert logic.rows([2, 3, 4, 16], 1) == 24
    assert logic.rows([16], 1) == 1
    assert logic.output_dims([2, 3, 16], [10, 16]) == [2, 3, 10]
    assert logic.output_dims([16], [10, 16]) == [10]


def test_batched_output_shape_broadcasts_as_the_reference():
    from yatdeploy.ops.reference import output_shape

    for x, w in [((2, 3, 5, 16), (2, 3, 7, 16)), ((2, 1, 5, 16), (1, 3, 7, 16)), ((5, 16), (2, 3, 7, 16)),
                 ((3, 5, 8), (2, 3, 7, 8)), ((4, 2, 3, 5, 8), (3, 7, 8)), ((1, 4, 1, 64), (1, 4, 0, 64))]:
        assert tuple(logic.output_dims(x, w)) == output_shape(x, w), (x, w)
    with pytest.raises(logic.PluginInputError, match="leading dimensions 3 and 4 of X and W do not broadcast"):
        logic.output_dims([2, 3, 5, 8], [2, 4, 7, 8])


def test_batched_output_shape_on_symbolic_dims_takes_the_hosts_broadcast():
    joined = []

    def broadcast(a, b):
        joined.append((a, b))
        return f"max({a}, {b})"

    assert logic.output_dims(["b", "h", "q", "d"], ["b", "h", "kv", "d"], broadcast) == [
        "max(b, b)", "max(h, h)", "q", "kv"]
    assert logic.output_dims(["q", "d"], ["b", "h", "kv", "d"], broadcast) == ["b", "h", "q", "kv"]
    assert joined == [("b", "b"), ("h", "h")]  # a missing dimension is not joined: it is the other side's


def test_slices_are_the_launches_of_a_batched_w():
    # W [N, K] (or leading dims all 1): one launch over every row of X.
    assert logic.slices([2, 3, 16], [10, 16]) == logic.Slices(6, 10, 16, ((0, 0, 0),))
    assert logic.slices([2, 3, 4, 16], [1, 1, 10, 16]) == logic.Slices(24, 10, 16, ((0, 0, 0),))
    assert logic.slices([16], [10, 16]) == logic.Slices(1, 10, 16, ((0, 0, 0),))
    # The same leading dims: slice s of X against slice s of W into slice s of Y.
    same = logic.slices([2, 3, 5, 16], [2, 3, 7, 16])
    assert (same.m, same.n, same.k) == (5, 7, 16)
    assert same.offsets == tuple((s * 5 * 16, s * 7 * 16, s * 5 * 7) for s in range(6))
    # [B, 1, ...] against [1, H, ...]: each X slice once per head, each W slice once per batch.
    cross = logic.slices([2, 1, 5, 16], [1, 3, 7, 16])
    assert [(x // 80, w // 112, y // 35) for x, w, y in cross.offsets] == [
        (0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 0, 3), (1, 1, 4), (1, 2, 5)]
    # X of rank 2 against every slice of W; and empty products launch nothing.
    assert [x for x, _, _ in logic.slices([5, 16], [2, 3, 7, 16]).offsets] == [0] * 6
    assert logic.slices([1, 4, 1, 64], [1, 4, 0, 64]).offsets == ()
    assert logic.slices([1, 4, 0, 64], [1, 4, 9, 64]).offsets == ()
    assert logic.slices([0, 16], [10, 16]).offsets == ()


def test_slices_cover_y_as_the_reference_computes_it():
    """Running the 2-D product at each slice's offsets on flat buffers gives the reference's batched Y."""
    import torch

    from yatdeploy.ops.reference import yat_gemm_reference

    rng = np.random.default_rng(0)
    for x_shape, w_shape in [((2, 1, 3, 8), (1, 3, 4, 8)), ((3, 8), (2, 2, 5, 8)), ((2, 3, 2, 8), (3, 6, 8))]:
        x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
        work = logic.slices(x_shape, w_shape)
        y = np.full(math.prod(logic.output_dims(x_shape, w_shape)), np.nan)
        flat_x, flat_w = x.ravel(), w.ravel()
        for xo, wo, yo in work.offsets:
            xs = torch.from_numpy(flat_x[xo:xo + work.m * work.k].reshape(work.m, work.k))
            ws = torch.from_numpy(flat_w[wo:wo + work.n * work.k].reshape(work.n, work.k))
            y[yo:yo + work.m * work.n] = yat_gemm_reference(xs, ws, None, 1e-5, 1.0).numpy().ravel()
        want = yat_gemm_reference(torch.from_numpy(x), torch.from_numpy(w), None, 1e-5, 1.0).numpy()
        np.testing.assert_allclose(y.reshape(want.shape), want, rtol=1e-12)


def test_input_checks_name_what_the_plugin_cannot_take():
    assert logic.check_inputs([3, 2, 1], ["HALF"] * 3, batched_w=False).dtype == "float16"
    assert logic.check_inputs([4, 4, 1], ["BF16"] * 3, batched_w=True).dtype == "bfloat16"
    with pytest.raises(logic.PluginInputError, match="one dtype"):
        logic.check_inputs([2, 2, 1], ["FLOAT", "HALF", "FLOAT"], batched_w=False)
    with pytest.raises(logic.PluginInputError, match="has no INT8 kernel"):
        logic.check_inputs([2, 2, 1], ["INT8"] * 3, batched_w=False)
    with pytest.raises(logic.PluginInputError, match="ranks 2, 1, 1"):
        logic.check_inputs([2, 1, 1], ["FLOAT"] * 3, batched_w=True)
    with pytest.raises(logic.PluginInputError, match="ranks 1, 3, 1"):  # a batched W needs X [..., M, K]
        logic.check_inputs([1, 3, 1], ["FLOAT"] * 3, batched_w=True)
    with pytest.raises(logic.PluginInputError, match="ahead-of-time TensorRT plugin takes W \\[N, K\\] only, not a "
                                                     "batched W of rank 4"):
        logic.check_inputs([4, 4, 1], ["FLOAT"] * 3, batched_w=False)
    with pytest.raises(logic.PluginInputError, match="takes 3 inputs"):
        logic.check_inputs([2, 2], ["FLOAT"] * 2, batched_w=False)


def test_autotune_declares_one_dtype_for_all_io():
    assert [logic.io_types(t) for t in logic.PLUGIN_TYPES] == [", ".join([s] * 4) for s in ("FP32", "FP16", "BF16")]


def test_describe():
    report = logic.describe()
    assert report["kernel"] == logic.TRT_KERNEL and report["kernel_params"] == list(logic.KERNEL_PARAMS)
    assert [t["config"] for t in report["tactics"]] == ["large_16bit", "large_float32", "medium_m", "small_m"]
    assert "workspace" in report["split_k"]
    json.dumps(report)


# --- the tensorrt.plugin definitions, read as source (TensorRT can't be imported here) -------------

def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_plugin_definitions_have_the_signatures_tensorrt_plugin_requires():
    source = ROOT / "yatdeploy" / "trt" / "plugin.py"
    future = [a.name for node in ast.parse(source.read_text()).body if isinstance(node, ast.ImportFrom)
              and node.module == "__future__" for a in node.names]
    assert "annotations" not in future, "tensorrt.plugin needs the annotations as classes, not strings"
    functions = _functions(source)
    inputs = [n.lower() for n in logic.INPUTS]

    def params(name: str) -> list[str]:
        return [a.arg for a in functions[name].args.args]

    def decorator_id(name: str) -> tuple[str, str]:
        (call,) = functions[name].decorator_list
        return call.func.attr, ast.unparse(call.args[0])

    assert decorator_id("yat_gemm_desc") == ("register", "logic.PLUGIN_ID")
    assert params("yat_gemm_desc") == inputs + list(logic.ATTRIBUTES)
    assert decorator_id("yat_gemm_autotune") == ("autotune", "logic.PLUGIN_ID")
    assert params("yat_gemm_autotune") == inputs + ["outputs"]
    # get_launch_params passes every attribute positionally, in registration order.
    assert decorator_id("yat_gemm_aot_impl") == ("aot_impl", "logic.PLUGIN_ID")
    assert params("yat_gemm_aot_impl") == inputs + list(logic.ATTRIBUTES) + ["outputs", "tactic"]
    for name in ("yat_gemm_desc", "yat_gemm_autotune", "yat_gemm_aot_impl"):
        assert functions[name].returns is not None, f"{name} needs a return annotation"
        for arg in functions[name].args.args:
            assert arg.annotation is not None, f"{name}({arg.arg}) needs an annotation"
    aot_return = ast.unparse(functions["yat_gemm_aot_impl"].returns)
    assert aot_return == "tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]"


# --- the kernels on a GPU, launched as TensorRT launches them --------------------------------------

def _bf16_round(a: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


_STORAGE = {
    "float32": (np.float32, lambda a: a.astype(np.float32), lambda s: s.astype(np.float64), 3.4028235e38),
    "float16": (np.float16, lambda a: a.astype(np.float16), lambda s: s.astype(np.float64), 65504.0),
    "bfloat16": (np.uint16, _bf16_round, lambda s: _bf16_to_f32(s).astype(np.float64), 3.38953139e38),
}


def _float32_bound(x, w, b, eps, alpha, dtype):
    """A rigorous bound on |y − y64| for float32 sums (γ = (K + 8)·2⁻²⁴ each) carried through the
    formula without linearising, plus the rounding to `dtype` (tests/test_gpu_kernel.py's bound)."""
    k = x.shape[1]
    dot, abs_dot = x @ w.T, np.abs(x) @ np.abs(w).T
    x_sq, w_sq = (x * x).sum(-1)[:, None], (w * w).sum(-1)[None, :]
    dist = np.maximum(x_sq + w_sq - 2 * dot, 0)
    gamma = (k + 8) * 2.0**-24
    z, z_err = np.abs(dot + b), gamma * (abs_dot + np.abs(b))
    dist_err = gamma * (x_sq + w_sq + 2 * abs_dot)
    y = abs(alpha) * z**2 / (dist + eps)
    worst = abs(alpha) * (z + z_err) ** 2 / (np.maximum(dist - dist_err, 0) + eps)
    least = abs(alpha) * np.maximum(z - z_err, 0) ** 2 / (dist + dist_err + eps)
    unit, tiny = {"float32": (2.0**-24, 2.0**-126), "float16": (2.0**-11, 2.0**-14),
                  "bfloat16": (2.0**-8, 2.0**-126)}[dtype]
    return np.maximum(worst - y, y - least) + y * unit + tiny


@pytest.fixture(scope="module")
def driver() -> Driver:
    lib = load_driver()
    if lib is None:
        pytest.skip("no NVIDIA driver (libcuda.so.1) here: the kernels are checked for structure only")
    try:
        return Driver(lib)
    except RuntimeError as exc:
        pytest.skip(f"no usable GPU: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("m,k,n,eps,alpha", [
    (1, 16, 1, 1e-5, 1.0),
    (7, 48, 80, 1e-5, 0.84394413),
    (130, 256, 64, 0.5, -1.5),
    (64, 64, 64, 1e-3, 2.0),
    (5, 33, 70, 1e-5, 1.0),  # K and N not multiples of 16: the generic variant only
])
def test_kernels_match_float64_as_tensorrt_launches_them(driver, built, m, k, n, eps, alpha):
    folder, manifest = built
    ran = 0
    for entry in manifest["entries"]:
        if entry["arch"] == "sm_90a" and driver.capability != (9, 0):
            continue
        if entry["variant"] != logic.variant_for(k, n):  # the variant the plugin picks for this K, N
            continue
        storage, to_storage, to_f64, finite_max = _STORAGE[entry["dtype"]]
        rng = np.random.default_rng(m * 1000 + k)
        x = rng.standard_normal((m, k)) * 0.5
        w = rng.standard_normal((n, k)) * 0.5
        b = rng.standard_normal(n) * 0.1
        for row in range(0, min(m, n), 3):  # x ≈ w rows: the expanded distance cancels
            x[row] = w[row] + rng.standard_normal(k) * 1e-3
        xs, ws, bs = to_storage(x), to_storage(w), to_storage(b)
        x64, w64, b64 = to_f64(xs), to_f64(ws), to_f64(bs)
        e32 = logic.float_from_halves(*logic.float_halves(eps))
        a32 = logic.float_from_halves(*logic.float_halves(alpha))
        direct = ((x64[:, None, :] - w64[None, :, :]) ** 2).sum(-1)
        want = np.clip(a32 * (x64 @ w64.T + b64) ** 2 / (direct + e32), -finite_max, finite_max)
        bound = _float32_bound(x64, w64, b64, e32, a32, entry["dtype"])

        launch = logic.launch(entry, m, n, k)
        pointers = [driver.to_device(a) for a in (xs, ws, bs)]
        y = driver.to_device(np.full(m * n * np.dtype(storage).itemsize, 0xFF, dtype=np.uint8))  # NaN poison
        try:
            function = driver.load_function(logic.read_ptx(folder, entry), entry["entry"])
            scalars = [ctypes.c_int32(v) for v in logic.extra_args(entry, m, n, k, eps, alpha)]
            args = [*pointers, *scalars, y]  # TensorRT's order: inputs, extra args, outputs
            driver.launch(function, launch.grid, launch.block, launch.shared_memory, args)
            got = to_f64(driver.from_device(y, np.empty((m, n), dtype=storage)))
        finally:
            for p in (*pointers, y):
                driver.free(p)
        assert not np.isnan(got).any(), f"{entry['ptx']}: outputs never written (still the NaN poison)"
        err = np.abs(got - want)
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), f"{driver.device_name} {entry['ptx']}: at {worst} {got[worst]} vs {want[worst]}"
        ran += 1
    assert ran > 0


def test_doctor_describes_the_plugin(capsys):
    from yatdeploy.cli import main

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trt_plugin_definition"] == json.loads(json.dumps(logic.describe()))
    assert "tensorrt" in report["backends"]
