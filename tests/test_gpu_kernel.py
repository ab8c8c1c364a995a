"""The Triton YatGemm kernels without a GPU: their results under Triton's interpreter against a float64
reference, and their ahead-of-time PTX/cubin for sm_80 and sm_90a (checked with ptxas)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'yatdeploy[gpu-kernels]')", allow_module_level=True)


def _set_interpret(value: str | None) -> str | None:
    previous = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return previous


# triton reads TRITON_INTERPRET when a function is decorated: its own library at its first import, these
# kernels at yatdeploy.gpu's; and again when a launch first imports triton's gluon. So it is set for the
# imports here and for this module's tests, and restored between them.
_previous_interpret = _set_interpret("1")
import yatdeploy.gpu as gpu  # noqa: E402
from yatdeploy.gpu import launch  # noqa: E402

_set_interpret(_previous_interpret)


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    previous = _set_interpret("1")
    yield
    _set_interpret(previous)


from yatdeploy.gpu import aot  # noqa: E402
from yatdeploy.gpu.configs import (  # noqa: E402
    LARGE_16BIT,
    LARGE_FLOAT32,
    MEDIUM_M,
    SMALL_M,
    SMALL_M_SPLIT_K,
    TILE_CONFIGS,
    choose_config,
    split_k_slices,
)
from yatdeploy.ops.torch_op import OP_QUALNAME, yat_gemm_reference  # noqa: E402

interpreted = pytest.mark.skipif(
    not launch.interpreting(),
    reason="yatdeploy.gpu was imported before this module set TRITON_INTERPRET=1: its kernels are compiled ones",
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Max relative error against float64 where nothing cancels: float32 products are exact ("ieee") and
# summed in float32; 16-bit results are rounded once to their dtype (the interpreter truncates to
# bfloat16 where a GPU rounds to nearest: up to 2⁻⁷).
WELL_CONDITIONED_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, seed: int, bias: bool = True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(dtype)
    w = torch.randn(n, k, generator=generator).to(dtype)
    b = torch.randn(n, generator=generator).to(dtype) if bias else None
    return x, w, b


def _float64(x, w, b, eps, alpha):
    return yat_gemm_reference(x.double(), w.double(), None if b is None else b.double(), eps, alpha)


def _error_bound(x, w, b, eps, alpha, out_dtype):
    """A rigorous bound on |y − y64| for float32 accumulation: each float32 sum of K terms errs by at most
    γ·Σ|terms| (γ = K·2⁻²⁴, plus the epilogue's few operations), taken through the formula without
    linearising, plus the rounding of the result to `out_dtype`."""
    k = x.shape[-1]
    x64, w64 = x.double().reshape(-1, k), w.double()
    b64 = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    dot, abs_dot = x64 @ w64.T, x64.abs() @ w64.abs().T
    x_sq, w_sq = (x64 * x64).sum(-1, keepdim=True), (w64 * w64).sum(-1)
    dist = (x_sq + w_sq - 2 * dot).clamp(min=0)
    gamma = (k + 8) * 2.0**-24
    z_error = gamma * (abs_dot + b64.abs())
    dist_error = gamma * (x_sq + w_sq + 2 * abs_dot)
    y = alpha * (dot + b64) ** 2 / (dist + eps)
    worst = (((dot + b64).abs() + z_error) ** 2 / ((dist - dist_error).clamp(min=0) + eps)) * abs(alpha)
    least = (((dot + b64).abs() - z_error).clamp(min=0) ** 2 / (dist + dist_error + eps)) * abs(alpha)
    accumulation = torch.maximum(worst - y.abs(), y.abs() - least)
    out = torch.finfo(out_dtype)
    return (accumulation + y.abs() * out.eps + out.smallest_normal).reshape(*x.shape[:-1], -1)


def _check(y, x, w, b, eps, alpha) -> float:
    """Asserts y is YatGemm(x, w, b) within the rounding bound; returns the max relative error vs float64."""
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    expected = _float64(x, w, b, eps, alpha)
    got = y.double()
    assert torch.equal(got.isnan(), expected.isnan()), "NaN where the reference has none, or the reverse"
    finite = ~expected.isnan()
    if x.dtype != torch.float32:
        limit = torch.finfo(x.dtype).max
        saturated = finite & (expected.abs() > limit)
        assert torch.equal(got[saturated], expected[saturated].sign() * limit), "16-bit results must saturate"
        finite &= ~saturated
    error = (got - expected).abs()[finite]
    bound = _error_bound(x, w, b, eps, alpha, x.dtype)[finite]
    assert (error <= bound).all(), f"max error/bound {(error / bound).max().item():.3g}"
    return (error / expected.abs()[finite]).max().item() if error.numel() else 0.0


# Interpreter correctness ---------------------------------------------------------------------------


@pytest.mark.slow
@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(TILE_CONFIGS.values()), ids=lambda c: c.name)
def test_every_tile_config_on_ragged_shapes(config, dtype):
    # M, K, N are multiples of no block size; K = 300 gives small_m_split_k 3 slices, the last one short.
    x, w, b = _inputs(21, 300, 70, dtype, seed=1)
    y = gpu.yat_gemm(x, w, b, 1e-3, 0.7, config=config)
    _check(y, x, w, b, 1e-3, 0.7)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_well_conditioned_results_meet_the_dtype_tolerance(dtype):
    # A bias of a few σ keeps dot + b away from 0, so the only errors are float32 sums and the final cast.
    x, w, _ = _inputs(9, 96, 40, dtype, seed=2)
    b = torch.full((40,), 30.0).to(dtype)
    y = gpu.yat_gemm(x, w, b, 1e-5, 1.0)
    expected = _float64(x, w, b, 1e-5, 1.0)
    relative = ((y.double() - expected).abs() / expected.abs()).max().item()
    assert relative <= WELL_CONDITIONED_RTOL[dtype]


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(33, 200), (300, 64)], ids=["split_k", "one_pass"])
def test_single_row(dtype, n, k):
    x, w, b = _inputs(1, k, n, dtype, seed=3)
    config = choose_config(1, n, k, dtype)
    assert config in (SMALL_M, SMALL_M_SPLIT_K)
    y = gpu.yat_gemm(x[0], w, b, 1e-5, 1.0)  # X of shape [K]: Y of shape [N]
    assert y.shape == (n,)
    _check(y, x[0], w, b, 1e-5, 1.0)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_close_to_weights(dtype):
    # x = w + 0.01·noise: the expanded distance |x|² + |w|² − 2·x·w cancels to a few ulps of 2|w|².
    _, w, b = _inputs(0, 256, 12, dtype, seed=4)
    noise = torch.randn(6, 256, generator=torch.Generator().manual_seed(5))
    x = (w[:6].float() + 0.01 * noise).to(dtype)
    x[5] = w[7]  # one exact match: distance 0, Y = (dot + b)² / eps
    y = gpu.yat_gemm(x, w, b, 1e-5, 1.0)
    _check(y, x, w, b, 1e-5, 1.0)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps,alpha", [(1e-5, -1.7), (1e-3, 2.0**0.5), (0.5, -0.25)])
def test_eps_and_negative_alpha(dtype, eps, alpha):
    x, w, b = _inputs(5, 40, 17, dtype, seed=6)
    _check(gpu.yat_gemm(x, w, b, eps, alpha), x, w, b, eps, alpha)


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("alpha", (1.0, -1.0))
def test_16bit_results_saturate_to_the_finite_range(dtype, alpha):
    x, w, b = _inputs(4, 32, 8, dtype, seed=7)
    # x = w: Y = dot²/eps, beyond the dtype's max (for bfloat16, whose max is float32's but for the last
    # mantissa bits, that means an inf in float32 first).
    scale = 30.0 if dtype == torch.float16 else 1e9
    x[1], w[3] = (x[1].float() * scale).to(dtype), (x[1].float() * scale).to(dtype)
    y = gpu.yat_gemm(x, w, b, 1e-5, alpha)
    limit = torch.finfo(dtype).max
    assert y[1, 3].item() == alpha * limit and torch.isfinite(y).all()
    _check(y, x, w, b, 1e-5, alpha)


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_as_in_the_reference(dtype):
    x, w, b = _inputs(5, 24, 9, dtype, seed=8)
    x[0, 3] = float("nan")  # row 0: NaN
    w[2, 5] = float("nan")  # column 2: NaN
    b[4] = float("nan")  # column 4: NaN
    x[1, 0] = float("inf")  # row 1: inf − inf in the distance, NaN in torch.clamp: NaN, not saturated
    y = gpu.yat_gemm(x, w, b, 1e-5, 1.0)
    assert y[0].isnan().all() and y[:, 2].isnan().all() and y[:, 4].isnan().all()
    _check(y, x, w, b, 1e-5, 1.0)


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [LARGE_16BIT, SMALL_M_SPLIT_K], ids=lambda c: c.name)
def test_without_bias(dtype, config):
    x, w, _ = _inputs(7, 300, 20, dtype, seed=9, bias=False)
    _check(gpu.yat_gemm(x, w, None, 1e-5, 1.0, config=config), x, w, None, 1e-5, 1.0)


def _trt_entry(x, w, b, eps, alpha, config):
    """yat_gemm_trt_kernel launched with TensorRT's argument order (inputs, int32 extra args, output);
    eps and alpha travel as the 16-bit halves of their float32 bits, as the plugin passes them."""
    from yatdeploy.gpu import kernel
    from yatdeploy.gpu.common import output_saturation
    from yatdeploy.gpu.configs import cdiv
    from yatdeploy.trt import plugin_logic

    (m, k), n = x.shape, w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    saturate, finite_max = output_saturation(x.dtype)
    halves = [*plugin_logic.float_halves(eps), *plugin_logic.float_halves(alpha)]
    kernel.yat_gemm_trt_kernel[(cdiv(m, config.block_m) * cdiv(n, config.block_n),)](
        x, w, b, m, n, k, *halves, y,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        INPUT_PRECISION="ieee", UPCAST_DOT_OPERANDS=launch.upcast_dot_operands(x.dtype),
        SATURATE=saturate, FINITE_MAX=finite_max,
    )
    return y


@pytest.mark.slow
@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [c for c in TILE_CONFIGS.values() if c.split_k == 1], ids=lambda c: c.name)
def test_tensorrt_entry_computes_w_norms_from_its_tiles(config, dtype):
    # TensorRT's entry has no |w|² buffer: it sums |w|² from the W tiles. Ragged shapes, x ≈ w rows,
    # negative alpha; the results must meet the same bound as the Python entry's and agree with it.
    x, w, b = _inputs(21, 300, 70, dtype, seed=16)
    x[:5] = (w[10:15].float() + 0.01 * torch.randn(5, 300, generator=torch.Generator().manual_seed(17))).to(dtype)
    eps, alpha = float(np.float32(1e-3)), float(np.float32(-0.7))
    y = _trt_entry(x, w, b, eps, alpha, config)
    _check(y, x, w, b, eps, alpha)
    same = gpu.yat_gemm(x, w, b, eps, alpha, config=config)
    # Only |w|²'s summation order differs (row_sq_norm's tiles against the GEMM's K tiles); away from the
    # x ≈ w rows, where the distance cancels and magnifies that, the two entries agree to a few ulps.
    torch.testing.assert_close(y[5:], same[5:], rtol=4 * torch.finfo(dtype).eps, atol=0)


@interpreted
def test_strided_operands_and_leading_dimensions():
    x, w, b = _inputs(24, 50, 13, torch.float16, seed=10)
    x_strided = x.t().contiguous().t().reshape(2, 12, 50)[:, ::2]  # [2, 6, 50], column-major rows
    w_strided = w.t().contiguous().t()  # stride (1, N)
    y = gpu.yat_gemm(x_strided, w_strided, b, 1e-5, 1.0)
    assert y.shape == (2, 6, 13)
    _check(y, x_strided, w_strided, b, 1e-5, 1.0)


@interpreted
def test_cached_row_norms_give_the_same_result():
    x, w, b = _inputs(3, 70, 11, torch.float32, seed=11)
    w_sq = gpu.row_sq_norms(w)
    torch.testing.assert_close(w_sq.double(), (w.double() ** 2).sum(-1), rtol=1e-6, atol=0)
    assert torch.equal(gpu.yat_gemm(x, w, b, 1e-5, 1.0, w_sq=w_sq), gpu.yat_gemm(x, w, b, 1e-5, 1.0))
    with pytest.raises(ValueError, match="w_sq"):
        gpu.yat_gemm(x, w, b, 1e-5, 1.0, w_sq=w_sq.half())


@interpreted
def test_empty_operands():
    x, w, b = _inputs(0, 8, 5, torch.float32, seed=12)
    assert gpu.yat_gemm(x, w, b, 1e-5, 1.0).shape == (0, 5)


def test_operands_are_checked_as_the_torch_op_checks_them():
    x, w, b = _inputs(2, 8, 3, torch.float32, seed=13)
    with pytest.raises(TypeError, match="share one dtype"):
        gpu.yat_gemm(x, w.half(), b, 1e-5, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        gpu.yat_gemm(x, w[:, :5], b, 1e-5, 1.0)
    with pytest.raises(TypeError, match="float64 runs on torch's reference"):
        gpu.yat_gemm(x.double(), w.double(), b.double(), 1e-5, 1.0)
    with pytest.raises(ValueError, match="float32_precision"):
        gpu.yat_gemm(x, w, b, 1e-5, 1.0, float32_precision="tf32")


def test_cpu_tensors_without_the_interpreter_are_refused_clearly(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    x, w, b = _inputs(2, 8, 3, torch.float32, seed=14)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before triton and yatdeploy.gpu are first"):
        gpu.yat_gemm(x, w, b, 1e-5, 1.0)


def test_registered_as_the_torch_ops_cuda_kernel():
    assert torch._C._dispatch_has_kernel_for_dispatch_key(OP_QUALNAME, "CUDA")
    # CPU tensors keep the eager reference.
    x, w, b = _inputs(2, 8, 3, torch.float32, seed=15)
    torch.testing.assert_close(torch.ops.yatdeploy.yat_gemm(x, w, b, 1e-5, 1.0), yat_gemm_reference(x, w, b, 1e-5, 1.0))


# Configurations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,n,k,dtype,expected",
    [
        (1, 4096, 4096, torch.float16, SMALL_M_SPLIT_K),
        (16, 4096, 4096, torch.bfloat16, SMALL_M_SPLIT_K),
        (8, 50304, 768, torch.float16, SMALL_M),  # LM head: enough tiles without splitting K
        (1, 4096, 128, torch.float32, SMALL_M),  # K too short to split
        (64, 4096, 4096, torch.float16, MEDIUM_M),
        (4096, 4096, 4096, torch.float16, LARGE_16BIT),
        (4096, 4096, 4096, torch.float32, LARGE_FLOAT32),
    ],
)
def test_config_choice(m, n, k, dtype, expected):
    assert choose_config(m, n, k, dtype) == expected


@pytest.mark.parametrize("k", [1, 63, 64, 300, 4096, 4097])
def test_split_k_slices_cover_k_in_whole_tiles(k):
    slices, per_slice = split_k_slices(k, SMALL_M_SPLIT_K)
    assert per_slice % SMALL_M_SPLIT_K.block_k == 0
    assert 1 <= slices <= SMALL_M_SPLIT_K.split_k
    assert (slices - 1) * per_slice < k <= slices * per_slice


# Ahead-of-time artifacts -----------------------------------------------------------------------------

AOT_CONFIGS = (LARGE_16BIT.name, SMALL_M_SPLIT_K.name)


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory) -> Path:
    """The CLI's artifacts for float16 on both arches (10 compiles), in a process without the interpreter."""
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "yatdeploy.gpu.aot", "--out", str(out), "--dtype", "float16",
               "--variant", "aligned", "--config", *AOT_CONFIGS]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return out


