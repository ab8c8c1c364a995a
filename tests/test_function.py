"""The onnxscript function body, run by a plain ONNX Runtime, against the torch op."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from yatdeploy import backends, dtypes
from yatdeploy.backends import ort
from yatdeploy.errors import OnnxModelError
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.ops.reference import output_shape
from yatdeploy.ops.torch_op import yat_gemm_reference
from yatdeploy.spec import YAT_GEMM

TOLERANCE = {"float32": 2e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}


def _initializer(array: np.ndarray, name: str) -> onnx.TensorProto:
    if array.dtype == ml_dtypes.bfloat16:
        return helper.make_tensor(name, onnx.TensorProto.BFLOAT16, array.shape, array.tobytes(), raw=True)
    return numpy_helper.from_array(array, name)


def yat_gemm_model(w: np.ndarray, b: np.ndarray, x_shape: list, eps: float, alpha: float) -> onnx.ModelProto:
    elem = dtypes.by_name(_name_of(w.dtype)).onnx
    node = helper.make_node(YAT_GEMM.name, ["X", "W", "B"], ["Y"], domain=YAT_GEMM.domain, eps=eps, alpha=alpha)
    graph = helper.make_graph(
        [node], "yat_gemm_only",
        [helper.make_tensor_value_info("X", elem, x_shape)],
        [helper.make_tensor_value_info("Y", elem, [*x_shape[:-1], w.shape[0]])],
        [_initializer(w, "W"), _initializer(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    attach_yat_gemm_function(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _name_of(np_dtype) -> str:
    return next(t.name for t in dtypes.FLOAT_TYPES if t.numpy == np_dtype)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.create_session(model.SerializeToString(), backends.get("ort-function"))
    return ort.run(session, {"X": x})[0]


def _expected(x, w, b, eps, alpha, dtype: str) -> np.ndarray:
    t = dtypes.by_name(dtype).torch
    as_torch = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32)).to(t) if dtype == "bfloat16" else torch.from_numpy(a)
    y = yat_gemm_reference(as_torch(x), as_torch(w), as_torch(b), eps, alpha)
    return y.double().numpy()


def _random(shape, dtype: str, rng, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32).astype(dtypes.by_name(dtype).numpy)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("m,k,n", [(1, 32, 16), (7, 33, 5), (4, 1, 3), (5, 8, 1)])
def test_function_matches_torch(dtype, m, k, n):
    rng = np.random.default_rng(m * 100 + k + n)
    x, w, b = _random((m, k), dtype, rng), _random((n, k), dtype, rng, 0.5), _random((n,), dtype, rng, 0.1)
    got = _run(yat_gemm_model(w, b, ["batch", k], 1e-3, 1.25), x)
    assert got.dtype == dtypes.by_name(dtype).numpy and got.shape == (m, n)
    expected = _expected(x, w, b, 1e-3, 1.25, dtype)
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=TOLERANCE[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_leading_dimensions(dtype):
    rng = np.random.default_rng(3)
    x, w, b = _random((2, 3, 8), dtype, rng), _random((4, 8), dtype, rng), _random((4,), dtype, rng)
    got = _run(yat_gemm_model(w, b, ["b", "t", 8], 1e-5, 1.0), x)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got.astype(np.float64), _expected(x, w, b, 1e-5, 1.0, dtype), rtol=TOLERANCE[dtype])


def batched_model(x_shape: list, w_shape: list, b: np.ndarray, eps: float, alpha: float) -> onnx.ModelProto:
    """One YatGemm node with X and a batched W ([..., N, K]) as graph inputs, B an initializer."""
    elem = dtypes.by_name(_name_of(b.dtype)).onnx
    node = helper.make_node(YAT_GEMM.name, ["X", "W", "B"], ["Y"], domain=YAT_GEMM.domain, eps=eps, alpha=alpha)
    graph = helper.make_graph(
        [node], "yat_gemm_batched",
        [helper.make_tensor_value_info("X", elem, x_shape), helper.make_tensor_value_info("W", elem, w_shape)],
        [helper.make_tensor_value_info("Y", elem, output_shape(tuple(x_shape), tuple(w_shape)))],
        [_initializer(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    attach_yat_gemm_function(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("x_shape,w_shape", [
    ((2, 3, 5, 16), (2, 3, 7, 16)),  # the same leading dims
    ((2, 1, 5, 16), (1, 3, 7, 16)),  # [B, 1, ...] against [1, H, ...]
    ((5, 16), (2, 3, 7, 16)),  # X of rank 2 against every slice of W
    ((1, 4, 1, 64), (1, 4, 300, 64)),  # decode: M = 1
    ((2, 2, 3, 33), (2, 2, 40, 33)),  # K odd
    ((2, 3, 9, 5), (2, 3, 1, 5)),  # N = 1
    ((1, 4, 1, 64), (1, 4, 0, 64)),  # an empty past: kv_len 0
    ((1, 4, 0, 64), (1, 4, 9, 64)),  # M = 0
], ids=["same", "broadcast", "x-rank-2", "decode", "odd-k", "N=1", "kv-0", "M=0"])
def test_batched_w_matches_torch(dtype, x_shape, w_shape):
    """The function on a batched W, run by plain ONNX Runtime (no library), against the torch op's semantics."""
    rng = np.random.default_rng(len(x_shape) * 100 + w_shape[-2])
    x, w = _random(x_shape, dtype, rng), _random(w_shape, dtype, rng, 0.5)
    b = _random((w_shape[-2],), dtype, rng, 0.1)
    session = ort.create_session(batched_model(list(x_shape), list(w_shape), b, 1e-3, 1.25).SerializeToString(),
                                 backends.get("ort-function"))
    got = ort.run(session, {"X": x, "W": w})[0]
    expected = _expected(x, w, b, 1e-3, 1.25, dtype)
    assert got.dtype == dtypes.by_name(dtype).numpy and got.shape == expected.shape
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=TOLERANCE[dtype], atol=1e-6)


