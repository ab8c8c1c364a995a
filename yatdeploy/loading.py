"""Stage 1, load: read a model file into an eval-mode torch module without running its code.

Formats:
- a whole module saved with torch.save(model): unpickled with torch.load(weights_only=True) and an
  allowlist of torch.nn and nmn layer classes, so no code from the file runs;
- a state_dict (torch.save(model.state_dict())) with `arch` ("module:callable") building the module;
- a torch.export program (torch.export.save, .pt2) whose weights, constants and sample inputs are
  plain tensors: anything torch.export.load would unpickle in full (tensor subclasses, custom or opaque
  objects) or load as native code (AOTInductor libraries) is refused;
- a TorchScript archive (torch.jit.save), whose code runs when the model runs.
Everything refused loads when the user vouches for the file with `trust_pickle`. Every zip archive's
CRCs are checked first, so a flipped byte is an error rather than a silently different model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import os
import pickle
import sys
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from yatdeploy.arch import build, importable_cwd
from yatdeploy.errors import ModelLoadError, option
from yatdeploy.files import file_sha256

PICKLED_MODULE = "pickled module"
STATE_DICT = "state_dict + architecture"
TORCHSCRIPT = "TorchScript archive"
EXPORTED_PROGRAM = "torch.export program"
IN_MEMORY = "torch.nn.Module"  # a module handed to the Python API, not read from a file

_WAYS_ON = (
    f"if you trust this file, pass {option('trust_pickle', True)}; otherwise save model.state_dict() and "
    f"pass {option('arch')} module:callable naming a function that builds the model"
)
# torch.export archive entries that torch.export.load turns into Python objects with full unpickling.
_PT2_OBJECT_PREFIXES = {"custom_obj_": "a custom object (TorchScript class)", "opaque_obj_": "an opaque object"}


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
        return self.format in (PICKLED_MODULE, STATE_DICT, IN_MEMORY)


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
    names = _checked_zip_names(path)
    if any(name.endswith("archive_format") for name in names):
        return EXPORTED_PROGRAM
    if any("/code/" in name for name in names):
        return TORCHSCRIPT
    if any(name.endswith("data.pkl") for name in names):
        return PICKLED_MODULE
    raise ModelLoadError(
        f"{path}: a zip archive but not one written by torch.save, torch.jit.save or torch.export.save"
    )


def _checked_zip_names(path: Path) -> list[str]:
    """The archive's entry names, after every entry's CRC-32 has been checked.

    PyTorch's own zip reader skips the CRCs, so without this a damaged file loads as a different model.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt archive ({exc})", "re-save the model") from exc
    if damaged is not None:
        raise ModelLoadError(f"{path}: corrupt archive: entry {damaged} fails its CRC-32 check (the file was "
                             "damaged after it was written)", "re-save or re-copy the model")
    return names


def _pt2_code_entries(path: Path, names: list[str]) -> list[str]:
    """What torch.export.load would unpickle in full, or load as native code, from this archive."""
    from torch.export.pt2_archive import constants as pt2

    found: list[str] = []
    with zipfile.ZipFile(path) as archive:
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name  # below the archive's root folder
            if inner.startswith(pt2.AOTINDUCTOR_DIR) and not name.endswith("/"):
                found.append(f"{name} (AOTInductor compiled code)")
            elif inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and inner.endswith("_config.json"):
                found += _pickled_payloads(name, archive.read(name), path)
            elif inner.endswith(".pt") and inner.startswith(
                (pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR, pt2.SAMPLE_INPUTS_DIR)
            ):
                if not _loads_weights_only(archive.read(name)):
                    found.append(f"{name} (a pickle that needs full unpickling)")
    return found


