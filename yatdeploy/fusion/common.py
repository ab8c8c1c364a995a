"""What the fusion rules share: reading constants off a match, the pieces of the Yat product as exporters write them
(patterns), and the YatGemm node a rule writes in their place."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from yatdeploy.spec import PLUGIN_NAMESPACE, PLUGIN_VERSION, YAT_GEMM

# The dtypes YatGemm admits, as onnx_ir names them.
YAT_DTYPES = {ir.DataType(t) for t in YAT_GEMM.dtypes}
# How close a constant must be to what the Yat product needs of it (|W|² folded by the exporter, unit rows): float32
# rounding of a sum of squares, with room for the exporter's own order of summation.
CONSTANT_RTOL = 1e-4


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value as a numpy array when it is a constant (an initializer or a folded Constant), else None."""
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy())


def scalar(value: ir.Value | None) -> float | None:
    """The value as one float when it is a constant of one element (any shape of ones), else None."""
    array = constant(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def rank(value: ir.Value) -> int | None:
    """The value's rank: its shape's, else (a value a rewrite made) a Transpose's perm length, else None."""
    if value.shape is not None:
        return value.shape.rank()
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and "perm" in node.attributes:
        return len(node.attributes.get_ints("perm"))
    return None


def fail(reason: str, *sources) -> pattern.MatchResult:
    """A failed match with its reason (the report's 'left decomposed because')."""
    return pattern.MatchResult().fail(reason, [s for s in sources if s is not None])


def distance_eps(eps: ir.Value, floor: ir.Value | None) -> float | pattern.MatchResult:
    """YatGemm's eps: the constant added to the distance, which must be clamped at 0 (or not at all: a Relu); else
    the failed match saying why (every rule family's denominator is checked here)."""
    eps_value = scalar(eps)
    if eps_value is None or not eps_value > 0:
        return fail("the distance is divided after adding a non-constant or non-scalar eps"
                    if eps_value is None else f"eps is {eps_value}, not > 0", eps)
    floor_value = 0.0 if floor is None else scalar(floor)
    if floor_value != 0.0:
        return fail(f"the distance is clamped at {floor_value}, not 0 (a distance floor YatGemm does not have)"
                    if floor_value is not None else "the distance is clamped at a non-constant floor", floor)
    return eps_value


def either(op_builder, a, b):
    """A commutative op (Add, Mul, Max) with its operands in either order, as exporters write one or the other."""
    return pattern.OrValue([op_builder(a, b), op_builder(b, a)])


def squared_norm(op, v, name: str):
    """|v|² over an axis, in the forms exporters write (checked to be the last axis by `reduces_last_axis`)."""
    return pattern.OrValue(
        [op.ReduceSum(op.Mul(v, v), _allow_other_inputs=True),
         op.ReduceSum(op.Pow(v, 2.0), _allow_other_inputs=True),
         op.ReduceSumSquare(v, _allow_other_inputs=True)],
        name=name,
    )


def reduction_axes(node: ir.Node) -> list[int] | None:
    """A Reduce* node's axes (its input since opset 18, else its attribute); None when they are not constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = constant(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    attribute = node.attributes.get("axes")
    return None if attribute is None else [int(a) for a in attribute.as_ints()]


def reduces_axis(value: ir.Value, axis_of: ir.Value, axis: int, keepdims: bool = True) -> str | None:
    """Why `value` (a reduction of `axis_of`) is not a sum over `axis_of`'s `axis` (negative: from the end) with
    the dims kept, or None when it is."""
    node = value.producer()
    axes = reduction_axes(node)
    if axes is None:
        return f"{node.op_type} '{node.name}' reduces over axes that are not constant"
    rank = axis_of.shape.rank() if axis_of.shape is not None else None
    wanted = {axis} | ({axis % rank} if rank is not None else set())
    if len(axes) != 1 or axes[0] not in wanted:
        return f"{node.op_type} '{node.name}' sums over axes {axes}, not the product's axis {axis}"
    kept = node.attributes.get_int("keepdims", 1)
    if bool(kept) != keepdims:
        return f"{node.op_type} '{node.name}' has keepdims={kept}"
    return None


def yat_gemm(op, x: ir.Value, w: ir.Value, b: ir.Value, *, eps: float, alpha: float) -> ir.Value:
    """One YatGemm node, with the attributes yatdeploy's exporter writes (the TensorRT plugin's included)."""
    return op.YatGemm(
        x, w, b, eps=float(eps), alpha=float(alpha), plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION, _domain=YAT_GEMM.domain, _version=YAT_GEMM.version,
    )


_NAMES = itertools.count()


def new_initializer(op, array: np.ndarray, stem: str) -> ir.Value:
    """A constant the replacement adds (a weight transposed to [N, K], a bias), under a name of its own."""
    return op.initializer(ir.tensor(np.ascontiguousarray(array), name=f"yat_fused_{stem}_{next(_NAMES)}"))
