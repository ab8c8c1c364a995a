"""Stage 1, load, for JAX: a Flax NNX module and its weights, as export and validation take it.

A Flax NNX model is code (the module's class) plus its state, so it is always built by the caller: handed to the
Python API as a live `nnx.Module`, or built by `--arch module:build` (yatdeploy.arch), whose module is then given
the weights of a checkpoint, if one is named, in one of the ways NNX users save them:
- an orbax checkpoint folder: `orbax.checkpoint.StandardCheckpointer().save(folder, nnx.state(model))`;
- a msgpack file of the state's pure dict: `flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict())`;
- a pickle of that pure dict (`pickle.dump(nnx.state(model).to_pure_dict(), f)`), only with `trust_pickle`: a pickle
  runs code when it is read.
No code from a checkpoint runs otherwise. The source format recorded in an export's metadata is "flax-nnx".
This module imports no torch.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yatdeploy.errors import ModelLoadError, first_line, option
from yatdeploy.files import file_sha256

FLAX_NNX = "flax-nnx"  # the source format an export records
# How the weights were read, for messages and notes.
AS_BUILT = "as built"
ORBAX = "orbax checkpoint"
MSGPACK = "msgpack of the state's pure dict"
PICKLE = "pickle of the state's pure dict"


@dataclass
class JaxLoadedModel:
    """A Flax NNX model as export and validation take it: `module` holds the weights."""

    module: object  # a flax.nnx.Module
    path: Path  # the checkpoint, or <arch> / <ClassName> for a model built in code
    sha256: str
    checkpoint: str  # how the weights were read: AS_BUILT, ORBAX, MSGPACK or PICKLE
    format: str = FLAX_NNX
    program: None = None  # no compiled program: the exporter traces the module

    @property
    def layers_are_identifiable(self) -> bool:
        return True  # nmn.nnx layers are live Python objects


def is_nnx_module(obj: object) -> bool:
    """Whether `obj` is a flax.nnx.Module (without importing flax: one can only exist once flax is imported)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(obj, nnx.Module)


def state_sha256(module: object) -> str:
    """A digest of the module's state (paths, dtypes, shapes and values), the counterpart of a file's sha256."""
    from flax import nnx

    digest = hashlib.sha256()
    for path, value in sorted(nnx.to_flat_state(nnx.state(module)), key=lambda item: str(item[0])):
        array = np.asarray(value.get_value() if hasattr(value, "get_value") else value)
        digest.update(f"{'/'.join(map(str, path))}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def from_module(module: object, name: str | None = None) -> JaxLoadedModel:
    """A Flax NNX module built in this process, as it is (put in eval mode: dropout off)."""
    if not is_nnx_module(module):
        raise ModelLoadError(f"expected a flax.nnx.Module, got {type(module).__name__}")
    _eval(module)
    return JaxLoadedModel(module, Path(f"<{name or type(module).__name__}>"), state_sha256(module), AS_BUILT)


def load_checkpoint(module: object, checkpoint: str | Path | None, arch: str, *,
                    trust_pickle: bool = False) -> JaxLoadedModel:
    """The module `arch` built, given the weights of `checkpoint` (an orbax folder, a msgpack or, trusted, a pickle
    of `nnx.state(model).to_pure_dict()`); None: the module as built."""
    if checkpoint is None:
        return from_module(module, arch)
    from flax import nnx

    path = Path(checkpoint)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    graphdef, state = nnx.split(module)
    if path.is_dir():
        restored, how, digest = _orbax(path, state), ORBAX, None
    else:
        pure, how = _pure_dict(path, trust_pickle)
        restored, digest = _with_pure_dict(state, pure, path, arch), file_sha256(path)
    module = nnx.merge(graphdef, restored)
    _eval(module)
    return JaxLoadedModel(module, path, digest or state_sha256(module), how)


def _eval(module: object) -> None:
    eval_mode = getattr(module, "eval", None)
    if callable(eval_mode):
        eval_mode()  # nnx.Module.eval(): deterministic dropout, batch statistics in use


def _orbax(path: Path, state: object) -> object:
    import orbax.checkpoint as ocp

    try:
        return ocp.StandardCheckpointer().restore(path.resolve(), state)
    except Exception as exc:  # orbax raises many kinds (missing metadata, a tree that does not fit, ...)
        raise ModelLoadError(
            f"{path}: not an orbax checkpoint of this model's state ({first_line(exc)})",
            "save it with orbax.checkpoint.StandardCheckpointer().save(folder, nnx.state(model)) from the model "
            f"{option('arch')} builds",
        ) from exc


def _pure_dict(path: Path, trust_pickle: bool) -> tuple[dict, str]:
    from flax import serialization

    data = path.read_bytes()
    try:
        restored = serialization.msgpack_restore(data)
    except Exception:  # not msgpack (msgpack's errors have no common base)
        restored = None
    if isinstance(restored, dict):
        return restored, MSGPACK
    if data[:1] == b"\x80":
        if not trust_pickle:
            raise ModelLoadError(
                f"{path}: a pickle, whose code runs when it is read",
                f"if you trust this file, pass {option('trust_pickle', True)}; otherwise save the weights with "
                "flax.serialization.msgpack_serialize(nnx.state(model).to_pure_dict()) or an orbax checkpoint",
            )
        try:
            with path.open("rb") as handle:
                restored = pickle.load(handle)  # noqa: S301 - the user vouched for the file
        except Exception as exc:
            raise ModelLoadError(f"{path}: could not be unpickled: {first_line(exc)}") from exc
        to_pure = getattr(restored, "to_pure_dict", None)
        restored = to_pure() if callable(to_pure) else restored
        if isinstance(restored, dict):
            return restored, PICKLE
    raise ModelLoadError(
        f"{path}: not a Flax NNX checkpoint yatdeploy reads",
        "save nnx.state(model) as an orbax checkpoint folder, or its pure dict with flax.serialization."
        "msgpack_serialize(nnx.state(model).to_pure_dict())",
    )


def _with_pure_dict(state: object, pure: dict, path: Path, arch: str) -> object:
    """`state` with the values of `pure`, refused naming what does not fit the architecture."""
    from flax import nnx

    import jax

    expected = {tuple(map(str, p)): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(
        state.to_pure_dict())[0] for p in [[getattr(k, "key", getattr(k, "idx", k)) for k in p]]}
    given = {tuple(map(str, p)): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]
             for p in [[getattr(k, "key", getattr(k, "idx", k)) for k in p]]}
    problems = []
    if missing := sorted("/".join(k) for k in set(expected) - set(given)):
        problems.append("missing: " + ", ".join(missing))
    if unexpected := sorted("/".join(k) for k in set(given) - set(expected)):
        problems.append("unexpected: " + ", ".join(unexpected))
    if mismatched := [f"{'/'.join(k)} (file {given[k]}, {option('arch')} {expected[k]})"
                      for k in sorted(set(given) & set(expected)) if given[k] != expected[k]]:
        problems.append("shape mismatch: " + ", ".join(mismatched))
    if problems:
        raise ModelLoadError(f"{path}: the state does not fit {option('arch')} {arch}: " + "; ".join(problems))
    nnx.replace_by_pure_dict(state, pure)
    return state