def _manifest(aot_dir: Path) -> list[dict]:
    return json.loads((aot_dir / aot.MANIFEST_NAME).read_text())["entries"]


@pytest.mark.slow
def test_manifest_lists_every_artifact(aot_dir):
    entries = _manifest(aot_dir)
    kinds = {(e["kernel"], e["arch"], e["config"]) for e in entries}
    for arch in ("sm_80", "sm_90a"):
        assert {
            ("row_sq_norm", arch, None),
            ("yat_gemm", arch, LARGE_16BIT.name),
            ("yat_gemm_trt", arch, LARGE_16BIT.name),  # split-K has no TensorRT entry (no workspace there)
            ("yat_gemm_split_k_partial", arch, SMALL_M_SPLIT_K.name),
            ("yat_gemm_split_k_epilogue", arch, SMALL_M_SPLIT_K.name),
        } <= kinds
    assert len(entries) == 10
    for e in entries:
        assert (aot_dir / e["ptx"]).is_file() and (aot_dir / e["cubin"]).is_file()
        assert e["dtype"] == "float16" and e["block"] == [32 * e["num_warps"], 1, 1]


@pytest.mark.slow
def test_ptx_uses_the_tensor_core_instructions_of_its_arch(aot_dir):
    for kernel in ("yat_gemm", "yat_gemm_trt"):
        gemm = {e["arch"]: (aot_dir / e["ptx"]).read_text() for e in _manifest(aot_dir) if e["kernel"] == kernel}
        assert "mma.sync" in gemm["sm_80"] and "wgmma" not in gemm["sm_80"]
        assert "wgmma.mma_async" in gemm["sm_90a"]
        assert re.search(r"^\.target sm_90a$", gemm["sm_90a"], re.M)


