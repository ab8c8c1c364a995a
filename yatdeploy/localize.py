"""Stage 5, validate: localize. Where an export that fails validation first computes something else, and a
minimal reproduction of it.

On a failure (or when asked: `validate --explain`), one input case is run again with the graph's intermediate
values exposed (a copy of the model with them added to graph.output, their types from shape inference) on a
backend that runs the ONNX graph as it is (one without a builder: ONNX Runtime, with the custom-op library or the
function), and the PyTorch model with forward hooks on every module (and on YatEmbed.attend), in its dtype and in
float64. The exporter records each node's module scopes (node metadata `pkg.torch.onnx.name_scopes`), which map
ONNX values to the modules that produced them: a module's output is the value its nodes hand to nodes outside it
(a YatGemm node to its Yat layer: the rewrite's YatGemmLayer keeps the layer's path; a YatEmbed's attend is a
scope under the YatEmbed). Each module call's output, in PyTorch's execution order, is compared with ONNX's under
its own derived tolerance (validation.derived_tolerance: PyTorch's own error against its float64 run scales it).
The first one that differs is the divergence, unless a value entering it already differs: then the divergence is
the op outside it that computed that value (an op of the enclosing module's own forward).

Runs: one, with every value exposed, when the values fit in EXPOSE_ALL_BYTES (estimated from PyTorch's module
outputs); otherwise a bisection over the module outputs in execution order (ceil(log2 N) runs, each exposing one
module's output), then one run exposing the values entering the module found (ceil(log2 N) + 1 in all).

A TensorRT engine's outputs are fixed when it is built, and marking intermediates as outputs changes what TensorRT
fuses: on a backend with a builder, intermediates can't be exposed, and the comparison is made on an ONNX Runtime
backend instead (which then either finds the export's own divergence, or agrees everywhere: the engine's own).

The reproduction (`write_reproduction`): the nodes from the diverging node's (or module's) inputs to its output as
a model (onnx.utils.Extractor, the YatGemm function and opset kept), the inputs as ONNX Runtime computed them
(inputs.npz; they agree with PyTorch, every module before agreed), PyTorch's outputs there (expected.npz) and in
float64 (float64.npz), and repro.json. `yatdeploy validate DIR` validates it (`validate_reproduction`).
"""

from __future__ import annotations

import ast
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx

from yatdeploy import backends, dtypes
from yatdeploy.cases import InputCase
from yatdeploy.errors import YatDeployError, first_line
from yatdeploy.graph import META_DTYPE, load_onnx
from yatdeploy.validation import (
    FirstDivergence,
    Tolerance,
    ValidationReport,
    ValidationRun,
    compare,
    derived_tolerance,
    validate_recorded,
)

NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # the dynamo exporter's module scopes of a node: ['', 'a', 'a.b', op]
EXPOSE_ALL_BYTES = 512 * 2**20  # above this (estimated), bisect instead of exposing every value at once
AGREEING_SHOWN = 5  # modules before the divergence the report names
ATTEND = "attend"  # a YatEmbed's attend calls, recorded as the module "<path>.attend"
REPRO_FILES = ("model.onnx", "inputs.npz", "expected.npz", "repro.json")  # float64.npz too, where there is one


@dataclass
class Call:
    """One module call in PyTorch, in completion order."""

    module: str  # its path ("" the model; "<YatEmbed path>.attend" an attend call)
    output: np.ndarray  # in the model's dtype
    inputs: list[np.ndarray]  # its tensor arguments (positional, then keyword)
    output64: np.ndarray | None = None
    inputs64: list[np.ndarray] | None = None


@dataclass
class Site:
    """Where a module call's values are in the ONNX graph."""

    call: Call
    outputs: list[str]  # candidate values (graph order): the first of the call's shape is its output
    nodes: list[onnx.NodeProto]  # the module's nodes (every call of it)


