"""The command line's commands, one module each, in the order `yatdeploy --help` lists them (COMMANDS).

A command module has NAME (the command's word), `add_parser(subparsers, common)` (its flags and help; `common`
is the parent parser of --debug and --quiet) and `run(args, progress) -> int` (the exit status), which turns the
flags into one call of yatdeploy.api and prints what it returns; optionally ALIASES (the API's keywords it spells
as other flags than their own, for error messages) and TORCH (True: it runs PyTorch). Adding a command is a
module here and its line in COMMANDS; yatdeploy.cli dispatches to it.
"""

from __future__ import annotations

from types import ModuleType

from yatdeploy.commands import bench, build_engine, demo, doctor, export, fuse, serve, validate

COMMANDS: tuple[ModuleType, ...] = (export, fuse, validate, build_engine, demo, serve, bench, doctor)


def by_name(name: str) -> ModuleType:
    return next(command for command in COMMANDS if command.NAME == name)
