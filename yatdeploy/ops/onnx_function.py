"""YatGemm as an ONNX function written with onnxscript, for runtimes without yatdeploy's kernels.

The body's arithmetic type depends on the node dtype (float32 accumulation and saturation for
16-bit types), and an ONNX function can't branch on a type, so one body is built per precision
class: `native` for float and double, `float32-accumulated` per 16-bit type. A model carries one
`yat.YatGemm` function, so its YatGemm nodes must all belong to one class.

The body always reads B. ONNX Runtime rejects a function body that touches a missing optional
input, even inside an untaken If branch, and the optional-slot tricks (Gemm's C) have no bfloat16
CPU kernel; yatdeploy's exporter therefore always writes B (zeros for a bias-free layer).
"""

from __future__ import annotations

import functools

import onnx
import torch
from onnx import TensorProto
from onnxscript import opset20 as op
from onnxscript import script
from onnxscript.values import OnnxFunction

from yatdeploy import dtypes
from yatdeploy.ops.onnx_schema import yat_opset
from yatdeploy.spec import DEFAULT_EPS, FUNCTION_OPSET, SUPPORTED_OPSETS, YAT_GEMM

# The function's default opset (FUNCTION_OPSET) must equal the exported model's, or the inliner sees two
# default opsets: function_proto_for declares the body at the model's opset.


def _native() -> OnnxFunction:
    @script(yat_opset(), default_opset=op)
    def YatGemm(X, W, B, eps: float = DEFAULT_EPS, alpha: float = 1.0):
        # W [..., N, K] as [..., K, N], for any rank >= 2: a Transpose's perm has a fixed length, so the leading
        # dims are flattened into one around it (for a constant W, a layer's weights, ONNX Runtime folds it all).
        # The shapes are written out (ReduceProd, not -1) and read with allowzero=1, so that a 0 in them (an empty
        # past: N = 0) means 0, not "copy the input's dimension".
        lead = op.ReduceProd(op.Shape(W, end=-2), keepdims=1)
        rows = op.Reshape(W, op.Concat(lead, op.Shape(W, start=-2), axis=0), allowzero=1)
        kn = op.Concat(op.Shape(W, start=-1), op.Shape(W, start=-2, end=-1), axis=0)
        w_t = op.Reshape(op.Transpose(rows, perm=[0, 2, 1]), op.Concat(op.Shape(W, end=-2), kn, axis=0), allowzero=1)
        dot = op.MatMul(X, w_t)  # [..., M, N]: MatMul broadcasts the leading dims (batched W)
        z = dot + B
        x_sq = op.ReduceSumSquare(X, [-1], keepdims=1)
        w_sq = op.Unsqueeze(op.ReduceSumSquare(W, [-1], keepdims=0), [-2])  # [..., 1, N]
        dist = op.Max(x_sq + w_sq - op.CastLike(2.0, X) * dot, op.CastLike(0.0, X))
        y = z * z / (dist + op.CastLike(eps, X)) * op.CastLike(alpha, X)
        return op.Reshape(y, op.Shape(dot), allowzero=1)  # a 1-D X: [N], as MatMul gives it

    return YatGemm


def _float32_accumulated(finite_max: float) -> OnnxFunction:
    @script(yat_opset(), default_opset=op)
    def YatGemm(X, W, B, eps: float = DEFAULT_EPS, alpha: float = 1.0):
        x = op.Cast(X, to=TensorProto.FLOAT)
        w = op.Cast(W, to=TensorProto.FLOAT)
        lead = op.ReduceProd(op.Shape(w, end=-2), keepdims=1)
        rows = op.Reshape(w, op.Concat(lead, op.Shape(w, start=-2), axis=0), allowzero=1)
        kn = op.Concat(op.Shape(w, start=-1), op.Shape(w, start=-2, end=-1), axis=0)
        w_t = op.Reshape(op.Transpose(rows, perm=[0, 2, 1]), op.Concat(op.Shape(w, end=-2), kn, axis=0), allowzero=1)
        dot = op.MatMul(x, w_t)
        z = dot + op.Cast(B, to=TensorProto.FLOAT)
        x_sq = op.ReduceSumSquare(x, [-1], keepdims=1)
        w_sq = op.Unsqueeze(op.ReduceSumSquare(w, [-1], keepdims=0), [-2])
        dist = op.Max(x_sq + w_sq - 2.0 * dot, 0.0)
        y = op.Reshape(z * z / (dist + eps) * alpha, op.Shape(dot), allowzero=1)
        return op.CastLike(op.Clip(y, -finite_max, finite_max), X)

    return YatGemm


@functools.cache
def function_for(elem_type: int) -> OnnxFunction:
    """The onnxscript function whose body computes YatGemm for nodes of `elem_type`."""
    if elem_type not in YAT_GEMM.dtypes:
        raise ValueError(f"YatGemm admits no {TensorProto.DataType.Name(elem_type)}")
    if elem_type in YAT_GEMM.float32_accumulated:
        return _float32_accumulated(float(torch.finfo(dtypes.by_onnx(elem_type).torch).max))
    return _native()


def precision_class(elem_type: int) -> str:
    if elem_type in YAT_GEMM.float32_accumulated:
        return f"float32-accumulated {dtypes.by_onnx(elem_type).name}"
    return "native"


def function_proto_for(elem_type: int, opset: int = FUNCTION_OPSET) -> onnx.FunctionProto:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"the YatGemm function is defined for ONNX opsets {SUPPORTED_OPSETS.start} to "
                         f"{SUPPORTED_OPSETS.stop - 1}, not {opset}")
    proto = function_for(elem_type).to_function_proto()
    for entry in proto.opset_import:
        if entry.domain == "":
            entry.version = opset
    return proto
