"""Triton's model repository extension: several versions served at once, explicit load and unload, the index;
the pending-request gauge and raw binary requests. Real servers on 127.0.0.1, driven with tritonclient."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.model_zoo import yat_mlp
from tests.test_serving import Server, free_port, reference
from yatdeploy.cli import main


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """mlp: versions 1, 2 and 3 (3 differs from 1 and 2), config version_policy latest 2; other: one version."""
    folder = tmp_path_factory.mktemp("versions")
    torch.save(yat_mlp(), folder / "a.pt")
    torch.save(yat_mlp(hidden=8), folder / "b.pt")
    for name in ("a", "b"):
        assert main(["export", "-q", str(folder / f"{name}.pt"), "-o", str(folder / f"{name}.onnx"), "--input-shape",
                     "1,16", "--no-validate", "--repository", str(folder / "repo"), "--name", name]) == 0
    repo = folder / "repo"
    (repo / "a").rename(repo / "mlp")
    config = (repo / "mlp" / "config.pbtxt").read_text().replace('name: "a"', 'name: "mlp"')
    (repo / "mlp" / "config.pbtxt").write_text(config + "version_policy { latest { num_versions: 2 } }\n")
    (repo / "mlp" / "1").rename(repo / "mlp" / "2")
    shutil.copytree(repo / "mlp" / "2", repo / "mlp" / "1")
    shutil.copytree(repo / "b" / "1", repo / "mlp" / "3")
    (repo / "b").rename(repo / "other")
    (repo / "other" / "config.pbtxt").write_text((repo / "other" / "config.pbtxt").read_text()
                                                 .replace('name: "b"', 'name: "other"'))
    return folder


def _x(rows: int = 2) -> np.ndarray:
    return np.linspace(-1, 1, rows * 16, dtype=np.float32).reshape(rows, 16)


def _infer(client, name: str, version: str = "") -> np.ndarray:
    tensor = httpclient.InferInput("input", [2, 16], "FP32")
    tensor.set_data_from_numpy(_x())
    return client.infer(name, [tensor], model_version=version).as_numpy("output")


def test_the_latest_two_versions_are_served_side_by_side(repository):
    server = Server(repository / "repo")
    try:
        client = httpclient.InferenceServerClient(server.url)
        assert client.get_model_metadata("mlp")["versions"] == ["2", "3"]
        a, b = reference(repository / "a.onnx", _x()), reference(repository / "b.onnx", _x())
        np.testing.assert_allclose(_infer(client, "mlp", "2"), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_infer(client, "mlp", "3"), b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_infer(client, "mlp"), b, rtol=1e-5, atol=1e-6)  # no version: the newest
        assert client.is_model_ready("mlp", "2") and not client.is_model_ready("mlp", "1")
        with pytest.raises(InferenceServerException, match="'mlp' version 1 is not found \\(served: 2, 3\\)"):
            _infer(client, "mlp", "1")
        stats = client.get_inference_statistics("mlp")["model_stats"]
        assert [(s["version"], s["inference_stats"]["success"]["count"]) for s in stats] == [("2", 1), ("3", 2)]
        index = {(e["name"], e.get("version")): e["state"] for e in client.get_model_repository_index()}
        assert index == {("mlp", "2"): "READY", ("mlp", "3"): "READY", ("other", "1"): "READY"}
        with pytest.raises(InferenceServerException, match="--model-control-mode explicit"):
            client.unload_model("other")
    finally:
        server.stop()


def _explicit(repository, tmp_path, load: str) -> tuple[Path, Server]:
    """A copy of the repository (a test may change it) served in explicit mode, `load` loaded at start-up."""
    repo = tmp_path / "repo"
    shutil.copytree(repository / "repo", repo)
    return repo, Server(repo, "--model-control-mode", "explicit", "--load-model", load)


def test_explicit_mode_loads_and_unloads_on_request(repository, tmp_path):
    repo, server = _explicit(repository, tmp_path, "other")
    try:
        client = httpclient.InferenceServerClient(server.url)
        assert client.is_server_ready() and client.is_model_ready("other") and not client.is_model_ready("mlp")
        assert client.get_model_repository_index() == [
            {"name": "mlp"}, {"name": "other", "version": "1", "state": "READY", "reason": ""}]
        with pytest.raises(InferenceServerException, match="model 'mlp' is not loaded"):
            _infer(client, "mlp")

        client.load_model("mlp")
        assert client.get_model_metadata("mlp")["versions"] == ["2", "3"]
        np.testing.assert_allclose(_infer(client, "mlp", "2"), reference(repository / "a.onnx", _x()), rtol=1e-5,
                                   atol=1e-6)

        client.unload_model("other")
        assert not client.is_model_ready("other")
        assert {"name": "other", "state": "UNAVAILABLE", "reason": "unloaded"} in client.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="model 'other' is not loaded \\(unloaded\\)"):
            _infer(client, "other")

        # A reload reads the repository again: a policy of all versions now serves 1, 2 and 3.
        config = repo / "mlp" / "config.pbtxt"
        config.write_text(config.read_text().replace("latest { num_versions: 2 }", "all { }"))
        with grpcclient.InferenceServerClient(server.grpc_url) as grpc_client:  # the same control over gRPC
            grpc_client.load_model("mlp")
            assert grpc_client.get_model_metadata("mlp").versions == ["1", "2", "3"]
            grpc_client.unload_model("mlp")
            assert not grpc_client.is_model_ready("mlp")
            with pytest.raises(InferenceServerException, match="failed to load 'absent'.*not in the repository"):
                grpc_client.load_model("absent")
        # A configuration sent with the load request replaces config.pbtxt for that load (Triton's override).
        client.load_model("mlp", config=json.dumps({"max_batch_size": 4, "version_policy": {"specific": {
            "versions": [2]}}}))
        assert client.get_model_metadata("mlp")["versions"] == ["2"]
        assert client.get_model_config("mlp")["max_batch_size"] == 4
        with pytest.raises(InferenceServerException, match="not a valid Triton model config"):
            client.load_model("mlp", config='{"max_batch_sise": 4}')
        with pytest.raises(InferenceServerException, match="model files sent with the request"):
            client.load_model("mlp", config="{}", files={"file:1/model.onnx": b"onnx"})
        assert client.get_model_metadata("mlp")["versions"] == ["2"]  # failed loads changed nothing
        client.load_model("mlp")  # without one, config.pbtxt again
        assert client.is_model_ready("mlp", "1") and client.get_model_config("mlp")["max_batch_size"] == 64
    finally:
        server.stop()


def test_a_failed_reload_says_why_and_keeps_serving_what_was_served(repository, tmp_path):
    repo, server = _explicit(repository, tmp_path, "*")
    try:
        client = httpclient.InferenceServerClient(server.url)
        assert client.is_model_ready("mlp") and client.is_model_ready("other")
        (repo / "other" / "1" / "model.onnx").write_bytes(b"not a model")
        with pytest.raises(InferenceServerException, match="failed to load 'other'.*does not load"):
            client.load_model("other")
        # A failed reload leaves the served versions as they were, as Triton does.
        assert client.is_model_ready("other")
    finally:
        server.stop()


def test_unload_answers_the_requests_in_flight_first(repository, tmp_path):
    server = Server(repository / "repo", "--model-control-mode", "explicit", "--load-model", "other",
                    "--max-queue-delay-us", "1000000")
    try:
        answers: list = []

        def ask() -> None:
            try:
                answers.append(_infer(httpclient.InferenceServerClient(server.url), "other"))
            except InferenceServerException as exc:
                answers.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while _pending(server, "other") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _pending(server, "other") == 3  # waiting for the 1 s batching delay: Triton's pending count
        httpclient.InferenceServerClient(server.url).unload_model("other")
        for thread in threads:
            thread.join(30)
        assert len(answers) == 3 and all(isinstance(a, np.ndarray) for a in answers), answers
        assert not httpclient.InferenceServerClient(server.url).is_model_ready("other")
        assert _pending(server, "other") is None  # the gauge leaves with the model
    finally:
        server.stop()


def _pending(server: Server, model: str) -> int | None:
    with urllib.request.urlopen(f"http://{server.url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f'nv_inference_pending_request_count{{model="{model}"'):
                return int(float(line.split()[-1]))
    return None


def test_a_raw_binary_request_is_the_only_input_with_its_batch_deduced(repository):
    """Inference-Header-Content-Length: 0: the body is the only input's tensor; outputs come back binary, as
    Triton answers such a request."""
    server = Server(repository / "a.onnx")
    try:
        x = _x(3)
        connection = http.client.HTTPConnection(server.url, timeout=30)
        connection.request("POST", "/v2/models/a/infer", x.tobytes(), {"Inference-Header-Content-Length": "0"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, body
        length = int(response.getheader("Inference-Header-Content-Length"))
        (output,) = json.loads(body[:length])["outputs"]
        assert output["shape"] == [3, 5] and output["parameters"]["binary_data_size"] == 60
        np.testing.assert_allclose(np.frombuffer(body[length:], np.float32).reshape(3, 5),
                                   reference(repository / "a.onnx", x), rtol=1e-5, atol=1e-6)
        status, answer = server.post("/v2/models/a/infer", x.tobytes()[:-4], {"Inference-Header-Content-Length": "0"})
        assert status == 400 and "raw binary request of 188 bytes does not fit input 'input': FP32 of shape " \
                                 "[-1, 16]" in answer["error"]
    finally:
        server.stop()


def test_explicit_mode_refuses_unknown_startup_models(repository, capsys):
    assert main(["serve", "-q", str(repository / "repo"), "--port", str(free_port()), "--grpc-port", "0", "--model-control-mode", "explicit",
                 "--load-model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--load-model nope: no such model" in err and "(models: mlp, other)" in err
    assert main(["serve", "-q", str(repository / "repo"), "--port", str(free_port()), "--grpc-port", "0", "--load-model", "mlp"]) == 2
    assert "--load-model is for --model-control-mode explicit" in capsys.readouterr().err


def test_the_statistics_and_index_are_json_objects(repository):
    """Raw HTTP, as a non-tritonclient client sees them: an empty body for index/load is fine, a bad one a 400."""
    server = Server(repository / "repo")
    try:
        status, answer = server.post("/v2/repository/index", b"")
        assert status == 200 and isinstance(answer, list)
        status, answer = server.post("/v2/repository/index", b'{"ready": "yes"}')
        assert status == 400 and "'ready' must be true or false" in answer["error"]
        status, body = server.get("/v2/models/mlp/versions/3/stats")
        assert status == 200 and [s["version"] for s in json.loads(body)["model_stats"]] == ["3"]
    finally:
        server.stop()
