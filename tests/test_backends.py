"""The backends interface: the registry, a backend (one that builds engines too) added as one module plus one
line, no import cycles, and nothing outside backends/ that dispatches on a backend."""

from __future__ import annotations

import ast
import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests import reference_backend, toy_engine_backend
from tests.model_zoo import yat_mlp
from yatdeploy import backends
from yatdeploy.cli import EXIT_OK, EXIT_USAGE, main
from yatdeploy.errors import YatDeployError
from yatdeploy.exporting import ExportOptions, export_model
from yatdeploy.loading import load_model
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


def test_the_registry_says_which_backends_build_and_which_one_an_engine_file_needs(tmp_path):
    from yatdeploy.trt.engine import BatchProfile, EngineSignature, TensorSignature

    assert [b.name for b in backends.builders()] == ["tensorrt", "tensorrt-rtx"]
    assert backends.default_builder().name == "tensorrt"
    assert all(b.builder is None for b in backends.all() if b.name.startswith("ort-"))
    assert all(isinstance(b.builder, backends.Builder) for b in backends.builders())
    assert backends.file_kinds() == {".onnx": "an ONNX model", ".plan": "a TensorRT engine"}
    assert backends.triton_names(".onnx") == [("onnxruntime", "onnxruntime_onnx")]
    assert backends.triton_names(".plan") == [("tensorrt", "tensorrt_plan")]
    assert backends.for_file(tmp_path / "m.onnx") is None  # any ONNX backend: the caller's choice
    signature = EngineSignature([TensorSignature("input", "float32", [-1, 4])],
                                [TensorSignature("output", "float32", [-1, 2])], BatchProfile(1, 8, 64), 1, 1, "0" * 64)
    for runtime in ("tensorrt", "tensorrt-rtx"):  # the engine's signature names the backend that runs it
        signature.runtime = runtime
        signature.write(tmp_path / f"{runtime}.plan")
        assert backends.for_file(tmp_path / f"{runtime}.plan").name == runtime
    with pytest.raises(YatDeployError, match="m.pt: no backend opens .pt files"):
        backends.for_file(tmp_path / "m.pt")
    # A backend says whether it builds: builder None, or a Builder.
    silent = {k: v for k, v in vars(reference_backend.ReferenceBackend).items() if k != "builder"}
    with pytest.raises(TypeError, match="Silent is not a backends.Backend: it has no builder .builder = None"):
        backends.register(type("Silent", (), silent)())


def test_a_build_option_a_backend_does_not_take_is_refused_naming_the_backend():
    options = backends.BuildOptions(timing_cache=Path("cache"), yat_plugin=True, verbose=True)
    options.refuse_others("any", ("timing_cache", "yat_plugin"))
    with pytest.raises(YatDeployError, match=r"the other backend does not take `timing_cache` or yat_plugin=True "
                                             r"\(why\)"):
        options.refuse_others("other", (), "why")


@pytest.fixture
def reference_registered():
    backends.register(reference_backend.BACKEND)
    yield reference_backend.BACKEND
    backends.unregister(reference_backend.BACKEND.name)


@pytest.mark.slow
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


@pytest.mark.slow
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
            if "backend.kind" in line or ".inner" in line:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


# Where a module outside backends/ may import a backend module or name a backend's word, and why.
_ALLOWED_IMPORTS = {("yatdeploy.doctor", "yatdeploy.backends.ort"): "doctor reports onnxruntime's providers"}
_ALLOWED_WORDS = {("yatdeploy.doctor", "tensorrt"): "a distribution whose version doctor reports",
                  ("yatdeploy.doctor", "onnxruntime"): "a distribution whose version doctor reports"}


def _backend_words() -> dict[str, str]:
    """What only backends/ may spell: each backend's name and Triton names, each engine's suffix."""
    words = {backend.name: f"the {backend.name} backend's name" for backend in backends.all()}
    for backend in backends.all():
        for triton in (backend.triton_platform, backend.triton_backend):
            words.setdefault(triton, f"the {backend.name} backend's Triton name")
        if backend.builder is not None:
            words.setdefault(backend.builder.suffix, f"the {backend.name} backend's engine suffix")
    return words


