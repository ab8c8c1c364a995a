"""Conformance with Triton's HTTP behaviour and with KServe's Python client, against a real `yatdeploy serve`.

The checks are the model-agnostic ones of Triton's own HTTP tests (qa/L0_http: http_test.py, python_http_aio_test.py,
the curl checks of test.sh; qa/L0_server_status/server_status_test.py) and of the tritonclient examples that L0_http
runs (simple_http_infer_client.py, simple_http_async_infer_client.py, simple_http_aio_infer_client.py,
simple_http_health_metadata.py, simple_http_string_infer_client.py, simple_http_model_control.py,
reuse_infer_objects_client.py), written afresh in our own words; each test names the Triton check it mirrors.
The models (tests/conformance_models.py) have the interfaces of the ones those checks use ("simple",
"simple_string", "onnx_zero_1_float32") plus a Yat MLP exported by yatdeploy, whose numbers are compared with
ONNX Runtime run directly.

What is already covered by test_serving.py / test_serving_protocol.py (bad datatypes and shapes, body limits,
compression with the sync client, NaN spellings, timeouts, CORS, the access log) is not repeated here.

The last sections hold the checks of the extensions added later (raw binary requests with a header length of 0,
classification, explicit model control, gRPC), and the KServe client, run in a child process.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")

import tritonclient.http.aio as aioclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests import conformance_models  # noqa: E402
from tests.servers import REPO, Server  # noqa: E402

pytestmark = pytest.mark.slow  # the conformance suite: servers as subprocesses, the tritonclient and KServe clients

MODELS = ["identity_fp32", "mlp", "simple", "simple_queue", "simple_string"]
QUEUE_CONFIG = """dynamic_batching {
  max_queue_delay_microseconds: 1000000
  default_queue_policy { max_queue_size: 1 }
}
"""
# simple_http_infer_client.py's inputs: INPUT0 = 0..15, INPUT1 = -1 everywhere.
INPUT0 = np.arange(16, dtype=np.int32)[None]
INPUT1 = np.full((1, 16), -1, np.int32)
# test.sh's curl requests: INPUT0 = INPUT1 = 1..16, so OUTPUT0 = 2, 4, ..., 32 and OUTPUT1 = 0 everywhere.
CURL_VALUES = list(range(1, 17))
CURL_SUM = "[2,4,6,8,10,12,14,16,18,20,22,24,26,28,30,32]"
CURL_DIFFERENCE = "[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]"
# curl -d sends this Content-Type: a server must not take it for a form.
CURL_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    import torch

    from tests.model_zoo import yat_mlp
    from yatdeploy.cli import main

    folder = tmp_path_factory.mktemp("conformance")
    repo = folder / "repo"
    conformance_models.add_sub(repo)
    conformance_models.add_sub(repo, "simple_queue", extra_config=QUEUE_CONFIG)
    conformance_models.add_sub_strings(repo)
    conformance_models.identity_fp32(repo)
    torch.save(yat_mlp(), folder / "mlp.pt")
    assert main(["export", "-q", str(folder / "mlp.pt"), "-o", str(folder / "mlp.onnx"), "--input-shape", "1,16",
                 "--no-validate", "--repository", str(repo), "--name", "mlp"]) == 0
    return repo


@pytest.fixture(scope="module")
def server(repository):
    running = Server(repository)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return httpclient.InferenceServerClient(server.url)


@pytest.fixture(scope="module")
def mlp_reference(repository):
    """ONNX Runtime run directly on the served model.onnx, with the op library its config.pbtxt names
    (model_operations.op_library_filename, as Triton's ONNX Runtime backend registers it). The name may be the path
    the repository will have where Triton runs (e.g. /models/mlp/lib...so): then the copy beside config.pbtxt."""
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repository / "mlp" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    options = ort.SessionOptions()
    for library in config.model_operations.op_library_filename:
        if not Path(library).exists():
            library = str(repository / "mlp" / Path(library).name)
        options.register_custom_ops_library(library)
    session = ort.InferenceSession(str(repository / "mlp" / "1" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


# --- helpers ------------------------------------------------------------------------------------------------------

def _raw(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None
         ) -> tuple[int, dict, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    answer = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    connection.close()
    return answer


def _json_error(status: int, headers: dict, body: bytes) -> str:
    assert headers.get("content-type", "").startswith("application/json"), (status, body[:200])
    return json.loads(body)["error"]


def _curl_body(**extra: object) -> bytes:
    tensors = [{"name": n, "datatype": "INT32", "shape": [1, 16], "data": CURL_VALUES} for n in ("INPUT0", "INPUT1")]
    return json.dumps({**extra, "inputs": tensors}, separators=(",", ":")).encode()


def _simple_inputs(module=httpclient, binary=(False, True), a=INPUT0, b=INPUT1) -> list:
    inputs = [module.InferInput("INPUT0", list(a.shape), "INT32"), module.InferInput("INPUT1", list(b.shape), "INT32")]
    inputs[0].set_data_from_numpy(a, binary_data=binary[0])
    inputs[1].set_data_from_numpy(b, binary_data=binary[1])
    return inputs


def _check_simple(result, a=INPUT0, b=INPUT1) -> None:
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def _live(server: Server) -> bool:
    return _raw(server, "GET", "/v2/health/live")[0] == 200


def _success_count(client, model: str) -> int:
    return client.get_inference_statistics(model)["model_stats"][0]["inference_stats"]["success"]["count"]


# --- health and metadata ------------------------------------------------------------------------------------------

def test_health_and_readiness_with_query_parameters(client):
    """simple_http_health_metadata.py: is_server_live (with query parameters), is_server_ready, is_model_ready;
    python_http_aio_test.py test_is_server_live/ready, test_is_model_ready."""
    assert client.is_server_live(query_params={"test_1": 1, "test_2": 2})
    assert client.is_server_ready()
    for model in MODELS:
        assert client.is_model_ready(model), model
    assert not client.is_model_ready("wrong_model_name")


def test_server_metadata_and_every_advertised_extension_is_served(server, client):
    """server_status_test.py test_basic / python_http_aio_test.py test_get_server_metadata: name, version and the
    extensions list. Clients branch on the extensions, so each one advertised must be a Triton extension name and
    must answer."""
    metadata = client.get_server_metadata()
    assert isinstance(metadata["name"], str) and metadata["name"]
    assert isinstance(metadata["version"], str) and metadata["version"]
    extensions = metadata["extensions"]
    assert isinstance(extensions, list) and len(set(extensions)) == len(extensions)
    probes = {
        "binary_tensor_data": lambda: client.infer("simple", _simple_inputs(binary=(True, True))),
        "statistics": lambda: client.get_inference_statistics("simple"),
        "model_configuration": lambda: client.get_model_config("simple"),
        "model_repository": lambda: client.get_model_repository_index(),
        "system_shared_memory": lambda: client.get_system_shared_memory_status(),
        "cuda_shared_memory": lambda: client.get_cuda_shared_memory_status(),
        "classification": lambda: client.infer("simple", _simple_inputs(), outputs=[
            httpclient.InferRequestedOutput("OUTPUT0", class_count=1)]),
        "schedule_policy": lambda: None,  # a config feature; nothing to call
        "sequence": lambda: None,
        "logging": lambda: client.get_log_settings(),
        "trace": lambda: client.get_trace_settings(),
    }
    for extension in extensions:
        assert extension in probes, f"{extension!r} is not an extension Triton's clients know"
        probes[extension]()  # raises InferenceServerException if the server does not serve it


def test_model_metadata_names_versions_platform_and_tensors(client):
    """server_status_test.py test_model_latest_infer (metadata part) and simple_http_health_metadata.py
    get_model_metadata with query parameters: name, versions, platform, inputs/outputs with -1 for the batch."""
    metadata = client.get_model_metadata("simple", query_params={"test_1": 1, "test_2": 2})
    assert metadata["name"] == "simple"
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "onnxruntime_onnx"
    for kind, names in (("inputs", ["INPUT0", "INPUT1"]), ("outputs", ["OUTPUT0", "OUTPUT1"])):
        assert sorted(t["name"] for t in metadata[kind]) == names
        assert all(t["datatype"] == "INT32" and t["shape"] == [-1, 16] for t in metadata[kind])


def test_a_named_version_is_served_and_reported(client):
    """server_status_test.py test_model_latest_infer: is_model_ready / metadata / infer / statistics for an
    explicit version."""
    assert client.is_model_ready("simple", model_version="1")
    assert client.get_model_metadata("simple", model_version="1")["name"] == "simple"
    _check_simple(client.infer("simple", _simple_inputs(), model_version="1"))
    stats = client.get_inference_statistics("simple", model_version="1")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("simple", "1")]


@pytest.mark.parametrize("call", ["metadata", "infer", "config", "statistics"])
def test_unknown_model_error_names_it_as_triton_does(client, call):
    """simple_http_health_metadata.py, simple_http_infer_client.py, simple_http_aio_infer_client.py and
    server_status_test.py test_unknown_model: the error for a model that does not exist is a 4xx whose message
    starts with "Request for unknown model: 'NAME' is not found" (the examples exit 1 otherwise)."""
    calls = {
        "metadata": lambda: client.get_model_metadata("wrong_model_name"),
        "infer": lambda: client.infer("wrong_model_name", _simple_inputs()),
        "config": lambda: client.get_model_config("wrong_model_name"),
        "statistics": lambda: client.get_inference_statistics("wrong_model_name"),
    }
    with pytest.raises(InferenceServerException) as info:
        calls[call]()
    assert 400 <= int(info.value.status()) < 500
    assert info.value.message().startswith("Request for unknown model: 'wrong_model_name' is not found"), \
        info.value.message()


@pytest.mark.parametrize("call", ["metadata", "infer"])
def test_unknown_version_error_names_it_as_triton_does(client, call):
    """server_status_test.py test_unknown_model_version: "Request for unknown model: 'NAME' version 99 is not
    found"."""
    calls = {
        "metadata": lambda: client.get_model_metadata("simple", model_version="99"),
        "infer": lambda: client.infer("simple", _simple_inputs(), model_version="99"),
    }
    with pytest.raises(InferenceServerException) as info:
        calls[call]()
    assert 400 <= int(info.value.status()) < 500
    assert info.value.message().startswith("Request for unknown model: 'simple' version 99 is not found"), \
        info.value.message()
    assert not client.is_model_ready("simple", model_version="99")


def test_model_config(client):
    """python_http_aio_test.py test_get_model_config and simple_http_model_control.py's config read: Triton's
    ModelConfig as JSON."""
    config = client.get_model_config("simple")
    assert config["name"] == "simple" and config["max_batch_size"] == 8
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])]
    assert [o["name"] for o in config["output"]] == ["OUTPUT0", "OUTPUT1"]
    assert client.get_model_config("identity_fp32")["max_batch_size"] == 0


