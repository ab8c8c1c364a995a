"""The `yatdeploy` command line: export, validate, build-engine, demo, serve, bench, doctor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from yatdeploy import __version__, dtypes
from yatdeploy.errors import ConsistencyError, YatDeployError

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_REQUESTS_FAILED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C

_DESCRIPTION = """\
Deploy PyTorch Yat (nmn) models through ONNX. Every nmn YatNMN layer becomes one yat.YatGemm node,
and the model carries YatGemm as an ONNX function, so a plain onnxruntime runs it.

exit status: 0 success, 1 validation failed, 2 bad input or an output that can't be written (message on
stderr), 3 internal error, 4 bench: some requests failed, 130 interrupted (Ctrl-C; no partial file is left)"""


def _add_model_source_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("loading the PyTorch model")
    group.add_argument(
        "--arch", metavar="MODULE:CALLABLE",
        help="build the model with this callable, then load MODEL as its state_dict",
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


def _add_tolerance_args(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yatdeploy", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"yatdeploy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The library's defaults, shown and used as they are (imported here: the command modules load lazily).
    from yatdeploy import backends
    from yatdeploy.cases import DEFAULT_BATCHES
    from yatdeploy.packaging import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE_SIZE
    from yatdeploy.serving.repository import CONTROL_MODES, ModelSource
    from yatdeploy.spec import FUNCTION_OPSET as OPSET

    default_batches = ",".join(str(b) for b in DEFAULT_BATCHES)
    backend_names = ", ".join(backends.names())
    min_batch, opt_batch, max_batch = backends.DEFAULT_BATCH_PROFILE

    export = commands.add_parser(
        "export", parents=[common], help="export a PyTorch Yat model to ONNX and validate it",
        description="Export MODEL (torch.save'd module, state_dict with --arch, TorchScript, or .pt2) to ONNX, "
                    "then validate the result against PyTorch.",
    )
    export.add_argument("model", metavar="MODEL", help="the PyTorch model file")
    export.add_argument("-o", "--output", metavar="FILE", help="the ONNX file to write (default: MODEL with .onnx)")
    declared = export.add_mutually_exclusive_group(required=True)
    declared.add_argument(
        "--input-shape", metavar="B,D1,...",
        help="shape of the example input, batch first, e.g. 1,784; the batch stays dynamic (one float input)",
    )
    declared.add_argument(
        "--input", action="append", dest="inputs_spec", metavar="NAME:DTYPE[DIM,...]",
        help="one model input, in order (repeatable): DTYPE is a float type, int32, int64 or bool; a dim is a "
             "fixed size or LABEL=SIZE, dynamic with that example size and shared by every dim of the label, "
             "or LABEL=SIZE:MAX, at most MAX (recorded, validated at MAX, refused past it when served), "
             "e.g. 'ids:int64[batch=1,seq=32]', 'ids:int64[batch=1,seq=16:1024]'",
    )
    export.add_argument(
        "--dtype", choices=dtypes.NAMES,
        help="export in this dtype (casts the model); default: the model's parameter dtype",
    )
    export.add_argument("--static-batch", action="store_true", help="fix the batch dimension to the example's")
    export.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, 18 to 22 (default {OPSET})")
    export.add_argument("--no-validate", action="store_true", help="skip the validation after export")
    export.add_argument(
        "--repository", metavar="DIR",
        help="also write DIR/<name>/1/model.onnx and a config.pbtxt for Triton or `yatdeploy serve`",
    )
    export.add_argument("--name", help="model name in the repository (default: the output file's stem)")
    export.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help=f"max_batch_size in config.pbtxt (default {DEFAULT_MAX_BATCH_SIZE})")
    from yatdeploy.packaging import DEFAULT_OP_LIBRARY_ROOT

    export.add_argument(
        "--op-library-root", metavar="DIR", default=DEFAULT_OP_LIBRARY_ROOT,
        help="with --repository: the absolute path the repository will have where Triton runs. The custom-op "
             "library and the OpenBLAS it links are copied beside config.pbtxt, whose op_library_filename is "
             f"written as DIR/<name>/libyatdeploy_ort.so (default {DEFAULT_OP_LIBRARY_ROOT}, Triton's convention: "
             "-v REPO:/models ... --model-repository=/models; /mnt/models under KServe; the repository's own "
             "absolute path, e.g. \"$(realpath REPO)\", for a Triton on this machine). docs/triton.md",
    )
    _add_model_source_args(export)
    _add_tolerance_args(export)

    validate = commands.add_parser(
        "validate", parents=[common], help="compare an ONNX export with its PyTorch model",
        description="Run the PyTorch model and every available ONNX backend on random batches (and --inputs), "
                    "and compare output names, shapes, dtypes and values. Exits 1 when they disagree.",
    )
    validate.add_argument("onnx_model", metavar="ONNX", help="the exported ONNX model")
    validate.add_argument("--against", required=True, metavar="MODEL", help="the PyTorch model file")
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
        "--batches", default=default_batches, metavar="N,N,...",
        help=f"batch sizes of the random inputs (default {default_batches})",
    )
    validate.add_argument(
        "--backend", action="append", metavar="NAME",
        help=f"validate on this backend (repeatable; default: every available one): {backend_names}",
    )
    validate.add_argument(
        "--engine", metavar="PLAN",
        help="the TensorRT engine for the tensorrt backend (default: build one for the batches validated)",
    )
    _add_model_source_args(validate)
    _add_tolerance_args(validate)

    builders = backends.builders()
    default_builder = backends.default_builder().name

    def taken_by(field: str) -> str:
        """The builders that read a build option, each with its default."""
        return "; ".join(f"{b.name}, default: {b.builder.options[field]}" for b in builders
                         if field in b.builder.options)

    engine = commands.add_parser(
        "build-engine", parents=[common], help="build an engine (TensorRT, TensorRT for RTX) on a backend that builds",
        description="Build an engine from a yatdeploy ONNX export, on one of the backends that build engines "
                    f"({', '.join(b.name for b in builders)}), with one optimisation profile over the batch "
                    "dimension; the network is strongly typed (precision is the ONNX model's). "
                    "--backend tensorrt (default): the data-center TensorRT, every YatGemm node as yatdeploy's "
                    "plugin (its ahead-of-time PTX kernel is embedded, so the engine runs without Python, in trtexec "
                    "or Triton); needs TensorRT >= 10.15 and an NVIDIA GPU. --backend tensorrt-rtx: TensorRT for RTX, "
                    "built on any machine (no GPU needed) for RTX-class GPUs; YatGemm runs as TensorRT's own layers, "
                    "or with --yat-plugin as yatdeploy's plugin (the engine then needs Python and yatdeploy where "
                    "it runs). An option a backend does not take is refused.",
    )
    engine.add_argument("onnx_model", metavar="ONNX", help="the exported ONNX model")
    engine.add_argument("-o", "--output", metavar="ENGINE",
                        help="the engine to write (default: ONNX with the backend's engine suffix, .plan for TensorRT)")
    engine.add_argument("--min-batch", type=int, default=min_batch,
                        help=f"smallest batch the engine takes (default {min_batch})")
    engine.add_argument("--opt-batch", type=int, default=opt_batch,
                        help=f"batch the kernels are tuned for (default {opt_batch})")
    engine.add_argument("--max-batch", type=int, default=max_batch,
                        help=f"largest batch the engine takes (default {max_batch})")
    engine.add_argument("--timing-cache", metavar="FILE",
                        help=f"a timing cache, read if present and updated ({taken_by('timing_cache')})")
    engine.add_argument("--workspace-mb", type=int, metavar="MB",
                        help=f"the builder's workspace limit ({taken_by('workspace_mb')})")
    engine.add_argument("--verbose", action="store_true", help="the builder's verbose log (TensorRT's)")
    # --runtime: build-engine's name for --backend before the backends built engines (issue 21); added first, so
    # that messages spell the option --backend.
    engine.add_argument("--runtime", dest="backend", choices=[b.name for b in builders], default=argparse.SUPPRESS,
                        help="an alias of --backend (its name before other backends built engines)")
    engine.add_argument("--backend", choices=[b.name for b in builders], default=default_builder,
                        help=f"the backend that builds the engine, and runs it (default {default_builder}): "
                             + "; ".join(f"{b.name}: {b.description}" for b in builders))
    engine.add_argument("--compute-capability", nargs="+", action="extend", metavar="CC",
                        help="the GPUs to build for, 8.6 written 86, 8.6 or sm_86 "
                             f"({taken_by('compute_capabilities')})")
    engine.add_argument("--yat-plugin", action="store_true",
                        help="every YatGemm node as yatdeploy's plugin, not the runtime's own layers "
                             f"({taken_by('yat_plugin')})")
    engine.add_argument(
        "--repository", metavar="DIR",
        help="also write DIR/<name>/1/model<suffix> and a config.pbtxt for Triton or serve (tensorrt: model.plan, "
             "platform tensorrt_plan)",
    )
    engine.add_argument("--name", help="model name in the repository (default: the engine file's stem)")

    demo = commands.add_parser(
        "demo", parents=[common], help="train, export and validate the bundled digits model",
        description="Train a small Yat MLP on scikit-learn's bundled digits data (no download), save it, "
                    "export it, validate it, and compare test accuracy in PyTorch and ONNX Runtime.",
    )
    demo.add_argument("--out", default="yatdeploy-demo", metavar="DIR", help="where to write (default ./yatdeploy-demo)")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split and training (default 0)")
    demo.add_argument("--lm", action="store_true",
                      help="instead: train a tiny Yat character LM (YatEmbed, causal attention, YatNMN, the tied "
                           "attend head) on text shipped with yatdeploy, export it with dynamic batch and length, "
                           "validate it, and decode a prompt greedily in PyTorch and ONNX Runtime side by side")
    demo.add_argument("--steps", type=int, default=1000, help="--lm: training steps (default 1000)")
    demo.add_argument("--tensorrt", action="store_true",
                      help="also build a TensorRT engine (model.plan) and validate it against PyTorch: the first "
                           "thing to run on a machine with TensorRT and a GPU")
    serve = commands.add_parser(
        "serve", parents=[common], help="serve models over HTTP and gRPC (Open Inference Protocol, KServe v2)",
        description="Serve one .onnx file (under its file stem) or a Triton-style model repository folder "
                    "with FastAPI and uvicorn (HTTP) and grpcio (gRPC), speaking the Open Inference Protocol "
                    "(KServe v2) as Triton does: binary tensors, classification, statistics, model configuration "
                    "and repository control, with dynamic batching and Prometheus metrics on /metrics.",
    )
    serve.add_argument("path", metavar="MODEL_OR_REPOSITORY",
                       help="an .onnx file, a TensorRT .plan from build-engine, or a model repository folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001, Triton's; 0: no gRPC)")
    serve.add_argument("--model-control-mode", choices=CONTROL_MODES, default="none",
                       help="none (default): serve every model of the repository, no loading or unloading; "
                            "explicit: serve what --load-model names, then load and unload on request "
                            "(POST /v2/repository/models/NAME/load|unload), as Triton's")
    serve.add_argument("--load-model", action="append", default=[], metavar="NAME",
                       help="with --model-control-mode explicit: a model to load at start-up (repeatable; * for all)")
    serve.add_argument("--strict-readiness", default="true", nargs="?", const="true", metavar="BOOL",
                       help="true (default, as Triton): /v2/health/ready (and gRPC ServerReady) is 200 only while "
                            "every model asked for is served; false: ready once the server serves what it could "
                            "load, a model that failed staying unavailable with its reason")
    serve.add_argument("--exit-on-error", default="false", nargs="?", const="true", metavar="BOOL",
                       help="true: exit (status 2, with the reasons) when a model asked for at start-up does not "
                            "load, as Triton does by default; false (default): serve the models that load and "
                            "report the others (exit 2 only when none loads)")
    serve.add_argument("--backend", help=f"one of {backend_names} (default: config.pbtxt, else the fastest "
                                          "ONNX Runtime backend that works)")
    serve.add_argument("--max-batch-size", type=int,
                       help=f"dynamic batching limit (default: config.pbtxt, else {DEFAULT_MAX_BATCH_SIZE})")
    serve.add_argument("--max-queue-delay-us", type=int,
                       help="longest wait for a fuller batch, in µs "
                            f"(default: config.pbtxt, else {ModelSource.max_queue_delay_us})")
    serve.add_argument("--max-queue-size", type=int,
                       help=f"queued requests per model before 503 (default: config.pbtxt, else {DEFAULT_MAX_QUEUE_SIZE})")
    serve.add_argument("--no-batching", action="store_true", help="run every request on its own")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="allow browsers on ORIGIN (e.g. http://localhost:3000, or *) to call the service "
                            "(CORS; repeatable; default: none)")
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body (default 64 MB)")
    serve.add_argument("--max-inflight-body-mb", type=float, default=256.0,
                       help="request bodies held at once, over HTTP and gRPC, read, decompressed or waiting for "
                            "their answer (default 256 MB); past it a request gets 503 (gRPC: UNAVAILABLE) at "
                            "once, as for a full queue; a lone request always goes on")
    serve.add_argument("--threads", type=int,
                       help="ONNX Runtime intra-op threads per model (default: all cores but one, which the event "
                            "loop keeps)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="info (default) writes one JSON access-log line per inference request (time, id, "
                            "model, status, latency); warning keeps only problems")

    bench = commands.add_parser(
        "bench", parents=[common], help="load-test an Open Inference Protocol endpoint (ours or Triton's)",
        description="Closed loop over a list of concurrencies (and/or open loop at fixed request rates) against "
                    "any KServe v2 endpoint. Reports throughput, p50/p90/p95/p99 latency and errors per step; "
                    "writes bench.csv (perf_analyzer's columns), bench.html (plots) and bench.json to --out.",
    )
    bench.add_argument("url", metavar="URL", help="the server: http://HOST:PORT (e.g. http://127.0.0.1:8000) or "
                                                  "grpc://HOST:PORT (e.g. grpc://127.0.0.1:8001)")
    bench.add_argument("--model", required=True, help="the model's name")
    bench.add_argument("--concurrency", default="1,4,16,32", help="closed-loop concurrencies (default 1,4,16,32)")
    bench.add_argument("--rate", default="", help="open-loop request rates per second, e.g. 200,800 (default none)")
    bench.add_argument("--duration", type=float, default=5.0, help="measured seconds per step (default 5)")
    bench.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each step (default 1)")
    bench.add_argument("--batch", type=int, default=1, help="batch size of every request (default 1)")
    bench.add_argument("--json-payload", action="store_true",
                       help="HTTP: send JSON tensors instead of binary ones (gRPC always sends raw tensors)")
    bench.add_argument("--max-inflight", type=int, default=256, help="open-loop connection limit (default 256)")
    bench.add_argument("--onnx", metavar="FILE", help="the model's .onnx: also time it in-process, for the overhead")
    bench.add_argument("--out", default="yatdeploy-bench", metavar="DIR", help="output folder (default ./yatdeploy-bench)")

    doctor = commands.add_parser(
        "doctor", parents=[common], help="show what this installation can do",
        description="Versions, the built custom-op libraries, CUDA kernels, GPUs and which backends work.",
    )
    doctor.add_argument("--json", action="store_true", help="print the same as JSON")
    return parser


def _check_tolerance_args(args: argparse.Namespace) -> None:
    for name in ("atol", "rtol"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < float("inf"):  # NaN fails too
            raise YatDeployError(f"--{name} {value}: must be a finite number >= 0")


def _tolerance(args: argparse.Namespace):
    """The user's tolerance (validation completes the flag not given from its fixed table); None (derived)
    without either."""
    from yatdeploy.validation import Tolerance

    return None if args.atol is None and args.rtol is None else Tolerance(args.atol, args.rtol)


def _print_report(report, args: argparse.Namespace) -> int:
    from yatdeploy.validation import format_report

    print(format_report(report))
    if args.report:
        report.write_json(args.report)  # whole or not at all; a place that can't take it is a one-line error
        print(f"\nreport written to {args.report}")
    return EXIT_OK if report.passed else EXIT_VALIDATION_FAILED


def cmd_export(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api
    from yatdeploy.exporting import ExportOptions, export_model

    # The flags as given; made, the options are parsed and checked (before the model is loaded), and the export
    # settles them against the model, once (yatdeploy.exporting: the stages in order).
    options = ExportOptions(args.input_shape or (), dtype=args.dtype, dynamic_batch=not args.static_batch,
                            inputs=tuple(args.inputs_spec or ()), int_ranges=args.int_range, opset=args.opset)
    _check_tolerance_args(args)
    output = Path(args.output) if args.output else Path(args.model).with_suffix(".onnx")
    if output.resolve() == Path(args.model).resolve():
        raise YatDeployError(f"-o {output} would overwrite the model file")
    _check_outputs(output, args.report, args.repository)
    started = time.perf_counter()
    progress.say(f"loading {args.model}")
    loaded = api.load(args.model, arch=args.arch, trust_pickle=args.trust_pickle, state_key=args.state_key)
    progress.say(f"exporting ({loaded.format})")
    result = export_model(loaded, output, options, progress)
    export_seconds = time.perf_counter() - started
    print(f"wrote {result.path}: {result.yat_gemm_nodes} YatGemm node(s) for {result.yat_layers} Yat layer call(s), "
          f"{result.dtype}, outputs {', '.join(result.output_names)} ({export_seconds:.1f} s)")
    for note in result.notes:
        print(f"note: {note}")
    if args.repository:
        from yatdeploy import native
        from yatdeploy.packaging import write_repository

        folder = write_repository(args.repository, args.name or result.path.stem, result.path,
                                  op_library=native.ort_library_path(), max_batch_size=args.max_batch_size,
                                  op_library_root=args.op_library_root)
        print(f"wrote model repository entry {folder}")
    if args.no_validate:
        return EXIT_OK
    progress.say("validating")
    report = api.validate(result.path, result.reference, input_files=args.inputs, int_ranges=result.int_ranges,
                          tolerance=_tolerance(args), seed=args.seed, progress=progress)
    status = _print_report(report, args)
    if status != EXIT_OK:
        print(f"\n{result.path} was written but does not match PyTorch", file=sys.stderr)
    return status


def cmd_validate(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api, backends

    for name in args.backend or []:
        backends.get(name)
    batches = _numbers(args.batches, "--batches", example="1,7,32")
    _check_tolerance_args(args)
    shape = _shape(args.input_shape) if args.input_shape else None
    specs = _input_specs(args)
    ranges = _int_ranges(args)
    _check_outputs(None, args.report)
    progress.say(f"loading {args.against}")
    loaded = api.load(args.against, arch=args.arch, trust_pickle=args.trust_pickle, state_key=args.state_key)
    if args.engine is not None:
        if not Path(args.engine).is_file():
            raise YatDeployError(f"--engine {args.engine}: no such file")
        engine_backends = [b.name for b in backends.builders()]  # the backends that run an engine
        if args.backend and not set(engine_backends) & set(args.backend):
            raise YatDeployError(f"--engine is for the {' or '.join(engine_backends)} backend: "
                                 f"add --backend {engine_backends[0]}")
    report = api.validate(
        args.onnx_model, loaded, input_shape=shape, inputs=specs, int_ranges=ranges, input_files=args.inputs,
        batches=batches,
        tolerance=_tolerance(args), backends=args.backend, seed=args.seed, engine=args.engine,
        progress=progress,
    )
    return _print_report(report, args)


def cmd_build_engine(args: argparse.Namespace, progress) -> int:
    # yatdeploy.build, which yatdeploy.api offers as build_engine: the API module imports torch, which a build
    # does not need.
    from yatdeploy.build import build_engine

    built = build_engine(
        args.onnx_model, args.output, backend=args.backend, min_batch=args.min_batch, opt_batch=args.opt_batch,
        max_batch=args.max_batch, timing_cache=args.timing_cache, workspace_mb=args.workspace_mb,
        compute_capabilities=args.compute_capability or (), yat_plugin=args.yat_plugin, verbose=args.verbose,
        repository=args.repository, name=args.name, progress=progress,
    )
    engine = built.engine
    for note in engine.notes:
        print(f"note: {note}")
    print(f"wrote {engine.path} ({engine.path.stat().st_size / 1e6:.1f} MB) in {engine.seconds:.1f} s: "
          f"{engine.summary}")
    if built.repository_entry is not None:
        print(f"wrote model repository entry {built.repository_entry}")
    print(f"next: yatdeploy validate {args.onnx_model} --against MODEL.pt --backend {engine.backend} "
          f"--engine {engine.path}")
    return EXIT_OK


def _check_outputs(output: Path | None, report: str | None, repository: str | None = None) -> None:
    """Refuse, before any work, an output path that can't be written: a folder for a file, a path under a file."""
    from yatdeploy import files

    for path in (output, report):
        if path is not None:
            files.check_output(path)
    if repository is not None:
        files.check_output_folder(repository)


