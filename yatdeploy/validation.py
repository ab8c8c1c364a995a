"""Stage 5, validate: compare an ONNX export with the PyTorch model on every available backend.

Checks, in order: YatGemm nodes against Yat layer calls (YatNMN, YatEmbed.attend), then per backend and input case the output
count, names, shapes and dtypes, then the values: |onnx - torch| <= atol + rtol * |torch| elementwise.

The tolerance, unless the user gives --atol/--rtol, follows the numerics of the computation: the
PyTorch model is also run in float64 on the same inputs, and ONNX may differ from PyTorch by
ROUNDING_FACTOR times PyTorch's own error against that run (over the random batches, the largest relative
to each batch's scale), plus a few ulps of the output's magnitude (`derived_tolerance`,
`derived_tolerances`). Rounding can't be told from a real error below that level, and a real error well
above it is never admitted: docs/architecture.md has the rule's measurements (benchmarks/validation_zoo.py).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from yatdeploy import backends, dtypes
from yatdeploy.cases import DEFAULT_BATCHES, DEFAULT_INT_RANGE, InputCase, cases_for, load_input_cases, random_cases
from yatdeploy.errors import InputSpecError, OnnxModelError, YatDeployError, option, render
from yatdeploy.graph import META_SOURCE_SHA256, load_onnx, metadata, yat_gemm_nodes
from yatdeploy.inputs import INTEGER_TYPES, InputSpec, from_shape, model_specs, precision
from yatdeploy.progress import QUIET, Progress
from yatdeploy.model_reference import ModelReference, is_reference, reference_for


@dataclass(frozen=True)
class Tolerance:
    atol: float | None  # None (with the other given): completed from FIXED_TOLERANCES for the model's dtype
    rtol: float | None

    def __post_init__(self) -> None:
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):  # NaN fails too
                raise YatDeployError(f"{option(name)} {value}: must be a finite number >= 0")

    def completed(self, dtype: str) -> Tolerance:
        fixed = FIXED_TOLERANCES[dtype]
        return Tolerance(fixed.atol if self.atol is None else self.atol, fixed.rtol if self.rtol is None else self.rtol)


# The user's override (validate(tolerance=...), --atol/--rtol): |onnx - torch| <= atol + rtol * |torch|.
# A flag given alone is completed from this table (the fixed per-dtype values that were once the defaults).
FIXED_TOLERANCES = {
    "float32": Tolerance(atol=1e-5, rtol=1e-4),
    "float64": Tolerance(atol=1e-8, rtol=1e-5),
    "float16": Tolerance(atol=1e-3, rtol=1e-2),
    "bfloat16": Tolerance(atol=1e-2, rtol=5e-2),
}

# The default, derived per input case and output (`derived_tolerance`):
#   atol = ROUNDING_FACTOR * torch_err + (u + EXPORT_APPROXIMATION) * max|torch|,   rtol = 0
# torch_err = max |torch - float64 run of the same model on the same inputs|: PyTorch's own rounding error,
# which grows with the reduction lengths and with cancellation (a linear head whose logits cross zero,
# a Yat distance of x close to w). ONNX computes the same math with other summation orders and kernels, so
# its error is of that size: with a factor of 8, ONNX passes whenever it is no more than 7x as far from the
# float64 result as PyTorch is (measured on 200 models: at most 3.7x; 4.4x on a trained ill-conditioned
# model). One batch's maximum is a small sample (a batch of one has a dozen values, and PyTorch can be exact
# on all of them by chance), so over the random batches, which are draws of one distribution, torch_err is
# the largest of their errors relative to each batch's max|torch| (`derived_tolerances`). u (the dtype's machine epsilon) times the output's largest magnitude
# covers the two results rounding to neighbouring values where PyTorch happens to be exact, and
# EXPORT_APPROXIMATION (2^-20, ~9.5e-7 relative) the export's own documented approximations: YatGemm's
# float32 eps/alpha attributes (6e-8) and the spherical / weight-normalised distance forms (measured
# up to 2.7e-7), which are all a float64 export differs by.
ROUNDING_FACTOR = 8.0
EXPORT_APPROXIMATION = 2.0**-20
# Without a float64 run (a TorchScript or torch.export archive that only runs in its own dtype):
# atol = factor * max|torch|: about 40 float32 ulps (float32 accumulation over long reductions) or
# 5 ulps of a 16-bit type (whose error is mostly the final rounding, YatGemm accumulating in float32).
# (A float64 export always has its reference: the PyTorch run itself.)
FALLBACK_FACTORS = {"float32": 5e-6, "float16": 5e-3, "bfloat16": 4e-2}
# PyTorch's own error beyond this many ulps of max|torch| is reported as a warning: the model is
# ill-conditioned on that input, and the comparison can't resolve differences below ROUNDING_FACTOR
# times that error.
ILL_CONDITIONED_ULPS = 64

TOL_USER = "user"  # --atol/--rtol: atol + rtol * |torch|
TOL_DERIVED = "derived"  # from PyTorch's error against its float64 run
TOL_MAGNITUDE = "magnitude"  # no float64 run: a multiple of max|torch|


def unit_roundoff(dtype: str) -> float:
    """The dtype's machine epsilon: the spacing of its values just above 1."""
    return float(_finfo(dtype).eps)


