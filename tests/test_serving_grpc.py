"""The Open Inference Protocol over gRPC, driven with tritonclient.grpc (Triton's own client) and the raw stubs."""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="the gRPC tests need tritonclient[grpc]")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.servers import (  # noqa: E402
    REPO,
    Server,
    export_mlp,
    free_port,
    length_prefixed,
    liveness_during,
    mixed_strings,
    reference,
    strings_repository,
)
from yatdeploy.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # every test starts or asks a server subprocess


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_mlp(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def strings_server(tmp_path_factory):
    running = Server(strings_repository(tmp_path_factory.mktemp("strings")))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server(exported):
    running = Server(exported / "mlp.onnx", "--max-queue-delay-us", "2000", "--max-body-mb", "1")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as connected:
        yield connected


def _inputs(x: np.ndarray, datatype: str = "FP32") -> list:
    tensor = grpcclient.InferInput("input", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return [tensor]


def _status(exc: InferenceServerException) -> str:
    return exc.status()


def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    assert not client.is_model_ready("absent")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "yatdeploy" and "statistics" in server["extensions"]
    metadata = client.get_model_metadata("mlp", as_json=True)
    assert metadata["versions"] == ["1"] and metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "16"]}]
    config = client.get_model_config("mlp", as_json=True)["config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == ["16"]
    assert config["input"][0]["data_type"] == "TYPE_FP32" and "dynamic_batching" in config


def test_infer_matches_onnx_runtime_and_echoes_the_id(client, exported):
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    result = client.infer("mlp", _inputs(x), request_id="grpc-7", outputs=[grpcclient.InferRequestedOutput("output")])
    np.testing.assert_allclose(result.as_numpy("output"), reference(exported / "mlp.onnx", x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.id == "grpc-7" and response.model_name == "mlp" and response.model_version == "1"


def test_http_and_grpc_give_the_same_answer_and_share_the_statistics(server, client):
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    before = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    over_grpc = client.infer("mlp", _inputs(x)).as_numpy("output")
    tensor = httpclient.InferInput("input", [2, 16], "FP32")
    tensor.set_data_from_numpy(x)
    over_http = httpclient.InferenceServerClient(server.url).infer("mlp", [tensor]).as_numpy("output")
    np.testing.assert_array_equal(over_grpc, over_http)
    after = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
    success = lambda stats: int(stats["inference_stats"]["success"]["count"])  # noqa: E731
    assert success(after) == success(before) + 2
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [s["name"] for s in every] == ["mlp"]
    counts = {phase: int(after["inference_stats"][phase].get("count", 0))
              for phase in ("success", "compute_input", "compute_infer", "compute_output")}
    assert len(set(counts.values())) == 1, counts  # perf_analyzer's check: every phase counted once per request


@pytest.mark.parametrize("call,code,message", [
    (lambda c: c.infer("absent", _inputs(np.zeros((1, 16), np.float32))), "StatusCode.NOT_FOUND",
     "Request for unknown model: 'absent' is not found"),
    (lambda c: c.infer("mlp", _inputs(np.zeros((1, 16), np.float32)), model_version="9"), "StatusCode.NOT_FOUND",
     "Request for unknown model: 'mlp' version 9 is not found (served: 1)"),
    (lambda c: c.infer("mlp", _inputs(np.zeros((1, 15), np.float32))), "StatusCode.INVALID_ARGUMENT",
     "input 'input': shape [1, 15], the model takes [-1, 16]"),
    (lambda c: c.infer("mlp", _inputs(np.zeros((1, 16), np.float64), "FP64")), "StatusCode.INVALID_ARGUMENT",
     "datatype FP64, the model takes FP32"),
    (lambda c: c.infer("mlp", _inputs(np.zeros((1, 16), np.float32)), priority=3), "StatusCode.INVALID_ARGUMENT",
     "'priority' parameter asks for request priorities"),
    (lambda c: c.infer("mlp", _inputs(np.zeros((65, 16), np.float32))), "StatusCode.INVALID_ARGUMENT",
     "batch size 65 exceeds the model's max_batch_size 64"),
    (lambda c: c.get_model_metadata("absent"), "StatusCode.NOT_FOUND", "Request for unknown model: 'absent' is not found"),
    (lambda c: c.load_model("mlp"), "StatusCode.INVALID_ARGUMENT", "--model-control-mode explicit"),
], ids=["unknown-model", "unknown-version", "wrong-shape", "wrong-datatype", "priority", "too-large-batch",
        "metadata-unknown", "load-in-mode-none"])
def test_errors_carry_triton_status_codes_and_say_what_is_wrong(client, call, code, message):
    with pytest.raises(InferenceServerException) as caught:
        call(client)
    assert _status(caught.value) == code and message in caught.value.message(), caught.value


def test_a_message_over_the_body_limit_is_refused_by_size(client):
    """--max-body-mb bounds gRPC messages too (gRPC's own check, before anything is decoded)."""
    with pytest.raises(InferenceServerException) as caught:
        client.infer("mlp", _inputs(np.zeros((20_000, 16), np.float32)))  # 1.28 MB of tensor
    assert _status(caught.value) == "StatusCode.RESOURCE_EXHAUSTED", caught.value


def test_failures_are_counted(client):
    before = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]["inference_stats"]
    with pytest.raises(InferenceServerException):
        client.infer("mlp", _inputs(np.zeros((1, 15), np.float32)))
    after = client.get_inference_statistics("mlp", as_json=True)["model_stats"][0]["inference_stats"]
    assert int(after["fail"]["count"]) == int(before.get("fail", {}).get("count", 0)) + 1


def test_typed_contents_and_malformed_raw_contents_through_the_stubs(server, exported):
    """Clients other than tritonclient send InferTensorContents (fp32_contents) instead of raw bytes."""
    x = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="mlp")
        tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 16])
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
        response = stub.ModelInfer(request)
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
        np.testing.assert_allclose(got, reference(exported / "mlp.onnx", x), rtol=1e-5, atol=1e-6)

        short = service_pb2.ModelInferRequest(model_name="mlp")
        short.inputs.add(name="input", datatype="FP32", shape=[2, 16])
        short.raw_input_contents.append(x.tobytes()[:-4])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(short)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents has 124 bytes, shape [2, 16] of FP32 needs 128" in caught.value.details()

        half = service_pb2.ModelInferRequest(model_name="mlp")
        half.inputs.add(name="input", datatype="FP16", shape=[1, 16])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(half)
        assert "FP16 data must be sent as raw_input_contents" in caught.value.details()


