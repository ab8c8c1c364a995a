"""Fusion rules: the Yat product of rows against a constant weight, as a YatNMN layer and YatEmbed.attend compute it.

    y = [alpha ·] (x·W [+ b])² / (max(|x|² + |W|² − 2·x·W, 0) + eps)

nmn writes it in each framework a little differently, and the rules take every form an exporter was seen to write:
the product as MatMul (torch.onnx), Gemm or Einsum (jax2onnx, W [K, N] or transposed); the bias added to the
product, the distance from the product before it (nnx) or from the biased product less the bias (torch: `y - bias`);
|x|² as ReduceSum of x·x or x², or ReduceSumSquare; |W|² a constant (torch folds it, and fusion folds the constants
of the other exporters first); the clamp as Max, Clip or Relu; the square as Pow or Mul; alpha multiplied into the
numerator before the division (nnx) or after it (folded by `scale.py`). Spherical layers (x and W normalised; the
distance written as 2 − 2·x·W) become the same node with the input normalisation left in front of it, as
yatdeploy's export writes them; the rule checks that x is a normalised row and W's rows have unit norm.

Conditions (each failure is the report's reason the product stayed decomposed): W, the bias, eps and a numerator
alpha constant, eps and alpha scalars, |W|² the constant of W's rows, the sums over the product's axis, the clamp
at 0 (nnx's `distance_floor` is not YatGemm's), the dtype one YatGemm admits.
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
    reduces_axis,
    scalar,
    squared_norm,
    yat_gemm,
)

# How the bias enters: none; added to the product, the distance reading the product (nnx); added, the distance
# reading the sum less the bias (torch's `y - bias`).
BIAS_FORMS = ("none", "add", "add_sub")


def einsum_layout(equation: str) -> str | None:
    """'kn' or 'nk' for an Einsum of rows against a 2-D weight ('abc,cd->abd', '...k,nk->...n'), else None."""
    try:
        inputs, out = equation.replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
    except ValueError:
        return None
    if len(rhs) != 2 or not lhs or lhs[-1] == "." or rhs[0] == rhs[1]:
        return None
    k = lhs[-1]
    if rhs[0] == k:
        layout, n = "kn", rhs[1]
    elif rhs[1] == k:
        layout, n = "nk", rhs[0]
    else:
        return None
    return layout if out == lhs[:-1] + n and n not in lhs else None


def product_layout(dot: ir.Value) -> tuple[str | None, str | None]:
    """The weight's layout ('kn' or 'nk') of the node computing x·W, or (None, why it is not a plain product)."""
    node = dot.producer()
    if node.op_type == "MatMul":
        return "kn", None
    if node.op_type == "Einsum":
        equation = node.attributes.get_string("equation", "")
        layout = einsum_layout(equation)
        return (layout, None) if layout else (None, f"Einsum '{equation}' is not rows against a 2-D weight")
    # Gemm: alpha·A'·B' + beta·C, with C (if any) zero or ignored.
    if node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0:
        return None, f"Gemm '{node.name}' transposes or scales its input"
    if len(node.inputs) > 2 and node.inputs[2] is not None and node.attributes.get_float("beta", 1.0) != 0.0:
        c = constant(node.inputs[2])
        if c is None or np.any(c):
            return None, f"Gemm '{node.name}' adds a C term to the product"
    return ("nk" if node.attributes.get_int("transB", 0) else "kn"), None


class _Normalised(pattern.PatternBase):
    """x / |x| over the last axis (match only): torch's ReduceL2, jax2onnx's Sqrt of a (reshaped) sum of squares,
    with or without a guard against 0 (+ tiny, or max(., tiny))."""

    def pattern(self, op, x0):
        sq = squared_norm(op, x0, "sq")
        norm = pattern.OrValue([
            op.ReduceL2(x0, _allow_other_inputs=True),
            op.Sqrt(sq),
            op.Sqrt(op.Reshape(sq, _allow_other_inputs=True)),
            op.Sqrt(op.Expand(op.Reshape(sq, _allow_other_inputs=True), _allow_other_inputs=True)),
        ], name="norm")
        guarded = pattern.OrValue([norm, op.Add(norm, pattern.ANY_VALUE), op.Max(norm, pattern.ANY_VALUE)])
        return op.Div(x0, guarded)

    def check(self, context, x0, norm, sq=None, **_):
        reduced = sq if sq is not None else norm
        keep = reduced.producer().attributes.get_int("keepdims", 1)
        return pattern.MatchResult() if reduces_axis(reduced, x0, -1, bool(keep)) is None else \
            fail("the input normalisation does not reduce the last axis")


_NORMALISED = _Normalised()


