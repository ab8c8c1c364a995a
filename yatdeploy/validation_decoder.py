"""Stage 5 for decoders: a KV-cache export (yatdeploy.decoder's contract) against its PyTorch model, by generating.

On every available backend the export generates greedily with its cache (yatdeploy.decoding.Decoder: prompts
left-padded into one batch, then one token per step), and PyTorch generates greedily by full recompute: each prompt
alone at batch 1, no padding, the whole sequence run again for every token. The runs (`plan_runs`): batch 1, batch 3
with ragged prompts (their padding only masked by attention_mask), and one that runs the model over its whole
context (the last token predicted at position context − 1); `STEPS` tokens each, fewer where the context is shorter.

A run passes when the backend's tokens are PyTorch's and its logits at every step are within the tolerance
validation.py derives (ROUNDING_FACTOR times PyTorch's own error against its float64 run, pooled over every step as
over random batches; the user's --atol/--rtol instead where given). Where the tokens part, the logits at that step
decide: within tolerance, it is a near tie of the argmax, not a failure, and the backend is run again on PyTorch's
tokens (`Decoder.generate(forced=...)`) so that every later step's logits are still compared, which the report says.
The float64 run is one pass over each generated sequence (the model is causal: its logits at a position are those
of the prefix run alone). The report is validation.py's ValidationReport, one comparison row per run and backend.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nmn.torch.attention import MultiHeadYatAttention

from yatdeploy import backends
from yatdeploy.decoder import INPUT_IDS, DecoderLayout, layout_of
from yatdeploy.decoding import Decoder, Generation
from yatdeploy.errors import YatDeployError, option
from yatdeploy.graph import META_SOURCE_SHA256, graph_inputs, load_onnx, metadata, yat_gemm_nodes
from yatdeploy.loading import LoadedModel
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import Reference, to_numpy, yat_calls
from yatdeploy.validation import (
    TOL_USER,
    BackendReport,
    CaseTolerances,
    Check,
    OutputComparison,
    Tolerance,
    ValidationReport,
    compare,
    derived_tolerances,
    run_backends,
    single_flag_needs,
    tolerance_rule,
)

STEPS = 64  # tokens generated per run, unless the context is shorter
FIRST_PROMPT = 8  # the batch-1 run's prompt
RAGGED_PROMPTS = (5, 9, 13)  # the batch-3 run's prompts (1, 2, 3 for a context under 26)
POOLED_OVER_STEPS = "on every step's logits of every run, the largest relative to each step's max|torch|"
FLOAT64_NOTE = ("a float64 run of the PyTorch model on the same tokens (one pass over each generated sequence; the "
                "model is causal)")


@dataclass(frozen=True)
class Run:
    """One generation the validation makes, on PyTorch and on every backend."""

    label: str  # the report table's input case, short
    title: str  # what it is, in words: the lead of its line in the report
    prompts: tuple[tuple[int, ...], ...]
    steps: int  # tokens generated per sequence


def plan_runs(layout: DecoderLayout, tokens: int = STEPS, seed: int = 0) -> list[Run]:
    """Batch 1, batch 3 with ragged prompts, and the full context (unless batch 1 reaches it already); prompt tokens
    drawn uniformly from the vocabulary. A run takes at most the context: prompt + steps − 1 tokens are fed."""
    if tokens < 1:
        raise YatDeployError(f"{option('tokens')} {tokens}: must be at least 1")
    context, vocab = layout.context_length, layout.vocab_size
    rng = np.random.default_rng(seed)

    def draw(lengths: list[int]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(int(t) for t in rng.integers(0, vocab, n)) for n in lengths)

    first = max(1, min(FIRST_PROMPT, context // 2))
    steps = min(tokens, context + 1 - first)
    full = first + steps - 1 == context
    runs = [Run(f"batch 1, prompt {first}", f"greedy {steps} tokens, batch 1, prompt {first}"
                + (f" (the full context, {context})" if full else ""), draw([first]), steps)]
    ragged = RAGGED_PROMPTS if context >= 2 * max(RAGGED_PROMPTS) else (1, 2, 3)
    if context >= max(ragged):
        steps = min(tokens, context + 1 - max(ragged))
        lengths = "/".join(map(str, ragged))
        runs.append(Run(f"batch 3, prompts {lengths}", f"greedy {steps} tokens, batch 3, ragged prompts {lengths}",
                        draw(list(ragged)), steps))
    if not full:
        steps = min(tokens, context)
        prompt = context + 1 - steps
        runs.append(Run(f"full context {context}", f"greedy {steps} tokens, batch 1, prompt {prompt}: the full "
                                                   f"context {context}", draw([prompt]), steps))
    return runs


@dataclass
class Expected:
    """PyTorch's greedy full-recompute generation of one prompt."""

    tokens: list[int]
    logits: list[np.ndarray]  # each step's last-position logits [vocab], in the export dtype
    float64: list[np.ndarray] | None  # the same from the float64 run on the same tokens; None without one