def test_repository_index_lists_every_model_ready(client):
    """python_http_aio_test.py test_get_model_repository_index / simple_http_model_control.py: one entry per
    model of the repository, with its state."""
    index = client.get_model_repository_index()
    assert sorted(entry["name"] for entry in index) == MODELS
    assert all(entry["state"] == "READY" and entry["version"] == "1" for entry in index)


def test_repository_index_honours_ready_and_refuses_a_bad_ready_value(server):
    """http_test.py test_repository_index_deeply_nested_json: the index request's body {"ready": ...} must hold a
    boolean (400 otherwise, the server staying live); {"ready": true} lists only the ready models."""
    status, headers, body = _raw(server, "POST", "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and sorted(e["name"] for e in json.loads(body)) == MODELS
    status, headers, body = _raw(server, "POST", "/v2/repository/index", b'{"ready": [[[true]]]}')
    assert status == 400, (status, body[:200])
    assert "ready" in _json_error(status, headers, body)
    assert _live(server)


# --- inference with tritonclient ----------------------------------------------------------------------------------

def test_infer_mixing_binary_and_json_tensors(client):
    """simple_http_infer_client.py test_infer: INPUT0 as JSON, INPUT1 as binary, OUTPUT0 asked as binary and
    OUTPUT1 as JSON, with query parameters and an extra header (L0_http runs the C++ examples with -H test:1)."""
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
               httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
    result = client.infer("simple", _simple_inputs(), outputs=outputs, query_params={"test_1": 1, "test_2": 2},
                          headers={"test": "1"})
    _check_simple(result)
    by_name = {o["name"]: o for o in result.get_response()["outputs"]}
    assert by_name["OUTPUT0"]["parameters"]["binary_data_size"] == 64 and "data" not in by_name["OUTPUT0"]
    assert by_name["OUTPUT1"]["data"] == list(range(1, 17))
    assert result.get_response()["model_name"] == "simple"


def test_infer_without_requested_outputs_returns_them_all(client):
    """simple_http_infer_client.py test_infer_no_outputs (tritonclient then asks binary_data_output: true)."""
    result = client.infer("simple", _simple_inputs(), outputs=None)
    _check_simple(result)
    assert sorted(o["name"] for o in result.get_response()["outputs"]) == ["OUTPUT0", "OUTPUT1"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_only_the_requested_output_is_returned(client, binary):
    """Triton's semantics of `outputs`: the response holds exactly the outputs asked for."""
    result = client.infer("simple", _simple_inputs(), outputs=[httpclient.InferRequestedOutput("OUTPUT1", binary)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), INPUT0 - INPUT1)
    assert result.as_numpy("OUTPUT0") is None


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_id_is_echoed(client, binary):
    """The request's id comes back in the response (both with binary outputs and with JSON ones); without an id
    the response has none."""
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary)]
    result = client.infer("simple", _simple_inputs(binary=(binary, binary)), outputs=outputs, request_id="req-42")
    assert result.get_response()["id"] == "req-42"
    assert "id" not in client.infer("simple", _simple_inputs(), outputs=outputs).get_response()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_string_tensors(client, binary):
    """simple_http_string_infer_client.py: BYTES inputs holding decimal numbers, BYTES outputs holding their sum
    and difference, in binary and in JSON (the C++ client's --json-input-data --json-output-data)."""
    a = np.array([[str(v) for v in INPUT0[0]]], dtype=object)
    b = np.array([["1"] * 16], dtype=object)
    inputs = [httpclient.InferInput("INPUT0", [1, 16], "BYTES"), httpclient.InferInput("INPUT1", [1, 16], "BYTES")]
    inputs[0].set_data_from_numpy(a, binary_data=binary)
    inputs[1].set_data_from_numpy(b, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("OUTPUT0", "OUTPUT1")]
    result = client.infer("simple_string", inputs, outputs=outputs)

    def numbers(name):
        return [int(v.decode() if isinstance(v, bytes) else v) for v in result.as_numpy(name).ravel()]

    assert numbers("OUTPUT0") == [v + 1 for v in range(16)]
    assert numbers("OUTPUT1") == [v - 1 for v in range(16)]