class DenseYat(pattern.RewriteRuleClassBase):
    """The Yat product of rows against a constant weight → one YatGemm (W [N, K], B [N], eps, alpha)."""

    def __init__(self, bias: str, spherical: bool):
        super().__init__(name="yat_dense_spherical" if spherical else "yat_dense")
        self.bias = bias
        self.spherical = spherical

    def pattern(self, op, x, w, b, w_sq, floor, eps, alpha):
        dot = pattern.OrValue([op.MatMul(x, w), op.Gemm(x, w, _allow_other_inputs=True), op.Einsum(x, w)], name="dot")
        z = dot if self.bias == "none" else either(op.Add, dot, b)
        plain = op.Sub(z, b) if self.bias == "add_sub" else dot
        twice = either(op.Mul, plain, 2.0)
        if self.spherical:
            dist = op.Sub(2.0, twice)
        else:
            dist = op.Sub(either(op.Add, squared_norm(op, x, "x_sq"), w_sq), twice)
        clamped = pattern.OrValue([op.Max(dist, floor), op.Max(floor, dist), op.Clip(dist, floor), op.Relu(dist)])
        square = pattern.OrValue([op.Pow(z, 2.0), op.Mul(z, z)])
        numerator = pattern.OrValue([square, op.Mul(alpha, square), op.Mul(square, alpha)])
        return op.Div(numerator, either(op.Add, clamped, eps))

    def check(self, context, x, w, b, dot, floor, eps, alpha, w_sq=None, x_sq=None, **_) -> pattern.MatchResult:
        self._values = None
        layout, why = product_layout(dot)
        if layout is None:
            return fail(why, dot)
        weight = constant(w)
        if weight is None or weight.ndim != 2:
            return fail("the weight of the product is not a 2-D constant", w)
        w_nk = weight if layout == "nk" else weight.T
        n, k = w_nk.shape
        if x.dtype not in YAT_DTYPES or ir.DataType.from_numpy(w_nk.dtype) != x.dtype:
            return fail(f"the product's dtypes ({x.dtype}, {w_nk.dtype}) are not one YatGemm admits", x)
        if x.shape is not None and x.shape.rank() and isinstance(x.shape[-1], int) and x.shape[-1] != k:
            return fail(f"the input's last dim {x.shape[-1]} is not the weight's {k}", x)
        eps_value = distance_eps(eps, floor)
        if isinstance(eps_value, pattern.MatchResult):
            return eps_value
        alpha_value = 1.0 if alpha is None else scalar(alpha)
        if alpha_value is None:
            return fail("the numerator is scaled by a non-constant or non-scalar alpha", alpha)
        bias = np.zeros(n, dtype=w_nk.dtype)
        if self.bias != "none":
            given = constant(b)
            if given is None:
                return fail("the bias is not a constant", b)
            try:
                bias = np.broadcast_to(given.astype(w_nk.dtype), (1,) * max(given.ndim - 1, 0) + (n,)).reshape(n)
            except ValueError:
                return fail(f"the bias of shape {list(given.shape)} is not one value per output unit ({n})", b)
        if self.spherical:
            rows = np.sqrt(np.sum(w_nk.astype(np.float64) ** 2, axis=1))
            if not np.allclose(rows, 1.0, rtol=0, atol=CONSTANT_RTOL):
                return fail("the distance is written as 2 − 2·x·W but W's rows are not unit vectors", w)
            if x.producer() is None or not _NORMALISED.match(context.model, context.graph_or_function, x.producer(),
                                                             check_nodes_are_removable=False):
                return fail("the distance is written as 2 − 2·x·W but x is not normalised over its last axis", x)
        else:
            why = reduces_axis(x_sq, x, -1)
            if why:
                return fail(why, x_sq)
            folded = constant(w_sq)
            if folded is None:
                return fail("|W|² is not a constant", w_sq)
            expected = np.sum(w_nk.astype(np.float64) ** 2, axis=1)
            if folded.size != n or (folded.ndim and folded.shape[-1] != n):
                return fail(f"|W|² has shape {list(folded.shape)}, not one value per output unit ({n})", w_sq)
            scale = max(float(np.max(np.abs(expected))), 1e-30)
            if not np.allclose(folded.reshape(n), expected, rtol=CONSTANT_RTOL, atol=CONSTANT_RTOL * scale):
                return fail("the constant added to |x|² is not |W|² of the weight's rows", w_sq)
        self._values = (w_nk, bias, eps_value, alpha_value)
        return pattern.MatchResult()

    def rewrite(self, op, x, **_):
        w_nk, bias, eps_value, alpha_value = self._values
        return yat_gemm(op, x, new_initializer(op, w_nk, "w"), new_initializer(op, bias, "b"),
                        eps=eps_value, alpha=alpha_value)


def rules(spherical: bool) -> list[pattern.RewriteRule]:
    return [DenseYat.rule(bias, spherical) for bias in BIAS_FORMS]
