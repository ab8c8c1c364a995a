"""Logging and tracing (serving.tracing): Triton's logging and trace extensions over HTTP and gRPC with the real
tritonclient against `yatdeploy serve`, their settings checked and honoured (the access log silenced, requests
traced one in trace_rate while trace_count lasts, spans written to the trace file), and the OpenTelemetry spans of
a request in process, collected by the SDK's in-memory exporter: a request span, a child of the client's
traceparent, with its decode, queue, compute and encode children."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
pytest.importorskip("opentelemetry.sdk", reason="tracing needs opentelemetry-sdk (the service extra)")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from tests.servers import Server  # noqa: E402
from tests.test_serving_core import rows, running, served  # noqa: E402

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _body(x: np.ndarray, request_id: str) -> dict:
    return {"id": request_id, "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                          "data": x.ravel().tolist()}]}


def _http(core):
    import httpx

    from yatdeploy.serving.app import create_app

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://core")


def _by_name(spans) -> dict:
    return {span.name: span for span in spans}


# --- in process ----------------------------------------------------------------------------------------------

def test_a_traced_http_request_is_a_child_of_its_traceparent_with_queue_and_compute_spans(exported_mlp):
    exporter = InMemorySpanExporter()

    async def scenario():
        async with running(served(exported_mlp.onnx)) as core, _http(core) as client:
            core.tracing.add_exporter(exporter)
            untraced = await client.post("/v2/models/mlp/infer", json=_body(rows(2), "before"))
            assert untraced.status_code == 200 and exporter.get_finished_spans() == ()  # tracing is off by default
            answer = await client.post("/v2/trace/setting", json={"trace_level": ["TIMESTAMPS"], "trace_rate": "1"})
            assert answer.status_code == 200 and answer.json()["trace_level"] == ["TIMESTAMPS"]
            answer = await client.post("/v2/models/mlp/infer", json=_body(rows(3), "r-1"),
                                       headers={"traceparent": TRACEPARENT})
            assert answer.status_code == 200

    asyncio.run(scenario())
    spans = _by_name(exporter.get_finished_spans())
    assert sorted(spans) == ["compute", "decode", "encode", "http infer mlp", "queue"]
    request = spans["http infer mlp"]
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID and request.parent.is_remote
    assert dict(request.attributes) == {"model_name": "mlp", "model_version": "", "transport": "http",
                                        "request_id": "r-1", "batch_size": 3}
    for name in ("decode", "queue", "compute", "encode"):
        child = spans[name]
        assert child.parent.span_id == request.context.span_id and child.context.trace_id == request.context.trace_id
        assert request.start_time <= child.start_time <= child.end_time <= request.end_time
    # laid end to end, in the request's order
    assert spans["decode"].end_time == spans["queue"].start_time
    assert spans["queue"].end_time == spans["compute"].start_time
    assert spans["compute"].end_time <= spans["encode"].start_time


def test_a_traced_grpc_request_takes_its_traceparent_from_the_metadata_and_a_failure_is_an_error_span(
        exported_mlp):
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2

    from yatdeploy.serving.grpc_service import InferenceServicer
    from yatdeploy.serving.protocol import BodyBudget

    class Context:
        def invocation_metadata(self):
            return (("traceparent", TRACEPARENT), ("user-agent", "test"))

        async def abort(self, code, details):
            self.code = code
            raise RuntimeError(details)

    def message(x: np.ndarray) -> service_pb2.ModelInferRequest:
        built = service_pb2.ModelInferRequest(model_name="mlp", id="g-1", raw_input_contents=[x.tobytes()])
        built.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        return built

    exporter = InMemorySpanExporter()

    async def scenario():
        async with running(served(exported_mlp.onnx)) as core:
            core.tracing.add_exporter(exporter)
            core.tracing.update({"trace_level": ["TENSORS"], "trace_rate": ["1"]}, "mlp")
            servicer = InferenceServicer(core, BodyBudget(1 << 20))
            await servicer.ModelInfer(message(rows(2)), Context())
            with pytest.raises(RuntimeError):
                await servicer.ModelInfer(message(rows(2)[:, :8]), Context())

    asyncio.run(scenario())
    requests = [s for s in exporter.get_finished_spans() if s.name == "grpc infer mlp"]
    assert len(requests) == 2
    ok, failed = requests
    assert format(ok.parent.span_id, "016x") == PARENT_ID and format(ok.context.trace_id, "032x") == TRACE_ID
    assert ok.attributes["batch_size"] == 2 and list(ok.attributes["inputs"]) == ["input:FP32[2, 16]"]
    assert ok.status.is_ok and not failed.status.is_ok and "input 'input'" in failed.status.description
    assert sorted(s.name for s in exporter.get_finished_spans() if s.parent and s.parent.span_id ==
                  ok.context.span_id) == ["compute", "decode", "encode", "queue"]


def test_trace_rate_and_count_decide_which_requests_are_traced(exported_mlp):
    exporter = InMemorySpanExporter()

    async def scenario():
        async with running(served(exported_mlp.onnx)) as core, _http(core) as client:
            core.tracing.add_exporter(exporter)
            answer = await client.post("/v2/models/mlp/trace/setting",
                                       json={"trace_level": ["TIMESTAMPS"], "trace_rate": "2", "trace_count": "3"})
            assert answer.json()["trace_count"] == "3"
            for i in range(10):
                assert (await client.post("/v2/models/mlp/infer", json=_body(rows(1), f"n-{i}"))).status_code == 200
            settings = (await client.get("/v2/models/mlp/trace/setting")).json()
            assert settings["trace_count"] == "0"  # what is left, as Triton reports it
            assert (await client.get("/v2/trace/setting")).json()["trace_level"] == ["OFF"]  # global unchanged
            # an empty POST for a model removes its settings: it follows the global ones (OFF) again
            assert (await client.post("/v2/models/mlp/trace/setting", json={})).json()["trace_level"] == ["OFF"]

    asyncio.run(scenario())
    traced = [s.attributes["request_id"] for s in exporter.get_finished_spans() if s.name == "http infer mlp"]
    assert traced == ["n-0", "n-2", "n-4"]  # the first of every 2, until the count of 3 ran out


@pytest.mark.parametrize("path, body, named", [
    ("/v2/trace/setting", {"trace_rate": "0"}, "trace_rate"),
    ("/v2/trace/setting", {"trace_rate": "often"}, "trace_rate"),
    ("/v2/trace/setting", {"trace_level": ["LOUD"]}, "trace_level"),
    ("/v2/trace/setting", {"trace_level": ["OFF", "TIMESTAMPS"]}, "trace_level"),
    ("/v2/trace/setting", {"trace_count": "-2"}, "trace_count"),
    ("/v2/trace/setting", {"log_frequency": True}, "log_frequency"),
    ("/v2/trace/setting", {"trace_file": "/tmp/x.json"}, "trace_file"),
    ("/v2/trace/setting", {"trace_mode": "opentelemetry"}, "trace_mode"),
    ("/v2/trace/setting", {"sampling": "1"}, "sampling"),
    ("/v2/logging", {"log_info": "yes"}, "log_info"),
    ("/v2/logging", {"log_verbose_level": -1}, "log_verbose_level"),
    ("/v2/logging", {"log_verbose_level": True}, "log_verbose_level"),
    ("/v2/logging", {"log_format": "json"}, "log_format"),
    ("/v2/logging", {"log_file": "/etc/cron.d/x"}, "log_file"),
    ("/v2/logging", {"log_warnings": False}, "log_warnings"),
])
def test_a_wrong_setting_is_refused_with_400_naming_it_and_changes_nothing(exported_mlp, path, body, named):
    async def scenario():
        async with running(served(exported_mlp.onnx)) as core, _http(core) as client:
            before = (await client.get(path)).json()
            answer = await client.post(path, json={"trace_rate": "5", **body} if "trace" in path else body)
            assert answer.status_code == 400 and f"'{named}'" in answer.json()["error"], answer.json()
            assert (await client.get(path)).json() == before  # all or nothing: trace_rate 5 did not apply either

    asyncio.run(scenario())


def test_trace_settings_of_an_unknown_model_are_not_found(exported_mlp):
    async def scenario():
        async with running(served(exported_mlp.onnx)) as core, _http(core) as client:
            answer = await client.get("/v2/models/nope/trace/setting")
            assert answer.status_code == 404 and "nope" in answer.json()["error"]

    asyncio.run(scenario())


# --- end to end: `yatdeploy serve` and the real tritonclient ------------------------------------------------

@pytest.fixture
def files_server(exported_mlp, tmp_path):
    """A server whose clients may name log and trace files in tmp_path/files."""
    (tmp_path / "files").mkdir()
    server = Server(exported_mlp.onnx, "--settings-file-dir", str(tmp_path / "files"))
    yield server, tmp_path / "files"
    server.stop()


def _access_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_log_settings_over_http_and_grpc_are_triton_s_and_honoured(files_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server, files = files_server
    http = httpclient.InferenceServerClient(server.url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert {"logging", "trace"} <= set(http.get_server_metadata()["extensions"])
    assert http.get_log_settings() == {"log_file": "", "log_info": True, "log_warning": True, "log_error": True,
                                       "log_verbose_level": 0, "log_format": "default"}
    x = rows(1)
    inputs = [httpclient.InferInput("input", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(x)

    assert http.update_log_settings({"log_file": "serve.log"})["log_file"] == "serve.log"
    http.infer("mlp", inputs, request_id="logged-1")
    assert [line["id"] for line in _access_lines(files / "serve.log")] == ["logged-1"]

    settings = grpc.update_log_settings({"log_info": False, "log_format": "ISO8601"}, as_json=True)
    assert settings["settings"]["log_info"] == {"bool_param": False}
    assert settings["settings"]["log_format"] == {"string_param": "ISO8601"}
    http.infer("mlp", inputs, request_id="silent")
    assert http.get_log_settings()["log_info"] is False
    http.update_log_settings({"log_info": True})
    http.infer("mlp", inputs, request_id="logged-2")
    text = (files / "serve.log").read_text()
    assert "silent" not in text and "logged-2" in text
    iso_line = next(line for line in text.splitlines() if "logged-2" in line)
    assert iso_line[:4].isdigit() and iso_line[10] == "T" and " I {" in iso_line  # ISO 8601 time, level letter

    for wrong, name in (({"log_file": "../escape.log"}, "log_file"), ({"log_format": "xml"}, "log_format")):
        with pytest.raises(InferenceServerException) as info:
            grpc.update_log_settings(wrong)
        assert "INVALID_ARGUMENT" in str(info.value.status()) and f"'{name}'" in info.value.message()
    assert not (files.parent / "escape.log").exists()
    assert grpc.get_log_settings(as_json=True)["settings"]["log_verbose_level"] == {"uint32_param": 0}


def test_trace_settings_over_http_and_grpc_trace_requests_into_the_trace_file(files_server):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server, files = files_server
    http = httpclient.InferenceServerClient(server.url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    assert http.get_trace_settings() == {"trace_level": ["OFF"], "trace_rate": "1000", "trace_count": "-1",
                                         "trace_file": "", "log_frequency": "0", "trace_mode": "triton"}
    updated = grpc.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"], "trace_rate": "1",
                                                   "trace_file": "trace.json", "log_frequency": "2"}, as_json=True)
    assert updated["settings"]["trace_level"] == {"value": ["TIMESTAMPS"]}
    assert http.get_trace_settings()["trace_file"] == "trace.json"
    model = http.update_trace_settings("mlp", {"trace_count": "2"})
    assert model["trace_count"] == "2" and model["trace_file"] == "trace.json"  # the rest copied from global
    assert grpc.get_trace_settings("mlp", as_json=True)["settings"]["trace_count"] == {"value": ["2"]}

    x = rows(1)
    inputs = [grpcclient.InferInput("input", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(x)
    for i in range(4):
        grpc.infer("mlp", inputs, request_id=f"t-{i}", headers={"traceparent": TRACEPARENT})
    # two traces (the count), written together once log_frequency (2) traces are in, to trace.json.0
    spans = [json.loads(line) for line in (files / "trace.json.0").read_text().splitlines()]
    requests = [s for s in spans if s["name"] == "grpc infer mlp"]
    assert [s["attributes"]["request_id"] for s in requests] == ["t-0", "t-1"]
    assert all(s["context"]["trace_id"] == "0x" + TRACE_ID and s["parent_id"] == "0x" + PARENT_ID for s in requests)
    assert sorted(s["name"] for s in spans) == sorted(["compute", "decode", "encode", "queue", "grpc infer mlp"] * 2)
    assert grpc.get_trace_settings("mlp", as_json=True)["settings"]["trace_count"] == {"value": ["0"]}

    with pytest.raises(InferenceServerException) as info:
        grpc.update_trace_settings(settings={"trace_rate": "zero"})
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "'trace_rate'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        http.update_trace_settings(settings={"trace_file": "/tmp/elsewhere.json"})
    assert info.value.status() == "400" and "'trace_file'" in info.value.message()


def test_without_a_settings_folder_no_client_may_name_a_file(exported_mlp, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    server = Server(exported_mlp.onnx)
    try:
        http = httpclient.InferenceServerClient(server.url)
        for call, setting in ((lambda: http.update_log_settings({"log_file": "serve.log"}), "log_file"),
                              (lambda: http.update_trace_settings(settings={"trace_file": "t.json"}), "trace_file")):
            with pytest.raises(InferenceServerException) as info:
                call()
            assert info.value.status() == "400" and f"'{setting}'" in info.value.message() and \
                "--settings-file-dir" in info.value.message()
        assert http.update_log_settings({"log_file": ""})["log_file"] == ""  # unchanged is fine
    finally:
        server.stop()
