"""The YatGemm TensorRT plugin, everything of it that runs without TensorRT: the PTX the build makes,
the launch geometry and scalar arguments the plugin hands TensorRT, the checks on inputs, the
signatures tensorrt.plugin will validate, and (where a GPU and driver exist) the PTX kernels
themselves, loaded and launched exactly as TensorRT launches an ahead-of-time plugin."""

from __future__ import annotations

import ast
import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

from tests.cuda_driver import Driver, load_driver
from yatdeploy import native
from yatdeploy.errors import YatDeployError
from yatdeploy.spec import MATH_ATTRIBUTES, PLUGIN_NAMESPACE, YAT_GEMM
from yatdeploy.trt import plugin_logic as logic

ROOT = Path(__file__).resolve().parents[1]


def _built_ptx() -> str:
    path = native.trt_plugin_ptx_path()
    if path is None:
        pytest.skip("the plugin PTX was not built (yatdeploy was installed without nvcc)")
    return path.read_text()


# --- geometry and arguments ------------------------------------------------------------------------

def test_launch_geometry_is_the_kernels():
    header = (ROOT / "kernels" / "yat_gemm.cuh").read_text()
    constants = dict(re.findall(r"inline constexpr int (k\w+) = (\d+);", header))
    assert int(constants["kTileM"]) == logic.TILE_M
    assert int(constants["kTileN"]) == logic.TILE_N
    assert int(constants["kThreadsX"]) == logic.THREADS_X
    assert int(constants["kThreadsY"]) == logic.THREADS_Y
    # grid.x walks rows and grid.y output units, in the header as in the plugin.
    grid_for = header.split("inline dim3 GridFor")[1].split("}")[0]
    assert grid_for.index("(m + kTileM - 1) / kTileM") < grid_for.index("(n + kTileN - 1) / kTileN")


@pytest.mark.parametrize("m,n", [(1, 1), (63, 64), (64, 65), (65, 1000), (100_000, 7)])
def test_the_grid_covers_every_output_once(m, n):
    gx, gy = logic.launch_grid(m, n)
    assert (gx - 1) * logic.TILE_M < m <= gx * logic.TILE_M
    assert (gy - 1) * logic.TILE_N < n <= gy * logic.TILE_N
    assert logic.block_dims() == (logic.THREADS_X, logic.THREADS_Y, 1)


def test_rows_and_output_shape():
    assert logic.rows([5, 16], 1) == 5
    assert logic.rows([2, 3, 4, 16], 1) == 24
    assert logic.rows([16], 1) == 1
    assert logic.output_dims([2, 3, 16], [10, 16]) == [2, 3, 10]
    assert logic.output_dims([16], [10, 16]) == [10]


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


def test_the_arithmetic_builds_symbolic_expressions():
    m = logic.rows([_Sym("d0"), _Sym("d1"), _Sym("k")], _Sym("1"))
    gx, gy = logic.launch_grid(m, _Sym("n"))
    assert m.text == "(d0 * d1)"
    assert gx.text == f"(((d0 * d1) + {logic.TILE_M - 1}) // {logic.TILE_M})"
    assert gy.text == f"((n + {logic.TILE_N - 1}) // {logic.TILE_N})"
    args = logic.extra_args(m, _Sym("k"), _Sym("n"), 1e-5, 2.0)
    assert len(args) == len(logic.EXTRA_ARGS)


@pytest.mark.parametrize("value", [1e-5, 1.0, -0.84394413, 3.0e38, -1e-30, 0.0, 7.5])
def test_floats_travel_as_two_nonnegative_16_bit_halves(value):
    high, low = logic.float_halves(value)
    assert 0 <= high <= 0xFFFF and 0 <= low <= 0xFFFF
    assert logic.float_from_halves(high, low) == np.float32(value)


