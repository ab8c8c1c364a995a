"""Localization (yatdeploy.localize): deliberately broken exports of small models of the tests' own
(tests/broken_exports.py) named to the module that was broken, none on correct exports, the reproduction it writes,
and `validate --explain` / `validate DIR`."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest

from tests.broken_exports import BROKEN, break_export, export
from tests.model_zoo import build_tiny_lm, yat_gpt, yat_mlp
from yatdeploy import api, backends, localize, validation
from yatdeploy.cli import EXIT_OK, EXIT_USAGE, EXIT_VALIDATION_FAILED, main
from yatdeploy.loading import from_module

pytestmark = pytest.mark.slow  # every test exports models of its own


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each model of tests/broken_exports.py exported once for this module: {(model, dtype): (module, path)}."""
    folder = tmp_path_factory.mktemp("localize")
    cache: dict = {}

    def get(model: str, dtype: str | None = None):
        if (model, dtype) not in cache:
            cache[(model, dtype)] = export(model, folder, dtype)
        return cache[(model, dtype)]

    return get


def _localize(path, module, budget=localize.EXPOSE_ALL_BYTES, backend_names=("ort-cpu",), explain=False):
    found: list[localize.Localization] = []
    report = validation.validate(path, from_module(module), backend_names=list(backend_names),
                                 localize=localize.localizer(explain=explain, max_exposed_bytes=budget,
                                                             done=found.extend))
    return report, found


@pytest.mark.parametrize("case", BROKEN, ids=[c.name for c in BROKEN])
def test_a_broken_export_is_localized_to_the_module_that_was_broken(case, exports, tmp_path):
    module, source = exports(case.model, case.dtype)
    want = break_export(case, source, tmp_path / "broken.onnx")
    report, [found] = _localize(tmp_path / "broken.onnx", module)
    assert not report.passed
    first = report.first_divergence
    assert first is not None and first.module in want, report.localization
    assert (first.backend, found.runs, found.mode) == ("ort-cpu", 1, "every value exposed in one run")
    assert first.max_abs_err > first.tolerance
    node = next(n for n in onnx.load(str(tmp_path / "broken.onnx")).graph.node if n.name == first.onnx_node)
    assert node.op_type == first.op_type
    assert first.module not in first.agreeing_before


@pytest.mark.parametrize("name", ["mlp: perturbed YatNMN weight", "gpt: LayerNorm epsilon 0.1",
                                  "conv: YatGemm eps x100"])
def test_bisection_finds_the_same_module_in_at_most_log2_n_plus_2_runs(name, exports, tmp_path):
    case = next(c for c in BROKEN if c.name == name)
    module, source = exports(case.model, case.dtype)
    want = break_export(case, source, tmp_path / "broken.onnx")
    report, [found] = _localize(tmp_path / "broken.onnx", module, budget=0)
    assert found.mode == "bisection" and report.first_divergence.module in want
    assert found.runs <= math.ceil(math.log2(found.sites)) + 2


def test_the_function_path_localizes_too(exports, tmp_path):
    case = next(c for c in BROKEN if c.name == "gpt: attend YatGemm eps x100")
    module, source = exports(case.model, case.dtype)
    want = break_export(case, source, tmp_path / "broken.onnx")
    report, found = _localize(tmp_path / "broken.onnx", module, backend_names=("ort-cpu", "ort-function"))
    assert [f.backend for f in found] == ["ort-cpu", "ort-function"]
    assert all(f.divergence.module in want for f in found)
    assert report.first_divergence.backend == "ort-cpu"


@pytest.mark.parametrize("model", [yat_mlp, yat_gpt, build_tiny_lm], ids=["yat_mlp", "yat_gpt", "tiny_lm"])
def test_correct_exports_of_the_zoo_are_not_localized(model, tmp_path):
    built = model()
    example = (3, 16) if model is yat_mlp else ["ids:int64[batch=2,seq=8]"]
    api.export(built, example, tmp_path / "m.onnx", validate=False)
    report, found = _localize(tmp_path / "m.onnx", built, backend_names=("ort-cpu", "ort-function"), explain=True)
    assert report.passed and report.first_divergence is None
    assert [f.divergence for f in found] == [None, None] and all(f.compared >= 3 for f in found)
    assert all("no module differs from PyTorch" in line for line in report.localization)


def test_a_correct_export_in_float16_is_not_localized(exports):
    module, path = exports("mlp", "float16")
    report, [found] = _localize(path, module, explain=True)
    assert report.passed and found.divergence is None and found.compared >= 5