@dataclass
class Localization:
    """One backend's localization: what it found and what it cost."""

    backend: str
    case: str
    divergence: FirstDivergence | None
    compared: int  # module outputs compared
    runs: int  # backend runs made
    seconds: float
    mode: str  # "every value exposed in one run" or "bisection"
    note: str = ""
    sites: int = 0  # module calls mapped to ONNX values: the N of the bisection's ceil(log2 N) runs


# --- PyTorch: every module call's inputs and output -------------------------------------------------------------

def _first_tensor(value: object):
    import torch

    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _tensors(args: tuple, kwargs: dict) -> list:
    import torch

    return [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]


def module_calls(module, arrays: dict[str, np.ndarray], to_float64: bool = False) -> list[Call]:
    """Every module call of `module` on the inputs, in completion order (a child before its parent), with the
    YatEmbed.attend calls; `to_float64`: float inputs as float64 (for a module cast to float64)."""
    import torch

    from yatdeploy.reference import observed, to_numpy, to_torch

    calls: list[Call] = []

    def on_module(path: str, _module, args, kwargs, output) -> None:
        out = _first_tensor(output)
        if out is not None:
            calls.append(Call(path, to_numpy(out), [to_numpy(t) for t in _tensors(args, kwargs)]))

    def on_attend(path: str, query, out) -> None:
        calls.append(Call(f"{path}.{ATTEND}" if path else ATTEND, to_numpy(out), [to_numpy(query)]))

    xs = [torch.from_numpy(np.asarray(a, dtype=np.float64)) if to_float64 and _floating(a) else to_torch(a)
          for a in arrays.values()]
    with observed(module, on_module, on_attend), torch.inference_mode():
        module(*xs)
    return calls


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16


def torch_calls(reference, arrays: dict[str, np.ndarray]) -> tuple[list[Call], str]:
    """The reference's module calls in its dtype, each with its float64 counterpart where the model runs in float64
    with the same calls; and what the tolerance rests on."""
    import torch

    from yatdeploy.reference import cast_copy

    calls = module_calls(reference.module, arrays)
    if reference.dtype == "float64":
        for call in calls:
            call.output64, call.inputs64 = call.output, call.inputs
        return calls, "the PyTorch run itself (a float64 export)"
    try:
        calls64 = module_calls(cast_copy(reference.module, torch.float64), arrays, to_float64=True)
    except Exception as exc:
        return calls, f"no float64 run ({first_line(exc)}): tolerances are a multiple of each value's scale"
    if [c.module for c in calls64] != [c.module for c in calls]:
        return calls, "no float64 run (it calls other modules): tolerances are a multiple of each value's scale"
    for call, call64 in zip(calls, calls64):
        if call64.output.shape == call.output.shape and len(call64.inputs) == len(call.inputs):
            call.output64, call.inputs64 = call64.output, call64.inputs
    return calls, "PyTorch's module outputs against its float64 run"


# --- ONNX: the values each module produced ----------------------------------------------------------------------

def node_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The module paths a node was exported in, outermost first ("" the model), None where the exporter recorded
    none."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return [str(s) for s in scopes[:-1]]  # the last is the op itself
    return None


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type
    return types


def _rank(value_type: onnx.TypeProto | None) -> int | None:
    if value_type is None or not value_type.tensor_type.HasField("shape"):
        return None
    return len(value_type.tensor_type.shape.dim)


def _torch_key(scope: str, modules: dict[str, object]) -> str | None:
    """The recorded module a scope is: the module of that path, or a YatEmbed's attend (the rewrite exports it as a
    layer under the YatEmbed's path); None for a scope PyTorch has no module for."""
    from nmn.torch import YatEmbed

    if scope in modules:
        return scope
    parent = scope
    while "." in parent:
        parent = parent.rpartition(".")[0]
        if isinstance(modules.get(parent), YatEmbed):
            return f"{parent}.{ATTEND}"
    if isinstance(modules.get(""), YatEmbed) and scope:
        return ATTEND
    return None


