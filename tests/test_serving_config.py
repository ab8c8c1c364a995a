"""Triton's batching semantics from config.pbtxt, bad configs and bad models, and shutdown, against the real
server on 127.0.0.1 and the real tritonclient."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.servers import Server, free_port  # noqa: E402
from yatdeploy.cli import main  # noqa: E402
from yatdeploy.serving.repository import MAX_QUEUE_DELAY_US  # noqa: E402

# --- models made with onnx.helper ------------------------------------------------------------------------

def write_model(path: Path, kind: str, first_dim: str | int = "batch") -> Path:
    """x [first_dim, 4] -> y [first_dim, 4]: "double" (y = 2x, row by row) or "centered" (y = x - mean of x
    over its first dimension: every row of the answer depends on every row of the request)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [first_dim, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [first_dim, 4])
    if kind == "centered":
        nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0], keepdims=1),
                 helper.make_node("Sub", ["x", "mean"], ["y"])]
        initializers = []
    else:
        nodes = [helper.make_node("Mul", ["x", "two"], ["y"])]
        initializers = [numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    model = helper.make_model(helper.make_graph(nodes, kind, [x], [y], initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


REFERENCE: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "double": lambda x: 2 * x,
    "centered": lambda x: x - x.mean(axis=0, keepdims=True),
}


def config_text(name: str, *, max_batch_size: int = 8, dims: str = "4", batching: str = "",
                runtime: str = 'backend: "onnxruntime"', input_name: str = "x", data_type: str = "TYPE_FP32",
                output_dims: str | None = None, extra: str = "") -> str:
    return (f'name: "{name}"\n{runtime}\nmax_batch_size: {max_batch_size}\n'
            f'input [ {{ name: "{input_name}" data_type: {data_type} dims: [ {dims} ] }} ]\n'
            f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {output_dims or dims} ] }} ]\n{batching}\n{extra}\n')


def add_model(repo: Path, name: str, kind: str, config: str | None, first_dim: str | int = "batch") -> None:
    write_model(repo / name / "1" / "model.onnx", kind, first_dim)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config)


