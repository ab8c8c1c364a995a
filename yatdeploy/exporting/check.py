"""Stage 6, check: the exported model (its function attached) made what yatdeploy writes, or refused.

In order: as many YatGemm nodes as the example run computed Yat products; every dim declared dynamic still
free; the inputs as recorded (the settled specs fitted to the graph, read once, with the limits its lookups
set: limits.py); the metadata; onnx.checker's full check; and, for an export in another dtype than float32,
that ONNX Runtime's CPU provider opens it (the ops it lacks in a 16-bit dtype computed in float32 between casts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata

import onnx
import torch

from yatdeploy import __version__, dtypes
from yatdeploy.decoder import META_DECODER, DecoderLayout
from yatdeploy.errors import ConsistencyError, YatDeployError, option
from yatdeploy.exporting.limits import with_graph_limits
from yatdeploy.exporting.rewrite import Rewritten
from yatdeploy.exporting.settle import SettledInputs
from yatdeploy.graph import (
    META_DTYPE,
    META_INPUT_SHAPE,
    META_INPUTS,
    META_PREFIX,
    META_SOURCE_FORMAT,
    META_SOURCE_SHA256,
    META_YAT_LAYERS,
    GraphInput,
    declared_inputs,
    yat_gemm_nodes,
)
from yatdeploy.inputs import InputSpec, fit_to_graph
from yatdeploy.loading import LoadedModel
from yatdeploy.progress import QUIET, Progress


@dataclass(frozen=True)
class Checked:
    model: onnx.ModelProto  # as it is written
    inputs: list[InputSpec]  # as recorded in its metadata, limits included
    yat_gemm_nodes: int
    notes: tuple[str, ...]


def check_model(model: onnx.ModelProto, loaded: LoadedModel, settled: SettledInputs, rewritten: Rewritten,
                progress: Progress = QUIET, decoder: DecoderLayout | None = None,
                versions: Mapping[str, str] | None = None) -> Checked:
    """`versions`: the source framework's packages and their versions, beside yatdeploy's own, in the metadata (a
    JAX export's jax, flax, jax2onnx...)."""
    dtype = settled.reference.dtype
    nodes = len(yat_gemm_nodes(model))
    if rewritten.rewrite is not None and nodes != rewritten.yat_layers:  # a rewritten model's nodes are known
        raise ConsistencyError(f"export wrote {nodes} YatGemm nodes for {rewritten.yat_layers} Yat layer calls")
    feeds = declared_inputs(model)
    # What the graph declares, with the example's sizes (a saved torch.export program keeps its own shapes) ...
    if loaded.program is None:
        _check_dynamic_dims_kept(settled.specs, feeds)
    # ... and the limits its lookups set (an embedding's vocabulary, a position table's length), recorded with them.
    specs = with_graph_limits(fit_to_graph(list(settled.specs), feeds), model, feeds)
    _set_metadata(model, _record(loaded, dtype, specs, rewritten.yat_layers, versions or {}))
    if decoder is not None:
        _set_metadata(model, {META_DECODER: decoder.to_json()})
    model.producer_name = "yatdeploy"
    model.producer_version = __version__
    with progress.step("checking the model (onnx.checker, full check)"):
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ConsistencyError(f"the exported model fails onnx.checker: {str(exc).splitlines()[0]}") from exc
        except onnx.shape_inference.InferenceError as exc:
            # e.g. attention's Einsum in bfloat16: the exporter writes an op ONNX does not define for the dtype.
            raise YatDeployError(f"the exported {dtype} graph is not valid ONNX: {str(exc).splitlines()[0]}",
                                 f"ONNX opset {settled.opset} lacks that op in {dtype}; export in another "
                                 f"dtype ({option('dtype')})") from exc
    notes: tuple[str, ...] = ()
    if dtype != "float32":
        with progress.step("checking ONNX Runtime's CPU provider can open it"):
            widened = _runnable_on_cpu(model, dtype)
        if widened:
            try:
                onnx.checker.check_model(model, full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise ConsistencyError(f"the model with {', '.join(widened)} widened to float32 fails onnx.checker: "
                                       f"{str(exc).splitlines()[0]}") from exc
            them = "it" if len(widened) == 1 else "them"
            notes = (f"{', '.join(widened)} computed in float32 between casts, as PyTorch computes on the CPU: "
                     f"ONNX Runtime's CPU provider has no {dtype} kernel for {them}",)
    return Checked(model, specs, nodes, notes)


def _check_dynamic_dims_kept(specs: tuple[InputSpec, ...], feeds: list[GraphInput]) -> None:
    """Every dim declared dynamic is free in the graph: an exporter that fixed one (specialising on the example)
    would give a model that refuses other sizes, and validation could only try the example's."""
    for spec, feed in zip(specs, feeds):
        for i, (want, dim) in enumerate(zip(spec.dims, feed.dims)):
            if want.label is not None and isinstance(dim, int):
                raise YatDeployError(
                    f"input '{spec.name}': dim {i} ({want.label}) came out fixed at {dim} in the exported "
                    "graph: the model's code makes it a constant for torch.export",
                    "check that the model really works at other sizes there, or declare the dim fixed",
                )


def _record(loaded: LoadedModel, dtype: str, specs: list[InputSpec], yat_layers: int,
            versions: Mapping[str, str]) -> dict[str, str]:
    """The metadata yatdeploy writes into every export (validation and the server read it back)."""
    recorded = {
        **{f"{META_PREFIX}version.{k}": v for k, v in {**_package_versions(), **versions}.items()},
        META_SOURCE_SHA256: loaded.sha256,
        META_SOURCE_FORMAT: loaded.format,
        META_INPUTS: json.dumps([s.as_json() for s in specs]),
        META_DTYPE: dtype,
        META_YAT_LAYERS: str(yat_layers),
    }
    if len(specs) == 1 and specs[0].dtype in dtypes.NAMES:  # as yatdeploy 0.1's validate reads it
        recorded[META_INPUT_SHAPE] = ",".join(map(str, specs[0].shape))
    return recorded


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


_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_SIXTEEN_BIT = ("float16", "bfloat16")


def _cpu_session_failure(model: onnx.ModelProto) -> tuple[str, str, str] | None:
    """(op, opset version, node) of the first node ONNX Runtime's CPU provider has no kernel for (plain ONNX
    Runtime: YatGemm inlined from its function), or None when a CPU session opens the model. Any other failure to
    open it is left to validation to report."""
    import onnxruntime as ort

    if model.ByteSize() >= 2**31 - 1:  # past protobuf's limit: no in-memory session; validation opens the file
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's NotImplemented and Fail are not exported under stable names
        found = _NO_KERNEL.search(str(exc))
        return found.groups() if found is not None else None
    return None


def _widen(model: onnx.ModelProto, op: str, dtype: str) -> bool:
    """Make every `op` node of the main graph compute in float32 on its `dtype` operands: a Cast to float32 before
    it, one back to `dtype` after. PyTorch computes these layers so on the CPU (float32 accumulation, one rounding
    to the 16-bit type), so the values are PyTorch's. False when no such node has a `dtype` operand to cast."""
    from onnx import TensorProto, helper

    elem = dtypes.by_name(dtype).onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    nodes, widened, changed = [], {}, False
    for node in model.graph.node:
        ins = [n for n in node.input if n and types.get(n) == elem]
        outs = [n for n in node.output if n and types.get(n) == elem]
        if node.op_type != op or node.domain not in ("", "ai.onnx") or not (ins or outs):
            nodes.append(node)
            continue
        for name in ins:
            if name not in widened:
                # not the suffix of a widened node's own output: `name` may be one (chained widened ops)
                widened[name] = f"{name}__yatdeploy_as_float32"
                nodes.append(helper.make_node("Cast", [name], [widened[name]], name=f"{name}__yatdeploy_widen",
                                              to=TensorProto.FLOAT))
        node.input[:] = [widened.get(n, n) if n in ins else n for n in node.input]
        after = []
        for index, name in enumerate(node.output):
            if name in outs:
                node.output[index] = f"{name}__yatdeploy_float32"
                after.append(helper.make_node("Cast", [node.output[index]], [name], name=f"{name}__yatdeploy_narrow",
                                              to=elem))
        nodes += [node, *after]
        changed = True
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return changed


def _runnable_on_cpu(model: onnx.ModelProto, dtype: str) -> list[str]:
    """Make the model one that ONNX Runtime's CPU provider opens, or refuse it before it is written.

    That provider has next to no bfloat16 kernels (no Gemm, MatMul, Add, Relu...; YatGemm's function computes in
    float32): in a 16-bit model, the ops it lacks compute in float32 between casts (`_widen`), so the file runs on
    every backend, Triton's ONNX Runtime on CPU included. An op missing otherwise (Conv in float64) is refused, naming
    it, as the file would fail every CPU backend's validation. Returns the ops widened."""
    widened: list[str] = []
    while (failure := _cpu_session_failure(model)) is not None:
        op, version, node = failure
        if dtype not in _SIXTEEN_BIT or op in widened or not _widen(model, op, dtype):
            others = " or ".join(t for t in ("float16", "float32") if t != dtype)
            raise YatDeployError(
                f"ONNX Runtime's CPU provider has no {dtype} kernel for {op} (opset {version}; node '{node}'), so no "
                "CPU session could open the exported model; nothing was written",
                f"export in {others} ({option('dtype')})",
            )
        widened.append(op)
    return widened