def cmd_demo(args: argparse.Namespace, progress) -> int:
    from yatdeploy.demo import run_demo
    from yatdeploy.validation import format_report

    if args.epochs <= 0:
        raise YatDeployError(f"--epochs {args.epochs}: must be positive")
    if args.lm:
        return _demo_lm(args, progress)
    started = time.perf_counter()
    result = run_demo(args.out, epochs=args.epochs, seed=args.seed, tensorrt=args.tensorrt, progress=progress)
    print(format_report(result.report))
    print()
    print(f"test accuracy on {result.test_size} held-out digits:")
    print(f"  PyTorch              {result.torch_accuracy:.2%}")
    print(f"  ONNX Runtime         {result.onnx_accuracy:.2%}   (backend {result.backend})")
    if result.tensorrt_accuracy is not None:
        print(f"  TensorRT             {result.tensorrt_accuracy:.2%}   (engine {result.engine_path})")
    print(f"  same prediction on   {result.predictions_agree}/{result.test_size} images")
    plan = f", {result.engine_path.name}" if result.engine_path else ""
    print(f"\nfiles in {args.out}/: model.pt, model.onnx{plan}, digits_test.npz, validation.json, repository/ "
          f"({time.perf_counter() - started:.1f} s)")
    print(f"next: yatdeploy validate {result.onnx_path} --against {result.model_path} --inputs {result.test_inputs_path}")
    agree = result.report.passed and result.predictions_agree == result.test_size
    return EXIT_OK if agree else EXIT_VALIDATION_FAILED


