"""The fused model against the unfused one, in plain ONNX Runtime (YatGemm run as its ONNX function).

Both graphs compute the same math in the same dtype in other orders, so they may differ by rounding, as amplified
by what follows each Yat product. The bound is measured, not assumed: the unfused model is run a second time with
every float input and every float weight (initializers of more than one element) moved by one unit of rounding
(relative ±2⁻²⁴ for float32, ±2⁻⁵³ for float64, ±2⁻¹¹/2⁻⁸ for float16/bfloat16), and the difference that makes is
the model's own rounding noise. The fused model passes when, on every output, max |fused − unfused| ≤
SAFETY · (that noise + unit rounding · max |unfused|): the second term is a floor for outputs the perturbation
happens to leave alone (and for integer-only inputs).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from yatdeploy.cases import DEFAULT_INT_RANGE
from yatdeploy.errors import OnnxModelError
from yatdeploy.fusion.report import FusionCheck
from yatdeploy.graph import declared_inputs, graph_inputs

SAFETY = 16.0
# Each free dim's size in the two random cases (capped by a bound the graph sets on it).
CASE_SIZES = (1, 3)
_UNIT = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): 2.0**-53, np.dtype(np.float16): 2.0**-11}
_BFLOAT16_UNIT = 2.0**-8


def _unit(dtype: np.dtype) -> float:
    return _UNIT.get(np.dtype(dtype), _BFLOAT16_UNIT)


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxModelError(f"ONNX Runtime can't run the model to check the fusion: {str(exc).splitlines()[0]}") \
            from exc


def _cases(model: onnx.ModelProto, session, seed: int) -> list[dict[str, np.ndarray]]:
    from yatdeploy.exporting.limits import limits_from_graph

    feeds = declared_inputs(model)
    values, dims = limits_from_graph(model, feeds)
    rng = np.random.default_rng(seed)
    types = {i.name: i.type for i in session.get_inputs()}
    cases = []
    for size in CASE_SIZES:
        arrays = {}
        for feed in feeds:
            shape = tuple(d if isinstance(d, int) else min(size, dims[d].limit) if d in dims else size
                          for d in feed.dims)
            kind = types[feed.name]
            if "bool" in kind:
                arrays[feed.name] = rng.random(shape) < 0.5
            elif "int" in kind:
                high = values[feed.name].limit if feed.name in values else DEFAULT_INT_RANGE[1]
                arrays[feed.name] = rng.integers(0, high, size=shape).astype(kind[len("tensor("):-1])
            else:
                dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(kind, np.float32)
                arrays[feed.name] = rng.standard_normal(shape).astype(dtype)
        cases.append(arrays)
    return cases


def _nudged(array: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if array.dtype.kind != "f":
        return array
    sign = rng.choice(np.array([-1.0, 1.0]), size=array.shape)
    return (array.astype(np.float64) * (1.0 + sign * _unit(array.dtype))).astype(array.dtype)


def _perturbed_weights(model: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, tensor in enumerate(copy.graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f" and array.size > 1:
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(_nudged(array, rng), tensor.name))
    return copy


def check_fusion(unfused: onnx.ModelProto, fused: onnx.ModelProto, seed: int = 0) -> FusionCheck:
    """Run both models on random inputs (and the unfused one nudged by a unit of rounding, for the bound)."""
    if not graph_inputs(unfused):
        raise OnnxModelError("the model has no inputs to feed, so the fusion can't be checked")
    rng = np.random.default_rng(seed + 1)
    reference, nudged, candidate = _session(unfused), _session(_perturbed_weights(unfused, rng)), _session(fused)
    names = [o.name for o in reference.get_outputs()]
    worst: tuple[float, float, str] | None = None  # (diff, bound, output) of the output nearest to its bound
    cases = _cases(unfused, reference, seed)
    for feeds in cases:
        expected = reference.run(None, feeds)
        noisy = nudged.run(None, {k: _nudged(v, rng) for k, v in feeds.items()})
        got = candidate.run(names, feeds)
        for name, e, n, g in zip(names, expected, noisy, got):
            if e.dtype.kind != "f":
                diff, bound = float(np.any(e != g)), 0.0
            else:
                e64, g64 = e.astype(np.float64), g.astype(np.float64)
                if not np.array_equal(np.isfinite(e64), np.isfinite(g64)):
                    diff, bound = float("inf"), 0.0
                else:
                    finite = np.isfinite(e64)
                    diff = float(np.max(np.abs(g64 - e64)[finite], initial=0.0))
                    noise = float(np.max(np.abs(n.astype(np.float64) - e64)[finite], initial=0.0))
                    scale = float(np.max(np.abs(e64[finite]), initial=0.0))
                    bound = SAFETY * (noise + _unit(e.dtype) * scale)
            if worst is None or _ratio(diff, bound) > _ratio(worst[0], worst[1]):
                worst = (diff, bound, name)
    diff, bound, name = worst
    return FusionCheck(cases=len(cases), max_abs_diff=diff, bound=bound, worst_output=name, passed=diff <= bound)


def _ratio(diff: float, bound: float) -> float:
    return 0.0 if diff == 0 else diff / bound if bound > 0 else float("inf")