def hammer(url: str, model: str, inputs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """One tritonclient per entry of `inputs`, each in its own thread, all starting together, each sending its
    requests one after the other; the answers, in the same order."""
    answers: list[list[np.ndarray]] = [[] for _ in inputs]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(inputs))

    def client_thread(i: int) -> None:
        try:
            client = httpclient.InferenceServerClient(url)
            barrier.wait(timeout=60)
            for x in inputs[i]:
                tensor = httpclient.InferInput("x", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                answers[i].append(client.infer(model, [tensor]).as_numpy("y"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    return answers


def distinct_inputs(clients: int, requests: int, rows: int, seed: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal((rows, 4)).astype(np.float32) + 10 * i for _ in range(requests)]
            for i in range(clients)]


# --- Triton's batching semantics ---------------------------------------------------------------------------

DELAY = 'dynamic_batching { max_queue_delay_microseconds: 100000 }'


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory):
    """centered: max_batch_size 0 (its first dimension is free in the graph, but not a batch dimension) with a
    dynamic_batching block; alone: max_batch_size 8 without one; merged: max_batch_size 8 with one. The
    command line's 100 ms batching delay would merge any of them that were batched."""
    repo = tmp_path_factory.mktemp("batching") / "repo"
    add_model(repo, "centered", "centered", config_text("centered", max_batch_size=0, dims="-1, 4", batching=DELAY))
    add_model(repo, "alone", "double", config_text("alone"))
    add_model(repo, "merged", "double", config_text("merged", batching=DELAY))
    running = Server(repo, "--max-queue-delay-us", "100000", wait_for="live", log=repo.parent / "server.log")
    yield running
    running.stop()


def counts(url: str, model: str) -> tuple[int, int, int]:
    """The model's (successful requests, runs, inferences) so far."""
    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    return stats["inference_stats"]["success"]["count"], stats["execution_count"], stats["inference_count"]


def hammer_counted(url: str, model: str, inputs: list[list[np.ndarray]],
                   ) -> tuple[list[list[np.ndarray]], tuple[int, int, int]]:
    """hammer's answers, and what it added to the model's (successful requests, runs, inferences)."""
    before = counts(url, model)
    answers = hammer(url, model, inputs)
    return answers, tuple(after - then for after, then in zip(counts(url, model), before))


def test_max_batch_size_0_never_merges_requests(batching_server):
    inputs = distinct_inputs(clients=16, requests=4, rows=3, seed=0)
    answers, (requests, runs, inferences) = hammer_counted(batching_server.url, "centered", inputs)
    for sent, got in zip(inputs, answers):
        for x, y in zip(sent, got):
            np.testing.assert_allclose(y, REFERENCE["centered"](x), rtol=1e-5, atol=1e-5)
    assert requests == runs == inferences == 64  # one run a request, one inference a request (no batch dim)


def test_without_dynamic_batching_each_request_runs_alone(batching_server):
    inputs = distinct_inputs(clients=16, requests=4, rows=2, seed=1)
    added = {}
    for model in ("alone", "merged"):
        answers, added[model] = hammer_counted(batching_server.url, model, inputs)
        for sent, got in zip(inputs, answers):
            for x, y in zip(sent, got):
                np.testing.assert_allclose(y, REFERENCE["double"](x), rtol=1e-6)
    assert added["alone"] == (64, 64, 128)  # a run for each request, of its 2 rows
    # The same load on the same server does merge the model with dynamic batching.
    requests, runs, inferences = added["merged"]
    assert requests == 64 and inferences == 128 and runs < 64


def test_a_request_may_carry_up_to_max_batch_size_rows(batching_server):
    client = httpclient.InferenceServerClient(batching_server.url)
    x = np.arange(8 * 4, dtype=np.float32).reshape(8, 4)
    tensor = httpclient.InferInput("x", [8, 4], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("alone", [tensor]).as_numpy("y"), 2 * x)
    tensor = httpclient.InferInput("x", [9, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((9, 4), np.float32))
    with pytest.raises(InferenceServerException, match="exceeds the model's max_batch_size 8"):
        client.infer("alone", [tensor])
    # Without a batch dimension there is no such limit (not even the default 64): the first dimension is the
    # model's own.
    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    tensor = httpclient.InferInput("x", [100, 4], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("centered", [tensor]).as_numpy("y"), REFERENCE["centered"](x),
                               rtol=1e-5, atol=1e-5)


def test_metadata_and_config_report_what_is_served(batching_server):
    client = httpclient.InferenceServerClient(batching_server.url)
    centered = client.get_model_config("centered")
    assert centered["max_batch_size"] == 0
    assert [(t["name"], t["dims"]) for t in centered["input"]] == [("x", [-1, 4])]  # the first dim included
    assert [(t["name"], t["dims"]) for t in centered["output"]] == [("y", [-1, 4])]
    metadata = client.get_model_metadata("centered")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["parameters"]["max_batch_size"] == 0
    alone = client.get_model_config("alone")
    assert alone["max_batch_size"] == 8 and alone["input"][0]["dims"] == [4] and "dynamic_batching" not in alone
    merged = client.get_model_config("merged")
    assert merged["max_batch_size"] == 8
    assert merged["dynamic_batching"]["max_queue_delay_microseconds"] == 100000  # the command line's


# --- shutdown -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_answers_requests_waiting_for_a_long_batching_delay(tmp_path):
    model = write_model(tmp_path / "double.onnx", "double")
    served = Server(model, "--max-queue-delay-us", "20000000", wait_for="live", log=tmp_path / "server.log")  # 20 s
    inputs = distinct_inputs(clients=8, requests=1, rows=1, seed=2)
    answers: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def client_thread(i: int) -> None:
        try:
            tensor = httpclient.InferInput("x", [1, 4], "FP32")
            tensor.set_data_from_numpy(inputs[i][0])
            answers[i] = httpclient.InferenceServerClient(served.url).infer("double", [tensor]).as_numpy("y")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(2)  # the requests reach the server and wait in its queue for the delay
        assert not answers and not errors
        served.process.send_signal(signal.SIGTERM)
        # A liveness bound for them all, well under the 20 s delay: the queue is flushed at once on SIGTERM.
        deadline = time.monotonic() + 15
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not errors, errors[0]
        assert sorted(answers) == list(range(8))
        for i, y in answers.items():
            np.testing.assert_allclose(y, REFERENCE["double"](inputs[i][0]))
        assert served.process.wait(timeout=15) == 0
    finally:
        log = served.stop()
    assert "Application shutdown complete" in log


# --- bad configs and bad models -----------------------------------------------------------------------------

def add_classifier(repo: Path, name: str, label_filename: str = "labels.txt", labels: bytes | None = b"zero\none\n\n",
                   ) -> Path:
    """tests.conformance_models.image_classifier with 4 classes (input data_0 [3, 224, 224] FORMAT_NCHW, output
    fc6_1 [4], max_batch_size 0), its output's label_filename set to `label_filename` and that file (relative to
    the model's folder) holding `labels` (None: no file). The default labels name class 0 and 1, leave class 2's
    line empty, and stop before class 3."""
    from tests.conformance_models import image_classifier

    folder = image_classifier(repo, name, classes=4)
    config = folder / "config.pbtxt"
    config.write_text(config.read_text().replace('label_filename: "labels.txt"', f'label_filename: "{label_filename}"'))
    (folder / "labels.txt").unlink()
    if labels is not None:
        (folder / label_filename).parent.mkdir(parents=True, exist_ok=True)
        (folder / label_filename).write_bytes(labels)
    return folder


def add_classifier_with_a_link_out(repo: Path, name: str) -> None:
    """A classifier whose labels.txt is a symbolic link to a file beside the repository (which exists)."""
    outside = repo.parent / "outside-labels.txt"
    outside.write_text("secret\n")
    (add_classifier(repo, name, labels=None) / "labels.txt").symlink_to(outside)


# model name -> (how its folder is made, what the error names besides the model)
BAD_MODELS: dict[str, tuple[Callable[[Path, str], None], list[str]]] = {
    "negative_batch": (lambda repo, name: add_model(repo, name, "double", config_text(name, max_batch_size=-1)),
                       ["max_batch_size", "-1"]),
    "unknown_backend": (lambda repo, name: add_model(repo, name, "double",
                                                      config_text(name, runtime='backend: "pytorch"')),
                        ["backend", "'pytorch'"]),
    "unknown_platform": (lambda repo, name: add_model(repo, name, "double",
                                                       config_text(name, runtime='platform: "tensorflow_savedmodel"')),
                         ["platform", "'tensorflow_savedmodel'"]),
    "platform_for_another_file": (lambda repo, name: add_model(repo, name, "double",
                                                                config_text(name, runtime='platform: "tensorrt_plan"')),
                                  ["platform", "'tensorrt_plan'", "model.onnx"]),
    "unknown_yatdeploy_backend": (
        lambda repo, name: add_model(repo, name, "double", config_text(
            name, extra='parameters { key: "yatdeploy_backend" value: { string_value: "ort-gpu9" } }')),
        ["parameters[yatdeploy_backend]", "'ort-gpu9'"]),
    "wrong_input_name": (lambda repo, name: add_model(repo, name, "double", config_text(name, input_name="input")),
                         ["input", "names", "'input'", "'x'"]),
    "wrong_input_dims": (lambda repo, name: add_model(repo, name, "double", config_text(name, dims="5")),
                         ["input 'x' dims", "[5]", "[4]"]),
    "wrong_output_dims": (lambda repo, name: add_model(repo, name, "double", config_text(name, output_dims="4, 1")),
                          ["output 'y' dims", "[4, 1]"]),
    "wrong_data_type": (lambda repo, name: add_model(repo, name, "double", config_text(name, data_type="TYPE_INT32")),
                        ["input 'x' data_type", "TYPE_INT32", "TYPE_FP32"]),
    "batch_of_a_fixed_dim": (lambda repo, name: add_model(repo, name, "double", config_text(name), first_dim=2),
                             ["max_batch_size", "not a batch dimension"]),
    "an_hour_of_delay": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, batching="dynamic_batching { max_queue_delay_microseconds: 3600000000 }")),
        ["max_queue_delay_microseconds", "3600000000", str(MAX_QUEUE_DELAY_US)]),
    "largest_delay": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, batching=f"dynamic_batching {{ max_queue_delay_microseconds: {2**64 - 1} }}")),
        ["max_queue_delay_microseconds", str(2**64 - 1)]),
    "delay_past_2_to_64": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, batching=f"dynamic_batching {{ max_queue_delay_microseconds: {2**64} }}")),
        ["max_queue_delay_microseconds", "out of range"]),
    "negative_queue": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, batching="dynamic_batching { default_queue_policy { max_queue_size: -4 } }")),
        ["max_queue_size", "-4"]),
    "name_of_another": (lambda repo, name: add_model(repo, name, "double", config_text("someone_else")),
                        ["name", "'someone_else'"]),
    "unparsable_config": (lambda repo, name: add_model(repo, name, "double", "max_batch_size: {{ 8"),
                          ["config.pbtxt", "not a valid Triton model config"]),
    "garbage_model": (lambda repo, name: (add_model(repo, name, "double", config_text(name)),
                                          (repo / name / "1" / "model.onnx").write_bytes(b"not an onnx model")),
                      ["model.onnx", "does not load"]),
    "garbage_model_without_config": (
        lambda repo, name: (add_model(repo, name, "double", None),
                            (repo / name / "1" / "model.onnx").write_bytes(b"\x08\x07garbage")),
        ["model.onnx", "does not load"]),
    # What yatdeploy does not do is said, never skipped or ignored.
    "an_ensemble": (lambda repo, name: ((repo / name / "1").mkdir(parents=True),
                                        (repo / name / "config.pbtxt").write_text(
                                            f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 8\n')),
                    ["platform ensemble: ensembles are not supported"]),
    "sequence_batching": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra="sequence_batching { }")), ["sequence_batching is not supported"]),
    "two_instances": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra="instance_group [ { count: 2 kind: KIND_CPU } ]")), ["instance_group count > 1"]),
    "warmup_out_of_its_folder": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra='model_warmup [ { name: "w" batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 '
                    'dims: [ 4 ] input_data_file: "../../config.pbtxt" } } } ]')),
        ["model_warmup 'w' input 'x' input_data_file", "no '..'"]),
    "warmup_that_does_not_fit": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra='model_warmup [ { name: "w" batch_size: 2 inputs { key: "x" value: { data_type: TYPE_FP32 '
                    'dims: [ 5 ] zero_data: true } } } ]')), ["warmup sample 'w'", "input 'x': shape [2, 5]"]),
    # An input's format is an image's: 3 dims, as Triton checks (data_type carries the format into the input entry).
    "format_without_3_dims": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, data_type="TYPE_FP32 format: FORMAT_NCHW")), ["input 'x' format", "FORMAT_NCHW: needs 3 dims", "[4]"]),
    # A label file is read at load, from the model's folder and nowhere else.
    "labels_missing": (lambda repo, name: add_classifier(repo, name, labels=None),
                       ["output 'fc6_1' label_filename 'labels.txt'", "no such file in the model's folder"]),
    "labels_up_and_out": (lambda repo, name: (add_classifier(repo, name, "../labels.txt", labels=None),
                                              (repo / "labels.txt").write_text("there\n")),
                          ["label_filename '../labels.txt'", "must be a path in the model's folder"]),
    "labels_absolute": (lambda repo, name: add_classifier(repo, name, "/etc/hostname", labels=None),
                        ["label_filename '/etc/hostname'", "must be a path in the model's folder"]),
    "labels_link_out": (add_classifier_with_a_link_out,
                        ["label_filename 'labels.txt'", "leads out of the model's folder: refused"]),
    "labels_not_text": (lambda repo, name: add_classifier(repo, name, labels=b"\xff\xfeA\n"),
                        ["label_filename 'labels.txt'", "not UTF-8"]),
    "labels_too_large": (lambda repo, name: os.truncate(add_classifier(repo, name, labels=b"") / "labels.txt",
                                                        (64 << 20) + 1),  # sparse: nothing written
                         ["label_filename 'labels.txt'", "larger than 64 MiB: refused"]),
    "no_latest_version": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra="version_policy { latest { num_versions: 0 } }")), ["latest num_versions 0: must be at least 1"]),
    "missing_specific_version": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra="version_policy { specific { versions: [ 3 ] } }")), ["no version 3 (found 1)"]),
    "default_filename_absent": (lambda repo, name: add_model(repo, name, "double", config_text(
        name, extra='default_model_filename: "net.onnx"')),
        ["no version folder holds net.onnx (its default_model_filename)"]),
}


