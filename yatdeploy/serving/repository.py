"""Model repositories, read: a single model file, or a Triton-style folder (as yatdeploy.packaging writes one).

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<version>/model.onnx        (platform onnxruntime_onnx), or
    <repo>/<model>/<version>/model<suffix>     an engine, for the backend that built it (backends.for_file: a
                                               TensorRT model.plan, with model.plan.json beside it, platform
                                               tensorrt_plan)

The config is Triton's ModelConfig in protobuf text format, so the same folder can be handed to Triton
Inference Server; yatdeploy reads the fields it shares with Triton, with Triton's meaning:

- `max_batch_size: 0`: the first dimension is not a batch dimension; the config's dims include it and
  requests are never merged. `max_batch_size > 0`: the model's first dimension must be a batch
  dimension (graph.has_batch_dim), the dims leave it out and a request may carry up to that many rows.
- `dynamic_batching { max_queue_delay_microseconds, priority_levels, default_priority_level,
  default_queue_policy { timeout_action, default_timeout_microseconds, allow_timeout_override, max_queue_size },
  priority_queue_policy }`: requests are merged along the batch dimension; without the block each request runs
  on its own. The queue policies' meaning: serving.queue_policy.
- `response_cache { enable: true }`: the model's answers are kept in the server's response cache, when it has one
  (`serve --cache-config`; serving.response_cache).
- `model_warmup [{ name, batch_size, inputs { key, value { data_type, dims, zero_data | random_data |
  input_data_file } }, count }]`: samples run when the model loads, before it is ready (serving.warmup);
  `input_data_file` is a path in the version folder's `warmup/` folder, never out of it.
- `backend`/`platform` (those of a backend that runs the model file as it is: backends.triton_names),
  `input`/`output` (names, data_type, dims) must match the model file; an input's `format` (FORMAT_NCHW or
  FORMAT_NHWC: 3 dims, as Triton's) and an output's `label_filename` (read at load: serving.labels) are kept and
  shown in the served config.

A config that breaks any of these makes its model unavailable (ModelSource.error), not the repository.

Nothing outside the repository is served, read or described: `default_model_filename` (in config.pbtxt or a load
request's config) is a plain file name in the version folder, and a model file, version folder or config.pbtxt that
is a symbolic link out of the repository is refused with one message whatever the link points to. Messages name a
model's files by their path in the repository (ModelSource.shown), never by the server's absolute path. A folder
whose name is not valid UTF-8 is no model (a model name is text in URLs, JSON and metrics): skipped_folders names
it for a warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from yatdeploy import backends as registry
from yatdeploy import graph
from yatdeploy.errors import YatDeployError
from yatdeploy.graph import TensorSignature
from yatdeploy.inputs import InputLimits
from yatdeploy.packaging import (
    BACKEND_PARAMETER,
    CONFIG,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_SIZE,
    LIMIT_KINDS,
    LIMIT_PREFIX,
    TRITON_TYPES,
    model_config_pb2,
    model_files,
)
from yatdeploy.serving.queue_policy import MAX_PRIORITY_LEVELS, TIMEOUT_ACTIONS, QueuePolicies, QueuePolicy

# The longest max_queue_delay_microseconds a config.pbtxt may ask for: a batching delay is a few
# milliseconds at most in practice; an hour (or 2**64-1 µs) is a mistake or an attack on the queue.
MAX_QUEUE_DELAY_US = 10_000_000
# Triton's --model-control-mode values yatdeploy has: every model at start-up and no changes (none), or only
# what --load-model names, then what clients load and unload (explicit).
CONTROL_MODES = ("none", "explicit")


@dataclass(frozen=True)
class ConfigTensor:
    """An input or output as config.pbtxt declares it."""

    name: str
    datatype: str  # the protocol's name (FP32, ...) of the config's data_type
    dims: tuple[int, ...]  # as written: without the batch dimension when max_batch_size > 0
    format: str = "FORMAT_NONE"  # an input's data format (ModelInput.Format's name: FORMAT_NCHW, ...)
    label_filename: str = ""  # an output's label file, relative to the model's folder (serving.labels reads it)


# The most runs one warmup sample may ask for (its count): more is a mistake that would hold the load for ever.
MAX_WARMUP_COUNT = 100_000
WARMUP_FOLDER = "warmup"  # in a version folder: the warmup samples' input_data_file files, as Triton's


@dataclass(frozen=True)
class WarmupInput:
    """One input of a warmup sample: its datatype (FP32, ...), its dims (without the batch dimension when the model
    batches) and its data: "zero", "random", or a file's path in the version's warmup/ folder."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    data: str  # "zero_data", "random_data" or "input_data_file"
    file: str = ""  # input_data_file's path, relative to the warmup/ folder


