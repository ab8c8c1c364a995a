"""Stage 1, load: read a model file into an eval-mode torch module without running its code.

Formats:
- a whole module saved with torch.save(model): unpickled with torch.load(weights_only=True) and an
  allowlist of torch.nn and nmn layer classes, so no code from the file runs;
- a state_dict (torch.save(model.state_dict())) with --arch module:callable building the module;
- a TorchScript archive (torch.jit.save) and a torch.export program (torch.export.save, .pt2).
Other pickles are refused unless the user vouches for the file with --trust-pickle.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import pickle
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from yatdeploy.errors import ModelLoadError

PICKLED_MODULE = "pickled module"
STATE_DICT = "state_dict + --arch"
TORCHSCRIPT = "TorchScript archive"
EXPORTED_PROGRAM = "torch.export program"

_WAYS_ON = (
    "if you trust this file, pass --trust-pickle; otherwise save model.state_dict() and pass "
    "--arch module:callable naming a function that builds the model"
)


@dataclass
class LoadedModel:
    module: nn.Module
    path: Path
    format: str
    sha256: str
    # Set for torch.export archives: the exporter takes the program itself.
    program: torch.export.ExportedProgram | None = None

    @property
    def layers_are_identifiable(self) -> bool:
        """Whether nmn layers are live Python objects whose options can be read (not compiled archives)."""
        return self.format in (PICKLED_MODULE, STATE_DICT)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@functools.cache
def layer_allowlist() -> tuple[type, ...]:
    """Classes a whole-module pickle may name: torch.nn's and nmn.torch's modules, and what they hold."""
    import nmn.torch as nmn_torch

    classes: set[type] = {slice, set, torch.Size, torch.device}
    for package in (torch.nn.modules, nmn_torch):
        for name in list(sys.modules):
            if name == package.__name__ or name.startswith(package.__name__ + "."):
                for _, obj in inspect.getmembers(sys.modules[name], inspect.isclass):
                    if issubclass(obj, nn.Module) and obj.__module__.startswith(package.__name__.split(".")[0]):
                        classes.add(obj)
    return tuple(sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"))


def _import_nmn_layers() -> None:
    # Importing the subpackages registers every layer module in sys.modules for the allowlist.
    import nmn.torch  # noqa: F401
    import nmn.torch.attention  # noqa: F401
    import nmn.torch.layers  # noqa: F401


def detect_format(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        # torch.save's legacy (non-zip) format starts with a pickle protocol marker.
        with path.open("rb") as handle:
            head = handle.read(2)
        if len(head) == 2 and head[0] == 0x80:
            return PICKLED_MODULE
        raise ModelLoadError(
            f"{path}: not a PyTorch model file (neither a torch.save/torch.jit.save zip archive nor a pickle)",
            "expected a file written by torch.save, torch.jit.save or torch.export.save",
        )
    try:
        names = zipfile.ZipFile(path).namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path}: corrupt archive ({exc})", "re-save the model") from exc
    if any(name.endswith("archive_format") for name in names):
        return EXPORTED_PROGRAM
    if any("/code/" in name for name in names):
        return TORCHSCRIPT
    if any(name.endswith("data.pkl") for name in names):
        return PICKLED_MODULE
    raise ModelLoadError(
        f"{path}: a zip archive but not one written by torch.save, torch.jit.save or torch.export.save"
    )


def _unpickle(path: Path, trust_pickle: bool) -> object:
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # the file's own code may raise anything
            raise ModelLoadError(f"{path}: could not be unpickled: {exc}") from exc
    _import_nmn_layers()
    try:
        with torch.serialization.safe_globals(list(layer_allowlist())):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "persistent_load" in text:
            raise ModelLoadError(
                f"{path}: a whole module in torch.save's legacy (non-zip) format, which weights-only "
                "loading can't read",
                _WAYS_ON,
            ) from exc
        if "Unsupported global" in text or "weights_only" in text.lower() and "global" in text.lower():
            offending = _unsafe_globals(path)
            named = ", ".join(offending) if offending else "a class outside torch.nn and nmn"
            raise ModelLoadError(
                f"{path}: the pickle names {named}, which is not a torch.nn or nmn layer; "
                "loading it would run code from the file",
                _WAYS_ON,
            ) from exc
        raise ModelLoadError(f"{path}: corrupt or truncated model file ({_first_line(text)})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated model file ({_first_line(str(exc))})") from exc


def _unsafe_globals(path: Path) -> list[str]:
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in layer_allowlist()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a corrupt file: the caller's message stands on its own
        return []
    return [name for name in names if name not in allowed]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no detail"


def resolve_arch(spec: str) -> nn.Module:
    """Build a module from 'package.module:callable' (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"--arch {spec!r}: expected 'module:callable', e.g. 'mypkg.models:build_mlp'")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"--arch {spec!r}: cannot import {module_name}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelLoadError(f"--arch {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelLoadError(f"--arch {spec!r}: {attr} is not callable")
    built = target()
    if not isinstance(built, nn.Module):
        raise ModelLoadError(f"--arch {spec!r}: {attr}() returned {type(built).__name__}, not a torch.nn.Module")
    return built


def _load_state_dict(module: nn.Module, state: Mapping[str, object], path: Path, arch: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, --arch {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state))
        if isinstance(state[key], torch.Tensor) and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatch: " + ", ".join(mismatched))
    if problems:
        raise ModelLoadError(f"{path}: the state_dict does not fit --arch {arch}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    fmt = detect_format(path)
    program = None
    digest = file_sha256(path)
    if fmt == TORCHSCRIPT:
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path}: corrupt TorchScript archive ({_first_line(str(exc))})") from exc
    elif fmt == EXPORTED_PROGRAM:
        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as exc:
            raise ModelLoadError(f"{path}: corrupt torch.export archive ({_first_line(str(exc))})") from exc
    else:
        obj = _unpickle(path, trust_pickle)
        if isinstance(obj, nn.Module):
            if arch is not None:
                raise ModelLoadError(f"{path}: holds a whole module; --arch is only for state_dict files")
            module = obj
        elif isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
            if arch is None:
                raise ModelLoadError(
                    f"{path}: holds a state_dict (weights only), not a model",
                    "pass --arch module:callable naming a function that builds the model",
                )
            module = resolve_arch(arch)
            _load_state_dict(module, obj, path, arch)
            fmt = STATE_DICT
        else:
            raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a torch.nn.Module or a state_dict")
    if not isinstance(module, (nn.Module, torch.jit.ScriptModule)):
        raise ModelLoadError(f"{path}: holds a {type(module).__name__}, not a torch.nn.Module")
    # ExportedProgram.module() returns a GraphModule without .eval() semantics in 2.13; call what exists.
    if hasattr(module, "eval"):
        try:
            module.eval()
        except NotImplementedError:
            pass
    return LoadedModel(module=module, path=path, format=fmt, sha256=digest, program=program)
