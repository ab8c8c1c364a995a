"""Stage 4, export: `torch.onnx.export` of the rewritten module (or the cache stage's decoder), with bare YatGemm
nodes.

The dynamo exporter (`torch.export`), dims dynamic as the settled inputs label them, the YatGemm op translated
to a bare `yat.YatGemm` node (the function is attached by the next stage: docs/architecture.md says why); a
TorchScript model through the TorchScript-based exporter, which is the one that reads it. An exporter's error
becomes one line naming its innermost cause.
"""

from __future__ import annotations

import io
import warnings
from contextlib import redirect_stderr, redirect_stdout

import onnx
import torch

from yatdeploy import dtypes
from yatdeploy.decoder import ATTENTION_MASK, BATCH, INPUT_IDS, PAST, SEQ, TOTAL, DecoderLayout
from yatdeploy.errors import ConsistencyError, YatDeployError, first_line
from yatdeploy.exporting.decoder import Cached, decoder_inputs, empty_past
from yatdeploy.exporting.example import ExampleRun
from yatdeploy.exporting.rewrite import Rewritten
from yatdeploy.exporting.settle import MAX_DIM, SettledInputs
from yatdeploy.inputs import InputSpec
from yatdeploy.ops.onnx_schema import yat_gemm_op
from yatdeploy.progress import QUIET, Progress
from yatdeploy.spec import PLUGIN_NAMESPACE, PLUGIN_VERSION


def export_onnx(rewritten: Rewritten, settled: SettledInputs, run: ExampleRun,
                 progress: Progress = QUIET) -> onnx.ModelProto:
    specs = list(settled.specs)
    with progress.step(f"exporting to ONNX (opset {settled.opset}, {_dims_text(specs)})"):
        model = _torch_export_to_onnx(rewritten.target, _traceable(run.examples, specs), specs,
                                      run.reference.output_names, settled.opset)
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", settled.opset) != settled.opset:
        raise ConsistencyError(f"torch.onnx.export wrote opset {opsets['']} for opset {settled.opset}")
    return model


def _dims_text(specs: list[InputSpec]) -> str:
    labels = list(dict.fromkeys(d.label for s in specs for d in s.dims if d.label))
    return f"dynamic {', '.join(labels)}" if labels else "static shapes"


def _traceable(tensors: tuple[torch.Tensor, ...], specs: list[InputSpec]) -> tuple[torch.Tensor, ...]:
    """The examples as the exporter traces them: repeated to size 2 along any dynamic dim where they have size
    1, since torch.export may specialise a dim of size 1 to a constant."""
    out = []
    for tensor, spec in zip(tensors, specs):
        repeats = [2 if d.label is not None and d.size == 1 else 1 for d in spec.dims]
        out.append(tensor.repeat(*repeats) if any(r > 1 for r in repeats) else tensor)
    return tuple(out)


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
    message = " ".join(first_line(exc).split()).split(" Next steps:")[0].strip()
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    if root is not exc:
        message += f" (caused by {type(root).__name__}: {' '.join(first_line(root).split())})"
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
    return _run_exporter(module_or_program, xs, dynamic_shapes, [s.name for s in specs], output_names, opset)


# The example a decoder is traced on: sizes that differ from each other and from 0 and 1, which torch.export
# would specialise or unify (past + seq = 8).
_TRACE_BATCH, _TRACE_SEQ, _TRACE_PAST = 2, 3, 5


def export_decoder(cached: Cached, settled: SettledInputs, progress: Progress = QUIET) -> onnx.ModelProto:
    """A decoder (the cache stage's DecoderModule) through the same exporter, every dim of the contract dynamic and
    left to torch.export to relate (Dim.AUTO: the attention mask's length is the past's plus the input's), then
    named as the contract names them."""
    layout = cached.layout
    ids = torch.randint(0, layout.vocab_size, (_TRACE_BATCH, _TRACE_SEQ))
    past = empty_past(layout, _TRACE_BATCH, dtypes.by_name(settled.reference.dtype).torch, _TRACE_PAST)
    dynamic = [(0, 1), (0, 1), *([(0, 1)] if layout.position_ids else []), *[(0, 2)] * (2 * layout.layers)]
    shapes = tuple({i: torch.export.Dim.AUTO for i in dims} for dims in dynamic)
    with progress.step(f"exporting the decoder to ONNX (opset {settled.opset}, {layout.layers} attention layer(s) "
                       "with a KV cache; dynamic batch, seq and past)"):
        model = _run_exporter(cached.module, decoder_inputs(layout, ids, past), (shapes,), layout.input_names(),
                              layout.output_names(), settled.opset)
    _name_dims(model, layout)
    return model


def _name_dims(model: onnx.ModelProto, layout: DecoderLayout) -> None:
    """The exporter's symbols (s0, s1 + s3...) renamed as the contract's dims, wherever they appear."""
    by_name = {v.name: v for v in (*model.graph.input, *model.graph.output)}

    def symbol(name: str, axis: int) -> str:
        return by_name[name].type.tensor_type.shape.dim[axis].dim_param

    names = {symbol(INPUT_IDS, 0): BATCH, symbol(INPUT_IDS, 1): SEQ, symbol(ATTENTION_MASK, 1): TOTAL}
    seq = symbol(INPUT_IDS, 1)
    sums = set()
    for name in layout.past_names():  # each layer's past may have a symbol of its own
        past = symbol(name, 2)
        names[past] = PAST
        sums |= {f"{seq} + {past}", f"{past} + {seq}"}
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
            elif dim.dim_param in sums:
                dim.dim_param = TOTAL




def _run_exporter(module_or_program: object, xs: tuple[torch.Tensor, ...], dynamic_shapes: object,
                  input_names: list[str], output_names: list[str], opset: int) -> onnx.ModelProto:
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
                    input_names=input_names,
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