@pytest.fixture(scope="module")
def bad_repository(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("bad") / "repo"
    add_model(repo, "good", "double", config_text("good", batching=DELAY))
    for name, (make, _) in BAD_MODELS.items():
        make(repo, name)
    return repo


@pytest.fixture(scope="module")
def bad_server(bad_repository):
    running = Server(bad_repository, wait_for="live", log=bad_repository.parent / "server.log")
    yield running
    running.stop()


def test_the_good_model_serves_beside_the_bad_ones(bad_server):
    client = httpclient.InferenceServerClient(bad_server.url)
    assert client.is_server_live() and client.is_model_ready("good")
    x = np.ones((2, 4), np.float32)
    tensor = httpclient.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("good", [tensor]).as_numpy("y"), 2 * x)
    # As Triton's strict readiness: the server is not ready while a model of its repository is not.
    assert not client.is_server_ready()
    assert bad_server.get("/v2/health/ready")[0] == 503


@pytest.mark.parametrize("name", list(BAD_MODELS))
def test_a_bad_model_is_not_ready_and_says_why(bad_server, bad_repository, name):
    fragments = [f"model '{name}'", *BAD_MODELS[name][1]]
    client = httpclient.InferenceServerClient(bad_server.url)
    assert not client.is_model_ready(name)
    status, body = bad_server.get(f"/v2/models/{name}/ready")
    assert status == 503 and all(f in body.decode() for f in fragments), body
    # A client reads the model's name and its files' paths in the repository, never the server's paths.
    assert str(bad_repository.parent) not in body.decode() and "/tmp/" not in body.decode(), body
    with pytest.raises(InferenceServerException) as metadata_error:
        client.get_model_metadata(name)
    assert all(f in str(metadata_error.value) for f in fragments), metadata_error.value
    tensor = httpclient.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as infer_error:
        client.infer(name, [tensor])
    assert "is not ready" in str(infer_error.value)
    status, _ = bad_server.post(f"/v2/models/{name}/infer", b'{"inputs": []}')
    assert status == 503
    [entry] = [e for e in client.get_model_repository_index() if e["name"] == name]
    assert entry["state"] == "UNAVAILABLE" and all(f in entry["reason"] for f in fragments), entry


