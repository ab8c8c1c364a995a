"""The `yatdeploy` command line: the top parser, dispatch to the commands (yatdeploy.commands, one module each,
over yatdeploy.api), library errors spelled as flags, and the exit-code map."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from types import ModuleType

from yatdeploy import __version__
from yatdeploy.commands import COMMANDS, by_name
from yatdeploy.commands.common import (  # the exit statuses, which the commands return too
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REQUESTS_FAILED,
    EXIT_USAGE,
    EXIT_VALIDATION_FAILED,
)
from yatdeploy.errors import ConsistencyError, YatDeployError

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_REQUESTS_FAILED", "EXIT_USAGE",
           "EXIT_VALIDATION_FAILED", "build_parser", "main"]

_DESCRIPTION = """\
Deploy Yat (nmn) models, PyTorch or Flax NNX, through ONNX. Every Yat product (YatNMN layers, the tied LM
head, a decoder's attention scores) becomes one yat.YatGemm node, and the model carries YatGemm as an ONNX
function, so a plain onnxruntime runs it. Language models export with their KV cache (export --kv-cache) and
are served with generation (serve: OpenAI-compatible API, streaming).

exit status: 0 success, 1 validation failed, 2 bad input or an output that can't be written (message on
stderr), 3 internal error, 4 bench: some requests failed, 130 interrupted (Ctrl-C; no partial file is left)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yatdeploy", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"yatdeploy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers, common)
    return parser


def _quiet_libraries(debug: bool, command: ModuleType) -> None:
    if debug:
        return
    warnings.filterwarnings("ignore")
    # torch sets its loggers' levels when it is imported, so for a command that runs PyTorch it is imported before
    # they are quietened; the other commands stay free of its import time.
    if getattr(command, "TORCH", False):
        import torch  # noqa: F401
    for name in ("torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def _flag_spelling(parser: argparse.ArgumentParser, command: ModuleType):
    """errors.Spelling for `command`: the library's options named as this command's flags (a keyword of the API
    as the flag of its name, or as the command's ALIASES say)."""
    from yatdeploy.errors import python_spelling

    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = {action.dest: action.option_strings[-1]
             for action in subparsers.choices[command.NAME]._actions if action.option_strings}
    aliases = getattr(command, "ALIASES", {})

    def spell(name: str, value: bool | None) -> str:
        if (name, value) in aliases:
            return aliases[name, value]
        if name in flags and value in (None, True):
            return flags[name]
        return python_spelling(name, value)

    return spell


def main(argv: Sequence[str] | None = None) -> int:
    from yatdeploy import errors

    parser = build_parser()
    args = parser.parse_args(argv)
    command = by_name(args.command)
    _quiet_libraries(args.debug, command)
    from yatdeploy.progress import Progress

    progress = Progress(enabled=not args.quiet)
    with errors.spelled(_flag_spelling(parser, command)):
        return _run(command.run, args, progress)


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