def _demo_lm(args: argparse.Namespace, progress) -> int:
    from yatdeploy.demo_lm import run_lm_demo
    from yatdeploy.validation import format_report

    if args.steps <= 0:
        raise YatDeployError(f"--steps {args.steps}: must be positive")
    if args.tensorrt:
        raise YatDeployError("--tensorrt is for the digits demo, not --lm")
    out = args.out if args.out != "yatdeploy-demo" else "yatdeploy-demo-lm"
    result = run_lm_demo(out, steps=args.steps, seed=args.seed, progress=progress)
    print(format_report(result.report))
    same = result.torch_text == result.onnx_text
    print(f"\ngreedy continuation of {result.prompt!r}:")
    print(f"  PyTorch                 {result.torch_text!r}")
    print(f"  ONNX Runtime ({result.backend:<8}) {result.onnx_text!r}")
    print(f"  {'identical' if same else 'DIFFERENT'}")
    print(f"\ntrained to loss {result.final_loss:.3f} in {result.train_seconds:.1f} s; export {result.export_seconds:.1f} s, "
          f"validation {result.validate_seconds:.1f} s")
    print(f"files in {out}/: lm.pt, lm.onnx, validation.json, repository/lm/")
    return EXIT_OK if result.report.passed and same else EXIT_VALIDATION_FAILED


