from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from yatdeploy.progress import QUIET


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