@pytest.mark.slow
def test_ptx_keeps_the_epilogues_nan_propagation_and_ieee_division(aot_dir):
    # The interpreter's numpy max/clip propagate NaN whatever the kernel asks, so only the PTX shows it.
    for e in _manifest(aot_dir):
        if e["kernel"] in ("yat_gemm", "yat_gemm_split_k_epilogue", "yat_gemm_trt"):
            ptx = (aot_dir / e["ptx"]).read_text()
            assert "max.NaN.f32" in ptx and "div.rn.f32" in ptx, e["ptx"]
            assert not re.search(r"\b(max|min)\.f32\b", ptx), e["ptx"]


@pytest.mark.slow
def test_ptx_entry_parameters_are_exactly_the_manifests(aot_dir):
    for e in _manifest(aot_dir):
        ptx = (aot_dir / e["ptx"]).read_text()
        declared = [ptx_type for ptx_type, _ in aot.ptx_params(ptx, e["entry"])]
        assert declared == [p["ptx_type"] for p in e["params"]], e["ptx"]
        assert re.search(rf"^\.reqntid {e['block'][0]}\b", ptx, re.M)
    gemm = next(e for e in _manifest(aot_dir) if e["kernel"] == "yat_gemm")
    assert [p["name"] for p in gemm["params"]] == [
        "x_ptr", "w_ptr", "b_ptr", "w_sq_ptr", "y_ptr", "M", "N", "K",
        "stride_xm", "stride_wn", "stride_ym", "has_bias", "eps", "alpha",
    ]
    # TensorRT's AOT plugin ABI: inputs, then int32 extra args, then outputs (yatdeploy/trt/plugin_logic.py).
    trt = next(e for e in _manifest(aot_dir) if e["kernel"] == "yat_gemm_trt")
    assert [(p["name"], p["type"]) for p in trt["params"]] == [
        ("x_ptr", "*fp16"), ("w_ptr", "*fp16"), ("b_ptr", "*fp16"), ("M", "i32"), ("N", "i32"), ("K", "i32"),
        ("eps_high", "i32"), ("eps_low", "i32"), ("alpha_high", "i32"), ("alpha_low", "i32"), ("y_ptr", "*fp16"),
    ]


