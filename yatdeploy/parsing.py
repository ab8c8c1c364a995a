"""The one parser of the comma-separated positive numbers that shapes, batch sizes and rates are written as.

Its errors say what is wrong with the text, not where it came from: `option_numbers` adds the option's name.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

from yatdeploy.errors import InputSpecError, option


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


def option_numbers(name: str, given: str | Sequence, kind: type = int, **options) -> list:
    """The numbers the option `name` gives, as its text (positive_numbers; the error names the option) or as
    values, which must be positive too."""
    if isinstance(given, str):
        try:
            return positive_numbers(given, kind, **options)
        except InputSpecError as exc:
            raise InputSpecError(f"{option(name)} {exc}") from None
    values = list(given)
    wanted = numbers.Integral if kind is int else numbers.Real
    if any(not isinstance(v, wanted) or isinstance(v, bool) or not v > 0 for v in values) or \
            (not values and not options.get("allow_empty")):
        raise InputSpecError(f"{option(name)} {values}: expected positive {'integers' if kind is int else 'numbers'}")
    return values
