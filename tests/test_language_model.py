"""Yat language models: YatEmbed lookups, causal MultiHeadYatAttention, the tied head YatEmbed.attend as one
YatGemm node, int64 token ids at any batch and length; layers called twice or never."""

from __future__ import annotations

import shutil

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
from yatdeploy.errors import InputSpecError, YatDeployError
from yatdeploy.exporting.rewrite import YatEmbedLayer, rewrite_yat_layers
from yatdeploy.graph import yat_gemm_nodes
from yatdeploy.inputs import model_specs
from yatdeploy.reference import yat_calls


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


@pytest.mark.slow
def test_a_yat_lm_exports_with_dynamic_batch_and_length_and_validates(lm_export, capsys):
    onnx_path = lm_export / "lm.onnx"
    status = main(["export", "-q", str(lm_export / "lm.pt"), "--arch", "tests.model_zoo:build_tiny_lm",
                   "-o", str(onnx_path), "--input", "ids:int64[batch=1,seq=16]"])
    out = capsys.readouterr().out
    assert status == EXIT_OK, out
    assert "2 YatGemm node(s) (1 YatNMN, 1 attend head)" in out and "PASSED" in out
    assert "random seq 1, batch 2" in out and "random seq 8, batch 2" in out
    assert "'ids' drawn from [0, 40): the model's smallest embedding table" in out
    assert "random seq 64, batch 1" in out  # the longest sequence the position table takes, found and validated
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


def _lm_onnx(folder) -> str:
    """The tiny LM's export: the CLI test's, or made here when that test did not run."""
    path = folder / "lm.onnx"
    if not path.exists():
        yatdeploy.export(build_tiny_lm(), ["ids:int64[batch=1,seq=16]"], path, validate=False)
    return path


@pytest.fixture(scope="module")
def lm_repository(lm_export):
    from yatdeploy.packaging import write_repository

    write_repository(lm_export / "repo", "lm", _lm_onnx(lm_export), op_library=None)
    # The same model with its config.pbtxt narrowed by hand: the server takes the config's limits.
    write_repository(lm_export / "repo", "lm_narrow", _lm_onnx(lm_export), op_library=None)
    config = lm_export / "repo" / "lm_narrow" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "0:40"', 'string_value: "0:20"')
                      .replace('string_value: "64"', 'string_value: "32"'))
    return lm_export / "repo"


@pytest.mark.slow
def test_the_export_records_the_vocabulary_and_the_positions_in_the_metadata_and_the_config(lm_repository):
    """The ids index a 40-row table; the positions, arange(seq) into a 64-row one: seq is at most 64."""
    from yatdeploy.serving.repository import parse_config

    [spec] = model_specs(onnx.load(str(lm_repository / "lm" / "1" / "model.onnx")))
    assert spec.values == (0, 40) and [d.max for d in spec.dims] == [None, 64]
    parameters = parse_config(lm_repository / "lm" / "config.pbtxt").parameters
    assert parameters["yatdeploy.input.ids.range"].string_value == "0:40"
    assert parameters["yatdeploy.input.ids.max_dims"].string_value == "64"  # as the config's dims: [-1]


@pytest.fixture(scope="module")
def lm_server(lm_repository):
    from tests.servers import Server

    running = Server(lm_repository)
    yield running
    running.stop()


