"""Stage 3, export: rewritten torch module → ONNX with bare YatGemm nodes, then attach, check, save."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch

from yatdeploy import __version__
from yatdeploy.attach import attach_yat_gemm_function
from yatdeploy.errors import ConsistencyError, YatDeployError, option
from yatdeploy.graph import (
    META_DTYPE,
    META_INPUT_SHAPE,
    META_PREFIX,
    META_SOURCE_FORMAT,
    META_SOURCE_SHA256,
    META_YAT_LAYERS,
    yat_gemm_nodes,
)
from yatdeploy.loading import LoadedModel
from yatdeploy.ops.onnx_function import FUNCTION_OPSET
from yatdeploy.ops.onnx_schema import yat_gemm_op
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference, example_input, output_names_for
from yatdeploy.rewrite import RewriteResult, count_yat_layers, rewrite_yat_layers
from yatdeploy.spec import PLUGIN_NAMESPACE, PLUGIN_VERSION

if TYPE_CHECKING:
    from yatdeploy.validation import ValidationReport

INPUT_NAME = "input"
BATCH_DIM_NAME = "batch"
OPSET = FUNCTION_OPSET



@dataclass
class ExportOptions:
    input_shape: tuple[int, ...]
    dtype: str | None = None  # None: the dtype of the model's first floating parameter
    dynamic_batch: bool = True


@dataclass
class ExportResult:
    path: Path
    model: onnx.ModelProto
    input_shape: tuple[int, ...]
    dtype: str
    output_names: list[str]
    rewrite: RewriteResult | None
    yat_gemm_nodes: int
    yat_layers: int
    reference: Reference  # the PyTorch model as exported, for validation
    notes: list[str] = field(default_factory=list)
    report: ValidationReport | None = None  # set by yatdeploy.export unless validate=False


def _translate_yat_gemm(x, w, b, eps: float, alpha: float):
    return yat_gemm_op()(
        x, w, b, eps=eps, alpha=alpha, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION
    )


def _torchscript_to_onnx(
    module: torch.jit.ScriptModule, x: torch.Tensor, output_names: list[str], dynamic_batch: bool
) -> onnx.ModelProto:
    # torch.export can't take a ScriptModule; the TorchScript-based exporter is the one that reads it.
    axes = {name: {0: BATCH_DIM_NAME} for name in [INPUT_NAME, *output_names]} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (x,), buffer, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=axes,
            )
        except Exception as exc:
            raise YatDeployError(f"torch.onnx.export (TorchScript) failed: {str(exc).strip().splitlines()[0]}") from exc
    return onnx.load_from_string(buffer.getvalue())


def _torch_export_to_onnx(
    module_or_program: object, x: torch.Tensor, output_names: list[str], dynamic_batch: bool
) -> onnx.ModelProto:
    if isinstance(module_or_program, torch.jit.ScriptModule):
        return _torchscript_to_onnx(module_or_program, x, output_names, dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim(BATCH_DIM_NAME, min=1, max=1 << 20)},) if dynamic_batch else None
    if isinstance(module_or_program, torch.export.ExportedProgram):
        dynamic_shapes = None  # a saved program keeps the shapes it was exported with
    table = {torch.ops.yatdeploy.yat_gemm.default: _translate_yat_gemm}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The exporter prints its capture strategies to stdout; the CLI's stdout is the report.
            with redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    module_or_program,
                    (x,),
                    dynamo=True,
                    opset_version=OPSET,
                    input_names=[INPUT_NAME],
                    output_names=output_names,
                    dynamic_shapes=dynamic_shapes,
                    custom_translation_table=table,
                    optimize=True,
                    verbose=False,
                    report=False,
                )
        except Exception as exc:
            raise YatDeployError(f"torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
    return program.model_proto


def _package_versions() -> dict[str, str]:
    versions = {"yatdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    for dist in ("nmn", "onnxscript"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def save_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Write next to the target and rename, so a failed write never clobbers an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_model(loaded: LoadedModel, output: str | Path, options: ExportOptions, progress: Progress = QUIET,
                 reference: Reference | None = None) -> ExportResult:
    """`reference`: the model as prepared for this export's dtype, when the caller has it already."""
    output = Path(output)
    if reference is None:
        reference = Reference.of(loaded, options.dtype)
    elif options.dtype not in (None, reference.dtype) or reference.loaded is not loaded:
        raise ValueError("the reference given is not this model in this dtype")
    dtype = reference.dtype
    notes: list[str] = []
    x = example_input(options.input_shape, dtype)
    with progress.step("checking the model runs on the example input"):
        outputs = reference.run_tensor(x, f"{option('input_shape')} and {option('dtype')}")
    output_names = output_names_for(len(outputs))

    rewrite: RewriteResult | None = None
    target: object
    if loaded.layers_are_identifiable:
        with progress.step("rewriting YatNMN layers to YatGemm"):
            rewrite = rewrite_yat_layers(reference.module)
        target = rewrite.module
        yat_layers = len(rewrite.yat_layers)
        if rewrite.decomposed_layers:
            notes.append(
                "exported through ordinary ONNX ops (no YatGemm form yet): " + ", ".join(rewrite.decomposed_layers)
            )
    else:
        yat_layers = count_yat_layers(loaded.module)
        target = loaded.program if loaded.program is not None else loaded.module
        if yat_layers:
            notes.append(
                f"{loaded.format} keeps no YatNMN options, so its {yat_layers} YatNMN layer(s) export as ordinary "
                "ONNX ops; save the model with torch.save(model) to get YatGemm nodes"
            )

    with progress.step(f"exporting to ONNX (opset {OPSET}, {'dynamic' if options.dynamic_batch else 'static'} batch)"):
        model = _torch_export_to_onnx(target, x, output_names, options.dynamic_batch)
    with progress.step("attaching the YatGemm function"):
        attach_yat_gemm_function(model)
    nodes = len(yat_gemm_nodes(model))
    if loaded.layers_are_identifiable and nodes != yat_layers:
        raise ConsistencyError(f"export wrote {nodes} YatGemm nodes for {yat_layers} YatNMN layers")
    _set_metadata(
        model,
        {
            **{f"{META_PREFIX}version.{k}": v for k, v in _package_versions().items()},
            META_SOURCE_SHA256: loaded.sha256,
            META_SOURCE_FORMAT: loaded.format,
            META_INPUT_SHAPE: ",".join(map(str, options.input_shape)),
            META_DTYPE: dtype,
            META_YAT_LAYERS: str(yat_layers),
        },
    )
    model.producer_name = "yatdeploy"
    model.producer_version = __version__
    with progress.step("checking the model (onnx.checker, full check)"):
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ConsistencyError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    with progress.step(f"saving {output}"):
        save_atomically(model, output)
    return ExportResult(
        path=output,
        model=model,
        input_shape=options.input_shape,
        dtype=dtype,
        output_names=output_names,
        rewrite=rewrite,
        yat_gemm_nodes=nodes,
        yat_layers=yat_layers,
        reference=reference,
        notes=notes,
    )
