"""Small ONNX models shaped like the ones Triton's HTTP tests and client examples use, built with onnx.helper.

They are our own graphs, written to reproduce the *interfaces* Triton's checks rely on (names, datatypes, shapes),
so that the same client calls can be made against `yatdeploy serve`:

- `simple`: INT32 INPUT0, INPUT1 [-1, 16] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1
  (the interface of Triton's "simple" model, used by simple_http_*_client.py).
- `simple_string`: the same on BYTES tensors holding decimal integers (the interface of "simple_string",
  used by simple_http_string_infer_client.py).
- `identity_fp32`: FP32 INPUT0 [-1] -> OUTPUT0, one variable dimension (the interface of "onnx_zero_1_float32",
  used by http_test.py's raw binary requests).
- `identity`: INPUT0 [-1, -1] -> OUTPUT0 of any datatype, batched (the interface of "simple_identity" on BYTES and
  "custom_identity_int32" on INT32).
- `add_sub(..., element=TensorProto.INT8, data_type="TYPE_INT8")`: "simple_int8".
- `image_classifier`: FP32 data_0 [3, 224, 224] (FORMAT_NCHW) -> fc6_1 [1000], no batching (the interface of
  "densenet_onnx", used by grpc_client.py and the image clients, with a label file); the scores are a fixed
  linear map of the channel means, not a trained network.
- `slow_repository`: FP32 x [N, 1] -> y = x after max(x) iterations of a MatMul: a model whose run takes as long as
  its input asks, with each model's batching and queue-policy part of config.pbtxt (the queue-policy tests and
  benchmarks/bench_queue_policy.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8


def _save(nodes, name: str, inputs, outputs, path: Path) -> Path:
    model = helper.make_model(helper.make_graph(nodes, name, inputs, outputs),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _tensors(kind: str, names, data_type: str, dims: str) -> str:
    entries = ",\n".join(f'  {{ name: "{n}" data_type: {data_type} dims: [ {dims} ] }}' for n in names)
    return f"{kind} [\n{entries}\n]\n"


def _config(name: str, max_batch_size: int, inputs, outputs, data_type: str, dims: str) -> str:
    return (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            + _tensors("input", inputs, data_type, dims) + _tensors("output", outputs, data_type, dims))


def add_sub(repository: Path, name: str = "simple", versions: tuple[int, ...] = (1,), extra_config: str = "",
            element: int = TensorProto.INT32, data_type: str = "TYPE_INT32") -> Path:
    value = helper.make_tensor_value_info
    ins = [value(n, element, ["N", 16]) for n in ("INPUT0", "INPUT1")]
    outs = [value(n, element, ["N", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    for version in versions:
        _save(nodes, name, ins, outs, repository / name / str(version) / "model.onnx")
    (repository / name / "config.pbtxt").write_text(
        _config(name, 8, ("INPUT0", "INPUT1"), ("OUTPUT0", "OUTPUT1"), data_type, "16") + extra_config)
    return repository / name


def add_sub_strings(repository: Path, name: str = "simple_string") -> Path:
    value = helper.make_tensor_value_info
    ins = [value(n, TensorProto.STRING, ["N", 16]) for n in ("INPUT0", "INPUT1")]
    outs = [value(n, TensorProto.STRING, ["N", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
             helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
             helper.make_node("Add", ["a", "b"], ["sum"]),
             helper.make_node("Sub", ["a", "b"], ["difference"]),
             helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
             helper.make_node("Cast", ["difference"], ["OUTPUT1"], to=TensorProto.STRING)]
    _save(nodes, name, ins, outs, repository / name / "1" / "model.onnx")
    (repository / name / "config.pbtxt").write_text(
        _config(name, 8, ("INPUT0", "INPUT1"), ("OUTPUT0", "OUTPUT1"), "TYPE_STRING", "16"))
    return repository / name


def identity_fp32(repository: Path, name: str = "identity_fp32") -> Path:
    value = helper.make_tensor_value_info
    _save([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name,
          [value("INPUT0", TensorProto.FLOAT, ["N"])], [value("OUTPUT0", TensorProto.FLOAT, ["N"])],
          repository / name / "1" / "model.onnx")
    (repository / name / "config.pbtxt").write_text(
        _config(name, 0, ("INPUT0",), ("OUTPUT0",), "TYPE_FP32", "-1"))
    return repository / name


def identity(repository: Path, name: str, element: int, data_type: str) -> Path:
    value = helper.make_tensor_value_info
    _save([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name,
          [value("INPUT0", element, ["N", "M"])], [value("OUTPUT0", element, ["N", "M"])],
          repository / name / "1" / "model.onnx")
    (repository / name / "config.pbtxt").write_text(_config(name, 8, ("INPUT0",), ("OUTPUT0",), data_type, "-1"))
    return repository / name


def image_classifier(repository: Path, name: str = "densenet_onnx", classes: int = 1000) -> Path:
    import numpy as np
    from onnx import numpy_helper

    value = helper.make_tensor_value_info
    weights = numpy_helper.from_array(np.linspace(-1, 1, 3 * classes, dtype=np.float32).reshape(3, classes), "w")
    axes = numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["data_0", "axes"], ["means"], keepdims=0),
             helper.make_node("MatMul", ["means", "w"], ["fc6_1"])]
    model = helper.make_model(
        helper.make_graph(nodes, name, [value("data_0", TensorProto.FLOAT, [3, 224, 224])],
                          [value("fc6_1", TensorProto.FLOAT, [classes])], [weights, axes]),
        opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    (repository / name / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(repository / name / "1" / "model.onnx"))
    (repository / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        'input [\n  { name: "data_0" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 224, 224 ] }\n]\n'
        f'output [\n  {{ name: "fc6_1" data_type: TYPE_FP32 dims: [ {classes} ] label_filename: "labels.txt" }}\n]\n')
    (repository / name / "labels.txt").write_text("".join(f"CLASS_{i}\n" for i in range(classes)))
    return repository / name


SLOW_SIZE = 256  # the slow model's MatMul size: about 0.5 ms an iteration on one core here


def slow_model():
    """An ONNX model x [N, 1] -> y = x that runs max(x) iterations of a SLOW_SIZE x SLOW_SIZE MatMul first."""
    from onnx import numpy_helper

    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["w_in", "c"], ["p"]),
         helper.make_node("Tanh", ["p"], ["w_out"])], "step",
        [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []),
         value("w_in", TensorProto.FLOAT, [SLOW_SIZE, SLOW_SIZE])],
        [value("cond_out", TensorProto.BOOL, []), value("w_out", TensorProto.FLOAT, [SLOW_SIZE, SLOW_SIZE])])
    rng = np.random.default_rng(0)
    constants = [numpy_helper.from_array((rng.standard_normal((SLOW_SIZE, SLOW_SIZE)) / SLOW_SIZE**0.5).astype(np.float32), "c"),
                 numpy_helper.from_array(np.eye(SLOW_SIZE, dtype=np.float32), "w0"),
                 numpy_helper.from_array(np.array(True), "true"),
                 numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
             helper.make_node("Loop", ["n", "true", "w0"], ["w"], body=body),
             helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["z"]),  # the loop's work is an output's input: never pruned
             helper.make_node("Add", ["x", "z"], ["y"])]
    graph = helper.make_graph(nodes, "slow", [value("x", TensorProto.FLOAT, ["N", 1])],
                              [value("y", TensorProto.FLOAT, ["N", 1])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def slow_repository(folder: Path, configs: dict[str, str]) -> Path:
    """A repository of slow_model()s: each name with its config.pbtxt's batching part (`configs`' values)."""
    import onnx

    model = slow_model()
    for name, batching in configs.items():
        (folder / name / "1").mkdir(parents=True)
        onnx.save(model, str(folder / name / "1" / "model.onnx"))
        (folder / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "onnxruntime"\n{batching}\n'
            'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
            'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n')
    return folder
