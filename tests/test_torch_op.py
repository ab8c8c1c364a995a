"""The torch op's reference implementation against nmn's YatNMN and the spec's formula."""

from __future__ import annotations

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
