"""Model repositories: a single .onnx file, or a Triton-style folder, read and written.

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<version>/model.onnx        (platform onnxruntime_onnx), or
    <repo>/<model>/<version>/model.plan        (platform tensorrt_plan: a TensorRT engine from
                                                `yatdeploy build-engine`, with model.plan.json beside it)

The config is Triton's ModelConfig in protobuf text format, so the same folder can be handed to Triton
Inference Server; yatdeploy reads the fields it shares with Triton, with Triton's meaning:

- `max_batch_size: 0`: the first dimension is not a batch dimension; the config's dims include it and
  requests are never merged. `max_batch_size > 0`: the model's first dimension must be a batch
  dimension (graph.has_batch_dim), the dims leave it out and a request may carry up to that many rows.
- `dynamic_batching { max_queue_delay_microseconds, default_queue_policy { max_queue_size } }`: requests
  are merged along the batch dimension; without the block each request runs on its own.
- `backend`/`platform`, `input`/`output` (names, data_type, dims) must match the model file.

A config that breaks any of these makes its model unavailable (ModelSource.error), not the repository.

Nothing outside the repository is served, read or described: `default_model_filename` (in config.pbtxt or a load
request's config) is a plain file name in the version folder, and a model file, version folder or config.pbtxt that
is a symbolic link out of the repository is refused with one message whatever the link points to. Messages name a
model's files by their path in the repository (ModelSource.shown), never by the server's absolute path. A folder
whose name is not valid UTF-8 is no model (a model name is text in URLs, JSON and metrics): skipped_folders names
it for a warning.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

import onnx

from yatdeploy import graph
from yatdeploy.errors import YatDeployError, option
from yatdeploy.files import staged_folder
from yatdeploy.graph import TensorSignature
from yatdeploy.inputs import InputLimits, recorded_limits

CONFIG = "config.pbtxt"
# A free-form ModelConfig parameter, which Triton ignores, naming yatdeploy's backend for the model.
BACKEND_PARAMETER = "yatdeploy_backend"
# Free-form ModelConfig parameters stating an input's limits (inputs.InputLimits), written from the export's
# record, for Triton users to read and yatdeploy's server to check (it answers 400 outside them):
#   yatdeploy.input.<name>.range     "LO:HI"  an integer input's values lie in [LO, HI) (an embedding's rows)
#   yatdeploy.input.<name>.max_dims  "D,..."  the largest size of each of the config's `dims` (-1: any)
LIMIT_PREFIX = "yatdeploy.input."
LIMIT_KINDS = ("range", "max_dims")
MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_SIZE = 256
# The longest max_queue_delay_microseconds a config.pbtxt may ask for: a batching delay is a few
# milliseconds at most in practice; an hour (or 2**64-1 µs) is a mistake or an attack on the queue.
MAX_QUEUE_DELAY_US = 10_000_000
# Triton's backend and platform names for what yatdeploy serves, by the model file each one loads.
_TRITON_RUNTIMES = {MODEL_FILE: ("onnxruntime", "onnxruntime_onnx"), PLAN_FILE: ("tensorrt", "tensorrt_plan")}
# Triton's --model-control-mode values yatdeploy has: every model at start-up and no changes (none), or only
# what --load-model names, then what clients load and unload (explicit).
CONTROL_MODES = ("none", "explicit")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ConfigTensor:
    """An input or output as config.pbtxt declares it."""

    name: str
    datatype: str  # the protocol's name (FP32, ...) of the config's data_type
    dims: tuple[int, ...]  # as written: without the batch dimension when max_batch_size > 0


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
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
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


def model_config_pb2():
    """Triton's ModelConfig protobuf module, as shipped in tritonclient (without its gRPC extra)."""
    try:
        import tritonclient
    except ImportError:
        raise YatDeployError("reading or writing config.pbtxt needs tritonclient",
                             "pip install tritonclient (a dependency of yatdeploy: reinstall it)") from None
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("yatdeploy_triton_model_config_pb2", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise YatDeployError(f"tritonclient has no {path.name}; reinstall tritonclient")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise YatDeployError(f"model name {name!r}: use letters, digits, '_', '.' and '-' only")
    return name


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
    """The file names a version folder may serve: the config's default_model_filename, else model.onnx and model.plan.
    A default_model_filename that is not a plain file name is refused with one message whatever it names (`what`:
    the config it is in, as the message says it)."""
    value = config.default_model_filename if config is not None else ""
    if not value:
        return (MODEL_FILE, PLAN_FILE)
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


def _engine_backend(plan: Path) -> str:
    """The backend that runs an engine: its signature's runtime (tensorrt, or tensorrt-rtx)."""
    from yatdeploy.trt.engine import engine_runtime

    return engine_runtime(plan)


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
        if path.suffix == ".plan":
            return [ModelSource(path.stem, "1", path, backend=_engine_backend(path))]
        if path.suffix != ".onnx":
            raise YatDeployError(f"{path}: expected an .onnx file, a TensorRT .plan or a model repository folder")
        return [ModelSource(path.stem, "1", path)]
    sources = []
    root = os.path.realpath(path)
    for folder in model_folders(path):
        if only is None or folder.name == only:
            sources += _model_sources(folder, path, root, config_override)
    if not sources and only is not None:
        raise YatDeployError(f"model '{only}' is not in the repository")
    if not sources:
        raise YatDeployError(f"{path}: no models (expected <model>/<version>/{MODEL_FILE} or {PLAN_FILE})")
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
                             repository=repository,
                             backend=_engine_backend(model_file) if model_file.suffix == ".plan" else None)
        if has_config:
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
    from yatdeploy import backends as registry

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
    for field, present in (("ensemble_scheduling", config.HasField("ensemble_scheduling")),
                           ("sequence_batching", config.HasField("sequence_batching")),
                           ("response_cache", config.response_cache.enable)):
        if present:
            raise _config_error(source, field, "is not supported by yatdeploy")
    if any(group.count > 1 for group in config.instance_group):
        raise _config_error(source, "instance_group", "count > 1: yatdeploy runs one instance of a model (its "
                                                      "intra-op threads use the cores)")
    backends, platforms = zip(*_TRITON_RUNTIMES.values())
    expected = _TRITON_RUNTIMES[MODEL_FILE if source.path.suffix == ".onnx" else PLAN_FILE]
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
    source.dynamic_batching = config.HasField("dynamic_batching")
    if source.dynamic_batching:
        delay = config.dynamic_batching.max_queue_delay_microseconds
        if delay > MAX_QUEUE_DELAY_US:
            raise _config_error(source, "dynamic_batching.max_queue_delay_microseconds",
                                f"{delay}: more than the limit of {MAX_QUEUE_DELAY_US} (10 s)")
        source.max_queue_delay_us = int(delay)
        queue = config.dynamic_batching.default_queue_policy.max_queue_size  # unsigned; 0: the default
        if queue > 0:
            source.max_queue_size = int(queue)
    datatypes = {triton: name for name, triton in _TRITON_TYPES.items()}
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
            tensors.append(ConfigTensor(entry.name, datatypes[triton_type], tuple(int(d) for d in entry.dims)))
        setattr(source, f"{field}s", tuple(tensors))


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
                                    f"{_TRITON_TYPES[tensor.datatype]}: the model's is {_TRITON_TYPES[model.datatype]}")
            dims = batch + tensor.dims
            if len(dims) != len(model.shape) or any(m != graph.DYNAMIC and d != m for d, m in zip(dims, model.shape)):
                shown = list(model.shape[len(batch):])
                raise _config_error(source, f"{field} '{tensor.name}' dims",
                                    f"{list(tensor.dims)}: the model's are {shown}"
                                    + (" (without the batch dimension, as max_batch_size > 0)" if batch else ""))
            shapes[tensor.name] = list(dims)
    return shapes


