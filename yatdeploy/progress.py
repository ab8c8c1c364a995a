"""Progress lines on stderr: one line per stage with its duration."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
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


QUIET = Progress(enabled=False)