def test_32_concurrent_async_requests_each_get_their_own_answer(client, exported):
    inputs = [np.full((1, 16), i / 8.0 - 2.0, np.float32) for i in range(32)]
    expected = reference(exported / "mlp.onnx", np.concatenate(inputs))
    answers: queue.Queue = queue.Queue()
    for i, x in enumerate(inputs):
        client.async_infer("mlp", _inputs(x), callback=lambda result, error, i=i: answers.put((i, result, error)),
                           request_id=str(i))
    for _ in inputs:
        i, result, error = answers.get(timeout=60)
        assert error is None, error
        assert result.get_response().id == str(i)
        np.testing.assert_allclose(result.as_numpy("output")[0], expected[i], rtol=1e-5, atol=1e-6)


def test_shutdown_answers_grpc_requests_in_flight(exported):
    """SIGTERM while gRPC requests wait in a long batching delay: every one is answered, none cancelled (Triton's
    gRPC shutdown cancels in-flight work: its issue #8253)."""
    served = Server(exported / "mlp.onnx", "--max-queue-delay-us", "1500000")
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(served.grpc_url) as connected:
        for i in range(8):
            connected.async_infer("mlp", _inputs(np.full((1, 16), float(i), np.float32)),
                                  callback=lambda result, error, i=i: answers.put((i, result, error)))
        deadline = time.monotonic() + 30
        while served.pending("mlp") < 8:  # every request is in the server's queue before the signal
            assert time.monotonic() < deadline, "the requests did not reach the queue"
            time.sleep(0.05)
        served.process.terminate()
        got = [answers.get(timeout=60) for _ in range(8)]
    assert [error for _, _, error in got] == [None] * 8
    assert all(result.as_numpy("output").shape == (1, 5) for _, result, _ in got)
    assert "Application shutdown complete" in served.stop()


def test_a_stream_answers_every_request_and_reports_errors_in_band(server, exported):
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(server.grpc_url) as streaming:
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        xs = [np.full((1, 16), i / 4.0, np.float32) for i in range(8)]
        for i, x in enumerate(xs):
            streaming.async_stream_infer("mlp", _inputs(x), request_id=f"s{i}")
        streaming.async_stream_infer("mlp", _inputs(np.zeros((1, 3), np.float32)), request_id="bad")
        got, errors = {}, []
        for _ in range(len(xs) + 1):
            result, error = answers.get(timeout=60)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = result.as_numpy("output")
        streaming.stop_stream()
    expected = reference(exported / "mlp.onnx", np.concatenate(xs))
    assert sorted(got) == [f"s{i}" for i in range(8)]
    for i in range(8):
        np.testing.assert_allclose(got[f"s{i}"][0], expected[i], rtol=1e-5, atol=1e-6)
    assert len(errors) == 1 and "shape [1, 3], the model takes [-1, 16]" in str(errors[0])