def test_kernel_parameters_are_inputs_then_extra_args_then_output():
    assert logic.KERNEL_PARAMS[: len(logic.INPUTS)] == tuple(n.lower() for n in logic.INPUTS)
    assert logic.KERNEL_PARAMS[-1] == YAT_GEMM.outputs[0].name.lower()
    assert logic.extra_args(3, 4, 5, 1e-5, 1.0)[:3] == [3, 4, 5]
    assert logic.ATTRIBUTES == MATH_ATTRIBUTES
    assert logic.PLUGIN_ID == f"{PLUGIN_NAMESPACE}::YatGemm"


def test_input_checks_name_what_the_plugin_cannot_take():
    assert logic.check_inputs([3, 2, 1], ["HALF"] * 3).kernel == "yat_gemm_trt_f16"
    with pytest.raises(logic.PluginInputError, match="one dtype"):
        logic.check_inputs([2, 2, 1], ["FLOAT", "HALF", "FLOAT"])
    with pytest.raises(logic.PluginInputError, match="has no INT8 kernel"):
        logic.check_inputs([2, 2, 1], ["INT8"] * 3)
    with pytest.raises(logic.PluginInputError, match="ranks 2, 3, 1"):
        logic.check_inputs([2, 3, 1], ["FLOAT"] * 3)
    with pytest.raises(logic.PluginInputError, match="takes 3 inputs"):
        logic.check_inputs([2, 2], ["FLOAT"] * 2)
    with pytest.raises(logic.PluginInputError, match="65535"):
        logic.check_static_limits(65536 * logic.TILE_N)
    logic.check_static_limits(65535 * logic.TILE_N)


def test_autotune_declares_one_dtype_for_all_io():
    assert logic.autotune_types() == ", ".join(["FP32|FP16|BF16"] * 4)


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


# --- the PTX ---------------------------------------------------------------------------------------

def test_the_build_made_ptx_with_every_entry_point():
    ptx = _built_ptx()
    logic.check_ptx(ptx)  # every dtype's kernel, with the parameter layout the plugin launches
    entries = ptx_entry_bodies(ptx)
    for t in logic.PLUGIN_TYPES:
        threads = logic.THREADS_X * logic.THREADS_Y
        assert re.search(rf"\.maxntid {threads}, 1, 1", entries[t.kernel]), t.kernel
    arch = native.build_info().get("trt_plugin_ptx_arch") or "compute_80"
    assert re.search(rf"^\.target sm_{arch.split('_')[1]}\b", ptx, re.M)


def ptx_entry_bodies(ptx: str) -> dict[str, str]:
    parts = re.split(r"(?=\.visible\s+\.entry\s+)", ptx)
    return {re.match(r"\.visible\s+\.entry\s+(\w+)", p).group(1): p for p in parts if p.startswith(".visible")}


def test_check_ptx_names_a_missing_or_different_kernel():
    with pytest.raises(YatDeployError, match="has no kernel yat_gemm_trt_f32"):
        logic.check_ptx(".version 9.0\n.target sm_80\n")
    params = ", ".join(f".param .u64 p{i}" for i in range(3))
    fake = "".join(f".visible .entry {t.kernel}({params})\n{{ ret; }}\n" for t in logic.PLUGIN_TYPES)
    with pytest.raises(YatDeployError, match="the plugin launches it with"):
        logic.check_ptx(fake)


def test_ptx_path_error_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_LIBRARY_DIR, str(tmp_path))
    with pytest.raises(YatDeployError, match="nvcc"):
        logic.ptx_path()


# --- the PTX on a GPU, launched as TensorRT launches it --------------------------------------------

