"""Errors a user can act on. The CLI prints them as one line and exits with status 2.

A message names the caller's options through `option()`, never as a command-line flag: the library is
called from Python as well as from the CLI, and each words the option its own way. Messages are spelled
when they are shown (`str(error)`, `render(text)`): as Python keywords (trust_pickle=True, `arch`) by
default, as the CLI's flags (`--trust-pickle`, `--arch`) inside the CLI's `spelled(...)` block.

A message may quote a third-party exception (torch's exporter colours parts of its own): `plain()` takes the
terminal escape codes out, and every message is shown through it (`render`, the CLI's error lines).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_MARK = "\x00"
_OPTION = re.compile(f"{_MARK}([a-z_]+)(?:=(True|False))?{_MARK}")
# Terminal escape sequences: CSI (colours, \x1b[96m ... \x1b[0m), OSC (hyperlinks, titles), and any other ESC pair.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]?")


def plain(text: str) -> str:
    """`text` without terminal escape codes (colours, hyperlinks)."""
    return _ESCAPES.sub("", text)


def first_line(exc: BaseException) -> str:
    """A third-party exception's message as one line for ours: its first line without escape codes, or its type's
    name when it says nothing."""
    text = plain(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def option(name: str, value: bool | None = None) -> str:
    """A placeholder for the caller's option `name` (a keyword of the library function) in a message.

    `value`: for a boolean option, the setting meant ("pass trust_pickle=True" / "pass --trust-pickle";
    "dynamic_batch=False" / "--static-batch"); None for an option that takes a value ("arch" / "--arch").
    """
    return f"{_MARK}{name}{'' if value is None else f'={value}'}{_MARK}"


def python_spelling(name: str, value: bool | None) -> str:
    return f"`{name}`" if value is None else f"{name}={value}"


Spelling = Callable[[str, bool | None], str]
_spelling: Spelling = python_spelling


@contextmanager
def spelled(spelling: Spelling) -> Iterator[None]:
    """Within the block, messages name options with `spelling` (the CLI: its flags)."""
    global _spelling
    previous, _spelling = _spelling, spelling
    try:
        yield
    finally:
        _spelling = previous


def render(text: str) -> str:
    """`text` with every option() placeholder spelled as this process names options, without escape codes."""
    named = _OPTION.sub(lambda m: _spelling(m.group(1), None if m.group(2) is None else m.group(2) == "True"), text)
    return plain(named)


class YatDeployError(Exception):
    """A problem with the user's input or environment, with what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return render(self.message if not self.hint else f"{self.message} ({self.hint})")

    @property
    def text(self) -> str:
        """The message without the hint, spelled for showing (`message` keeps the option placeholders)."""
        return render(self.message)


class ModelLoadError(YatDeployError):
    pass


class UnsupportedLayerError(YatDeployError):
    def __init__(self, layer_path: str, option: str, why: str) -> None:
        where = layer_path or "<root>"
        super().__init__(f"layer '{where}': option {option} can't be exported: {why}")
        self.layer_path = layer_path
        self.option = option


class InputSpecError(YatDeployError):
    pass


class OnnxModelError(YatDeployError):
    pass


class ConsistencyError(Exception):
    """One of yatdeploy's own checks on its own output failed: a bug of ours, not a problem with the input.

    Not a YatDeployError on purpose: the CLI reports it as an internal error (exit 3), asking for a report.
    """


def cannot_run(shapes: list[str], exc: Exception, what: str) -> InputSpecError:
    """A reference model (PyTorch's, JAX's) failing on its inputs (their shapes and dtypes as text), telling the user
    to check `what`."""
    plural = "inputs" if len(shapes) > 1 else "an input"
    return InputSpecError(f"the model can't run on {plural} of shape {', '.join(shapes)}: {first_line(exc)}",
                          f"check {what}")
