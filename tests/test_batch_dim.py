"""The batch dimension is a free first dimension, whatever it is called, and one definition decides it.

Regression for a false PASS: a model whose dynamic first dimension was named anything but `batch` was
taken as fixed at size 0, every input case was dropped and an empty case "passed".
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from tests.model_zoo import yat_mlp
from tests.test_validate import tamper_first_yat_weight
from yatdeploy import graph
from yatdeploy.errors import InputSpecError
from yatdeploy.exporting import ExportOptions, export_model
from yatdeploy.loading import load_model
from yatdeploy.validation import validate


def rename_batch_dim(path, name: str) -> None:
    """Rename the export's `batch` dimension everywhere, as torch.onnx.export(dynamic_axes=...) users name it."""
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "batch":
                dim.dim_param = name
    onnx.save(model, str(path))


def drop_dim_name(path) -> None:
    """An unknown first dimension: neither a value nor a name."""
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
    onnx.save(model, str(path))


@pytest.fixture
def exported(exported_mlp, tmp_path):
    """A copy of the session's shared export: these tests rename and drop its dimensions."""
    return exported_mlp.loaded, exported_mlp.onnx_copy(tmp_path)


@pytest.mark.parametrize("rename", ["N", "batch_size", "s0", None], ids=["N", "batch_size", "s0", "unnamed"])
def test_every_case_runs_whatever_the_dimension_is_called(exported, tmp_path, rename):
    loaded, path = exported
    if rename is None:
        drop_dim_name(path)
    else:
        rename_batch_dim(path, rename)
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32))
    report = validate(path, loaded, input_files=[inputs])
    assert report.passed
    for backend in (b for b in report.backends if b.available):
        assert [(c.case, c.shape) for c in backend.comparisons] == [
            ("random batch 1", [1, 5]), ("random batch 7", [7, 5]), ("random batch 32", [32, 5]), ("x.npy", [5, 5]),
        ]


def test_a_wrong_model_with_another_dimension_name_fails(exported):
    loaded, path = exported
    rename_batch_dim(path, "N")
    tamper_first_yat_weight(path, 1.05)
    report = validate(path, loaded)
    assert not report.passed
    assert any("output 'output'" in line for line in report.failures())


@pytest.mark.slow
def test_a_torch_export_program_with_its_own_dimension_name_is_compared(tmp_path, progress):
    torch.manual_seed(0)
    module = yat_mlp().eval()
    x = torch.randn(4, 16)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: torch.export.Dim("N", min=1, max=1024)},))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    export_model(loaded, tmp_path / "m.onnx", ExportOptions((4, 16)), progress)
    first = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert not first.HasField("dim_value")  # the program's own name, not "batch"
    report = validate(tmp_path / "m.onnx", loaded)
    assert report.passed
    ran = [b for b in report.backends if b.available]
    assert ran and all(len(b.comparisons) == 3 and b.comparisons[2].shape[0] == 32 for b in ran)


@pytest.mark.slow
def test_a_user_input_that_does_not_fit_a_fixed_first_dimension_is_refused(save_whole, tmp_path, progress):
    loaded = load_model(save_whole(yat_mlp()))
    export_model(loaded, tmp_path / "s.onnx", ExportOptions((3, 16), dynamic_batch=False), progress)
    np.save(tmp_path / "five.npy", np.zeros((5, 16), np.float32))
    with pytest.raises(InputSpecError, match=r"five.npy: 5 rows.*fixed first dimension of 3"):
        validate(tmp_path / "s.onnx", loaded, input_files=[tmp_path / "five.npy"])
    np.save(tmp_path / "three.npy", np.ones((3, 16), np.float32))
    report = validate(tmp_path / "s.onnx", loaded, input_files=[tmp_path / "three.npy"])
    assert report.passed
    assert [c.case for c in report.backends[0].comparisons] == ["random batch 3", "three.npy"]


def test_an_empty_user_input_is_refused_not_passed(exported, tmp_path):
    loaded, path = exported
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    with pytest.raises(InputSpecError, match="holds no values"):
        validate(path, loaded, input_files=[tmp_path / "empty.npy"])


def test_the_definition():
    def value(*dims):
        return helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(dims))

    assert graph.value_has_batch_dim(value("N", 4))
    assert graph.value_has_batch_dim(value(None, 4))
    assert graph.value_has_batch_dim(value("batch", "seq"))
    assert not graph.value_has_batch_dim(value(3, 4))
    assert not graph.value_has_batch_dim(helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []))
    assert graph.dims(value("N", 4, None)) == [-1, 4, -1]


def test_repository_and_engine_preparation_agree_with_validate(exported, tmp_path):
    from yatdeploy.packaging import write_repository
    from yatdeploy.trt.engine import prepare_model

    loaded, path = exported
    rename_batch_dim(path, "N")
    folder = write_repository(tmp_path / "repo", "m", path, op_library=None)
    assert "max_batch_size: 64" in (folder / "config.pbtxt").read_text()
    assert prepare_model(onnx.load(str(path))).input.shape == [-1, 16]
