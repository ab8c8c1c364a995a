"""Classification labels, read when a model loads: each output's config.pbtxt `label_filename`, as Triton reads it.

The file's path is relative to the model's folder (<repo>/<model>/, beside config.pbtxt), as Triton's; it is one
label per line (split on '\\n', as C++'s getline: a last line without '\\n' counts, no empty line is added after a
final '\\n'), label i naming class index i of the output. The classification extension (core.classify) answers
"value:index:label" for an index with a non-empty label and "value:index" for one beyond the file or with an empty
line, as Triton does.

A label file is read once, at load; one that is missing, unreadable, not UTF-8, larger than MAX_LABEL_FILE_BYTES
(a million classes of 60-byte names fit), or a path that leads out of the model's folder (absolute, '..', or a symbolic link out) fails the load with a message naming the model, the output
and the label_filename as written, never a path of the server.
"""

from __future__ import annotations

import os

from yatdeploy.errors import YatDeployError
from yatdeploy.packaging import CONFIG
from yatdeploy.serving.repository import ConfigTensor, ModelSource

MAX_LABEL_FILE_BYTES = 64 << 20  # held in memory for the model's life: a larger file is refused at load


def read_labels(source: ModelSource) -> dict[str, tuple[str, ...]]:
    """The labels of each output of `source` whose config gives a label_filename, by output name; a YatDeployError
    when one can't be read."""
    if source.config is None:
        return {}
    return {output.name: _read(source, output) for output in source.outputs if output.label_filename}


def _read(source: ModelSource, output: ConfigTensor) -> tuple[str, ...]:
    name = output.label_filename

    def failed(problem: str) -> YatDeployError:
        return YatDeployError(f"model '{source.name}': {CONFIG} output '{output.name}' label_filename {name!r}: "
                              f"{problem}")

    if os.path.isabs(name) or "\x00" in name or ".." in name.replace("\\", "/").split("/"):
        raise failed("must be a path in the model's folder (no '..', not absolute)")
    folder = source.config.parent
    path = folder / name
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise failed("leads out of the model's folder: refused")
    if not path.is_file():
        raise failed("no such file in the model's folder")
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_LABEL_FILE_BYTES + 1)
        if len(data) > MAX_LABEL_FILE_BYTES:
            raise failed(f"larger than {MAX_LABEL_FILE_BYTES >> 20} MiB: refused (one label a line)")
        text = data.decode("utf-8")
    except OSError as exc:
        raise failed(f"can't be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise failed("not UTF-8 text (one label a line)") from None
    lines = text.split("\n")
    return tuple(lines[:-1] if lines[-1] == "" else lines)
