"""Models of several inputs, integer and bool inputs, dynamic dims other than the batch, dict outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import yatdeploy
from tests.model_zoo import build_token_tagger, build_two_inputs, yat_mlp
from yatdeploy.cli import EXIT_OK, EXIT_USAGE, main
from yatdeploy.errors import InputSpecError, OnnxModelError
from yatdeploy.graph import META_INPUTS, metadata
from yatdeploy.inputs import (
    Dim,
    InputLimits,
    InputSpec,
    check_specs,
    file_metadata,
    parse_input,
    parse_int_ranges,
    recorded_limits,
)


@pytest.mark.parametrize("text,spec", [
    ("ids:int64[batch=1,seq=32]", InputSpec("ids", "int64", (Dim(1, "batch"), Dim(32, "seq")))),
    ("x:float16[4,3]", InputSpec("x", "float16", (Dim(4), Dim(3)))),
    (" mask : bool [ batch=2 , 7 ] ", InputSpec("mask", "bool", (Dim(2, "batch"), Dim(7)))),
    ("scalar:float32[]", InputSpec("scalar", "float32", ())),
    ("ids:int64[batch=1,seq=16:1024]", InputSpec("ids", "int64", (Dim(1, "batch"), Dim(16, "seq", 1024)))),
])
def test_input_specs_parse(text, spec):
    assert parse_input(text) == spec
    assert parse_input(str(spec)) == spec


@pytest.mark.parametrize("text,message", [
    ("ids:int64", "expected NAME:DTYPE"),
    ("ids:int16[1]", "dtype 'int16' is not one of"),
    ("ids:int64[batch=0]", "expected a size >= 1"),
    ("ids:int64[1 2=3]", "a label is a name"),
    ("ids:int64[batch=x]", "expected a size"),
    ("ids:int64[batch=1,seq=16:8]", "its maximum 8 is below the example's size 16"),
    ("ids:int64[batch=1,16:32]", "only a dynamic dim has a maximum"),
    ("ids:int64[batch=1,seq=16:x]", "expected a size"),
])
def test_a_bad_input_spec_says_what_is_wrong(text, message):
    with pytest.raises(InputSpecError, match=message):
        parse_input(text)


def test_a_label_has_one_maximum_which_every_dim_of_it_gets():
    specs = check_specs([parse_input("ids:int64[batch=1,seq=4:64]"), parse_input("mask:bool[batch=1,seq=4]")])
    assert specs[1].dims[1] == Dim(4, "seq", 64)
    with pytest.raises(InputSpecError, match="dim seq has the maximum 64 in ids and 32 in mask"):
        check_specs([parse_input("ids:int64[batch=1,seq=4:64]"), parse_input("mask:bool[batch=1,seq=4:32]")])
    # The record keeps the maximum and the valid values; a record of an older export (no maximum) still reads.
    spec = InputSpec("ids", "int64", (Dim(1, "batch"), Dim(4, "seq", 64)), values=(0, 40))
    assert InputSpec.from_json(json.loads(json.dumps(spec.as_json()))) == spec
    assert InputSpec.from_json({"name": "ids", "dtype": "int64", "dims": [[1, "batch"], [4, "seq"]]}) == \
        InputSpec("ids", "int64", (Dim(1, "batch"), Dim(4, "seq")))


def test_the_limits_name_the_first_value_outside_and_the_dim_too_long():
    limits = InputSpec("ids", "int64", (Dim(1, "batch"), Dim(4, "seq", 8)), values=(0, 40)).limits
    assert limits.problem("ids", np.array([[1, 2, 39]])) is None
    assert limits.problem("ids", np.array([[1, 2, 3, 45, 50]])) == \
        "input 'ids': value 45 at [0, 3] is outside [0, 40) (the embedding's vocabulary)"
    assert limits.problem("ids", np.array([[0], [-1]])) == \
        "input 'ids': value -1 at [1, 0] is outside [0, 40) (the embedding's vocabulary)"
    assert limits.problem("ids", np.zeros((2, 9), np.int64)) == \
        "input 'ids': dim 1 is 9, longer than the model's maximum of 8"
    assert limits.problem("ids", np.zeros((2, 0), np.int64)) is None


def test_the_metadata_of_a_file_is_read_without_its_graph(tmp_path):
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [256, 256], np.ones(65536, np.float32))
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])], [weights]))
    model.metadata_props.add(key=META_INPUTS, value='[{"name": "x", "dtype": "float32", "dims": [[1, "batch", 8]]}]')
    model.metadata_props.add(key="other", value="é")
    onnx.save(model, tmp_path / "m.onnx")
    assert file_metadata(tmp_path / "m.onnx") == metadata(model)
    assert recorded_limits(file_metadata(tmp_path / "m.onnx")) == {"x": InputLimits(None, (8,))}
    whole = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(OnnxModelError, match="cut.onnx: its metadata can't be read"):
        file_metadata(tmp_path / "cut.onnx")


def test_one_label_is_one_size_and_names_do_not_repeat(tmp_path, capsys):
    args = ["export", "-q", str(tmp_path / "m.pt"), "--input", "x:float32[batch=2,16]"]
    assert main([*args, "--input", "ids:int64[batch=3,5]"]) == EXIT_USAGE
    assert "dim batch is 2 in x and 3 in ids" in capsys.readouterr().err
    assert main([*args, "--input", "x:int64[batch=2,5]"]) == EXIT_USAGE
    assert "input names repeat" in capsys.readouterr().err
    assert parse_int_ranges(["ids=0:256"]) == {"ids": (0, 256)}
    with pytest.raises(InputSpecError, match="LO < HI"):
        parse_int_ranges(["ids=5:5"])


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    torch.save(build_two_inputs().state_dict(), folder / "two.pt")
    return folder


@pytest.mark.slow
def test_two_inputs_int_ids_and_dict_outputs_export_and_validate(two_inputs, capsys):
    onnx_path = two_inputs / "two.onnx"
    status = main(["export", "-q", str(two_inputs / "two.pt"), "--arch", "tests.model_zoo:build_two_inputs",
                   "-o", str(onnx_path), "--input", "x:float32[batch=2,16]", "--input", "ids:int64[batch=2,seq=5]"])
    out = capsys.readouterr().out
    assert status == EXIT_OK, out
    assert "outputs logits, features" in out and "PASSED" in out
    # seq varies as well as the batch, ids stay inside the embedding table
    assert "random seq 1, batch 2" in out and "random seq 2, batch 2" in out
    assert "'ids' drawn from [0, 50): the model's smallest embedding table" in out
    model = onnx.load(str(onnx_path))
    assert [i.name for i in model.graph.input] == ["x", "ids"]
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    ids_dims = [d.dim_param or d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim]
    assert ids_dims == ["batch", "seq"]
    # plain onnxruntime, at a batch and a length the export never saw, against PyTorch
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    ids = rng.integers(0, 50, (3, 11))
    got = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x, "ids": ids})
    with torch.inference_mode():
        want = build_two_inputs()(torch.from_numpy(x), torch.from_numpy(ids))
    np.testing.assert_allclose(got[0], want["logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], want["features"].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_validate_reads_the_inputs_back_and_takes_one_npz_per_case(two_inputs, tmp_path, capsys):
    onnx_path = two_inputs / "two.onnx"
    if not onnx_path.exists():
        test_two_inputs_int_ids_and_dict_outputs_export_and_validate(two_inputs, capsys)
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "case.npz", x=rng.standard_normal((4, 16)).astype(np.float32), ids=rng.integers(0, 50, (4, 9)))
    base = ["validate", "-q", str(onnx_path), "--against", str(two_inputs / "two.pt"), "--arch",
            "tests.model_zoo:build_two_inputs", "--backend", "ort-cpu"]
    assert main([*base, "--inputs", str(tmp_path / "case.npz")]) == EXIT_OK
    assert "case.npz" in capsys.readouterr().out
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 16), np.float32))
    assert main([*base, "--inputs", str(tmp_path / "wrong.npz")]) == EXIT_USAGE
    assert "wrong.npz: holds x; the model's inputs are x, ids" in capsys.readouterr().err
    np.savez(tmp_path / "ragged.npz", x=np.zeros((4, 16), np.float32), ids=np.zeros((5, 3), np.int64))
    assert main([*base, "--inputs", str(tmp_path / "ragged.npz")]) == EXIT_USAGE
    assert "dim batch is 4 in x and 5 in ids" in capsys.readouterr().err
    assert main([*base, "--int-range", "x=0:3"]) == EXIT_USAGE
    assert "x is not an integer input of the model (its integer inputs: ids)" in capsys.readouterr().err
    assert main([*base, "--int-range", "ids=0:80"]) == EXIT_USAGE  # beyond the table: PyTorch says so
    assert "index out of range" in capsys.readouterr().err


@pytest.mark.slow
def test_a_token_model_validates_at_several_lengths_through_the_api(tmp_path):
    model = build_token_tagger()
    ids = torch.zeros(1, 8, dtype=torch.long)
    result = yatdeploy.export(model, ids, tmp_path / "tagger.onnx", dynamic_axes={0: "batch", 1: "seq"})
    report = result.report
    assert report.passed, report.failures()
    cases = {c.case for b in report.backends if b.available for c in b.comparisons}
    assert {"random batch 1", "random batch 32", "random seq 1, batch 2", "random seq 4, batch 2"} <= cases
    recorded = metadata(onnx.load(str(tmp_path / "tagger.onnx")))[META_INPUTS]
    # nn.Embedding(30, ...) takes ids in [0, 30): recorded with the dims.
    assert InputSpec.from_json(json.loads(recorded)[0]) == replace(parse_input("input:int64[batch=1,seq=8]"),
                                                                    values=(0, 30))
    # Fixed length: only batch varies
    fixed = yatdeploy.export(model, ids, tmp_path / "fixed.onnx", dynamic_axes={0: "batch"})
    assert not any("seq" in c.case for b in fixed.report.backends for c in b.comparisons)
    assert [d.dim_value for d in onnx.load(str(tmp_path / "fixed.onnx")).graph.input[0].type.tensor_type.shape.dim][1] == 8


@pytest.mark.slow
def test_api_inputs_name_after_forward_and_dynamic_axes_per_input(tmp_path):
    x, ids = torch.randn(2, 16), torch.randint(0, 50, (2, 5))
    result = yatdeploy.export(build_two_inputs(), (x, ids), tmp_path / "two.onnx",
                              dynamic_axes=({0: "batch"}, {0: "batch", -1: "seq"}), validate=False)
    assert [str(s) for s in result.inputs] == ["x:float32[batch=2,16]", "ids:int64[batch=2,seq=5]"]
    with pytest.raises(InputSpecError, match="dynamic_axes has 1 entries for 2 example inputs"):
        yatdeploy.export(build_two_inputs(), (x, ids), tmp_path / "bad.onnx", dynamic_axes=({0: "batch"},))
    with pytest.raises(InputSpecError, match="dim 2 is not a dim of its shape"):
        yatdeploy.export(build_two_inputs(), (x, ids), tmp_path / "bad.onnx", dynamic_axes=({2: "b"}, {}))


@pytest.mark.slow
def test_a_float_model_keeps_its_input_shape_shorthand(tmp_path):
    """--input-shape is one float input with a dynamic batch, as before; its record reads back the same."""
    result = yatdeploy.export(yat_mlp(), (1, 16), tmp_path / "m.onnx", validate=False)
    assert [str(s) for s in result.inputs] == ["input:float32[batch=1,16]"]
    assert metadata(result.model)["yatdeploy.input_shape"] == "1,16"


def test_a_declaration_is_parsed_and_checked_when_made():
    """ExportOptions takes the CLI's texts as the API's values, and refuses what needs no model to refuse."""
    from yatdeploy.errors import spelled
    from yatdeploy.exporting import ExportOptions

    assert ExportOptions("1x16").input_shape == (1, 16)
    options = ExportOptions(inputs=["ids:int64[batch=1,seq=8:32]"], int_ranges=["ids=0:40"])
    assert options.inputs == (parse_input("ids:int64[batch=1,seq=8:32]"),) and options.int_ranges == {"ids": (0, 40)}
    assert ExportOptions((1, 16), int_ranges={"ids": (0, 4)}).int_ranges == {"ids": (0, 4)}
    with pytest.raises(InputSpecError, match="`input_shape` '1,a': expected comma-separated positive integers"):
        ExportOptions("1,a")
    with pytest.raises(InputSpecError, match="no inputs declared"):
        ExportOptions()
    with pytest.raises(InputSpecError, match="a maximum above 1048576 is not exported"):
        ExportOptions(inputs=["ids:int64[batch=1,seq=8:2000000]"])
    with pytest.raises(InputSpecError) as static:
        ExportOptions(inputs=["x:float32[batch=1,16]"], dynamic_batch=False)
    flags = {"dynamic_batch": "--static-batch", "input_shape": "--input-shape", "inputs": "--input"}
    with spelled(lambda name, value: flags[name]):
        assert str(static.value) == "--static-batch is for --input-shape; with --input, a dim without a label is fixed"


@pytest.mark.slow
def test_the_api_takes_the_shape_and_the_integer_ranges_as_text(tmp_path):
    shaped = yatdeploy.export(yat_mlp(), "1,16", tmp_path / "m.onnx", validate=False)
    assert [str(s) for s in shaped.inputs] == ["input:float32[batch=1,16]"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])  # the function
    assert session.run(None, {"input": np.zeros((3, 16), np.float32)})[0].shape == (3, 5)
    tagged = yatdeploy.export(build_token_tagger(), ["input:int64[batch=1,seq=8]"], tmp_path / "t.onnx",
                              int_ranges=["input=0:7"])
    assert tagged.int_ranges == {"input": (0, 7)} and tagged.report.passed, tagged.report.failures()
    assert "'input' drawn from [0, 7): given" in [c.detail for c in tagged.report.checks]
