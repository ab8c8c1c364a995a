"""Fusion rule: Yat attention scores, queries against keys, as one batched YatGemm.

    scores = (q·k)² / ((max(|q|² + |k|² − 2·q·k, 0) + eps) [· s])

as nmn.nnx's yat_attention_weights computes it (s = √head_dim) and jax2onnx writes it: the products as an Einsum
('...qhd,...khd->...hqk'), the squared norms as sums over head_dim moved by Transposes to [..., h, q, 1] and
[..., h, 1, k]. The node is YatGemm(X = q, W = k, B = zeros [kv_len]) with q and k transposed to [..., h, len, d]
where the Einsum's layout needs it, eps the attribute and 1/s in alpha; the alpha nmn applies after (and a constant
scale) are folded by scale.py, as yatdeploy's cached attention folds them (exporting/decoder.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from yatdeploy.fusion.common import YAT_DTYPES, constant, distance_eps, either, fail, scalar, yat_gemm


def einsum_perms(equation: str, rank: int | None) -> tuple[list[int], list[int], list[str], list[str]] | None:
    """For an Einsum of queries against keys ('...qhd,...khd->...hqk': batch letters, then m of the left only,
    n of the right only, d summed): the perms taking each operand to [batch, len, d], and the letter order of each
    operand (ellipsis dims named '0', '1', ...); None for any other equation."""
    try:
        inputs, out = equation.replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
    except ValueError:
        return None
    ellipsis = any("..." in s for s in (lhs, rhs, out))
    if ellipsis:
        if rank is None or not all(s.startswith("...") for s in (lhs, rhs, out)):
            return None
        lhs, rhs, out = lhs[3:], rhs[3:], out[3:]
        lead = [str(i) for i in range(rank - len(lhs))]
    else:
        lead = []
    if len(lhs) != len(rhs) or len(out) != len(lhs) or len(set(lhs)) != len(lhs) or len(set(rhs)) != len(rhs):
        return None
    summed = [c for c in lhs if c in rhs and c not in out]
    m, n = [c for c in lhs if c not in rhs], [c for c in rhs if c not in lhs]
    if len(summed) != 1 or len(m) != 1 or len(n) != 1 or out[-2:] != m[0] + n[0]:
        return None
    batch = list(out[:-2])
    if sorted(batch + m + summed) != sorted(lhs) or sorted(batch + n + summed) != sorted(rhs):
        return None
    left, right = lead + list(lhs), lead + list(rhs)
    perm_x = [left.index(c) for c in lead + batch + m + summed]
    perm_w = [right.index(c) for c in lead + batch + n + summed]
    return perm_x, perm_w, left, right


def _layout_of_norm(value: ir.Value, source: ir.Value, letters: list[str], summed: str) -> list[str] | None:
    """The letter order of `value` when it is |source|² summed over `summed` (kept as a 1) and transposed, else None."""
    perms = []
    while (node := value.producer()) is not None and node.op_type == "Transpose":
        perms.append(list(node.attributes.get_ints("perm", [])))
        value = node.inputs[0]
    node = value.producer()
    if node is None or node.op_type not in ("ReduceSumSquare", "ReduceSum") or not node.attributes.get_int("keepdims", 1):
        return None
    inner = node.inputs[0]
    if node.op_type == "ReduceSum":
        square = inner.producer()
        if square is None or not ((square.op_type == "Mul" and square.inputs[0] is square.inputs[1])
                                  or (square.op_type == "Pow" and scalar(square.inputs[1]) == 2.0)):
            return None
        inner = square.inputs[0]
    axes = constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if inner is not source or axes is None or axes.size != 1:
        return None
    if letters[int(axes.reshape(())) % len(letters)] != summed:
        return None
    order = list(letters)
    for perm in reversed(perms):
        if sorted(perm) != list(range(len(order))):
            return None
        order = [order[p] for p in perm]
    return order


class AttentionScores(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__(name="yat_attention")

    def pattern(self, op, q, k, q_sq, k_sq, floor, eps, s):
        dot = op.Einsum(q, k, _outputs=["dot"])
        dist = op.Sub(either(op.Add, q_sq, k_sq), either(op.Mul, dot, 2.0))
        clamped = pattern.OrValue([op.Max(dist, floor), op.Max(floor, dist), op.Clip(dist, floor), op.Relu(dist)])
        shifted = either(op.Add, clamped, eps)
        denominator = pattern.OrValue([shifted, op.Mul(shifted, s), op.Mul(s, shifted)])
        square = pattern.OrValue([op.Pow(dot, 2.0), op.Mul(dot, dot)])
        return op.Div(square, denominator)

    def check(self, context, q, k, dot, q_sq, k_sq, floor, eps, s=None, **_) -> pattern.MatchResult:
        equation = dot.producer().attributes.get_string("equation", "")
        rank = q.shape.rank() if q.shape is not None else None
        perms = einsum_perms(equation, rank)
        if perms is None:
            return fail(f"Einsum '{equation}' is not queries against keys", dot)
        perm_x, perm_w, left, right = perms
        if q.dtype not in YAT_DTYPES or k.dtype != q.dtype:
            return fail(f"the scores' dtypes ({q.dtype}, {k.dtype}) are not one YatGemm admits", q)
        eps_value = distance_eps(eps, floor)
        if isinstance(eps_value, pattern.MatchResult):
            return eps_value
        scale = 1.0 if s is None else scalar(s)
        if not scale:
            return fail("the denominator is scaled by a non-constant, non-scalar or zero factor", s)
        summed = left[perm_x[-1]]
        wanted_q = [left[p] for p in perm_x]  # [batch, m, d]; the norm is |q|² laid out as [batch, m, 1]
        wanted_k = [right[p] for p in perm_w[:-2]] + [summed, right[perm_w[-2]]]  # [batch, 1, n]
        if _layout_of_norm(q_sq, q, left, summed) != wanted_q:
            return fail("the term added for |q|² is not the queries' squared norms laid out as the scores", q_sq)
        if _layout_of_norm(k_sq, k, right, summed) != wanted_k:
            return fail("the term added for |k|² is not the keys' squared norms laid out as the scores", k_sq)
        self._values = (perm_x, perm_w, eps_value, 1.0 / scale, q.dtype)
        return pattern.MatchResult()

    def rewrite(self, op, q, k, **_):
        perm_x, perm_w, eps_value, alpha_value, dtype = self._values
        x = q if perm_x == sorted(perm_x) else op.Transpose(q, perm=perm_x)
        w = k if perm_w == sorted(perm_w) else op.Transpose(k, perm=perm_w)
        zero = ir.tensor(np.zeros(1, dtype=dtype.numpy()))
        b = op.ConstantOfShape(op.Shape(w, start=-2, end=-1), value=zero)  # zeros [kv_len], as the keys run
        return yat_gemm(op, x, w, b, eps=eps_value, alpha=alpha_value)


def rules() -> list[pattern.RewriteRule]:
    return [AttentionScores.rule()]
