"""The inference service, run for real on 127.0.0.1 and spoken to with the real tritonclient."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")

from tests.servers import Server, export_mlp, reference  # noqa: E402
from yatdeploy.cli import main  # noqa: E402
from yatdeploy.serving.repository import discover, parse_config  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_mlp(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(exported):
    running = Server(exported / "mlp.onnx", "--max-body-mb", "1", "--max-queue-delay-us", "2000")
    yield running
    running.stop()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_with_tritonclient(server, exported, binary):
    client = httpclient.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mlp")
    metadata = client.get_model_metadata("mlp")
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 16]}]
    assert metadata["parameters"]["yat_gemm"] == "custom-op library kernel"
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("mlp", [tensor], outputs=[httpclient.InferRequestedOutput("output", binary_data=binary)],
                          request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("output"), reference(exported / "mlp.onnx", x), rtol=1e-6)
    assert result.get_response()["id"] == "r-1"


@pytest.mark.slow
def test_fp16_model(exported):
    server16 = Server(exported / "mlp16.onnx")
    try:
        client = httpclient.InferenceServerClient(server16.url)
        x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float16)
        for binary in (True, False):
            tensor = httpclient.InferInput("input", list(x.shape), "FP16")
            tensor.set_data_from_numpy(x, binary_data=binary)
            got = client.infer("mlp16", [tensor]).as_numpy("output")
            assert got.dtype == np.float16
            np.testing.assert_allclose(got, reference(exported / "mlp16.onnx", x), rtol=1e-3)
    finally:
        server16.stop()


def _json_request(data, shape=(1, 16), datatype="FP32", name="input") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}).encode()


@pytest.mark.parametrize(
    "path,body,headers,status,message",
    [
        ("/v2/models/mlp/infer", _json_request([0.0] * 16, name="x"), {}, 400, "has no input 'x'"),
        ("/v2/models/mlp/infer", _json_request([0.0] * 15, shape=(1, 15)), {}, 400, "shape [1, 15]"),
        ("/v2/models/mlp/infer", _json_request([0] * 16, datatype="INT32"), {}, 400, "datatype INT32"),
        ("/v2/models/mlp/infer", _json_request([0.0] * 15), {}, 400, "15 values for shape [1, 16]"),
        ("/v2/models/mlp/infer", _json_request([0.0] * 17), {}, 400, "17 values for shape [1, 16]"),
        ("/v2/models/mlp/infer", b'{"inputs": [', {}, 400, "malformed JSON"),
        ("/v2/models/mlp/infer", _json_request([0.0] * 16, shape=(65, 16)), {}, 400, "16 values for shape [65, 16]"),
        ("/v2/models/nope/infer", _json_request([0.0] * 16), {}, 404, "Request for unknown model: 'nope' is not found"),
        ("/v2/models/mlp/infer", b"x" * (2 << 20), {}, 413, "exceeds the limit"),
    ],
    ids=["name", "shape", "datatype", "too-little", "too-much", "malformed", "batch-data", "unknown", "oversized"],
)
def test_bad_requests_get_an_error_naming_the_problem(server, path, body, headers, status, message):
    got_status, payload = server.post(path, body, headers)
    assert got_status == status and message in payload["error"], payload
    assert server.get("/v2/health/ready")[0] == 200  # and the server keeps serving


def test_truncated_binary_payload(server):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    body = header + np.zeros(10, np.float32).tobytes()
    status, payload = server.post("/v2/models/mlp/infer", body, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "ends after 40 of its 64 binary bytes" in payload["error"]
    status, payload = server.post("/v2/models/mlp/infer", body, {"Inference-Header-Content-Length": "99999"})
    assert status == 400 and "Inference-Header-Content-Length is 99999" in payload["error"]


def test_a_batch_larger_than_max_batch_size_is_refused(server):
    x = np.zeros((65, 16), np.float32)
    status, payload = server.post("/v2/models/mlp/infer", _json_request(x.ravel().tolist(), shape=x.shape))
    assert status == 400 and "exceeds the model's max_batch_size 64" in payload["error"]


def test_32_concurrent_clients_each_get_their_own_answer(server, exported):
    inputs = [np.full((1, 16), i / 8.0 - 2.0, np.float32) for i in range(32)]
    expected = reference(exported / "mlp.onnx", np.concatenate(inputs))
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def client_thread(i: int) -> None:
        try:
            client = httpclient.InferenceServerClient(server.url)
            tensor = httpclient.InferInput("input", [1, 16], "FP32")
            tensor.set_data_from_numpy(inputs[i])
            barrier.wait(timeout=30)
            for _ in range(5):
                results[i] = client.infer("mlp", [tensor]).as_numpy("output")
                np.testing.assert_allclose(results[i][0], expected[i], rtol=1e-5)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert len(results) == 32
    stats = httpclient.InferenceServerClient(server.url).get_inference_statistics("mlp")["model_stats"][0]
    assert stats["execution_count"] < stats["inference_count"]  # some requests were batched together


def test_metrics_move(server):
    def count(text: bytes, metric: str) -> float:
        for line in text.decode().splitlines():
            if line.startswith(metric + "{") and 'model="mlp"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = server.get("/metrics")[1]
    client = httpclient.InferenceServerClient(server.url)
    tensor = httpclient.InferInput("input", [2, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 16), np.float32))
    client.infer("mlp", [tensor])
    server.post("/v2/models/mlp/infer", b"{")
    after = server.get("/metrics")[1]
    # Triton's names exactly: no _total suffix (Prometheus' client would add one), TYPE counter.
    for name, grew in (("nv_inference_request_success", 1), ("nv_inference_request_failure", 1)):
        assert count(after, name) == count(before, name) + grew, name
    assert count(after, "nv_inference_count") >= count(before, "nv_inference_count") + 2
    assert "# TYPE nv_inference_request_success counter" in after.decode() and b"_total" not in after
    assert "yatdeploy_queue_duration_seconds_bucket" in after.decode()


@pytest.mark.slow
def test_the_repository_round_trips(exported):
    config = parse_config(exported / "repo" / "mlp" / "config.pbtxt")  # Triton's own ModelConfig schema
    assert config.name == "mlp" and config.backend == "onnxruntime" and config.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [16])]
    assert config.model_operations.op_library_filename[0].endswith("libyatdeploy_ort.so")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    [source] = discover(exported / "repo")
    assert (source.name, source.version, source.max_batch_size) == ("mlp", "1", 64)
    served = Server(exported / "repo")
    try:
        client = httpclient.InferenceServerClient(served.url)
        assert client.get_model_config("mlp")["max_batch_size"] == 64
        tensor = httpclient.InferInput("input", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        assert client.infer("mlp", [tensor]).as_numpy("output").shape == (1, 5)
    finally:
        served.stop()


@pytest.mark.slow
def test_shutdown_drains_in_flight_requests(exported):
    # A 1.5 s batching delay keeps every request in flight long enough to be caught by the SIGTERM.
    served = Server(exported / "mlp.onnx", "--max-queue-delay-us", "1500000")
    client = httpclient.InferenceServerClient(served.url, concurrency=8)
    tensor = httpclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
    pending = [client.async_infer("mlp", [tensor]) for _ in range(8)]
    time.sleep(0.5)
    served.process.terminate()
    answers = [p.get_result(timeout=30).as_numpy("output") for p in pending]
    assert all(a.shape == (1, 5) for a in answers)
    log = served.stop()
    assert "Application shutdown complete" in log


def test_serve_refuses_bad_paths(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "absent.onnx")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "no models" in capsys.readouterr().err


def test_bench_against_a_live_server(server, exported, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "-q", f"http://{server.url}", "--model", "mlp", "--concurrency", "1,4", "--rate", "200",
            "--duration", "1", "--warmup", "0.2", "--onnx", str(exported / "mlp.onnx"), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "c=1" in printed and "c=4" in printed and "r=200/s" in printed and "server overhead" in printed
    import csv

    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert [r["Concurrency"] for r in rows] == ["1", "4", ""]
    for row in rows:
        assert float(row["Inferences/Second"]) > 0 and int(row["Errors"]) == 0
        assert 0 < int(row["p50 latency"]) <= int(row["p90 latency"]) <= int(row["p99 latency"])
        assert row["Server Compute Infer"] != ""  # from the statistics extension
    assert rows[2]["Request Rate"] == "200"
    html = (out / "bench.html").read_text()
    assert html.count("<svg") == 2 and "p99" in html and "inferences/s" in html
    report = json.loads((out / "bench.json").read_text())
    assert report["in_process_p50_us"] > 0 and report["server_overhead_p50_us"] is not None
    assert report["steps"][0]["requests"] > 10


def test_bench_json_payload_and_errors(server, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "-q", f"http://{server.url}", "--model", "mlp", "--concurrency", "2", "--duration", "0.5",
                 "--warmup", "0", "--json-payload", "--out", str(out)]) == 0
    assert main(["bench", "-q", f"http://{server.url}", "--model", "nope", "--out", str(out)]) == 2
    assert "HTTP Error 404" in capsys.readouterr().err
    assert main(["bench", "-q", "ftp://x", "--model", "mlp"]) == 2
    assert main(["bench", "-q", f"http://{server.url}", "--model", "mlp", "--concurrency", "0"]) == 2


@pytest.mark.slow
def test_a_per_model_backend_from_config_and_the_debug_log(exported, tmp_path):
    import shutil as sh

    repo = tmp_path / "repo"
    sh.copytree(exported / "repo", repo)
    config = repo / "mlp" / "config.pbtxt"
    config.write_text(config.read_text() + 'parameters { key: "yatdeploy_backend" value: { string_value: "ort-function" } }\n')
    parse_config(config)  # still a valid Triton config
    served = Server(repo, "--log-level", "debug")
    try:
        client = httpclient.InferenceServerClient(served.url)
        assert client.get_model_metadata("mlp")["parameters"]["backend"] == "ort-function"
        assert client.get_model_metadata("mlp")["parameters"]["yat_gemm"] == "ONNX function"
        tensor = httpclient.InferInput("input", [2, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 16), np.float32))
        client.infer("mlp", [tensor], request_id="logged")
    finally:
        log = served.stop()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(e["id"] == "logged" and e["status"] == 200 and e["batch"] == 2 and e["model"] == "mlp" for e in lines)


@pytest.mark.slow
def test_statistics_carry_every_triton_field_for_one_model_and_for_all(exported):
    """perf_analyzer needs compute_input, compute_infer and compute_output with equal counts; tritonclient's
    get_inference_statistics() without a name asks for every model (GET /v2/models/stats)."""
    repo = exported / "stats-repo"
    for name in ("a", "b"):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.onnx").write_bytes((exported / "mlp.onnx").read_bytes())
    running = Server(repo, wait_for="live")
    try:
        client = httpclient.InferenceServerClient(running.url)
        for rows in (1, 3, 2):
            x = np.ones((rows, 16), np.float32)
            tensor = httpclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("a", [tensor])
        every = client.get_inference_statistics()["model_stats"]
        one = client.get_inference_statistics("a")["model_stats"][0]
        metrics = urllib.request.urlopen(f"http://{running.url}/metrics", timeout=10).read().decode()
    finally:
        running.stop()
    assert sorted(m["name"] for m in every) == ["a", "b"]
    assert next(m for m in every if m["name"] == "b")["inference_stats"]["success"]["count"] == 0
    phases = one["inference_stats"]
    assert set(phases) == {"success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                           "cache_hit", "cache_miss"}
    counts = {phases[p]["count"] for p in ("success", "queue", "compute_input", "compute_infer", "compute_output")}
    assert counts == {3}
    assert all(phases[p]["ns"] > 0 for p in ("success", "compute_input", "compute_infer", "compute_output"))
    assert one["last_inference"] > 0 and one["inference_count"] == 6
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in one["batch_stats"]) == one["inference_count"]
    assert sum(b["compute_infer"]["count"] for b in one["batch_stats"]) == one["execution_count"]
    assert 'nv_inference_compute_input_duration_us{model="a",version="1"}' in metrics
    assert 'nv_inference_compute_output_duration_us{model="a",version="1"}' in metrics
