"""Stage 3, export: rewritten torch module → ONNX with bare YatGemm nodes, then attach, check, save."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from nmn.torch import YatEmbed

from yatdeploy import __version__, dtypes, files, graph
from yatdeploy.attach import attach_yat_gemm_function
from yatdeploy.errors import ConsistencyError, InputSpecError, YatDeployError, option, plain
from yatdeploy.graph import (
    META_DTYPE,
    META_INPUT_SHAPE,
    META_INPUTS,
    META_PREFIX,
    META_SOURCE_FORMAT,
    META_SOURCE_SHA256,
    META_YAT_LAYERS,
    yat_gemm_nodes,
)
from yatdeploy.inputs import (
    INTEGER_TYPES,
    InputSpec,
    check_specs,
    from_shape,
    model_specs,
    random_inputs,
    with_graph_limits,
)
from yatdeploy.loading import LoadedModel
from yatdeploy.ops.onnx_function import FUNCTION_OPSET, SUPPORTED_OPSETS
from yatdeploy.ops.onnx_schema import yat_gemm_op
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference, to_torch
from yatdeploy.rewrite import RewriteResult, count_yat_layers, rewrite_yat_layers, yat_calls
from yatdeploy.spec import PLUGIN_NAMESPACE, PLUGIN_VERSION

if TYPE_CHECKING:
    from yatdeploy.validation import ValidationReport

INPUT_NAME = "input"
MAX_DIM = 1 << 20  # the largest size a dynamic dim is declared to take
OPSET = FUNCTION_OPSET


@dataclass
class ExportOptions:
    input_shape: tuple[int, ...] = ()  # the shorthand for one float input in the export dtype, batch first
    dtype: str | None = None  # None: the dtype of the model's first floating parameter
    dynamic_batch: bool = True  # the shorthand's first dim is the dynamic batch
    inputs: tuple[InputSpec, ...] = ()  # every input (names, dtypes, dims and labels); overrides input_shape
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer inputs' example values
    opset: int = OPSET  # the ONNX opset, one of SUPPORTED_OPSETS

    def specs(self, dtype: str) -> list[InputSpec]:
        if self.inputs:
            specs = check_specs(self.inputs)
            for spec in specs:
                for dim in spec.dims:
                    if dim.max is not None and dim.max > MAX_DIM:
                        raise InputSpecError(f"input '{spec.name}': dim {dim}: a maximum above {MAX_DIM} is not "
                                             "exported (validation runs the model at its maximum)")
            return specs
        if not self.input_shape:
            raise InputSpecError(f"no inputs declared: give {option('input_shape')} or {option('inputs')}")
        return [from_shape(self.input_shape, dtype, dynamic_batch=self.dynamic_batch, name=INPUT_NAME)]


@dataclass
class ExportResult:
    path: Path
    model: onnx.ModelProto
    inputs: list[InputSpec]
    dtype: str
    output_names: list[str]
    rewrite: RewriteResult | None
    yat_gemm_nodes: int
    yat_layers: int  # the Yat products the model computes: YatNMN calls and YatEmbed.attend calls
    reference: Reference  # the PyTorch model as exported, for validation
    notes: list[str] = field(default_factory=list)
    report: ValidationReport | None = None  # set by yatdeploy.export unless validate=False


def _translate_yat_gemm(x, w, b, eps: float, alpha: float):
    return yat_gemm_op()(
        x, w, b, eps=eps, alpha=alpha, plugin_namespace=PLUGIN_NAMESPACE, plugin_version=PLUGIN_VERSION
    )


def _torchscript_to_onnx(module: torch.jit.ScriptModule, xs: tuple[torch.Tensor, ...], specs: list[InputSpec],
                         output_names: list[str], opset: int) -> onnx.ModelProto:
    # torch.export can't take a ScriptModule; the TorchScript-based exporter is the one that reads it.
    axes = {s.name: {i: d.label for i, d in enumerate(s.dims) if d.label} for s in specs}
    batch = specs[0].dims[0].label if specs[0].dims else None
    if batch is not None:
        axes.update({name: {0: batch} for name in output_names})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, xs, buffer, dynamo=False, opset_version=opset,
                input_names=[s.name for s in specs], output_names=output_names,
                dynamic_axes={k: v for k, v in axes.items() if v} or None,
            )
        except Exception as exc:
            raise _export_failed("torch.onnx.export (TorchScript)", exc) from exc
    return onnx.load_from_string(buffer.getvalue())


def _first_line(exc: BaseException) -> str:
    text = plain(str(exc)).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def _export_failed(what: str, exc: Exception) -> YatDeployError:
    """The exporter's error as one line: its first line and, where it wraps another, the innermost cause (the
    exporter's own first line says only which of its steps failed). A Ctrl-C the exporter turned into another error
    (one raised while handling it, as when it lands in an import the exporter makes) is raised again as one."""
    chain, seen = [], set()  # the exceptions behind `exc`, each one's cause (else what it was raised handling)
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        raise KeyboardInterrupt
    message = _first_line(exc).split(" Next steps:")[0].strip()
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    if root is not exc:
        message += f" (caused by {type(root).__name__}: {_first_line(root)})"
    return YatDeployError(f"{what} failed: {message}")


def _dynamic_shapes(specs: list[InputSpec]) -> tuple[dict[int, object], ...] | None:
    """torch.export's dynamic_shapes: one Dim per label, shared by every dim of that label."""
    dims: dict[str, object] = {}
    shapes = tuple({i: dims.setdefault(d.label, torch.export.Dim(d.label, min=1, max=MAX_DIM))
                    for i, d in enumerate(s.dims) if d.label is not None} for s in specs)
    return shapes if any(shapes) else None


