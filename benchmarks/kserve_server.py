"""The KServe baseline of benchmarks/bench_serving.py: KServe's own Python ModelServer (kserve 0.21, the `test`
extra) serving the same ONNX file through the same ONNX Runtime session yatdeploy serve opens (the ort-cpu backend:
the custom-op library's YatGemm kernels, the same intra-op threads), so the two servers differ only in what stands
between the socket and session.run: KServe's REST/gRPC v2 data plane against yatdeploy's.

    python benchmarks/kserve_server.py MODEL.onnx --http-port 8080 --grpc-port 8081 [--threads 1]

Runs until stopped (SIGTERM / Ctrl-C). It can't share a process with tritonclient.grpc (both define the protobuf
package `inference`), so bench_serving.py starts it as a subprocess.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

from yatdeploy import backends


class OnnxModel(Model):
    """One ONNX file on yatdeploy's ort-cpu runner, answering KServe's v2 protocol."""

    def __init__(self, name: str, path: Path, threads: int) -> None:
        super().__init__(name)
        self.runner = backends.get("ort-cpu").open(path, backends.Options(intra_op_threads=threads,
                                                                           allow_spinning=False))
        self.ready = True

    @staticmethod
    def _types(tensors) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in tensors]

    def get_input_types(self) -> list[dict]:
        return self._types(self.runner.inputs)

    def get_output_types(self) -> list[dict]:
        return self._types(self.runner.outputs)

    def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        feeds = {tensor.name: tensor.as_numpy() for tensor in payload.inputs}
        outputs = self.runner.run(feeds)
        infer_outputs = []
        for signature, array in zip(self.runner.outputs, outputs):
            output = InferOutput(signature.name, list(array.shape), signature.datatype)
            output.set_data_from_numpy(np.ascontiguousarray(array), binary_data=payload.use_binary_outputs)
            infer_outputs.append(output)
        return InferResponse(payload.id or "", self.name, infer_outputs, use_binary_outputs=payload.use_binary_outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--name", help="the model's name (default: the file's stem)")
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--grpc-port", type=int, default=8081)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    args = parser.parse_args()
    model = OnnxModel(args.name or args.model.stem, args.model, args.threads)
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_latency_logging=False)
    # As yatdeploy serve runs in the benchmark (--log-level warning): no access log, no per-request trace lines.
    for name in ("kserve.trace", "uvicorn.access", "kserve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main()