def _cuda_tool(name: str) -> str | None:
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    nvcc = shutil.which("nvcc")
    if found is None and nvcc is not None:
        found = shutil.which(name, path=str(Path(nvcc).parent))
    return found


@pytest.mark.slow
def test_ptxas_accepts_the_ptx(aot_dir, tmp_path):
    ptxas = _cuda_tool("ptxas")
    if ptxas is None:
        pytest.skip("ptxas is not on PATH, in /usr/local/cuda/bin or beside nvcc")
    for e in _manifest(aot_dir):
        subprocess.run([ptxas, f"-arch={e['arch']}", str(aot_dir / e["ptx"]), "-o", str(tmp_path / "out.cubin")],
                       check=True, capture_output=True, text=True)


@pytest.mark.slow
def test_cubin_parameters_match_the_manifest(aot_dir):
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        pytest.skip("triton's bundled cuobjdump is absent")
    for e in _manifest(aot_dir):
        elf = subprocess.run([str(cuobjdump), "-elf", str(aot_dir / e["cubin"])], check=True,
                             capture_output=True, text=True).stdout
        sizes = {int(o, 16): int(s, 16) for o, s in re.findall(r"Ordinal : (0x[0-9a-f]+).*?Size\s*: (0x[0-9a-f]+)", elf)}
        expected = [8 if p["ptx_type"] == ".u64" else 4 for p in e["params"]]
        assert [sizes[i] for i in sorted(sizes)] == expected, e["cubin"]


def test_scratch_parameters_are_cut_only_when_unused():
    ptx = (
        ".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
        "\t.param .u64 .ptr .global .align 1 k_param_1,\n\t.param .u64 .ptr .global .align 1 k_param_2\n)\n"
        "{\n\tld.param.u64 %rd1, [k_param_0];\n}\n"
    )
    assert aot.ptx_params(aot.strip_scratch_params(ptx, "k", kept=1), "k") == [(".u64", "k_param_0")]
    with pytest.raises(ValueError, match="used by the kernel body"):
        aot.strip_scratch_params(ptx.replace("[k_param_0]", "[k_param_2]"), "k", kept=1)
