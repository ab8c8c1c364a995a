"""yatdeploy's Python API, `yatdeploy.export` and `yatdeploy.validate`: what the CLI's commands run.

    import yatdeploy
    result = yatdeploy.export(model, "model.onnx", input_shape=(1, 784))   # validates too
    print(result.report.passed)
    report = yatdeploy.validate("model.onnx", "model.pt", batches=(1, 64))

`model` is a torch.nn.Module built in this process (put in eval mode) or a model file, loaded as
`yatdeploy export` loads one (`arch`, `trust_pickle`). Errors are yatdeploy.errors.YatDeployError,
whose message says what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from yatdeploy.inputs import DEFAULT_BATCHES
from yatdeploy.loading import LoadedModel, from_module, load_model
from yatdeploy.onnx_export import ExportOptions, ExportResult, export_model
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference
from yatdeploy.validation import Tolerance, ValidationReport
from yatdeploy.validation import validate as _validate

__all__ = ["ExportResult", "Tolerance", "ValidationReport", "export", "load", "validate"]


def load(model: nn.Module | str | Path | LoadedModel, *, arch: str | None = None,
         trust_pickle: bool = False) -> LoadedModel:
    """`model` as export and validation take it: a module as it is, a file through yatdeploy.loading."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return from_module(model)
    return load_model(model, arch=arch, trust_pickle=trust_pickle)


def export(
    model: nn.Module | str | Path | LoadedModel,
    path: str | Path,
    *,
    input_shape: Sequence[int],
    dtype: str | None = None,
    dynamic_batch: bool = True,
    validate: bool = True,
    arch: str | None = None,
    trust_pickle: bool = False,
    tolerance: Tolerance | None = None,
    input_files: Sequence[str | Path] = (),
    seed: int = 0,
    progress: Progress = QUIET,
) -> ExportResult:
    """Export `model` to the ONNX file `path` and, unless `validate` is False, validate it against PyTorch on
    every backend available (`result.report`; the file is written even when validation fails).

    `input_shape`: the example input's shape, batch first (the batch stays dynamic unless `dynamic_batch` is
    False); `dtype`: export in this dtype ("float32", "float16", "bfloat16", "float64"), default the model's.
    `tolerance`, `input_files`, `seed`: as for `validate`.
    """
    loaded = load(model, arch=arch, trust_pickle=trust_pickle)
    options = ExportOptions(tuple(int(d) for d in input_shape), dtype=dtype, dynamic_batch=dynamic_batch)
    result = export_model(loaded, path, options, progress)
    if validate:
        result.report = _validate(result.path, result.reference, input_files=input_files, tolerance=tolerance,
                                  seed=seed, progress=progress)
    return result


def validate(
    onnx_path: str | Path,
    model: nn.Module | str | Path | LoadedModel | Reference,
    *,
    input_shape: Sequence[int] | None = None,
    input_files: Sequence[str | Path] = (),
    batches: Sequence[int] = DEFAULT_BATCHES,
    tolerance: Tolerance | None = None,
    backends: Sequence[str] | None = None,
    engine: str | Path | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    seed: int = 0,
    progress: Progress = QUIET,
) -> ValidationReport:
    """Compare the ONNX model at `onnx_path` with the PyTorch `model` on `backends` (default: every one available
    here), on random batches of the sizes `batches` and on the arrays in `input_files` (.npy, or .npz whose every
    array is one batch). `report.passed` says whether all agreed; `format_report(report)` prints it.

    `tolerance`: |onnx - torch| <= atol + rtol * |torch|; None derives one per output from PyTorch's own rounding
    error. `engine`: a TensorRT engine for the tensorrt backend.
    """
    reference = model if isinstance(model, Reference) else load(model, arch=arch, trust_pickle=trust_pickle)
    return _validate(
        onnx_path, reference, input_shape=None if input_shape is None else tuple(int(d) for d in input_shape),
        input_files=input_files, batches=batches, tolerance=tolerance, backend_names=backends, seed=seed,
        engine=engine, progress=progress,
    )
