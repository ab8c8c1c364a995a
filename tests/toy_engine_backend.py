"""An engine-building backend for the tests, `toy`: its "engine" is the ONNX model behind a small header (the batch
profile and the signature), run by a plain ONNX Runtime session (YatGemm as the model's ONNX function).

It is one module, registered with one line (backends.register(BACKEND)), as any new engine-building backend is:
then `build-engine --backend toy` builds it, `validate --backend toy --engine` runs it, `build-engine --repository`
writes its entry and `serve` serves that, with nothing else of yatdeploy changed.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from yatdeploy import backends, files, graph
from yatdeploy.errors import OnnxModelError, YatDeployError

NAME = "toy"
SUFFIX = ".toy"
MAGIC = b"YAT-TOY-ENGINE 1\n"  # then one line of JSON (the header), then the ONNX model's bytes


def _read(engine: Path) -> tuple[dict, bytes]:
    """The header and the ONNX bytes of a toy engine; a YatDeployError when the file is not one."""
    data = Path(engine).read_bytes()
    if not data.startswith(MAGIC):
        raise YatDeployError(f"{engine}: not a toy engine")
    header, _, model = data[len(MAGIC):].partition(b"\n")
    return json.loads(header), model


class ToyRunner:
    def __init__(self, engine: Path, intra_op_threads: int) -> None:
        import onnxruntime

        header, model = _read(engine)
        self.inputs = [graph.TensorSignature(**t) for t in header["inputs"]]
        self.outputs = [graph.TensorSignature(**t) for t in header["outputs"]]
        self.min_batch, _, self.max_batch = header["batch_profile"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self._session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = next(iter(feeds.values())).shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise OnnxModelError(f"batch {batch} is outside the toy engine's profile "
                                 f"{self.min_batch}..{self.max_batch}")
        return self._session.run([t.name for t in self.outputs], dict(feeds))

    def yat_gemm_execution(self, nodes: int = 0, runs: int = 0) -> backends.YatGemmExecution:
        return backends.YatGemmExecution("ONNX function", "YatGemm ran as the ONNX function (a toy engine)")


class ToyBuilder:
    suffix = SUFFIX
    options: dict[str, str] = {}  # the batch profile only
    instance_kind = "KIND_CPU"
    repository_refusal = None

    def build(self, onnx_path: Path, output: Path, options: backends.BuildOptions) -> backends.EngineInfo:
        options.refuse_others(NAME, self.options)
        low, opt, high = options.batch_profile
        if not 1 <= low <= opt <= high:
            raise YatDeployError(f"batch profile {low}, {opt}, {high}: the toy engine needs 1 <= min <= opt <= max")
        started = time.perf_counter()
        model = graph.load_onnx(onnx_path)
        header = {"backend": NAME, "batch_profile": [low, opt, high],
                  "inputs": [asdict(graph.signature(v)) for v in graph.graph_inputs(model)],
                  "outputs": [asdict(graph.signature(v)) for v in model.graph.output]}
        files.write_atomically(output, MAGIC + json.dumps(header).encode() + b"\n" + model.SerializeToString())
        return replace(self.read(output), seconds=time.perf_counter() - started)

    def read(self, engine: Path) -> backends.EngineInfo:
        header, _ = _read(engine)
        low, _, high = header["batch_profile"]
        return backends.EngineInfo(
            path=Path(engine), backend=NAME, inputs=[graph.TensorSignature(**t) for t in header["inputs"]],
            outputs=[graph.TensorSignature(**t) for t in header["outputs"]],
            batch_profile=tuple(header["batch_profile"]), files=(Path(engine),),
            summary=f"YatGemm as the ONNX function, batch {low}..{high}, a toy engine")

    def owns(self, engine: Path) -> bool:
        try:
            with open(engine, "rb") as file:
                return file.read(len(MAGIC)) == MAGIC
        except OSError:
            return False


class ToyBackend:
    name = NAME
    description = "a toy engine: the ONNX model behind a header, run by ONNX Runtime"
    default_rank = None
    files = {".onnx": "an ONNX model", SUFFIX: "a toy engine"}
    triton_platform = "yatdeploy_toy"
    triton_backend = "toy"
    builder = ToyBuilder()

    def availability(self) -> str | None:
        return None

    def open(self, model: str | Path | onnx.ModelProto, options: backends.Options) -> ToyRunner:
        engine = options.engine or (Path(model) if Path(model).suffix == SUFFIX else None)
        if engine is None:  # an engine for the ONNX model, built now
            engine = Path(tempfile.mkdtemp(prefix="yatdeploy-toy-")) / f"model{SUFFIX}"
            self.builder.build(Path(model), engine, backends.BuildOptions(
                batch_profile=options.batch_profile or backends.DEFAULT_BATCH_PROFILE))
        return ToyRunner(Path(engine), options.intra_op_threads)


BACKEND = ToyBackend()
