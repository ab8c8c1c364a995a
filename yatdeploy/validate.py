"""Stage 5, validate: compare an ONNX export with the PyTorch model on every available backend.

Checks, in order: YatGemm nodes against YatNMN layers, then per backend and input case the output
count, names, shapes and dtypes, then the values: |onnx - torch| <= atol + rtol * |torch| elementwise.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from yatdeploy import dtypes, graph, runtime
from yatdeploy.attach import yat_gemm_nodes
from yatdeploy.errors import InputSpecError, OnnxModelError, YatDeployError
from yatdeploy.export import (
    META_INPUT_SHAPE,
    META_SOURCE_SHA256,
    output_names_for,
    prepare_module,
    run_reference,
)
from yatdeploy.loading import LoadedModel
from yatdeploy.progress import QUIET, Progress
from yatdeploy.rewrite import count_yat_layers

DEFAULT_BATCHES = (1, 7, 32)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


# Defaults per dtype: float32's are the documented CLI defaults; 16-bit ones allow one or two ulps
# after the float32-accumulated YatGemm and the ordinary layers around it. float64 is bounded by
# YatGemm's float32 attributes (alpha and eps round at ~6e-8 relative) and by the spherical mode's
# ~2e-8/|x| distance difference (docs/yatgemm.md), which grows where the distance is small.
DEFAULT_TOLERANCES = {
    "float32": Tolerance(atol=1e-5, rtol=1e-4),
    "float64": Tolerance(atol=1e-8, rtol=1e-5),
    "float16": Tolerance(atol=1e-3, rtol=1e-2),
    "bfloat16": Tolerance(atol=1e-2, rtol=5e-2),
}


@dataclass
class InputCase:
    name: str
    array: np.ndarray


@dataclass
class OutputComparison:
    case: str
    output: str
    shape: list[int]
    dtype: str
    max_abs_err: float | None
    max_rel_err: float | None
    passed: bool
    problem: str | None = None


@dataclass
class BackendReport:
    name: str
    description: str
    available: bool
    reason: str | None = None
    comparisons: list[OutputComparison] = field(default_factory=list)
    # How YatGemm ran, from ONNX Runtime's profiler: {provider: kernel runs}; empty = inlined function.
    yat_gemm_kernel_runs: dict[str, int] = field(default_factory=dict)
    yat_gemm_execution: str | None = None
    # None when YatGemm ran as this backend intends; otherwise what went wrong.
    execution_problem: str | None = None

    @property
    def passed(self) -> bool:
        return (self.available and bool(self.comparisons) and all(c.passed for c in self.comparisons)
                and self.execution_problem is None)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class ValidationReport:
    model: str
    against: str
    dtype: str
    tolerance: Tolerance
    checks: list[Check]
    backends: list[BackendReport]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        ran = [b for b in self.backends if b.available]
        return bool(ran) and all(c.passed for c in self.checks) and all(b.passed for b in ran)

    def failures(self) -> list[str]:
        lines = [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]
        for backend in self.backends:
            if backend.execution_problem:
                lines.append(f"{backend.name}: {backend.execution_problem}")
            for comp in backend.comparisons:
                if not comp.passed:
                    lines.append(f"{backend.name}: output '{comp.output}' on {comp.case}: {comp.problem}")
        if not any(b.available for b in self.backends):
            lines.append("no backend could run the model")
        return lines

    def to_json(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        for backend, raw in zip(self.backends, data["backends"]):
            raw["passed"] = backend.passed
        return data

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, allow_nan=True) + "\n")


def compare(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> tuple[float, float, int]:
    """Max abs error, max rel error (over |expected| > atol) and how many elements break the tolerance.

    Non-finite values must match exactly: NaN with NaN, and an infinity with the same infinity.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    finite = np.isfinite(a) & np.isfinite(e)
    exact = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & np.isinf(e) & (np.sign(a) == np.sign(e)))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - e), np.where(exact, 0.0, np.inf))
    within = exact | (finite & (diff <= tol.atol + tol.rtol * np.abs(np.where(finite, e, 0.0))))
    bad = int(np.count_nonzero(~within))
    max_abs = float(diff.max()) if diff.size else 0.0
    significant = finite & (np.abs(e) > tol.atol)
    max_rel = float((diff[significant] / np.abs(e[significant])).max()) if significant.any() else 0.0
    return max_abs, max_rel, bad


