"""The one parser of the comma-separated positive numbers that shapes, batch sizes and rates are written as.

Its errors say what is wrong with the text, not where it came from: the CLI adds the option's name.
"""

from __future__ import annotations

import re

from yatdeploy.errors import InputSpecError


def positive_numbers(
    text: str, kind: type = int, *, allow_empty: bool = False, example: str = "", separators: str = ","
) -> list:
    """"1,7,32" -> [1, 7, 32]; `kind` int or float; empty items are skipped; "" is an error unless allow_empty."""
    noun = "integers" if kind is int else "numbers"
    try:
        values = [kind(v) for v in re.split(f"[{re.escape(separators)}]", text) if v.strip()]
    except ValueError:
        values = None
    if values is None or (not values and not allow_empty) or any(not v > 0 for v in values):
        hint = f", e.g. {example}" if example else ""
        raise InputSpecError(f"{text!r}: expected comma-separated positive {noun}{hint}")
    return values