def test_x_close_to_w_stays_finite_and_within_the_cancellation_bound_in_float32():
    rng = np.random.default_rng(4)
    w = _random((6, 64), "float32", rng)
    x = (w + 1e-3 * rng.standard_normal(w.shape)).astype(np.float32)
    b = np.zeros(6, np.float32)
    eps = 1e-5
    got = _run(yat_gemm_model(w, b, ["batch", 64], eps, 1.0), x).astype(np.float64)
    assert np.isfinite(got).all() and (got >= 0).all()
    off_diagonal = ~np.eye(6, dtype=bool)
    expected = _expected(x, w, b, eps, 1.0, "float32")
    np.testing.assert_allclose(got[off_diagonal], expected[off_diagonal], rtol=1e-4)
    # On the diagonal the spec's expanded distance |x|² + |w|² - 2x·w cancels: float32 can only
    # promise it to a few ulps of |x|² + |w|², so check the distance the output implies against that bound.
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    dot = np.einsum("ik,ik->i", x64, w64)
    implied_dist = dot**2 / np.diag(got) - eps
    true_dist = ((x64 - w64) ** 2).sum(axis=1)
    bound = 16 * np.finfo(np.float32).eps * ((x64**2).sum(1) + (w64**2).sum(1))
    assert (np.abs(implied_dist - true_dist) <= bound).all()


def test_16bit_output_saturates_like_torch():
    # x == w: the distance is 0 and y = dot² / eps = 1.6e14, far beyond float16's range.
    w = np.full((1, 4), 100.0, np.float16)
    x = np.full((1, 4), 100.0, np.float16)
    got = _run(yat_gemm_model(w, np.zeros(1, np.float16), ["batch", 4], 1e-5, 1.0), x)
    assert got.item() == np.finfo(np.float16).max


def test_a_model_mixing_16bit_and_native_precisions_is_refused():
    x_f = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 4])
    x_h = helper.make_tensor_value_info("Xh", onnx.TensorProto.FLOAT16, [1, 4])
    nodes = [
        helper.make_node("YatGemm", ["X", "W", "B"], ["Y"], domain="yat", name="a"),
        helper.make_node("YatGemm", ["Xh", "Wh", "Bh"], ["Yh"], domain="yat", name="b"),
    ]
    inits = [numpy_helper.from_array(np.ones((2, 4), np.float32), "W"), numpy_helper.from_array(np.ones(2, np.float32), "B"),
             numpy_helper.from_array(np.ones((2, 4), np.float16), "Wh"), numpy_helper.from_array(np.ones(2, np.float16), "Bh")]
    graph = helper.make_graph(nodes, "g", [x_f, x_h], [helper.make_tensor_value_info("Y", 1, [1, 2]),
                                                        helper.make_tensor_value_info("Yh", 10, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    with pytest.raises(OnnxModelError, match="float16, float32"):
        attach_yat_gemm_function(model)