@dataclass(frozen=True)
class WarmupSample:
    """A config.pbtxt model_warmup entry: run `count` times (at least once) at load, with `batch_size` rows."""

    name: str
    batch_size: int
    inputs: tuple[WarmupInput, ...]
    count: int


@dataclass
class ModelSource:
    name: str
    version: str
    path: Path
    # Without a config.pbtxt: up to this many rows when the model has a batch dimension, else 0.
    # With one: the config's value, 0 meaning that the first dimension is not a batch dimension.
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # Whether requests are merged into batches (config.pbtxt: a dynamic_batching block).
    dynamic_batching: bool = True
    max_queue_delay_us: int = 0
    queue_policy: QueuePolicies = field(default_factory=QueuePolicies)  # the priority levels and their queues
    # yatdeploy's backend for this model (config.pbtxt parameter BACKEND_PARAMETER); None: the server's.
    backend: str | None = None
    config: Path | None = None  # the config.pbtxt read, if any
    inputs: tuple[ConfigTensor, ...] = ()  # as the config lists them (none listed: not checked)
    outputs: tuple[ConfigTensor, ...] = ()
    error: str | None = None  # why the model cannot be served (a bad config), None if it can be tried
    # The config's limit parameters, by input: values None / max_dims () where it gives none; max_dims as the
    # config's dims (without the batch dimension when max_batch_size > 0).
    input_limits: dict[str, InputLimits] = field(default_factory=dict)
    # The model file as messages name it: its path in the repository (mlp/1/model.onnx), or a lone file's name.
    shown: str = ""
    repository: Path | None = None  # the repository folder it is in (None: a lone file)
    response_cache: bool = False  # config.pbtxt response_cache { enable: true }
    warmup: tuple[WarmupSample, ...] = ()  # config.pbtxt model_warmup

    def __post_init__(self) -> None:
        self.shown = self.shown or self.path.name

    def public(self, text: str) -> str:
        """`text` (a loader's message) with the server's paths of this model's file and repository said as paths in
        the repository: what a client may read."""
        file = {str(self.path), str(self.path.absolute()), os.path.realpath(self.path)}
        roots = set() if self.repository is None else \
            {str(self.repository), str(self.repository.absolute()), os.path.realpath(self.repository)}
        for absolute in sorted(file, key=len, reverse=True):
            text = text.replace(absolute, self.shown)
        for root in sorted(roots, key=len, reverse=True):
            text = text.replace(root.rstrip(os.sep) + os.sep, "")
        return text


def parse_config(path: Path, shown: str | None = None):
    """The ModelConfig in the file at `path`, or a YatDeployError naming the file as `shown` (default: `path`)."""
    from google.protobuf import text_format

    config = model_config_pb2().ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise YatDeployError(f"{shown or path}: not a valid Triton model config: {exc}") from None
    return config


def config_from_json(text: str):
    """A ModelConfig message from its JSON form (a load request's `config` parameter), or a YatDeployError."""
    from google.protobuf import json_format

    try:
        return json_format.Parse(text, model_config_pb2().ModelConfig())
    except json_format.ParseError as exc:
        raise YatDeployError(f"the configuration is not a valid Triton model config: {exc}") from None


def _is_text(name: str) -> bool:
    """Whether a file name read from the disk is valid UTF-8 (os.fsdecode keeps other bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_read(name: str) -> str:
    """A file name that may not be UTF-8, as a message shows it: caf\\xe9."""
    return repr(os.fsencode(name))[2:-1]


def model_folders(path: Path) -> list[Path]:
    """The model folders of the repository at `path`, sorted: its folders whose names are valid UTF-8 and not
    hidden (a name starting with '.', such as the staging folder of an entry being written, files.staged_folder)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and _is_text(p.name) and not p.name.startswith("."))