def cmd_serve(args: argparse.Namespace, progress) -> int:
    from yatdeploy.serving.app import HttpSettings
    from yatdeploy.serving.core import ServerSettings
    from yatdeploy.serving.server import serve

    for flag in ("max_batch_size", "max_queue_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise YatDeployError(f"--{flag.replace('_', '-')} {value}: must be at least 1")
    if args.max_queue_delay_us is not None and args.max_queue_delay_us < 0:
        raise YatDeployError(f"--max-queue-delay-us {args.max_queue_delay_us}: must be >= 0")
    if not 0 < args.port < 65536:
        raise YatDeployError(f"--port {args.port}: not a port number")
    if not 1 / (1 << 20) <= args.max_body_mb <= 1 << 16:  # NaN fails too
        raise YatDeployError(f"--max-body-mb {args.max_body_mb}: must be more than 0 and at most 65536 (64 GB)")
    if not 1 / (1 << 20) <= args.max_inflight_body_mb <= 1 << 20:  # NaN fails too
        raise YatDeployError(f"--max-inflight-body-mb {args.max_inflight_body_mb}: must be more than 0 and at most "
                             "1048576 (1 TB)")
    if not 0 <= args.grpc_port < 65536 or args.grpc_port == args.port:
        raise YatDeployError(f"--grpc-port {args.grpc_port}: not a port number other than --port's (0: no gRPC)")
    settings = ServerSettings(
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size, dynamic_batching=not args.no_batching,
        control_mode=args.model_control_mode, strict_readiness=_boolean("--strict-readiness", args.strict_readiness),
    )
    exit_on_error = _boolean("--exit-on-error", args.exit_on_error)
    http_settings = HttpSettings(max_body_bytes=int(args.max_body_mb * (1 << 20)), cors_origins=tuple(args.cors_origin),
                                 max_inflight_body_bytes=int(args.max_inflight_body_mb * (1 << 20)))
    cores = len(os.sched_getaffinity(0))
    threads = args.threads if args.threads is not None else max(1, cores - 1)
    if not 1 <= threads <= 4 * cores:
        raise YatDeployError(f"--threads {threads}: must be between 1 and {4 * cores} (4 x the {cores} cores usable)")
    serve(args.path, host=args.host, port=args.port, grpc_port=args.grpc_port, backend=args.backend,
          settings=settings, http_settings=http_settings, load=args.load_model, intra_op_threads=threads,
          log_level=args.log_level, progress=progress, exit_on_error=exit_on_error)
    return EXIT_OK


def _boolean(flag: str, text: str) -> bool:
    """A boolean flag's value as Triton's command line spells it: true/false, on/off, 1/0."""
    value = text.strip().lower()
    if value not in ("true", "on", "1", "false", "off", "0"):
        raise YatDeployError(f"{flag} {text}: must be true or false")
    return value in ("true", "on", "1")


def _numbers(text: str, flag: str, kind=int, **options) -> list:
    """yatdeploy.parsing.positive_numbers on an option's text; its error gets the option's name."""
    from yatdeploy.errors import InputSpecError
    from yatdeploy.parsing import positive_numbers

    try:
        return positive_numbers(text, kind, **options)
    except InputSpecError as exc:
        raise InputSpecError(f"{flag} {exc}") from None


def _shape(text: str) -> tuple[int, ...]:
    return tuple(_numbers(text, "--input-shape", example="1,784", separators=",x"))


def _input_specs(args: argparse.Namespace):
    from yatdeploy.inputs import check_specs, parse_input

    return check_specs([parse_input(text) for text in args.inputs_spec]) if args.inputs_spec else None


def _int_ranges(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    from yatdeploy.inputs import parse_int_ranges

    return parse_int_ranges(args.int_range)


def cmd_bench(args: argparse.Namespace, progress) -> int:
    from yatdeploy.loadgen import format_steps, run_bench, write_outputs

    concurrencies = _numbers(args.concurrency, "--concurrency", allow_empty=True)
    rates = _numbers(args.rate, "--rate", float, allow_empty=True)
    if not concurrencies and not rates:
        raise YatDeployError("nothing to run: give --concurrency and/or --rate")
    if args.duration <= 0 or args.warmup < 0 or args.batch < 1:
        raise YatDeployError("--duration must be > 0, --warmup >= 0 and --batch >= 1")
    onnx = Path(args.onnx) if args.onnx else None
    if onnx is not None and not onnx.is_file():
        raise YatDeployError(f"--onnx {onnx}: no such file")
    if args.json_payload and args.url.startswith("grpc://"):
        raise YatDeployError("--json-payload is for HTTP endpoints: gRPC sends raw tensors")
    result = run_bench(args.url, args.model, concurrencies=concurrencies, rates=rates, seconds=args.duration,
                       warmup=args.warmup, batch=args.batch, binary=not args.json_payload,
                       max_inflight=args.max_inflight, onnx=onnx, progress=progress)
    print(format_steps(result.steps))
    if result.in_process_p50_us is not None:
        print(f"\nin-process ONNX Runtime p50 {result.in_process_p50_us / 1e3:.3f} ms; server overhead at the lowest "
              f"concurrency {result.server_overhead_p50_us / 1e3:.3f} ms")
    paths = write_outputs(result, Path(args.out))
    print(f"\nwritten: {', '.join(str(p) for p in paths)}")
    errors = sum(s.errors for s in result.steps)
    if errors:
        first = next(s.first_error for s in result.steps if s.first_error)
        print(f"{errors} request(s) failed; first: {first}", file=sys.stderr)
    return EXIT_OK if errors == 0 else EXIT_REQUESTS_FAILED


def cmd_doctor(args: argparse.Namespace, progress) -> int:
    import json

    from yatdeploy.doctor import collect, format_text

    report = collect()
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return EXIT_OK


# The commands that run PyTorch. torch sets its loggers' levels when it is imported, so for these it is
# imported before they are quietened; the other commands stay free of its import time.
_TORCH_COMMANDS = ("export", "validate", "demo")


def _quiet_libraries(debug: bool, command: str) -> None:
    if debug:
        return
    warnings.filterwarnings("ignore")
    if command in _TORCH_COMMANDS:
        import torch  # noqa: F401
    for name in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


# Library options a command spells differently from its own flag's dest.
_FLAG_ALIASES = {("input_files", None): "--inputs", ("dynamic_batch", False): "--static-batch",
                 ("compute_capabilities", None): "--compute-capability", ("inputs", None): "--input",
                 ("int_ranges", None): "--int-range"}


def _flag_spelling(parser: argparse.ArgumentParser, command: str):
    """errors.Spelling for `command`: the library's options named as this command's flags."""
    from yatdeploy.errors import python_spelling

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest: action.option_strings[-1]
             for action in commands.choices[command]._actions if action.option_strings}

    def spell(name: str, value: bool | None) -> str:
        if (name, value) in _FLAG_ALIASES:
            return _FLAG_ALIASES[name, value]
        if name in flags and value in (None, True):
            return flags[name]
        return python_spelling(name, value)

    return spell


def main(argv: Sequence[str] | None = None) -> int:
    from yatdeploy import errors

    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.debug, args.command)
    from yatdeploy.progress import Progress

    progress = Progress(enabled=not args.quiet)
    handlers = {"export": cmd_export, "validate": cmd_validate, "build-engine": cmd_build_engine, "demo": cmd_demo,
                "serve": cmd_serve, "bench": cmd_bench, "doctor": cmd_doctor}
    with errors.spelled(_flag_spelling(parser, args.command)):
        return _run(handlers[args.command], args, progress)