def _finfo(dtype: str) -> ml_dtypes.finfo:
    return ml_dtypes.finfo(dtypes.by_name(dtype).numpy)  # numpy's, with ml_dtypes' bfloat16


POOLED_OVER_BATCHES = "on the random batches, the largest relative to each batch's max|torch|"


def tolerance_rule(tolerance: Tolerance | None, dtype: str, has_reference: bool,
                   pooled: str = POOLED_OVER_BATCHES) -> str:
    """The tolerance rule in words, for the report's header and JSON: the user's, else the derived one (`pooled`:
    what PyTorch's error is measured on)."""
    if tolerance is not None:
        return f"atol = {tolerance.atol:g}, rtol = {tolerance.rtol:g} (given)"
    if not has_reference:
        return (f"atol = {FALLBACK_FACTORS[dtype]:g} x max|torch|, rtol = 0 "
                "(no float64 run of the model was possible)")
    floor = unit_roundoff(dtype) + EXPORT_APPROXIMATION
    if dtype == "float64":
        return f"atol = {floor:.2g} x max|torch|, rtol = 0 (the export's float32 attributes and distance forms)"
    return (f"atol = {ROUNDING_FACTOR:g} x torch err + {floor:.2g} x max|torch|, rtol = 0, where torch err = "
            f"max|PyTorch {dtype} - PyTorch float64| is PyTorch's own rounding error ({pooled})")


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
    # The tolerance this comparison used: |onnx - torch| <= atol + rtol * |torch|, and where it came from
    # (TOL_DERIVED, TOL_MAGNITUDE or TOL_USER).
    atol: float | None = None
    rtol: float | None = None
    tolerance_from: str | None = None
    bad_values: int | None = None
    max_abs_torch: float | None = None  # max |torch| over finite values: the output's scale
    # Against the float64 run of the PyTorch model (None without one): PyTorch's own error, and ONNX's.
    torch_err: float | None = None
    onnx_err: float | None = None
    # 2-D outputs [batch, classes]: the fraction of rows whose argmax is the same in ONNX and PyTorch.
    top1_agreement: float | None = None
    # The smallest --atol alone and --rtol alone that admit this output (`single_flag_needs`; rtol None: no rtol
    # does, a value of torch 0 being off by more than the fixed atol).
    atol_alone: float | None = None
    rtol_alone: float | None = None
    detail: str | None = None  # a line under the row: what the comparison was and found (decoder generation runs)


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

    def single_flag_needs(self) -> tuple[float, float] | None:
        """The smallest --atol alone and --rtol alone that admit every comparison of values on this backend, the
        passing ones included (None when none of its failures is one of values)."""
        if not any(not c.passed and c.atol_alone is not None for c in self.comparisons):
            return None
        valued = [c for c in self.comparisons if c.atol_alone is not None]
        rtols = [math.inf if c.rtol_alone is None else c.rtol_alone for c in valued]
        return max(c.atol_alone for c in valued), max(rtols)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class FirstDivergence:
    """Where an export first computes something else (yatdeploy.localize): the first PyTorch module, in execution
    order, whose output differs from ONNX's by more than its own derived tolerance."""

    module: str  # the module's path in the PyTorch model ("" for the model's own forward)
    onnx_node: str  # the node that computes the diverging value
    op_type: str
    backend: str
    max_abs_err: float
    tolerance: float  # derived_tolerance's atol for that value
    torch_err: float | None  # PyTorch's own error there against its float64 run
    case: str  # the input case compared
    onnx_value: str
    agreeing_before: list[str] = field(default_factory=list)  # the last modules before it that agree
    reproduction: str | None = None  # the folder of its minimal reproduction, where one was written


