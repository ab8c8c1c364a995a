"""Folding each YatNMN option into YatGemm keeps the layer's output (checked in torch, before ONNX)."""

from __future__ import annotations

import math

import pytest
import torch
from nmn.torch import MultiHeadYatAttention, YatConv2D, YatNMN
from torch import nn

from tests.model_zoo import YATNMN_OPTIONS, PatchedYat, perturb, yat_mlp
from yatdeploy.errors import UnsupportedLayerError
from yatdeploy.exporting.rewrite import YatGemmLayer, rewrite_yat_layers
from yatdeploy.reference import count_yat_layers


@pytest.mark.parametrize("option", sorted(YATNMN_OPTIONS))
def test_rewritten_model_matches_nmn(option):
    model = yat_mlp(YATNMN_OPTIONS[option])
    result = rewrite_yat_layers(model)
    assert [layer.path for layer in result.yat_layers] == ["0", "2"]
    assert sum(isinstance(m, YatGemmLayer) for m in result.module.modules()) == 2
    assert not any(isinstance(m, YatNMN) for m in result.module.modules())
    x = torch.randn(9, 16)
    with torch.no_grad():
        expected, got = model(x), result.module(x)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)


def test_the_original_model_is_left_untouched():
    model = yat_mlp()
    rewrite_yat_layers(model)
    assert isinstance(model[0], YatNMN) and isinstance(model[2], YatNMN)


def test_folded_options_are_reported():
    model = yat_mlp({"constant_alpha": True, "softplus_bias": True, "learnable_epsilon": True})
    folded = rewrite_yat_layers(model).yat_layers[0]
    assert folded.options["alpha"] == f"constant {math.sqrt(2):g}"
    assert folded.options["bias"] == "softplus learnable"
    assert str(folded.options["eps"]).startswith("learnable")
    assert (folded.in_features, folded.out_features) == (16, 12)


def test_tied_kernel_bank_layers_fold_their_slice():
    torch.manual_seed(0)
    model = nn.Sequential(
        YatNMN(8, 6, tie_kernel_bank=True, kernel_bank_size=10, kernel_bank_id="t1"),
        nn.Linear(6, 8),
        YatNMN(8, 4, tie_kernel_bank=True, kernel_bank_id="t1"),
    )
    perturb(model).eval()
    result = rewrite_yat_layers(model)
    assert result.module[0].weight.shape == (6, 8) and result.module[2].weight.shape == (4, 8)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=2e-5, atol=1e-6)


def test_a_model_that_is_one_yatnmn_is_rewritten_at_the_root():
    layer = perturb(YatNMN(5, 3)).eval()
    result = rewrite_yat_layers(layer)
    assert isinstance(result.module, YatGemmLayer)
    x = torch.randn(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), layer(x))


def test_16bit_models_fold_within_16bit_precision():
    model = yat_mlp({"spherical": True}).half()
    x = torch.randn(4, 16).half()
    with torch.no_grad():
        torch.testing.assert_close(rewrite_yat_layers(model).module(x), model(x), rtol=1e-2, atol=1e-3)


def test_other_nmn_layers_are_listed_as_decomposed():
    model = nn.Sequential(YatConv2D(1, 2, 3), nn.Flatten(), YatNMN(2 * 4 * 4, 3))
    result = rewrite_yat_layers(model)
    assert result.decomposed_layers == ["0"]
    assert [layer.path for layer in result.yat_layers] == ["2"]
    attention = rewrite_yat_layers(nn.Sequential(MultiHeadYatAttention(8, 2)))
    assert attention.decomposed_layers == ["0"]


def test_count_yat_layers_sees_traced_modules():
    model = yat_mlp()
    traced = torch.jit.trace(model, torch.randn(1, 16))
    assert count_yat_layers(model) == count_yat_layers(traced) == 2


def test_an_overridden_forward_is_refused_with_the_layer_path():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(PatchedYat(4, 2)))
    with pytest.raises(UnsupportedLayerError, match=r"layer '1\.0': option forward"):
        rewrite_yat_layers(model)


@pytest.mark.parametrize(
    "mutate,option",
    [
        (lambda layer: layer.alpha.data.fill_(float("nan")), "alpha"),
        (lambda layer: layer.weight.data.__setitem__((0, 0), float("inf")), "weight"),
        (lambda layer: setattr(layer, "epsilon", 0.0), "epsilon"),
        (lambda layer: setattr(layer, "dtype", torch.int32), "dtype"),
        (lambda layer: delattr(layer, "_constant_bias_value"), "_constant_bias_value"),
    ],
)
def test_unrepresentable_options_name_layer_and_option(mutate, option):
    model = yat_mlp()
    mutate(model[2])
    with pytest.raises(UnsupportedLayerError) as info:
        rewrite_yat_layers(model)
    assert info.value.layer_path == "2" and info.value.option == option
    assert f"layer '2': option {option}" in str(info.value)
