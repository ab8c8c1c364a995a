"""The reference model validation compares an export with, whatever framework it was trained in.

`ModelReference` is what validation (yatdeploy.validation) asks of it: the outputs on named numpy arrays, with the
Yat products the run computes; a float64 run of the same inputs (for the derived tolerances); the outputs' names;
where integer inputs (token ids) are valid; and what the export's YatGemm nodes are to be checked against.
`yatdeploy.reference.Reference` implements it for PyTorch, `yatdeploy.jax_reference.JaxReference` for Flax NNX.
`reference_for` picks the one a loaded model needs. This module imports neither framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


class LoadedSource(Protocol):
    """What a reference says of where its model came from (loading.LoadedModel, jax_loading.JaxLoadedModel)."""

    path: Path
    sha256: str
    format: str


@runtime_checkable
class ModelReference(Protocol):
    framework: str  # "PyTorch", "JAX": the reference as messages name it
    loaded: LoadedSource
    dtype: str  # the dtype the model runs in: the export's
    output_names: list[str]  # known once the model has run

    def run(self, arrays: Mapping[str, np.ndarray], what: str) -> list[np.ndarray]:
        """The outputs on named arrays (in the model's input order); an InputSpecError telling the user to check
        `what` when the model can't run them."""

    def run_counting(self, arrays: Mapping[str, np.ndarray], what: str) -> tuple[list[np.ndarray], int]:
        """`run`, and the Yat products (YatNMN calls, YatEmbed.attend calls...) it computed."""

    def float64_runs(self, cases: Sequence[Mapping[str, np.ndarray]],
                     expected: Sequence[list[np.ndarray]]) -> tuple[list[list[np.ndarray]] | None, str]:
        """The model run in float64 on every input, and what that was; None (and why) where it can't be."""

    def int_range(self) -> tuple[int, int]:
        """[low, high) of integer inputs' random values: the smallest embedding table, else the default."""

    def yat_gemm_check(self, nodes: int, calls: int) -> tuple[bool, str]:
        """Whether an export's `nodes` YatGemm nodes are right for the `calls` Yat products a run computed, and the
        check's line in the report."""


def is_reference(obj: object) -> bool:
    return isinstance(obj, ModelReference)


def reference_for(loaded: object, dtype: str | None = None) -> ModelReference:
    """The reference of a loaded model (loading.LoadedModel or jax_loading.JaxLoadedModel) in `dtype` (None: the
    model's own)."""
    from yatdeploy.jax_loading import JaxLoadedModel

    if isinstance(loaded, JaxLoadedModel):
        from yatdeploy.jax_reference import JaxReference

        return JaxReference.of(loaded, dtype)
    from yatdeploy.reference import Reference

    return Reference.of(loaded, dtype)

