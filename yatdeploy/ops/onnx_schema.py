"""The ONNX OpSchema of YatGemm, and the onnxscript Op that emits a bare YatGemm node."""

from __future__ import annotations

import functools

import onnx
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

from yatdeploy import dtypes
from yatdeploy.spec import YAT_GEMM, OpSpec

_TYPE_VAR = "T"


def _formal(tensor, optional: bool = False) -> OpSchema.FormalParameter:
    option = OpSchema.FormalParameterOption.Optional if optional else OpSchema.FormalParameterOption.Single
    return OpSchema.FormalParameter(tensor.name, _TYPE_VAR, tensor.doc, param_option=option)


def _attribute(attr) -> OpSchema.Attribute:
    if attr.kind is float:
        default = onnx.helper.make_attribute(attr.name, float(attr.default))
    else:
        default = onnx.helper.make_attribute(attr.name, str(attr.default))
    return OpSchema.Attribute(attr.name, default, attr.doc)


def build_schema(spec: OpSpec) -> OpSchema:
    type_strings = [dtypes.by_onnx(t).ort for t in spec.dtypes]
    return OpSchema(
        spec.name,
        spec.domain,
        spec.version,
        spec.doc,
        inputs=[_formal(t, t.optional) for t in spec.inputs],
        outputs=[_formal(t) for t in spec.outputs],
        type_constraints=[(_TYPE_VAR, type_strings, "Floating types admitted by the op.")],
        attributes=[_attribute(a) for a in spec.attributes],
    )


@functools.cache
def yat_gemm_schema() -> OpSchema:
    return build_schema(YAT_GEMM)


@functools.cache
def yat_opset() -> Opset:
    return Opset(YAT_GEMM.domain, YAT_GEMM.version)


@functools.cache
def yat_gemm_op() -> Op:
    """An onnxscript Op that writes one `yat.YatGemm` node (no function body)."""
    return Op(yat_opset(), YAT_GEMM.name, yat_gemm_schema())