def greedy_reference(reference: Reference, prompt: tuple[int, ...], steps: int) -> tuple[Expected, np.ndarray]:
    """PyTorch's greedy tokens and each step's last-position logits, the whole sequence recomputed at every step
    (batch 1, no padding, no cache); also the last step's full output [1, seq, vocab] (its float64 counterpart is one
    pass over the same sequence)."""
    sequence = torch.tensor([prompt], dtype=torch.int64)
    tokens, logits, out = [], [], None
    for _ in range(steps):
        out = reference.run_tensor(sequence, "that the model takes token ids [batch, seq]")[0]
        last = out[0, -1]
        logits.append(to_numpy(last))
        tokens.append(int(torch.argmax(last.float())))
        sequence = torch.cat([sequence, torch.tensor([[tokens[-1]]])], dim=1)
    return Expected(tokens, logits, None), to_numpy(out)


def _references(reference: Reference, layout: DecoderLayout, runs: list[Run],
                progress: Progress) -> tuple[list[list[Expected]], str]:
    expected, finals, sequences = [], [], []
    with progress.step(f"running PyTorch greedy, full recompute ({sum(len(r.prompts) * r.steps for r in runs)} "
                       "tokens)"):
        for run in runs:
            row = []
            for prompt in run.prompts:
                want, final = greedy_reference(reference, prompt, run.steps)
                if final.ndim != 3 or final.shape[-1] != layout.vocab_size:
                    raise YatDeployError(f"the PyTorch model gives logits of shape {final.shape}; the export's are "
                                         f"[batch, seq, {layout.vocab_size}]", "validate the export against the "
                                         "model it was exported from")
                row.append(want)
                finals.append([final])
                sequences.append({INPUT_IDS: np.array([list(prompt) + want.tokens[:-1]], np.int64)})
            expected.append(row)
    with progress.step("running PyTorch in float64 on the same tokens, for the tolerances"):
        float64_runs, note = reference.float64_runs(sequences, finals)
    if float64_runs is not None:
        runs64 = iter(float64_runs)
        for run, row in zip(runs, expected):
            for prompt, want in zip(run.prompts, row):
                (out,) = next(runs64)
                want.float64 = list(out[0, len(prompt) - 1:])
        note = FLOAT64_NOTE
    return expected, note


