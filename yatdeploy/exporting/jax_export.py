"""The JAX branch's own stages: a Flax NNX model settled, run once, exported by jax2onnx and fused.

    1 settle      settle_jax_inputs  ExportOptions → SettledInputs: the model as a JaxReference (its own dtype),
                                     the declared specs (no example tensors: those are PyTorch's)
    2 reference   run_jax_example    → JaxExample: the model run once on random inputs of the specs: output names,
                                     the Yat products it computes, per kind
      rewrite                        none: jax2onnx traces the module as it is, Yat math and all
    4 export      export_jax_onnx    → onnx.ModelProto: jax2onnx.to_onnx at the settled opset, the declared input
                                     names, yatdeploy's output names, every labelled dim a JAX symbolic dim
                                     (`LABEL <= MAX`, the declared maximum or settle.MAX_DIM)
   4b fuse        fuse_yat           yatdeploy.fusion.fuse_model: the decomposed Yat math as YatGemm nodes (YatNMN,
                                     YatEmbed.attend, attention scores), checked against the unfused graph there
attach, check and save are the PyTorch branch's (attach.py, check.py); yatdeploy.exporting runs them in order.
This module imports no torch (the package's PyTorch stages do: yatdeploy.exporting imports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from yatdeploy import dtypes, files
from yatdeploy.cases import random_inputs
from yatdeploy.errors import InputSpecError, YatDeployError, first_line, option
from yatdeploy.exporting.settle import INPUT_NAME, MAX_DIM, ExportOptions, SettledInputs
from yatdeploy.inputs import INTEGER_TYPES, InputSpec, from_shape
from yatdeploy.jax_loading import JaxLoadedModel
from yatdeploy.jax_reference import ATTEND, ATTENTION, CONV, JaxReference, yat_calls
from yatdeploy.progress import QUIET, Progress

JAX_DISTRIBUTIONS = ("jax", "jaxlib", "flax", "jax2onnx", "nmn")  # their versions go into the export's metadata


def settle_jax_inputs(loaded: JaxLoadedModel, output: str | Path, options: ExportOptions,
                      progress: Progress = QUIET) -> SettledInputs:
    if options.examples:
        raise InputSpecError("example tensors are for PyTorch models: declare a Flax NNX model's inputs as specs "
                             f"({option('inputs')}, e.g. 'ids:int32[batch=1,seq=16]') or a shape "
                             f"({option('input_shape')})")
    if options.kv_cache:
        raise YatDeployError(f"{option('kv_cache', True)} exports PyTorch models only: a Flax NNX model exports "
                             "with dynamic batch and length and recomputes its context (docs/jax.md)")
    output = files.check_output(output)
    reference = JaxReference.of(loaded, options.dtype)
    if options.inputs:
        specs = list(options.inputs)
        declared_by = option("inputs")
    else:
        specs = [from_shape(options.input_shape, reference.dtype, dynamic_batch=options.dynamic_batch,
                            name=INPUT_NAME)]
        declared_by = option("input_shape")
    return SettledInputs(output, reference, tuple(specs), None, dict(options.int_ranges), options.opset,
                         declared_by)


@dataclass(frozen=True)
class JaxExample:
    reference: JaxReference  # its output_names are known now
    calls: dict[str, int]  # the Yat products the run computed, per kind (jax_reference.yat_calls)


def run_jax_example(settled: SettledInputs, progress: Progress = QUIET, seed: int = 0) -> JaxExample:
    reference = settled.reference
    integers = [s.name for s in settled.specs if s.dtype in INTEGER_TYPES]
    model_range = reference.int_range() if integers else None
    ranges = {name: settled.int_ranges.get(name) or model_range for name in integers}
    arrays = random_inputs(settled.specs, np.random.default_rng(seed), ranges)
    with progress.step("checking the model runs on the example input"):
        calls = yat_calls(lambda: reference.run(arrays, settled.declared_by))
    return JaxExample(reference, calls)


def symbolic_inputs(specs: tuple[InputSpec, ...]) -> list[object]:
    """One jax.ShapeDtypeStruct per input: fixed dims as they are, each label one JAX symbolic dim (shared by every
    dim of that label), bounded by its declared maximum or MAX_DIM (a bound lets JAX decide comparisons such as a
    rotary table's length against the sequence)."""
    import jax

    bounds: dict[str, int] = {}
    for spec in specs:
        for dim in spec.dims:
            if dim.label is not None:
                bounds[dim.label] = min(bounds.get(dim.label, MAX_DIM), dim.max or MAX_DIM)
    symbols = {}
    if bounds:
        dims = jax.export.symbolic_shape(", ".join(bounds),
                                         constraints=[f"{label} <= {bound}" for label, bound in bounds.items()])
        symbols = dict(zip(bounds, dims))
    return [jax.ShapeDtypeStruct(tuple(symbols[d.label] if d.label is not None else d.size for d in spec.dims),
                                 dtypes.row(spec.dtype).numpy) for spec in specs]


def export_jax_onnx(settled: SettledInputs, output_names: list[str], progress: Progress = QUIET) -> onnx.ModelProto:
    from jax2onnx import to_onnx

    module = settled.reference.module
    with progress.step(f"exporting with jax2onnx (opset {settled.opset})"):
        try:
            model = to_onnx(module, symbolic_inputs(settled.specs), opset=settled.opset,
                            model_name=type(module).__name__, input_names=[s.name for s in settled.specs],
                            output_names=output_names)
        except Exception as exc:  # jax2onnx and JAX's tracing raise many kinds
            raise YatDeployError(f"jax2onnx could not export the model: {first_line(exc)}",
                                 "check that the model traces with jax.jit at the declared shapes (a labelled dim "
                                 f"is symbolic: give its largest size as LABEL=SIZE:MAX in {option('inputs')} "
                                 "where the model compares it with a table's length)") from exc
    return model


def fuse_yat(model: onnx.ModelProto, calls: dict[str, int],
             progress: Progress = QUIET) -> tuple[onnx.ModelProto, dict[str, int], list[str]]:
    """The export with its decomposed Yat math fused into YatGemm nodes (yatdeploy.fusion, checked there against
    the unfused model), the YatGemm nodes per kind, and a note for what was left decomposed."""
    from yatdeploy.fusion import fuse_model

    with progress.step("fusing the Yat math into YatGemm nodes (yatdeploy.fusion)"):
        fused, report = fuse_model(model)
    dense = report.fused.get("yat_dense", 0) + report.fused.get("yat_dense_spherical", 0)
    convs = report.fused.get("yat_conv", 0)  # pointwise YatConv: one YatGemm over the channels
    kinds = {"YatNMN": max(dense - calls[ATTEND], 0), ATTEND: min(calls[ATTEND], dense),
             ATTENTION: report.fused.get("yat_attention", 0), **({"YatConv": convs} if calls[CONV] else {})}
    notes = [f"left decomposed by the fusion: {item.pattern} at '{item.node}': {item.reason}" for item in report.left]
    if calls[CONV] > convs:
        notes.append(f"{calls[CONV] - convs} YatConv call(s) exported as plain ONNX ops (Conv and the Yat math "
                     "around it: a Yat product over patches)")
    return fused, kinds, notes


def jax_versions() -> dict[str, str]:
    """The versions of JAX's side of the export, for its metadata."""
    versions = {}
    for dist in JAX_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