def _ask(client, module, model: str, ids: np.ndarray):
    tensor = module.InferInput("ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    return client.infer(model, [tensor]).as_numpy("output")


def _refused(client, module, model: str, ids: np.ndarray) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        _ask(client, module, model, ids)
    return str(info.value.status()), info.value.message()


def _with(length: int, at: tuple[int, int] | None = None, value: int = 0) -> np.ndarray:
    ids = np.random.default_rng(length).integers(0, 20, (2, length))
    if at is not None:
        ids[at] = value
    return ids


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_served_lm_refuses_ids_outside_its_vocabulary_and_sequences_past_its_positions(lm_server, transport):
    """400 / INVALID_ARGUMENT naming the input and the limit, not ONNX Runtime's Gather or broadcast error."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if transport == "http" else grpcclient
    client = module.InferenceServerClient(lm_server.url if transport == "http" else lm_server.grpc_url)
    invalid = "400" if transport == "http" else "StatusCode.INVALID_ARGUMENT"
    assert _ask(client, module, "lm", _with(64, (1, 63), 39)).shape == (2, 64, 40)
    assert _refused(client, module, "lm", _with(8, (1, 3), 600)) == \
        (invalid, "input 'ids': value 600 at [1, 3] is outside [0, 40) (the embedding's vocabulary)")
    assert _refused(client, module, "lm", _with(8, (0, 5), -1)) == \
        (invalid, "input 'ids': value -1 at [0, 5] is outside [0, 40) (the embedding's vocabulary)")
    assert _refused(client, module, "lm", _with(65)) == \
        (invalid, "input 'ids': dim 1 is 65, longer than the model's maximum of 64")
    # A config.pbtxt's parameters are the limits served.
    assert _ask(client, module, "lm_narrow", _with(32, (0, 0), 19)).shape == (2, 32, 40)
    assert _refused(client, module, "lm_narrow", _with(8, (0, 1), 20))[1] == \
        "input 'ids': value 20 at [0, 1] is outside [0, 20) (the embedding's vocabulary)"
    assert _refused(client, module, "lm_narrow", _with(33))[1] == \
        "input 'ids': dim 1 is 33, longer than the model's maximum of 32"


@pytest.mark.slow
def test_a_served_onnx_file_takes_its_limits_from_the_export_record(lm_export):
    """No config.pbtxt: the model's metadata says the limits."""
    from yatdeploy import backends
    from yatdeploy.serving.model import ServedModel
    from yatdeploy.serving.protocol import InferRequest, InvalidInput
    from yatdeploy.serving.repository import discover

    [source] = discover(_lm_onnx(lm_export))
    model = ServedModel(source, backends.get("ort-function"))
    request = InferRequest(None, {"ids": _with(70)}, {"ids": "INT64"})
    with pytest.raises(InvalidInput) as info:
        model.check(request)
    assert info.value.message == "input 'ids': dim 1 is 70, longer than the model's maximum of 64"
    assert model.config()["parameters"] == {"yatdeploy.input.ids.range": {"string_value": "0:40"},
                                            "yatdeploy.input.ids.max_dims": {"string_value": "64"}}


@pytest.mark.slow
@pytest.mark.parametrize("key,value,message", [
    ("yatdeploy.input.ids.range", "40:0", r"parameters\[yatdeploy.input.ids.range\] '40:0': expected LO:HI"),
    ("yatdeploy.input.ids.max_dims", "64,8", r"max_dims: 2 sizes for the 1 dims of input 'ids'"),
    ("yatdeploy.input.tokens.range", "0:8", r"the model has no input 'tokens' \(inputs: ids\)"),
    ("yatdeploy.input.ids.limit", "8", r"parameters\[yatdeploy.input.ids.limit\] is not a limit"),
])
def test_a_bad_limit_parameter_makes_the_model_unavailable_naming_it(lm_repository, tmp_path, key, value, message):
    from yatdeploy import backends
    from yatdeploy.serving.model import ServedModel
    from yatdeploy.serving.repository import discover

    repo = tmp_path / "repo"
    shutil.copytree(lm_repository / "lm", repo / "lm")
    config = repo / "lm" / "config.pbtxt"
    config.write_text(config.read_text() + f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n')
    [source] = discover(repo)
    with pytest.raises(YatDeployError, match=message):
        if source.error is not None:
            raise YatDeployError(source.error)
        ServedModel(source, backends.get("ort-function"))


@pytest.mark.slow
def test_a_declared_maximum_is_recorded_and_validated_and_one_past_the_positions_is_refused(tmp_path):
    from yatdeploy import backends
    from yatdeploy.serving.model import ServedModel
    from yatdeploy.serving.repository import discover

    result = yatdeploy.export(build_tiny_lm(), ["ids:int64[batch=1:8,seq=8:32]"], tmp_path / "lm.onnx")
    cases = {c.case for b in result.report.backends for c in b.comparisons}
    assert result.report.passed and {"random seq 32, batch 1", "random batch 8"} <= cases
    assert "random batch 32" not in cases
    assert [d.max for d in model_specs(onnx.load(str(tmp_path / "lm.onnx")))[0].dims] == [8, 32]
    # Served, the batch's maximum caps merged batches too.
    assert ServedModel(discover(tmp_path / "lm.onnx")[0], backends.get("ort-function")).max_batch_size == 8
    with pytest.raises(InputSpecError, match=r"input 'ids': dim seq is declared up to 100, but the model's position "
                                             r"table 'position.weight' has 64 rows"):
        yatdeploy.export(build_tiny_lm(), ["ids:int64[batch=1,seq=8:100]"], tmp_path / "long.onnx", validate=False)
    assert not (tmp_path / "long.onnx").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_float16_lm_exports_and_validates(tmp_path):
    result = yatdeploy.export(build_tiny_lm(), torch.zeros(1, 8, dtype=torch.long), tmp_path / "lm.onnx",
                              dynamic_axes={0: "batch", 1: "seq"}, dtype="float16")
    assert result.yat_gemm_nodes == 2
    assert result.report.passed, result.report.failures()


@pytest.mark.slow
def test_a_bfloat16_lm_is_refused_naming_the_op_onnx_lacks(tmp_path):
    """The attention's Einsum has no bfloat16 in ONNX opset 20: a clear error, not an internal one."""
    with pytest.raises(YatDeployError, match=r"bfloat16 graph is not valid ONNX: .*Einsum.*bfloat16.*export in "
                                             r"another dtype"):
        yatdeploy.export(build_tiny_lm(), torch.zeros(1, 8, dtype=torch.long), tmp_path / "lm.onnx",
                         dynamic_axes={0: "batch", 1: "seq"}, dtype="bfloat16")
    assert not (tmp_path / "lm.onnx").exists()


@pytest.mark.slow
def test_a_layer_called_twice_has_two_nodes_and_one_never_called_has_none(tmp_path):
    result = yatdeploy.export(build_reused_and_unused(), torch.randn(2, 8), tmp_path / "m.onnx")
    assert (result.yat_gemm_nodes, result.yat_layers) == (2, 2)
    assert any("Yat layer(s) spare did not run on the example input" in note for note in result.notes)
    assert result.report.passed, result.report.failures()
    assert "2 YatGemm nodes for 2 Yat layer calls" in result.report.checks[0].detail


@pytest.mark.slow
def test_an_lm_without_a_tied_head_keeps_its_lookup_only(tmp_path):
    """YatEmbed used only as a lookup: no YatGemm for it, and the lookup is exact."""

    class LookupOnly(CharYatLM):
        def forward(self, ids):
            return self.mlp(self.embed(ids))

    torch.manual_seed(0)
    result = yatdeploy.export(LookupOnly(40).eval(), torch.zeros(2, 4, dtype=torch.long), tmp_path / "m.onnx",
                              dynamic_axes={0: "batch", 1: "seq"})
    assert result.yat_gemm_nodes == 1 and result.report.passed


@pytest.mark.slow
def test_an_example_of_length_one_still_exports_dynamic_dims(tmp_path):
    """torch.export specialises dims of size 1; yatdeploy traces at 2 there and records the user's sizes."""
    result = yatdeploy.export(build_tiny_lm(), torch.zeros(1, 1, dtype=torch.long), tmp_path / "lm.onnx",
                              dynamic_axes={0: "batch", 1: "seq"})
    assert [str(s) for s in result.inputs] == ["input:int64[batch=1,seq=1:64]"]  # 64: the positions' table
    dims = [d.dim_param for d in onnx.load(str(tmp_path / "lm.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"] and result.report.passed
