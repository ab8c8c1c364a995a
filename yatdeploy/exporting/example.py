"""Stage 2, reference: the PyTorch model in the export dtype (the settled `Reference`) run once, on the example.

The run checks that the model takes the settled inputs, names its outputs, and counts the Yat products it
computes (the YatGemm nodes the export must have). The example is the caller's tensors, else random ones of the
specs' example shapes, integers within the caller's ranges or the model's embedding tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from yatdeploy.cases import random_inputs
from yatdeploy.exporting.settle import SettledInputs
from yatdeploy.inputs import INTEGER_TYPES
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference, to_torch, yat_calls


@dataclass(frozen=True)
class ExampleRun:
    reference: Reference  # the model as exported and validated; its output_names are known now
    examples: tuple[torch.Tensor, ...]  # one per input, positional
    calls: dict[str, int]  # the Yat products the run computed, per layer path (reference.yat_calls)


def run_example(settled: SettledInputs, progress: Progress = QUIET, seed: int = 0) -> ExampleRun:
    reference = settled.reference
    examples = settled.examples
    if examples is None:
        integers = [s.name for s in settled.specs if s.dtype in INTEGER_TYPES]
        model_range = reference.int_range() if integers else None
        ranges = {name: settled.int_ranges.get(name) or model_range for name in integers}
        arrays = random_inputs(settled.specs, np.random.default_rng(seed), ranges)
        examples = tuple(to_torch(a) for a in arrays.values())
    with progress.step("checking the model runs on the example input"):
        calls = yat_calls(reference.module, lambda: reference.run_tensors(examples, settled.declared_by))
    return ExampleRun(reference, examples, calls)
