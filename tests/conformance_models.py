"""Small ONNX models shaped like the ones Triton's HTTP tests and client examples use, built with onnx.helper.

They are our own graphs, written to reproduce the *interfaces* Triton's checks rely on (names, datatypes, shapes),
so that the same client calls can be made against `yatdeploy serve`:

- `simple`: INT32 INPUT0, INPUT1 [-1, 16] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1
  (the interface of Triton's "simple" model, used by simple_http_*_client.py).
- `simple_string`: the same on BYTES tensors holding decimal integers (the interface of "simple_string",
  used by simple_http_string_infer_client.py).
- `identity_fp32`: FP32 INPUT0 [-1] -> OUTPUT0, one variable dimension (the interface of "onnx_zero_1_float32",
  used by http_test.py's raw binary requests).
"""

from __future__ import annotations

from pathlib import Path

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


def add_sub(repository: Path, name: str = "simple", versions: tuple[int, ...] = (1,), extra_config: str = "") -> Path:
    value = helper.make_tensor_value_info
    ins = [value(n, TensorProto.INT32, ["N", 16]) for n in ("INPUT0", "INPUT1")]
    outs = [value(n, TensorProto.INT32, ["N", 16]) for n in ("OUTPUT0", "OUTPUT1")]
    nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
             helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"])]
    for version in versions:
        _save(nodes, name, ins, outs, repository / name / str(version) / "model.onnx")
    (repository / name / "config.pbtxt").write_text(
        _config(name, 8, ("INPUT0", "INPUT1"), ("OUTPUT0", "OUTPUT1"), "TYPE_INT32", "16") + extra_config)
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
