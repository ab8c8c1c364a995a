"""Stage package: Triton-style model repositories, written by `export --repository` (an ONNX model, for ONNX
Runtime) and `build-engine --repository` (an engine, for the backend that built it), and the layout's names that
the server's reader (yatdeploy.serving.repository) shares.

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<version>/model.onnx        Triton's onnxruntime backend, with yatdeploy's custom-op library
                                               copied beside config.pbtxt
    <repo>/<model>/<version>/model<suffix>     an engine (a TensorRT .plan and its signature, model.plan.json):
                                               the platform of the backend that built it (backends.for_file)

The config is Triton's ModelConfig message in protobuf text format (tritonclient's model_config_pb2), so the
folder can be handed to Triton Inference Server as it is. Each entry is written whole or not at all
(files.staged_folder).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath, PurePosixPath

import onnx

from yatdeploy import backends, dtypes, graph
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
# A version folder's model file is MODEL_STEM and the file's suffix (Triton's default_model_filename for its
# platform): model.onnx, model.plan.
MODEL_STEM = "model"
MODEL_FILE = f"{MODEL_STEM}.onnx"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_SIZE = 256
# Where Triton sees the model repository: the folder its docs mount and pass as --model-repository. The
# custom-op library's path in config.pbtxt is written for it (write_repository's op_library_root).
DEFAULT_OP_LIBRARY_ROOT = "/models"
TRITON_TYPES = {t.v2: t.triton for t in dtypes.TYPES}  # v2 datatype -> Triton's TYPE_ name
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def model_files() -> tuple[str, ...]:
    """The file names a version folder's model may have, one per model file suffix a backend opens, in the
    registry's order (model.onnx first)."""
    return tuple(f"{MODEL_STEM}{suffix}" for suffix in backends.file_kinds())


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


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise YatDeployError(f"model name {name!r}: use letters, digits, '_', '.' and '-' only")
    return name


def _add_tensors(field, tensors: Sequence[TensorSignature], batching: bool) -> None:
    """Add ModelInput/ModelOutput entries to `field`, without the batch dimension when `batching`."""
    for tensor in tensors:
        field.add(name=tensor.name, data_type=TRITON_TYPES[tensor.datatype],
                  dims=list(tensor.shape[1:] if batching else tensor.shape))


def _dynamic_batching(config, max_queue_delay_us: int, max_queue_size: int) -> None:
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.default_queue_policy.max_queue_size = max_queue_size
    # A request's `timeout` parameter is honoured (Triton's default policy ignores it): serving.queue_policy.
    config.dynamic_batching.default_queue_policy.allow_timeout_override = True
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


def _text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def config_text(name: str, model: onnx.ModelProto, *, op_library: str | PurePath | None, max_batch_size: int,
                max_queue_delay_us: int = 0, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """config.pbtxt for an ONNX model: Triton's ModelConfig message in protobuf text format. `op_library` is
    written as given: the custom-op library's path where Triton will run (op_library_path)."""
    pb2 = model_config_pb2()
    # Triton's backend for an ONNX model as it is (ONNX Runtime's, which registers op_library in its sessions).
    triton_backend, _ = backends.triton_names(Path(MODEL_FILE).suffix)[0]
    config = pb2.ModelConfig(name=name, backend=triton_backend, max_batch_size=max_batch_size)
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


def engine_config_text(name: str, engine: backends.EngineInfo, *, max_queue_delay_us: int = 0,
                       max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """config.pbtxt for an engine: the platform of the backend that runs it, which the config also names
    (BACKEND_PARAMETER), and the engine's tensors and largest batch."""
    backend = backends.get(engine.backend)
    batching = graph.has_batch_dim(engine.inputs[0].shape)
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(name=name, platform=backend.triton_platform,
                             max_batch_size=engine.batch_profile[2] if batching else 0)
    _add_tensors(config.input, engine.inputs, batching)
    _add_tensors(config.output, engine.outputs, batching)
    if batching:
        _dynamic_batching(config, max_queue_delay_us, max_queue_size)
    config.instance_group.add(kind=getattr(pb2.ModelInstanceGroup, backend.builder.instance_kind), count=1)
    config.parameters[BACKEND_PARAMETER].string_value = backend.name
    return _text(config)


def write_engine_repository(repository: str | Path, name: str, engine_path: str | Path, version: int = 1) -> Path:
    """Copy an engine and what goes with it (a TensorRT engine's signature) into
    `<repository>/<name>/<version>/model<suffix>` (and `model<suffix>.json`...) with a config.pbtxt."""
    check_model_name(name)
    engine_path = Path(engine_path)
    backend = backends.for_file(engine_path)
    if backend is None:
        raise YatDeployError(f"{engine_path}: not an engine (build-engine builds one)")
    if backend.builder.repository_refusal:
        raise YatDeployError(f"{engine_path}: {backend.builder.repository_refusal}")
    engine = backend.builder.read(engine_path)
    if engine.batch_profile[0] > 1 and graph.has_batch_dim(engine.inputs[0].shape):
        raise YatDeployError(f"{engine_path}: its profile starts at batch {engine.batch_profile[0]}; Triton sends "
                             f"batches from 1 (rebuild with {option('min_batch')} 1)")
    config = engine_config_text(name, engine)
    target = f"{MODEL_STEM}{backend.builder.suffix}"
    folder = Path(repository) / name
    with staged_folder(folder, last=(CONFIG,)) as stage:  # the entry as a unit, as write_repository's
        (stage / str(version)).mkdir()
        for source in engine.files:  # each named after the engine: m.plan, m.plan.json -> model.plan, model.plan.json
            shutil.copyfile(source, stage / str(version) / (target + source.name[len(engine.path.name):]))
        (stage / CONFIG).write_text(config)
    return folder
