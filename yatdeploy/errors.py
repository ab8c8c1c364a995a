"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class YatDeployError(Exception):
    """A problem with the user's input or environment, with what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


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