def test_the_reproduction_runs_in_onnxruntime_and_validate_fails_it(exports, tmp_path, capsys):
    case = next(c for c in BROKEN if c.name == "gpt: perturbed YatNMN weight")
    module, source = exports(case.model, case.dtype)
    break_export(case, source, tmp_path / "broken.onnx")
    torch_path = tmp_path / "gpt.pt"
    import torch

    torch.save(module, torch_path)
    repro = tmp_path / "repro"
    report = api.validate(tmp_path / "broken.onnx", torch_path, trust_pickle=True, backends=["ort-function"],
                          repro=repro, report=tmp_path / "report.json")
    first = report.first_divergence
    assert first.module == "mlp" and first.reproduction == str(repro)
    saved = json.loads((tmp_path / "report.json").read_text())["first_divergence"]
    assert {k: saved[k] for k in ("module", "onnx_node", "op_type", "backend")} == \
        {"module": "mlp", "onnx_node": first.onnx_node, "op_type": "YatGemm", "backend": "ort-function"}
    assert saved["max_abs_err"] > saved["tolerance"] and saved["torch_err"] is not None
    # The subgraph: the YatGemm node alone, its function kept for plain onnxruntime.
    sub = onnx.load(str(repro / "model.onnx"))
    assert [n.op_type for n in sub.graph.node] == ["YatGemm"] and [f.name for f in sub.functions] == ["YatGemm"]
    import onnxruntime as ort

    inputs = dict(np.load(repro / "inputs.npz"))
    [got] = ort.InferenceSession(str(repro / "model.onnx")).run(None, inputs)
    expected = np.load(repro / "expected.npz")[first.onnx_value]
    assert np.abs(got - expected).max() == pytest.approx(first.max_abs_err, rel=1e-3)
    # `yatdeploy validate DIR` fails it, on both ONNX Runtime paths; with the weight back, it passes.
    assert main(["validate", "-q", str(repro), "--backend", "ort-cpu", "--backend", "ort-function"]) == \
        EXIT_VALIDATION_FAILED
    assert "reproduction inputs" in capsys.readouterr().out
    fixed = tmp_path / "fixed"
    shutil.copytree(repro, fixed)
    faithful = onnx.load(str(source))
    weight = sub.graph.node[0].input[1]
    model = onnx.load(str(fixed / "model.onnx"))
    for init in model.graph.initializer:
        if init.name == weight:
            init.CopyFrom(next(i for i in faithful.graph.initializer if i.name == weight))
    onnx.save(model, str(fixed / "model.onnx"))
    assert main(["validate", "-q", str(fixed), "--backend", "ort-cpu"]) == EXIT_OK


def test_validate_explain_on_the_command_line(exported_mlp, capsys):
    assert main(["validate", "-q", str(exported_mlp.onnx), "--against", str(exported_mlp.source),
                 "--backend", "ort-cpu", "--explain"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "localization (intermediate values against PyTorch's module outputs):" in out
    assert "ort-cpu: no module differs from PyTorch beyond its tolerance" in out


def test_a_reproduction_refuses_a_model_to_validate_against(exports, tmp_path):
    case = next(c for c in BROKEN if c.name == "mlp: YatGemm eps x10")
    module, source = exports(case.model, case.dtype)
    break_export(case, source, tmp_path / "broken.onnx")
    validation.validate(tmp_path / "broken.onnx", from_module(module), backend_names=["ort-cpu"],
                        localize=localize.localizer(reproduction=tmp_path / "repro"))
    from yatdeploy.errors import YatDeployError

    with pytest.raises(YatDeployError, match="is a reproduction, validated against the outputs it records"):
        api.validate(tmp_path / "repro", module)


@pytest.mark.skipif(backends.get("tensorrt").availability() is not None,
                    reason="TensorRT is not available here: its localization (on ONNX Runtime, saying so) needs a GPU")
def test_a_tensorrt_failure_is_localized_on_onnx_runtime_and_says_why(exports, tmp_path):
    case = next(c for c in BROKEN if c.name == "mlp: perturbed YatNMN weight")
    module, source = exports(case.model, case.dtype)
    break_export(case, source, tmp_path / "broken.onnx")
    report, found = _localize(tmp_path / "broken.onnx", module, backend_names=("ort-cpu", "tensorrt"))
    assert any("an engine's outputs are fixed when it is built" in line for line in report.localization)
    assert report.first_divergence.module == "mid"


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_repro_folder_that_cant_be_written_is_refused_before_the_model_loads(exported_mlp, tmp_path, where,
                                                                              capsys):
    from yatdeploy.errors import YatDeployError

    (tmp_path / "taken").write_text("a file, not a folder")
    repro = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "repro"
    # The model named does not exist: the refusal of --repro comes first, before anything is loaded or run.
    with pytest.raises(YatDeployError, match=f"can't write {repro}"):
        api.validate(exported_mlp.onnx, tmp_path / "no-such-model.pt", backends=["ort-cpu"], repro=repro)
    assert main(["validate", "-q", str(exported_mlp.onnx), "--against", str(exported_mlp.source),
                 "--backend", "ort-cpu", "--repro", str(repro)]) == EXIT_USAGE
    assert f"can't write {repro}" in capsys.readouterr().err
