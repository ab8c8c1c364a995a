"""The service's answers to hostile and ill-typed requests, its limits and its start-up errors: a real server on
127.0.0.1, spoken to with the real tritonclient and with raw HTTP (http.client, sockets)."""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")


from tests.servers import (  # noqa: E402
    REPO,
    Server,
    free_port,
    length_prefixed,
    live_status,
    liveness_during,
    mixed_strings,
    strings_repository,
)

INFER = "/v2/models/mlp/infer"
# A server whose ServedModel.run fails with an error no code path expects: the catch-all's case.
FAILING_MODEL_LAUNCHER = """
import sys
from yatdeploy.serving.model import ServedModel

def run(self, feeds):
    raise RuntimeError("injected failure")

ServedModel.run = run
from yatdeploy.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def mlp_onnx(exported_mlp) -> Path:
    return exported_mlp.onnx  # served as "mlp"


@pytest.fixture(scope="module")
def server(mlp_onnx):
    """Default limits: 64 MB bodies, 16 MB of JSON."""
    running = Server(mlp_onnx)
    yield running
    running.stop()


def _request(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None
             ) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    answer = response.status, response.getheader("content-type", ""), response.read()
    connection.close()
    return answer


def _error_of(port: int, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    status, content_type, payload = _request(port, "POST", INFER, body, headers)
    assert content_type == "application/json", (status, payload[:200])
    return status, json.loads(payload)["error"]


def _input(data: object, shape: list[int] | None = None, datatype: str = "FP32", **request: object) -> bytes:
    tensor = {"name": "input", "shape": shape or [1, 16], "datatype": datatype, "data": data}
    return json.dumps({"inputs": [tensor], **request}).encode()


def _binary(shape: list[int], size: object) -> tuple[bytes, dict]:
    """A binary request's JSON (no tensor bytes follow it) and its header."""
    header = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return header, {"Inference-Header-Content-Length": str(len(header))}


def _counts(server: Server) -> tuple[float, int]:
    """nv_inference_request_failure for mlp, and the statistics' fail count."""
    metrics = server.get("/metrics")[1].decode()
    failures = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("nv_inference_request_failure{") and 'model="mlp"' in line)
    stats = json.loads(server.get("/v2/models/mlp/stats")[1])["model_stats"][0]
    return failures, stats["inference_stats"]["fail"]["count"]


ZEROS = [0.0] * 16