def skipped_folders(path: str | Path) -> list[str]:
    """The folders of the repository at `path` that are no model because their names are not valid UTF-8, as
    messages show them."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(_as_read(p.name) for p in path.iterdir() if not _is_text(p.name) and p.is_dir())


def _default_file_names(name: str, config, what: str) -> tuple[str, ...]:
    """The file names a version folder may serve: the config's default_model_filename, else packaging.model_files()
    (model.onnx, model.plan). A default_model_filename that is not a plain file name is refused with one message
    whatever it names (`what`: the config it is in, as the message says it)."""
    value = config.default_model_filename if config is not None else ""
    if not value:
        return model_files()
    if not value.strip() or value in (".", "..") or any(c in value for c in "/\\\x00"):
        raise YatDeployError(f"model '{name}': {what} default_model_filename must be a plain file name in the "
                             "version folder (no '/' or '\\', not '.', '..' or blank)")
    return (value,)


def _check_inside(name: str, path: Path, repository: Path, root: str) -> None:
    """A YatDeployError when `path`, in the repository, resolves (symbolic links followed) outside `root`, the
    repository's real path; the message is the same whether or not what the link points to exists."""
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        shown = path.relative_to(repository).as_posix()
        raise YatDeployError(f"model '{name}': {shown} is a link to outside the repository: refused")


def _model_file(name: str, version_dir: Path, names: Sequence[str], repository: Path, root: str) -> Path | None:
    """The model file of a version folder: the first of `names` there; a YatDeployError for a link out of the
    repository."""
    for file_name in names:
        candidate = version_dir / file_name
        if os.path.lexists(candidate):
            _check_inside(name, candidate, repository, root)
            if candidate.is_file():
                return candidate
    return None


def _peek_config(path: Path):
    """The config.pbtxt's message for discovery, or None when it does not parse (read_config says why)."""
    try:
        return parse_config(path)
    except YatDeployError:
        return None


def _served_versions(name: str, config, found: list[tuple[int, Path, Path]]) -> list[tuple[int, Path, Path]]:
    """The versions Triton's version_policy serves, among `found` (version, folder, model file), sorted: latest N
    (the default: latest 1), all, or specific versions (each of which must be there)."""
    policy = config.version_policy.WhichOneof("policy_choice") if config is not None else None
    if policy == "specific":
        wanted = sorted(set(config.version_policy.specific.versions))
        present = {entry[0]: entry for entry in found}
        missing = [v for v in wanted if v not in present]
        if not wanted or missing:
            raise YatDeployError(f"model '{name}': {CONFIG} version_policy specific {list(wanted)}: no version "
                                 f"{', '.join(map(str, missing or ['listed']))} (found "
                                 f"{', '.join(str(v) for v, _, _ in found)})")
        return [present[v] for v in wanted]
    if policy == "all":
        return found
    if policy == "latest":
        count = config.version_policy.latest.num_versions
        if count < 1:
            raise YatDeployError(f"model '{name}': {CONFIG} version_policy latest num_versions {count}: must be at "
                                 "least 1")
        return found[-count:]
    return found[-1:]


def _backend_name(model_file: Path) -> str | None:
    """The backend a model file needs (an engine's), None for one any backend may run (backends.for_file)."""
    backend = registry.for_file(model_file)
    return None if backend is None else backend.name


def discover(path: str | Path, only: str | None = None, config_override=None) -> list[ModelSource]:
    """The model versions at `path`: one .onnx file (served under its stem), or a Triton-style repository,
    one ModelSource per version its version_policy serves (`only`: of that model alone; `config_override`: a
    ModelConfig message read instead of its config.pbtxt, as a load request may send one)."""
    path = Path(path)
    if not path.exists():
        # `only`: a load request's answer, which names no path of the server
        raise YatDeployError(f"{path}: no such file or folder" if only is None else
                             f"model '{only}': the model repository is gone")
    if path.is_file():
        if not _is_text(path.stem):
            raise YatDeployError(f"{_as_read(path.name)}: a model's name (the file's stem) must be valid UTF-8: "
                                 "rename the file")
        kinds = registry.file_kinds()
        if path.suffix not in kinds:
            raise YatDeployError(f"{path}: expected a model file ("
                                 + ", ".join(f"{what}: {suffix}" for suffix, what in kinds.items())
                                 + ") or a model repository folder")
        return [ModelSource(path.stem, "1", path, backend=_backend_name(path))]
    sources = []
    root = os.path.realpath(path)
    for folder in model_folders(path):
        if only is None or folder.name == only:
            sources += _model_sources(folder, path, root, config_override)
    if not sources and only is not None:
        raise YatDeployError(f"model '{only}' is not in the repository")
    if not sources:
        raise YatDeployError(f"{path}: no models (expected <model>/<version>/{' or '.join(model_files())})")
    return sources


