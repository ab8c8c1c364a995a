"""Fusion rule: a YatGemm's output multiplied or divided by a constant scalar → the same YatGemm, alpha scaled.

This is how alpha reaches the node when the exporter writes it after the division (torch's learnable or constant
alpha, YatEmbed.attend's), and how attention's 1/√d and alpha fold into one alpha, as yatdeploy's cached attention
writes them. Applied until nothing changes, so a chain of scales folds whole.
"""

from __future__ import annotations

from onnxscript.rewriter import pattern

from yatdeploy.fusion.common import fail, rank, scalar, yat_gemm
from yatdeploy.spec import YAT_GEMM


def _yat(op, x, w, b):
    return op.YatGemm(x, w, b, _domain=YAT_GEMM.domain, _outputs=["y"])


class FoldScale(pattern.RewriteRuleClassBase):
    """Mul(YatGemm, s), Mul(s, YatGemm) or Div(YatGemm, s), s a constant scalar."""

    def __init__(self, form: str):
        super().__init__(name="yat_scale")
        self.form = form

    def pattern(self, op, x, w, b, s):
        if self.form == "mul":
            return op.Mul(_yat(op, x, w, b), s)
        if self.form == "rmul":
            return op.Mul(s, _yat(op, x, w, b))
        return op.Div(_yat(op, x, w, b), s)

    def check(self, context, x, s, **_) -> pattern.MatchResult:
        value = scalar(s)
        if value is None:
            return fail("the YatGemm output is scaled by a non-constant or non-scalar factor", s)
        if self.form == "div" and value == 0:
            return fail("the YatGemm output is divided by 0", s)
        y_rank = rank(x)  # YatGemm keeps the rank of X
        if s.shape is None or (s.shape.rank() and (y_rank is None or s.shape.rank() > y_rank)):
            return fail("the scale has more dims than the YatGemm output, or they are unknown (it could broadcast it)", s)
        self._factor = 1.0 / value if self.form == "div" else value
        return pattern.MatchResult()

    def rewrite(self, op, x, w, b, y, **_):
        node = y.producer()
        eps = node.attributes.get_float("eps", YAT_GEMM.attribute("eps").default)
        alpha = node.attributes.get_float("alpha", YAT_GEMM.attribute("alpha").default)
        return yat_gemm(op, x, w, b, eps=eps, alpha=alpha * self._factor)


def rules() -> list[pattern.RewriteRule]:
    return [FoldScale.rule(form) for form in ("mul", "rmul", "div")]
