"""Model repositories: a single .onnx file, or a Triton-style folder, read and written.

    <repo>/<model>/config.pbtxt
    <repo>/<model>/<version>/model.onnx        (platform onnxruntime_onnx), or
    <repo>/<model>/<version>/model.plan        (platform tensorrt_plan: a TensorRT engine from
                                                `yatdeploy build-engine`, with model.plan.json beside it)

The config is Triton's ModelConfig in protobuf text format, so the same folder can be handed to Triton
Inference Server; yatdeploy reads the fields it shares with Triton (max_batch_size, dynamic_batching's
max_queue_delay_microseconds and default_queue_policy.max_queue_size).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from yatdeploy import graph
from yatdeploy.errors import YatDeployError
from yatdeploy.serving.datatypes import DATATYPES, datatype_of

CONFIG = "config.pbtxt"
# A free-form ModelConfig parameter, which Triton ignores, naming yatdeploy's backend for the model.
BACKEND_PARAMETER = "yatdeploy_backend"
MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_QUEUE_SIZE = 256
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ModelSource:
    name: str
    version: str
    path: Path
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_us: int = 0
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    # yatdeploy's backend for this model (config.pbtxt parameter BACKEND_PARAMETER); None: the server's.
    backend: str | None = None


def model_config_pb2():
    """Triton's ModelConfig protobuf module, as shipped in tritonclient (without its gRPC extra)."""
    try:
        import tritonclient
    except ImportError:
        raise YatDeployError("reading config.pbtxt needs tritonclient", "pip install 'yatdeploy[service]'") from None
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("yatdeploy_triton_model_config_pb2", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise YatDeployError(f"tritonclient has no {path.name}; reinstall tritonclient")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(path: Path):
    from google.protobuf import text_format

    config = model_config_pb2().ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except text_format.ParseError as exc:
        raise YatDeployError(f"{path}: not a valid Triton model config: {exc}") from None
    return config


def check_model_name(name: str) -> str:
    if not _NAME.match(name):
        raise YatDeployError(f"model name {name!r}: use letters, digits, '_', '.' and '-' only")
    return name


def _model_file(version_dir: Path) -> Path | None:
    for name in (MODEL_FILE, PLAN_FILE):
        if (version_dir / name).is_file():
            return version_dir / name
    return None


def discover(path: str | Path) -> list[ModelSource]:
    """The models at `path`: one .onnx file (served under its stem), or a Triton-style repository."""
    path = Path(path)
    if not path.exists():
        raise YatDeployError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".plan":
            return [ModelSource(path.stem, "1", path, backend="tensorrt")]
        if path.suffix != ".onnx":
            raise YatDeployError(f"{path}: expected an .onnx file, a TensorRT .plan or a model repository folder")
        return [ModelSource(path.stem, "1", path)]
    sources = []
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        versions = sorted((int(v.name), v) for v in folder.iterdir() if v.is_dir() and v.name.isdigit()
                          and _model_file(v) is not None)
        if not versions:
            continue
        version, version_dir = versions[-1]  # Triton's default policy: the latest version
        model_file = _model_file(version_dir)
        source = ModelSource(folder.name, str(version), model_file,
                             backend="tensorrt" if model_file.name == PLAN_FILE else None)
        if (folder / CONFIG).is_file():
            config = parse_config(folder / CONFIG)
            if config.name and config.name != folder.name:
                raise YatDeployError(f"{folder / CONFIG}: name {config.name!r} differs from its folder {folder.name!r}")
            if config.max_batch_size > 0:
                source.max_batch_size = config.max_batch_size
            if config.HasField("dynamic_batching"):
                source.max_queue_delay_us = int(config.dynamic_batching.max_queue_delay_microseconds)
                queue = config.dynamic_batching.default_queue_policy.max_queue_size
                if queue > 0:
                    source.max_queue_size = int(queue)
            if BACKEND_PARAMETER in config.parameters:
                source.backend = config.parameters[BACKEND_PARAMETER].string_value
        sources.append(source)
    if not sources:
        raise YatDeployError(f"{path}: no models (expected <model>/<version>/{MODEL_FILE} or {PLAN_FILE})")
    return sources


_TRITON_TYPES = {name: "TYPE_" + ("STRING" if name == "BYTES" else name) for name in DATATYPES}


def _dims(value: onnx.ValueInfoProto) -> list[int]:
    return graph.dims(value)[1:]  # without the batch dimension


def _tensor_entries(values) -> str:
    from yatdeploy import dtypes

    return _entries([(v.name, dtypes.by_onnx(v.type.tensor_type.elem_type).name, _dims(v)) for v in values])


def _entries(tensors: list[tuple[str, str, list[int]]]) -> str:
    """config.pbtxt tensor entries from (name, yatdeploy dtype name, dims without the batch)."""
    from yatdeploy import dtypes

    entries = []
    for name, dtype, dims in tensors:
        datatype = datatype_of(dtypes.by_name(dtype).numpy)
        text = ", ".join(str(d) for d in dims)
        entries.append(f'  {{\n    name: "{name}"\n    data_type: {_TRITON_TYPES[datatype]}\n    dims: [ {text} ]\n  }}')
    return ",\n".join(entries)


def config_text(name: str, model: onnx.ModelProto, *, op_library: Path | None, max_batch_size: int,
                max_queue_delay_us: int = 0, max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    inputs = graph.graph_inputs(model)
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + _tensor_entries(inputs) + "\n]",
        "output [\n" + _tensor_entries(model.graph.output) + "\n]",
        "dynamic_batching {\n"
        f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
        f"  default_queue_policy {{ max_queue_size: {max_queue_size} }}\n"
        "}",
        "instance_group [ { kind: KIND_CPU, count: 1 } ]",
    ]
    if op_library is not None:
        # Triton's ONNX Runtime backend registers this library in every session of the model.
        lines.append(f'model_operations {{ op_library_filename: "{op_library}" }}')
    return "\n".join(lines) + "\n"


def write_repository(repository: str | Path, name: str, onnx_path: str | Path, *, op_library: Path | None,
                     max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, version: int = 1) -> Path:
    """Copy an exported model into `<repository>/<name>/<version>/model.onnx` with its config.pbtxt."""
    check_model_name(name)
    if max_batch_size < 1:
        raise YatDeployError(f"--max-batch-size {max_batch_size}: must be at least 1")
    model = onnx.load(str(onnx_path), load_external_data=False)
    if not graph.model_has_batch_dim(model):
        raise YatDeployError("a repository model needs a dynamic batch dimension (export without --static-batch)")
    folder = Path(repository) / name
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / str(version) / MODEL_FILE)
    config = config_text(name, model, op_library=op_library, max_batch_size=max_batch_size)
    (folder / CONFIG).write_text(config)
    if _has_tritonclient():  # check it against Triton's own schema when that is at hand
        parse_config(folder / CONFIG)
    return folder