def _model_sources(folder: Path, repository: Path, root: str, config_override) -> list[ModelSource]:
    """One ModelSource per version of the model in `folder` that its version_policy serves, or one with the error
    that makes the model unavailable. `root`: the repository's real path."""
    name = folder.name
    config_path = folder / CONFIG
    version = "1"
    try:
        if config_override is None and os.path.lexists(config_path):
            _check_inside(name, config_path, repository, root)
        has_config = config_override is not None or config_path.is_file()
        config = config_override if config_override is not None else \
            _peek_config(config_path) if has_config else None
        names = _default_file_names(name, config, "the load request's config" if config_override is not None
                                    else CONFIG)
        versions = sorted((int(v.name), v) for v in folder.iterdir()
                          if v.name.isascii() and v.name.isdigit() and v.is_dir())
        found = []
        for number, version_dir in versions:
            version = str(number)
            _check_inside(name, version_dir, repository, root)
            if (model_file := _model_file(name, version_dir, names, repository, root)) is not None:
                found.append((number, version_dir, model_file))
        version = str(versions[-1][0]) if versions else "1"
    except YatDeployError as exc:
        return [ModelSource(name, version, folder, error=exc.text, repository=repository)]
    if not found:
        if has_config or versions:  # a model folder that serves nothing: say why, not skip it
            return [ModelSource(name, version, folder, error=_why_no_model(name, config, names, versions),
                                repository=repository)]
        return []
    try:
        served = _served_versions(name, config, found)
    except YatDeployError as exc:
        return [ModelSource(name, str(found[-1][0]), found[-1][2], error=exc.text, repository=repository)]
    sources = []
    for number, _, model_file in served:
        source = ModelSource(name, str(number), model_file, shown=model_file.relative_to(repository).as_posix(),
                             repository=repository)
        try:
            source.backend = _backend_name(model_file)
        except YatDeployError as exc:  # an engine no backend here built: that model is unavailable
            source.error = f"model '{name}': {exc.text}"
        if has_config and source.error is None:
            try:
                read_config(source, config_path, config_override)
            except YatDeployError as exc:
                source.error = exc.text
        sources.append(source)
    return sources


def _why_no_model(name: str, config, names: Sequence[str], versions: list[tuple[int, Path]]) -> str:
    if config is not None and (config.platform == "ensemble" or config.HasField("ensemble_scheduling")):
        return f"model '{name}': {CONFIG} platform ensemble: ensembles are not supported by yatdeploy"
    if not versions:
        return f"model '{name}': no version folder (<model>/1/{names[0]})"
    return (f"model '{name}': no version folder holds {' or '.join(names)}"
            + (" (its default_model_filename)" if len(names) == 1 else ""))


def _config_error(source: ModelSource, field: str, problem: str) -> YatDeployError:
    return YatDeployError(f"model '{source.name}': {CONFIG} {field} {problem}")