def test_async_infer_with_many_requests_in_flight(server):
    """simple_http_async_infer_client.py: async_infer with a client concurrency above 1; every answer is its own
    request's."""
    client = httpclient.InferenceServerClient(server.url, concurrency=4)
    rows = [np.full((1, 16), i, np.int32) for i in range(16)]
    pending = [client.async_infer("simple", _simple_inputs(binary=(True, True), a=row, b=row),
                                  outputs=[httpclient.InferRequestedOutput("OUTPUT0")]) for row in rows]
    for row, request in zip(rows, pending):
        np.testing.assert_array_equal(request.get_result(timeout=60).as_numpy("OUTPUT0"), 2 * row)
    client.close()


def test_reused_infer_objects(client):
    """reuse_infer_objects_client.py (its non-shared-memory part): the same InferInput and InferRequestedOutput
    objects, refilled between calls, give each call's own answer."""
    inputs = _simple_inputs(binary=(True, True))
    outputs = [httpclient.InferRequestedOutput("OUTPUT0"), httpclient.InferRequestedOutput("OUTPUT1")]
    for factor in (1, 2, 3):
        b = INPUT1 * factor
        inputs[1].set_data_from_numpy(b)
        _check_simple(client.infer("simple", inputs, outputs=outputs), INPUT0, b)


