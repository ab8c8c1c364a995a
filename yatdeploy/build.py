"""Stage build: an engine from an ONNX export, built by a backend that builds engines (`yatdeploy build-engine`),
and its model repository entry (packaging).

The backend is any of backends.builders() (default: backends.default_builder()); each reads the build options that
concern it and refuses the others, naming itself. What can be checked before the build is: the output paths, the
repository entry's name and whether the backend's engines may go in a repository; the builder then checks the
model and the profile before it looks for its runtime. Imports neither torch nor the runtimes (nor does
yatdeploy.api, which offers it as `build_engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from yatdeploy import backends, files, packaging
from yatdeploy.errors import YatDeployError, option
from yatdeploy.progress import QUIET, Progress

_MIN, _OPT, _MAX = backends.DEFAULT_BATCH_PROFILE


@dataclass(frozen=True)
class EngineBuild:
    engine: backends.EngineInfo
    repository_entry: Path | None = None  # the model folder written, with `repository`


def build_engine(
    onnx_path: str | Path,
    output: str | Path | None = None,
    *,
    backend: str | None = None,
    min_batch: int = _MIN,
    opt_batch: int = _OPT,
    max_batch: int = _MAX,
    timing_cache: str | Path | None = None,
    workspace_mb: int | None = None,
    compute_capabilities: Sequence[str] = (),
    yat_plugin: bool = False,
    verbose: bool = False,
    repository: str | Path | None = None,
    name: str | None = None,
    progress: Progress = QUIET,
) -> EngineBuild:
    """Build an engine from the ONNX model at `onnx_path` on `backend` (a name of backends.builders(); default the
    first) into `output` (default: the model's path with the engine's suffix), for batches `min_batch` to
    `max_batch`, tuned for `opt_batch`; with `repository`, also write its entry `<repository>/<name>/1/` (`name`
    default: the engine's stem). The other options concern some backends (build-engine --help says which); one a
    backend does not take is refused."""
    chosen = backends.get(backend) if backend is not None else backends.default_builder()
    builder = chosen.builder
    if builder is None:
        raise YatDeployError(f"the {chosen.name} backend builds no engines (those that do: "
                             f"{', '.join(b.name for b in backends.builders())})")
    source = Path(onnx_path)
    output = Path(output) if output is not None else source.with_suffix(builder.suffix)
    if output.resolve() == source.resolve():
        raise YatDeployError(f"{option('output')} {output} would overwrite the ONNX model")
    files.check_output(output)
    if repository is not None:
        files.check_output_folder(repository)
        if builder.repository_refusal:
            raise YatDeployError(f"{builder.repository_refusal}; serve it as a file: yatdeploy serve {output}")
        packaging.check_model_name(name or output.stem)
    options = backends.BuildOptions(
        batch_profile=(min_batch, opt_batch, max_batch), workspace_mb=workspace_mb, yat_plugin=yat_plugin,
        timing_cache=None if timing_cache is None else Path(timing_cache),
        compute_capabilities=tuple(compute_capabilities), verbose=verbose, progress=progress)
    engine = builder.build(source, output, options)
    entry = None
    if repository is not None:
        entry = packaging.write_engine_repository(repository, name or output.stem, engine.path)
    return EngineBuild(engine, entry)
