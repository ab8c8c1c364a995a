"""The one interface every backend implements, and what validate, serve, demo, doctor, bench and build-engine see
of it.

A backend is a name, a description, `availability()` (None, or why it can't run here) and
`open(model, options)`, which gives a Runner: the model's `inputs` and `outputs` (graph.TensorSignature),
`run(feeds)` on numpy arrays, and `yat_gemm_execution()`, which YatGemm kernel actually ran. A backend that
builds engines has a `builder` (Builder: `build(onnx, output, BuildOptions) -> EngineInfo`, the engine file's
suffix, whether an engine of that suffix is one it built); one that does not has `builder = None`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnx

from yatdeploy.errors import YatDeployError, option
from yatdeploy.graph import TensorSignature
from yatdeploy.progress import QUIET, Progress

# (min, opt, max) batch: the profile an engine is built for when none is asked for (build-engine's defaults, and an
# engine a backend builds as it opens an ONNX model).
DEFAULT_BATCH_PROFILE = (1, 8, 64)


@dataclass(frozen=True)
class Options:
    """How to open a model; each backend reads the fields that concern it and ignores the rest."""

    intra_op_threads: int = 0  # 0: the runtime's default
    allow_spinning: bool = True  # False: pool threads sleep between runs (a server's event loop keeps its core)
    profile_to: Path | None = None  # a profiler's output prefix, so that yat_gemm_execution can count kernel runs
    engine: Path | None = None  # a prebuilt engine, for a backend that runs one
    batch_profile: tuple[int, int, int] | None = None  # (min, opt, max) batch, for a backend that builds for one
    progress: Progress = field(default=QUIET, compare=False)


DEFAULT_OPTIONS = Options()


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine (build-engine's options). Every builder takes the batch profile and `verbose` (its
    own log, where it has one); the other fields each concern some builders (Builder.options names those it
    reads), and a builder refuses one it does not read, naming itself (`refuse_others`)."""

    batch_profile: tuple[int, int, int] = DEFAULT_BATCH_PROFILE  # (min, opt, max) batch
    timing_cache: Path | None = None  # a timing cache, read if present and updated
    workspace_mb: int | None = None  # the builder's workspace limit; None: its default
    compute_capabilities: tuple[str, ...] = ()  # the GPUs to build for, as the user wrote them ("8.6", "sm_86")
    yat_plugin: bool = False  # YatGemm as yatdeploy's plugin, not the runtime's own layers
    verbose: bool = False
    progress: Progress = field(default=QUIET, compare=False)

    def refuse_others(self, backend: str, takes: Collection[str], why: str | None = None) -> None:
        """A YatDeployError naming `backend` when an option it does not read (not in `takes`) is given; `why`: the
        hint (what the backend does instead)."""
        universal = ("batch_profile", "verbose", "progress")
        given = [f.name for f in fields(self)
                 if f.name not in universal and f.name not in takes and getattr(self, f.name) != f.default]
        if given:
            named = " or ".join(option(name, True if isinstance(getattr(self, name), bool) else None)
                                for name in given)
            raise YatDeployError(f"the {backend} backend does not take {named}", why)


@dataclass(frozen=True)
class EngineInfo:
    """An engine a builder wrote (or read back): what build-engine says of it and a repository entry is made of."""

    path: Path
    backend: str  # the backend that runs it
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    batch_profile: tuple[int, int, int]  # (min, opt, max) batch it takes
    files: tuple[Path, ...]  # the engine, then what goes with it (a signature beside it), named after the engine
    summary: str  # one line: how YatGemm runs, the batches, the runtime and what it was built for
    seconds: float = 0.0  # the build's; 0 for an engine read back
    notes: tuple[str, ...] = ()  # what the build changed in the model to build it (a default attribute filled in)


@dataclass(frozen=True)
class YatGemmExecution:
    """Which YatGemm implementation ran, as far as the backend can tell."""

    kernel: str  # "custom-op library kernel", "ONNX function", "TensorRT plugin", ...
    detail: str  # one line for a report
    kernel_runs: dict[str, int] = field(default_factory=dict)  # a profiler's YatGemm kernel runs per provider
    problem: str | None = None  # the kernel meant to run did not (validate fails the backend)


@runtime_checkable
class Runner(Protocol):
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    max_batch: int | None  # the largest batch it takes (an engine's profile), None: no limit

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs, in `outputs` order; an OnnxModelError when the model can't run on these feeds."""

    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> YatGemmExecution:
        """Which YatGemm ran; `nodes` YatGemm nodes over `runs` runs were expected (0: don't check)."""


@runtime_checkable
class Builder(Protocol):
    """What a backend that builds engines has: its `builder` attribute."""

    suffix: str  # the engine file's suffix (one of its backend's `files`)
    options: Mapping[str, str]  # the BuildOptions fields it reads besides the universal ones, each with its default
    instance_kind: str  # Triton's instance_group kind for its engines' config.pbtxt (KIND_GPU, KIND_CPU)
    repository_refusal: str | None  # why its engines can't go in a Triton repository; None: they can

    def build(self, onnx_path: Path, output: Path, options: BuildOptions) -> EngineInfo:
        """The engine at `output` (and what goes with it) from the ONNX model; a YatDeployError naming what is
        wrong (the model, the profile, an option it does not take) before anything is written."""

    def read(self, engine: Path) -> EngineInfo:
        """An engine it built, described; a YatDeployError when it is not one."""

    def owns(self, engine: Path) -> bool:
        """Whether the file at `engine` (of its suffix) is an engine it built, as the engine says."""


@runtime_checkable
class Backend(Protocol):
    name: str  # as the command line spells it (--backend NAME)
    description: str
    default_rank: int | None  # the order in which backends.default() tries it; None: never the default
    files: dict[str, str]  # the model files it opens, by suffix, and what each is (".plan": "a TensorRT engine")
    # The Triton platform and backend a served model reports, and a repository entry of the file it runs as it is
    # (its engine for a builder, otherwise its `files`) is written with and read as.
    triton_platform: str
    triton_backend: str
    builder: Builder | None  # None: it builds no engines

    def availability(self) -> str | None:
        """None when it can run here, otherwise why not."""

    def open(self, model: str | Path | onnx.ModelProto, options: Options) -> Runner:
        """A runner for the model (a path; a backend may also take a ModelProto); a YatDeployError if it can't."""