class _Root(torch.nn.Module):
    """A root above a module whose own attributes are named as torch.fx.GraphModule's (`_graph_module_names`)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.model = inner

    def forward(self, *args):
        return self.model(*args)


_GRAPH_MODULE_NAMES: frozenset[str] | None = None


def _graph_module_names() -> frozenset[str]:
    """The attributes of a torch.fx.GraphModule (meta, graph, code, recompile, ...). torch.onnx.export rebuilds the
    module's top level as one, so a child, parameter or buffer of the root named so (even an nn.Linear `meta`)
    makes it fail ("Node meta_weight target meta.weight references nonexistent attribute weight of meta")."""
    global _GRAPH_MODULE_NAMES
    if _GRAPH_MODULE_NAMES is None:
        _GRAPH_MODULE_NAMES = frozenset(dir(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())))
    return _GRAPH_MODULE_NAMES


def _clashing_names(module: torch.nn.Module) -> list[str]:
    own = {*module._modules, *module._parameters, *module._buffers,
           *(k for k, v in vars(module).items() if isinstance(v, torch.Tensor))}
    return sorted(own & _graph_module_names())


def _torch_export_to_onnx(module_or_program: object, xs: tuple[torch.Tensor, ...], specs: list[InputSpec],
                          output_names: list[str], opset: int) -> onnx.ModelProto:
    if isinstance(module_or_program, torch.jit.ScriptModule):
        return _torchscript_to_onnx(module_or_program, xs, specs, output_names, opset)
    dynamic_shapes = _dynamic_shapes(specs)
    if isinstance(module_or_program, torch.export.ExportedProgram):
        dynamic_shapes = None  # a saved program keeps the shapes it was exported with
    elif isinstance(module_or_program, torch.nn.Module) and _clashing_names(module_or_program):
        # Exported one level down, the names clash no more (the weights are then named model.<name>...).
        module_or_program = _Root(module_or_program)
        dynamic_shapes = None if dynamic_shapes is None else (dynamic_shapes,)  # forward(*args): one tuple
    table = {torch.ops.yatdeploy.yat_gemm.default: _translate_yat_gemm}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The exporter prints its capture strategies to stdout, and the graphs it tried to stderr when it fails;
            # the CLI's stdout is the report, its stderr the progress and one line per error (the cause in it).
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                program = torch.onnx.export(
                    module_or_program,
                    xs,
                    dynamo=True,
                    opset_version=opset,
                    input_names=[s.name for s in specs],
                    output_names=output_names,
                    dynamic_shapes=dynamic_shapes,
                    custom_translation_table=table,
                    optimize=True,
                    verbose=False,
                    report=False,
                )
        except Exception as exc:
            raise _export_failed("torch.onnx.export", exc) from exc
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
    """Write next to the target and rename (files.writing): a failed write (a full disk, Ctrl-C) never leaves a
    partial file or clobbers an existing one, and says what to change."""
    with files.writing(path) as partial:
        onnx.save_model(model, str(partial))


def example_inputs(specs: list[InputSpec], reference: Reference, int_ranges: dict[str, tuple[int, int]],
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random example tensors of the specs' example shapes (inputs.random_inputs), integers within the model's
    embedding tables unless `int_ranges` says otherwise."""
    ranges = {s.name: int_ranges.get(s.name) or reference.int_range() for s in specs if s.dtype in INTEGER_TYPES}
    return tuple(to_torch(a) for a in random_inputs(specs, np.random.default_rng(seed), ranges).values())


