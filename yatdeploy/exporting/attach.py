"""Stage 5, attach: give an exported model the YatGemm ONNX function, so any runtime can run it.

The exporter inlines onnxscript functions it is handed, so the graph is exported with bare YatGemm
nodes and the function is added afterwards as a model-local function (docs/architecture.md).
"""

from __future__ import annotations

import onnx
from onnx import helper

from yatdeploy import dtypes
from yatdeploy.errors import OnnxModelError, option
from yatdeploy.graph import node_elem_types
from yatdeploy.ops.onnx_function import FUNCTION_OPSET, SUPPORTED_OPSETS, function_proto_for, precision_class
from yatdeploy.spec import YAT_GEMM


def attach_yat_gemm_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the YatGemm function (one body for the model's precision class) and the domain import."""
    elem_types = set(node_elem_types(model).values())
    classes = {precision_class(t) for t in elem_types}
    if len(classes) > 1:
        names = ", ".join(sorted(dtypes.by_onnx(t).name for t in elem_types))
        raise OnnxModelError(
            f"the model has YatGemm nodes of {names}; one ONNX function can't serve both float32-accumulated "
            "16-bit and native precisions",
            f"export the model in one dtype ({option('dtype')})",
        )
    imports = {o.domain: o for o in model.opset_import}
    opset = imports[""].version if "" in imports else FUNCTION_OPSET
    if opset not in SUPPORTED_OPSETS:
        raise OnnxModelError(f"the model imports ONNX opset {opset}; the YatGemm function is defined for opsets "
                             f"{SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}")
    for existing in list(model.functions):
        if existing.domain == YAT_GEMM.domain and existing.name == YAT_GEMM.name:
            model.functions.remove(existing)
    if elem_types:
        model.functions.append(function_proto_for(next(iter(elem_types)), opset))
    if YAT_GEMM.domain not in imports:
        model.opset_import.append(helper.make_opsetid(YAT_GEMM.domain, YAT_GEMM.version))
    return model