# case: (the request: a body, or a body and its headers; what the error says). Cases marked "(refused before)"
# were answered 400 before too (for another reason: yatdeploy serves float models only, so INT*/BOOL data goes
# to a model that refuses the datatype anyway); every other case was answered 200 or a plain-text 500.
BAD_REQUESTS: dict[str, tuple[bytes | tuple[bytes, dict], str]] = {
    "outputs-parameters-list": (_input(ZEROS, outputs=[{"name": "output", "parameters": [1]}]),
                                "output 'output': 'parameters' must be an object"),
    "outputs-parameters-string": (_input(ZEROS, outputs=[{"name": "output", "parameters": "binary"}]),
                                  "output 'output': 'parameters' must be an object"),
    "binary-shape-overflows-int64": (_binary([2**32, 2**32], 0), "has more elements than a tensor can hold"),
    "binary-data-size-bool": (_binary([1, 16], True),  # (refused before)
                              "binary_data_size must be a non-negative integer"),
    "binary-data-output-string": (_input(ZEROS, parameters={"binary_data_output": "false"}),
                                  "'binary_data_output' must be true or false"),
    "binary-data-int": (_input(ZEROS, outputs=[{"name": "output", "parameters": {"binary_data": 0}}]),
                        "'binary_data' must be true or false"),
    "id-number": (_input(ZEROS, id=7), "'id' must be a string"),
    "fp32-null": (_input([None] * 16), "FP32 data holds null values"),
    "fp32-bool": (_input([True] * 16), "FP32 data holds boolean values"),
    "fp32-numeric-string": (_input(["1.5"] * 16), "FP32 data holds the string '1.5'"),
    "fp32-out-of-range": (_input([1e39] * 16), "out of FP32's range"),
    "int32-fraction": (_input([1.5] * 16, datatype="INT32"),  # (refused before)
                       "INT32 data holds non-integer number values"),
    "int32-bool": (_input([True] * 16, datatype="INT32"), "INT32 data holds boolean values"),  # (refused before)
    "int8-out-of-range": (_input([300] * 16, datatype="INT8"), "out of INT8's range"),  # (refused before)
    "uint8-negative": (_input([-1] * 16, datatype="UINT8"), "out of UINT8's range"),  # (refused before)
    "bool-number": (_input([1] * 16, datatype="BOOL"), "BOOL data holds integer values"),  # (refused before)
    "ragged-rows": (_input([[0.0] * 20, [0.0] * 12], shape=[2, 16]),
                    "nested 'data' does not match shape [2, 16] (dimension 1)"),
    "too-deep": (_input([[ZEROS]]), "does not match shape [1, 16] (dimension 1)"),
    "too-shallow": (_input([[0.0] * 8] * 4, shape=[2, 16]), "does not match shape [2, 16] (dimension 0)"),
    "deeper-than-shape": (_input([[[0.0]] * 16] * 2, shape=[2, 16]), "nested deeper than shape [2, 16]"),
    "data-not-a-list": (_input(0.0), "'data' must be a list"),  # (refused before)
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_answers_json_400_naming_it(server, case):
    request, message = BAD_REQUESTS[case]
    body, headers = request if isinstance(request, tuple) else (request, {})
    status, error = _error_of(server.port, body, headers)
    assert status == 400 and message in error, error
    assert live_status(server.port) == 200


@pytest.mark.parametrize("data,shape", [
    (ZEROS, [1, 16]),  # flat
    ([ZEROS], [1, 16]),  # nested as the shape
    ([0.0] * 32, [2, 16]),  # flat, row-major
    ([ZEROS, ZEROS], [2, 16]),
    ([0, 1, "NaN", "Infinity", "-Infinity", *([0.5] * 11)], [1, 16]),  # integers and the non-finite spellings
], ids=["flat", "nested", "flat-2-rows", "nested-2-rows", "integers-and-spellings"])
def test_well_typed_data_flat_or_nested_is_accepted(server, data, shape):
    status, content_type, payload = _request(server.port, "POST", INFER, _input(data, shape=shape))
    assert status == 200, payload
    assert json.loads(payload)["outputs"][0]["shape"] == [shape[0], 5]


def test_every_failure_is_counted(server):
    before = _counts(server)
    for body in (BAD_REQUESTS["outputs-parameters-list"][0], BAD_REQUESTS["fp32-null"][0]):
        assert _error_of(server.port, body)[0] == 400
    header, headers = BAD_REQUESTS["binary-shape-overflows-int64"][0]
    assert _error_of(server.port, header, headers)[0] == 400
    failures, fail_count = _counts(server)
    assert (failures, fail_count) == (before[0] + 3, before[1] + 3)


def _start(command: list[str]) -> tuple[subprocess.Popen, int]:
    """A server process started with `command` + --port, once it is ready."""
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port), "--grpc-port", "0", "--threads", "1"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stdout.read()}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                return process, port
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become ready in 60 s")


@pytest.mark.slow
def test_an_unexpected_error_answers_json_500_is_counted_and_logged_once(mlp_onnx):
    process, port = _start([sys.executable, "-c", FAILING_MODEL_LAUNCHER, "serve", str(mlp_onnx)])
    try:
        status, error = _error_of(port, _input(ZEROS))
        assert status == 500 and error == "internal error: RuntimeError: injected failure"
        status, error = _error_of(port, BAD_REQUESTS["fp32-null"][0])
        assert status == 400
        stats = json.loads(_request(port, "GET", "/v2/models/mlp/stats")[2])["model_stats"][0]
        assert stats["inference_stats"]["fail"]["count"] == 2
        metrics = _request(port, "GET", "/metrics")[2].decode()
        assert 'nv_inference_request_failure{model="mlp",version="1"} 2.0' in metrics
    finally:
        process.terminate()
        log, _ = process.communicate(timeout=30)
    assert log.count("Traceback") == 1 and log.count("RuntimeError: injected failure") == 2, log  # message + traceback
    assert log.count("FP32 data holds null values") == 1, log


