"""`yatdeploy doctor`: what this installation can do (yatdeploy.api.doctor)."""

from __future__ import annotations

import argparse
import json

from yatdeploy.commands.common import EXIT_OK

NAME = "doctor"


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    doctor = subparsers.add_parser(
        NAME, parents=[common], help="show what this installation can do",
        description="Versions, the built custom-op libraries, CUDA kernels, GPUs and which backends work.",
    )
    doctor.add_argument("--json", action="store_true", help="print the same as JSON")
    return doctor


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api
    from yatdeploy.doctor import format_text

    report = api.doctor()
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return EXIT_OK
