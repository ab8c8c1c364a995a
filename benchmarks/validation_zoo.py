"""The default validation tolerance, measured on a zoo of models: how often it fails a correct export (false FAIL)
and how often it passes an export with one weight moved by 1 % of its tensor's scale (false PASS).

For every (architecture, export dtype, seed) the script exports the model (yatdeploy.export, validation off), moves one
element of one 2-D weight initializer by 1 % of that initializer's RMS in a copy, and runs PyTorch (export dtype and
float64) and the ONNX Runtime backends (ort-cpu: the custom-op library, ort-function: YatGemm inlined) on the inputs
validate draws (batches 1, 7 and 32). It then judges both exports with validation's own comparison
(`validation.derived_tolerances` and `validation.compare`) and prints the counts, with the worst ratios seen:

    python benchmarks/validation_zoo.py [--seeds 20] [--json results.json]

The figures and the reasoning behind the rule are in docs/architecture.md ("The default tolerance").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from nmn.torch import YatNMN
from onnx import numpy_helper
from torch import nn

import yatdeploy
from yatdeploy import backends, validation
from yatdeploy.cases import InputCase, random_cases
from yatdeploy.inputs import model_specs
from yatdeploy.reference import Reference

BACKENDS = ("ort-cpu", "ort-function")


def _prototypes(layer: YatNMN, scale: float, generator: torch.Generator) -> None:
    """Weights as a trained Yat layer's often are: prototypes close to typical inputs (x ≈ w, where the distance
    cancels and the layer is ill-conditioned)."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)


def issue_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(YatNMN(512, 160), nn.LayerNorm(160), YatNMN(160, 12))


def spherical_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(YatNMN(64, 64, spherical=True, weight_normalized=True), nn.LayerNorm(64),
                         YatNMN(64, 10, constant_alpha=True))


def deep_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(YatNMN(32, 128), YatNMN(128, 128, epsilon=1e-3), nn.LayerNorm(128), YatNMN(128, 8),
                         nn.Linear(8, 4))


def prototype_mlp(seed: int) -> nn.Module:
    """Ill-conditioned like a trained model: inputs are N(0, 1), the first layer's prototypes too."""
    torch.manual_seed(seed)
    model = nn.Sequential(YatNMN(256, 64, bias=False), nn.LayerNorm(64), YatNMN(64, 10), nn.Linear(10, 10))
    _prototypes(model[0], 1.0, torch.Generator().manual_seed(seed))
    return model


def trained_digits(seed: int) -> nn.Module:
    """A digits classifier with the options trained nmn models use (weight normalisation, positive init, a constant
    bias, a spherical layer), trained for 10 epochs: trained prototypes make it ill-conditioned."""
    from yatdeploy.demo import load_digits_split, train
    from yatdeploy.progress import QUIET

    torch.manual_seed(seed)
    model = nn.Sequential(
        YatNMN(64, 96, weight_normalized=True, positive_init=True, constant_bias=0.1), nn.LayerNorm(96),
        YatNMN(96, 48, spherical=True, weight_normalized=True), YatNMN(48, 10))
    x_train, _, y_train, _ = load_digits_split(seed)
    train(model, x_train, y_train, 10, seed, QUIET)
    return model


def digits_test_set(seed: int) -> dict[str, np.ndarray]:
    from yatdeploy.demo import load_digits_split

    return {"input": load_digits_split(seed)[1]}


def tiny_lm(seed: int) -> nn.Module:
    from yatdeploy.demo_lm import CharYatLM

    torch.manual_seed(seed)
    return CharYatLM(40, width=32, heads=4, context=64)


@dataclass(frozen=True)
class Arch:
    name: str
    build: object
    example: object  # () -> example inputs
    axes: object = None
    data: object = None  # (seed) -> {input name: array}: a real data set validated beside the random batches


ARCHS = {
    "issue_mlp": Arch("issue_mlp", issue_mlp, lambda: torch.randn(1, 512)),
    "spherical_mlp": Arch("spherical_mlp", spherical_mlp, lambda: torch.randn(1, 64)),
    "deep_mlp": Arch("deep_mlp", deep_mlp, lambda: torch.randn(1, 32)),
    "prototype_mlp": Arch("prototype_mlp", prototype_mlp, lambda: torch.randn(1, 256)),
    "trained_digits": Arch("trained_digits", trained_digits, lambda: torch.randn(1, 64), data=digits_test_set),
    "tiny_lm": Arch("tiny_lm", tiny_lm, lambda: torch.zeros(1, 16, dtype=torch.long), {0: "batch", 1: "seq"}),
}
# (architecture, export dtype): 16-bit exports of the MLPs as well.
PLAN = [(a, "float32") for a in ARCHS] + [(a, d) for a in ("issue_mlp", "spherical_mlp")
                                          for d in ("float16", "bfloat16")]