@dataclass
class ValidationReport:
    model: str
    against: str
    dtype: str
    tolerance: Tolerance | None  # the user's; None: derived per output (tolerance_rule)
    checks: list[Check]
    backends: list[BackendReport]
    warnings: list[str] = field(default_factory=list)
    tolerance_rule: str = ""
    reference: str = ""  # what PyTorch's own rounding error was measured against
    # Set by localization (on a failure, or asked for): where ONNX first diverges, and what it compared where.
    first_divergence: FirstDivergence | None = None
    localization: list[str] = field(default_factory=list)

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
            needs = backend.single_flag_needs()
            if needs is not None and self.tolerance is None:
                lines.append(f"{backend.name}: if these differences are acceptable, "
                             + render(override_advice(*needs, self.dtype)) + " on every output and input case")
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
        """Write the report whole or not at all (files.write_atomically); YatDeployError where it can't be."""
        from yatdeploy.files import write_atomically

        write_atomically(Path(path), (json.dumps(self.to_json(), indent=2, allow_nan=True) + "\n").encode())


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


def _float64(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)


def _finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.abs(finite).max()) if finite.size else 0.0


def _error_against(values: np.ndarray, reference: np.ndarray, dtype: str) -> float:
    """max |values - reference| where both are finite and the reference is within the dtype's range (a
    16-bit result that nmn and YatGemm clamp to the dtype's largest value is a saturation, not rounding)."""
    v, r = _float64(values), _float64(reference)
    usable = np.isfinite(v) & np.isfinite(r) & (np.abs(r) <= float(_finfo(dtype).max))
    return float(np.abs(v - r)[usable].max()) if usable.any() else 0.0


def derived_tolerance(
    dtype: str, torch_out: np.ndarray, float64_out: np.ndarray | None, relative_err: float = 0.0
) -> tuple[Tolerance, float | None, str]:
    """The default tolerance for one output of one input case: (tolerance, PyTorch's error, its source).

    With the float64 run: atol = ROUNDING_FACTOR * torch_err + (u + EXPORT_APPROXIMATION) * max|torch|, where
    torch_err = max(|torch - float64|, relative_err * max|torch|) (`relative_err`: PyTorch's error seen on like
    inputs, relative to their scale); without one: atol = FALLBACK_FACTORS[dtype] * max|torch|. rtol is 0: the
    atol already scales with the output.
    """
    scale = _finite_max(_float64(torch_out))
    eps, tiny = float(_finfo(dtype).eps), float(_finfo(dtype).tiny)
    smallest = tiny * eps  # the subnormal spacing: an all-zero output is compared exactly
    if float64_out is None:
        return Tolerance(FALLBACK_FACTORS[dtype] * scale + smallest, 0.0), None, TOL_MAGNITUDE
    torch_err = max(_error_against(torch_out, float64_out, dtype), relative_err * scale)
    atol = ROUNDING_FACTOR * torch_err + (eps + EXPORT_APPROXIMATION) * scale + smallest
    return Tolerance(atol, 0.0), torch_err, TOL_DERIVED


def derived_tolerances(dtype: str, expected: Sequence[Sequence[np.ndarray]],
                       float64_runs: Sequence[Sequence[np.ndarray]] | None, pooled: int) -> list[CaseTolerances]:
    """The default tolerances of every input case (`expected`: PyTorch's outputs per case; `float64_runs`: the
    same in float64, or None).

    The first `pooled` cases are draws of one distribution (validate's random batches): for each output, PyTorch's
    error relative to the case's max|torch| is pooled over them, so a case where PyTorch happened to be nearly
    exact (a batch of one has only a handful of values) is held to the error its like inputs show. The user's
    cases (the rest) come from their own distributions and each stands alone.
    """
    if float64_runs is None:
        return [_case_tolerances(dtype, want, None, [0.0] * len(want)) for want in expected]
    relative = [0.0] * (len(expected[0]) if expected else 0)
    for want, runs in zip(expected[:pooled], float64_runs[:pooled]):
        for index, (w, r) in enumerate(zip(want, runs)):
            scale = _finite_max(_float64(w))
            if scale > 0:
                relative[index] = max(relative[index], _error_against(w, r, dtype) / scale)
    return [_case_tolerances(dtype, want, runs, relative if number < pooled else [0.0] * len(want))
            for number, (want, runs) in enumerate(zip(expected, float64_runs))]


def top1_agreement(actual: np.ndarray, expected: np.ndarray) -> float | None:
    """For a 2-D output [batch, classes]: the fraction of rows with the same argmax; None for other shapes."""
    if actual.ndim != 2 or actual.shape[1] < 2 or actual.shape[0] == 0:
        return None
    return float(np.mean(np.argmax(_float64(actual), axis=1) == np.argmax(_float64(expected), axis=1)))


def _ceil2(value: float) -> float:
    """`value` rounded up to two significant digits, for a suggested tolerance that really suffices."""
    if not value > 0 or not math.isfinite(value):
        return value
    step = 10.0 ** (math.floor(math.log10(value)) - 1)
    return float(f"{math.ceil(value / step * (1 - 1e-12)) * step:.2g}")