def test_classification_over_grpc(client):
    x = np.linspace(-2, 2, 16, dtype=np.float32).reshape(1, 16)
    plain = client.infer("mlp", _inputs(x)).as_numpy("output")[0]
    top = client.infer("mlp", _inputs(x), outputs=[grpcclient.InferRequestedOutput("output", class_count=2)])
    labels = top.as_numpy("output")
    assert labels.shape == (1, 2)
    assert [int(label.decode().split(":")[1]) for label in labels[0]] == np.argsort(-plain, kind="stable")[:2].tolist()


def test_strings_booleans_and_int32_over_grpc(strings_server):
    with grpcclient.InferenceServerClient(strings_server.grpc_url) as strings_client:
        text = np.array([["12", "-3"], ["7", "40"]], dtype=object)
        flags = np.array([[True, False], [False, True]])
        inputs = [grpcclient.InferInput("text", [2, 2], "BYTES"), grpcclient.InferInput("flag", [2, 2], "BOOL")]
        inputs[0].set_data_from_numpy(text)
        inputs[1].set_data_from_numpy(flags)
        result = strings_client.infer("strings", inputs)
        assert [v.decode() for v in result.as_numpy("same").ravel()] == ["12", "-3", "7", "40"]
        np.testing.assert_array_equal(result.as_numpy("number"), [[12, -3], [7, 40]])
        np.testing.assert_array_equal(result.as_numpy("negated"), ~flags)


def test_a_taken_grpc_port_is_said_before_loading(exported, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "yatdeploy", "serve", str(exported / "mlp.onnx"), "--port",
                               str(free_port()), "--grpc-port", str(port)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1 port {port}" in done.stderr, done.stderr


def test_grpc_port_0_serves_http_only(exported):
    http_only = Server(exported / "mlp.onnx", "--grpc-port", "0")
    try:
        assert httpclient.InferenceServerClient(http_only.url).is_server_ready()
        with socket.socket() as probe:  # nothing listens where gRPC would have (the test's port is still free)
            assert probe.connect_ex(("127.0.0.1", http_only.grpc_port)) != 0
    finally:
        http_only.stop()


def test_bench_over_grpc_reads_the_servers_statistics(server, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "-q", f"grpc://{server.grpc_url}", "--model", "mlp", "--concurrency", "1,4", "--rate",
                 "100", "--duration", "0.5", "--warmup", "0.1", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [s["concurrency"] for s in report["steps"]] == [1, 4, None]
    for step in report["steps"]:
        assert step["requests"] > 5 and step["errors"] == 0 and step["server_compute_us"] is not None
    assert main(["bench", "-q", f"grpc://{server.grpc_url}", "--model", "mlp", "--json-payload"]) == 2
    assert "--json-payload is for HTTP endpoints" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_bench_sends_valid_strings_and_booleans(strings_server, tmp_path, scheme):
    """The load generator's data fits every datatype: BYTES as digits (the model parses them), BOOL, ints >= 0."""
    url = f"{scheme}://{strings_server.url if scheme == 'http' else strings_server.grpc_url}"
    out = tmp_path / "bench"
    assert main(["bench", "-q", url, "--model", "strings", "--concurrency", "2", "--duration", "0.3", "--warmup",
                 "0", "--out", str(out)]) == 0
    (step,) = json.loads((out / "bench.json").read_text())["steps"]
    assert step["requests"] > 0 and step["errors"] == 0, step


def test_liveness_answers_while_a_large_grpc_request_is_decoded(strings_server):
    """2 million BYTES elements as raw contents (9 MB): decoded off the event loop HTTP shares; the batch is far
    over max_batch_size, so the call ends INVALID_ARGUMENT once the decode ends."""
    blob = length_prefixed(mixed_strings(2_000_000).tolist())
    message = service_pb2.ModelInferRequest(model_name="strings", raw_input_contents=[blob, b"\x01" * 2_000_000])
    message.inputs.add(name="text", datatype="BYTES", shape=[1_000_000, 2])
    message.inputs.add(name="flag", datatype="BOOL", shape=[1_000_000, 2])

    def send() -> grpc.RpcError:
        with grpc.insecure_channel(strings_server.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(message, timeout=300)
        return caught.value

    liveness = liveness_during(strings_server.port, send)
    error = liveness.result
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the model's max_batch_size" in error.details()
    assert liveness.not_blocked(), str(liveness)