def perturb_one_weight(model: onnx.ModelProto, rng: np.random.Generator, fraction: float = 0.01) -> str:
    """Move one element of one 2-D float initializer (of at least 64 elements) by `fraction` of its RMS."""
    weights = [i for i in model.graph.initializer if len(i.dims) == 2 and int(np.prod(i.dims)) >= 64
               and i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    target = weights[rng.integers(len(weights))]
    values = numpy_helper.to_array(target)
    wide = values.astype(np.float64)
    index = tuple(int(rng.integers(d)) for d in values.shape)
    rms = float(np.sqrt(np.mean(wide ** 2)))
    wide[index] += fraction * rms * (1 if rng.random() < 0.5 else -1)
    target.CopyFrom(numpy_helper.from_array(wide.astype(values.dtype), target.name))
    return f"{target.name}{list(index)}"


def collect(arch: Arch, dtype: str, seed: int, folder: Path, fraction: float = 0.01) -> list[dict]:
    module = arch.build(seed).eval()
    path = folder / f"{arch.name}-{dtype}-{seed}.onnx"
    example = arch.example()
    if example.is_floating_point():
        example = example.to(getattr(torch, dtype))
    result = yatdeploy.export(module, example, path, dtype=dtype, dynamic_axes=arch.axes, validate=False)
    reference: Reference = result.reference
    exported = onnx.load(path)
    moved = folder / f"{path.stem}-moved.onnx"
    rng = np.random.default_rng(seed)
    where = perturb_one_weight(exported, rng, fraction)
    onnx.save(exported, moved)
    specs = model_specs(exported)
    ranges = {s.name: reference.int_range() for s in specs if s.dtype.startswith("int")}
    cases = random_cases(specs, (1, 7, 32), seed, ranges)
    pooled = len(cases)
    if arch.data is not None:
        cases.append(InputCase("data set", {k: v.astype(dtype) for k, v in arch.data(seed).items()}))
    expected = [reference.run(c.arrays, "inputs") for c in cases]
    float64, _ = reference.float64_runs([c.arrays for c in cases], expected)
    defaults = validation.derived_tolerances(dtype, expected, float64, pooled)
    rows = []
    for backend_name in BACKENDS:
        backend = backends.get(backend_name)
        if backend.availability():
            continue
        for variant, onnx_path in (("correct", path), ("moved", moved)):
            runner = backend.open(onnx_path, backends.Options(intra_op_threads=1))
            for case, want, want64, tolerances in zip(cases, expected, float64, defaults):
                got = runner.run(case.arrays)
                for g, w, w64, tol, torch_err in zip(got, want, want64, tolerances.tolerances, tolerances.torch_errs):
                    rows.append(judge(arch.name, dtype, seed, backend_name, variant, case.name, g, w, w64, tol,
                                      torch_err, where))
    return rows


def judge(arch: str, dtype: str, seed: int, backend: str, variant: str, case: str, got: np.ndarray, want: np.ndarray,
          want64: np.ndarray, tol: validation.Tolerance, torch_err: float, moved: str) -> dict:
    """One output of one case, as validate judges it (`tol`, `torch_err`: `validation.derived_tolerances`)."""
    _, _, bad = validation.compare(got, want, tol)
    u = validation.unit_roundoff(dtype)
    scale = float(np.max(np.abs(want.astype(np.float64)))) or 1.0
    diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    onnx_err = validation._error_against(got, want64, dtype)
    return {"arch": arch, "dtype": dtype, "seed": seed, "backend": backend, "variant": variant, "case": case,
            "passed": bad == 0, "bad_values": bad, "atol": tol.atol, "scale": scale, "unit": u, "diff": diff, "torch_err": torch_err,
            "onnx_err": onnx_err, "torch_ulps": torch_err / (u * scale), "diff_over_atol": diff / tol.atol,
            "moved": moved if variant == "moved" else None}


def summarise(rows: list[dict]) -> dict:
    by_model: dict[tuple, dict[str, bool]] = {}
    for row in rows:
        key = (row["arch"], row["dtype"], row["seed"], row["variant"])
        by_model.setdefault(key, {})
        by_model[key][row["backend"]] = by_model[key].get(row["backend"], True) and row["passed"]
    correct = [k for k in by_model if k[3] == "correct"]
    moved = [k for k in by_model if k[3] == "moved"]
    false_fail = sorted(f"{k[0]}/{k[1]}/seed {k[2]}" for k in correct if not all(by_model[k].values()))
    false_pass = sorted(f"{k[0]}/{k[1]}/seed {k[2]}" for k in moved if any(by_model[k].values()))
    good = [r for r in rows if r["variant"] == "correct"]
    bad = [r for r in rows if r["variant"] == "moved"]
    worst_good = max(good, key=lambda r: r["diff_over_atol"])
    # The smallest worst-case margin by which a moved weight was caught, per model.
    caught = {}
    for r in bad:
        key = (r["arch"], r["dtype"], r["seed"], r["backend"])
        caught[key] = max(caught.get(key, 0.0), r["diff_over_atol"])
    return {"models": len(correct), "false_fail": false_fail, "false_pass": false_pass,
            "worst_correct_diff_over_atol": worst_good["diff_over_atol"],
            "worst_correct": {k: worst_good[k] for k in ("arch", "dtype", "seed", "backend", "case")},
            "least_moved_diff_over_atol": min(caught.values()) if caught else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per (architecture, dtype) (default 20)")
    parser.add_argument("--arch", nargs="*", default=None, help="only these architectures")
    parser.add_argument("--dtype", nargs="*", default=None, help="only these export dtypes")
    parser.add_argument("--fraction", type=float, default=0.01,
                        help="how far the one weight moves, as a fraction of its tensor's RMS (default 0.01)")
    parser.add_argument("--json", help="write every comparison and the summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="yatdeploy-zoo-") as folder:
        for arch_name, dtype in PLAN:
            if (args.arch and arch_name not in args.arch) or (args.dtype and dtype not in args.dtype):
                continue
            for seed in range(args.seeds):
                rows += collect(ARCHS[arch_name], dtype, 1000 + seed, Path(folder), args.fraction)
                Path(folder, f"{arch_name}-{dtype}-{1000 + seed}.onnx").unlink()
            print(f"{arch_name:>14} {dtype:>8}: {args.seeds} seeds ({time.time() - start:.0f} s)", file=sys.stderr)
    summary = summarise(rows)
    summary.update(machine=platform.processor() or platform.machine(), torch=torch.__version__,
                   seconds=round(time.time() - start))
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return 0 if not summary["false_fail"] and not summary["false_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