class Graph:
    """The export's graph as localization reads it: producers, consumers, scopes, the values' types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.initializers = {i.name for i in model.graph.initializer}
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.outputs = [o.name for o in model.graph.output]
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.scopes = {id(node): node_scopes(node) for node in self.nodes}
        self.scoped = any(s is not None for s in self.scopes.values())
        self.types = _value_types(model)

    def entering(self, nodes: Sequence[onnx.NodeProto]) -> list[str]:
        """The values `nodes` consume from outside them: not initializers, not constants."""
        inside = {out for node in nodes for out in node.output}
        seen: dict[str, None] = {}
        for node in nodes:
            for name in node.input:
                if not name or name in inside or name in self.initializers or name in seen:
                    continue
                producer = self.producer.get(name)
                if producer is not None and producer.op_type == "Constant":
                    continue
                seen[name] = None
        return list(seen)

    def sites(self, calls: list[Call], modules: dict[str, object]) -> list[Site]:
        """Each module call's candidate output values: the float values its module's nodes hand to nodes outside
        them (or to the graph's outputs), of the call's rank; the calls of a module called k times take its
        candidates in k equal runs, in order."""
        members: dict[str, list[onnx.NodeProto]] = {"": list(self.nodes)}
        for node in self.nodes:
            for scope in self.scopes[id(node)] or []:
                key = _torch_key(scope, modules) if scope else ""
                if key:
                    members.setdefault(key, [])
                    if not members[key] or members[key][-1] is not node:
                        members[key].append(node)
        per_module: dict[str, list[Call]] = {}
        for call in calls:
            per_module.setdefault(call.module, []).append(call)
        sites = []
        for key, module_calls_ in per_module.items():
            nodes = members.get(key)
            if not nodes:
                continue  # no ONNX node of its own (an identity, a dropout), or a scope not recorded
            inside = {id(n) for n in nodes}
            escaping = [out for node in nodes for out in node.output if out and self._escapes(out, inside)]
            rank = module_calls_[0].output.ndim
            candidates = [v for v in escaping if _rank(self.types.get(v)) in (None, rank) and self._is_float(v)]
            count = len(module_calls_)
            if not candidates or len(candidates) % count:
                continue
            step = len(candidates) // count
            for index, call in enumerate(module_calls_):
                sites.append(Site(call, candidates[index * step:(index + 1) * step], nodes))
        order = {id(call): i for i, call in enumerate(calls)}
        return sorted(sites, key=lambda s: order[id(s.call)])

    def _escapes(self, value: str, inside: set[int]) -> bool:
        if value in self.outputs:
            return True
        return any(id(node) not in inside for node in self.consumers.get(value, ()))

    def _is_float(self, value: str) -> bool:
        value_type = self.types.get(value)
        if value_type is None:
            return True
        return graph_dtype(value_type.tensor_type.elem_type) in dtypes.NAMES


def graph_dtype(elem_type: int) -> str:
    from yatdeploy.graph import dtype_name

    return dtype_name(elem_type)


# --- running the backend with values exposed --------------------------------------------------------------------

class Exposer:
    """Runs a copy of the model with chosen intermediate values as extra outputs on one backend, counting runs."""

    def __init__(self, graph: Graph, backend, arrays: dict[str, np.ndarray]) -> None:
        self.graph, self.backend, self.arrays = graph, backend, arrays
        self.runs = 0

    def run(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        model = onnx.ModelProto()
        model.CopyFrom(self.graph.model)
        extra = [n for n in dict.fromkeys(names) if n not in self.graph.outputs and n in self.graph.types
                 and n not in self.graph.initializers]
        for name in extra:
            model.graph.output.append(onnx.helper.make_value_info(name, self.graph.types[name]))
        with tempfile.TemporaryDirectory(prefix="yatdeploy-localize-") as folder:
            path = Path(folder) / "exposed.onnx"
            onnx.save(model, str(path))
            runner = self.backend.open(path, backends.Options())
            got = runner.run(dict(self.arrays))
        self.runs += 1
        return {**self.arrays, **dict(zip([*self.graph.outputs, *extra], got))}


# --- comparing ---------------------------------------------------------------------------------------------------

@dataclass
class Verdict:
    value: str
    max_abs_err: float
    tolerance: float
    torch_err: float | None
    passed: bool


def judge(dtype: str, name: str, got: np.ndarray, want: np.ndarray, want64: np.ndarray | None) -> Verdict | None:
    """ONNX's `got` against PyTorch's `want` under `want`'s derived tolerance; None where the shapes differ."""
    if tuple(got.shape) != tuple(want.shape):
        return None
    if not (_floating(want) and _floating(got)):
        exact = bool(np.array_equal(np.asarray(got), np.asarray(want)))
        return Verdict(name, 0.0 if exact else math.inf, 0.0, None, exact)
    tol, torch_err, _ = derived_tolerance(dtype, want, want64)
    max_abs, _, bad = compare(got, want, tol)
    return Verdict(name, max_abs, tol.atol, torch_err, bad == 0)


def _site_verdict(dtype: str, site: Site, values: dict[str, np.ndarray]) -> Verdict | None:
    for name in site.outputs:
        if name in values:
            verdict = judge(dtype, name, values[name], site.call.output, site.call.output64)
            if verdict is not None:
                return verdict
    return None


def _entering_verdicts(dtype: str, graph: Graph, site: Site, values: dict[str, np.ndarray]) -> list[Verdict]:
    """The float values entering the module, each against the call's PyTorch inputs of its shape (it agrees when
    one of them agrees with it)."""
    call = site.call
    verdicts = []
    for name in graph.entering(site.nodes):
        got = values.get(name)
        if got is None or not _floating(got):
            continue
        best = None
        for index, want in enumerate(call.inputs):
            want64 = call.inputs64[index] if call.inputs64 else None
            verdict = judge(dtype, name, got, want, want64) if _floating(want) else None
            if verdict is not None and (best is None or verdict.passed or not best.passed):
                best = verdict
                if verdict.passed:
                    break
        if best is not None:
            verdicts.append(best)
    return verdicts


def _innermost_module(graph: Graph, node: onnx.NodeProto, modules: dict[str, object]) -> str:
    for scope in reversed(graph.scopes.get(id(node)) or []):
        key = _torch_key(scope, modules) if scope else ""
        if key is not None:
            return key
    return ""


@dataclass
class Found:
    """A divergence found: the value, the node that computed it, the module it belongs to, PyTorch's value."""

    module: str
    node: onnx.NodeProto
    verdict: Verdict
    inputs: list[str]  # the reproduction's inputs: the values entering the node(s) from outside
    nodes: list[onnx.NodeProto]  # the reproduction's nodes
    expected: np.ndarray
    expected64: np.ndarray | None


def _classify(dtype: str, graph: Graph, site: Site, verdict: Verdict, values: dict[str, np.ndarray],
              modules: dict[str, object], agreed: set[str]) -> Found:
    """The module's own divergence, or, where a value entering it already differs, the op outside it that computed
    that value. A value entering it that is the agreeing output of a module before it is not such a value: there the
    module reads another value than PyTorch's does (the graph is wired otherwise), which is its own divergence."""
    for entering in _entering_verdicts(dtype, graph, site, values):
        producer = graph.producer.get(entering.value)
        if entering.passed or producer is None or entering.value in agreed:
            continue
        want_index = next(i for i, w in enumerate(site.call.inputs) if tuple(w.shape) == values[entering.value].shape)
        want64 = site.call.inputs64[want_index] if site.call.inputs64 else None
        return Found(_innermost_module(graph, producer, modules), producer, entering,
                     graph.entering([producer]), [producer], site.call.inputs[want_index], want64)
    node = graph.producer[verdict.value]
    return Found(site.call.module, node, verdict, graph.entering(site.nodes), site.nodes, site.call.output,
                 site.call.output64)


def localize_case(reference, onnx_model: onnx.ModelProto, backend, case: InputCase, dtype: str,
                  max_exposed_bytes: int = EXPOSE_ALL_BYTES) -> tuple[Localization, Found | None, dict]:
    """Localize on one backend and one input case: (what was found, the divergence, the values exposed)."""
    started = time.perf_counter()
    graph = Graph(onnx_model)
    if not graph.scoped:
        return Localization(backend.name, case.name, None, 0, 0, 0.0, "",
                            "the export records no module scopes (node metadata pkg.torch.onnx.name_scopes): "
                            "only a dynamo export of a PyTorch model can be localized"), None, {}
    calls, _ = torch_calls(reference, case.arrays)
    modules = dict(reference.module.named_modules())
    sites = graph.sites(calls, modules)
    exposer = Exposer(graph, backend, case.arrays)
    node_outputs = [out for node in graph.nodes for out in node.output if out]
    estimate = len(node_outputs) * max((c.output.nbytes for c in calls), default=0)
    values: dict[str, np.ndarray] = {}
    agreeing: list[str] = []
    agreed: set[str] = set()  # the ONNX values of the module outputs that agree
    found: Found | None = None
    if estimate <= max_exposed_bytes:
        mode = "every value exposed in one run"
        values = exposer.run(node_outputs)
        compared = 0
        for site in sites:
            verdict = _site_verdict(dtype, site, values)
            if verdict is None:
                continue
            compared += 1
            if not verdict.passed:
                found = _classify(dtype, graph, site, verdict, values, modules, agreed)
                break
            agreeing.append(site.call.module)
            agreed.add(verdict.value)
    else:
        mode = "bisection"
        verdicts: dict[int, Verdict | None] = {}

        def check(index: int) -> Verdict | None:
            if index not in verdicts:
                verdicts[index] = _site_verdict(dtype, sites[index], exposer.run(sites[index].outputs))
            return verdicts[index]

        def diverges(index: int) -> bool:
            verdict = check(index)
            return verdict is not None and not verdict.passed

        low, high = 0, len(sites) - 1  # the last (the model's outputs) diverges where validation failed
        while low < high:
            middle = (low + high) // 2
            if diverges(middle):
                high = middle
            else:
                low = middle + 1
        compared = len(verdicts)
        agreeing = [sites[i].call.module for i, v in sorted(verdicts.items()) if v is not None and v.passed and i < low]
        if sites:
            site = sites[low]
            nodes_entering = graph.entering(site.nodes)
            producers_inputs = [i for name in nodes_entering if name in graph.producer
                                for i in graph.entering([graph.producer[name]])]
            values = exposer.run([*site.outputs, *nodes_entering, *producers_inputs])
            verdict = _site_verdict(dtype, site, values)
            compared = len(verdicts) + (low not in verdicts)
            # The earlier modules' outputs among the values exposed (those entering this one) that agree.
            earlier = [_site_verdict(dtype, sites[i], values) for i in range(low)]
            agreed = {v.value for v in [*verdicts.values(), *earlier] if v is not None and v.passed}
            if verdict is not None and not verdict.passed:
                found = _classify(dtype, graph, site, verdict, values, modules, agreed)
    divergence = None
    if found is not None:
        divergence = FirstDivergence(
            module=found.module, onnx_node=found.node.name, op_type=found.node.op_type, backend=backend.name,
            max_abs_err=found.verdict.max_abs_err, tolerance=found.verdict.tolerance,
            torch_err=found.verdict.torch_err, case=case.name, onnx_value=found.verdict.value,
            agreeing_before=list(dict.fromkeys(m for m in agreeing if m != found.module))[-AGREEING_SHOWN:])
    result = Localization(backend.name, case.name, divergence, compared, exposer.runs,
                          time.perf_counter() - started, mode, sites=len(sites))
    return result, found, values


# --- the reproduction --------------------------------------------------------------------------------------------

def _storable(array: np.ndarray) -> np.ndarray:
    """An array as an .npz holds it: bfloat16 (which numpy can't store) as float32, exactly."""
    return array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array


def _as_type(array: np.ndarray, value_type: onnx.TypeProto | None) -> np.ndarray:
    if value_type is None:
        return array
    name = graph_dtype(value_type.tensor_type.elem_type)
    if name in dtypes.NAMES:
        return np.asarray(array).astype(dtypes.by_name(name).numpy)
    return np.asarray(array).astype(name)


def write_reproduction(folder: str | Path, graph: Graph, found: Found, values: dict[str, np.ndarray],
                       divergence: FirstDivergence, dtype: str) -> Path:
    """The minimal reproduction of a divergence in `folder` (REPRO_FILES, and float64.npz where there is one)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise YatDeployError(f"can't write the reproduction to {folder}: {exc.strerror or exc}") from exc
    output = divergence.onnx_value
    missing = [name for name in found.inputs if name not in values]
    if missing:
        raise YatDeployError(f"the reproduction's inputs {', '.join(missing)} were not exposed")
    typed = onnx.shape_inference.infer_shapes(graph.model)
    sub = onnx.utils.Extractor(typed).extract_model(list(found.inputs), [output])
    sub.metadata_props.add(key=META_DTYPE, value=dtype)
    sub.doc_string = (f"yatdeploy reproduction: module '{divergence.module}', node {divergence.onnx_node} "
                      f"({divergence.op_type})")
    onnx.save(sub, str(folder / "model.onnx"))
    out_type = graph.types.get(output)
    np.savez(folder / "inputs.npz", **{name: _storable(values[name]) for name in found.inputs})
    np.savez(folder / "expected.npz", **{output: _storable(_as_type(found.expected, out_type))})
    if found.expected64 is not None:
        np.savez(folder / "float64.npz", **{output: np.asarray(found.expected64, dtype=np.float64)})
    record = {key: value for key, value in asdict(divergence).items() if key not in ("reproduction",)}
    record["dtype"] = dtype
    (folder / "repro.json").write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
    return folder


def is_reproduction(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "repro.json").is_file()


def validate_reproduction(folder: str | Path, *, tolerance: Tolerance | None = None,
                          backend_names: Sequence[str] | None = None, progress=None) -> ValidationReport:
    """A reproduction (`write_reproduction`) validated on every backend: its model on its inputs against the
    recorded PyTorch outputs, by validation's rule (validation.validate_recorded)."""
    from yatdeploy.progress import QUIET

    folder = Path(folder)
    missing = [name for name in REPRO_FILES if not (folder / name).is_file()]
    if missing:
        raise YatDeployError(f"{folder} is not a reproduction: it has no {', '.join(missing)}")
    model = load_onnx(folder / "model.onnx")
    types = {v.name: v.type for v in [*model.graph.input, *model.graph.output]}
    with np.load(folder / "inputs.npz", allow_pickle=False) as archive:
        arrays = {v.name: _as_type(archive[v.name], types[v.name]) for v in model.graph.input
                  if v.name in archive.files}
    absent = [v.name for v in model.graph.input if v.name not in arrays]
    if absent:
        raise YatDeployError(f"{folder / 'inputs.npz'} has no array for the model's input {', '.join(absent)}")
    names = [o.name for o in model.graph.output]
    with np.load(folder / "expected.npz", allow_pickle=False) as archive:
        expected = [_as_type(archive[name], types[name]) for name in names]
    float64 = None
    if (folder / "float64.npz").is_file():
        with np.load(folder / "float64.npz", allow_pickle=False) as archive:
            float64 = [archive[name] for name in names]
    return validate_recorded(folder / "model.onnx", InputCase("reproduction inputs", arrays), expected, float64,
                             against=str(folder / "expected.npz"), tolerance=tolerance, backend_names=backend_names,
                             progress=progress or QUIET)


# --- from a validation: which backend, which case ----------------------------------------------------------------

def _failing_cases(report: ValidationReport, backend: str) -> list[str]:
    for ran in report.backends:
        if ran.name == backend:
            return [c.case for c in ran.comparisons if not c.passed and c.max_abs_err is not None]
    return []


def _pick_case(cases: list[InputCase], failing: list[str]) -> InputCase:
    """The failing case with the most rows (the most values to measure PyTorch's error on), else the largest."""
    pool = [c for c in cases if c.name in failing] or cases
    return max(pool, key=lambda c: (c.rows, -pool.index(c)))


def localizer(explain: bool = False, reproduction: str | Path | None = None,
              max_exposed_bytes: int = EXPOSE_ALL_BYTES,
              done: Callable[[list[Localization]], None] | None = None) -> Callable[[ValidationRun], None]:
    """validation.validate's `localize`: on a failure of values (or always, `explain`), localize on each backend
    that failed (every available one, `explain`) and fill the report; `reproduction`: write the first divergence's
    reproduction there; `done`: given each backend's Localization (the benchmark's counts)."""

    def localize(run: ValidationRun) -> None:
        report = run.report
        valued = [b for b in report.backends if b.available
                  and any(not c.passed and c.max_abs_err is not None for c in b.comparisons)]
        if not explain and not valued:
            return
        if getattr(run.reference, "module", None) is None or not run.reference.loaded.layers_are_identifiable:
            report.localization.append(f"not localized: it hooks a PyTorch model's modules, and this "
                                       f"{run.reference.framework} model ({run.reference.loaded.format}) has none "
                                       "to hook")
            return
        targets = valued if not explain else [b for b in report.backends if b.available]
        onnx_model = onnx.load(str(run.onnx_path))
        results = []
        for ran in targets:
            backend = backends.get(ran.name)
            on = backend
            if backend.builder is not None:
                on = next((b for b in backends.all() if b.builder is None and b.availability() is None
                           and any(r.name == b.name for r in report.backends)), None)
                if on is None:
                    report.localization.append(f"{ran.name}: an engine's outputs are fixed when it is built (marking "
                                               "intermediates changes what it fuses), so they can't be exposed; and "
                                               "no ONNX Runtime backend ran to compare on instead")
                    continue
            case = _pick_case(run.cases, _failing_cases(report, ran.name))
            with run.progress.step(f"localizing on {on.name} ({case.name})"):
                try:
                    result, found, values = localize_case(run.reference, onnx_model, on, case, run.dtype,
                                                          max_exposed_bytes)
                except YatDeployError as exc:
                    report.localization.append(f"{ran.name}: not localized: {exc.text}")
                    continue
            results.append(result)
            prefix = ran.name if on is ran or on.name == ran.name else (
                f"{ran.name}: an engine's outputs are fixed when it is built (marking intermediates changes what it "
                f"fuses), so its intermediates can't be exposed; compared on {on.name} instead")
            if result.note:
                report.localization.append(f"{prefix}: {result.note}")
            elif result.divergence is None:
                tail = (": the divergence is the engine's own (its kernels or fusions)" if on.name != ran.name
                        else "")
                report.localization.append(f"{prefix}: no module differs from PyTorch beyond its tolerance on "
                                           f"{case.name} ({result.compared} module outputs compared, {result.runs} "
                                           f"run(s), {result.mode}){tail}")
            else:
                report.localization.append(f"{prefix}: module '{result.divergence.module or '<model>'}' diverges "
                                           f"first on {case.name} ({result.compared} module outputs compared in "
                                           f"{result.runs} run(s), {result.mode}, {result.seconds:.1f} s)")
                if report.first_divergence is None:
                    report.first_divergence = result.divergence
                    if reproduction is not None:
                        graph = Graph(onnx_model)
                        write_reproduction(reproduction, graph, found, values, result.divergence, run.dtype)
                        report.first_divergence.reproduction = str(reproduction)
        if report.first_divergence is not None and reproduction is None:
            report.localization.append("pass --repro DIR (reproduction=DIR) to write a minimal reproduction of it")
        if done is not None:
            done(results)

    return localize
