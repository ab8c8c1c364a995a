"""Stage 4, attach: give an exported model the YatGemm ONNX function, so any runtime can run it.

The exporter inlines onnxscript functions it is handed, so the graph is exported with bare YatGemm
nodes and the function is added afterwards as a model-local function (docs/architecture.md).
"""

from __future__ import annotations

import onnx
from onnx import helper

from yatdeploy import dtypes
from yatdeploy.errors import OnnxModelError
from yatdeploy.ops.onnx_function import FUNCTION_OPSET, function_proto_for, precision_class
from yatdeploy.spec import YAT_GEMM


def yat_gemm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == YAT_GEMM.name and n.domain == YAT_GEMM.domain]


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return types


def node_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of each YatGemm node's X, keyed by node name (shape inference fills gaps)."""
    types = _value_types(model)
    nodes = yat_gemm_nodes(model)
    if any(n.input[0] not in types for n in nodes):
        inferred = onnx.shape_inference.infer_shapes(model)
        types.update(_value_types(inferred))
    result: dict[str, int] = {}
    for node in nodes:
        if node.input[0] not in types:
            raise OnnxModelError(f"YatGemm node {node.name!r}: the dtype of input {node.input[0]!r} is unknown")
        result[node.name] = types[node.input[0]]
    return result


def attach_yat_gemm_function(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the YatGemm function (one body for the model's precision class) and the domain import."""
    elem_types = set(node_elem_types(model).values())
    classes = {precision_class(t) for t in elem_types}
    if len(classes) > 1:
        names = ", ".join(sorted(dtypes.by_onnx(t).name for t in elem_types))
        raise OnnxModelError(
            f"the model has YatGemm nodes of {names}; one ONNX function can't serve both float32-accumulated "
            "16-bit and native precisions",
            "export the model in one dtype (--dtype)",
        )
    for existing in list(model.functions):
        if existing.domain == YAT_GEMM.domain and existing.name == YAT_GEMM.name:
            model.functions.remove(existing)
    if elem_types:
        model.functions.append(function_proto_for(next(iter(elem_types))))
    imports = {o.domain: o for o in model.opset_import}
    if "" in imports and imports[""].version != FUNCTION_OPSET:
        raise OnnxModelError(
            f"the model imports ONNX opset {imports[''].version}; the YatGemm function is written for {FUNCTION_OPSET}"
        )
    if YAT_GEMM.domain not in imports:
        model.opset_import.append(helper.make_opsetid(YAT_GEMM.domain, YAT_GEMM.version))
    return model
