"""The Python API (yatdeploy.export, .validate, .load) and how library errors name options."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import yatdeploy
from tests.model_zoo import yat_mlp
from yatdeploy.cli import EXIT_USAGE, main
from yatdeploy.errors import ModelLoadError
from yatdeploy.loading import load_model


@pytest.mark.slow
def test_export_of_an_in_memory_module_validates_and_runs_in_plain_onnxruntime(tmp_path):
    model = yat_mlp(in_features=8, hidden=6, out_features=3)
    result = yatdeploy.export(model, torch.randn(2, 8), tmp_path / "m.onnx")
    assert result.yat_gemm_nodes == result.yat_layers == 2
    assert result.report is not None and result.report.passed, result.report.failures()
    assert result.report.against == "<Sequential>"
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_validate_takes_a_module_or_a_file_and_sees_a_changed_module(tmp_path):
    model = yat_mlp()
    torch.save(model, tmp_path / "m.pt")
    yatdeploy.export(tmp_path / "m.pt", (1, 16), tmp_path / "m.onnx", validate=False)
    assert yatdeploy.validate(tmp_path / "m.onnx", tmp_path / "m.pt", backends=["ort-cpu"]).passed
    assert yatdeploy.validate(tmp_path / "m.onnx", model, backends=["ort-cpu"], batches=(3,)).passed
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    report = yatdeploy.validate(tmp_path / "m.onnx", model, backends=["ort-cpu"])
    assert not report.passed


@pytest.mark.slow
def test_validation_reuses_the_exports_reference(tmp_path, monkeypatch):
    """The model is prepared (cast to the export dtype) once for export and validation together."""
    from yatdeploy import reference

    calls = []
    real = reference.Reference.of
    monkeypatch.setattr(reference.Reference, "of", staticmethod(lambda *a, **k: calls.append(a) or real(*a, **k)))
    result = yatdeploy.export(yat_mlp(), (1, 16), tmp_path / "m.onnx", dtype="float16")
    assert result.report.passed and result.report.dtype == "float16"
    assert len(calls) == 1


def test_import_yatdeploy_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, yatdeploy; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert yatdeploy.export.__module__ == "yatdeploy.api"
    with pytest.raises(AttributeError, match="no attribute 'exports'"):
        yatdeploy.exports  # noqa: B018


def test_library_errors_name_keywords_and_the_cli_names_its_flags(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(yat_mlp().state_dict(), path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    assert "pass `arch` module:callable" in str(caught.value) and "--" not in str(caught.value)
    assert main(["export", "-q", str(path), "--input-shape", "1,16"]) == EXIT_USAGE
    assert "pass --arch module:callable" in capsys.readouterr().err
    # The CLI's spelling ends with the command: the library speaks Python again.
    with pytest.raises(ModelLoadError) as again:
        load_model(path)
    assert str(again.value) == str(caught.value)


def test_a_negated_switch_is_spelled_both_ways():
    from yatdeploy.errors import YatDeployError, option, spelled

    error = YatDeployError(f"exported with {option('dynamic_batch', False)}; pass {option('trust_pickle', True)}")
    assert str(error) == "exported with dynamic_batch=False; pass trust_pickle=True"
    with spelled(lambda name, value: {"dynamic_batch": "--static-batch", "trust_pickle": "--trust-pickle"}[name]):
        assert str(error) == "exported with --static-batch; pass --trust-pickle"
    assert error.text == "exported with dynamic_batch=False; pass trust_pickle=True"


def test_messages_carry_no_terminal_colour_codes():
    """torch's exporter colours parts of its messages; a message yatdeploy shows never carries the codes."""
    from yatdeploy.errors import YatDeployError

    error = YatDeployError("torch.onnx.export failed: \x1b[96mThis is step 1/3\x1b[0m of exporting",
                           "\x1b]8;;https://x\x07see\x1b]8;;\x07 the \x1b[1;31mdocs\x1b[m")
    assert str(error) == "torch.onnx.export failed: This is step 1/3 of exporting (see the docs)"
    assert "\x1b" not in error.text