def _bf16_round(a: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


_STORAGE = {
    "float32": (np.float32, lambda a: a.astype(np.float32), lambda s: s.astype(np.float64), 3.4028235e38),
    "float16": (np.float16, lambda a: a.astype(np.float16), lambda s: s.astype(np.float64), 65504.0),
    "bfloat16": (np.uint16, _bf16_round, lambda s: _bf16_to_f32(s).astype(np.float64), 3.38953139e38),
}
# (relative to |reference|, relative to the pre-cancellation magnitude) per storage dtype.
_TOLERANCE = {"float32": (1e-5, 2e-6), "float16": (1e-3, 1e-4), "bfloat16": (8e-3, 1e-4)}


@pytest.fixture(scope="module")
def driver() -> Driver:
    lib = load_driver()
    if lib is None:
        pytest.skip("no NVIDIA driver (libcuda.so.1) here: the PTX is checked for structure only")
    try:
        return Driver(lib)
    except RuntimeError as exc:
        pytest.skip(f"no usable GPU: {exc}")


@pytest.mark.parametrize("dtype", [t.dtype for t in logic.PLUGIN_TYPES])
@pytest.mark.parametrize("m,k,n,eps,alpha", [
    (1, 16, 1, 1e-5, 1.0),
    (7, 33, 65, 1e-5, 0.84394413),
    (130, 257, 70, 0.5, -1.5),
    (64, 64, 64, 1e-3, 2.0),
])
def test_ptx_kernel_matches_float64_reference(driver, dtype, m, k, n, eps, alpha):
    ptx = _built_ptx()
    kernel = next(t.kernel for t in logic.PLUGIN_TYPES if t.dtype == dtype)
    storage, to_storage, to_f64, finite_max = _STORAGE[dtype]
    rng = np.random.default_rng(m * 1000 + k)
    x = rng.standard_normal((m, k)) * 0.5
    w = rng.standard_normal((n, k)) * 0.5
    b = rng.standard_normal(n) * 0.1
    for row in range(0, min(m, n), 3):  # x ≈ w rows: the distance nearly vanishes
        x[row] = w[row] + rng.standard_normal(k) * 1e-3
    xs, ws, bs = to_storage(x), to_storage(w), to_storage(b)
    x64, w64, b64 = to_f64(xs), to_f64(ws), to_f64(bs)
    dist = ((x64[:, None, :] - w64[None, :, :]) ** 2).sum(-1)
    want = alpha * (x64 @ w64.T + b64) ** 2 / (dist + np.float32(eps))
    want = np.clip(want, -finite_max, finite_max)
    magnitude = abs(alpha) * (np.abs(x64) @ np.abs(w64).T + np.abs(b64)) ** 2 / (dist + np.float32(eps))

    out_like = np.empty((m, n), dtype=storage)
    pointers = [driver.to_device(a) for a in (xs, ws, bs)]
    y = driver.to_device(np.full(out_like.nbytes, 0xFF, dtype=np.uint8))  # poison: NaN in every dtype
    try:
        function = driver.load_function(ptx, kernel)
        scalars = [ctypes.c_int32(v) for v in logic.extra_args(m, k, n, eps, alpha)]
        gx, gy = logic.launch_grid(logic.rows([m, k], 1), n)
        driver.launch(function, (gx, gy, 1), logic.block_dims(), 0, [*pointers, *scalars, y])
        got = to_f64(driver.from_device(y, out_like))
    finally:
        for p in (*pointers, y):
            driver.free(p)
    assert not np.isnan(got).any(), "some outputs were never written (still the NaN poison)"
    rel_ref, rel_mag = _TOLERANCE[dtype]
    err = np.abs(got - want)
    bound = rel_ref * np.abs(want) + rel_mag * magnitude
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{driver.device_name} {dtype}: at {worst} got {got[worst]}, want {want[worst]}"


def test_doctor_reports_the_plugin_ptx(capsys):
    import json
    import shutil

    from yatdeploy.cli import main

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    path = native.trt_plugin_ptx_path()
    assert report["trt_plugin"] == (str(path) if path else None)
    if shutil.which("nvcc"):  # the build makes the PTX whenever nvcc is present
        assert path is not None and path.is_file()
        assert report["trt_plugin_ptx_arch"].startswith("compute_")
    assert report["trt_plugin_definition"]["id"] == logic.PLUGIN_ID
    assert report["trt_plugin_definition"]["fields"] == list(MATH_ATTRIBUTES)
    assert "tensorrt" in report["backends"]