def test_each_reason_is_logged_once(bad_server):
    log = bad_server.output()
    for name in BAD_MODELS:
        assert log.count(f"not serving model '{name}': ") == 1, log
    assert "not serving model 'good'" not in log


def test_a_repository_of_bad_models_only_exits_2_with_the_reasons(bad_repository, tmp_path, capsys):
    import shutil

    repo = tmp_path / "repo"
    for name in ("negative_batch", "garbage_model"):
        shutil.copytree(bad_repository / name, repo / name)
    assert main(["serve", "-q", str(repo), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yatdeploy serve: error: ") and "no model could be loaded" in err
    assert "model 'negative_batch': config.pbtxt max_batch_size -1" in err
    assert "model 'garbage_model'" in err and "does not load" in err and "Traceback" not in err


def test_a_single_model_file_that_does_not_load_exits_2_in_one_line(tmp_path, capsys):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not an onnx model")
    assert main(["serve", "-q", str(bad), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yatdeploy serve: error: model 'garbage': ") and "does not load" in err
    assert err.count("\n") == 1


def test_external_data_outside_the_model_folder_is_refused_in_one_line(tmp_path, capsys):
    """ONNX refuses external data that points outside the model's folder: bad input (exit 2), not a crash."""
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "escape.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="escape.bin", size_threshold=0)
    (tmp_path / "secret.bin").write_bytes(np.ones((4, 4), np.float32).tobytes())
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(proto, str(path))
    assert main(["serve", "-q", str(path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("yatdeploy serve: error: model 'escape': ") and "points outside" in err
    assert err.count("\n") == 1


# --- non-float outputs ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_model_with_an_int64_output_gets_its_config_and_metadata(tmp_path):
    """An ArgMax head (float x -> int64 class ids): the repository writer and the served metadata name the
    output's type (both used to look it up among the float types only, and failed with a KeyError)."""
    from google.protobuf import text_format

    from yatdeploy.packaging import model_config_pb2, write_repository

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 1])
    model = helper.make_model(
        helper.make_graph([helper.make_node("ArgMax", ["x"], ["ids"], axis=1, keepdims=1)], "argmax", [x], [ids]),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "argmax.onnx"))
    folder = write_repository(tmp_path / "repo", "argmax", tmp_path / "argmax.onnx", op_library=None)
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2().ModelConfig())
    assert [(o.name, model_config_pb2().DataType.Name(o.data_type), list(o.dims)) for o in config.output] \
        == [("ids", "TYPE_INT64", [1])]
    running = Server(tmp_path / "repo", wait_for="ready", log=tmp_path / "server.log")
    try:
        metadata = httpclient.InferenceServerClient(running.url).get_model_metadata("argmax")
    finally:
        running.stop()
    assert metadata["outputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, 1]}]


@pytest.mark.slow
def test_default_model_filename_and_a_specific_version_are_honoured(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo / "named" / "1" / "net.onnx", "double")
    (repo / "named" / "config.pbtxt").write_text(config_text("named", extra='default_model_filename: "net.onnx"'))
    for version in (1, 2):
        write_model(repo / "pinned" / str(version) / "model.onnx", "double" if version == 1 else "centered")
    (repo / "pinned" / "config.pbtxt").write_text(
        config_text("pinned", extra="version_policy { specific { versions: [ 1 ] } }"))
    running = Server(repo, log=tmp_path / "server.log")
    try:
        client = httpclient.InferenceServerClient(running.url)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        for name in ("named", "pinned"):
            tensor = httpclient.InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(x)
            np.testing.assert_allclose(client.infer(name, [tensor]).as_numpy("y"), 2 * x)  # version 1 doubles
        assert client.get_model_metadata("pinned")["versions"] == ["1"]
    finally:
        running.stop()


# --- readiness and start-up errors (Triton's --strict-readiness and --exit-on-error) --------------------------

@pytest.fixture(scope="module")
def one_bad_repository(tmp_path_factory) -> Path:
    """good and other serve; garbage_model does not load."""
    repo = tmp_path_factory.mktemp("one_bad") / "repo"
    add_model(repo, "good", "double", config_text("good"))
    add_model(repo, "other", "double", config_text("other"))
    BAD_MODELS["garbage_model"][0](repo, "garbage_model")
    return repo


def _ready_both_ways(server: Server) -> tuple[int, bool, bool]:
    """/v2/health/ready's status, tritonclient's HTTP is_server_ready and gRPC ServerReady."""
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(server.grpc_url) as grpc_client:
        grpc_ready = grpc_client.is_server_ready()
    return server.get("/v2/health/ready")[0], httpclient.InferenceServerClient(server.url).is_server_ready(), \
        grpc_ready


@pytest.mark.slow
@pytest.mark.parametrize("flags, ready", [((), False), (("--strict-readiness", "true"), False),
                                          (("--strict-readiness", "false"), True),
                                          (("--strict-readiness=false",), True)])
def test_strict_readiness_decides_whether_a_partly_loaded_server_is_ready(one_bad_repository, flags, ready):
    """Strict (the default, Triton's): ready only when every model is; not strict: ready once it serves what it
    could load. Either way the good models serve and the bad one is reported, over HTTP and gRPC alike."""
    server = Server(one_bad_repository, *flags, wait_for="live", log=one_bad_repository.parent / "server.log")
    try:
        assert _ready_both_ways(server) == ((200, True, True) if ready else (503, False, False))
        client = httpclient.InferenceServerClient(server.url)
        assert client.is_model_ready("good") and client.is_model_ready("other")
        assert not client.is_model_ready("garbage_model")
        tensor = httpclient.InferInput("x", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        np.testing.assert_allclose(client.infer("good", [tensor]).as_numpy("y"), 2 * np.ones((1, 4)))
    finally:
        server.stop()


@pytest.mark.slow
def test_not_strict_a_server_in_explicit_mode_is_ready_with_a_failed_startup_model(one_bad_repository):
    server = Server(one_bad_repository, "--model-control-mode", "explicit", "--load-model", "*",
                    "--strict-readiness", "false", wait_for="live", log=one_bad_repository.parent / "server.log")
    try:
        assert _ready_both_ways(server) == (200, True, True)
    finally:
        server.stop()


def test_exit_on_error_ends_a_start_up_with_a_model_that_does_not_load(one_bad_repository, capsys):
    for flags in (("--exit-on-error", "true"), ("--exit-on-error=true",),
                  ("--model-control-mode", "explicit", "--load-model", "garbage_model", "--exit-on-error", "true")):
        assert main(["serve", "-q", str(one_bad_repository), "--port", str(free_port()), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("yatdeploy serve: error: ") and err.count("\n") == 1, err
        assert "model 'garbage_model'" in err and "does not load" in err and "--exit-on-error" in err, err
        assert str(one_bad_repository) not in err


def test_readiness_flags_take_triton_booleans_only(one_bad_repository, capsys):
    for flag in ("--strict-readiness", "--exit-on-error"):
        assert main(["serve", "-q", str(one_bad_repository), "--port", str(free_port()), flag, "maybe"]) == 2
        assert f"{flag} maybe: must be true or false" in capsys.readouterr().err


# --- an input's format and an output's labels (image_client.py's needs) ---------------------------------------

@pytest.fixture(scope="module")
def labelled_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("labelled") / "repo"
    add_classifier(repo, "classifier", "labels/classes.txt")  # a path below the model's folder
    add_model(repo, "double", "double", config_text("double"))  # no format, no label file
    running = Server(repo)
    yield running
    running.stop()


def test_the_served_config_shows_the_input_format_and_the_label_file(labelled_server):
    """image_client.py reads the input's format from the config (FORMAT_NONE stops it): over HTTP (Triton's JSON,
    defaults included) and gRPC."""
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import model_config_pb2

    config = httpclient.InferenceServerClient(labelled_server.url).get_model_config("classifier")
    assert [(i["name"], i["format"]) for i in config["input"]] == [("data_0", "FORMAT_NCHW")]
    assert [(o["name"], o["label_filename"]) for o in config["output"]] == [("fc6_1", "labels/classes.txt")]
    plain = httpclient.InferenceServerClient(labelled_server.url).get_model_config("double")
    assert plain["input"][0]["format"] == "FORMAT_NONE" and plain["output"][0]["label_filename"] == ""
    over_grpc = grpcclient.InferenceServerClient(labelled_server.grpc_url).get_model_config("classifier").config
    assert over_grpc.input[0].format == model_config_pb2.ModelInput.FORMAT_NCHW
    assert over_grpc.output[0].label_filename == "labels/classes.txt"


def _check_classes(got: list, count: int) -> None:
    """The classifier's `count` best classes for an input of ones, as Triton writes them: "value:index:label", and
    "value:index" for class 2 (an empty line of the label file) and class 3 (beyond the file)."""
    scores = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4).sum(axis=0)  # the mean of ones is 1 per channel
    order = list(np.argsort(-scores)[:count])
    labels = {0: "zero", 1: "one"}
    parts = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in got]
    assert [p[1:] for p in parts] == [[str(i), labels[i]] if i in labels else [str(i)] for i in order], parts
    np.testing.assert_allclose([float(p[0]) for p in parts], scores[order], rtol=1e-5)


def test_classification_appends_the_labels_over_http_and_grpc(labelled_server):
    import tritonclient.grpc as grpcclient

    x = np.ones((3, 224, 224), np.float32)
    tensor = httpclient.InferInput("data_0", [3, 224, 224], "FP32")
    tensor.set_data_from_numpy(x)
    for binary in (True, False):
        result = httpclient.InferenceServerClient(labelled_server.url).infer(
            "classifier", [tensor], outputs=[httpclient.InferRequestedOutput("fc6_1", binary, class_count=4)])
        _check_classes(list(result.as_numpy("fc6_1")), 4)
    grpc_tensor = grpcclient.InferInput("data_0", [3, 224, 224], "FP32")
    grpc_tensor.set_data_from_numpy(x)
    result = grpcclient.InferenceServerClient(labelled_server.grpc_url).infer(
        "classifier", [grpc_tensor], outputs=[grpcclient.InferRequestedOutput("fc6_1", class_count=4)])
    _check_classes(list(result.as_numpy("fc6_1")), 4)