def _traceable(tensors: tuple[torch.Tensor, ...], specs: list[InputSpec]) -> tuple[torch.Tensor, ...]:
    """The examples as the exporter traces them: repeated to size 2 along any dynamic dim where they have size
    1, since torch.export may specialise a dim of size 1 to a constant."""
    out = []
    for tensor, spec in zip(tensors, specs):
        repeats = [2 if d.label is not None and d.size == 1 else 1 for d in spec.dims]
        out.append(tensor.repeat(*repeats) if any(r > 1 for r in repeats) else tensor)
    return tuple(out)


def _check_dynamic_dims_kept(model: onnx.ModelProto, specs: list[InputSpec]) -> None:
    """Every dim declared dynamic is free in the graph: an exporter that fixed one (specialising on the example)
    would give a model that refuses other sizes, and validation could only try the example's."""
    for spec, value in zip(specs, graph.graph_inputs(model)):
        for i, (want, dim) in enumerate(zip(spec.dims, value.type.tensor_type.shape.dim)):
            if want.label is not None and dim.HasField("dim_value"):
                raise YatDeployError(
                    f"input '{spec.name}': dim {i} ({want.label}) came out fixed at {dim.dim_value} in the exported "
                    "graph: the model's code makes it a constant for torch.export",
                    "check that the model really works at other sizes there, or declare the dim fixed",
                )


def _in_export_dtype(specs: list[InputSpec], dtype: str, progress: Progress) -> list[InputSpec]:
    """The specs with every float input in the export dtype: the model was cast to `dtype` (the caller's
    dtype option), so its layers take that dtype only ("mixed dtype" otherwise)."""
    out = []
    for spec in specs:
        if spec.dtype in dtypes.NAMES and spec.dtype != dtype:
            progress.say(f"  input '{spec.name}' declared {spec.dtype} is exported as {dtype} (the export dtype)")
            spec = dataclasses.replace(spec, dtype=dtype)
        out.append(spec)
    return out


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
                widened[name] = f"{name}__yatdeploy_float32"
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


def _dims_text(specs: list[InputSpec]) -> str:
    labels = list(dict.fromkeys(d.label for s in specs for d in s.dims if d.label))
    return f"dynamic {', '.join(labels)}" if labels else "static shapes"