def _text(tree: ast.AST) -> set[int]:
    """The ids of the string constants in `tree` that are text, not data: docstrings and other bare string
    statements, and option names (errors.option("tensorrt") is the demo's --tensorrt flag)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            found.add(id(node.value))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "option" and node.args:
            found.add(id(node.args[0]))
    return found


def test_no_module_outside_backends_names_a_backend_imports_one_or_spells_an_engine_suffix():
    """A new backend, one that builds engines included, is one module and one registry line: nothing else names it.
    Outside yatdeploy/backends/, no module imports a backend module (yatdeploy.backends.<module>) and no code
    holds a backend's name, its Triton platform or backend, or an engine's suffix as a string to compare, look up or
    dispatch on (a file name ending in the suffix included, "model.plan"); docstrings and messages that mention them
    are text. yatdeploy/trt/ is TensorRT's implementation, which the tensorrt backends wrap: it names its runtimes
    and files, and it imports no backend at all."""
    words = _backend_words()
    suffixes = {word for word in words if word.startswith(".")}
    offenders = []
    for module, path in sorted(_modules().items()):
        if module.startswith("yatdeploy.backends"):
            continue
        tree = ast.parse(path.read_text())
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for name in names:
                reaches = (name.startswith("yatdeploy.backends") if module.startswith("yatdeploy.trt")
                           else name.startswith("yatdeploy.backends.") and (PACKAGE / "backends" /
                                                                           f"{name.split('.')[2]}.py").is_file())
                if reaches and (module, name) not in _ALLOWED_IMPORTS:
                    offenders.append(f"{where}:{node.lineno}: imports {name}")
        if module.startswith("yatdeploy.trt"):
            continue
        text = _text(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in text:
                continue
            value = node.value
            word = value if value in words else next((s for s in suffixes if value.endswith(s) and " " not in value),
                                                     None)
            if word is not None and (module, value) not in _ALLOWED_WORDS:
                offenders.append(f"{where}:{node.lineno}: {value!r}: {words[word]}")
    assert offenders == [], "\n".join(["only yatdeploy/backends/ may name these (ask the registry):",
                                        *sorted(offenders, key=lambda o: (o.split(":")[0], int(o.split(":")[1])))])


@pytest.mark.slow
def test_the_backends_import_in_a_fresh_interpreter_in_either_order():
    for first in ("yatdeploy.trt.engine", "yatdeploy.validation"):
        code = f"import {first}, yatdeploy.backends; print(yatdeploy.backends.names())"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
        assert result.returncode == 0, result.stderr
        assert "tensorrt" in result.stdout


# --- an engine-building backend: one module (tests/toy_engine_backend.py) and one registration ------------------

@pytest.fixture
def toy_registered():
    backends.register(toy_engine_backend.BACKEND)
    yield toy_engine_backend.BACKEND
    backends.unregister(toy_engine_backend.BACKEND.name)


@pytest.fixture
def toy_export(exported_mlp, tmp_path) -> tuple[Path, Path]:
    """The session's exported yat_mlp: its .pt and a copy of its ONNX file."""
    return exported_mlp.source, exported_mlp.onnx_copy(tmp_path)