def single_flag_needs(actual: np.ndarray, expected: np.ndarray, dtype: str) -> tuple[float, float]:
    """The smallest `atol` given alone and `rtol` given alone that admit every finite value of this output.

    A flag given alone takes the other from FIXED_TOLERANCES: `atol` A means A + fixed rtol * |torch|, `rtol` R
    means fixed atol + R * |torch|. Neither is ever negative; R is inf where a value of torch 0 is off by more than
    the fixed atol (no rtol admits it).
    """
    fixed = FIXED_TOLERANCES[dtype]
    a, e = _float64(actual), _float64(expected)
    finite = np.isfinite(a) & np.isfinite(e)
    magnitude = np.abs(np.where(finite, e, 0.0))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - e), 0.0)
    atol = float(np.max(diff - fixed.rtol * magnitude, initial=0.0))
    over = diff > fixed.atol
    if np.any(over & (magnitude == 0)):
        return atol, math.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        rtol = float(np.max(np.where(over, (diff - fixed.atol) / np.where(magnitude > 0, magnitude, 1.0), 0.0),
                            initial=0.0))
    return atol, rtol


def override_advice(atol_alone: float, rtol_alone: float, dtype: str) -> str:
    """How to accept differences that need `atol_alone` / `rtol_alone` (`single_flag_needs`): one flag, either."""
    fixed = FIXED_TOLERANCES[dtype]
    if atol_alone <= fixed.atol:
        return (f"pass {option('rtol')} {fixed.rtol:g} (or {option('atol')} {fixed.atol:g}): either alone brings in the "
                f"fixed tolerance {fixed.atol:g} + {fixed.rtol:g} x |torch|, which admits them")
    advice = f"pass {option('atol')} {_ceil2(atol_alone):g}"
    if math.isfinite(rtol_alone):
        advice += f" or {option('rtol')} {_ceil2(rtol_alone):g}: either alone admits them"
    return advice + (f" (a flag given alone comes with the other's fixed value, {option('atol')} {fixed.atol:g} / "
                     f"{option('rtol')} {fixed.rtol:g})")


def _explain_failure(actual: np.ndarray, expected: np.ndarray, tol: Tolerance, source: str, dtype: str,
                     derived: Tolerance, torch_err: float | None, onnx_err: float | None, bad: int,
                     top1: float | None) -> str:
    """Which values broke which tolerance, why the tolerance is what it is, and which one to raise."""
    a, e = _float64(actual), _float64(expected)
    finite = np.isfinite(a) & np.isfinite(e)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(a - e), 0.0)
        limit = tol.atol + tol.rtol * np.abs(np.where(finite, e, 0.0))
    failing = finite & (diff > limit)
    scale = _finite_max(e)
    parts = []
    if failing.any():
        worst = int(np.argmax(np.where(failing, diff - limit, -np.inf)))
        parts.append(f"{bad} of {a.size} values differ from PyTorch by more than "
                     + (f"atol={tol.atol:g} + rtol={tol.rtol:g}*|torch|" if source == TOL_USER
                        else f"atol={tol.atol:.3g}")
                     + f" (worst: {diff.flat[worst]:.3g} where torch = {e.flat[worst]:.3g}; max|torch| {scale:.3g})")
    nonfinite = bad - int(np.count_nonzero(failing))
    if nonfinite:
        parts.append(f"{nonfinite} values are NaN or infinite on one side only, which no tolerance admits")
    if failing.any():
        need_atol = _ceil2(float(np.max((diff - tol.rtol * np.abs(e))[failing])))
        if source == TOL_DERIVED:
            floor = unit_roundoff(dtype) + EXPORT_APPROXIMATION
            if dtype == "float64":
                why = (f"the tolerance is {floor:.2g} x max|torch|: a float64 export differs from PyTorch only by "
                       "its float32 YatGemm attributes")
            else:
                why = (f"the tolerance is {ROUNDING_FACTOR:g} x PyTorch's own {dtype} error against its float64 run "
                       f"({torch_err:.3g}) + {floor:.2g} x max|torch|")
                if onnx_err is not None:
                    ratio = f", {onnx_err / torch_err:.3g}x as far as PyTorch" if torch_err else ""
                    why += (f"; ONNX is {onnx_err:.3g} from the float64 run{ratio}: more than {dtype} rounding "
                            "explains, so the export (or this backend) computes something else")
            parts.append(f"{why}. If this difference is acceptable, {override_advice(*single_flag_needs(a, e, dtype), dtype)}")
        elif source == TOL_MAGNITUDE:
            parts.append(f"the tolerance is {FALLBACK_FACTORS[dtype]:g} x max|torch|, as the model could not be run in "
                         "float64 to measure PyTorch's own rounding error. If its outputs are ill-conditioned "
                         f"(large values cancelling), {override_advice(*single_flag_needs(a, e, dtype), dtype)}")
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                over = np.where(np.abs(e) > 0, (diff - tol.atol) / np.abs(e), np.inf)
            need_rtol = _ceil2(float(np.max(over[failing])))
            largest = float(np.max(np.abs(e)[failing]))
            if largest <= 0.1 * scale or tol.rtol == 0:
                # Rounding errors scale with the size of the terms summed, not with the result: values well
                # below the output's scale (logits near zero) need atol.
                parts.append(f"the failing values are small next to the output's scale (|torch| <= {largest:.3g}), "
                             f"where rtol*|torch| adds little: raise {option('atol')} to {need_atol:g} (atol bounds the error "
                             f"whatever the value's size; {option('rtol')} alone would need {need_rtol:g})")
            else:
                parts.append(f"the failing values are among the output's largest (|torch| up to {largest:.3g}): raise "
                             f"{option('rtol')} to {need_rtol:g} (rtol bounds the error in proportion to |torch|), or {option('atol')} to "
                             f"{need_atol:g}")
            verdict = "passes" if compare(actual, expected, derived)[2] == 0 else "fails too"
            parts.append(f"without {option('atol')}/{option('rtol')} the tolerance derived from PyTorch's own rounding error is "
                         f"atol={derived.atol:.3g}, which this output {verdict}")
    if top1 is not None:
        parts.append(f"top-1 class agrees on {round(top1 * a.shape[0])}/{a.shape[0]} rows")
    return render("; ".join(parts))