def export_model(loaded: LoadedModel, output: str | Path, options: ExportOptions, progress: Progress = QUIET,
                 reference: Reference | None = None, examples: tuple[torch.Tensor, ...] | None = None) -> ExportResult:
    """`reference`: the model as prepared for this export's dtype, when the caller has it already; `examples`:
    the example tensors (default: random ones of the inputs' example shapes)."""
    output = files.check_output(output)  # a folder or a path under a file is refused before any work
    if reference is None:
        reference = Reference.of(loaded, options.dtype)
    elif options.dtype not in (None, reference.dtype) or reference.loaded is not loaded:
        raise ValueError("the reference given is not this model in this dtype")
    dtype = reference.dtype
    notes: list[str] = []
    specs = options.specs(dtype)
    if options.dtype is not None:
        declared, specs = specs, _in_export_dtype(specs, dtype, progress)
        if examples is not None:
            examples = tuple(x.to(dtypes.by_name(new.dtype).torch) if new.dtype != old.dtype else x
                             for x, old, new in zip(examples, declared, specs))
    xs = examples if examples is not None else example_inputs(specs, reference, options.int_ranges)
    what = f"{option('inputs')}" if options.inputs else f"{option('input_shape')} and {option('dtype')}"
    with progress.step("checking the model runs on the example input"):
        calls = yat_calls(reference.module, lambda: reference.run_tensors(xs, what))
    output_names = reference.output_names

    rewrite: RewriteResult | None = None
    target: object
    if loaded.layers_are_identifiable:
        with progress.step("rewriting Yat layers to YatGemm"):
            rewrite = rewrite_yat_layers(reference.module, dtypes.by_name(dtype).torch)
        target = rewrite.module
        yat_layers = sum(calls.values())
        unused = [path or "<root>" for path, count in calls.items() if count == 0
                  and not (isinstance(reference.module.get_submodule(path), YatEmbed))]
        if unused:
            notes.append(f"Yat layer(s) {', '.join(unused)} did not run on the example input, so the export has no "
                         "node for them")
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

    if options.opset not in SUPPORTED_OPSETS:
        raise InputSpecError(f"{option('opset')} {options.opset}: yatdeploy exports opsets {SUPPORTED_OPSETS.start} "
                             f"to {SUPPORTED_OPSETS.stop - 1}")
    with progress.step(f"exporting to ONNX (opset {options.opset}, {_dims_text(specs)})"):
        model = _torch_export_to_onnx(target, _traceable(xs, specs), specs, output_names, options.opset)
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", options.opset) != options.opset:
        raise ConsistencyError(f"torch.onnx.export wrote opset {opsets['']} for opset {options.opset}")
    with progress.step("attaching the YatGemm function"):
        attach_yat_gemm_function(model)
    nodes = len(yat_gemm_nodes(model))
    if loaded.layers_are_identifiable and nodes != yat_layers:
        raise ConsistencyError(f"export wrote {nodes} YatGemm nodes for {yat_layers} Yat layer calls")
    # What the graph declares, with the example's sizes (a saved torch.export program keeps its own shapes).
    if loaded.program is None:
        _check_dynamic_dims_kept(model, specs)
    # ... and the limits its lookups set (an embedding's vocabulary, a position table's length), recorded with them.
    specs = with_graph_limits(model_specs(model, specs), model)
    recorded = {
        **{f"{META_PREFIX}version.{k}": v for k, v in _package_versions().items()},
        META_SOURCE_SHA256: loaded.sha256,
        META_SOURCE_FORMAT: loaded.format,
        META_INPUTS: json.dumps([s.as_json() for s in specs]),
        META_DTYPE: dtype,
        META_YAT_LAYERS: str(yat_layers),
    }
    if len(specs) == 1 and specs[0].dtype in dtypes.NAMES:  # as yatdeploy 0.1's validate reads it
        recorded[META_INPUT_SHAPE] = ",".join(map(str, specs[0].shape))
    _set_metadata(model, recorded)
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
                                 f"ONNX opset {options.opset} lacks that op in {dtype}; export in another dtype "
                                 f"({option('dtype')})") from exc
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
            notes.append(f"{', '.join(widened)} computed in float32 between casts, as PyTorch computes on the CPU: "
                         f"ONNX Runtime's CPU provider has no {dtype} kernel for {them}")
    with progress.step(f"saving {output}"):
        save_atomically(model, output)
    return ExportResult(
        path=output,
        model=model,
        inputs=specs,
        dtype=dtype,
        output_names=output_names,
        rewrite=rewrite,
        yat_gemm_nodes=nodes,
        yat_layers=yat_layers,
        reference=reference,
        notes=notes,
    )
