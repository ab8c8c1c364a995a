"""Localization on deliberately broken exports (tests/broken_exports.py): how many are localized to the module that
was broken, in how many backend runs, and in how many seconds each; how many correct exports are (wrongly)
localized; and, with `--large`, how long a large Yat GPT broken in a middle layer takes.

    python benchmarks/localize_zoo.py [--json FILE] [--bisect] [--zoo] [--large]

Each broken export is validated on ort-cpu (the custom-op library) with the localizer of `yatdeploy validate`;
`--bisect` forces the bisection (no value budget for one run with every value exposed). The goal (issue 26): every
one localized right, each in one run with every value exposed or at most ceil(log2 N) + 2 runs, under 60 s.

`--zoo`: every model of the test zoo (tests/model_zoo.py, and benchmarks/validation_zoo.py's architectures) that
validation takes, exported faithfully (float32, and the 16-bit exports the zoo has), validated with `--explain` on
ort-cpu and ort-function: the goal is 0 localizations. The kinds localization refuses (TorchScript, .pt2, JAX,
decoder exports) are run too, and listed with what they say.

`--large`: an 8-layer width-256 Yat GPT broken in its middle blocks (a perturbed YatNMN weight, a wrong YatGemm eps,
a wrong LayerNorm epsilon), localized in one run with every value exposed (whatever their size) and by bisection,
each timed (the localization alone, and validation with it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.broken_exports

from tests.broken_exports import BROKEN, break_export, export  # noqa: E402
from yatdeploy import localize, validation  # noqa: E402
from yatdeploy.localize import EXPOSE_ALL_BYTES  # noqa: E402

BACKEND = "ort-cpu"


def _validate(path: Path, model, budget: int) -> tuple[validation.ValidationReport, list[localize.Localization]]:
    found: list[localize.Localization] = []
    report = validation.validate(path, _loaded(model), backend_names=[BACKEND],
                                 localize=localize.localizer(max_exposed_bytes=budget, done=found.extend))
    return report, found


_LOADED: dict[int, object] = {}


def _loaded(model):
    from yatdeploy.loading import from_module

    return _LOADED.setdefault(id(model), from_module(model))


# --- the test zoo: correct exports, explained ----------------------------------------------------------------

ZOO_BACKENDS = ("ort-cpu", "ort-function")


def _zoo() -> list[tuple[str, object, object, str, object]]:
    """(name, build, example inputs, export dtype, dynamic axes) for every model of the test zoo validation takes."""
    import torch

    from benchmarks.validation_zoo import ARCHS
    from tests import model_zoo as zoo

    ids = ["ids:int64[batch=2,seq=8]"]
    entries = [(f"yat_mlp {name}", lambda o=options: zoo.yat_mlp(o), (3, 16), "float32", None)
               for name, options in zoo.YATNMN_OPTIONS.items()]
    entries += [("yat_mlp default", zoo.yat_mlp, (3, 16), dtype, None) for dtype in ("float16", "bfloat16")]
    entries += [
        ("two_inputs", zoo.build_two_inputs, ["x:float32[batch=2,16]", "ids:int64[batch=2,seq=5]"], "float32", None),
        ("token_tagger", zoo.build_token_tagger, ids, "float32", None),
        ("tiny_lm", zoo.build_tiny_lm, ["ids:int64[batch=2,seq=16]"], "float32", None),
        ("reused_and_unused", zoo.build_reused_and_unused, (3, 8), "float32", None),
        ("custom_net", lambda: zoo.perturb(zoo.CustomNet()).eval(), (3, 8), "float32", None),
        ("patched_yat", lambda: zoo.perturb(torch.nn.Sequential(zoo.PatchedYat(16, 8))).eval(), (3, 16), "float32",
         None),
    ]
    # The decoder tests' YatGPT options (tests/test_decoder_export.py), exported without a cache.
    gpts = {"default": {}, "spherical, no bias": {"spherical": True, "bias": False},
            "normalize_qk, constant alpha": {"normalize_qk": True, "constant_alpha": True},
            "no alpha, no out_proj": {"use_alpha": False, "use_out_proj": False},
            "no positions, Linear MLP, nn.Embedding, Linear head": {"positions": False, "linear_mlp": True,
                                                                     "tokens": "embedding", "head": "linear"},
            "YatNMN head": {"head": "yatnmn"}, "epsilon 1e-3": {"epsilon": 1e-3}}
    entries += [(f"yat_gpt {name}", lambda o=options: zoo.yat_gpt(**o), ids, "float32", None)
                for name, options in gpts.items()]
    entries += [("yat_gpt default", zoo.yat_gpt, ids, dtype, None) for dtype in ("float16", "bfloat16")]
    # benchmarks/validation_zoo.py's architectures (seed 1000), with its 16-bit exports.
    for arch in ARCHS.values():
        dtypes_ = ("float32", "float16", "bfloat16") if arch.name in ("issue_mlp", "spherical_mlp") else ("float32",)
        for dtype in dtypes_:
            entries.append((f"validation_zoo {arch.name}", lambda a=arch: a.build(1000).eval(),
                            lambda a=arch, d=dtype: _example(a.example(), d), dtype, arch.axes))
    return entries


def _example(tensor, dtype: str):
    import torch

    return tensor.to(getattr(torch, dtype)) if tensor.is_floating_point() else tensor


def zoo_rows(folder: Path) -> list[dict]:
    """Each zoo model's correct export validated with --explain on ZOO_BACKENDS: validation's verdict and what
    localization said per backend."""
    import yatdeploy
    from yatdeploy.errors import YatDeployError
    from yatdeploy.loading import from_module

    rows = []
    for index, (name, build, example, dtype, axes) in enumerate(_zoo()):
        row: dict = {"model": name, "dtype": dtype}
        started = time.perf_counter()
        model = build()
        path = folder / f"zoo-{index}.onnx"
        try:
            yatdeploy.export(model, example() if callable(example) else example, path, dtype=dtype,
                             dynamic_axes=axes, validate=False)
        except YatDeployError as exc:
            row.update(exported=False, why=exc.text)
            rows.append(row)
            print(f"-    {name:<54} {dtype:<8} not exported: {exc.text}")
            continue
        found: list[localize.Localization] = []
        report = validation.validate(path, from_module(model), backend_names=list(ZOO_BACKENDS),
                                     localize=localize.localizer(explain=True, done=found.extend))
        row.update(exported=True, passed=report.passed, backends=[
            {"backend": f.backend, "localized": None if f.divergence is None else f.divergence.module,
             "compared": f.compared, "runs": f.runs, "mode": f.mode, "note": f.note or None} for f in found],
            not_run=[b.name for b in report.backends if not b.available], lines=report.localization,
            seconds=round(time.perf_counter() - started, 1))
        row["false_localizations"] = sum(b["localized"] is not None for b in row["backends"])
        rows.append(row)
        mark = "ok " if row["false_localizations"] == 0 and report.passed else "BAD"
        print(f"{mark}  {name:<54} {dtype:<8} passed={report.passed} "
              f"compared={[b['compared'] for b in row['backends']]} "
              f"localized={[b['localized'] for b in row['backends']]}")
        path.unlink()
    return rows


def refused_rows(folder: Path) -> list[dict]:
    """The kinds localization refuses, each run with --explain, and what it says."""
    import torch

    import yatdeploy
    from tests.model_zoo import yat_gpt, yat_mlp
    from yatdeploy.errors import YatDeployError

    model = yat_mlp()
    onnx_path = folder / "refused-mlp.onnx"
    yatdeploy.export(model, (3, 16), onnx_path, validate=False)
    x = torch.randn(3, 16)
    torch.jit.save(torch.jit.trace(model, x), folder / "mlp.ts")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), folder / "mlp.pt2")
    rows = []

    def explain(kind: str, onnx_file: Path, against) -> None:
        try:
            report = yatdeploy.validate(onnx_file, against, backends=["ort-cpu"], explain=True, trust_pickle=True)
            said = "; ".join(report.localization)
            rows.append({"kind": kind, "validated": report.passed, "localized": report.first_divergence is not None,
                         "says": said})
        except YatDeployError as exc:
            rows.append({"kind": kind, "validated": None, "localized": False, "says": exc.text})
        print(f"-    {kind:<30} {rows[-1]['says']}")

    explain("TorchScript", onnx_path, folder / "mlp.ts")
    explain(".pt2 (torch.export)", onnx_path, folder / "mlp.pt2")
    decoder = folder / "decoder.onnx"
    gpt = yat_gpt()
    yatdeploy.export(gpt, ["ids:int64[batch=1,seq=8]"], decoder, kv_cache=True, validate=False)
    explain("decoder export (kv_cache)", decoder, gpt)
    try:
        import nmn.nnx as yat
        from flax import nnx
    except ImportError as exc:
        rows.append({"kind": "JAX (Flax NNX)", "validated": None, "localized": False,
                     "says": f"not run: {exc}"})
    else:
        jax_model = nnx.Sequential(yat.YatNMN(16, 12, rngs=nnx.Rngs(0)), nnx.Linear(12, 5, rngs=nnx.Rngs(0)))
        jax_path = folder / "jax.onnx"
        yatdeploy.export(jax_model, ["x:float32[batch=3,16]"], jax_path, validate=False)
        explain("JAX (Flax NNX)", jax_path, jax_model)
    return rows


# --- a large Yat GPT, broken in a middle layer ------------------------------------------------------------------

LARGE = {"layers": 8, "width": 256, "heads": 8, "vocabulary": 512, "context": 128}
LARGE_INPUT = ["ids:int64[batch=2,seq=64]"]


def large_rows(folder: Path) -> list[dict]:
    """The large GPT broken three ways in its middle blocks, localized in one run and by bisection, timed."""
    import onnx

    from tests.broken_exports import attribute, expected_modules, perturbed
    from tests.model_zoo import yat_gpt
    from yatdeploy import api

    model = yat_gpt(**LARGE)
    source = folder / "large-gpt.onnx"
    api.export(model, LARGE_INPUT, source, validate=False)
    nodes = len(onnx.load(str(source)).graph.node)
    breakages = {"perturbed YatNMN weight in blocks.2.mlp": perturbed("blocks.2.mlp"),
                 "YatGemm eps 1.0 in blocks.3.mlp": attribute("blocks.3.mlp", "YatGemm", "eps", 1.0),
                 "LayerNorm epsilon 0.1 in blocks.4.norm2": attribute("blocks.4.norm2", "LayerNormalization",
                                                                      "epsilon", 0.1)}
    rows = []
    for name, breakage in breakages.items():
        graph = onnx.load(str(source))
        want = expected_modules(breakage(graph))
        target = folder / "large-broken.onnx"
        onnx.save(graph, str(target))
        # Every value exposed in one run (whatever its size: EXPOSE_ALL_BYTES would bisect here), and bisection.
        for mode, budget in (("one run", 2**62), ("bisection", 0)):
            started = time.perf_counter()
            report, found = _validate(target, model, budget)
            seconds = time.perf_counter() - started
            first = report.first_divergence
            rows.append({"case": f"large gpt ({nodes} nodes): {name}", "requested": mode, "expected": sorted(want),
                         "found": None if first is None else first.module, "right": first is not None
                         and first.module in want, "runs": found[0].runs if found else 0,
                         "modules_mapped": found[0].sites if found else 0,
                         "localization_seconds": round(found[0].seconds, 2) if found else None,
                         "seconds": round(seconds, 2), "mode": found[0].mode if found else None})
            row = rows[-1]
            print(f"{'ok ' if row['right'] else 'MISS'} {row['case']:<62} {mode:<9} -> {row['found']!s:<14} "
                  f"{row['runs']} run(s) {row['localization_seconds']} s localizing, {seconds:5.1f} s in all")
    return rows


# --- the broken exports ---------------------------------------------------------------------------------------

def broken_rows(folder: Path, budget: int) -> tuple[list[dict], list[dict]]:
    rows, correct = [], []
    exported: dict[tuple[str, str | None], tuple] = {}
    for case in BROKEN:
        key = (case.model, case.dtype)
        if key not in exported:
            exported[key] = export(case.model, folder, case.dtype)
            model, path = exported[key]
            report, _ = _validate(path, model, budget)
            correct.append({"model": f"{case.model} {case.dtype or 'float32'}", "passed": report.passed,
                            "localized": report.first_divergence is not None})
        model, source = exported[key]
        target = folder / "broken.onnx"
        want = break_export(case, source, target)
        started = time.perf_counter()
        report, found = _validate(target, model, budget)
        seconds = time.perf_counter() - started
        first = report.first_divergence
        runs = found[0].runs if found else 0
        compared = found[0].sites if found else 0
        rows.append({"case": case.name, "expected": sorted(want), "found": None if first is None else first.module,
                     "onnx_node": None if first is None else first.onnx_node, "right": first is not None
                     and first.module in want, "validation_failed": not report.passed, "runs": runs,
                     "modules_mapped": compared, "seconds": round(seconds, 2),
                     "mode": found[0].mode if found else None})
        mark = "ok " if rows[-1]["right"] else "MISS"
        print(f"{mark} {case.name:<42} -> {rows[-1]['found']!s:<14} {runs} run(s) {seconds:5.1f} s")
    return rows, correct


def _versions() -> dict[str, str]:
    import nmn
    import onnx
    import onnxruntime
    import torch

    import yatdeploy

    return {"python": platform.python_version(), "yatdeploy": yatdeploy.__version__, "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "nmn": getattr(nmn, "__version__", "?")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--bisect", action="store_true", help="bisect instead of exposing every value in one run")
    parser.add_argument("--zoo", action="store_true",
                        help="also validate the test zoo's correct exports with --explain (0 localizations)")
    parser.add_argument("--large", action="store_true",
                        help="also localize an 8-layer width-256 Yat GPT broken in a middle block, timed")
    args = parser.parse_args(argv)
    budget = 0 if args.bisect else EXPOSE_ALL_BYTES
    started = time.time()
    result: dict = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "versions": _versions()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="localize-zoo-") as folder:
        folder = Path(folder)
        rows, correct = broken_rows(folder, budget)
        right = sum(r["right"] for r in rows)
        bound_ok = all(r["runs"] == 1 or r["runs"] <= math.ceil(math.log2(max(r["modules_mapped"], 2))) + 2
                       for r in rows)
        false = sum(c["localized"] for c in correct)
        print(f"\nlocalized right: {right}/{len(rows)}; slowest {max(r['seconds'] for r in rows):.1f} s; "
              f"runs within the bound: {bound_ok}; correct exports localized: {false}/{len(correct)} "
              f"({result['machine']}, {BACKEND}, {'bisection' if args.bisect else 'one run'})")
        result.update(cases=rows, correct_exports=correct, right=right, total=len(rows), runs_within_bound=bound_ok,
                      false_localizations=false)
        ok = right == len(rows) and false == 0
        if args.zoo:
            print("\nthe test zoo's correct exports, validated with --explain on " + " and ".join(ZOO_BACKENDS))
            zoo = zoo_rows(folder)
            refused = refused_rows(folder)
            validated = [r for r in zoo if r["exported"]]
            zoo_false = sum(r["false_localizations"] for r in validated)
            explained = sum(len(r["backends"]) for r in validated)
            print(f"\nzoo: {len(validated)} correct exports ({len(zoo) - len(validated)} not exported), "
                  f"{explained} localizations run, {zoo_false} false localizations; "
                  f"validation failed on {sum(not r['passed'] for r in validated)}")
            result["zoo"] = {"models": zoo, "refused": refused, "exports": len(validated),
                             "localizations_run": explained, "false_localizations": zoo_false,
                             "validation_failed": [f"{r['model']} {r['dtype']}" for r in validated if not r["passed"]]}
            ok = ok and zoo_false == 0
        if args.large:
            print(f"\na large Yat GPT ({LARGE}), broken in a middle layer")
            large = large_rows(folder)
            result["large"] = {"model": LARGE, "input": LARGE_INPUT, "cases": large,
                               "slowest_seconds": max(r["seconds"] for r in large),
                               "all_right": all(r["right"] for r in large)}
            ok = ok and all(r["right"] for r in large)
    result["seconds"] = round(time.time() - started)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