def read_config(source: ModelSource, path: Path, config=None) -> None:
    """Set `source` from its config.pbtxt at `path` (or `config`, a ModelConfig message given instead), or raise
    a YatDeployError naming the model and the bad field.

    What can be checked without loading the model is checked here; check_signature does the rest.
    """
    if config is None:
        try:
            config = parse_config(path, shown=CONFIG)
        except YatDeployError as exc:
            raise YatDeployError(f"model '{source.name}': {exc.message}") from None
    source.config = path
    if config.name and config.name != source.name:
        raise _config_error(source, "name", f"{config.name!r} differs from its folder's, {source.name!r}")
    if config.max_batch_size < 0:
        raise _config_error(source, "max_batch_size", f"{config.max_batch_size}: must be 0 (the first dimension "
                                                      "is not a batch dimension) or more")
    source.max_batch_size = config.max_batch_size
    for unsupported, present in (("ensemble_scheduling", config.HasField("ensemble_scheduling")),
                                 ("sequence_batching", config.HasField("sequence_batching"))):
        if present:
            raise _config_error(source, unsupported, "is not supported by yatdeploy")
    if any(group.count > 1 for group in config.instance_group):
        raise _config_error(source, "instance_group", "count > 1: yatdeploy runs one instance of a model (its "
                                                      "intra-op threads use the cores)")
    runtimes = [names for suffix in registry.file_kinds() for names in registry.triton_names(suffix)]
    backends, platforms = (list(dict.fromkeys(names)) for names in zip(*runtimes))
    expected = [name for pair in registry.triton_names(source.path.suffix) for name in pair]
    for field, value, known in (("backend", config.backend, backends), ("platform", config.platform, platforms)):
        if value and value not in known:
            raise _config_error(source, field, f"{value!r}: yatdeploy serves {', '.join(known)}")
        if value and value not in expected:
            raise _config_error(source, field, f"{value!r} does not run {source.path.name}")
    if BACKEND_PARAMETER in config.parameters:
        source.backend = config.parameters[BACKEND_PARAMETER].string_value
        if source.backend not in registry.names():
            raise _config_error(source, f"parameters[{BACKEND_PARAMETER}]",
                                f"{source.backend!r}: not a backend (known: {', '.join(registry.names())})")
    source.input_limits = read_limit_parameters(source, config.parameters)
    source.response_cache = config.response_cache.enable
    source.warmup = tuple(read_warmup_sample(source, sample) for sample in config.model_warmup)
    source.dynamic_batching = config.HasField("dynamic_batching")
    if source.dynamic_batching:
        delay = config.dynamic_batching.max_queue_delay_microseconds
        if delay > MAX_QUEUE_DELAY_US:
            raise _config_error(source, "dynamic_batching.max_queue_delay_microseconds",
                                f"{delay}: more than the limit of {MAX_QUEUE_DELAY_US} (10 s)")
        source.max_queue_delay_us = int(delay)
        source.queue_policy = read_queue_policies(source, config.dynamic_batching)
    datatypes = {triton: name for name, triton in TRITON_TYPES.items()}
    pb2 = type(config).DESCRIPTOR.file.enum_types_by_name["DataType"]
    for field, entries in (("input", config.input), ("output", config.output)):
        tensors = []
        for entry in entries:
            triton_type = pb2.values_by_number[entry.data_type].name
            if triton_type not in datatypes:
                raise _config_error(source, f"{field} '{entry.name}' data_type", f"{triton_type}: not supported")
            if any(d < 1 and d != graph.DYNAMIC for d in entry.dims):
                raise _config_error(source, f"{field} '{entry.name}' dims", f"{list(entry.dims)}: each must be "
                                                                           "at least 1, or -1 for a free one")
            if entry.HasField("reshape"):
                raise _config_error(source, f"{field} '{entry.name}'", "reshape: not supported by yatdeploy")
            formats = type(entry).Format if field == "input" else None
            if formats is not None and entry.format not in formats.values():
                raise _config_error(source, f"input '{entry.name}' format", f"{entry.format}: not a format")
            data_format = formats.Name(entry.format) if formats is not None else "FORMAT_NONE"
            if data_format != "FORMAT_NONE" and len(entry.dims) != 3:  # Triton's rule: an image's C, H and W
                raise _config_error(source, f"input '{entry.name}' format",
                                    f"{data_format}: needs 3 dims (without the batch dimension), not "
                                    f"{list(entry.dims)}")
            tensors.append(ConfigTensor(entry.name, datatypes[triton_type], tuple(int(d) for d in entry.dims),
                                        data_format, entry.label_filename if field == "output" else ""))
        setattr(source, f"{field}s", tuple(tensors))


def _queue_policy(source: ModelSource, policy, field: str) -> QueuePolicy:
    """A ModelQueuePolicy message as a QueuePolicy (its max_queue_size 0: the default)."""
    action = type(policy).TimeoutAction.Name(policy.timeout_action) \
        if policy.timeout_action in type(policy).TimeoutAction.values() else str(policy.timeout_action)
    if action not in TIMEOUT_ACTIONS:
        raise _config_error(source, f"{field}.timeout_action", f"{action}: must be {' or '.join(TIMEOUT_ACTIONS)}")
    return QueuePolicy(max_queue_size=int(policy.max_queue_size) or DEFAULT_MAX_QUEUE_SIZE, timeout_action=action,
                       default_timeout_us=int(policy.default_timeout_microseconds),
                       allow_timeout_override=policy.allow_timeout_override)