@dataclass
class CaseTolerances:
    """The default tolerances of one input case, one per PyTorch output (from `derived_tolerance`)."""
    tolerances: list[Tolerance]
    torch_errs: list[float | None]
    source: str
    float64_outs: list[np.ndarray] | None  # the float64 run, None without one


def _case_tolerances(dtype: str, want: Sequence[np.ndarray], float64_outs: Sequence[np.ndarray] | None,
                     relative_errs: Sequence[float]) -> CaseTolerances:
    refs = list(float64_outs) if float64_outs is not None else [None] * len(want)
    derived = [derived_tolerance(dtype, w, r, e) for w, r, e in zip(want, refs, relative_errs)]
    return CaseTolerances([d[0] for d in derived], [d[1] for d in derived],
                          TOL_DERIVED if float64_outs is not None else TOL_MAGNITUDE, float64_outs)


def _compare_case(
    case: InputCase, names: list[str], got: list[np.ndarray], want: list[np.ndarray], dtype: str,
    defaults: CaseTolerances, user: Tolerance | None,
) -> list[OutputComparison]:
    """`user`: the user's tolerance, else each output's default from `defaults`."""
    if len(got) != len(want):
        return [
            OutputComparison(case.name, "*", [], "", None, None, False,
                             f"{len(got)} outputs, PyTorch gives {len(want)}")
        ]
    comps = []
    for index, (name, g, w) in enumerate(zip(names, got, want)):
        shape = list(g.shape)
        if tuple(g.shape) != tuple(w.shape):
            comps.append(OutputComparison(case.name, name, shape, str(g.dtype), None, None, False,
                                          f"shape {tuple(g.shape)}, PyTorch gives {tuple(w.shape)}"))
            continue
        if g.dtype != w.dtype:
            comps.append(OutputComparison(case.name, name, shape, str(g.dtype), None, None, False,
                                          f"dtype {g.dtype}, PyTorch gives {w.dtype}"))
            continue
        derived, torch_err = defaults.tolerances[index], defaults.torch_errs[index]
        tol, source = (user, TOL_USER) if user is not None else (derived, defaults.source)
        max_abs, max_rel, bad = compare(g, w, tol)
        onnx_err = None if defaults.float64_outs is None else _error_against(g, defaults.float64_outs[index], dtype)
        top1 = top1_agreement(g, w)
        problem = None
        if bad:
            problem = _explain_failure(g, w, tol, source, dtype, derived, torch_err, onnx_err, bad, top1)
        atol_alone, rtol_alone = single_flag_needs(g, w, dtype)
        comps.append(OutputComparison(
            case.name, name, shape, str(g.dtype), max_abs, max_rel, bad == 0, problem,
            atol=tol.atol, rtol=tol.rtol, tolerance_from=source, bad_values=bad,
            max_abs_torch=_finite_max(_float64(w)), torch_err=torch_err, onnx_err=onnx_err, top1_agreement=top1,
            atol_alone=atol_alone, rtol_alone=None if math.isinf(rtol_alone) else rtol_alone,
        ))
    return comps


