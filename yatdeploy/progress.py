"""Progress lines on stderr: one line per stage with its duration.

A step's start and end are also where an interrupt is honoured that a library swallowed: the CLI's SIGINT handler
(`on_interrupt`) records the Ctrl-C before raising KeyboardInterrupt, and a step entered or left after it raises
KeyboardInterrupt again, so work a library went on with after the user's Ctrl-C (torch's exporter falls back to
another strategy when one fails) stops at the next step instead of running to the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_interrupted = False


def on_interrupt(signum: int, frame: object) -> None:
    """A SIGINT handler: the Ctrl-C is recorded, then raised as usual (KeyboardInterrupt)."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def clear_interrupt() -> None:
    global _interrupted
    _interrupted = False


def _honour_interrupt() -> None:
    if _interrupted:
        raise KeyboardInterrupt


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        _honour_interrupt()
        started = time.perf_counter()
        if self.enabled:
            print(f"  {what} ...", end="", file=self.stream, flush=True)
        try:
            yield
        except BaseException as exc:
            if self.enabled:
                print(" interrupted" if isinstance(exc, KeyboardInterrupt) else " failed", file=self.stream, flush=True)
            raise
        if self.enabled:
            print(f" {time.perf_counter() - started:.2f} s", file=self.stream, flush=True)
        _honour_interrupt()


QUIET = Progress(enabled=False)
