"""Export, one pass: a loaded PyTorch model and what the caller declared → a checked ONNX file.

Each stage is one module and hands the next what it needs; none asks a fact an earlier one settled:

    1 settle        settle.py        ExportOptions (as declared, parsed when made) → SettledInputs: the model in
                                     the export dtype (the Reference, cast once), every input's spec in that
                                     dtype, the caller's examples, integer ranges and opset
    2 reference     example.py       → ExampleRun: the Reference run once on the example: output names, the Yat
                                     products it computes
    3 rewrite       rewrite.py       → Rewritten: Yat layers as YatGemm calls (or a compiled model as loaded)
    4 export        torch_export.py  → onnx.ModelProto: torch.onnx.export, bare YatGemm nodes
    5 attach        attach.py        + the YatGemm ONNX function
    6 check         check.py         → Checked: node count, dynamic dims kept, the inputs recorded with the limits
                                     the graph sets (limits.py), metadata, onnx.checker, CPU runnability
      save                           written whole or not at all (files.writing)

validation follows (yatdeploy.validation, through yatdeploy.api): it gets `ExportResult.reference`, so the
model is prepared once, and `ExportResult.int_ranges`, the caller's as settled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from yatdeploy import files
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.exporting.check import check_model
from yatdeploy.exporting.example import run_example
from yatdeploy.exporting.rewrite import RewriteResult, rewrite_model
from yatdeploy.exporting.settle import INPUT_NAME, OPSET, ExportOptions, settle_inputs
from yatdeploy.exporting.torch_export import export_onnx
from yatdeploy.inputs import InputSpec
from yatdeploy.loading import LoadedModel
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference

if TYPE_CHECKING:
    from yatdeploy.validation import ValidationReport

__all__ = ["INPUT_NAME", "OPSET", "ExportOptions", "ExportResult", "export_model"]


@dataclass
class ExportResult:
    path: Path
    model: onnx.ModelProto
    inputs: list[InputSpec]  # as recorded in the model's metadata, limits included
    dtype: str
    output_names: list[str]
    rewrite: RewriteResult | None
    yat_gemm_nodes: int
    yat_layers: int  # the Yat products the model computes: YatNMN calls and YatEmbed.attend calls
    reference: Reference  # the PyTorch model as exported, for validation
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # the caller's, as settled, for validation
    notes: list[str] = field(default_factory=list)
    report: ValidationReport | None = None  # set by yatdeploy.export unless validate=False
    repository_entry: Path | None = None  # the model folder yatdeploy.export wrote, with `repository`
    seconds: float = 0.0  # loading and exporting, as yatdeploy.export timed them


def export_model(loaded: LoadedModel, output: str | Path, options: ExportOptions,
                 progress: Progress = QUIET) -> ExportResult:
    settled = settle_inputs(loaded, output, options, progress)
    run = run_example(settled, progress)
    rewritten = rewrite_model(loaded, run, progress)
    model = export_onnx(rewritten, settled, run, progress)
    with progress.step("attaching the YatGemm function"):
        attach_yat_gemm_function(model)
    checked = check_model(model, loaded, settled, rewritten, progress)
    with progress.step(f"saving {settled.output}"):
        with files.writing(settled.output) as partial:  # a failed write leaves no partial file, and says why
            onnx.save_model(checked.model, str(partial))
    return ExportResult(
        path=settled.output,
        model=checked.model,
        inputs=checked.inputs,
        dtype=settled.reference.dtype,
        output_names=run.reference.output_names,
        rewrite=rewritten.rewrite,
        yat_gemm_nodes=checked.yat_gemm_nodes,
        yat_layers=rewritten.yat_layers,
        reference=run.reference,
        int_ranges=settled.int_ranges,
        notes=[*rewritten.notes, *checked.notes],
    )