def _ill_conditioned(dtype: str, cases: list[InputCase], expected: list[list[np.ndarray]],
                     output_names: list[str], defaults: list[CaseTolerances]) -> list[str]:
    """Warnings for cases where PyTorch's own error is large: there, only larger differences can be resolved."""
    u = unit_roundoff(dtype)
    lines = []
    for case, want, tols in zip(cases, expected, defaults):
        for name, w, err in zip(output_names, want, tols.torch_errs):
            scale = _finite_max(_float64(w))
            if err is not None and scale > 0 and err > ILL_CONDITIONED_ULPS * u * scale:
                lines.append(f"PyTorch's own {dtype} error on {case.name}, output '{name}', is {err:.3g} "
                             f"({err / (u * scale):.0f} ulps of max|torch| {scale:.3g}): the model is ill-conditioned "
                             f"on these inputs, so ONNX is checked there only to {ROUNDING_FACTOR:g}x that")
    return lines


def validate(
    onnx_path: str | Path,
    model: object,
    *,
    input_shape: tuple[int, ...] | None = None,
    inputs: Sequence[InputSpec] | None = None,
    int_ranges: Mapping[str, tuple[int, int]] | None = None,
    input_files: Sequence[str | Path] = (),
    batches: Sequence[int] = DEFAULT_BATCHES,
    tolerance: Tolerance | None = None,
    backend_names: Sequence[str] | None = None,
    seed: int = 0,
    engine: str | Path | None = None,
    progress: Progress = QUIET,
    localize: Callable[[ValidationRun], None] | None = None,
) -> ValidationReport:
    """`model`: the model loaded (loading.LoadedModel, PyTorch; jax_loading.JaxLoadedModel, Flax NNX), or as export
    prepared it (ExportResult.reference: a model_reference.ModelReference).

    `inputs`: the model's inputs with example sizes (default: as the export recorded them, else as the graph
    says); `input_shape`: the shorthand for one input. `int_ranges`: per integer input, [low, high) of its
    random values (default: the model's smallest embedding table, else cases.DEFAULT_INT_RANGE).

    `engine`: a TensorRT engine for the tensorrt backend; without one, that backend builds its own.

    `tolerance`: the user's (|onnx - torch| <= atol + rtol * |torch|; one of the two left None is taken from
    FIXED_TOLERANCES for the model's dtype); None derives one per input case and output from PyTorch's own
    rounding error (`derived_tolerance`).

    `localize`: called with what the validation computed once the report is whole (yatdeploy.localize's
    `localizer`, which fills the report's first_divergence and localization).
    """
    onnx_path = Path(onnx_path)
    onnx_model = load_onnx(onnx_path)
    dtype = precision(onnx_model)
    if is_reference(model) and model.dtype != dtype:
        raise YatDeployError(f"{onnx_path.name} is in {dtype}, the {model.framework} model given was prepared in "
                             f"{model.dtype}")
    reference: ModelReference = model if is_reference(model) else reference_for(model, dtype)
    loaded = reference.loaded
    if tolerance is not None:
        tolerance = tolerance.completed(dtype)
    if input_shape is not None and inputs is None:
        inputs = [from_shape(input_shape, dtype)]
    specs = model_specs(onnx_model, inputs)
    model_range = reference.int_range()
    ranges = {s.name: model_range for s in specs if s.dtype in INTEGER_TYPES}
    unknown = sorted(set(int_ranges or {}) - set(ranges))
    if unknown:
        raise InputSpecError(f"{option('int_ranges')}: {', '.join(unknown)} is not an integer input of the model "
                             f"(its integer inputs: {', '.join(ranges) or 'none'})")
    default_from = "the model's smallest embedding table" if model_range != DEFAULT_INT_RANGE else \
        "the default range (the model has no embedding table)"
    range_notes = {name: "given" if name in (int_ranges or {}) else default_from for name in ranges}
    ranges.update(int_ranges or {})
    cases = random_cases(specs, batches, seed, ranges)
    user_cases = load_input_cases(input_files, specs)
    output_names = [o.name for o in onnx_model.graph.output]

    checks: list[Check] = []
    warnings: list[str] = []
    nodes = len(yat_gemm_nodes(onnx_model))
    recorded_sha = metadata(onnx_model).get(META_SOURCE_SHA256)
    if recorded_sha and recorded_sha != loaded.sha256:
        warnings.append(f"{loaded.path} has changed since {onnx_path.name} was exported (sha256 differs)")
    random_count = len(cases)
    cases = cases_for(specs, cases, user_cases)
    for name, (low, high) in ranges.items():
        checks.append(Check("integer input", True, f"'{name}' drawn from [{low}, {high}): {range_notes[name]}"))

    with progress.step(f"running {reference.framework} on {len(cases)} input cases"):
        what = f"the inputs and {option('int_ranges')}" if ranges else "the inputs"
        # The first case's run also counts the Yat layer calls (the YatGemm nodes the export should have).
        first, calls = reference.run_counting(cases[0].arrays, what)
        expected = [first, *(reference.run(c.arrays, what) for c in cases[1:])]
    checks.insert(0, Check("YatGemm nodes", *reference.yat_gemm_check(nodes, calls)))
    with progress.step(f"running {reference.framework} in float64, for the tolerances"):
        float64_runs, reference_note = reference.float64_runs([c.arrays for c in cases], expected)
    defaults = derived_tolerances(dtype, expected, float64_runs, pooled=random_count)
    warnings.extend(_ill_conditioned(dtype, cases, expected, output_names, defaults))

    if recorded_sha:
        # A yatdeploy export: its output names follow from the PyTorch outputs.
        want_names = reference.output_names
        checks.append(Check("output names", output_names == want_names,
                            f"{', '.join(output_names)}" + ("" if output_names == want_names
                                                             else f"; PyTorch's outputs map to {', '.join(want_names)}")))

    batch_sizes = [c.rows for c in cases]
    reports = run_backends(backend_names, lambda report, backend: _run_backend(
        report, backend, onnx_path, engine, batch_sizes, cases, expected, output_names, dtype, defaults, tolerance,
        nodes, progress))
    report = ValidationReport(
        model=str(onnx_path),
        against=str(loaded.path),
        dtype=dtype,
        tolerance=tolerance,
        checks=checks,
        backends=reports,
        warnings=warnings,
        tolerance_rule=tolerance_rule(tolerance, dtype, float64_runs is not None),
        reference=reference_note,
    )
    if localize is not None:
        localize(ValidationRun(onnx_path, reference, dtype, cases, expected, report, progress))
    return report


