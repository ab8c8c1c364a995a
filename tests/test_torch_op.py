"""The torch op's reference implementation against nmn's YatNMN and the spec's formula."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from nmn.torch import YatNMN

from yatdeploy.ops.torch_op import yat_gemm, yat_gemm_reference


def _layer(dtype: torch.dtype) -> YatNMN:
    torch.manual_seed(1)
    layer = YatNMN(24, 9)
    with torch.no_grad():
        layer.alpha.fill_(1.3)
        layer.bias.add_(0.2)
    return layer.to(dtype)


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
)
def test_op_matches_yatnmn(dtype, rtol):
    layer = _layer(dtype)
    x = torch.randn(6, 24).to(dtype)
    with torch.no_grad():
        expected = layer(x).double()
        alpha = float(layer.alpha.to(dtype))
        got = yat_gemm(x, layer.weight, layer.bias, layer.epsilon, alpha).double()
    assert got.dtype == torch.float64 and expected.shape == got.shape
    torch.testing.assert_close(got, expected, rtol=rtol, atol=0)


def test_op_matches_the_formula_in_float64():
    torch.manual_seed(2)
    x, w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    direct = torch.stack([((x[:, None, :] - w[None, :, :]) ** 2).sum(-1)])[0]
    expected = 0.7 * (x @ w.T + b) ** 2 / (direct + 1e-3)
    torch.testing.assert_close(yat_gemm(x, w, b, 1e-3, 0.7), expected, rtol=1e-10, atol=0)


def test_missing_bias_means_zero_bias():
    x, w = torch.randn(4, 6), torch.randn(3, 6)
    torch.testing.assert_close(yat_gemm(x, w, None, 1e-5, 1.0), yat_gemm(x, w, torch.zeros(3), 1e-5, 1.0))


def test_16bit_results_saturate_to_the_finite_range():
    x = torch.full((1, 4), 100.0, dtype=torch.float16)
    w = torch.full((1, 4), 100.0, dtype=torch.float16)  # x == w: y = dot² / eps = 1.6e14
    y = yat_gemm(x, w, None, 1e-5, 1.0)
    assert torch.isfinite(y).all() and y.item() == torch.finfo(torch.float16).max


def test_leading_dimensions_are_kept():
    x, w = torch.randn(2, 3, 6), torch.randn(4, 6)
    y = yat_gemm(x, w, torch.zeros(4), 1e-5, 1.0)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y[1, 2], yat_gemm_reference(x[1, 2:3], w, torch.zeros(4), 1e-5, 1.0)[0])


def test_fake_tensor_shape_for_export():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = yat_gemm(torch.empty(5, 3, 8), torch.empty(2, 8), torch.empty(2), 1e-5, 1.0)
    assert tuple(y.shape) == (5, 3, 2)


@pytest.mark.parametrize(
    "x,w,b,message",
    [
        (torch.randn(2, 5), torch.randn(3, 4), None, "do not fit"),
        (torch.randn(2, 4), torch.randn(3, 4), torch.randn(2), "B has shape"),
        (torch.randn(2, 4), torch.randn(3, 4).double(), None, "share one dtype"),
        (torch.ones(2, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32), None, "admitted"),
    ],
)
def test_bad_operands_are_named(x, w, b, message):
    with pytest.raises((TypeError, ValueError), match=message):
        yat_gemm(x, w, b, 1e-5, 1.0)


# --- the fused CUDA kernel (yatdeploy.gpu), registered lazily ------------------------------------------

def _python(*parts: str) -> dict:
    """Run the code `parts` in a fresh interpreter (so that what it imports is its own) and return the JSON
    its last line prints."""
    code = "\n".join(textwrap.dedent(p) for p in parts)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])


_REPORT = """
    imported = {"triton_imported": sys.modules.get("triton") is not None, "gpu_imported": "yatdeploy.gpu" in sys.modules}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    same = torch.equal(op.yat_gemm(x, w, b, 1e-5, 1.0), op.yat_gemm_reference(x, w, b, 1e-5, 1.0))
    report = {"cuda": has(op.OP_QUALNAME, "CUDA"), "cpu_is_reference": same, **imported}
"""


@pytest.mark.slow
def test_the_fused_cuda_kernel_is_registered_lazily_when_triton_is_installed():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: the op has no CUDA kernel of its own")
    report = _python("""
        import json, sys
        import torch
        import yatdeploy.ops.torch_op as op
    """, _REPORT, """
        # Registered without importing triton or yatdeploy.gpu; they load at the first CUDA call.
        kernel = op._fused_kernel()
        from yatdeploy.gpu import launch
        report["dispatches_to"] = kernel is launch.op_cuda_kernel
        print(json.dumps(report))
    """)
    assert report == {"cuda": True, "triton_imported": False, "gpu_imported": False, "cpu_is_reference": True,
                      "dispatches_to": True}


@pytest.mark.slow
def test_without_triton_nothing_breaks():
    report = _python("""
        import json, sys
        sys.modules["triton"] = None  # import triton fails, find_spec says it is not there
        import torch
        import yatdeploy.ops.torch_op as op
    """, _REPORT, """
        import yatdeploy.gpu
        report["gpu_available"] = yatdeploy.gpu.available()
        print(json.dumps(report))
    """)
    assert report == {"cuda": False, "triton_imported": False, "gpu_imported": False, "cpu_is_reference": True,
                      "gpu_available": False}


def test_kernels_that_cannot_load_fall_back_to_the_reference_with_a_warning(monkeypatch):
    from yatdeploy.ops import torch_op

    monkeypatch.setitem(sys.modules, "yatdeploy.gpu.launch", None)  # the import fails
    torch_op._fused_kernel.cache_clear()
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        with pytest.warns(RuntimeWarning, match="fused GPU kernel can't be loaded"):
            y = torch_op._yat_gemm_cuda(x, w, b, 1e-5, 1.0)
        torch.testing.assert_close(y, yat_gemm_reference(x, w, b, 1e-5, 1.0))
    finally:
        torch_op._fused_kernel.cache_clear()
