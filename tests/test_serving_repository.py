"""Triton's model repository extension: several versions served at once, explicit load and unload, the index;
the pending-request gauge and raw binary requests. Real servers on 127.0.0.1, driven with tritonclient."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.model_zoo import yat_mlp
from tests.servers import Server, free_port, reference
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
        while server.pending("other") < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.pending("other") == 3  # waiting for the 1 s batching delay: Triton's pending count
        httpclient.InferenceServerClient(server.url).unload_model("other")
        for thread in threads:
            thread.join(30)
        assert len(answers) == 3 and all(isinstance(a, np.ndarray) for a in answers), answers
        assert not httpclient.InferenceServerClient(server.url).is_model_ready("other")
        assert server.pending("other") is None  # the gauge leaves with the model
    finally:
        server.stop()


@pytest.mark.slow
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


@pytest.mark.slow
def test_explicit_mode_refuses_unknown_startup_models(repository, capsys):
    assert main(["serve", "-q", str(repository / "repo"), "--port", str(free_port()), "--grpc-port", "0", "--model-control-mode", "explicit",
                 "--load-model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--load-model nope: no such model" in err and "(models: mlp, other)" in err
    assert main(["serve", "-q", str(repository / "repo"), "--port", str(free_port()), "--grpc-port", "0", "--load-model", "mlp"]) == 2
    assert "--load-model is for --model-control-mode explicit" in capsys.readouterr().err


@pytest.mark.slow
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


# --- default_model_filename and links: nothing outside the repository is served, nothing about it is said ----

# Each is refused, over HTTP and gRPC alike, with one message whatever exists at the place it names.
_NOT_PLAIN = ["../../../outside/secret.onnx", "OUTSIDE_ABSOLUTE", "/etc/passwd", "/etc/no_such_file", "..", ".",
              "1/model.onnx", "..\\..\\outside\\secret.onnx", "  ", "model.onnx\x00.txt"]


@pytest.fixture
def escape_repository(tmp_path):
    """repo/mlp: y = 2x; outside/secret.onnx (outside the repository): y = x - mean(x), another answer."""
    from tests.test_serving_config import add_model, config_text, write_model

    repo = tmp_path / "repo"
    add_model(repo, "mlp", "double", config_text("mlp"))
    write_model(tmp_path / "outside" / "secret.onnx", "centered")
    (tmp_path / "outside" / "folder").mkdir()
    write_model(tmp_path / "outside" / "folder" / "model.onnx", "centered")
    # Links out of the repository: to a file that is there, to one that is not, and a version folder.
    (repo / "mlp" / "1" / "link.onnx").symlink_to(tmp_path / "outside" / "secret.onnx")
    (repo / "mlp" / "1" / "dangling.onnx").symlink_to(tmp_path / "outside" / "no_such_file.onnx")
    # The same links in config.pbtxt, read at start-up.
    for name, extra in (("dotdot", 'default_model_filename: "../../../outside/secret.onnx"'),
                        ("absolute", f'default_model_filename: "{tmp_path / "outside" / "secret.onnx"}"'),
                        ("linked", 'default_model_filename: "link.onnx"')):
        add_model(repo, name, "double", config_text(name, extra=extra))
        (repo / name / "1" / "link.onnx").symlink_to(tmp_path / "outside" / "secret.onnx")
    add_model(repo, "linked_file", "double", config_text("linked_file"))
    (repo / "linked_file" / "1" / "model.onnx").unlink()
    (repo / "linked_file" / "1" / "model.onnx").symlink_to(tmp_path / "outside" / "secret.onnx")
    (repo / "linked_version").mkdir()
    (repo / "linked_version" / "config.pbtxt").write_text(config_text("linked_version"))
    (repo / "linked_version" / "1").symlink_to(tmp_path / "outside" / "folder")
    return tmp_path


def _double_answers(url: str) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = httpclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(httpclient.InferenceServerClient(url).infer("mlp", [tensor]).as_numpy("y"), 2 * x)


def _no_server_path(message: str, root: Path) -> None:
    for path in {str(root), str(root.resolve())}:
        assert path not in message, message


@pytest.mark.slow
def test_a_load_request_serves_nothing_outside_the_model_folder(escape_repository):
    root = escape_repository
    server = Server(root / "repo", "--model-control-mode", "explicit", "--load-model", "mlp")
    try:
        client = httpclient.InferenceServerClient(server.url)
        answers: dict[str, list[str]] = {"http": [], "grpc": []}
        with grpcclient.InferenceServerClient(server.grpc_url) as grpc_client:
            for value in [*_NOT_PLAIN, "link.onnx", "dangling.onnx"]:
                if value == "OUTSIDE_ABSOLUTE":
                    value = str(root / "outside" / "secret.onnx")
                config = json.dumps({"name": "mlp", "max_batch_size": 8, "default_model_filename": value})
                for transport, loader in (("http", client), ("grpc", grpc_client)):
                    with pytest.raises(InferenceServerException) as refused:
                        loader.load_model("mlp", config=config)
                    message = str(refused.value)
                    assert "failed to load 'mlp'" in message, message
                    assert ("link to outside the repository" if value.endswith("link.onnx") or value == "dangling.onnx"
                            else "default_model_filename must be a plain file name") in message, message
                    _no_server_path(message, root)
                    answers[transport].append(message)
                _double_answers(server.url)  # still its own model, never secret.onnx
        for messages in answers.values():
            by_value = dict(zip([*_NOT_PLAIN, "link.onnx", "dangling.onnx"], messages))
            # No existence oracle: a path that exists and one that does not get the very same answer.
            assert by_value["/etc/passwd"] == by_value["/etc/no_such_file"] == by_value["../../../outside/secret.onnx"]
            # A link to a file that is there and one to a file that is not: the same words, each naming its link.
            assert by_value["link.onnx"].replace("link.onnx", "L") == \
                by_value["dangling.onnx"].replace("dangling.onnx", "L")
        assert [m.split(": ", 1)[1] for m in answers["grpc"]] == [m.split(": ", 1)[1] for m in answers["http"]]
        client.load_model("mlp")  # its own config again: loads
        _double_answers(server.url)
    finally:
        server.stop()


@pytest.mark.slow
def test_config_pbtxt_and_links_cannot_reach_outside_the_repository(escape_repository):
    root = escape_repository
    server = Server(root / "repo", wait_for="live", log=root / "server.log")
    try:
        client = httpclient.InferenceServerClient(server.url)
        _double_answers(server.url)
        index = {entry["name"]: entry for entry in client.get_model_repository_index()}
        for name in ("dotdot", "absolute", "linked", "linked_file", "linked_version"):
            entry = index[name]
            assert entry["state"] == "UNAVAILABLE" and f"model '{name}'" in entry["reason"], entry
            _no_server_path(entry["reason"], root)
            status, body = server.get(f"/v2/models/{name}/ready")
            assert status == 503
            _no_server_path(body.decode(), root)
        assert "default_model_filename" in index["dotdot"]["reason"]
        assert index["dotdot"]["reason"] == index["absolute"]["reason"].replace("'absolute'", "'dotdot'")
        assert "outside the repository" in index["linked"]["reason"]
        assert "linked_file/1/model.onnx" in index["linked_file"]["reason"]
        assert "outside the repository" in index["linked_version"]["reason"]
    finally:
        server.stop()


@pytest.mark.slow
def test_a_folder_name_that_is_not_utf8_is_skipped_and_every_endpoint_answers(tmp_path):
    """A model name is text (URLs, JSON, Prometheus labels are UTF-8): a folder whose name is not valid UTF-8 is
    no model. It is skipped with a warning at start-up; the other models, the index, the statistics and /metrics
    answer as without it (/metrics answered 500 for every model)."""
    import os

    from tests.test_serving_config import add_model, config_text, write_model

    repo = tmp_path / "repo"
    add_model(repo, "mlp", "double", config_text("mlp"))
    bad = os.path.join(os.fsencode(repo), b"caf\xe9")  # latin-1, not UTF-8
    os.mkdir(bad)
    os.mkdir(os.path.join(bad, b"1"))
    write_model(Path(os.fsdecode(os.path.join(bad, b"1", b"model.onnx"))), "double")
    server = Server(repo, log=tmp_path / "server.log")
    try:
        _double_answers(server.url)
        status, body = server.get("/metrics")
        assert status == 200 and 'nv_inference_request_success{model="mlp",version="1"} 1.0' in body.decode()
        status, answer = server.post("/v2/repository/index", b"")
        assert status == 200 and [entry["name"] for entry in answer] == ["mlp"]
        status, body = server.get("/v2/models/stats")
        assert status == 200 and [s["name"] for s in json.loads(body)["model_stats"]] == ["mlp"]
        assert httpclient.InferenceServerClient(server.url).is_server_ready()
        with grpcclient.InferenceServerClient(server.grpc_url) as grpc_client:
            assert [m.name for m in grpc_client.get_model_repository_index().models] == ["mlp"]
        assert "skipping folder 'caf\\xe9': its name is not valid UTF-8" in server.output()
    finally:
        server.stop()


def test_a_loaders_message_names_the_model_file_by_its_path_in_the_repository(tmp_path):
    """ONNX Runtime and the other loaders name the file they were given: what a client reads says its path in the
    repository instead, however the server reached it (as given, absolute, through a link)."""
    import os

    from tests.test_serving_config import add_model
    from yatdeploy.serving.repository import discover

    add_model(tmp_path / "repo", "m", "double", None)
    (tmp_path / "alias").symlink_to(tmp_path / "repo")
    [source] = discover(tmp_path / "alias")
    for path in (source.path, source.path.absolute(), Path(os.path.realpath(source.path))):
        assert source.public(f"Load model from {path} failed") == "Load model from m/1/model.onnx failed"
    assert source.public(f"{tmp_path / 'repo'}/m/config.pbtxt: bad") == "m/config.pbtxt: bad"


@pytest.mark.slow
def test_a_hidden_folder_such_as_an_entry_being_written_is_no_model(repository, tmp_path):
    """export --repository stages a new entry in '.<name>.XXXX.partial' beside it (files.staged_folder): a server
    that scans the repository meanwhile must not take it for a model."""
    from yatdeploy.serving.repository import discover

    copy = tmp_path / "repository"
    shutil.copytree(repository / "repo", copy)
    shutil.copytree(copy / "mlp", copy / ".mlp.k2j4.partial")
    assert {source.name for source in discover(copy)} == {"mlp", "other"}