@dataclass
class ValidationRun:
    """What a validation computed, for localization to start from (yatdeploy.localize)."""

    onnx_path: Path
    reference: ModelReference
    dtype: str
    cases: list[InputCase]
    expected: list[list[np.ndarray]]  # PyTorch's outputs, per case
    report: ValidationReport
    progress: Progress = QUIET


def validate_recorded(onnx_path: str | Path, case: InputCase, expected: list[np.ndarray],
                      float64_outs: list[np.ndarray] | None, *, against: str, tolerance: Tolerance | None = None,
                      backend_names: Sequence[str] | None = None, progress: Progress = QUIET) -> ValidationReport:
    """An ONNX model against recorded outputs instead of a model (a reproduction yatdeploy.localize wrote): one
    input case, compared on every backend by the same rule, the tolerance derived from the recorded float64 outputs
    where there are some."""
    onnx_path = Path(onnx_path)
    onnx_model = load_onnx(onnx_path)
    dtype = precision(onnx_model)
    if tolerance is not None:
        tolerance = tolerance.completed(dtype)
    output_names = [o.name for o in onnx_model.graph.output]
    defaults = derived_tolerances(dtype, [expected], None if float64_outs is None else [float64_outs], pooled=0)
    nodes = len(yat_gemm_nodes(onnx_model))
    reports = run_backends(backend_names, lambda report, backend: _run_backend(
        report, backend, onnx_path, None, [case.rows], [case], [expected], output_names, dtype, defaults, tolerance,
        nodes, progress))
    return ValidationReport(
        model=str(onnx_path), against=against, dtype=dtype, tolerance=tolerance, checks=[], backends=reports,
        tolerance_rule=tolerance_rule(tolerance, dtype, float64_outs is not None, pooled="on the recorded inputs"),
        reference="the recorded float64 outputs" if float64_outs is not None else "",
    )



def run_backends(names: Sequence[str] | None,
                 run: Callable[[BackendReport, backends.Backend], None]) -> list[BackendReport]:
    """A report per backend (`names`, else every one registered): `run` fills each available one's, the others say
    why they are not (for input batches here, for decoders in validation_decoder)."""
    reports = []
    for name in list(names) if names else backends.names():
        backend = backends.get(name)
        reason = backend.availability()
        report = BackendReport(backend.name, backend.description, reason is None, reason)
        reports.append(report)
        if not reason:
            run(report, backend)
    return reports