@pytest.fixture(scope="module")
def nonfinite_server(tmp_path_factory):
    """y = log(x), x and y FP32 [N, 4]: log(-1) is NaN, log(0) -inf, log(inf) inf."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "nonfinite", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("nonfinite") / "nonfinite.onnx"
    onnx.save(model, path)
    running = Server(path)
    yield running
    running.stop()


def test_nonfinite_outputs_round_trip_through_tritonclient_json(nonfinite_server):
    client = httpclient.InferenceServerClient(nonfinite_server.url)
    tensor = httpclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([[-1.0, 0.0, np.inf, 1.0]], np.float32))  # binary input
    result = client.infer("nonfinite", [tensor], outputs=[httpclient.InferRequestedOutput("y", binary_data=False)])
    assert result.get_response()["outputs"][0]["data"] == ["NaN", "-Infinity", "Infinity", 0.0]
    y = result.as_numpy("y")  # np.array(data, float32) parses the spellings back
    assert y.dtype == np.float32 and np.isnan(y[0, 0]) and y[0, 1] == -np.inf and y[0, 2] == np.inf and y[0, 3] == 0
    # The same spellings in a JSON request.
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": ["Infinity", "NaN", 1.0, "-Infinity"]}]}).encode()
    status, _, payload = _request(nonfinite_server.port, "POST", "/v2/models/nonfinite/infer", body)
    assert status == 200 and json.loads(payload)["outputs"][0]["data"] == ["Infinity", "NaN", 0.0, "NaN"]


def _read_to_end(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_an_oversized_header_is_refused_and_others_are_served(server):
    hostile = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    total = 32 << 20
    sent = 0
    try:
        hostile.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Padding: ")
        while sent < total:
            hostile.sendall(b"a" * (1 << 16))
            sent += 1 << 16
    except OSError:  # the server closed the connection on us
        pass
    try:
        answer = _read_to_end(hostile)
    except ConnectionResetError:
        answer = b""
    hostile.close()
    # Refused before the header's end: a 431, or the connection closed under the sender.
    assert sent < total
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    if answer:
        assert b'"error"' in answer
    assert live_status(server.port) == 200


def test_liveness_answers_while_a_large_json_body_is_parsed(server):
    # 8 million values of JSON (16 MB, just under the JSON limit), a batch far over max_batch_size: the
    # answer is a 400 as soon as the parse ends, so whatever the parse blocks is answered after it.
    values = 8_000_000
    body = (b'{"inputs":[{"name":"input","shape":[%d,16],"datatype":"FP32","data":[' % (values // 16)
            + b"0," * (values - 1) + b"0]}]}")
    big = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    big.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                % (INFER.encode(), len(body)) + body[:-1])
    time.sleep(0.5)  # the server reads what it was sent; the parse starts with the last byte
    big.sendall(body[-1:])
    probe = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    probe.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    live = _read_to_end(probe)
    probe.close()
    assert live.startswith(b"HTTP/1.1 200 ")
    readable, _, _ = select.select([big], [], [], 0)
    assert not readable, "the large request was answered before the liveness probe"
    answer = _read_to_end(big)
    big.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"exceeds the model's max_batch_size" in answer


def test_a_json_body_over_the_json_limit_is_refused(server):
    body = _input([0.0] * (17 << 18), shape=[17 << 14, 16])  # 17 MB of JSON, under the 64 MB body limit
    status, error = _error_of(server.port, body)
    assert status == 413 and "JSON request body" in error and "16777216" in error, error


def _serve_fails(*args: str) -> str:
    """`yatdeploy serve ARGS`: exit status 2 and one line on stderr, returned."""
    done = subprocess.run([sys.executable, "-m", "yatdeploy", "serve", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yatdeploy serve: error: "), done.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["--max-body-mb", "0"], "--max-body-mb 0.0: must be more than 0"),
    (["--max-body-mb", "-1"], "--max-body-mb -1.0: must be more than 0"),
    (["--max-body-mb", "nan"], "--max-body-mb nan"),
    (["--max-inflight-body-mb", "0"], "--max-inflight-body-mb 0.0: must be more than 0"),
    (["--max-inflight-body-mb", "nan"], "--max-inflight-body-mb nan"),
    (["--threads", "0"], "--threads 0: must be between 1 and"),
    (["--threads", "-2"], "--threads -2: must be between 1 and"),
    (["--threads", "100000"], "--threads 100000: must be between 1 and"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address to listen on"),
    (["--host", "999.1.1.1"], "--host 999.1.1.1: not an address to listen on"),
    (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1 port"),  # TEST-NET-1: no interface has it
], ids=["body-0", "body-negative", "body-nan", "inflight-0", "inflight-nan", "threads-0", "threads-negative", "threads-huge", "host-unknown",
        "host-invalid", "host-not-here"])
def test_serve_refuses_bad_settings_with_one_line(mlp_onnx, args, message):
    assert message in _serve_fails(str(mlp_onnx), "--port", str(free_port()), *args)


@pytest.mark.slow
def test_serve_refuses_a_port_in_use(mlp_onnx):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _serve_fails(str(mlp_onnx), "--port", str(port), "--threads", "1")
    assert f"cannot listen on 127.0.0.1 port {port}: Address already in use" in line


# --- compression (Content-Encoding / Accept-Encoding), as tritonclient sends and asks for it -----------------

@pytest.mark.parametrize("request_encoding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("response_encoding", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests_and_responses_with_tritonclient(server, mlp_onnx, request_encoding, response_encoding,
                                                             binary):
    import onnxruntime as ort
    import tritonclient.http as httpclient

    x = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)  # a response worth compressing
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = httpclient.InferenceServerClient(server.url).infer(
        "mlp", [tensor], outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
        request_compression_algorithm=request_encoding, response_compression_algorithm=response_encoding)
    want = ort.InferenceSession(str(mlp_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(result.as_numpy("output"), want, rtol=1e-4, atol=1e-5)


def test_a_response_is_compressed_only_when_asked_and_worth_it(server):
    import gzip
    import zlib

    body = _input(np.ones((64, 16)).tolist(), [64, 16])
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    for accept, expected in (("gzip, deflate", "gzip"), ("deflate", "deflate"), ("br", None), ("", None)):
        connection.request("POST", INFER, body=body, headers={"Accept-Encoding": accept} if accept else {})
        response = connection.getresponse()
        payload = response.read()
        assert response.status == 200 and response.getheader("Content-Encoding") == expected, accept
        if expected is not None:
            payload = gzip.decompress(payload) if expected == "gzip" else zlib.decompress(payload)
        assert json.loads(payload)["outputs"][0]["shape"] == [64, 5]
    connection.request("POST", INFER, body=_input([0.0] * 16), headers={"Accept-Encoding": "gzip"})
    response = connection.getresponse()
    response.read()
    assert response.getheader("Content-Encoding") is None  # a small answer goes out as it is
    connection.close()


@pytest.mark.slow
def test_bad_compressed_bodies_get_clear_errors(tmp_path, mlp_onnx):
    import gzip
    import zlib

    running = Server(mlp_onnx, "--max-body-mb", "1")
    try:
        bomb = gzip.compress(b" " * (20 << 20))  # 20 MB of spaces in ~20 KB
        assert len(bomb) < 1 << 20
        status, message = _error_of(running.port, bomb, {"Content-Encoding": "gzip"})
        assert (status, message) == (413, "the JSON request body, decompressed, exceeds the limit of 1048576 bytes")
        status, message = _error_of(running.port, b"not gzip at all", {"Content-Encoding": "gzip"})
        assert status == 400 and message.startswith("the request body is not gzip data")
        status, message = _error_of(running.port, zlib.compress(_input([0.0] * 16))[:-6],
                                    {"Content-Encoding": "deflate"})
        assert (status, message) == (400, "the deflate request body is truncated")
        status, message = _error_of(running.port, _input([0.0] * 16), {"Content-Encoding": "br"})
        assert (status, message) == (415, "Content-Encoding 'br' is not supported (gzip, deflate or identity)")
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = raw.compress(_input([0.0] * 16)) + raw.flush()
        status, _, _ = _request(running.port, "POST", INFER, body, {"Content-Encoding": "deflate"})
        assert status == 200  # raw deflate, as some clients send it
    finally:
        running.stop()


# --- request parameters: timeout honoured; scheduling yatdeploy has not refused, never ignored ---------------

@pytest.mark.slow
def test_the_timeout_parameter_is_honoured(mlp_onnx):
    """A lone request waits up to the 0.5 s batching delay for company: a 1 ms timeout expires first."""
    running = Server(mlp_onnx, "--max-queue-delay-us", "500000")
    try:
        status, message = _error_of(running.port, _input([0.0] * 16, parameters={"timeout": 1000}))
        assert (status, message) == (503, "Request timeout expired")  # Triton's status and words
        status, _, payload = _request(running.port, "POST", INFER, _input([0.0] * 16, parameters={"timeout": 10**7}))
        assert status == 200, payload
        failures = json.loads(_request(running.port, "GET", "/v2/models/mlp/stats")[2])["model_stats"][0]
        assert failures["inference_stats"]["fail"]["count"] == 1
    finally:
        running.stop()


@pytest.mark.parametrize("parameters,message", [
    ({"priority": 2}, "'priority' parameter asks for request priorities"),
    ({"sequence_id": 7}, "'sequence_id' parameter asks for sequence batching"),
    ({"sequence_id": "session-a"}, "'sequence_id' parameter asks for sequence batching"),
    ({"sequence_start": True}, "'sequence_start' parameter asks for sequence batching"),
    ({"timeout": "1s"}, "'timeout' parameter must be a number of microseconds >= 0, not '1s'"),
    ({"timeout": -5}, "'timeout' parameter must be a number of microseconds >= 0, not -5"),
])
def test_scheduling_parameters_yatdeploy_does_not_have_are_refused(server, parameters, message):
    status, error = _error_of(server.port, _input([0.0] * 16, parameters=parameters))
    assert status == 400 and message in error


def test_unset_scheduling_parameters_are_accepted(server):
    unset = {"priority": 0, "sequence_id": 0, "sequence_start": False, "sequence_end": False, "timeout": 0}
    assert _request(server.port, "POST", INFER, _input([0.0] * 16, parameters=unset))[0] == 200


def test_classification_sends_the_top_classes_as_value_index_strings(server):
    """Triton's classification extension: `classification: N` on an output answers BYTES [batch, N] of
    "value:index", largest first, from the same numbers the plain output has."""
    rows = [[0.1 * i - 0.4 * j for i in range(16)] for j in range(2)]
    plain = json.loads(_request(server.port, "POST", INFER, _input(rows, shape=[2, 16]))[2])["outputs"][0]
    values = np.array(plain["data"], np.float32).reshape(plain["shape"])
    body = json.dumps({"inputs": json.loads(_input(rows, shape=[2, 16]))["inputs"],
                       "outputs": [{"name": "output", "parameters": {"classification": 3}}]}).encode()
    status, _, payload = _request(server.port, "POST", INFER, body)
    assert status == 200, payload
    (output,) = json.loads(payload)["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    for row, labels in zip(values, np.array(output["data"]).reshape(2, 3)):
        top = np.argsort(-row, kind="stable")[:3]
        assert [int(label.split(":")[1]) for label in labels] == top.tolist()
        assert [float(label.split(":")[0]) for label in labels] == pytest.approx(row[top].tolist(), abs=1e-6)
    body = json.dumps({"inputs": json.loads(_input([0.0] * 16))["inputs"],
                       "outputs": [{"name": "output", "parameters": {"classification": -1}}]}).encode()
    status, error = _error_of(server.port, body)
    assert status == 400 and "'classification' must be a number of classes >= 0, not -1" in error


# --- every datatype: strings (BYTES), bools and integers in and out ------------------------------------------

@pytest.fixture(scope="module")
def strings_server(tmp_path_factory):
    running = Server(strings_repository(tmp_path_factory.mktemp("strings")))
    yield running
    running.stop()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bytes_bool_and_int32_tensors_with_tritonclient(strings_server, binary):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(strings_server.url)
    metadata = client.get_model_metadata("strings")
    assert [i["datatype"] for i in metadata["inputs"]] == ["BYTES", "BOOL"]
    assert [o["datatype"] for o in metadata["outputs"]] == ["BYTES", "INT32", "BOOL"]
    assert [i["data_type"] for i in client.get_model_config("strings")["input"]] == ["TYPE_STRING", "TYPE_BOOL"]
    text = np.array([["12", "3"], ["40", "-7"], ["0", "99"]], dtype=object)
    flag = np.array([[True, False], [False, True], [True, True]])
    inputs = [httpclient.InferInput("text", [3, 2], "BYTES"), httpclient.InferInput("flag", [3, 2], "BOOL")]
    inputs[0].set_data_from_numpy(text, binary_data=binary)
    inputs[1].set_data_from_numpy(flag, binary_data=binary)
    result = client.infer("strings", inputs, outputs=[httpclient.InferRequestedOutput(n, binary_data=binary)
                                                      for n in ("same", "number", "negated")])
    same = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("same").ravel()]
    assert same == list(text.ravel())
    np.testing.assert_array_equal(result.as_numpy("number"), text.astype(np.int32))
    np.testing.assert_array_equal(result.as_numpy("negated"), ~flag)


def _strings_error(port: int, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    status, content_type, payload = _request(port, "POST", "/v2/models/strings/infer", body, headers)
    assert content_type == "application/json", (status, payload[:200])
    return status, json.loads(payload)["error"]


def _bytes_request(blob: bytes, shape: list[int]) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": [
        {"name": "text", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}},
        {"name": "flag", "shape": shape, "datatype": "BOOL", "data": [True] * int(np.prod(shape))}]}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("blob,message", [
    (b"\x02\x00\x00\x00ab\x01\x00", "BYTES element 1 has a truncated length"),
    (b"\x09\x00\x00\x00ab", "BYTES element 0 claims 9 bytes, 2 follow"),
    (b"\x02\x00\x00\x00\xff\xfe", "BYTES element 0 is not UTF-8 text"),
    (b"\x01\x00\x00\x001", "1 BYTES elements for 2 in its shape"),
])
def test_bad_binary_bytes_are_refused_naming_the_element(strings_server, blob, message):
    body, headers = _bytes_request(blob, [1, 2])
    status, error = _strings_error(strings_server.port, body, headers)
    assert status == 400 and message in error, error


def test_json_bytes_must_be_strings(strings_server):
    body = json.dumps({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "BYTES", "data": [1, 2]},
                                  {"name": "flag", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]}]})
    status, error = _strings_error(strings_server.port, body.encode())
    assert status == 400 and "BYTES data holds integer values (strings expected)" in error


# --- the access log and CORS ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_one_json_access_log_line_per_request_at_info(mlp_onnx, tmp_path):
    running = Server(mlp_onnx, log=tmp_path / "serve.log")
    try:
        assert _request(running.port, "POST", INFER, _input([0.0] * 16, id="ok-1"))[0] == 200
        assert _error_of(running.port, _input([None] * 16, id="bad-1"))[0] == 400
    finally:
        running.stop()
    lines = [json.loads(line[line.index("{"):]) for line in running.output().splitlines()
             if '"latency_us"' in line]
    # (a request refused while it is read has no id the server can vouch for)
    assert [(entry["id"], entry["model"], entry["status"]) for entry in lines] == [("ok-1", "mlp", 200),
                                                                                  (None, "mlp", 400)]
    assert all(entry["time"].endswith("+00:00") and entry["latency_us"] > 0 for entry in lines)
    assert "error" not in lines[0] and "FP32 data holds null values" in lines[1]["error"]
    assert running.output().count("FP32 data holds null values") == 1  # logged once, in its access line


@pytest.mark.slow
def test_cors_is_off_by_default_and_allows_the_origins_given(mlp_onnx):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    plain = Server(mlp_onnx)
    allowed = Server(mlp_onnx, "--cors-origin", "http://localhost:3000")
    try:
        connection = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=30)
        connection.request("POST", INFER, body=_input([0.0] * 16), headers={"Origin": "http://localhost:3000"})
        response = connection.getresponse()
        response.read()
        assert response.getheader("Access-Control-Allow-Origin") is None
        connection = http.client.HTTPConnection("127.0.0.1", allowed.port, timeout=30)
        connection.request("OPTIONS", INFER, headers=preflight)
        response = connection.getresponse()
        response.read()
        assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
        connection.request("POST", INFER, body=_input([0.0] * 16), headers={"Origin": "http://localhost:3000"})
        response = connection.getresponse()
        response.read()
        assert response.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
    finally:
        plain.stop()
        allowed.stop()


# --- nothing holds the event loop: BYTES tensors and large answers are decoded and encoded off it -------------

@pytest.fixture(scope="module")
def identity_server(tmp_path_factory):
    """text (BYTES [-1] -> same) and copy (FP32 [-1] -> same), max_batch_size 0: any number of elements runs."""
    import onnx
    from onnx import TensorProto, helper

    repository = tmp_path_factory.mktemp("identity")
    for name, element, datatype in (("text", TensorProto.STRING, "TYPE_STRING"),
                                    ("copy", TensorProto.FLOAT, "TYPE_FP32")):
        (repository / name / "1").mkdir(parents=True)
        value = helper.make_tensor_value_info
        model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], name,
                                                    [value("x", element, ["N"])], [value("y", element, ["N"])]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.save(model, str(repository / name / "1" / "model.onnx"))
        (repository / name / "config.pbtxt").write_text(
            f'name: "{name}"\nmax_batch_size: 0\ninput [ {{ name: "x" data_type: {datatype} dims: [ -1 ] }} ]\n'
            f'output [ {{ name: "y" data_type: {datatype} dims: [ -1 ] }} ]\n')
    running = Server(repository)
    yield running
    running.stop()


def test_liveness_answers_while_bytes_are_decoded(strings_server):
    """9 MB of 2 million BYTES elements (stalled liveness for seconds when decoded on the event loop); the batch
    is far over max_batch_size, so the answer is a 400 once the decode ends."""
    blob = length_prefixed(mixed_strings(2_000_000).tolist())
    header = json.dumps({"inputs": [
        {"name": "text", "shape": [1_000_000, 2], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}},
        {"name": "flag", "shape": [1_000_000, 2], "datatype": "BOOL", "parameters": {"binary_data_size": 2_000_000}},
    ]}).encode()
    body, headers = header + blob + b"\x01" * 2_000_000, {"Inference-Header-Content-Length": str(len(header))}
    liveness = liveness_during(strings_server.port, lambda: _strings_error(strings_server.port, body, headers))
    status, error = liveness.result
    assert status == 400 and "batch size 1000000 exceeds the model's max_batch_size" in error, error
    assert liveness.not_blocked(), str(liveness)


@pytest.mark.parametrize("case", ["bytes-binary", "bytes-json", "fp32-json-gzip"])
def test_liveness_answers_while_an_answer_is_encoded(identity_server, case):
    """A whole round trip of a large tensor (decode, run, encode, compress); every answer is checked. BYTES stays
    at 250,000 elements: ONNX Runtime's own conversion of a string tensor holds the GIL (~50 ns an element)."""
    import gzip

    if case.startswith("bytes"):
        values = mixed_strings(250_000)
        blob, model = length_prefixed(values.tolist()), "text"
        datatype = "BYTES"
    else:
        values = np.arange(2_000_000, dtype=np.float32) / 8  # 8 MB
        blob, model = values.tobytes(), "copy"
        datatype = "FP32"
    binary_out = case == "bytes-binary"
    header = json.dumps({"inputs": [{"name": "x", "shape": [len(values)], "datatype": datatype,
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": binary_out}}]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))}
    if case.endswith("gzip"):
        headers["Accept-Encoding"] = "gzip"

    def send() -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", identity_server.port, timeout=300)
        connection.request("POST", f"/v2/models/{model}/infer", body=header + blob, headers=headers)
        response = connection.getresponse()
        answer = response.status, dict(response.getheaders()), response.read()
        connection.close()
        return answer

    liveness = liveness_during(identity_server.port, send)
    status, answer_headers, payload = liveness.result
    assert status == 200, payload[:300]
    if answer_headers.get("content-encoding") == "gzip":
        payload = gzip.decompress(payload)
    if binary_out:
        length = int(answer_headers["inference-header-content-length"])
        assert payload[length:] == blob
    else:
        (output,) = json.loads(payload)["outputs"]
        assert output["shape"] == [len(values)] and output["data"] == values.tolist()
    assert liveness.not_blocked(), str(liveness)


def test_bytes_tensors_round_trip_through_the_binary_form():
    from yatdeploy.serving.protocol import InvalidInput, tensor_bytes, tensor_from_bytes

    for values in (mixed_strings(70_001), np.array([""] * 70_000, object), np.array(["abc"] * 3, object),
                   np.array(["é"] * 5, object), np.array([], object)):
        blob = tensor_bytes(values)
        assert blob == length_prefixed(values.tolist())
        decoded = tensor_from_bytes(blob, "BYTES", values.shape, "t")
        assert decoded.dtype == object and decoded.tolist() == values.tolist()
        assert all(type(v) is str for v in decoded.tolist())
    # Elements of one length but not text, or not as many as the shape says: the element-by-element messages.
    for blob, message in ((b"\x01\x00\x00\x00a" * 2 + b"\x01\x00\x00\x00\xff", "element 2 is not UTF-8"),
                          (b"\x00\x00\x00\x00" * 4, "4 BYTES elements for 3 in its shape"),
                          (b"\x02\x00\x00\x00ab" * 2 + b"\x02\x00\x00\x00a", "element 2 claims 2 bytes, 1 follow"),
                          (b"\x00\x00\x00\x00" * 2 + b"\x00\x00", "element 2 has a truncated length"),
                          (b"\x01\x00\x00\x00a" * 2 + b"\x01\x00\x00\x00\x00", None)):  # NUL is text: read one by one
        if message is None:
            assert tensor_from_bytes(blob, "BYTES", (3,), "t").tolist() == ["a", "a", "\x00"]
            continue
        with pytest.raises(InvalidInput) as caught:
            tensor_from_bytes(blob, "BYTES", (3,), "t")
        assert message in caught.value.message, caught.value.message


# --- request bodies in flight are bounded: past --max-inflight-body-mb, 503 at once --------------------------

def _hold_upload(port: int, declared: int, sent: bytes, headers: dict | None = None) -> socket.socket:
    """A request whose Content-Length says `declared` bytes, of which only `sent` go out: the server holds it."""
    held = socket.create_connection(("127.0.0.1", port), timeout=120)
    lines = "".join(f"{key}: {value}\r\n" for key, value in (headers or {}).items())
    held.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {declared}\r\n{lines}\r\n"
                 .encode() + sent)
    return held


def _answer_of(connection: socket.socket) -> tuple[int, dict]:
    answer = _read_to_end(connection)
    connection.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.slow
def test_request_bodies_past_the_in_flight_limit_get_503_at_once(mlp_onnx):
    import gzip

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    running = Server(mlp_onnx, "--max-body-mb", "16", "--max-inflight-body-mb", "16")
    try:
        held = _hold_upload(running.port, 12 << 20, b"\x00" * (1 << 20))  # 12 MB announced, 1 MB sent
        time.sleep(0.5)
        # 8 MB more is past the 16 MB: refused before its body is read (none of it is ever sent here).
        refused = _hold_upload(running.port, 8 << 20, b"")
        status, answer = _answer_of(refused)
        assert status == 503 and "request bodies in flight" in answer["error"], answer
        # A gzip bomb of 16 KB counts by what it inflates to: refused once the 16 MB are reached, not at its own
        # 16 MB limit (413).
        status, message = _error_of(running.port, gzip.compress(b" " * (15 << 20)), {"Content-Encoding": "gzip"})
        assert status == 503 and "request bodies in flight" in message, (status, message)
        # gRPC messages count in the same budget: UNAVAILABLE, as Triton answers a full queue.
        with grpcclient.InferenceServerClient(running.grpc_url) as client:
            tensor = grpcclient.InferInput("input", [64, 20 << 10], "FP32")
            tensor.set_data_from_numpy(np.zeros((64, 20 << 10), np.float32))  # 5 MB
            with pytest.raises(InferenceServerException) as caught:
                client.infer("mlp", [tensor])
            assert caught.value.status() == "StatusCode.UNAVAILABLE", caught.value
            assert "request bodies in flight" in caught.value.message()
            # The held request ends: the budget is free again.
            held.sendall(b"\x00" * (11 << 20))
            status, answer = _answer_of(held)
            assert status == 400, answer
            with pytest.raises(InferenceServerException) as caught:
                client.infer("mlp", [tensor])
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value  # the model's shape
        header, headers = _binary([131072, 16], 8 << 20)
        status, message = _error_of(running.port, header + b"\x00" * (8 << 20), headers)
        assert status == 400 and "exceeds the model's max_batch_size" in message, message
    finally:
        running.stop()


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) << 10


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_concurrent_large_bodies_and_gzip_bombs_keep_the_server_s_memory_bounded(mlp_onnx):
    """Eight 23 MB bodies and ten gzip bombs at once against a 48 MB budget: some are refused with 503, and the
    server's peak RSS grows by a small multiple of the budget (~60 MB here), not by the sum of the bodies (~410 MB
    before)."""
    import gzip
    import threading

    running = Server(mlp_onnx, "--max-body-mb", "24", "--max-inflight-body-mb", "48")
    try:
        before = _peak_rss_bytes(running.process.pid)
        header, headers = _binary([23 << 14, 16], 23 << 20)
        large = header + b"\x00" * (23 << 20)  # under the 24 MB limit
        bomb = gzip.compress(b" " * (32 << 20))  # 32 KB
        answers: list[tuple[int, str]] = []

        def send(body: bytes, extra: dict) -> None:
            answers.append(_error_of(running.port, body, extra))

        threads = [threading.Thread(target=send, args=(large, headers)) for _ in range(8)]
        threads += [threading.Thread(target=send, args=(bomb, {"Content-Encoding": "gzip"})) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        added = _peak_rss_bytes(running.process.pid) - before
    finally:
        running.stop()
    statuses = sorted(status for status, _ in answers)
    assert len(answers) == 18 and set(statuses) <= {400, 413, 503}, answers
    assert 503 in statuses, statuses
    assert all("request bodies in flight" in message for status, message in answers if status == 503), answers
    assert added < 160 << 20, f"the server's peak RSS grew by {added >> 20} MB"
