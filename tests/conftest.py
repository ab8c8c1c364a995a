from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

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