def _triton_types() -> dict[str, str]:
    from yatdeploy import dtypes

    return {t.v2: t.triton for t in dtypes.TYPES}


_TRITON_TYPES = _triton_types()  # v2 datatype -> Triton's TYPE_ name


def _add_tensors(field, tensors: Sequence[TensorSignature], batching: bool) -> None:
    """Add ModelInput/ModelOutput entries to `field`, without the batch dimension when `batching`."""
    for tensor in tensors:
        field.add(name=tensor.name, data_type=_TRITON_TYPES[tensor.datatype],
                  dims=list(tensor.shape[1:] if batching else tensor.shape))


def _dynamic_batching(config, max_queue_delay_us: int, max_queue_size: int) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    config.dynamic_batching.SetInParent()  # present even with every field at its default


def limit_parameters(limits: Mapping[str, InputLimits], batching: bool) -> dict[str, str]:
    """The config parameters (LIMIT_PREFIX) stating `limits`; max_dims without the batch dim when `batching`."""
    parameters = {}
    for name, limit in limits.items():
        if limit.values is not None:
            parameters[f"{LIMIT_PREFIX}{name}.range"] = f"{limit.values[0]}:{limit.values[1]}"
        dims = limit.max_dims[1:] if batching else limit.max_dims
        if any(d is not None for d in dims):
            parameters[f"{LIMIT_PREFIX}{name}.max_dims"] = ",".join(str(graph.DYNAMIC if d is None else d)
                                                                    for d in dims)
    return parameters


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