def _attention_calls(module: torch.nn.Module, run) -> int:
    """MultiHeadYatAttention calls whose scores the export makes one YatGemm (the spherical form stays decomposed)."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in module.modules()
             if isinstance(m, MultiHeadYatAttention) and not m._spherical]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return len(calls)


def validate_decoder(onnx_path: str | Path, model: LoadedModel | Reference, *, tokens: int = STEPS,
                     tolerance: Tolerance | None = None, backend_names: list[str] | None = None, seed: int = 0,
                     progress: Progress = QUIET) -> ValidationReport:
    """The decoder export at `onnx_path` against `model` (loaded, or as export prepared it), by greedy generation of
    `tokens` tokens per run (`plan_runs`) on every available backend (or `backend_names`). `tolerance`: the user's
    (|onnx - torch| <= atol + rtol * |torch|), else derived per step as validation.py derives it."""
    onnx_path = Path(onnx_path)
    onnx_model = load_onnx(onnx_path)
    layout = layout_of(metadata(onnx_model))
    if layout is None:
        raise YatDeployError(f"{onnx_path.name} is not a decoder export (it records no KV-cache layout)")
    dtype = layout.dtype
    if isinstance(model, Reference) and model.dtype != dtype:
        raise YatDeployError(f"{onnx_path.name} is in {dtype}, the PyTorch model given was prepared in {model.dtype}")
    reference = model if isinstance(model, Reference) else Reference.of(model, dtype)
    if tolerance is not None:
        tolerance = tolerance.completed(dtype)
    runs = plan_runs(layout, tokens, seed)

    checks, warnings = [], []
    inputs, outputs = [v.name for v in graph_inputs(onnx_model)], [v.name for v in onnx_model.graph.output]
    contract = inputs == layout.input_names() and outputs == layout.output_names()
    checks.append(Check("decoder", contract, (
        f"{layout.layers} attention layer(s), {layout.heads} heads of {layout.head_dim}, vocabulary "
        f"{layout.vocab_size}, context {layout.context_length}, logits {layout.logits}, "
        + ("position_ids" if layout.position_ids else "no position_ids")
        + ("" if contract else f"; but the graph's inputs are {', '.join(inputs)} and outputs {', '.join(outputs)}, "
                               f"not {', '.join(layout.input_names())} and {', '.join(layout.output_names())}"))))
    checks.append(Check("prompts", True, f"token ids drawn from [0, {layout.vocab_size}) (the export's vocabulary), "
                                         f"seed {seed}"))
    recorded_sha = metadata(onnx_model).get(META_SOURCE_SHA256)
    if recorded_sha and recorded_sha != reference.loaded.sha256:
        warnings.append(f"{reference.loaded.path} has changed since {onnx_path.name} was exported (sha256 differs)")

    nodes = len(yat_gemm_nodes(onnx_model))
    probe = torch.tensor([runs[0].prompts[0]], dtype=torch.int64)
    products = {}

    def count() -> None:
        products["attention"] = _attention_calls(reference.module, lambda: reference.run_tensor(probe, "the prompt"))

    products["Yat layers"] = sum(yat_calls(reference.module, count).values())
    calls = products["Yat layers"] + products["attention"]
    checks.insert(0, Check("YatGemm nodes", nodes == calls, f"{nodes} YatGemm nodes for {products['Yat layers']} Yat "
                                                            f"layer calls and {products['attention']} attention "
                                                            "layer calls' scores"))

    expected, reference_note = _references(reference, layout, runs, progress)
    flat = [(want, step) for row in expected for want in row for step in range(len(want.tokens))]
    has64 = all(want.float64 is not None for row in expected for want in row)
    derived = derived_tolerances(dtype, [[want.logits[s]] for want, s in flat],
                                 [[want.float64[s]] for want, s in flat] if has64 else None, pooled=len(flat))
    tolerances = iter(derived)
    per_run = [[[next(tolerances) for _ in want.tokens] for want in row] for row in expected]

    reports = run_backends(backend_names, lambda report, backend: _run_backend(
        report, backend, onnx_path, layout, runs, expected, per_run, tolerance, nodes, progress))
    return ValidationReport(
        model=str(onnx_path), against=str(reference.loaded.path), dtype=dtype, tolerance=tolerance, checks=checks,
        backends=reports, warnings=warnings,
        tolerance_rule=tolerance_rule(tolerance, dtype, has64, POOLED_OVER_STEPS),
        reference=reference_note,
    )


def _run_backend(report: BackendReport, backend: backends.Backend, onnx_path: Path, layout: DecoderLayout,
                 runs: list[Run], expected: list[list[Expected]], tolerances: list[list[list[CaseTolerances]]],
                 user: Tolerance | None, nodes: int, progress: Progress) -> None:
    """Open the export on one backend, generate every run with its cache, compare, and say which YatGemm ran."""
    with tempfile.TemporaryDirectory(prefix="yatdeploy-") as folder:
        widest = max(len(r.prompts) for r in runs)
        options = backends.Options(profile_to=Path(folder) / "profile", batch_profile=(1, widest, widest),
                                   progress=progress)
        try:
            decoder = Decoder(backend.open(onnx_path, options), layout)
        except YatDeployError as exc:
            report.comparisons.append(OutputComparison("open", "*", [], "", None, None, False, exc.text))
            return
        with progress.step(f"generating on {backend.name}"):
            for run, want, tols in zip(runs, expected, tolerances):
                try:
                    generated = decoder.generate(run.prompts, run.steps)
                    forced = None
                    if generated.tokens != [w.tokens for w in want]:
                        forced = decoder.generate(run.prompts, run.steps, forced=[w.tokens for w in want])
                except YatDeployError as exc:
                    report.comparisons.append(OutputComparison(run.label, "logits", [], "", None, None, False,
                                                               exc.text, detail=f"{run.title}: {exc.text}"))
                    continue
                report.comparisons.append(compare_run(run, generated, forced, want, tols, user, layout.dtype))
        execution = decoder.runner.yat_gemm_execution(nodes=nodes, runs=decoder.runs)
    report.yat_gemm_execution = execution.detail
    report.yat_gemm_kernel_runs = execution.kernel_runs
    report.execution_problem = execution.problem


@dataclass(frozen=True)
class _Step:
    """One step of one sequence compared."""

    sequence: int
    step: int
    err: float  # max |backend - torch| over the vocabulary
    limit: float  # the tolerance there (atol + rtol * |torch| at the worst value)
    ratio: float  # the largest err / tolerance over the vocabulary
    bad: int


def _step(sequence: int, step: int, got: np.ndarray, want: np.ndarray, tol: Tolerance) -> _Step:
    max_abs, _, bad = compare(got, want, tol)
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    limit = tol.atol + tol.rtol * np.abs(w)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.abs(g - w)
        ratios = np.where(limit > 0, diff / np.where(limit > 0, limit, 1.0), np.where(diff > 0, np.inf, 0.0))
    ratios = np.where(np.isfinite(g) & np.isfinite(w), ratios, np.inf)
    worst = int(np.argmax(ratios)) if ratios.size else 0
    return _Step(sequence, step, max_abs, float(limit.flat[worst]) if limit.size else tol.atol,
                 float(ratios.flat[worst]) if ratios.size else 0.0, bad)


def _top_two_gap(logits: np.ndarray) -> float:
    top = np.sort(np.asarray(logits, np.float64))[-2:]
    return float(top[1] - top[0]) if top.size == 2 else float("inf")


def _first_parting(tokens: list[list[int]], expected: list[Expected]) -> tuple[int, int]:
    """(sequence, step) where the backend's tokens first part from PyTorch's: the earliest step, then sequence."""
    partings = [(step, sequence) for sequence, (got, want) in enumerate(zip(tokens, expected))
                for step, (g, w) in enumerate(zip(got, want.tokens)) if g != w]
    step, sequence = min(partings)
    return sequence, step


def compare_run(run: Run, generated: Generation, forced: Generation | None, expected: list[Expected],
                tolerances: list[list[CaseTolerances]], user: Tolerance | None, dtype: str) -> OutputComparison:
    """One run on one backend against PyTorch: the tokens, and the logits at every step (on PyTorch's tokens where
    the backend's parted from them: `forced`)."""
    compared = generated if forced is None else forced
    batch, steps = len(expected), run.steps
    shape = [batch * steps, compared.logits.shape[-1]]
    got_dtype = str(compared.logits.dtype)
    want_dtype = str(expected[0].logits[0].dtype)
    if got_dtype != want_dtype:
        problem = f"logits in {got_dtype}, PyTorch gives {want_dtype}"
        return OutputComparison(run.label, "logits", shape, got_dtype, None, None, False, problem,
                                detail=f"{run.title}: {problem}")
    compared_steps, source = [], TOL_USER
    for b, want in enumerate(expected):
        for s in range(steps):
            case = tolerances[b][s]
            tol = user if user is not None else case.tolerances[0]
            source = TOL_USER if user is not None else case.source
            compared_steps.append(_step(b, s, compared.logits[b, s], want.logits[s], tol))
    worst = max(compared_steps, key=lambda c: c.ratio)
    failing = [c for c in compared_steps if c.bad]
    passed = not failing
    got_all = compared.logits.reshape(shape)
    want_all = np.stack([logits for want in expected for logits in want.logits])
    _, max_rel, _ = compare(got_all, want_all, Tolerance(worst.limit, 0.0))
    agree = sum(g == w for want, tokens in zip(expected, compared.tokens) for g, w in zip(tokens, want.tokens))
    pads = "" if batch == 1 else f" (left pads {'/'.join(map(str, generated.pads))})"
    largest = max(compared_steps, key=lambda c: c.err)
    shown = largest if passed else worst  # the row's tolerance: where the largest error is, or the worst failure
    within = f"max logit err {largest.err:.3g} ≤ tol {largest.limit:.3g}"
    beyond = (f"the logits differ beyond tolerance at {len(failing)} of {len(compared_steps)} steps (worst: step "
              f"{worst.step} of sequence {worst.sequence}, err {worst.err:.3g} > tol {worst.limit:.3g})")
    if forced is None:
        detail = f"{run.title}{pads}: tokens equal ({agree}/{len(compared_steps)}), " + (within if passed else
                                                                                         "but " + beyond)
    else:
        b, s = _first_parting(generated.tokens, expected)
        there = next(c for c in compared_steps if c.sequence == b and c.step == s)
        parted = (f"tokens differ from step {s} of sequence {b} (prompt {len(run.prompts[b])}): the backend chose "
                  f"{generated.tokens[b][s]}, PyTorch {expected[b].tokens[s]}, whose top two logits are "
                  f"{_top_two_gap(expected[b].logits[s]):.3g} apart")
        if passed:
            detail = (f"{run.title}{pads}: {parted}, a near tie (the logits there within tolerance: err "
                      f"{there.err:.3g} ≤ tol {there.limit:.3g}); compared on PyTorch's tokens from there, the "
                      f"logits at every step: {within}")
        else:
            detail = (f"{run.title}{pads}: {parted}; the logits there differ by {there.err:.3g} (tol "
                      f"{there.limit:.3g}); on PyTorch's tokens, {beyond}")
    case_errs = [tolerances[c.sequence][c.step].torch_errs[0] for c in compared_steps]
    onnx_err = None
    if all(want.float64 is not None for want in expected):
        reference64 = np.stack([row for want in expected for row in want.float64])
        onnx_err = float(np.nanmax(np.abs(got_all.astype(np.float64) - reference64)))
    atol_alone, rtol_alone = single_flag_needs(got_all, want_all, dtype)
    return OutputComparison(
        run.label, "logits", shape, got_dtype, largest.err, max_rel, passed,
        None if passed else detail, atol=shown.limit if user is None else user.atol,
        rtol=0.0 if user is None else user.rtol, tolerance_from=source, bad_values=sum(c.bad for c in compared_steps),
        max_abs_torch=float(np.nanmax(np.abs(want_all.astype(np.float64)))),
        torch_err=None if any(e is None for e in case_errs) else max(case_errs), onnx_err=onnx_err,
        top1_agreement=agree / len(compared_steps), atol_alone=atol_alone,
        rtol_alone=None if np.isinf(rtol_alone) else rtol_alone, detail=detail,
    )
