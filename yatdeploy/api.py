"""yatdeploy's Python API, `yatdeploy.export` and `yatdeploy.validate`: what the CLI's commands run.

    import yatdeploy
    result = yatdeploy.export(model, torch.randn(1, 784), "model.onnx")     # validates too
    print(result.report.passed)
    lm = yatdeploy.export(lm_model, torch.zeros(1, 32, dtype=torch.long), "lm.onnx",
                          dynamic_axes={0: "batch", 1: "seq"})
    report = yatdeploy.validate("model.onnx", "model.pt", batches=(1, 64))
    engine = yatdeploy.api.build_engine("model.onnx", backend="tensorrt-rtx").engine  # yatdeploy.build

`model` is a torch.nn.Module built in this process (put in eval mode) or a model file, loaded as
`yatdeploy export` loads one (`arch`, `trust_pickle`). Errors are yatdeploy.errors.YatDeployError,
whose message says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from torch import nn

from yatdeploy.build import EngineBuild, build_engine
from yatdeploy.cases import DEFAULT_BATCHES
from yatdeploy.errors import InputSpecError
from yatdeploy.exporting import OPSET, ExportOptions, ExportResult, export_model
from yatdeploy.exporting.settle import DynamicAxes
from yatdeploy.inputs import InputSpec, parse_input
from yatdeploy.loading import LoadedModel, from_module, load_model
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference
from yatdeploy.validation import Tolerance, ValidationReport
from yatdeploy.validation import validate as _validate

__all__ = ["EngineBuild", "ExportResult", "Tolerance", "ValidationReport", "build_engine", "export", "load",
           "validate"]


def load(model: nn.Module | str | Path | LoadedModel, *, arch: str | None = None, trust_pickle: bool = False,
         state_key: str | None = None) -> LoadedModel:
    """`model` as export and validation take it: a module as it is, a file through yatdeploy.loading
    (`arch` builds the module for a state_dict; `state_key` picks a training checkpoint's entry)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return from_module(model)
    return load_model(model, arch=arch, trust_pickle=trust_pickle, state_key=state_key)


ExampleInputs = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[int], str, Sequence[Union[InputSpec, str]]]


def export(
    model: nn.Module | str | Path | LoadedModel,
    example_inputs: ExampleInputs,
    path: str | Path,
    *,
    dynamic_axes: DynamicAxes | None = None,
    dtype: str | None = None,
    opset: int = OPSET,
    validate: bool = True,
    int_ranges: Mapping[str, tuple[int, int]] | Sequence[str] | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    state_key: str | None = None,
    tolerance: Tolerance | None = None,
    input_files: Sequence[str | Path] = (),
    seed: int = 0,
    progress: Progress = QUIET,
) -> ExportResult:
    """Export `model` to the ONNX file `path` and, unless `validate` is False, validate it against PyTorch on
    every backend available (`result.report`; the file is written even when validation fails).

    `example_inputs`: a tensor or a tuple of tensors, passed to the model as its positional inputs (named
    `input`, or after forward's parameters when there are several); `dynamic_axes`: `{dim: label}` for one
    input, or one such dict per input; by default the first dim of every input is dynamic, labelled "batch".
    Also taken: a shape `(1, 784)` or its text "1,784" (one float input in the export dtype, batch dynamic
    unless `dynamic_axes={}`), or input specs (`inputs.InputSpec` or "ids:int64[batch=1,seq=32]" strings).
    `dtype`: export in this dtype ("float32", "float16", "bfloat16", "float64"), default the model's. `opset`:
    the ONNX opset (18 to 22, default 20). `int_ranges`: [low, high) of integer inputs' random values, by name
    (or "ids=0:256" strings). `tolerance`, `input_files`, `seed`: as for `validate`. The stages, in order:
    yatdeploy.exporting.
    """
    loaded = load(model, arch=arch, trust_pickle=trust_pickle, state_key=state_key)
    declared = {"dtype": dtype, "int_ranges": int_ranges or {}, "opset": opset}
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    items = [] if isinstance(example_inputs, str) else list(example_inputs)
    if isinstance(example_inputs, str) or (items and all(isinstance(d, int) for d in items)):  # a shape, or its text
        options = ExportOptions(example_inputs if isinstance(example_inputs, str) else tuple(items),
                                dynamic_batch=dynamic_axes != {}, **declared)
    elif items and all(isinstance(t, torch.Tensor) for t in items):
        options = ExportOptions(examples=tuple(items), dynamic_axes=dynamic_axes, **declared)
    elif items and all(isinstance(s, (InputSpec, str)) for s in items):
        options = ExportOptions(inputs=tuple(items), dynamic_batch=dynamic_axes != {}, **declared)
    else:
        raise InputSpecError("example_inputs: expected a tensor, a tuple of tensors, a shape or input specs")
    result = export_model(loaded, path, options, progress)
    if validate:
        result.report = _validate(result.path, result.reference, input_files=input_files, tolerance=tolerance,
                                  int_ranges=result.int_ranges, seed=seed, progress=progress)
    return result


def validate(
    onnx_path: str | Path,
    model: nn.Module | str | Path | LoadedModel | Reference,
    *,
    input_shape: Sequence[int] | None = None,
    inputs: Sequence[InputSpec | str] | None = None,
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
    input_files: Sequence[str | Path] = (),
    batches: Sequence[int] = DEFAULT_BATCHES,
    tolerance: Tolerance | None = None,
    backends: Sequence[str] | None = None,
    engine: str | Path | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    state_key: str | None = None,
    seed: int = 0,
    progress: Progress = QUIET,
) -> ValidationReport:
    """Compare the ONNX model at `onnx_path` with the PyTorch `model` on `backends` (default: every one available
    here), on random batches of the sizes `batches` and on the arrays in `input_files` (.npy, or .npz whose every
    array is one batch). `report.passed` says whether all agreed; `format_report(report)` prints it.

    `tolerance`: |onnx - torch| <= atol + rtol * |torch|; None derives one per output from PyTorch's own rounding
    error. `engine`: a TensorRT engine for the tensorrt backend. `inputs` (specs, as export takes them) or
    `input_shape` (one input): the example sizes, when the export's record is not to be used.
    """
    reference = (model if isinstance(model, Reference)
                 else load(model, arch=arch, trust_pickle=trust_pickle, state_key=state_key))
    return _validate(
        onnx_path, reference, input_shape=None if input_shape is None else tuple(int(d) for d in input_shape),
        inputs=None if inputs is None else [s if isinstance(s, InputSpec) else parse_input(s) for s in inputs],
        int_ranges=int_ranges, input_files=input_files, batches=batches, tolerance=tolerance,
        backend_names=backends, seed=seed, engine=engine, progress=progress,
    )
