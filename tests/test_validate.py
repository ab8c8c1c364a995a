"""`validate`: the checks it makes, what it catches, and its reports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tests.model_zoo import yat_mlp
from yatdeploy.attach import yat_gemm_nodes
from yatdeploy.errors import InputSpecError, YatDeployError
from yatdeploy.export import ExportOptions, export_model
from yatdeploy.loading import load_model
from yatdeploy.validate import Tolerance, compare, format_report, validate


@pytest.fixture
def exported(save_whole, tmp_path, progress):
    source = save_whole(yat_mlp())
    loaded = load_model(source)
    export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16)), progress)
    return loaded, tmp_path / "m.onnx"


def tamper_first_yat_weight(path, factor: float = 1.01) -> None:
    model = onnx.load(str(path))
    weight_name = yat_gemm_nodes(model)[0].input[1]
    for index, init in enumerate(model.graph.initializer):
        if init.name == weight_name:
            changed = numpy_helper.to_array(init) * np.float32(factor)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(changed, weight_name))
    onnx.save(model, str(path))


def test_a_faithful_export_passes_on_every_batch(exported):
    loaded, path = exported
    report = validate(path, loaded)
    assert report.passed
    ran = {b.name: b for b in report.backends if b.available}
    assert set(ran) == {"ort-cpu", "ort-function"}  # no CUDA here
    for backend in ran.values():
        assert [c.case for c in backend.comparisons] == ["random batch 1", "random batch 7", "random batch 32"]
        assert all(c.max_rel_err <= 1e-4 for c in backend.comparisons)
    # 2 YatGemm nodes, 3 input cases: every run of every node was the library's kernel.
    assert ran["ort-cpu"].yat_gemm_kernel_runs == {"CPUExecutionProvider": 6}
    assert ran["ort-function"].yat_gemm_kernel_runs == {}
    assert "inlined ONNX function" in ran["ort-function"].yat_gemm_execution
    assert report.checks[0].passed and "2 YatGemm nodes for 2 YatNMN layers" in report.checks[0].detail


def test_weights_changed_after_export_fail_and_name_the_output(exported):
    loaded, path = exported
    tamper_first_yat_weight(path)
    report = validate(path, loaded)
    assert not report.passed
    failures = report.failures()
    assert failures and all("output 'output'" in line for line in failures)
    assert "FAILED" in format_report(report)


def test_a_changed_source_file_is_warned_about(exported, save_whole):
    loaded, path = exported
    other = load_model(save_whole(yat_mlp({"constant_alpha": 3.0})))
    report = validate(path, other)
    assert any("has changed since" in w for w in report.warnings)
    assert not report.passed


def test_a_yatgemm_count_mismatch_fails(exported, save_whole):
    loaded, path = exported
    torch.manual_seed(0)
    model = yat_mlp()
    from nmn.torch import YatNMN

    model.append(YatNMN(5, 5))
    report = validate(path, load_model(save_whole(model, "three.pt")))
    assert not report.checks[0].passed
    assert "2 YatGemm nodes for 3 YatNMN layers" in report.checks[0].detail


def test_user_inputs_from_npy_and_npz(exported, tmp_path):
    loaded, path = exported
    np.save(tmp_path / "one.npy", np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))
    np.savez(tmp_path / "two.npz", a=np.ones((2, 16), np.float32), b=np.zeros((5, 16), np.float64))
    report = validate(path, loaded, input_files=[tmp_path / "one.npy", tmp_path / "two.npz"], batches=[2])
    cases = [c.case for c in report.backends[0].comparisons]
    assert cases == ["random batch 2", "one.npy", "two.npz[a]", "two.npz[b]"]
    assert report.passed


@pytest.mark.parametrize(
    "array,message",
    [
        (np.ones((3, 15), np.float32), r"shape \(3, 15\) does not fit"),
        (np.ones((16,), np.float32), "does not fit"),
        (np.array(["a", "b"]), "not numeric"),
    ],
)
def test_user_inputs_that_do_not_fit_are_named(exported, tmp_path, array, message):
    loaded, path = exported
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(InputSpecError, match=message):
        validate(path, loaded, input_files=[tmp_path / "bad.npy"])


def test_input_shape_is_checked_against_the_model(exported):
    loaded, path = exported
    with pytest.raises(InputSpecError, match="dimension 1 is 20"):
        validate(path, loaded, input_shape=(1, 20))
    with pytest.raises(InputSpecError, match="rank 3"):
        validate(path, loaded, input_shape=(1, 4, 4))


def test_the_json_report(exported, tmp_path):
    loaded, path = exported
    report = validate(path, loaded, tolerance=Tolerance(atol=1e-6, rtol=1e-3))
    report.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["passed"] is True
    assert data["tolerance"] == {"atol": 1e-6, "rtol": 1e-3}
    row = data["backends"][0]["comparisons"][0]
    assert set(row) >= {"case", "output", "shape", "max_abs_err", "max_rel_err", "passed"}
    assert data["backends"][0]["passed"] is True


def test_unknown_backend_is_refused(exported):
    loaded, path = exported
    with pytest.raises(YatDeployError, match="unknown backend 'openvino'"):
        validate(path, loaded, backend_names=["openvino"])


def test_compare_counts_values_beyond_the_combined_tolerance():
    tol = Tolerance(atol=1e-5, rtol=1e-4)
    expected = np.array([1.0, 100.0, 0.0, np.nan, np.inf])
    same = compare(expected.copy(), expected, tol)
    assert same == (0.0, 0.0, 0)
    actual = np.array([1.0 + 5e-5, 100.02, 2e-5, np.nan, np.inf])
    max_abs, max_rel, bad = compare(actual, expected, tol)
    assert bad == 2  # 100.02 (rel 2e-4) and 2e-5 next to 0; 1.00005 is within atol + rtol
    assert max_abs == pytest.approx(0.02)
    assert max_rel == pytest.approx(2e-4)  # the element next to zero does not count towards rel


def test_compare_fails_nan_against_a_number():
    tol = Tolerance(atol=1e-5, rtol=1e-4)
    assert compare(np.array([np.nan]), np.array([1.0]), tol)[2] == 1
    assert compare(np.array([-np.inf]), np.array([np.inf]), tol)[2] == 1
    assert compare(np.array([1.0]), np.array([np.nan]), tol)[2] == 1


def test_a_static_batch_export_is_validated_at_its_batch(save_whole, tmp_path, progress):
    loaded = load_model(save_whole(yat_mlp()))
    export_model(loaded, tmp_path / "s.onnx", ExportOptions((3, 16), dynamic_batch=False), progress)
    report = validate(tmp_path / "s.onnx", loaded)
    assert report.passed
    assert {tuple(c.shape) for c in report.backends[0].comparisons} == {(3, 5)}


def test_a_run_time_failure_of_onnx_runtime_is_named(exported):
    from yatdeploy import runtime
    from yatdeploy.errors import OnnxModelError

    _, path = exported
    session = runtime.create_session(path, runtime.get_backend("ort-function"))
    with pytest.raises(OnnxModelError, match="ONNX Runtime failed to run the model"):
        runtime.run(session, {"input": np.ones((2, 15), np.float32)})


def test_output_names_are_checked_for_yatdeploy_exports(exported):
    loaded, path = exported
    assert validate(path, loaded).checks[1].name == "output names"
    model = onnx.load(str(path))
    old = model.graph.output[0].name
    model.graph.output[0].name = "logits"
    for node in model.graph.node:
        node.output[:] = ["logits" if o == old else o for o in node.output]
    onnx.save(model, str(path))
    report = validate(path, loaded)
    assert not report.passed
    assert "output names: logits; PyTorch's outputs map to output" in report.failures()


def test_a_library_backend_that_falls_back_to_the_function_is_reported(exported):
    loaded, path = exported
    model = onnx.load(str(path))
    for opset in model.opset_import:
        if opset.domain == "yat":
            opset.version = 2  # a YatGemm version the library does not implement
    onnx.save(model, str(path))
    report = validate(path, loaded, backend_names=["ort-cpu"])
    backend = report.backends[0]
    assert all(c.passed for c in backend.comparisons)  # the function still gives the right answers
    assert backend.yat_gemm_kernel_runs == {}
    assert not report.passed
    assert "ort-cpu: the library was not used: the model imports YatGemm version 2" in report.failures()[0]