def test_statistics_for_one_model_and_for_all(client):
    """simple_http_infer_client.py (len(model_stats) == 1 for one model) and python_http_aio_test.py
    test_get_inference_statistics (every model); a successful inference counts once."""
    before = _success_count(client, "simple")
    client.infer("simple", _simple_inputs())
    one = client.get_inference_statistics("simple")["model_stats"]
    assert len(one) == 1 and one[0]["name"] == "simple" and one[0]["version"] == "1"
    assert one[0]["inference_stats"]["success"]["count"] == before + 1
    every = client.get_inference_statistics()["model_stats"]
    assert sorted(s["name"] for s in every) == MODELS


def test_yat_model_numbers_match_onnxruntime(client, mlp_reference):
    """The numbers of a real Yat model, binary and JSON, against ONNX Runtime run directly."""
    x = np.random.default_rng(7).standard_normal((4, 16)).astype(np.float32)
    want = mlp_reference(x)
    for binary in (True, False):
        tensor = httpclient.InferInput("input", [4, 16], "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        got = client.infer("mlp", [tensor], outputs=[httpclient.InferRequestedOutput("output", binary)])
        np.testing.assert_allclose(got.as_numpy("output"), want, rtol=1e-5, atol=1e-6)


# --- the aio client -----------------------------------------------------------------------------------------------

def test_aio_client_api(server):
    """python_http_aio_test.py: each call of tritonclient.http.aio that the protocol covers (health, metadata,
    config, repository index, statistics)."""

    async def scenario():
        client = aioclient.InferenceServerClient(server.url)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("simple")
            assert (await client.get_server_metadata())["name"]
            assert (await client.get_model_metadata("simple"))["name"] == "simple"
            assert (await client.get_model_config("simple"))["name"] == "simple"
            assert len(await client.get_model_repository_index()) == len(MODELS)
            assert len((await client.get_inference_statistics())["model_stats"]) == len(MODELS)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_aio_infer_sequential_and_gathered_with_compression(server, mlp_reference):
    """simple_http_aio_infer_client.py: infer with and without requested outputs, then several at once with
    asyncio.gather, with the request and response compression it passes through."""
    x = np.random.default_rng(11).standard_normal((8, 16)).astype(np.float32)

    async def scenario():
        client = aioclient.InferenceServerClient(server.url)
        try:
            outputs = [aioclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                       aioclient.InferRequestedOutput("OUTPUT1", binary_data=False)]
            _check_simple(await client.infer("simple", _simple_inputs(aioclient), outputs=outputs,
                                             query_params={"test_1": 1}, headers={"test": "1"}))
            _check_simple(await client.infer("simple", _simple_inputs(aioclient)))
            results = await asyncio.gather(*[
                client.infer("simple", _simple_inputs(aioclient), request_compression_algorithm=request,
                             response_compression_algorithm=response)
                for request in (None, "gzip", "deflate") for response in (None, "gzip", "deflate")])
            for result in results:
                _check_simple(result)
            tensor = aioclient.InferInput("input", [8, 16], "FP32")
            tensor.set_data_from_numpy(x)
            result = await client.infer("mlp", [tensor], request_compression_algorithm="gzip",
                                        response_compression_algorithm="gzip")
            np.testing.assert_allclose(result.as_numpy("output"), mlp_reference(x), rtol=1e-5, atol=1e-6)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_aio_unknown_model_error_names_it_as_triton_does(server):
    """simple_http_aio_infer_client.py: inferring on a wrong model name fails with a message starting with
    "Request for unknown model"."""

    async def scenario():
        client = aioclient.InferenceServerClient(server.url)
        try:
            with pytest.raises(InferenceServerException) as info:
                await client.infer("wrong_model_name", _simple_inputs(aioclient))
            return info.value.message()
        finally:
            await client.close()

    message = asyncio.run(scenario())
    assert message.startswith("Request for unknown model"), message


# --- the wire: test.sh's curl checks and http_test.py ---------------------------------------------------------------

def test_curl_json_request(server):
    """test.sh: a plain JSON request sent by curl -d (Content-Type application/x-www-form-urlencoded) is answered
    JSON with both outputs' data."""
    status, headers, body = _raw(server, "POST", "/v2/models/simple/infer", _curl_body(), CURL_HEADERS)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert "inference-header-content-length" not in headers
    text = body.decode()
    assert text.count(CURL_SUM) == 1 and text.count(CURL_DIFFERENCE) == 1


# (request extras, is OUTPUT0 JSON, is OUTPUT1 JSON), as test.sh's curl checks expect them.
OUTPUT_SELECTION = {
    "binary-and-json": ({"outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}},
                                     {"name": "OUTPUT1", "parameters": {"binary_data": False}}]}, False, True),
    "binary-and-unset": ({"outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}},
                                      {"name": "OUTPUT1"}]}, False, True),
    "binary_data_output": ({"parameters": {"binary_data_output": True}}, False, False),
    # binary_data_output applies to the outputs not named in the request: one named without binary_data is JSON.
    "binary_data_output-and-named": ({"parameters": {"binary_data_output": True},
                                      "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": False}},
                                                  {"name": "OUTPUT1"}]}, True, True),
}


