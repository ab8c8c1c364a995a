"""`yatdeploy fuse`: the decomposed Yat math of any exporter's ONNX model as YatGemm nodes (yatdeploy.api.fuse)."""

from __future__ import annotations

import argparse
from pathlib import Path

from yatdeploy.commands.common import EXIT_OK

NAME = "fuse"


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    fuse = subparsers.add_parser(
        NAME, parents=[common], help="turn an exporter's decomposed Yat math into YatGemm nodes",
        description="Find the Yat products an exporter wrote as ordinary ops (jax2onnx's export of nmn.nnx layers, "
                    "a plain torch.onnx.export of nmn.torch layers) - YatNMN with any option, YatEmbed.attend, Yat "
                    "attention scores - and replace each with one yat.YatGemm node, the YatGemm ONNX function "
                    "attached. Prints per pattern how many were fused and what was left decomposed and why. The "
                    "fused model is checked against the unfused one on random inputs in plain ONNX Runtime and "
                    "not written if they disagree beyond float rounding (docs/fusion.md).",
    )
    fuse.add_argument("onnx_model", metavar="MODEL", help="the ONNX model to fuse")
    fuse.add_argument("-o", "--output", metavar="FUSED", required=True, help="the fused model to write")
    fuse.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    fuse.add_argument("--seed", type=int, default=0, help="seed of the check's random inputs (default 0)")
    return fuse


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api
    from yatdeploy.fusion import format_report

    _, report = api.fuse(Path(args.onnx_model), args.output, report=args.report, seed=args.seed, progress=progress)
    print(format_report(report))
    print(f"\nwritten to {args.output}")
    if args.report:
        print(f"report written to {args.report}")
    return EXIT_OK
