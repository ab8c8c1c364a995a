"""Building a model from `--arch module:callable`, whatever its framework.

The callable is imported (the current directory importable, as `python train.py` had it) and called once; what it
returns decides the framework: a torch.nn.Module loads through yatdeploy.loading, a flax.nnx.Module through
yatdeploy.jax_loading (yatdeploy.api.load). This module imports neither framework.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from yatdeploy.errors import ModelLoadError, option


def importable_cwd() -> None:
    """Make modules in the current directory importable, as `python train.py` had them (the console
    script's sys.path starts at its own folder)."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def build(spec: str) -> object:
    """What 'package.module:callable' returns when called with no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"{option('arch')} {spec!r}: expected 'module:callable', e.g. 'mypkg.models:build_mlp'")
    importable_cwd()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"{option('arch')} {spec!r}: cannot import {module_name}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"{option('arch')} {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"{option('arch')} {spec!r}: {attr} is not callable")
    return target()
