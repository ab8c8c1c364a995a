"""Fusion rule: YatConv (nmn.nnx YatConv, YatConv1D/2D/3D) as jax2onnx writes it; the pointwise case as one YatGemm.

    y = (x ⊛ W + b)² / (max(x² ⊛ 1 + |W|² − 2·(x ⊛ W), 0) + eps)

jax2onnx writes each convolution channels-last in, channels-last out: Transpose(x, NHWC→NCHW), Conv, Transpose back;
|x|² over each patch as the same Conv of x² with a ones kernel [1, C, *kernel]; |W|² a constant once folded; the bias
added to the product, the distance reading the product (nnx); alpha a Mul after the division (folded by scale.py).

A Yat product over k₁·k₂·C patches is a YatGemm only where the patches exist as rows: for a kernel larger than 1 that
is an im2col (k₁·k₂ times the input) the graph does not have, and it would cost more than the fused node saves, so
such a layer is matched, left decomposed and reported with that reason. A pointwise layer (kernel all 1s, strides 1,
no padding, one group) is a Yat product over the channel axis, which channels-last x already has last: it becomes
YatGemm(x, W [O, C], B [O]) on x as it is, the Transposes and both Convs gone.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from yatdeploy.fusion.common import (
    CONSTANT_RTOL,
    YAT_DTYPES,
    constant,
    distance_eps,
    either,
    fail,
    new_initializer,
    yat_gemm,
)

# How the bias enters: none, or added to the product with the distance reading the product (nnx).
BIAS_FORMS = ("none", "add")


def _perm(value: ir.Value) -> list[int]:
    return list(value.producer().attributes.get_ints("perm", []))


def _conv_attributes(node: ir.Node) -> dict[str, object]:
    """The attributes that decide which input elements a Conv's output reads (defaults filled in)."""
    spatial = len(node.inputs[1].const_value.shape) - 2 if node.inputs[1].const_value is not None else 0
    get = node.attributes.get_ints
    return {"strides": list(get("strides", [1] * spatial)), "pads": list(get("pads", [0] * 2 * spatial)),
            "dilations": list(get("dilations", [1] * spatial)), "group": node.attributes.get_int("group", 1),
            "auto_pad": node.attributes.get_string("auto_pad", "NOTSET")}


class ConvYat(pattern.RewriteRuleClassBase):
    """A YatConv's Yat product → one YatGemm over the channel axis when the layer is pointwise; else reported."""

    def __init__(self, bias: str):
        super().__init__(name="yat_conv")
        self.bias = bias

    def pattern(self, op, x, w, ones, b, w_sq, floor, eps):
        dot = op.Transpose(op.Conv(op.Transpose(x, _outputs=["x_cf"]), w, _allow_other_inputs=True, _outputs=["conv"]),
                           _outputs=["dot"])
        squared = pattern.OrValue([op.Pow(x, 2.0), op.Mul(x, x)])
        patch_sq = op.Transpose(op.Conv(op.Transpose(squared, _outputs=["sq_cf"]), ones, _allow_other_inputs=True,
                                        _outputs=["patch_conv"]), _outputs=["patch_sq"])
        z = dot if self.bias == "none" else either(op.Add, dot, b)
        dist = op.Sub(either(op.Add, patch_sq, w_sq), either(op.Mul, dot, 2.0))
        clamped = pattern.OrValue([op.Max(dist, floor), op.Max(floor, dist), op.Clip(dist, floor), op.Relu(dist)])
        square = pattern.OrValue([op.Pow(z, 2.0), op.Mul(z, z)])
        return op.Div(square, either(op.Add, clamped, eps))

    def check(self, context, x, w, ones, w_sq, eps, x_cf, conv, dot, sq_cf, patch_conv, patch_sq, b=None,
              floor=None, **_) -> pattern.MatchResult:
        self._values = None
        kernel, unit = constant(w), constant(ones)
        if kernel is None or kernel.ndim < 3:
            return fail("the convolution's kernel is not a constant", w)
        if unit is None or unit.shape[1:] != kernel.shape[1:] or not np.all(unit == 1):
            return fail("the patch norm |x|² is not a convolution of x² with a ones kernel of the layer's size", ones)
        rank = kernel.ndim
        to_first, to_last = [0, rank - 1, *range(1, rank - 1)], [0, *range(2, rank), 1]
        if _perm(x_cf) != to_first or _perm(sq_cf) != to_first or _perm(dot) != to_last or _perm(patch_sq) != to_last:
            return fail("the convolutions are not channels-last in and out (jax2onnx's layout)", dot)
        attributes = _conv_attributes(conv.producer())
        if len(conv.producer().inputs) > 2 or len(patch_conv.producer().inputs) > 2:
            return fail("a convolution adds a bias of its own", conv)
        if attributes != _conv_attributes(patch_conv.producer()):
            return fail("the patch norm |x|² is not taken over the product's patches (the Convs differ)", patch_conv)
        out_channels, channels, *size = kernel.shape
        if attributes["group"] != 1:
            return fail(f"a grouped convolution ({attributes['group']} groups) is not one YatGemm", conv)
        if any(s != 1 for s in size):
            patch = "×".join(str(s) for s in size)
            return fail(f"YatConv kernel {patch}: a Yat product over {patch}×{channels} patches is a YatGemm only "
                        "on materialised patches, an im2col the graph does not have (and that would cost more "
                        "than the fused node saves); left as convolutions", conv)
        if any(s != 1 for s in attributes["strides"]) or any(attributes["pads"]) or \
                attributes["auto_pad"] not in ("NOTSET", "VALID"):
            return fail(f"a pointwise YatConv with strides {attributes['strides']} or padding {attributes['pads']} "
                        "reads other positions than its input's (only strides 1, no padding fuse)", conv)
        if x.dtype not in YAT_DTYPES or ir.DataType.from_numpy(kernel.dtype) != x.dtype:
            return fail(f"the product's dtypes ({x.dtype}, {kernel.dtype}) are not one YatGemm admits", x)
        w_nk = kernel.reshape(out_channels, channels)
        eps_value = distance_eps(eps, floor)
        if isinstance(eps_value, pattern.MatchResult):
            return eps_value
        folded = constant(w_sq)
        expected = np.sum(w_nk.astype(np.float64) ** 2, axis=1)
        if folded is None or folded.size != out_channels or (folded.ndim and folded.shape[-1] != out_channels):
            return fail("the term added to the patch norm is not one constant per output channel", w_sq)
        scale = max(float(np.max(np.abs(expected))), 1e-30)
        if not np.allclose(folded.reshape(-1), expected, rtol=CONSTANT_RTOL, atol=CONSTANT_RTOL * scale):
            return fail("the constant added to the patch norm is not |W|² of the kernel's filters", w_sq)
        bias = np.zeros(out_channels, dtype=kernel.dtype)
        if self.bias != "none":
            given = constant(b)
            if given is None or given.size != out_channels or (given.ndim and given.shape[-1] != out_channels):
                return fail("the bias is not a constant, one value per output channel", b)
            bias = given.astype(kernel.dtype).reshape(out_channels)
        self._values = (w_nk, bias, eps_value)
        return pattern.MatchResult()

    def rewrite(self, op, x, **_):
        w_nk, bias, eps_value = self._values
        return yat_gemm(op, x, new_initializer(op, w_nk, "w"), new_initializer(op, bias, "b"), eps=eps_value, alpha=1.0)


def rules() -> list[pattern.RewriteRule]:
    return [ConvYat.rule(bias) for bias in BIAS_FORMS]