def _run(handler, args: argparse.Namespace, progress) -> int:
    import signal
    import threading

    from yatdeploy import progress as steps

    steps.clear_interrupt()
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers are the main thread's
    previous = signal.signal(signal.SIGINT, steps.on_interrupt) if main_thread else None
    try:
        return handler(args, progress)
    except YatDeployError as exc:
        if args.debug:
            traceback.print_exc()
        cause = exc.__cause__
        more = "" if args.debug or cause is None or isinstance(cause, YatDeployError) else \
            " (--debug shows the underlying error in full)"
        _say(f"yatdeploy {args.command}: error: {exc}{more}")
        return EXIT_USAGE
    except ConsistencyError as exc:
        if args.debug:
            traceback.print_exc()
        _say(f"yatdeploy {args.command}: internal error: a consistency check failed: {exc} "
             "(run with --debug for the traceback, and please report it)")
        return EXIT_INTERNAL
    except KeyboardInterrupt:  # every output is written whole or not at all (yatdeploy.files): none is left half
        _say(f"yatdeploy {args.command}: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`yatdeploy doctor | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        from yatdeploy.files import WRITE_ENVIRONMENT, output_error

        if exc.errno not in WRITE_ENVIRONMENT:
            return _internal_error(exc, args)
        # A write the command makes outside yatdeploy.files (a cache, a library's file): still the machine's
        # problem, for the user to change.
        if args.debug:
            traceback.print_exc()
        _say(f"yatdeploy {args.command}: error: {output_error(exc.filename or 'a file', exc)}")
        return EXIT_USAGE
    except Exception as exc:  # a bug of ours: say so, keep the traceback behind --debug
        return _internal_error(exc, args)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _internal_error(exc: Exception, args: argparse.Namespace) -> int:
    if args.debug:
        traceback.print_exc()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    _say(f"yatdeploy {args.command}: internal error: {type(exc).__name__}: {first} "
         "(run with --debug for the traceback, and please report it)")
    return EXIT_INTERNAL


def _say(line: str) -> None:
    """An error line on stderr: one line, without the escape codes a library's message may carry."""
    from yatdeploy.errors import plain

    print(" ".join(plain(line).split("\n")), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
