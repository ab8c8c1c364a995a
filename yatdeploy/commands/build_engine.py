"""`yatdeploy build-engine`: an engine from an ONNX export on a backend that builds (yatdeploy.api.build_engine)."""

from __future__ import annotations

import argparse

from yatdeploy.commands.common import EXIT_OK

NAME = "build-engine"
ALIASES = {("compute_capabilities", None): "--compute-capability"}


def add_parser(subparsers, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from yatdeploy import backends

    builders = backends.builders()
    default_builder = backends.default_builder().name
    min_batch, opt_batch, max_batch = backends.DEFAULT_BATCH_PROFILE

    def taken_by(field: str) -> str:
        """The builders that read a build option, each with its default."""
        return "; ".join(f"{b.name}, default: {b.builder.options[field]}" for b in builders
                         if field in b.builder.options)

    engine = subparsers.add_parser(
        NAME, parents=[common], help="build an engine (TensorRT, TensorRT for RTX) on a backend that builds",
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
    return engine


def run(args: argparse.Namespace, progress) -> int:
    from yatdeploy import api

    built = api.build_engine(
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