def read_queue_policies(source: ModelSource, batching) -> QueuePolicies:
    """The queue policies a dynamic_batching message states (serving.queue_policy); yatdeploy's default where it
    states none. A YatDeployError names a bad field."""
    stated = batching.HasField("default_queue_policy") or batching.priority_levels or batching.priority_queue_policy
    if not stated:
        return QueuePolicies()
    levels, default_level = int(batching.priority_levels), int(batching.default_priority_level)
    where = "dynamic_batching"
    if levels > MAX_PRIORITY_LEVELS:
        raise _config_error(source, f"{where}.priority_levels", f"{levels}: more than the limit of "
                                                                 f"{MAX_PRIORITY_LEVELS}")
    if levels and not 1 <= default_level <= levels:
        raise _config_error(source, f"{where}.default_priority_level", f"{default_level}: must be a level from 1 "
                                                                       f"to priority_levels ({levels})")
    if not levels and default_level:
        raise _config_error(source, f"{where}.default_priority_level", f"{default_level}: the config states no "
                                                                       "priority_levels")
    by_level = {}
    for level, policy in sorted(batching.priority_queue_policy.items()):
        if not 1 <= level <= levels:
            raise _config_error(source, f"{where}.priority_queue_policy[{level}]",
                                f"is not a priority level (1 to priority_levels, {levels})")
        by_level[int(level)] = _queue_policy(source, policy, f"{where}.priority_queue_policy[{level}]")
    return QueuePolicies(_queue_policy(source, batching.default_queue_policy, f"{where}.default_queue_policy"),
                         levels, default_level, by_level)


def check_signature(source: ModelSource, inputs: Sequence[TensorSignature], outputs: Sequence[TensorSignature],
                    ) -> dict[str, list[int]]:
    """Check the config's tensors and max_batch_size against the loaded model's; the shape served for each
    tensor (the config's dims where they fix a dimension the model leaves free). Raises YatDeployError
    naming the model and the field."""
    model_batches = all(graph.has_batch_dim(t.shape) for t in [*inputs, *outputs])
    if source.max_batch_size > 0 and not model_batches:
        free = [t.name for t in [*inputs, *outputs] if not graph.has_batch_dim(t.shape)]
        raise _config_error(source, "max_batch_size", f"{source.max_batch_size}: the first dimension of "
                                                      f"{', '.join(free)} is not free, so not a batch dimension "
                                                      "(use max_batch_size: 0)")
    batch = (graph.DYNAMIC,) if source.max_batch_size > 0 else ()
    shapes = {t.name: t.shape for t in [*inputs, *outputs]}
    for field, declared, served in (("input", source.inputs, inputs), ("output", source.outputs, outputs)):
        if not declared:  # not listed: as the model says (Triton's auto-complete)
            continue
        if sorted(t.name for t in declared) != sorted(t.name for t in served):
            raise _config_error(source, f"{field} names", f"{[t.name for t in declared]}: the model's are "
                                                          f"{[t.name for t in served]}")
        by_name = {t.name: t for t in served}
        for tensor in declared:
            model = by_name[tensor.name]
            if tensor.datatype != model.datatype:
                raise _config_error(source, f"{field} '{tensor.name}' data_type",
                                    f"{TRITON_TYPES[tensor.datatype]}: the model's is {TRITON_TYPES[model.datatype]}")
            dims = batch + tensor.dims
            if len(dims) != len(model.shape) or any(m != graph.DYNAMIC and d != m for d, m in zip(dims, model.shape)):
                shown = list(model.shape[len(batch):])
                raise _config_error(source, f"{field} '{tensor.name}' dims",
                                    f"{list(tensor.dims)}: the model's are {shown}"
                                    + (" (without the batch dimension, as max_batch_size > 0)" if batch else ""))
            shapes[tensor.name] = list(dims)
    return shapes


