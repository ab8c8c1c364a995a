"""Export, one pass: a loaded PyTorch model and what the caller declared → a checked ONNX file.

Each stage is one module and hands the next what it needs; none asks a fact an earlier one settled:

    1 settle        settle.py        ExportOptions (as declared, parsed when made) → SettledInputs: the model in
                                     the export dtype (the Reference, cast once), every input's spec in that
                                     dtype, the caller's examples, integer ranges and opset
    2 reference     example.py       → ExampleRun: the Reference run once on the example: output names, the Yat
                                     products it computes
    3 rewrite       rewrite.py       → Rewritten: Yat layers as YatGemm calls (or a compiled model as loaded)
   3b cache         decoder.py       with kv_cache: → Cached: the causal LM as a decoder taking and giving its KV
                                     cache (yatdeploy.decoder's contract), checked against the model run in full
    4 export        torch_export.py  → onnx.ModelProto: torch.onnx.export, bare YatGemm nodes (a decoder's dims
                                     named batch, seq, past, "past + seq")
    5 attach        attach.py        + the YatGemm ONNX function
    6 check         check.py         → Checked: node count, dynamic dims kept, the inputs recorded with the limits
                                     the graph sets (limits.py), metadata, onnx.checker, CPU runnability
      save                           written whole or not at all (files.writing)

A Flax NNX model (jax_loading.JaxLoadedModel) takes the same walk with its own stages where they differ
(jax_export.py): settle (a JaxReference), the example run, no rewrite, jax2onnx's export and the fusion of its
decomposed Yat math (yatdeploy.fusion), then the same attach, check and save.

validation follows (yatdeploy.validation, through yatdeploy.api): it gets `ExportResult.reference`, so the
model is prepared once, and `ExportResult.int_ranges`, the caller's as settled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from yatdeploy import files
from yatdeploy.decoder import DecoderLayout
from yatdeploy.exporting.attach import attach_yat_gemm_function
from yatdeploy.exporting.check import check_model
from yatdeploy.exporting.decoder import cache_decoder, decoder_specs
from yatdeploy.exporting.example import ExampleRun, run_example
from yatdeploy.exporting.jax_export import export_jax_onnx, fuse_yat, jax_versions, run_jax_example, settle_jax_inputs
from yatdeploy.exporting.rewrite import RewriteResult, Rewritten, rewrite_model
from yatdeploy.exporting.settle import INPUT_NAME, OPSET, ExportOptions, settle_inputs
from yatdeploy.exporting.torch_export import export_decoder, export_onnx
from yatdeploy.inputs import InputSpec
from yatdeploy.jax_loading import JaxLoadedModel
from yatdeploy.loading import LoadedModel
from yatdeploy.model_reference import ModelReference
from yatdeploy.progress import QUIET, Progress

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
    reference: ModelReference  # the model as exported (PyTorch's Reference, a JaxReference), for validation
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # the caller's, as settled, for validation
    notes: list[str] = field(default_factory=list)
    report: ValidationReport | None = None  # set by yatdeploy.export unless validate=False
    repository_entry: Path | None = None  # the model folder yatdeploy.export wrote, with `repository`
    seconds: float = 0.0  # loading and exporting, as yatdeploy.export timed them
    decoder: DecoderLayout | None = None  # a KV-cache export's layout (yatdeploy.decoder), else None
    yat_gemm_kinds: dict[str, int] = field(default_factory=dict)  # YatGemm nodes per kind (YatNMN, attention...)


def export_model(loaded: LoadedModel | JaxLoadedModel, output: str | Path, options: ExportOptions,
                 progress: Progress = QUIET) -> ExportResult:
    if isinstance(loaded, JaxLoadedModel):
        return export_jax_model(loaded, output, options, progress)
    settled = settle_inputs(loaded, output, options, progress)
    run = run_example(settled, progress)
    rewritten = rewrite_model(loaded, run, progress)
    layout, kinds = None, _yat_gemm_kinds(run, rewritten)
    if options.kv_cache:
        cached = cache_decoder(rewritten, settled, run, options.logits, options.context_length, progress)
        model, layout = export_decoder(cached, settled, progress), cached.layout
        kinds["attention"] = cached.scores_as_yat_gemm
        settled = dataclasses.replace(settled, specs=decoder_specs(layout, settled.specs[0].dims[1].size))
        rewritten = dataclasses.replace(rewritten, yat_layers=rewritten.yat_layers + kinds["attention"],
                                        notes=cached.notes(rewritten))
    else:
        model = export_onnx(rewritten, settled, run, progress)
    with progress.step("attaching the YatGemm function"):
        attach_yat_gemm_function(model)
    checked = check_model(model, loaded, settled, rewritten, progress, decoder=layout)
    with progress.step(f"saving {settled.output}"):
        with files.writing(settled.output) as partial:  # a failed write leaves no partial file, and says why
            onnx.save_model(checked.model, str(partial))
    return ExportResult(
        path=settled.output,
        model=checked.model,
        inputs=checked.inputs,
        dtype=settled.reference.dtype,
        output_names=layout.output_names() if layout is not None else run.reference.output_names,
        rewrite=rewritten.rewrite,
        yat_gemm_nodes=checked.yat_gemm_nodes,
        yat_layers=rewritten.yat_layers,
        reference=run.reference,
        int_ranges=settled.int_ranges,
        notes=[*rewritten.notes, *checked.notes],
        decoder=layout,
        yat_gemm_kinds=kinds,
    )


def export_jax_model(loaded: JaxLoadedModel, output: str | Path, options: ExportOptions,
                     progress: Progress = QUIET) -> ExportResult:
    """The same walk for a Flax NNX model: its own settle, example, export and fuse stages (jax_export.py), then the
    shared attach, check and save."""
    settled = settle_jax_inputs(loaded, output, options, progress)
    run = run_jax_example(settled, progress)
    output_names = run.reference.output_names
    model = export_jax_onnx(settled, output_names, progress)
    model, kinds, notes = fuse_yat(model, run.calls, progress)
    with progress.step("attaching the YatGemm function"):
        attach_yat_gemm_function(model)
    products = sum(kinds.values())
    traced = Rewritten(loaded.module, None, products, ())  # nothing rewritten: jax2onnx traced the module as it is
    checked = check_model(model, loaded, settled, traced, progress, versions=jax_versions())
    with progress.step(f"saving {settled.output}"):
        with files.writing(settled.output) as partial:
            onnx.save_model(checked.model, str(partial))
    return ExportResult(
        path=settled.output,
        model=checked.model,
        inputs=checked.inputs,
        dtype=settled.reference.dtype,
        output_names=output_names,
        rewrite=None,
        yat_gemm_nodes=checked.yat_gemm_nodes,
        yat_layers=products,
        reference=run.reference,
        int_ranges=settled.int_ranges,
        notes=[*notes, *checked.notes],
        yat_gemm_kinds=kinds,
    )


def _yat_gemm_kinds(run: ExampleRun, rewritten: Rewritten) -> dict[str, int]:
    """The YatGemm nodes an export has, per kind of Yat product: YatNMN layers and tied `attend` heads (as the example
    run called them); the decoder stage adds attention scores."""
    if rewritten.rewrite is None:
        return {}
    heads = {layer.path for layer in rewritten.rewrite.yat_layers if layer.options.get("head") == "attend"}
    attend = sum(count for path, count in run.calls.items() if path in heads)
    return {"YatNMN": sum(run.calls.values()) - attend, "attend head": attend}