def _text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def config_text(name: str, model: onnx.ModelProto, *, op_library: str | PurePath | None, max_batch_size: int,
                max_queue_delay_us: int = 0, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """config.pbtxt for an ONNX model: Triton's ModelConfig message in protobuf text format. `op_library` is
    written as given: the custom-op library's path where Triton will run (op_library_path)."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    _add_tensors(config.input, [graph.signature(v) for v in graph.graph_inputs(model)], batching=True)
    _add_tensors(config.output, [graph.signature(v) for v in model.graph.output], batching=True)
    _dynamic_batching(config, max_queue_delay_us, max_queue_size)
    config.instance_group.add(kind=pb2.ModelInstanceGroup.KIND_CPU, count=1)
    for key, value in limit_parameters(recorded_limits(graph.metadata(model)), batching=True).items():
        config.parameters[key].string_value = value
    if op_library is not None:
        # Triton's ONNX Runtime backend registers this library in every session of the model.
        config.model_operations.op_library_filename.append(str(op_library))
    return _text(config)


# Where Triton sees the model repository: the folder its docs mount and pass as --model-repository. The
# custom-op library's path in config.pbtxt is written for it (write_repository's op_library_root).
DEFAULT_OP_LIBRARY_ROOT = "/models"


def write_repository(repository: str | Path, name: str, onnx_path: str | Path, *, op_library: Path | None,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, version: int = 1,
                     op_library_root: str | PurePath = DEFAULT_OP_LIBRARY_ROOT) -> Path:
    """Copy an exported model into `<repository>/<name>/<version>/model.onnx` with its config.pbtxt.

    With `op_library` (the custom-op library), the library and the libraries it needs from outside the system
    (OpenBLAS) are copied into `<repository>/<name>/` beside config.pbtxt, and the config's op_library_filename
    names the copy as Triton will see it: `<op_library_root>/<name>/<file>`, `op_library_root` being the
    repository's absolute path where Triton runs (/models, Triton's convention, by default; /mnt/models under
    KServe; the repository's own absolute path for a Triton on this machine). docs/triton.md."""
    check_model_name(name)
    if max_batch_size < 1:
        raise YatDeployError(f"{option('max_batch_size')} {max_batch_size}: must be at least 1")
    model = onnx.load(str(onnx_path), load_external_data=False)
    if not graph.model_has_batch_dim(model):
        raise YatDeployError(f"a repository model needs a dynamic batch dimension (it was exported with {option('dynamic_batch', False)})")
    library_path = op_library_path(op_library_root, name, op_library) if op_library is not None else None
    config = config_text(name, model, op_library=library_path, max_batch_size=max_batch_size)
    folder = Path(repository) / name
    # The entry as a unit: written in full beside the folder, then moved in (config.pbtxt last), so a full disk or
    # Ctrl-C leaves the folder as it was.
    with staged_folder(folder, last=(CONFIG,)) as stage:
        (stage / str(version)).mkdir()
        shutil.copyfile(onnx_path, stage / str(version) / MODEL_FILE)
        if op_library is not None:
            copy_op_library(op_library, stage)
        (stage / CONFIG).write_text(config)
    return folder


def op_library_path(root: str | PurePath, name: str, op_library: str | Path) -> PurePosixPath:
    """op_library_filename for model `name`: where its copy of `op_library` is when the repository is at `root`.

    Triton's ONNX Runtime backend hands the string as it is to RegisterCustomOpsLibrary (dlopen), which would
    read a relative path against the server's working directory: `root` must be absolute."""
    root = PurePosixPath(root)
    if not root.is_absolute():
        raise YatDeployError(f"{option('op_library_root')} {str(root)!r}: give the absolute path the repository will "
                             f"have where Triton runs ({DEFAULT_OP_LIBRARY_ROOT}, Triton's convention; /mnt/models "
                             "under KServe; the repository's own absolute path for a Triton on this machine)")
    return root / check_model_name(name) / Path(op_library).name


def copy_op_library(op_library: str | Path, folder: Path) -> list[Path]:
    """Copy the custom-op library, and the libraries it needs from outside the system (OpenBLAS, under the names
    the library asks for), into `folder`; return the copies. The library finds them there through its `$ORIGIN`
    RUNPATH (custom_ops/CMakeLists.txt): a library built without one is refused, as its copy would not load."""
    from yatdeploy import native

    op_library = Path(op_library)
    try:
        dynamic = native.elf_dynamic(op_library)
        needs = native.library_dependencies(op_library)
    except (OSError, ValueError) as exc:
        raise YatDeployError(f"custom-op library {op_library}: {exc}") from None
    if needs and not any(entry in ("$ORIGIN", "${ORIGIN}") for entry in dynamic.runpath):
        raise YatDeployError(f"custom-op library {op_library} has no $ORIGIN in its RUNPATH "
                             f"({':'.join(dynamic.runpath) or 'none'}), so a copy would not find "
                             f"{', '.join(needs)} beside it", "rebuild it: make install")
    copies = []
    for target_name, source in [(op_library.name, op_library), *needs.items()]:
        target = folder / target_name
        copies.append(target)
        if target.exists() and target.resolve() == source.resolve():
            continue
        # A new file renamed into place: a server that has the old copy loaded keeps its pages intact.
        partial = target.with_name(f".{target_name}.partial")
        shutil.copyfile(source, partial)
        partial.replace(target)
    return copies


def engine_config_text(name: str, signature, *, max_queue_delay_us: int = 0,
                       max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """config.pbtxt for a TensorRT engine (yatdeploy.trt.engine.EngineSignature)."""
    batching = graph.has_batch_dim(signature.inputs[0].shape)
    pb2 = model_config_pb2()
    # YatGemm runs as yatdeploy's ahead-of-time plugin, whose kernel is inside the engine: Triton needs
    # no plugin library for it (no LD_PRELOAD, no --backend-config=tensorrt,plugins=...).
    config = pb2.ModelConfig(name=name, platform="tensorrt_plan",
                             max_batch_size=signature.profile.max if batching else 0)
    _add_tensors(config.input, signature.inputs, batching)
    _add_tensors(config.output, signature.outputs, batching)
    if batching:
        _dynamic_batching(config, max_queue_delay_us, max_queue_size)
    config.instance_group.add(kind=pb2.ModelInstanceGroup.KIND_GPU, count=1)
    config.parameters[BACKEND_PARAMETER].string_value = "tensorrt"
    return _text(config)


def write_engine_repository(repository: str | Path, name: str, engine_path: str | Path, version: int = 1) -> Path:
    """Copy an engine and its signature into `<repository>/<name>/<version>/model.plan` with a config.pbtxt."""
    from yatdeploy.trt.engine import EngineSignature, signature_path

    check_model_name(name)
    engine_path = Path(engine_path)
    signature = EngineSignature.read(engine_path)
    if signature.profile.min > 1 and graph.has_batch_dim(signature.inputs[0].shape):
        raise YatDeployError(f"{engine_path}: its profile starts at batch {signature.profile.min}; Triton sends "
                             f"batches from 1 (rebuild with {option('min_batch')} 1)")
    config = engine_config_text(name, signature)
    folder = Path(repository) / name
    with staged_folder(folder, last=(CONFIG,)) as stage:  # the entry as a unit, as write_repository's
        target = stage / str(version) / PLAN_FILE
        target.parent.mkdir()
        shutil.copyfile(engine_path, target)
        shutil.copyfile(signature_path(engine_path), signature_path(target))
        (stage / CONFIG).write_text(config)
    return folder