def _has_tritonclient() -> bool:
    return importlib.util.find_spec("tritonclient") is not None


def engine_config_text(name: str, signature, *, max_queue_delay_us: int = 0,
                       max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE) -> str:
    """config.pbtxt for a TensorRT engine (yatdeploy.trt.engine.EngineSignature)."""
    batching = graph.has_batch_dim(signature.inputs[0].shape)
    strip = 1 if batching else 0

    def entries(tensors) -> str:
        return _entries([(t.name, t.dtype, t.shape[strip:]) for t in tensors])

    lines = [
        f'name: "{name}"',
        'platform: "tensorrt_plan"',
        # YatGemm runs as yatdeploy's ahead-of-time plugin, whose kernel is inside the engine: Triton needs
        # no plugin library for it (no LD_PRELOAD, no --backend-config=tensorrt,plugins=...).
        f"max_batch_size: {signature.profile.max if batching else 0}",
        "input [\n" + entries(signature.inputs) + "\n]",
        "output [\n" + entries(signature.outputs) + "\n]",
    ]
    if batching:
        lines.append("dynamic_batching {\n"
                     f"  max_queue_delay_microseconds: {max_queue_delay_us}\n"
                     f"  default_queue_policy {{ max_queue_size: {max_queue_size} }}\n"
                     "}")
    lines += [
        "instance_group [ { kind: KIND_GPU, count: 1 } ]",
        f'parameters {{ key: "{BACKEND_PARAMETER}" value {{ string_value: "tensorrt" }} }}',
    ]
    return "\n".join(lines) + "\n"


def write_engine_repository(repository: str | Path, name: str, engine_path: str | Path, version: int = 1) -> Path:
    """Copy an engine and its signature into `<repository>/<name>/<version>/model.plan` with a config.pbtxt."""
    from yatdeploy.trt.engine import EngineSignature, signature_path

    check_model_name(name)
    engine_path = Path(engine_path)
    signature = EngineSignature.read(engine_path)
    if signature.profile.min > 1 and graph.has_batch_dim(signature.inputs[0].shape):
        raise YatDeployError(f"{engine_path}: its profile starts at batch {signature.profile.min}; Triton sends "
                             "batches from 1 (rebuild with --min-batch 1)")
    folder = Path(repository) / name
    target = folder / str(version) / PLAN_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(engine_path, target)
    shutil.copyfile(signature_path(engine_path), signature_path(target))
    (folder / CONFIG).write_text(engine_config_text(name, signature))
    if _has_tritonclient():
        parse_config(folder / CONFIG)
    return folder
