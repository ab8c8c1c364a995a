"""`yatdeploy build-engine` and the tensorrt backend: what is checked before TensorRT is needed (the
graph handed to the parser, the batch profile, the engine signature, the Triton repository entry, the
errors when TensorRT or a GPU is missing), and, where TensorRT and a GPU exist, the engine itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.model_zoo import yat_mlp
from yatdeploy import backends
from yatdeploy.backends import ort
from yatdeploy.cli import EXIT_OK, EXIT_USAGE, EXIT_VALIDATION_FAILED, main
from yatdeploy.errors import OnnxModelError, YatDeployError
from yatdeploy.exporting import ExportOptions, export_model
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.graph import yat_gemm_nodes
from yatdeploy.loading import load_model
from yatdeploy.packaging import write_engine_repository
from yatdeploy.serving.repository import discover, parse_config
from yatdeploy.spec import MATH_ATTRIBUTES, PLUGIN_NAMESPACE, PLUGIN_VERSION, YAT_DOMAIN, YAT_GEMM
from yatdeploy.trt.engine import (
    BatchProfile,
    EngineSignature,
    TensorSignature,
    availability,
    check_plugin_layers,
    prepare_model,
    profile_shapes,
)

TENSORRT_MISSING = availability()


@pytest.fixture
def exported(exported_mlp, tmp_path) -> tuple[Path, Path]:
    """The session's exported yat_mlp: its .pt and a copy of its ONNX file."""
    return exported_mlp.source, exported_mlp.onnx_copy(tmp_path)


@pytest.mark.slow
def test_an_export_goes_to_the_parser_unchanged(exported):
    _, onnx_path = exported
    model = onnx.load(str(onnx_path))
    prepared = prepare_model(model)
    assert prepared.notes == []
    assert prepared.yat_gemm_nodes == 2
    assert prepared.input.shape == [-1, 16] and prepared.input.dtype == "float32"
    assert prepared.model.graph == model.graph
    for node in yat_gemm_nodes(prepared.model):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # What the parser reads to pick the plugin, and the fields the plugin's creator declares.
        assert attrs["plugin_namespace"].decode() == PLUGIN_NAMESPACE
        assert attrs["plugin_version"].decode() == PLUGIN_VERSION
        assert all(isinstance(attrs[name], float) for name in MATH_ATTRIBUTES)
        assert len(node.input) == 3 and node.input[2]