@pytest.mark.parametrize("case", OUTPUT_SELECTION)
def test_curl_binary_output_selection(server, case):
    """test.sh's four curl requests mixing outputs' binary_data and the request's binary_data_output: which
    outputs come back as JSON data and which as binary after the JSON header."""
    extra, sum_in_json, difference_in_json = OUTPUT_SELECTION[case]
    status, headers, body = _raw(server, "POST", "/v2/models/simple/infer", _curl_body(**extra), CURL_HEADERS)
    assert status == 200, body[:300]
    length = int(headers.get("inference-header-content-length", len(body)))
    header = json.loads(body[:length])
    text = body[:length].decode()
    assert (text.count(CURL_SUM) == 1) == sum_in_json, header
    assert (text.count(CURL_DIFFERENCE) == 1) == difference_in_json, header
    binary = [o for o in header["outputs"] if "data" not in o]
    assert sum(o["parameters"]["binary_data_size"] for o in binary) == len(body) - length
    offset = length
    for output in header["outputs"]:  # the binary parts follow in the outputs' order
        if "data" not in output:
            size = output["parameters"]["binary_data_size"]
            values = np.frombuffer(body[offset:offset + size], np.int32).tolist()
            offset += size
            assert values == (json.loads(CURL_SUM) if output["name"] == "OUTPUT0" else json.loads(CURL_DIFFERENCE))


@pytest.mark.parametrize("values", [15, 18], ids=["too-few", "too-many"])
def test_curl_data_not_matching_the_shape_is_a_json_400(server, values):
    """test.sh: INPUT0 with 15 or 18 values for shape [1, 16] gets a 400 whose body is {"error": ...}."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "INT32", "shape": [1, 16],
                                   "data": list(range(1, values + 1))},
                                  {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": CURL_VALUES}]})
    status, headers, answer = _raw(server, "POST", "/v2/models/simple/infer", body.encode(), CURL_HEADERS)
    assert status == 400 and _json_error(status, headers, answer)


@pytest.mark.parametrize("value", ["abc", "-1", "99999999999", "100000"],
                         ids=["not-a-number", "negative", "beyond-int32", "beyond-the-body"])
def test_bad_inference_header_content_length(server, value):
    """http_test.py test_inference_header_content_length_out_of_range (and Triton's GetInferenceHeaderLength
    checks): a header length that is not a number, negative, beyond int32 or beyond the body is a 400 and the
    server stays live."""
    status, headers, body = _raw(server, "POST", "/v2/models/simple/infer", _curl_body(),
                                 {"Inference-Header-Content-Length": value})
    assert status == 400 and "Inference-Header-Content-Length" in _json_error(status, headers, body)
    assert _live(server)


def test_element_count_overflow_is_a_400(server):
    """http_test.py test_buffer_size_overflow: a shape whose element count (or byte size) overflows 64 bits is
    refused with a 400, not a crash."""
    for first in (2**4, 2**2):
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [first, 2**60 + 2], "datatype": "FP32",
                                       "data": [1.0]}]}).encode()
        status, headers, answer = _raw(server, "POST", "/v2/models/identity_fp32/infer", body)
        assert status == 400 and _json_error(status, headers, answer)
    assert _live(server)


def test_a_negative_dimension_is_refused(server):
    """http_test.py test_negative_dimensions: shape [2, -5] is refused with a JSON error (Triton answers 500 with
    "Unable to parse 'shape'"; a 400 is the better status) and the server stays live."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [2, -5], "datatype": "FP32", "data": [1.0]}]})
    status, headers, answer = _raw(server, "POST", "/v2/models/identity_fp32/infer", body.encode())
    assert status in (400, 500) and "shape" in _json_error(status, headers, answer)
    assert _live(server)