@pytest.mark.slow
def test_a_new_engine_backend_builds_validates_and_writes_its_repository_entry(toy_registered, toy_export, tmp_path,
                                                                               capsys):
    from yatdeploy.serving.repository import discover, parse_config

    source, onnx_path = toy_export
    repo = tmp_path / "repo"
    assert main(["build-engine", "-q", str(onnx_path), "--backend", "toy", "--max-batch", "32",
                 "--repository", str(repo), "--name", "mlp_toy"]) == EXIT_OK
    out = capsys.readouterr().out
    engine = tmp_path / "m.toy"  # the default output: the ONNX model with the engine's suffix
    assert f"wrote {engine} (" in out and "batch 1..32, a toy engine" in out
    assert f"--backend toy --engine {engine}" in out
    assert backends.for_file(engine) is toy_registered
    assert main(["validate", "-q", str(onnx_path), "--against", str(source), "--backend", "toy",
                 "--engine", str(engine)]) == EXIT_OK
    assert "YatGemm ran as the ONNX function (a toy engine)" in capsys.readouterr().out
    # The repository entry: the engine as model.toy, a config for the backend that runs it.
    config = parse_config(repo / "mlp_toy" / "config.pbtxt")
    assert (config.platform, config.parameters["yatdeploy_backend"].string_value) == ("yatdeploy_toy", "toy")
    assert config.max_batch_size == 32 and [list(t.dims) for t in config.input] == [[16]]
    [entry] = discover(repo)
    assert (entry.backend, entry.path.name, entry.error) == ("toy", "model.toy", None)
    # An option it does not read is refused, naming it.
    assert main(["build-engine", "-q", str(onnx_path), "--backend", "toy", "--timing-cache", "c"]) == EXIT_USAGE
    assert "the toy backend does not take --timing-cache" in capsys.readouterr().err
    # --backend's choices are the registry's builders.
    with pytest.raises(SystemExit):
        main(["build-engine", "-q", str(onnx_path), "--backend", "ort-cpu"])
    assert "invalid choice: 'ort-cpu' (choose from 'tensorrt', 'tensorrt-rtx', 'toy')" in capsys.readouterr().err


@pytest.mark.slow
def test_the_api_builds_on_any_builder_and_names_what_a_backend_does_not_take(toy_registered, toy_export, tmp_path):
    from yatdeploy.api import build_engine

    _, onnx_path = toy_export
    built = build_engine(onnx_path, tmp_path / "e.toy", backend="toy", min_batch=2, opt_batch=4, max_batch=8)
    assert built.repository_entry is None and built.engine.batch_profile == (2, 4, 8)
    assert dataclasses.replace(built.engine, seconds=0.0) == toy_registered.builder.read(tmp_path / "e.toy")
    with pytest.raises(YatDeployError, match="the toy backend does not take yat_plugin=True"):
        build_engine(onnx_path, backend="toy", yat_plugin=True)
    with pytest.raises(YatDeployError, match="the ort-cpu backend builds no engines .those that do: tensorrt, "
                                             "tensorrt-rtx, toy."):
        build_engine(onnx_path, backend="ort-cpu")
    with pytest.raises(YatDeployError, match="Triton sends batches from 1 .rebuild with `min_batch` 1."):
        build_engine(onnx_path, tmp_path / "e.toy", backend="toy", min_batch=2, repository=tmp_path / "repo")
    assert not (tmp_path / "repo" / "e").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_serves_the_new_engine_backends_repository_entry(toy_registered, toy_export, tmp_path, capsys):
    """`yatdeploy serve` in its own process, where a sitecustomize registers the toy backend as the test did."""
    httpclient = pytest.importorskip("tritonclient.http")
    pytest.importorskip("fastapi")
    _, onnx_path = toy_export
    repo = tmp_path / "repo"
    assert main(["build-engine", "-q", str(onnx_path), "--backend", "toy", "--repository", str(repo),
                 "--name", "mlp_toy"]) == EXIT_OK
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("from tests import toy_engine_backend\nfrom yatdeploy import backends\n\n"
                                           "backends.register(toy_engine_backend.BACKEND)\n")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PACKAGE.parent)])}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "yatdeploy", "serve", str(repo), "--port", str(port),
                                   "--grpc-port", "0", "--threads", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        metadata = client.get_model_metadata("mlp_toy")
        assert metadata["platform"] == "yatdeploy_toy" and metadata["parameters"]["backend"] == "toy"
        x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
        tensor = httpclient.InferInput("input", [3, 16], "FP32")
        tensor.set_data_from_numpy(x)
        output = metadata["outputs"][0]["name"]
        served = client.infer("mlp_toy", [tensor]).as_numpy(output)
        expected = backends.get("ort-function").open(onnx_path, backends.Options()).run({"input": x})[0]
        np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)
