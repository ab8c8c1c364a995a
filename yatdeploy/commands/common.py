"""What several commands share: the exit statuses, the flag groups of export and validate, the tolerance the
flags give, and a validation report printed."""

from __future__ import annotations

import argparse

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_REQUESTS_FAILED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

# The API's keywords that export and validate spell as other flags than their own.
MODEL_ALIASES = {("input_files", None): "--inputs", ("inputs", None): "--input", ("int_ranges", None): "--int-range",
                 ("dynamic_batch", False): "--static-batch"}


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading the PyTorch model")
    group.add_argument(
        "--arch", metavar="MODULE:CALLABLE",
        help="build the model with this callable, then load MODEL as its state_dict (a flax.nnx.Module: MODEL, if "
             "given, is its checkpoint)",
    )
    group.add_argument(
        "--state-key", metavar="NAME",
        help="MODEL is a training checkpoint (a dict of the model's state_dict, the optimizer's, ...): load its "
             "entry NAME, e.g. model (a state_dict, with --arch, or a whole module)",
    )
    group.add_argument(
        "--trust-pickle", action="store_true",
        help="vouch for MODEL: unpickle it without the torch.nn/nmn class allowlist, load a torch.export "
             "archive's pickled entries, run a TorchScript archive's code; only for files you trust",
    )


def add_tolerance_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("validation")
    group.add_argument(
        "--atol", type=float,
        help="absolute tolerance: with --atol or --rtol, values pass when |onnx - torch| <= atol + rtol*|torch| "
             "(the flag not given: 1e-5 / 1e-4 for float32). Without either, the tolerance is derived per output "
             "from PyTorch's own rounding error against a float64 run of the model",
    )
    group.add_argument("--rtol", type=float, help="relative tolerance (see --atol)")
    group.add_argument(
        "--inputs", nargs="+", default=[], metavar="FILE",
        help="also compare on these inputs: .npy arrays, or .npz files whose every array is one batch; for a "
             "model of several inputs, .npz files holding one array per input name",
    )
    group.add_argument(
        "--int-range", action="append", default=[], metavar="NAME=LO:HI",
        help="draw the integer input NAME from [LO, HI) (default: the model's smallest embedding table, else "
             "0:16)",
    )
    group.add_argument("--report", metavar="FILE", help="write the validation report as JSON")
    group.add_argument("--seed", type=int, default=0, help="seed of the random input batches (default 0)")


def tolerance(args: argparse.Namespace):
    """The user's tolerance, checked (validation completes the flag not given from its fixed table); None (derived)
    without either."""
    from yatdeploy.validation import Tolerance

    return None if args.atol is None and args.rtol is None else Tolerance(args.atol, args.rtol)


def print_report(report, args: argparse.Namespace) -> int:
    """The report (the API wrote it to --report), and the exit status it gives."""
    from yatdeploy.validation import format_report

    print(format_report(report))
    if args.report:
        print(f"\nreport written to {args.report}")
    return EXIT_OK if report.passed else EXIT_VALIDATION_FAILED