def read_warmup_sample(source: ModelSource, sample) -> WarmupSample:
    """A ModelWarmup message checked (what can be without the model: its inputs are checked against the model's
    when it runs, serving.warmup), or a YatDeployError naming the sample and the field."""
    if not sample.name.strip():
        raise _config_error(source, "model_warmup", "name: each sample needs one (messages name it)")
    field = f"model_warmup '{sample.name}'"
    if sample.batch_size < 1 or (source.max_batch_size == 0 and sample.batch_size != 1):
        raise _config_error(source, f"{field} batch_size", f"{sample.batch_size}: must be at least 1, and 1 for a "
                                                           "model without a batch dimension (max_batch_size 0)")
    if source.max_batch_size > 0 and sample.batch_size > source.max_batch_size:
        raise _config_error(source, f"{field} batch_size", f"{sample.batch_size}: more than max_batch_size "
                                                           f"{source.max_batch_size}")
    if sample.count > MAX_WARMUP_COUNT:
        raise _config_error(source, f"{field} count", f"{sample.count}: more than {MAX_WARMUP_COUNT}")
    if not sample.inputs:
        raise _config_error(source, f"{field} inputs", "none: a sample gives every input of the model")
    datatypes = {triton: name for name, triton in TRITON_TYPES.items()}
    pb2 = sample.DESCRIPTOR.file.enum_types_by_name["DataType"]
    inputs = []
    for name in sorted(sample.inputs):
        entry = sample.inputs[name]
        where = f"{field} input '{name}'"
        triton_type = pb2.values_by_number[entry.data_type].name
        if triton_type not in datatypes:
            raise _config_error(source, f"{where} data_type", f"{triton_type}: not supported")
        if any(d < 1 for d in entry.dims):
            raise _config_error(source, f"{where} dims", f"{list(entry.dims)}: each must be at least 1 (a sample's "
                                                         "dims are fixed)")
        data = entry.WhichOneof("input_data_type")
        if data is None:
            raise _config_error(source, where, "gives no data: one of zero_data, random_data or input_data_file")
        file = entry.input_data_file if data == "input_data_file" else ""
        parts = file.replace("\\", "/").split("/")
        if data == "input_data_file" and (not file.strip() or file.startswith("/") or "\x00" in file
                                          or any(part in ("", ".", "..") for part in parts)):
            raise _config_error(source, f"{where} input_data_file", f"{file!r}: must be a path in the version "
                                f"folder's {WARMUP_FOLDER}/ folder (no '..', not absolute)")
        inputs.append(WarmupInput(name, datatypes[triton_type], tuple(int(d) for d in entry.dims), data, file))
    return WarmupSample(sample.name, int(sample.batch_size), tuple(inputs), int(sample.count))


def read_limit_parameters(source: ModelSource, parameters) -> dict[str, InputLimits]:
    """The limits a config's parameters state (a ModelConfig's `parameters` map), by input; a YatDeployError
    naming a malformed one. Whether each names an input of the model, of that rank, is checked once it is
    loaded (serving.model)."""
    limits: dict[str, InputLimits] = {}
    for key in sorted(parameters):
        if not key.startswith(LIMIT_PREFIX):
            continue
        name, _, kind = key[len(LIMIT_PREFIX):].rpartition(".")
        text = parameters[key].string_value
        if not name or kind not in LIMIT_KINDS:
            raise _config_error(source, f"parameters[{key}]", f"is not a limit: expected {LIMIT_PREFIX}<input>."
                                                              f"{' or .'.join(LIMIT_KINDS)}")
        was = limits.get(name, InputLimits())
        try:
            if kind == "range":
                low, high = (int(v) for v in text.split(":"))
                if low >= high:
                    raise ValueError
                limits[name] = InputLimits((low, high), was.max_dims)
            else:
                dims = tuple(int(v) for v in text.split(","))
                if any(d < 1 and d != graph.DYNAMIC for d in dims):
                    raise ValueError
                limits[name] = InputLimits(was.values, tuple(None if d == graph.DYNAMIC else d for d in dims))
        except ValueError:
            expected = "LO:HI with LO < HI, e.g. 0:512" if kind == "range" else \
                "one size per dim of the config's dims, each at least 1 or -1 for any, e.g. 1024"
            raise _config_error(source, f"parameters[{key}]", f"{text!r}: expected {expected}") from None
    return limits
