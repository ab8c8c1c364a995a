"""The one interface every backend implements, and what validate, serve, demo, doctor and bench see of it.

A backend is a name, a description, `availability()` (None, or why it can't run here) and
`open(model, options)`, which gives a Runner: the model's `inputs` and `outputs` (graph.TensorSignature),
`run(feeds)` on numpy arrays, and `yat_gemm_execution()`, which YatGemm kernel actually ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnx

from yatdeploy.graph import TensorSignature
from yatdeploy.progress import QUIET, Progress


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
class Backend(Protocol):
    name: str  # as the command line spells it (--backend NAME)
    description: str
    default_rank: int | None  # the order in which backends.default() tries it; None: never the default
    files: dict[str, str]  # the model files it opens, by suffix, and what each is (".plan": "a TensorRT engine")
    triton_platform: str  # the Triton platform and backend a served model reports
    triton_backend: str

    def availability(self) -> str | None:
        """None when it can run here, otherwise why not."""

    def open(self, model: str | Path | onnx.ModelProto, options: Options) -> Runner:
        """A runner for the model (a path; a backend may also take a ModelProto); a YatDeployError if it can't."""
