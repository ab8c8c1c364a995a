"""Localization on deliberately broken exports (tests/broken_exports.py): how many are localized to the module that
was broken, in how many backend runs, and in how many seconds each; and how many correct exports are (wrongly)
localized.

    python benchmarks/localize_zoo.py [--json FILE] [--bisect]

Each broken export is validated on ort-cpu (the custom-op library) with the localizer of `yatdeploy validate`;
`--bisect` forces the bisection (no value budget for one run with every value exposed). The goal (issue 26): every
one localized right, each in one run with every value exposed or at most ceil(log2 N) + 2 runs, under 60 s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.broken_exports

from tests.broken_exports import BROKEN, MODELS, break_export, export  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--bisect", action="store_true", help="bisect instead of exposing every value in one run")
    args = parser.parse_args(argv)
    budget = 0 if args.bisect else EXPOSE_ALL_BYTES
    rows, correct = [], []
    with tempfile.TemporaryDirectory(prefix="localize-zoo-") as folder:
        folder = Path(folder)
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
    right = sum(r["right"] for r in rows)
    bound_ok = all(r["runs"] == 1 or r["runs"] <= math.ceil(math.log2(max(r["modules_mapped"], 2))) + 2
                   for r in rows)
    false = sum(c["localized"] for c in correct)
    print(f"\nlocalized right: {right}/{len(rows)}; slowest {max(r['seconds'] for r in rows):.1f} s; "
          f"runs within the bound: {bound_ok}; correct exports localized: {false}/{len(correct)} "
          f"({platform.processor() or platform.machine()}, {BACKEND}, {'bisection' if args.bisect else 'one run'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"cases": rows, "correct_exports": correct, "right": right,
                                               "total": len(rows), "runs_within_bound": bound_ok,
                                               "false_localizations": false}, indent=2) + "\n")
    return 0 if right == len(rows) and false == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