def _run_backend(report: BackendReport, backend: backends.Backend, onnx_path: Path, engine: str | Path | None,
                 batch_sizes: list[int], cases: list[InputCase], expected: list[list[np.ndarray]],
                 output_names: list[str], dtype: str, defaults: list[CaseTolerances],
                 tolerance: Tolerance | None, nodes: int, progress: Progress) -> None:
    """Open the model on one backend, run and compare every case, and say which YatGemm kernel ran."""
    with tempfile.TemporaryDirectory(prefix="yatdeploy-") as folder:
        # Profiled, so that the report can say which YatGemm kernel really ran; an engine for these batches.
        options = backends.Options(profile_to=Path(folder) / "profile", engine=None if engine is None else Path(engine),
                                   batch_profile=(min(batch_sizes), max(batch_sizes), max(batch_sizes)),
                                   progress=progress)
        try:
            runner = backend.open(onnx_path, options)
        except YatDeployError as exc:
            report.comparisons.append(OutputComparison("open", "*", [], "", None, None, False, exc.text))
            return
        ran = 0
        with progress.step(f"running {backend.name}"):
            for case, want, case_defaults in zip(cases, expected, defaults):
                try:
                    got = runner.run(case.arrays)
                except OnnxModelError as exc:
                    report.comparisons.append(OutputComparison(case.name, "*", [], "", None, None, False,
                                                               exc.text))
                    continue
                ran += 1
                report.comparisons.extend(_compare_case(case, output_names, got, want, dtype, case_defaults,
                                                        tolerance))
        execution = runner.yat_gemm_execution(nodes=nodes, runs=ran)
    report.yat_gemm_execution = execution.detail
    report.yat_gemm_kernel_runs = execution.kernel_runs
    report.execution_problem = execution.problem


def _tolerance_cell(comp: OutputComparison) -> str:
    if comp.atol is None:
        return "-"
    if comp.tolerance_from == TOL_USER:
        return f"{comp.atol:.2g}+{comp.rtol:.2g}|t|"
    return f"{comp.atol:.3g}"


def _top1_cell(comp: OutputComparison) -> str:
    if comp.top1_agreement is None:
        return "-"
    rows = comp.shape[0]
    return f"{round(comp.top1_agreement * rows)}/{rows}"


def format_report(report: ValidationReport) -> str:
    lines = [f"validation of {report.model} against {report.against} ({report.dtype})"]
    if report.tolerance is not None:
        lines.append(f"  tolerance (given): |onnx - torch| <= atol + rtol*|torch|, atol={report.tolerance.atol:g}, "
                     f"rtol={report.tolerance.rtol:g}")
    else:
        lines.append(f"  tolerance per output: {report.tolerance_rule}")
    if report.reference:
        lines.append(f"  reference for torch err: {report.reference}")
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
        header = (f"    {'output':<12} {'input case':<22} {'shape':<10} {'max abs err':>11} {'max rel err':>11} "
                  f"{'tolerance':>14} {'torch err':>9} {'top-1':>9}  result")
        lines.append(header)
        for comp in backend.comparisons:
            shape = "x".join(map(str, comp.shape)) or "-"
            abs_err = "-" if comp.max_abs_err is None else f"{comp.max_abs_err:.3g}"
            rel_err = "-" if comp.max_rel_err is None else f"{comp.max_rel_err:.3g}"
            torch_err = "-" if comp.torch_err is None else f"{comp.torch_err:.3g}"
            lines.append(f"    {comp.output:<12} {comp.case:<22} {shape:<10} {abs_err:>11} {rel_err:>11} "
                         f"{_tolerance_cell(comp):>14} {torch_err:>9} {_top1_cell(comp):>9}  "
                         f"{'pass' if comp.passed else 'FAIL'}")
            if comp.detail:
                lines.append(f"      {comp.detail}")
    verdict = "PASSED" if report.passed else "FAILED"
    lines.append(f"\n  {verdict}")
    for failure in report.failures():
        lines.append(f"    {failure}")
    lines.extend(_localization_lines(report))
    return "\n".join(lines)


def _localization_lines(report: ValidationReport) -> list[str]:
    """The report's localization section: the first divergence, the modules before it that agree, the notes."""
    if report.first_divergence is None and not report.localization:
        return []
    lines = ["", "  localization (intermediate values against PyTorch's module outputs):"]
    first = report.first_divergence
    if first is not None:
        torch_err = "-" if first.torch_err is None else f"{first.torch_err:.3g}"
        lines.append(f"    first divergence on {first.backend}, {first.case}: module '{first.module or '<model>'}', "
                     f"ONNX node {first.onnx_node} ({first.op_type}) -> {first.onnx_value}: max abs err "
                     f"{first.max_abs_err:.3g} > tolerance {first.tolerance:.3g} (torch err {torch_err})")
        if first.agreeing_before:
            lines.append(f"    agreeing before it: {', '.join(m or '<model>' for m in first.agreeing_before)}")
        if first.reproduction:
            lines.append(f"    reproduction: {first.reproduction} (yatdeploy validate {first.reproduction})")
    lines.extend(f"    {note}" for note in report.localization)
    return lines