def _pickled_payloads(name: str, raw: bytes, path: Path) -> list[str]:
    try:
        config = json.loads(raw)["config"]
        entries = [(str(fqn), bool(meta.get("use_pickle")), str(meta.get("path_name", "")))
                   for fqn, meta in config.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: corrupt torch.export archive ({name} is not a payload config: {exc})") from exc
    found = []
    for fqn, use_pickle, path_name in entries:
        kind = "weight" if "weights" in name.rsplit("/", 1)[-1] else "constant"
        if use_pickle:
            found.append(f"{kind} '{fqn}' (pickled: a tensor subclass or other object)")
        for prefix, what in _PT2_OBJECT_PREFIXES.items():
            if path_name.startswith(prefix):
                found.append(f"{kind} '{fqn}' ({what})")
    return found


def _loads_weights_only(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # any failure means the full unpickler would be needed, or the entry is broken
        return False
    return True


@contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """Make every torch.load inside weights-only, even where the caller asks for weights_only=False.

    torch.export.load passes weights_only=False for some entries; the entries that need it are refused
    before loading (_pt2_code_entries), and this keeps any path missed there from running the file's code.
    """
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _load_exported_program(path: Path, trust_pickle: bool) -> torch.export.ExportedProgram:
    if not trust_pickle:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        found = _pt2_code_entries(path, names)
        if found:
            raise ModelLoadError(
                f"{path}: the torch.export archive holds {'; '.join(found[:5])}"
                + (f" and {len(found) - 5} more" if len(found) > 5 else "")
                + "; loading it would run code from the file",
                _WAYS_ON,
            )
    try:
        if trust_pickle:
            return torch.export.load(str(path))
        with _weights_only_unpickling():
            return torch.export.load(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path}: corrupt torch.export archive ({_first_line(str(exc))})") from exc


def _unpickle(path: Path, trust_pickle: bool) -> object:
    if trust_pickle:
        importable_cwd()
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # the file's own code may raise anything
            in_main = [name.removeprefix("__main__.") for name in _unsafe_globals(path) if name.startswith("__main__.")]
            if in_main:
                raise ModelLoadError(
                    f"{path}: the model's class {', '.join(in_main)} was defined in the training script itself "
                    "(its __main__), which is not importable here",
                    f"move the class into a module (e.g. models.py beside the script), import it from there and "
                    f"save again; or save model.state_dict() and pass {option('arch')} models:build_function",
                ) from exc
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
    """Build a torch module from 'package.module:callable' (the current directory is importable)."""
    return _torch_module(build(spec), spec)


def _torch_module(built: object, spec: str) -> nn.Module:
    if not isinstance(built, nn.Module):
        attr = spec.partition(":")[2]
        raise ModelLoadError(f"{option('arch')} {spec!r}: {attr}() returned {type(built).__name__}, not a "
                             "torch.nn.Module (or a flax.nnx.Module)")
    return built


# Prefixes training wrappers add to every key: DistributedDataParallel / DataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped(state: Mapping[str, object], expected: Mapping[str, object]) -> Mapping[str, object]:
    """`state` without the wrapper prefixes every one of its keys carries and the architecture's keys don't."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


# Keys under which training checkpoints commonly keep the model's state_dict.
_CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "net", "module", "ema")


def _state_dict_in(obj: Mapping[str, object], path: Path, state_key: str | None) -> object:
    """The state_dict (or module) a file holds: the mapping itself, or a training checkpoint's entry."""
    if state_key is not None:
        if state_key not in obj:
            raise ModelLoadError(f"{path}: no key {state_key!r} (its keys: {', '.join(map(str, obj)) or 'none'})")
        return obj[state_key]
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    candidates = [k for k, v in obj.items() if isinstance(v, nn.Module) or (
        isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values()))]
    named = [k for k in candidates if k in _CHECKPOINT_KEYS] or candidates
    listing = ", ".join(f"{k!r}" for k in obj)
    raise ModelLoadError(
        f"{path}: a training checkpoint (keys {listing}), not a state_dict",
        f"pass {option('state_key')} NAME for the entry holding the model's weights"
        + (f", e.g. {option('state_key')} {named[0]}" if named else ""),
    )


def _load_state_dict(module: nn.Module, state: Mapping[str, object], path: Path, arch: str) -> None:
    expected = module.state_dict()
    state = _unwrapped(state, expected)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key} (file {tuple(state[key].shape)}, {option('arch')} {tuple(expected[key].shape)})"
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
        raise ModelLoadError(f"{path}: the state_dict does not fit {option('arch')} {arch}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def module_sha256(module: nn.Module) -> str:
    """A digest of the module's state (names, dtypes, shapes and values of its parameters and buffers), the
    in-memory counterpart of a model file's sha256."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def from_module(module: nn.Module) -> LoadedModel:
    """A module built in this process, as loading would give it (put in eval mode, as a file's model is)."""
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"expected a torch.nn.Module, got {type(module).__name__}")
    module.eval()
    return LoadedModel(module, Path(f"<{type(module).__name__}>"), IN_MEMORY, module_sha256(module))


def load_model(path: str | Path, *, arch: str | None = None, trust_pickle: bool = False,
               state_key: str | None = None, built: object = None) -> LoadedModel:
    """`state_key`: in a training checkpoint (a dict of the model's state_dict, the optimizer's, ...), the
    entry holding the model (a state_dict, or a whole module). `built`: what `arch` built, when the caller has
    already called it (yatdeploy.api.load, which tells the framework from it)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a file")
    fmt = detect_format(path)
    program = None
    digest = file_sha256(path)
    if fmt == TORCHSCRIPT:
        if not trust_pickle:
            raise ModelLoadError(
                f"{path}: a TorchScript archive, whose code runs when the model runs",
                f"if you trust this file, pass {option('trust_pickle', True)}; otherwise save "
                f"model.state_dict() and pass {option('arch')} module:callable, or save the model with "
                "torch.save(model) or torch.export.save",
            )
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"{path}: corrupt TorchScript archive ({_first_line(str(exc))})") from exc
    elif fmt == EXPORTED_PROGRAM:
        program = _load_exported_program(path, trust_pickle)
        try:
            module = program.module()
        except Exception as exc:
            raise ModelLoadError(f"{path}: corrupt torch.export archive ({_first_line(str(exc))})") from exc
    else:
        obj = _unpickle(path, trust_pickle)
        if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
            obj = _state_dict_in(obj, path, state_key)
        elif state_key is not None:
            raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a dict: {option('state_key')} is for "
                                 "training checkpoints")
        if isinstance(obj, nn.Module):
            if arch is not None:
                raise ModelLoadError(f"{path}: holds a whole module; {option('arch')} is only for state_dict files")
            module = obj
        elif isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
            if arch is None:
                raise ModelLoadError(
                    f"{path}: holds a state_dict (weights only), not a model",
                    f"pass {option('arch')} module:callable naming a function that builds the model",
                )
            module = resolve_arch(arch) if built is None else _torch_module(built, arch)
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
