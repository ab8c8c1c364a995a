"""`yatdeploy validate`: an ONNX export against its PyTorch model (yatdeploy.api.validate)."""

from __future__ import annotations

import argparse

from yatdeploy.commands.common import MODEL_ALIASES, add_model_source_args, add_tolerance_args, print_report, tolerance

NAME = "validate"
TORCH = True
ALIASES = {**MODEL_ALIASES, ("backends", None): "--backend"}


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from yatdeploy import backends
    from yatdeploy.cases import DEFAULT_BATCHES

    default_batches = ",".join(str(b) for b in DEFAULT_BATCHES)
    validate = subparsers.add_parser(
        NAME, parents=[common], help="compare an ONNX export with its PyTorch or JAX model",
        description="Run the PyTorch model and every available ONNX backend on random batches (and --inputs), "
                    "and compare output names, shapes, dtypes and values. A decoder export (export --kv-cache) is "
                    "validated by greedy generation instead: --tokens tokens with the KV cache on every backend "
                    "against PyTorch's full recompute, at batch 1, batch 3 with ragged prompts and the full context "
                    "(--input-shape, --input, --inputs, --int-range, --batches and --engine are refused for it). "
                    "On a failure of values it also says where the export first diverges: the first PyTorch module "
                    "whose output ONNX computes otherwise (--explain: always; --repro DIR: with a minimal "
                    "reproduction). Exits 1 when they disagree.",
    )
    validate.add_argument("onnx_model", metavar="ONNX",
                          help="the exported ONNX model; or a reproduction folder --repro wrote, validated against "
                               "the PyTorch outputs it records (no --against)")
    validate.add_argument("--against", metavar="MODEL",
                          help="the PyTorch model file; or the checkpoint of the Flax NNX model --arch builds (an "
                               "orbax folder, a msgpack of its state's pure dict), left out for the model as built")
    validate_declared = validate.add_mutually_exclusive_group()
    validate_declared.add_argument(
        "--input-shape", metavar="B,D1,...",
        help="the example shape of a one-input model (default: recorded at export, or the model's static dims)",
    )
    validate_declared.add_argument(
        "--input", action="append", dest="inputs_spec", metavar="NAME:DTYPE[DIM,...]",
        help="the model's inputs with example sizes, as export takes them (default: recorded at export)",
    )
    validate.add_argument(
        "--batches", metavar="N,N,...",
        help=f"batch sizes of the random inputs (default {default_batches})",
    )
    validate.add_argument(
        "--tokens", type=int, metavar="N",
        help="a decoder export's tokens generated per run (default 64, fewer where the context is shorter)",
    )
    validate.add_argument(
        "--backend", action="append", metavar="NAME",
        help=f"validate on this backend (repeatable; default: every available one): {', '.join(backends.names())}",
    )
    validate.add_argument(
        "--engine", metavar="PLAN",
        help="the TensorRT engine for the tensorrt backend (default: build one for the batches validated)",
    )
    validate.add_argument(
        "--explain", action="store_true",
        help="localize even when validation passes: compare every PyTorch module's output with the ONNX value it "
             "maps to and report the first that differs beyond its own derived tolerance (done anyway on a failure "
             "of values)",
    )
    validate.add_argument(
        "--repro", metavar="DIR",
        help="write the first divergence's minimal reproduction to DIR: the ONNX subgraph of that node or module, its "
             "inputs (inputs.npz) and PyTorch's outputs (expected.npz), runnable by onnxruntime and by "
             "`yatdeploy validate DIR`",
    )
    add_model_source_args(validate)
    add_tolerance_args(validate)
    return validate


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api

    report = api.validate(
        args.onnx_model, args.against, input_shape=args.input_shape, inputs=args.inputs_spec,
        int_ranges=args.int_range, input_files=args.inputs, batches=args.batches, tokens=args.tokens,
        tolerance=tolerance(args), backends=args.backend, engine=args.engine, arch=args.arch,
        trust_pickle=args.trust_pickle, state_key=args.state_key, seed=args.seed, report=args.report,
        explain=args.explain, repro=args.repro, progress=progress,
    )
    return print_report(report, args)