def _onnx_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inputs = graph.graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxModelError(f"the model has {len(inputs)} inputs; yatdeploy validates single-input models")
    return inputs[0]


def input_dtype(model: onnx.ModelProto) -> str:
    """The CLI name of the model input's dtype; the input must be of a floating type YatGemm admits."""
    graph_input = _onnx_input(model)
    try:
        return dtypes.by_onnx(graph_input.type.tensor_type.elem_type).name
    except KeyError:
        raise OnnxModelError(f"the model's input '{graph_input.name}' is not of a floating type") from None


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def resolve_input_shape(model: onnx.ModelProto, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The per-sample input shape: --input-shape, else the export's record, else the model's static dims."""
    graph_input = _onnx_input(model)
    dims = graph_input.type.tensor_type.shape.dim
    if given is not None:
        if len(given) != len(dims):
            raise InputSpecError(
                f"--input-shape {','.join(map(str, given))} has rank {len(given)}; the model's input "
                f"'{graph_input.name}' has rank {len(dims)}"
            )
        for i, (want, dim) in enumerate(zip(given, dims)):
            if i > 0 and dim.HasField("dim_value") and dim.dim_value != want:
                raise InputSpecError(
                    f"--input-shape {','.join(map(str, given))}: dimension {i} is {want}, "
                    f"the model's input '{graph_input.name}' has {dim.dim_value}"
                )
        return given
    recorded = _metadata(model).get(META_INPUT_SHAPE)
    if recorded:
        return tuple(int(d) for d in recorded.split(","))
    shape = []
    for i, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif i == 0:
            shape.append(1)
        else:
            raise InputSpecError(
                f"the model's input '{graph_input.name}' has a dynamic dimension {i}", "pass --input-shape"
            )
    return tuple(shape)


def random_cases(sample_shape: Sequence[int], dtype: str, batches: Sequence[int], seed: int) -> list[InputCase]:
    rng = np.random.default_rng(seed)
    np_dtype = dtypes.by_name(dtype).numpy
    cases = []
    for batch in batches:
        shape = (batch, *sample_shape[1:])
        cases.append(InputCase(f"random batch {batch}", rng.standard_normal(shape).astype(np.float32).astype(np_dtype)))
    return cases


def load_input_cases(paths: Sequence[str | Path], sample_shape: Sequence[int], dtype: str) -> list[InputCase]:
    """Arrays from .npy files and from every array in .npz files, checked against the input shape."""
    np_dtype = dtypes.by_name(dtype).numpy
    cases: list[InputCase] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise InputSpecError(f"--inputs {path}: no such file")
        try:
            loaded = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputSpecError(f"--inputs {path}: not a .npy or .npz file ({exc})") from exc
        named = [(path.name, loaded)] if isinstance(loaded, np.ndarray) else list(_npz_members(path, loaded))
        for name, array in named:
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise InputSpecError(f"--inputs {name}: dtype {array.dtype} is not numeric")
            if array.ndim != len(sample_shape) or tuple(array.shape[1:]) != tuple(sample_shape[1:]):
                raise InputSpecError(
                    f"--inputs {name}: shape {array.shape} does not fit the model input "
                    f"(batch, {', '.join(map(str, sample_shape[1:]))})"
                )
            cases.append(InputCase(name, array.astype(np_dtype)))
    return cases


def _cases_for(graph_input: onnx.ValueInfoProto, random: list[InputCase], user: list[InputCase],
               sample_shape: Sequence[int], dtype: str, seed: int) -> list[InputCase]:
    """The cases to run: every one when the input has a batch dimension; for a fixed first dimension,
    the random cases at that size and the user's, each of which must fit it (none is dropped)."""
    shape = graph.dims(graph_input)
    if not graph.has_batch_dim(shape):
        fixed = shape[0] if shape else None
        for case in user:
            if fixed is not None and case.array.shape[0] != fixed:
                raise InputSpecError(
                    f"--inputs {case.name}: {case.array.shape[0]} rows, but the model's input "
                    f"'{graph_input.name}' has a fixed first dimension of {fixed}",
                    "give arrays of that many rows, or export with a dynamic batch dimension",
                )
        random = random_cases(sample_shape, dtype, (fixed,), seed) if fixed is not None else random[:1]
    cases = random + user
    empty = [c.name for c in cases if c.array.size == 0]
    if empty:
        raise InputSpecError(f"input case {empty[0]} holds no values: a comparison on it would compare nothing")
    return cases


def _npz_members(path: Path, archive) -> Iterator[tuple[str, np.ndarray]]:
    """Every array of an .npz, or an error naming the member that can't be read."""
    with archive:
        for key in archive.files:
            try:
                array = archive[key]
            except ValueError as exc:  # object arrays need pickle, which is never allowed here
                raise InputSpecError(f"--inputs {path.name}[{key}]: {exc}", "store plain numeric arrays") from exc
            except Exception as exc:  # a damaged member: bad CRC, truncated data, a bad .npy header
                raise InputSpecError(f"--inputs {path.name}[{key}]: can't be read ({type(exc).__name__}: {exc})") from exc
            yield f"{path.name}[{key}]", array


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    ftype = dtypes.by_name(dtype)
    if ftype.name == "bfloat16":
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(dtypes.by_name("bfloat16").numpy)
    return tensor.numpy()


def _compare_case(
    case: InputCase, names: list[str], got: list[np.ndarray], want: list[np.ndarray], tol: Tolerance
) -> list[OutputComparison]:
    if len(got) != len(want):
        return [
            OutputComparison(case.name, "*", [], "", None, None, False,
                             f"{len(got)} outputs, PyTorch gives {len(want)}")
        ]
    comps = []
    for name, g, w in zip(names, got, want):
        shape = list(g.shape)
        if tuple(g.shape) != tuple(w.shape):
            comps.append(OutputComparison(case.name, name, shape, str(g.dtype), None, None, False,
                                          f"shape {tuple(g.shape)}, PyTorch gives {tuple(w.shape)}"))
            continue
        if g.dtype != w.dtype:
            comps.append(OutputComparison(case.name, name, shape, str(g.dtype), None, None, False,
                                          f"dtype {g.dtype}, PyTorch gives {w.dtype}"))
            continue
        max_abs, max_rel, bad = compare(g, w, tol)
        problem = None
        if bad:
            problem = (f"{bad} of {g.size} values differ beyond atol={tol.atol:g} + rtol={tol.rtol:g}*|torch| "
                       f"(max abs err {max_abs:.3g}, max rel err {max_rel:.3g})")
        comps.append(OutputComparison(case.name, name, shape, str(g.dtype), max_abs, max_rel, bad == 0, problem))
    return comps


def validate(
    onnx_path: str | Path,
    loaded: LoadedModel,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_files: Sequence[str | Path] = (),
    batches: Sequence[int] = DEFAULT_BATCHES,
    tolerance: Tolerance | None = None,
    backend_names: Sequence[str] | None = None,
    seed: int = 0,
    engine: str | Path | None = None,
    progress: Progress = QUIET,
) -> ValidationReport:
    """`engine`: a TensorRT engine for the tensorrt backend; without one, that backend builds its own."""
    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    graph_input = _onnx_input(model)
    dtype = input_dtype(model)
    tol = tolerance or DEFAULT_TOLERANCES[dtype]
    sample_shape = resolve_input_shape(model, input_shape)
    cases = random_cases(sample_shape, dtype, batches, seed)
    user_cases = load_input_cases(input_files, sample_shape, dtype)
    output_names = [o.name for o in model.graph.output]

    checks: list[Check] = []
    warnings: list[str] = []
    nodes = len(yat_gemm_nodes(model))
    layers = count_yat_layers(loaded.module)
    if loaded.layers_are_identifiable:
        checks.append(Check("YatGemm nodes", nodes == layers, f"{nodes} YatGemm nodes for {layers} YatNMN layers"))
    else:
        checks.append(Check("YatGemm nodes", True,
                            f"{nodes} YatGemm nodes; {loaded.format} keeps no YatNMN options ({layers} layers decomposed)"))
    recorded_sha = _metadata(model).get(META_SOURCE_SHA256)
    if recorded_sha and recorded_sha != loaded.sha256:
        warnings.append(f"{loaded.path} has changed since {onnx_path.name} was exported (sha256 differs)")
    cases = _cases_for(graph_input, cases, user_cases, sample_shape, dtype, seed)

    reference = prepare_module(loaded, dtype)
    with progress.step(f"running PyTorch on {len(cases)} input cases"):
        expected = [
            [_to_numpy(t) for t in run_reference(reference, _to_torch(c.array, dtype), "the input shape")]
            for c in cases
        ]

    if recorded_sha:
        # A yatdeploy export: its output names follow from the PyTorch outputs.
        want_names = output_names_for(len(expected[0]))
        checks.append(Check("output names", output_names == want_names,
                            f"{', '.join(output_names)}" + ("" if output_names == want_names
                                                             else f"; PyTorch's outputs map to {', '.join(want_names)}")))

    reports: list[BackendReport] = []
    names = list(backend_names) if backend_names else list(runtime.BACKENDS)
    for name in names:
        backend = runtime.get_backend(name)
        reason = backend.availability()
        report = BackendReport(backend.name, backend.description, reason is None, reason)
        reports.append(report)
        if reason:
            continue
        if backend.kind == "tensorrt":
            _run_tensorrt(report, backend, onnx_path, engine, cases, expected, output_names, graph_input.name, tol,
                          nodes, progress)
            continue
        with progress.step(f"running {backend.name}"), tempfile.TemporaryDirectory(prefix="yatdeploy-") as folder:
            try:
                # Profiled, so that the report can say which YatGemm kernel really ran.
                session = runtime.create_session(model, backend, profile_to=Path(folder) / "profile")
            except OnnxModelError as exc:
                report.comparisons.append(OutputComparison("session", "*", [], "", None, None, False, exc.message))
                continue
            ran = 0
            for case, want in zip(cases, expected):
                try:
                    got = runtime.run(session, {graph_input.name: case.array})
                except OnnxModelError as exc:
                    report.comparisons.append(OutputComparison(case.name, "*", [], "", None, None, False, exc.message))
                    continue
                ran += 1
                report.comparisons.extend(_compare_case(case, output_names, got, want, tol))
            _check_yat_gemm_execution(report, session, runtime.profiled_kernel_runs(session), nodes * ran)
    return ValidationReport(
        model=str(onnx_path),
        against=str(loaded.path),
        dtype=dtype,
        tolerance=tol,
        checks=checks,
        backends=reports,
        warnings=warnings,
    )


def _run_tensorrt(report: BackendReport, backend: runtime.Backend, onnx_path: Path, engine: str | Path | None,
                  cases: list[InputCase], expected: list[list[np.ndarray]], output_names: list[str], input_name: str,
                  tol: Tolerance, nodes: int, progress: Progress) -> None:
    from yatdeploy.trt.engine import BatchProfile

    profile = BatchProfile.covering([c.array.shape[0] for c in cases])
    try:
        with progress.step("building a TensorRT engine" if engine is None else f"loading {engine}"):
            session = runtime.create_engine_session(onnx_path, backend, engine=engine, profile=profile)
    except YatDeployError as exc:
        report.comparisons.append(OutputComparison("engine", "*", [], "", None, None, False, exc.message))
        return
    with progress.step(f"running {backend.name}"):
        for case, want in zip(cases, expected):
            try:
                got = runtime.run(session, {input_name: case.array})
            except OnnxModelError as exc:
                report.comparisons.append(OutputComparison(case.name, "*", [], "", None, None, False, exc.message))
                continue
            report.comparisons.extend(_compare_case(case, output_names, got, want, tol))
    signature = session.inner.signature
    report.yat_gemm_execution = session.reason
    if signature.plugin_layers < nodes:
        report.execution_problem = (f"the engine has {signature.plugin_layers} plugin layers for {nodes} YatGemm "
                                    "nodes: the rest run the inlined ONNX function")


def _check_yat_gemm_execution(report: BackendReport, session: runtime.Session, runs: dict[str, int],
                              expected_runs: int) -> None:
    """Did YatGemm execute as the library kernel the session was set up for (per the profiler)?"""
    report.yat_gemm_kernel_runs = runs
    if expected_runs == 0:
        report.yat_gemm_execution = "no YatGemm nodes ran"
        return
    report.yat_gemm_execution = runtime.describe_kernel_runs(runs)
    if session.uses_library and sum(runs.values()) < expected_runs:
        report.execution_problem = (f"the custom-op library was registered but the profiler saw "
                                    f"{sum(runs.values())} YatGemm kernel runs, expected {expected_runs}")
    elif not session.uses_library and runs:
        report.execution_problem = "YatGemm ran as a kernel although no library was registered"
    elif not session.uses_library and session.backend.library is not None:
        report.execution_problem = f"the library was not used: {session.reason}"


def load_onnx(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise OnnxModelError(f"{path}: no such file")
    if not path.is_file():
        raise OnnxModelError(f"{path}: not a file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise OnnxModelError(f"{path}: not an ONNX model (it does not parse as a ModelProto)") from exc
    if not model.graph.node and not model.graph.output:
        raise OnnxModelError(f"{path}: not an ONNX model (no graph)")
    return model


def format_report(report: ValidationReport) -> str:
    lines = [f"validation of {report.model} against {report.against} ({report.dtype}, "
             f"atol={report.tolerance.atol:g}, rtol={report.tolerance.rtol:g})"]
    for check in report.checks:
        lines.append(f"  {'ok  ' if check.passed else 'FAIL'} {check.name}: {check.detail}")
    for warning in report.warnings:
        lines.append(f"  warning: {warning}")
    for backend in report.backends:
        if not backend.available:
            lines.append(f"\n  {backend.name}: skipped ({backend.reason})")
            continue
        lines.append(f"\n  {backend.name}: {backend.description}")
        if backend.yat_gemm_execution:
            lines.append(f"    {backend.yat_gemm_execution}")
        header = f"    {'output':<12} {'input case':<22} {'shape':<14} {'max abs err':>12} {'max rel err':>12}  result"
        lines.append(header)
        for comp in backend.comparisons:
            shape = "x".join(map(str, comp.shape)) or "-"
            abs_err = "-" if comp.max_abs_err is None else f"{comp.max_abs_err:.3g}"
            rel_err = "-" if comp.max_rel_err is None else f"{comp.max_rel_err:.3g}"
            lines.append(f"    {comp.output:<12} {comp.case:<22} {shape:<14} {abs_err:>12} {rel_err:>12}  "
                         f"{'pass' if comp.passed else 'FAIL'}")
    verdict = "PASSED" if report.passed else "FAILED"
    lines.append(f"\n  {verdict}")
    for failure in report.failures():
        lines.append(f"    {failure}")
    return "\n".join(lines)
