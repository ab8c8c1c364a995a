"""Yat language models: YatEmbed lookups, causal MultiHeadYatAttention, the tied head YatEmbed.attend as one
YatGemm node, int64 token ids at any batch and length; layers called twice or never."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import yatdeploy
from tests.model_zoo import build_reused_and_unused, build_tiny_lm
from yatdeploy import native
from yatdeploy.cli import EXIT_OK, main
from yatdeploy.demo_lm import CharYatLM
from yatdeploy.errors import YatDeployError
from yatdeploy.graph import yat_gemm_nodes
from yatdeploy.rewrite import YatEmbedLayer, rewrite_yat_layers, yat_calls


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    torch.save(build_tiny_lm().state_dict(), folder / "lm.pt")
    return folder


def test_the_tied_head_is_one_yat_gemm_with_the_embedding_table():
    model = build_tiny_lm()
    rewritten = rewrite_yat_layers(model)
    assert isinstance(rewritten.module.embed, YatEmbedLayer)
    assert [layer.path for layer in rewritten.yat_layers] == ["embed", "mlp"]
    assert rewritten.yat_layers[0].options["head"] == "attend"
    ids = torch.randint(0, 40, (3, 11))
    with torch.inference_mode():
        want, got = model(ids), rewritten.module(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert yat_calls(model, lambda: model(ids)) == {"embed": 1, "mlp": 1}  # the YatNMN block and attend


def test_a_yat_lm_exports_with_dynamic_batch_and_length_and_validates(lm_export, capsys):
    onnx_path = lm_export / "lm.onnx"
    status = main(["export", "-q", str(lm_export / "lm.pt"), "--arch", "tests.model_zoo:build_tiny_lm",
                   "-o", str(onnx_path), "--input", "ids:int64[batch=1,seq=16]"])
    out = capsys.readouterr().out
    assert status == EXIT_OK, out
    assert "2 YatGemm node(s) for 2 Yat layer call(s)" in out and "PASSED" in out
    assert "random seq 1, batch 2" in out and "random seq 8, batch 2" in out
    assert "'ids' drawn from [0, 40): the model's smallest embedding table" in out
    model = onnx.load(str(onnx_path))
    heads = [n for n in yat_gemm_nodes(model) if any(i.startswith("embed") for i in n.input[1:2])] or \
        yat_gemm_nodes(model)
    assert len(yat_gemm_nodes(model)) == 2 and heads
    # Plain onnxruntime (the ONNX function), and the library's kernels, at lengths the export never saw.
    module = build_tiny_lm()
    for length in (1, 5, 37):
        ids = np.random.default_rng(length).integers(0, 40, (2, length))
        with torch.inference_mode():
            want = module(torch.from_numpy(ids)).numpy()
        plain = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
        np.testing.assert_allclose(plain, want, rtol=1e-4, atol=1e-5)
        if native.ort_library_path() is not None:
            options = ort.SessionOptions()
            options.register_custom_ops_library(str(native.ort_library_path()))
            fused = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            np.testing.assert_allclose(fused.run(None, {"ids": ids})[0], want, rtol=1e-4, atol=1e-5)


def test_greedy_decoding_agrees_between_pytorch_and_onnx_runtime(lm_export):
    onnx_path = lm_export / "lm.onnx"
    if not onnx_path.exists():
        pytest.skip("needs the export of test_a_yat_lm_exports_with_dynamic_batch_and_length_and_validates")
    module = build_tiny_lm()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    torch_ids = onnx_ids = [3, 1, 4]
    for _ in range(20):
        with torch.inference_mode():
            torch_ids = torch_ids + [int(module(torch.tensor([torch_ids]))[0, -1].argmax())]
        onnx_ids = onnx_ids + [int(session.run(None, {"ids": np.array([onnx_ids])})[0][0, -1].argmax())]
    assert torch_ids == onnx_ids


def test_a_float16_lm_exports_and_validates(tmp_path):
    result = yatdeploy.export(build_tiny_lm(), torch.zeros(1, 8, dtype=torch.long), tmp_path / "lm.onnx",
                              dynamic_axes={0: "batch", 1: "seq"}, dtype="float16")
    assert result.yat_gemm_nodes == 2
    assert result.report.passed, result.report.failures()


def test_a_bfloat16_lm_is_refused_naming_the_op_onnx_lacks(tmp_path):
    """The attention's Einsum has no bfloat16 in ONNX opset 20: a clear error, not an internal one."""
    with pytest.raises(YatDeployError, match=r"bfloat16 graph is not valid ONNX: .*Einsum.*bfloat16.*export in "
                                             r"another dtype"):
        yatdeploy.export(build_tiny_lm(), torch.zeros(1, 8, dtype=torch.long), tmp_path / "lm.onnx",
                         dynamic_axes={0: "batch", 1: "seq"}, dtype="bfloat16")
    assert not (tmp_path / "lm.onnx").exists()


def test_a_layer_called_twice_has_two_nodes_and_one_never_called_has_none(tmp_path):
    result = yatdeploy.export(build_reused_and_unused(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert (result.yat_gemm_nodes, result.yat_layers) == (2, 2)
    assert any("Yat layer(s) spare did not run on the example input" in note for note in result.notes)
    assert result.report.passed, result.report.failures()
    assert "2 YatGemm nodes for 2 Yat layer calls" in result.report.checks[0].detail


def test_an_lm_without_a_tied_head_keeps_its_lookup_only(tmp_path):
    """YatEmbed used only as a lookup: no YatGemm for it, and the lookup is exact."""

    class LookupOnly(CharYatLM):
        def forward(self, ids):
            return self.mlp(self.embed(ids))

    torch.manual_seed(0)
    result = yatdeploy.export(LookupOnly(40).eval(), torch.zeros(2, 4, dtype=torch.long), tmp_path / "m.onnx",
                              dynamic_axes={0: "batch", 1: "seq"})
    assert result.yat_gemm_nodes == 1 and result.report.passed


def test_an_example_of_length_one_still_exports_dynamic_dims(tmp_path):
    """torch.export specialises dims of size 1; yatdeploy traces at 2 there and records the user's sizes."""
    result = yatdeploy.export(build_tiny_lm(), torch.zeros(1, 1, dtype=torch.long), tmp_path / "lm.onnx",
                              dynamic_axes={0: "batch", 1: "seq"})
    assert [str(s) for s in result.inputs] == ["input:int64[batch=1,seq=1]"]
    dims = [d.dim_param for d in onnx.load(str(tmp_path / "lm.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"] and result.report.passed
