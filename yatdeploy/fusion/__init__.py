"""Fusion: the Yat products an exporter wrote as ordinary ops (jax2onnx, a plain torch.onnx.export) turned back
into one `yat.YatGemm` node each, with the model-local YatGemm function attached (docs/fusion.md).

    fused, report = fuse_model(onnx.load("model.onnx"))

`fuse_model` is the one entry point (`yatdeploy fuse`, `yatdeploy.fuse` and the JAX export call it). The rules are
onnxscript rewriter rules (`onnxscript.rewriter.pattern`), one module per pattern family, registered in FAMILIES
in the order they are applied:

    dense.py      the Yat product of rows against a constant weight: YatNMN (torch, nnx; every option), YatEmbed.attend
    attention.py  Yat attention scores, queries against keys (MultiHeadYatAttention, RotaryYatAttention after
                  its rotary embedding): a batched YatGemm
    conv.py       YatConv: a pointwise one as a YatGemm over channels; a larger kernel reported, left decomposed
    scale.py      a constant scalar multiplying or dividing a YatGemm, folded into its alpha (until none is left)

Before the rules run, constants the exporter left as ops (|W|² of a constant W, a transposed or normalised W, a
softplus of a learnable eps) are folded. After them, a second pass of the same rules with onnxscript's matching
tracer records each match whose conditions failed, with its reason (`FusionReport.left`); then the fused model is
checked against the unfused one on random inputs (check.py) and refused if they disagree. A model with nothing to
fuse is returned as given.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnxscript.optimizer
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchStatus

from yatdeploy.errors import OnnxModelError, YatDeployError
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.fusion import attention, conv, dense, scale
from yatdeploy.fusion.check import check_fusion
from yatdeploy.fusion.report import FusionCheck, FusionReport, LeftDecomposed, format_report
from yatdeploy.graph import yat_gemm_nodes
from yatdeploy.spec import SUPPORTED_OPSETS

__all__ = ["FAMILIES", "FusionCheck", "FusionReport", "LeftDecomposed", "format_report", "fuse_model"]

# The patterns, in the order they are applied: each the report's name and its rules (one per form it takes).
FAMILIES: tuple[tuple[str, Callable[[], list[pattern.RewriteRule]]], ...] = (
    ("yat_dense", lambda: dense.rules(spherical=False)),
    ("yat_dense_spherical", lambda: dense.rules(spherical=True)),
    ("yat_attention", attention.rules),
    ("yat_conv", conv.rules),
    ("yat_scale", scale.rules),
)
# Ops whose constant inputs are folded before matching whatever their size (fold_constants' default skips large
# inputs): what exporters leave between a weight and the Yat product.
_FOLDED = {"Transpose", "Mul", "Pow", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Div", "Add", "Max",
           "Softplus", "ConstantOfShape", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Expand", "Identity"}


class _Misses(pattern.MatchingTracer):
    """Every match whose conditions failed (MatchingTracer keeps only the best per rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.misses: dict[str, LeftDecomposed] = {}

    def log(self, rule, container, node, match_result, status) -> None:
        if status in (MatchStatus.CONDITION_FAILED, MatchStatus.REPLACEMENT_FAILED) and node.name not in self.misses:
            self.misses[node.name] = LeftDecomposed(str(rule), node.name, match_result.reason or "conditions failed")


def _fold(model: ir.Model) -> None:
    def should_fold(node: ir.Node) -> bool | None:
        return True if node.domain == "" and node.op_type in _FOLDED else None

    onnxscript.optimizer.fold_constants(model, should_fold=should_fold, output_size_limit=2**31)


def fuse_model(model: onnx.ModelProto, *, check: bool = True, seed: int = 0) -> tuple[onnx.ModelProto, FusionReport]:
    """The model with each Yat product it writes as ordinary ops replaced by one YatGemm node, the YatGemm function
    attached, and the report. Raises OnnxModelError when the fused model disagrees with the unfused one (`check`:
    on random inputs drawn with `seed`), or when the model's opset has no YatGemm function."""
    report = FusionReport(nodes_before=len(model.graph.node), yat_gemm_nodes=len(yat_gemm_nodes(model)))
    work = ir.serde.deserialize_model(model)
    _fold(work)
    for name, rules in FAMILIES:
        if not (family := rules()):
            continue
        rule_set = pattern.RewriteRuleSet(family)
        report.fused[name] = 0
        # A rewrite can make another match (a scale over a scale): apply until none does.
        while count := rule_set.apply_to_model(work):
            report.fused[name] += count
    misses = _Misses()
    for _, rules in FAMILIES:
        if family := rules():
            pattern.RewriteRuleSet(family).apply_to_model(work, tracer=misses)
    report.left = list(misses.misses.values())
    if not report.total:
        report.nodes_after = report.nodes_before
        return model, report
    RemoveUnusedNodesPass()(work)
    fused = ir.serde.serialize_model(work)
    opset = next((o.version for o in fused.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in SUPPORTED_OPSETS:
        raise OnnxModelError(
            f"the model imports ONNX opset {opset}; the YatGemm function is defined for opsets "
            f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}",
            "export it at one of those (jax2onnx.to_onnx(..., opset=21); torch.onnx.export(..., opset_version=20))",
        )
    attach_yat_gemm_function(fused)
    report.nodes_after = len(fused.graph.node)
    report.yat_gemm_nodes = len(yat_gemm_nodes(fused))
    if check:
        report.check = check_fusion(model, fused, seed)
        if not report.check.passed:
            raise YatDeployError(
                f"the fused model disagrees with the unfused one: max |fused − unfused| {report.check.max_abs_diff:.3g} "
                f"on output '{report.check.worst_output}', above the rounding bound {report.check.bound:.3g}; "
                "nothing was written",
                "please report it with the model: a pattern matched what it should not have",
            )
    return fused, report
