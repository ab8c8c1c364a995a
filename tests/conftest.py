from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from yatdeploy.loading import LoadedModel
from yatdeploy.progress import QUIET

# Triton reads TRITON_INTERPRET when it decorates a kernel, so the first test module that imports it decides
# for the whole session. Without a CUDA GPU only the interpreter can run the kernels: set it before any test
# module is imported. The ahead-of-time compiles run in subprocesses without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _quiet_libraries():
    warnings.filterwarnings("ignore", module="torch")
    logging.getLogger("torch").setLevel(logging.ERROR)
    yield


@pytest.fixture
def progress():
    return QUIET


@pytest.fixture
def save_whole(tmp_path: Path):
    """Save a module with torch.save(model) under tmp_path and return the path."""

    def _save(model: nn.Module, name: str = "model.pt") -> Path:
        path = tmp_path / name
        torch.save(model, path)
        return path

    return _save


@dataclass(frozen=True)
class ExportedModel:
    """tests.model_zoo.yat_mlp saved whole and exported once per session with ExportOptions((1, 16)).

    Shared by every test that asks for it: read the files, never change them; a test that changes the ONNX
    changes a copy (onnx_copy)."""

    source: Path  # the .pt
    onnx: Path
    loaded: LoadedModel

    def onnx_copy(self, directory: Path, name: str = "m.onnx") -> Path:
        path = directory / name
        shutil.copy(self.onnx, path)
        return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def exported_mlp(tmp_path_factory) -> ExportedModel:
    from tests.model_zoo import yat_mlp
    from yatdeploy.exporting import ExportOptions, export_model
    from yatdeploy.loading import load_model

    folder = tmp_path_factory.mktemp("exported_mlp")
    source = folder / "mlp.pt"
    torch.save(yat_mlp(), source)
    loaded = load_model(source)
    export_model(loaded, folder / "mlp.onnx", ExportOptions((1, 16)), QUIET)
    files = {path: _digest(path) for path in (source, folder / "mlp.onnx")}
    yield ExportedModel(source=source, onnx=folder / "mlp.onnx", loaded=loaded)
    changed = [path.name for path, digest in files.items() if _digest(path) != digest]
    assert not changed, f"a test changed the session's shared export: {changed}"


# The fast lane (`make check`: pytest -m "not slow") leaves out the tests marked slow. A test or a module says so
# itself (@pytest.mark.slow, pytestmark), except where a fixture decides: a fixture named `server` or `*_server`
# starts `yatdeploy serve` (or another server) in a subprocess, so every test that uses one, even through another
# fixture, is slow however quick its own body. Name a fixture that way when it starts a server, and only then.
def _starts_a_server(fixture: str) -> bool:
    return fixture == "server" or fixture.endswith("_server")


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(_starts_a_server(name) for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