def _hand_written_model(with_b: bool = False, w_constant: bool = True, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w" if w_constant else "w0")
    inputs = ["x", "w"] + (["b"] if with_b else [])
    nodes = [helper.make_node("YatGemm", inputs, ["y"], domain=YAT_DOMAIN, name="yat0")]
    if not w_constant:  # W computed in the graph, not an initializer
        nodes.insert(0, helper.make_node("Identity", ["w0"], ["w"]))
    graph_inputs = [helper.make_tensor_value_info("x", dtype, ["batch", 4])]
    initializers = [w]
    if with_b:
        initializers.append(numpy_helper.from_array(np.zeros(3, np.float32), "b"))
    graph = helper.make_graph(nodes, "g", graph_inputs, [helper.make_tensor_value_info("y", dtype, ["batch", 3])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                    helper.make_opsetid(YAT_DOMAIN, YAT_GEMM.version)])
    return attach_yat_gemm_function(model)


def test_a_hand_written_node_gets_what_the_plugin_needs_and_computes_the_same():
    model = _hand_written_model()
    prepared = prepare_model(model)
    assert [n.split(": ")[1] for n in prepared.notes] == [
        "no eps attribute, the spec's default 1e-05 used", "no alpha attribute, the spec's default 1.0 used",
        "no bias input, zeros used"]
    (node,) = yat_gemm_nodes(prepared.model)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["eps"] == pytest.approx(YAT_GEMM.attribute("eps").default)
    assert attrs["alpha"] == 1.0 and attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
    onnx.checker.check_model(prepared.model, full_check=True)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    backend = backends.get("ort-cpu")
    if backend.availability():
        pytest.skip(backend.availability())
    before = ort.run(ort.create_session(model, backend), {"x": x})[0]
    after = ort.run(ort.create_session(prepared.model, backend), {"x": x})[0]
    np.testing.assert_array_equal(before, after)


def test_nodes_the_plugin_cannot_take_are_named():
    with pytest.raises(OnnxModelError, match="yat0.*weight is not a constant"):
        prepare_model(_hand_written_model(w_constant=False))
    with pytest.raises(OnnxModelError, match="yat0.* is float64.*float32, float16 or bfloat16"):
        prepare_model(_hand_written_model(with_b=True, dtype=TensorProto.DOUBLE))
    model = _hand_written_model(with_b=True)
    yat_gemm_nodes(model)[0].attribute.append(helper.make_attribute("plugin_namespace", "other"))
    with pytest.raises(OnnxModelError, match="plugin_namespace is 'other'"):
        prepare_model(model)
    model = _hand_written_model(with_b=True)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    with pytest.raises(OnnxModelError, match="every dimension after the batch must be fixed"):
        prepare_model(model)


@pytest.mark.slow
def test_batch_profiles(exported):
    prepared = prepare_model(onnx.load(str(exported[1])))
    assert profile_shapes(prepared, BatchProfile(1, 8, 64)) == ([1, 16], [8, 16], [64, 16])
    for bad in (BatchProfile(0, 1, 1), BatchProfile(2, 1, 4), BatchProfile(1, 9, 8)):
        with pytest.raises(YatDeployError, match="1 <= `min_batch` <= `opt_batch` <= `max_batch`"):
            bad.check()
    prepared.input.shape[0] = 4  # a --static-batch export
    with pytest.raises(YatDeployError, match="fixed at 4.*dynamic_batch=False.*`min_batch` 4 `opt_batch` 4 `max_batch` 4"):
        profile_shapes(prepared, BatchProfile(1, 8, 64))
    assert profile_shapes(prepared, BatchProfile(4, 4, 4))[0] == [4, 16]
    assert BatchProfile.covering([1, 7, 32, 450]) == BatchProfile(1, 450, 450)


def test_an_inlined_function_does_not_pass_for_the_plugin():
    assert check_plugin_layers(["CONSTANT", "PLUGIN_V3", "NORMALIZATION", "PLUGIN_V3"], 2) == 2
    with pytest.raises(YatDeployError, match="1 of 2 YatGemm nodes.*TensorRT >= 10.15"):
        check_plugin_layers(["PLUGIN_V3", "MATRIX_MULTIPLY", "ELEMENTWISE", "REDUCE", "ELEMENTWISE"], 2)


def _signature(batch: int = -1) -> EngineSignature:
    return EngineSignature(
        inputs=[TensorSignature("input", "float16", [batch, 16])], outputs=[TensorSignature("output", "float16",
                                                                                             [batch, 5])],
        profile=BatchProfile(1, 8, 64), yat_gemm_nodes=2, plugin_layers=2, onnx_sha256="0" * 64,
        tensorrt="11.4.0", gpu="NVIDIA H100 80GB HBM3",
    )


def test_engine_signature_round_trip_and_errors(tmp_path):
    plan = tmp_path / "m.plan"
    _signature().write(plan)
    assert EngineSignature.read(plan) == _signature()
    with pytest.raises(YatDeployError, match="missing; yatdeploy writes it beside every engine"):
        EngineSignature.read(tmp_path / "other.plan")
    (tmp_path / "bad.plan.json").write_text("{}")
    with pytest.raises(YatDeployError, match="not a yatdeploy engine signature"):
        EngineSignature.read(tmp_path / "bad.plan")


def test_repository_entry_for_an_engine_is_a_triton_tensorrt_plan(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine bytes")  # the writer only copies the engine; its config comes from the signature
    _signature().write(plan)
    folder = write_engine_repository(tmp_path / "repo", "yat_trt", plan)
    assert (folder / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert json.loads((folder / "1" / "model.plan.json").read_text())["plugin_layers"] == 2
    config = parse_config(folder / "config.pbtxt")  # Triton's own ModelConfig schema
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 64
    assert [(t.name, list(t.dims)) for t in config.input] == [("input", [16])]
    assert config.output[0].data_type == 10  # TYPE_FP16 in model_config.proto
    assert config.parameters["yatdeploy_backend"].string_value == "tensorrt"
    (source,) = discover(tmp_path / "repo")
    assert source.backend == "tensorrt" and source.path.name == "model.plan" and source.max_batch_size == 64
    from yatdeploy.progress import QUIET
    from yatdeploy.serving.server import load_models

    with pytest.raises(YatDeployError, match="is a TensorRT engine; it runs on the tensorrt or tensorrt-rtx backend, not ort-cpu"):
        load_models(tmp_path / "repo", "ort-cpu", 1, QUIET)


def test_an_engine_no_backend_here_built_makes_its_model_unavailable_not_the_repository(tmp_path):
    for name, runtime in (("good", "tensorrt"), ("odd", "tensorrt-nova")):
        plan = tmp_path / "repo" / name / "1" / "model.plan"
        plan.parent.mkdir(parents=True)
        plan.write_bytes(b"engine bytes")
        signature = _signature()
        signature.runtime = runtime
        signature.write(plan)
    sources = {source.name: source for source in discover(tmp_path / "repo")}
    assert (sources["good"].backend, sources["good"].error) == ("tensorrt", None)
    assert sources["odd"].error == ("model 'odd': model.plan: a TensorRT engine that none of the tensorrt or "
                                    "tensorrt-rtx backends built")
    with pytest.raises(YatDeployError, match="a TensorRT engine that none of the tensorrt or tensorrt-rtx"):
        write_engine_repository(tmp_path / "other", "odd", tmp_path / "repo" / "odd" / "1" / "model.plan")


# --- the command line where TensorRT is missing --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are here: the error paths don't apply")
def test_build_engine_says_what_is_missing(exported, capsys):
    _, onnx_path = exported
    status = main(["build-engine", "-q", str(onnx_path), "--max-batch", "16"])
    err = capsys.readouterr().err
    assert status == EXIT_USAGE
    assert err.startswith("yatdeploy build-engine: error: ") and "Traceback" not in err
    assert TENSORRT_MISSING.split(" (")[0] in err or "GPU" in err
    assert not onnx_path.with_suffix(".plan").exists()


def test_build_engine_checks_its_input_before_looking_for_tensorrt(exported, tmp_path, capsys):
    _, onnx_path = exported
    assert main(["build-engine", "-q", str(onnx_path), "--min-batch", "8", "--opt-batch", "4"]) == EXIT_USAGE
    assert "need 1 <= --min-batch <= --opt-batch <= --max-batch" in capsys.readouterr().err
    assert main(["build-engine", "-q", str(tmp_path / "nope.onnx")]) == EXIT_USAGE
    assert "nope.onnx: no such file" in capsys.readouterr().err
    assert main(["build-engine", "-q", str(onnx_path), "-o", str(onnx_path)]) == EXIT_USAGE
    assert "would overwrite the ONNX model" in capsys.readouterr().err
    assert main(["build-engine", "-q", str(onnx_path), "--repository", str(tmp_path), "--name", "a/b"]) == EXIT_USAGE
    assert "model name 'a/b'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are here: the error paths don't apply")
def test_validate_reports_the_tensorrt_backend_as_skipped_with_the_reason(exported, capsys):
    source, onnx_path = exported
    status = main(["validate", str(onnx_path), "--against", str(source), "--batches", "1",
                   "--backend", "ort-function", "--backend", "tensorrt"])
    out = capsys.readouterr().out
    assert status == EXIT_OK  # ort-function ran and passed; tensorrt is reported, not failed
    assert f"tensorrt: skipped ({TENSORRT_MISSING})" in out
    status = main(["validate", str(onnx_path), "--against", str(source), "--batches", "1", "--backend", "tensorrt"])
    assert status == EXIT_VALIDATION_FAILED
    assert "no backend could run the model" in capsys.readouterr().out


@pytest.mark.skipif(TENSORRT_MISSING is None, reason="TensorRT and a GPU are here: the error paths don't apply")
def test_demo_with_tensorrt_stops_before_training(tmp_path, capsys):
    assert main(["demo", "-q", "--tensorrt", "--out", str(tmp_path / "d")]) == EXIT_USAGE
    assert "--tensorrt: " in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_validate_engine_flag_needs_the_tensorrt_backend(exported, tmp_path, capsys):
    source, onnx_path = exported
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    args = ["validate", str(onnx_path), "--against", str(source), "--backend", "ort-function", "--engine", str(plan)]
    assert main(args) == EXIT_USAGE
    assert "--engine is for the tensorrt or tensorrt-rtx backend" in capsys.readouterr().err


# --- with TensorRT and a GPU ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(TENSORRT_MISSING is not None, reason=f"needs TensorRT and a GPU: {TENSORRT_MISSING}")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_engine_runs_the_plugin_and_matches_pytorch(save_whole, tmp_path, progress, dtype):
    source = save_whole(yat_mlp())
    onnx_path = tmp_path / "m.onnx"
    export_model(load_model(source), onnx_path, ExportOptions((1, 16), dtype=dtype), progress)
    plan = tmp_path / "m.plan"
    assert main(["build-engine", "-q", str(onnx_path), "-o", str(plan), "--min-batch", "1", "--opt-batch", "4",
                 "--max-batch", "32", "--repository", str(tmp_path / "repo")]) == EXIT_OK
    signature = EngineSignature.read(plan)
    assert signature.plugin_layers == signature.yat_gemm_nodes == 2
    assert (tmp_path / "m.plan.timing-cache").stat().st_size > 0
    assert main(["validate", "-q", str(onnx_path), "--against", str(source), "--backend", "tensorrt",
                 "--engine", str(plan), "--batches", "1,7,32"]) == EXIT_OK
    session = backends.get("tensorrt").open(onnx_path, backends.Options(engine=plan))
    with pytest.raises(OnnxModelError, match="outside the engine's profile 1..32"):
        session.run({"input": np.zeros((33, 16), dtype=np.float32)})
    assert torch.cuda.is_available()
