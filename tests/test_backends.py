"""The backends interface: the registry, a backend added as one module plus one line, and no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests import reference_backend
from tests.model_zoo import yat_mlp
from yatdeploy import backends
from yatdeploy.errors import YatDeployError
from yatdeploy.loading import load_model
from yatdeploy.onnx_export import ExportOptions, export_model
from yatdeploy.validation import validate

PACKAGE = Path(__file__).resolve().parent.parent / "yatdeploy"


def test_the_registry_names_every_backend_in_order_and_refuses_unknown_ones():
    assert backends.names() == ["ort-cpu", "ort-cuda", "ort-function", "tensorrt", "tensorrt-rtx"]
    assert [b.name for b in backends.all()] == backends.names()
    assert all(isinstance(b, backends.Backend) for b in backends.all())
    assert backends.default().name in {"ort-cuda", "ort-cpu", "ort-function"}
    assert backends.default().availability() is None
    with pytest.raises(YatDeployError, match="unknown backend 'nope'; known: ort-cpu, ort-cuda, ort-function, tensorrt"):
        backends.get("nope")


def test_a_file_a_backend_does_not_open_is_named_with_the_backends_that_do():
    backends.check_file(backends.get("ort-cpu"), "m.onnx")
    backends.check_file(backends.get("tensorrt"), "m.plan")
    with pytest.raises(YatDeployError, match="m.plan is a TensorRT engine; it runs on the tensorrt or tensorrt-rtx backend, not ort-cpu"):
        backends.check_file(backends.get("ort-cpu"), "m.plan")


@pytest.fixture
def reference_registered():
    backends.register(reference_backend.BACKEND)
    yield reference_backend.BACKEND
    backends.unregister(reference_backend.BACKEND.name)


def test_a_new_backend_is_one_module_and_one_registration_and_validate_runs_it(reference_registered, save_whole,
                                                                                tmp_path, progress):
    loaded = load_model(save_whole(yat_mlp()))
    export_model(loaded, tmp_path / "m.onnx", ExportOptions((1, 16)), progress)
    report = validate(tmp_path / "m.onnx", loaded, backend_names=["onnx-reference"])
    [ran] = report.backends
    assert ran.name == "onnx-reference" and ran.available
    assert len(ran.comparisons) == 3 and all(c.passed for c in ran.comparisons)
    assert ran.yat_gemm_execution == "YatGemm ran as the ONNX function (onnx.reference)"
    assert report.passed
    runner = reference_registered.open(tmp_path / "m.onnx", backends.Options())
    assert [(t.name, t.dtype, t.shape, t.datatype) for t in runner.inputs] == [("input", "float32", [-1, 16], "FP32")]


def test_a_tampered_model_fails_on_the_new_backend_too(reference_registered, save_whole, tmp_path, progress):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    loaded = load_model(save_whole(yat_mlp()))
    path = tmp_path / "m.onnx"
    export_model(loaded, path, ExportOptions((1, 16)), progress)
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, str(path))
    report = validate(path, loaded, backend_names=["onnx-reference"])
    assert not report.passed and not any(c.passed for c in report.backends[0].comparisons)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path], module_level: bool) -> set[str]:
    """The package's modules that `path` imports (at module level, or anywhere, lazily included)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body if module_level else ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _cycles(module_level: bool) -> set[tuple[str, ...]]:
    modules = _modules()
    # A module's import of its own packages (yatdeploy.backends.ort -> yatdeploy.backends) is not a cycle.
    edges = {m: {t for t in _imports(p, modules, module_level) if t != m and not m.startswith(t + ".")}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = set()

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycles.add(tuple(stack[stack.index(target):]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module)
    return cycles


def test_the_package_has_no_import_cycle():
    assert _cycles(module_level=True) == set()
    # Lazy imports too: runtime <-> trt.engine, validate <-> trt.engine and torch_op <-> gpu.launch were cycles
    # hidden that way.
    assert _cycles(module_level=False) == set()


def test_no_module_outside_backends_reaches_into_a_backend():
    offenders = []
    for module, path in _modules().items():
        if module.startswith("yatdeploy.backends"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # doctor reports the installed onnxruntime's providers (backends.ort.available_providers).
            if "backend.kind" in line or ".inner" in line or ("backends.ort" in line and module != "yatdeploy.doctor"):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_the_backends_import_in_a_fresh_interpreter_in_either_order():
    for first in ("yatdeploy.trt.engine", "yatdeploy.validation"):
        code = f"import {first}, yatdeploy.backends; print(yatdeploy.backends.names())"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
        assert result.returncode == 0, result.stderr
        assert "tensorrt" in result.stdout