def test_duplicate_output_names_are_refused(server):
    """http_test.py test_duplicate_output_names: the same output named twice in `outputs` is a 400 naming it
    (Triton: "output 'OUTPUT0' already exists in request"), and the server stays live."""
    body = _curl_body(outputs=[{"name": "OUTPUT0"}, {"name": "OUTPUT0"}])
    status, headers, answer = _raw(server, "POST", "/v2/models/simple/infer", body)
    assert status == 400, answer[:300]
    assert "OUTPUT0" in _json_error(status, headers, answer)
    assert _live(server)


def _nested(depth: int, value: float) -> list:
    for _ in range(depth):
        value = [value]
    return value


def test_json_nested_beyond_the_depth_limit_is_refused(server):
    """http_test.py test_json_recursion_depth_limit (the refused half): data nested 120 levels deep is a 400 with a
    JSON error; the server stays live."""
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32", "data": _nested(120, 1.0)}]})
    status, headers, answer = _raw(server, "POST", "/v2/models/identity_fp32/infer", body.encode())
    assert status == 400 and _json_error(status, headers, answer)
    assert _live(server)


def _chunked(server: Server, path: str, body: bytes, headers: dict, chunk: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", path)
    for name, value in {**headers, "Transfer-Encoding": "chunked"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    for start in range(0, len(body), chunk):
        part = body[start:start + chunk]
        connection.send(f"{len(part):X}\r\n".encode() + part + b"\r\n")
    connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    answer = response.status, response.read()
    connection.close()
    return answer


@pytest.mark.parametrize("chunk", [1 << 20, 7], ids=["one-chunk", "many-chunks"])
def test_chunked_request_body(server, chunk):
    """http_test.py test_content_encoding_chunked_manually and http_request_many_chunks.py: a body sent with
    Transfer-Encoding: chunked (one chunk, or many small ones), here a JSON header and binary tensor data."""
    data = np.arange(32, dtype=np.float32)
    header = json.dumps({"id": "chunked", "inputs": [{"name": "INPUT0", "shape": [32], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": data.nbytes}}]}).encode()
    status, answer = _chunked(server, "/v2/models/identity_fp32/infer", header + data.tobytes(),
                              {"Inference-Header-Content-Length": str(len(header))}, chunk)
    assert status == 200, answer[:300]
    response = json.loads(answer)
    assert response["id"] == "chunked" and response["outputs"][0]["data"] == data.tolist()


def test_a_full_queue_answers_503(server):
    """http_test.py test_descriptive_status_code: with max_queue_size 1 and a 1 s batching delay, a second request
    while the first waits is refused with 503 (server unavailable); the first is served."""
    first: dict = {}

    def send_first():
        first["answer"] = _raw(server, "POST", "/v2/models/simple_queue/infer", _curl_body())

    thread = threading.Thread(target=send_first)
    thread.start()
    time.sleep(0.3)
    status, headers, body = _raw(server, "POST", "/v2/models/simple_queue/infer", _curl_body())
    thread.join(timeout=30)
    assert status == 503, body[:300]
    assert _json_error(status, headers, body)
    assert first["answer"][0] == 200


# --- the KServe Python SDK (kserve.InferenceRESTClient, protocol v2) -------------------------------------------------
#
# The kserve package can't be imported in a process that has imported tritonclient.grpc (or the other way round):
# both register protobuf package `inference` (KServe's grpc_predict_v2.proto, Triton's grpc_service.proto) and
# protobuf refuses the second ("duplicate symbol 'inference.ServerLiveRequest'"). So the KServe client runs in a
# process of its own, once for the module, and reports what it got as JSON.

KSERVE_SCRIPT = """
import asyncio, json, sys
import numpy as np
import httpx
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

base, x_path = sys.argv[1], sys.argv[2]
x = np.load(x_path)
a = np.arange(16, dtype=np.int32)[None]
b = np.full((1, 16), -1, np.int32)

def outputs(response):
    return {o.name: {"datatype": o.datatype, "shape": list(o.shape), "data": o.as_numpy().ravel().tolist()}
            for o in response.outputs}

async def main():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    got = {}
    try:
        got["health"] = [await client.is_server_live(base), await client.is_server_ready(base),
                         await client.is_model_ready(base, "mlp"),
                         await client.is_model_ready(base, "wrong_model_name")]
        for binary in (False, True):
            tensor = InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            request = InferRequest("mlp", [tensor], request_id="kserve-%d" % binary,
                                   parameters={"binary_data_output": True} if binary else None)
            response = await client.infer(base, request, model_name="mlp")
            got["mlp-binary" if binary else "mlp-json"] = {"id": response.id, "model_name": response.model_name,
                                                           "outputs": outputs(response)}
        inputs = [InferInput("INPUT0", [1, 16], "INT32"), InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(a, binary_data=False)
        inputs[1].set_data_from_numpy(b, binary_data=False)
        got["simple"] = outputs(await client.infer(base, InferRequest("simple", inputs), model_name="simple"))
        try:
            await client.infer(base, InferRequest("wrong_model_name", inputs), model_name="wrong_model_name")
            got["unknown"] = None
        except httpx.HTTPStatusError as error:
            got["unknown"] = {"status": error.response.status_code, "message": str(error)}
    finally:
        await client.close()
    print(json.dumps(got))

asyncio.run(main())
"""
KSERVE_INPUT = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def kserve_results(server, tmp_path_factory) -> dict:
    import importlib.util

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve package (test extra) is not installed")
    x_path = tmp_path_factory.mktemp("kserve") / "x.npy"
    np.save(x_path, KSERVE_INPUT)
    done = subprocess.run([sys.executable, "-c", KSERVE_SCRIPT, f"http://{server.url}", str(x_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kserve_client_health_and_readiness(kserve_results):
    """KServe's InferenceRESTClient(RESTConfig(protocol="v2")): is_server_live, is_server_ready, is_model_ready
    (true for a served model, false for an unknown one). The client has no model-metadata call."""
    assert kserve_results["health"] == [True, True, True, False]


@pytest.mark.parametrize("mode", ["json", "binary"])
def test_kserve_client_infer_matches_onnxruntime(kserve_results, mlp_reference, mode):
    """KServe's InferenceRESTClient.infer with an InferRequest (its JSON carries model_name besides the inputs; with
    binary inputs it sends Inference-Header-Content-Length and asks binary_data_output): the Yat model's numbers
    against ONNX Runtime, and the id echoed."""
    got = kserve_results[f"mlp-{mode}"]
    assert got["id"] == f"kserve-{int(mode == 'binary')}" and got["model_name"] == "mlp"
    output = got["outputs"]["output"]
    assert output["datatype"] == "FP32" and output["shape"] == [3, 5]
    np.testing.assert_allclose(np.array(output["data"], np.float32).reshape(3, 5), mlp_reference(KSERVE_INPUT),
                               rtol=1e-5, atol=1e-6)


def test_kserve_client_int32_infer_and_unknown_model(kserve_results):
    """KServe's client on a two-input INT32 model, and its error for an unknown model: an HTTP 4xx that carries the
    server's JSON error."""
    outputs = kserve_results["simple"]
    assert outputs["OUTPUT0"]["data"] == (INPUT0 + INPUT1).ravel().tolist()
    assert outputs["OUTPUT1"]["data"] == (INPUT0 - INPUT1).ravel().tolist()
    unknown = kserve_results["unknown"]
    assert unknown is not None and 400 <= unknown["status"] < 500 and "wrong_model_name" in unknown["message"]


# --- extensions: raw binary requests (Inference-Header-Content-Length 0), classification, model control, gRPC ---

@pytest.mark.parametrize("count", [8, 32])
def test_raw_binary_request_with_header_length_zero(server, count):
    """http_test.py test_raw_binary / test_raw_binary_longer: a body of raw tensor bytes with
    Inference-Header-Content-Length: 0, for a model with one input of one variable dimension; the answer is binary
    (its header length given) and holds the identity's bytes."""
    data = np.arange(count, dtype=np.float32).tobytes()
    status, headers, body = _raw(server, "POST", "/v2/models/identity_fp32/infer", data,
                                 {"Inference-Header-Content-Length": "0"})
    assert status == 200, body[:300]
    length = int(headers["inference-header-content-length"])
    assert body[length:] == data


def test_raw_binary_request_chunked(server):
    """http_test.py test_content_encoding_chunked_manually: the raw binary request sent chunked."""
    data = np.arange(8, dtype=np.float32).tobytes()
    connection_status, body = _chunked(server, "/v2/models/identity_fp32/infer", data,
                                       {"Inference-Header-Content-Length": "0"}, 1 << 20)
    assert connection_status == 200, body[:300]
    assert body.endswith(data)


def test_raw_binary_request_to_a_model_with_two_inputs_is_refused(server):
    """http_test.py test_multi_inputs: a raw request can't be split between several inputs: a 400 saying so."""
    status, headers, body = _raw(server, "POST", "/v2/models/simple/infer", np.arange(32, dtype=np.int32).tobytes(),
                                 {"Inference-Header-Content-Length": "0"})
    assert status == 400
    assert "raw" in _json_error(status, headers, body).lower()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_class_count(client, mlp_reference, binary):
    """image_client.py -c N (InferRequestedOutput(class_count=N)): the output comes back as BYTES [batch, N] of
    "score:index" strings, best first."""
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    tensor = httpclient.InferInput("input", [2, 16], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor], outputs=[httpclient.InferRequestedOutput("output", binary, class_count=2)])
    [output] = result.get_response()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 2]
    want = mlp_reference(x)
    for row, entries in zip(want, result.as_numpy("output")):
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in entries]
        assert [int(p[1]) for p in parsed] == list(np.argsort(-row)[:2])
        np.testing.assert_allclose([float(p[0]) for p in parsed], np.sort(row)[::-1][:2], rtol=1e-4)


def test_load_and_unload_are_refused_outside_explicit_mode(client):
    """python_http_aio_test.py test_load_model / test_unload_model: without explicit model control, load and
    unload answer an error saying so (Triton: "explicit model load / unload is not allowed if polling is
    enabled"), not a bare 404."""
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as info:
            call("simple")
        assert "explicit" in info.value.message(), info.value.message()
    assert client.is_model_ready("simple")


@pytest.fixture(scope="module")
def explicit_server(tmp_path_factory, repository):
    folder = tmp_path_factory.mktemp("explicit")
    shutil.copytree(repository / "simple", folder / "simple")
    running = Server(folder, "--model-control-mode", "explicit", wait_for="live")
    yield running
    running.stop()


def test_explicit_model_control_load_and_unload(explicit_server):
    """simple_http_model_control.py with --model-control-mode=explicit: the index lists the repository's model
    before it loads; load_model makes it ready and servable; unload_model makes it unready; loading a model the
    repository doesn't have fails with "failed to load"."""
    client = httpclient.InferenceServerClient(explicit_server.url)
    assert [entry["name"] for entry in client.get_model_repository_index()] == ["simple"]
    assert not client.is_model_ready("simple")
    client.load_model("simple")
    assert client.is_model_ready("simple")
    _check_simple(client.infer("simple", _simple_inputs()))
    client.unload_model("simple")
    assert not client.is_model_ready("simple")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("wrong_model_name")
    assert "failed to load" in info.value.message()


def test_explicit_model_control_config_override(explicit_server):
    """simple_http_model_control.py: load_model with a JSON config override changes the served config
    (max_batch_size 16); an override that is not a valid config fails with "failed to load"."""
    client = httpclient.InferenceServerClient(explicit_server.url)
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}')
    assert "failed to load" in info.value.message()
    client.load_model("simple", config='{"max_batch_size":"16"}')
    assert client.get_model_config("simple")["max_batch_size"] == 16
    client.unload_model("simple")


def test_load_with_a_file_name_too_long_for_the_file_system_is_answered_as_triton(explicit_server):
    """simple_grpc_model_control.py: a load whose sent file has a path component over 255 bytes fails as Triton's
    does (it can't write that file into its copy of the model): gRPC INTERNAL / HTTP 500 saying "failed to poll
    from model repository"; any other sent file is refused as unsupported (INVALID_ARGUMENT); the server lives on."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(_grpc_url(explicit_server))
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple", config="{}", files={"file:" + "x" * 256: b"a"})
    assert info.value.status() == "StatusCode.INTERNAL", info.value.status()
    assert "failed to poll from model repository" in info.value.message(), info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.load_model("simple", config="{}", files={"file:1/" + "x" * 255: b"a"})
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value.status()
    assert "not supported" in info.value.message(), info.value.message()
    http = httpclient.InferenceServerClient(explicit_server.url)
    with pytest.raises(InferenceServerException) as info:
        http.load_model("simple", config="{}", files={"file:" + "x" * 256: b"a"})
    assert info.value.status() == "500", info.value.status()
    assert client.is_server_live()


def _grpc_url(server: Server) -> str:
    url = server.grpc_url
    with socket.socket() as probe:
        host, port = url.rsplit(":", 1)
        assert probe.connect_ex((host, int(port))) == 0, f"nothing listens for gRPC on {url}"
    return url


def test_grpc_health_metadata_and_infer(server):
    """simple_grpc_health_metadata.py and simple_grpc_infer_client.py (the gRPC half of server_status_test.py):
    the same protocol over gRPC with tritonclient.grpc."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(_grpc_url(server))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("simple")
    assert client.get_server_metadata().name
    metadata = client.get_model_metadata("simple")
    assert metadata.name == "simple" and [i.name for i in metadata.inputs] == ["INPUT0", "INPUT1"]
    assert client.get_model_config("simple").config.max_batch_size == 8
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(INPUT0)
    inputs[1].set_data_from_numpy(INPUT1)
    result = client.infer("simple", inputs, request_id="grpc-1",
                          outputs=[grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")])
    _check_simple(result)
    assert result.get_response().id == "grpc-1"
    assert len(client.get_inference_statistics("simple").model_stats) == 1
    client.close()


def test_grpc_unknown_model_error_names_it_as_triton_does(server):
    """simple_grpc_health_metadata.py / server_status_test.py test_unknown_model over gRPC: the message starts with
    "Request for unknown model: 'NAME' is not found"."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(_grpc_url(server))
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("wrong_model_name")
    client.close()
    assert info.value.message().startswith("Request for unknown model: 'wrong_model_name' is not found"), \
        info.value.message()


def test_serve_help_names_the_grpc_and_model_control_options():
    """The options the checks above start the server with."""
    done = subprocess.run([sys.executable, "-m", "yatdeploy", "serve", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--grpc-port" in done.stdout and "--model-control-mode" in done.stdout
