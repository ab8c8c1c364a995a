"""Fusion (yatdeploy.fusion, `yatdeploy fuse`, yatdeploy.fuse): decomposed Yat math from any exporter → YatGemm.

Hand-built graphs (onnx.helper, the torch exporter's form) in the fast lane; real exports (a plain
torch.onnx.export of nmn.torch models, jax2onnx of nmn.nnx models) in the slow lane.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import yatdeploy
from yatdeploy import cli
from yatdeploy.errors import OnnxModelError, YatDeployError
from yatdeploy.fusion import fuse_model
from yatdeploy.graph import yat_gemm_nodes

from tests.model_zoo import YATNMN_OPTIONS

K, N = 6, 4


def _yat(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float, alpha: float) -> np.ndarray:
    dot = x.astype(np.float64) @ w.T.astype(np.float64)
    dist = np.maximum((x.astype(np.float64) ** 2).sum(-1, keepdims=True) + (w.astype(np.float64) ** 2).sum(-1) - 2 * dot, 0)
    return alpha * (dot + b) ** 2 / (dist + eps)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _yat_graph(*, eps_input: bool = False, floor: float = 0.0, alpha: float = 0.75, opset: int = 20,
               bias: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """YatNMN as torch.onnx.export writes it (W transposed, |W|² folded, the distance read from (x·W + b) − b),
    with an alpha Mul after the division; `eps_input` makes eps a graph input (a near-miss)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, K)).astype(np.float32)
    b = (0.1 * rng.standard_normal(N)).astype(np.float32)
    inits = [numpy_helper.from_array(w.T.copy(), "t"), numpy_helper.from_array((w**2).sum(1), "w_sq"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(floor, np.float32), "floor"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array([alpha], np.float32), "alpha")]
    if bias:
        inits.append(numpy_helper.from_array(b, "bias"))
    if not eps_input:
        inits.append(numpy_helper.from_array(np.array(1e-5, np.float32), "eps"))
    z = "z" if bias else "dot"
    nodes = [helper.make_node("MatMul", ["x", "t"], ["dot"]),
             *([helper.make_node("Add", ["dot", "bias"], ["z"]), helper.make_node("Sub", ["z", "bias"], ["plain"])]
               if bias else []),
             helper.make_node("Pow", ["x", "two"], ["x2"]),
             helper.make_node("ReduceSum", ["x2", "axes"], ["x_sq"], keepdims=1),
             helper.make_node("Add", ["x_sq", "w_sq"], ["norms"]),
             helper.make_node("Mul", ["plain" if bias else "dot", "two"], ["twice"]),
             helper.make_node("Sub", ["norms", "twice"], ["dist"]),
             helper.make_node("Clip", ["dist", "floor"], ["clamped"]),
             helper.make_node("Pow", [z, "two"], ["square"]),
             helper.make_node("Add", ["clamped", "eps"], ["shifted"]),
             helper.make_node("Div", ["square", "shifted"], ["ratio"]),
             helper.make_node("Mul", ["ratio", "alpha"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])]
    if eps_input:
        inputs.append(helper.make_tensor_value_info("eps", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "yat", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    expected_args = (w, b if bias else np.zeros(N, np.float32))
    return model, {"w": expected_args[0], "b": expected_args[1], "alpha": np.float32(alpha)}


def test_a_hand_built_yat_product_fuses_into_one_yat_gemm_with_alpha_folded():
    model, params = _yat_graph()
    fused, report = fuse_model(model)
    (node,) = yat_gemm_nodes(fused)
    assert len(fused.graph.node) == 1
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["eps"] == pytest.approx(1e-5) and attributes["alpha"] == pytest.approx(0.75)
    assert attributes["plugin_namespace"] == b"yat" and attributes["plugin_version"] == b"1"
    assert any(f.name == "YatGemm" and f.domain == "yat" for f in fused.functions)
    assert report.fused["yat_dense"] == 1 and report.fused["yat_scale"] == 1 and report.total == 1
    assert report.check is not None and report.check.passed and report.check.cases == 2
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    expected = _yat(x, params["w"], params["b"], 1e-5, float(params["alpha"]))
    np.testing.assert_allclose(_run(fused, {"x": x})[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(fused, {"x": x})[0], _run(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_a_model_with_nothing_to_fuse_comes_back_unchanged_and_says_so():
    w = numpy_helper.from_array(np.ones((K, N), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
                              "plain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    before = model.SerializeToString()
    fused, report = fuse_model(model)
    assert fused is model and fused.SerializeToString() == before
    assert report.total == 0 and report.left == [] and report.check is None
    assert "nothing fused: the model is unchanged" in yatdeploy.fusion.format_report(report)


@pytest.mark.parametrize("case, reason", [
    ({"eps_input": True}, "non-constant"),
    ({"floor": 0.1}, "clamped at 0.1"),
])
def test_a_near_miss_stays_decomposed_with_its_reason(case, reason):
    model, _ = _yat_graph(**case)
    fused, report = fuse_model(model)
    assert fused is model and report.total == 0
    (left,) = report.left
    assert left.pattern == "yat_dense" and reason in left.reason


def test_a_fusion_that_disagrees_with_the_unfused_model_is_refused_and_nothing_is_written(monkeypatch, tmp_path):
    from yatdeploy.fusion import dense

    real = dense.yat_gemm
    monkeypatch.setattr(dense, "yat_gemm", lambda op, x, w, b, *, eps, alpha: real(op, x, w, b, eps=eps, alpha=alpha * 2))
    model, _ = _yat_graph()
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    with pytest.raises(YatDeployError, match="disagrees with the unfused one"):
        yatdeploy.fuse(source, tmp_path / "fused.onnx")
    assert not (tmp_path / "fused.onnx").exists()


def test_an_opset_without_the_yat_gemm_function_is_refused_with_what_to_do():
    model, _ = _yat_graph(opset=23)
    with pytest.raises(OnnxModelError, match="opset 23.*opset=21"):
        fuse_model(model)


def test_the_api_and_the_command_write_the_fused_model_and_the_report(tmp_path, capsys):
    model, _ = _yat_graph(bias=False)
    source, out, report = tmp_path / "model.onnx", tmp_path / "fused.onnx", tmp_path / "report.json"
    onnx.save(model, source)
    assert cli.main(["fuse", str(source), "-o", str(out), "--report", str(report), "-q"]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "fused 1 Yat product(s)" in printed and "yat_dense" in printed and "passed" in printed
    assert len(yat_gemm_nodes(onnx.load(out))) == 1
    data = json.loads(report.read_text())
    assert data["total"] == 1 and data["fused"]["yat_dense"] == 1 and data["check"]["passed"]
    fused, result = yatdeploy.fuse(model)  # a ModelProto in, nothing written
    assert result.total == 1 and len(yat_gemm_nodes(fused)) == 1


def test_hostile_inputs_are_clear_errors(tmp_path, capsys):
    with pytest.raises(YatDeployError, match="no such file"):
        yatdeploy.fuse(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \x00\xff")
    with pytest.raises(YatDeployError, match="not an ONNX model"):
        yatdeploy.fuse(junk)
    assert cli.main(["fuse", str(junk), "-o", str(tmp_path / "out.onnx"), "-q"]) == cli.EXIT_USAGE
    assert "not an ONNX model" in capsys.readouterr().err
    model, _ = _yat_graph()
    with pytest.raises(YatDeployError, match="is a folder"):  # checked before any work
        yatdeploy.fuse(model, tmp_path)


# --- real exports -------------------------------------------------------------------------------------------------


def _plain_torch_export(model, x) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(model, (x,), dynamo=True, opset_version=20).model_proto


@pytest.mark.slow
def test_a_plain_torch_export_fuses_into_the_yat_gemm_graph_yatdeploys_export_gives(tmp_path, progress):
    import torch

    from tests.model_zoo import yat_mlp

    model = yat_mlp()
    x = torch.randn(3, 16)
    plain = _plain_torch_export(model, x)
    fused, report = fuse_model(plain)
    yatdeploy.export(model, x, tmp_path / "ours.onnx", validate=False, progress=progress)
    exported = onnx.load(tmp_path / "ours.onnx")
    assert len(yat_gemm_nodes(fused)) == len(yat_gemm_nodes(exported)) == report.total == 2
    assert report.left == [] and report.check.passed
    feeds = {plain.graph.input[0].name: x.numpy()}
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(fused, feeds)[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_run(fused, feeds)[0], _run(exported, {exported.graph.input[0].name: x.numpy()})[0],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("option", [name for name in YATNMN_OPTIONS if name != "default"])
def test_every_yatnmn_option_of_a_plain_torch_export_fuses_one_yat_gemm_per_layer(option):
    import torch

    from tests.model_zoo import yat_mlp

    options = YATNMN_OPTIONS[option]
    model = yat_mlp(options)
    x = torch.randn(3, 16, dtype=options.get("dtype", torch.float32))
    fused, report = fuse_model(_plain_torch_export(model, x))
    assert report.total == len(yat_gemm_nodes(fused)) == 2 and report.left == [] and report.check.passed
    with torch.no_grad():
        expected = model(x).numpy()
    got = _run(fused, {fused.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 if x.dtype == torch.float32 else 1e-12)


def _jax_export(module, shape):
    from jax2onnx import to_onnx

    return to_onnx(module, [shape], opset=21)


def _jax_case(module, shape):
    """The module exported with jax2onnx and fused; the outputs of JAX, the unfused and the fused graphs."""
    import jax.numpy as jnp

    unfused = _jax_export(module, shape)
    fused, report = fuse_model(unfused)
    x = np.random.default_rng(3).standard_normal((2, *shape[1:])).astype(np.float32)
    feeds = {unfused.graph.input[0].name: x}
    return report, fused, np.asarray(module(jnp.asarray(x))), _run(unfused, feeds)[0], _run(fused, feeds)[0]


NNX_YATNMN = {"default": {}, "no_bias": {"use_bias": False}, "no_alpha": {"use_alpha": False},
              "constant_alpha": {"constant_alpha": True}, "learnable_epsilon": {"learnable_epsilon": True},
              "epsilon": {"epsilon": 1e-3}, "spherical": {"spherical": True}, "fused": {"fused": True}}


@pytest.mark.slow
@pytest.mark.parametrize("option", sorted(NNX_YATNMN))
def test_an_nnx_yatnmn_exported_by_jax2onnx_fuses_and_matches_jax(option):
    from flax import nnx
    from nmn.nnx import YatNMN

    report, fused, jax_out, unfused_out, fused_out = _jax_case(
        YatNMN(6, 4, rngs=nnx.Rngs(0), **NNX_YATNMN[option]), ("B", 6))
    assert report.total == len(yat_gemm_nodes(fused)) == 1 and report.check.passed
    np.testing.assert_allclose(fused_out, unfused_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_an_nnx_distance_floor_stays_decomposed_with_its_reason():
    from flax import nnx
    from nmn.nnx import YatNMN

    report, fused, jax_out, unfused_out, fused_out = _jax_case(
        YatNMN(6, 4, rngs=nnx.Rngs(0), distance_floor=0.1), ("B", 6))
    assert report.total == 0 and "clamped at 0.1" in report.left[0].reason
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_nnx_yat_embed_attend_and_yat_attention_fuse_and_match_jax():
    from flax import nnx
    from nmn.nnx import MultiHeadYatAttention, YatEmbed

    class Attend(nnx.Module):
        def __init__(self):
            self.embed = YatEmbed(num_embeddings=10, features=8, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.embed.attend(x)

    class Attention(nnx.Module):
        def __init__(self):
            self.attention = MultiHeadYatAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.attention(x, deterministic=True)

    report, fused, jax_out, unfused_out, fused_out = _jax_case(Attend(), ("B", 5, 8))
    assert report.fused["yat_dense"] == 1 and len(yat_gemm_nodes(fused)) == 1
    np.testing.assert_allclose(fused_out, unfused_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-6)

    report, fused, jax_out, unfused_out, fused_out = _jax_case(Attention(), ("B", 5, 8))
    assert report.fused["yat_attention"] == 1 and report.fused["yat_scale"] == 1 and report.left == []
    (node,) = yat_gemm_nodes(fused)
    alpha = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "alpha")
    assert alpha == pytest.approx(1 / np.sqrt(4), rel=1e-6)  # head_dim 4: nmn's 1/√d, times alpha 1
    np.testing.assert_allclose(fused_out, unfused_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-5)


NNX_YATCONV = {"2d": ((1, 1), ("B", 5, 5, 3), {}), "2d_no_bias": ((1, 1), ("B", 5, 5, 3), {"use_bias": False}),
               "2d_constant_alpha": ((1, 1), ("B", 4, 6, 3), {"constant_alpha": True}),
               "1d": ((1,), ("B", 7, 3), {})}  # 3-D: jax2onnx 0.17 has no 5-D conv layout


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NNX_YATCONV))
def test_a_pointwise_nnx_yatconv_fuses_into_one_yat_gemm_over_channels_and_matches_jax(case):
    from flax import nnx
    from nmn.nnx import YatConv

    kernel, shape, options = NNX_YATCONV[case]
    report, fused, jax_out, unfused_out, fused_out = _jax_case(
        YatConv(3, 4, kernel_size=kernel, rngs=nnx.Rngs(0), **options), shape)
    assert report.fused["yat_conv"] == 1 and report.total == 1 and report.left == [] and report.check.passed
    assert [n.op_type for n in fused.graph.node] == ["YatGemm"]  # the Transposes, both Convs, the alpha: gone
    np.testing.assert_allclose(fused_out, unfused_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("options, reason", [
    ({"kernel_size": (3, 3)}, "kernel 3×3: a Yat product over 3×3×3 patches"),
    ({"kernel_size": (1, 1), "strides": (2, 2)}, "strides [2, 2]"),
])
def test_a_yatconv_over_patches_stays_decomposed_and_the_report_says_why(options, reason):
    from flax import nnx
    from nmn.nnx import YatConv

    report, fused, jax_out, unfused_out, fused_out = _jax_case(YatConv(3, 4, rngs=nnx.Rngs(0), **options),
                                                               ("B", 5, 5, 3))
    assert report.total == 0 and len(yat_gemm_nodes(fused)) == 0
    (left,) = report.left
    assert left.pattern == "yat_conv" and reason in left.reason
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_rotary_yat_attention_scores_after_the_rotary_embedding_fuse_and_match_jax():
    from flax import nnx
    from nmn.nnx import RotaryYatAttention

    class Attention(nnx.Module):
        def __init__(self):
            self.attention = RotaryYatAttention(8, 2, max_seq_len=16, use_bias=True, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.attention(x, deterministic=True)

    report, fused, jax_out, unfused_out, fused_out = _jax_case(Attention(), ("B", 5, 8))
    assert report.fused["yat_attention"] == 1 and report.fused["yat_scale"] == 1 and report.left == []
    (node,) = yat_gemm_nodes(fused)
    alpha = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "alpha")
    assert alpha == pytest.approx(1 / np.sqrt(4), rel=1e-6)
    np.testing.assert_allclose(fused_out, unfused_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_out, jax_out, rtol=1e-5, atol=1e-5)


def _conv_graph(kernel: int, floor_input: bool = False) -> onnx.ModelProto:
    """A YatConv2D as jax2onnx writes it (NHWC x, each Conv between Transposes, |x|² over the patches a Conv of x²
    with a ones kernel, the bias added to the product, alpha a Mul after the division). `floor_input`: the distance
    clamped at a graph input instead of the constant 0."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, 3, kernel, kernel)).astype(np.float32)  # OIHW
    pads = [kernel // 2] * 4
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.ones((1, 3, kernel, kernel), np.float32), "ones"),
             numpy_helper.from_array((w**2).sum((1, 2, 3)).reshape(1, 1, 1, N), "w_sq"),
             numpy_helper.from_array((0.1 * rng.standard_normal(N)).astype(np.float32).reshape(1, 1, 1, N), "bias"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.full((1, 1, 1, 1), 1.25, np.float32), "alpha")]
    to_first, to_last = [0, 3, 1, 2], [0, 2, 3, 1]
    nodes = [helper.make_node("Transpose", ["x"], ["x_cf"], perm=to_first),
             helper.make_node("Conv", ["x_cf", "w"], ["conv"], pads=pads),
             helper.make_node("Transpose", ["conv"], ["dot"], perm=to_last),
             helper.make_node("Pow", ["x", "two"], ["x2"]),
             helper.make_node("Transpose", ["x2"], ["x2_cf"], perm=to_first),
             helper.make_node("Conv", ["x2_cf", "ones"], ["patch"], pads=pads),
             helper.make_node("Transpose", ["patch"], ["x_sq"], perm=to_last),
             helper.make_node("Add", ["dot", "bias"], ["z"]),
             helper.make_node("Add", ["x_sq", "w_sq"], ["norms"]),
             helper.make_node("Mul", ["two", "dot"], ["twice"]),
             helper.make_node("Sub", ["norms", "twice"], ["dist"]),
             helper.make_node("Max", ["dist", "floor" if floor_input else "zero"], ["clamped"]),
             helper.make_node("Pow", ["z", "two"], ["square"]),
             helper.make_node("Add", ["clamped", "eps"], ["shifted"]),
             helper.make_node("Div", ["square", "shifted"], ["ratio"]),
             helper.make_node("Mul", ["ratio", "alpha"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5, 5, 3])]
    if floor_input:
        inputs.append(helper.make_tensor_value_info("floor", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "yat_conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_a_pointwise_yat_conv_fuses_into_one_yat_gemm_over_channels_and_a_3x3_one_stays_with_its_reason():
    x = np.random.default_rng(1).standard_normal((2, 5, 5, 3)).astype(np.float32)
    model = _conv_graph(1)
    fused, report = fuse_model(model)
    assert [n.op_type for n in fused.graph.node] == ["YatGemm"] and report.fused["yat_conv"] == 1
    assert report.check.passed and report.left == []
    np.testing.assert_allclose(_run(fused, {"x": x})[0], _run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)

    fused, report = fuse_model(_conv_graph(3))
    assert report.total == 0 and len(yat_gemm_nodes(fused)) == 0
    (left,) = report.left
    assert left.pattern == "yat_conv" and "kernel 3×3" in left.reason and "im2col" in left.reason


def test_a_distance_clamped_at_a_non_constant_floor_is_left_saying_so():
    fused, report = fuse_model(_conv_graph(1, floor_input=True))
    assert report.total == 0 and len(yat_gemm_nodes(fused)) == 0
    (left,) = report.left
    assert left.pattern == "yat_conv" and left.reason == "the distance is clamped at a non-constant floor"
