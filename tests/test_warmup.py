"""Model warmup (serving.warmup, config.pbtxt model_warmup): each kind of data, a sample that does not fit or leads out
of its folder refused with the sample's name, warmup left out of the statistics, and a real `yatdeploy serve` whose
model is not ready while it warms (a warmup file that is a pipe holds the warmup until the test has asked)."""

from __future__ import annotations

import asyncio
import os
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("fastapi", reason="the service extra is not installed")

from tests.servers import Server, length_prefixed  # noqa: E402
from yatdeploy.progress import QUIET  # noqa: E402
from yatdeploy.serving.core import InferenceServer  # noqa: E402
from yatdeploy.serving.model import ServedModel  # noqa: E402
from yatdeploy.serving.repository import discover  # noqa: E402
from yatdeploy.serving.server import load_models  # noqa: E402
from yatdeploy.serving.warmup import sample_feeds  # noqa: E402

HEAD = '''name: "{name}"
backend: "onnxruntime"
max_batch_size: 4
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 3 ] }}, {{ name: "n" data_type: TYPE_INT64 dims: [ 2 ] }},
        {{ name: "t" data_type: TYPE_STRING dims: [ 2 ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }}, {{ name: "m" data_type: TYPE_INT64 dims: [ 2 ] }},
         {{ name: "s" data_type: TYPE_STRING dims: [ 2 ] }} ]
'''


def sample(name: str, x: str, n: str, t: str, batch_size: int = 2, count: int = 0) -> str:
    def value(kind: str, datatype: str, dims: str) -> str:
        data = {"zero": "zero_data: true", "random": "random_data: true"}.get(kind, f'input_data_file: "{kind}"')
        return f"{{ data_type: {datatype} dims: [ {dims} ] {data} }}"

    return (f'{{ name: "{name}" batch_size: {batch_size} count: {count} '
            f'inputs {{ key: "x" value: {value(x, "TYPE_FP32", "3")} }} '
            f'inputs {{ key: "n" value: {value(n, "TYPE_INT64", "2")} }} '
            f'inputs {{ key: "t" value: {value(t, "TYPE_STRING", "2")} }} }}')


def add_model(repo: Path, name: str, samples: list[str], files: dict[str, bytes] | None = None) -> Path:
    """The model `name` in `repo`: x FP32 [N, 3], n INT64 [N, 2], t BYTES [N, 2] -> y = -x, m = n, s = t, with the
    warmup `samples` and `files` in its version's warmup/ folder."""
    value = helper.make_tensor_value_info
    nodes = [helper.make_node("Neg", ["x"], ["y"]), helper.make_node("Identity", ["n"], ["m"]),
             helper.make_node("Identity", ["t"], ["s"])]
    model = helper.make_model(helper.make_graph(
        nodes, name, [value("x", TensorProto.FLOAT, ["N", 3]), value("n", TensorProto.INT64, ["N", 2]),
                      value("t", TensorProto.STRING, ["N", 2])],
        [value("y", TensorProto.FLOAT, ["N", 3]), value("m", TensorProto.INT64, ["N", 2]),
         value("s", TensorProto.STRING, ["N", 2])]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = repo / name / "1"
    (version / "warmup").mkdir(parents=True)
    onnx.save(model, str(version / "model.onnx"))
    for file, data in (files or {}).items():
        (version / "warmup" / file).write_bytes(data)
    warmup = f"model_warmup [ {', '.join(samples)} ]" if samples else ""
    (repo / name / "config.pbtxt").write_text(HEAD.format(name=name) + warmup + "\n")
    return repo


def loaded(repo: Path, name: str) -> tuple[list[ServedModel], list[str]]:
    models, failed = load_models(repo, "ort-cpu", 1, QUIET, only=name)
    return models, [m.reason for m in failed]


FILES = {"x.bin": np.array([1.5, -2.0, 3.25], "<f4").tobytes(), "n.bin": np.array([7, 9], "<i8").tobytes(),
         "t.bin": length_prefixed(["hé", ""])}


def test_each_kind_of_warmup_data_is_what_the_sample_says(tmp_path):
    repo = add_model(tmp_path / "repo", "kinds", [sample("zeros", "zero", "zero", "zero"),
                                                  sample("random", "random", "random", "random", batch_size=3),
                                                  sample("files", "x.bin", "n.bin", "t.bin")], FILES)
    [model], failed = loaded(repo, "kinds")
    assert failed == []
    zeros, random, files = (sample_feeds(model, s) for s in model.source.warmup)
    assert [zeros[k].shape for k in "xnt"] == [(2, 3), (2, 2), (2, 2)]
    assert not zeros["x"].any() and not zeros["n"].any() and zeros["t"].tolist() == [[b"", b""]] * 2
    assert zeros["x"].dtype == np.float32 and zeros["n"].dtype == np.int64
    assert [random[k].shape for k in "xnt"] == [(3, 3), (3, 2), (3, 2)]
    assert random["x"].std() > 0 and ((0 <= random["n"]) & (random["n"] < 100)).all()
    assert all(element.isdigit() for element in random["t"].reshape(-1))
    assert files["x"].tolist() == [[1.5, -2.0, 3.25]] * 2 and files["n"].tolist() == [[7, 9]] * 2
    assert files["t"].tolist() == [["hé".encode(), b""]] * 2
    model.close()


def test_warmup_runs_each_sample_count_times_and_counts_in_no_statistics(tmp_path, monkeypatch):
    runs: list[int] = []
    real_run = ServedModel.run
    monkeypatch.setattr(ServedModel, "run", lambda self, feeds: runs.append(len(feeds["x"])) or real_run(self, feeds))
    repo = add_model(tmp_path / "repo", "counted", [sample("a", "zero", "zero", "zero", batch_size=1, count=3),
                                                    sample("b", "random", "random", "random", batch_size=4)])
    [model], failed = loaded(repo, "counted")
    assert failed == [] and runs == [1, 1, 1, 4]  # count 3, then count 0: once

    async def scenario() -> dict:
        core = InferenceServer([model])
        await core.start()
        try:
            [stats] = core.statistics("counted")
            return stats
        finally:
            await core.stop()

    stats = asyncio.run(scenario())
    assert (stats["inference_count"], stats["execution_count"], stats["batch_stats"]) == (0, 0, [])
    assert all(phase["count"] == 0 for phase in stats["inference_stats"].values())


@pytest.mark.parametrize("samples, files, fragments", [
    ([sample("short", "zero", "zero", "zero").replace("dims: [ 3 ]", "dims: [ 2 ]")], {},
     ["warmup sample 'short'", "input 'x': shape [2, 2]"]),
    ([sample("typed", "zero", "zero", "zero").replace("TYPE_INT64", "TYPE_INT32")], {},
     ["warmup sample 'typed'", "input 'n': datatype INT32"]),
    ([sample("partial", "zero", "zero", "zero").replace('inputs { key: "t"', 'inputs { key: "u"')], {},
     ["warmup sample 'partial'"]),
    ([sample("sized", "x.bin", "zero", "zero")], {"x.bin": b"\0" * 8},
     ["warmup sample 'sized'", "x.bin holds 8 bytes", "take 12"]),
    ([sample("strings", "zero", "zero", "t.bin")], {"t.bin": length_prefixed(["only one"])},
     ["warmup sample 'strings'", "exactly 2 BYTES elements"]),
    ([sample("absent", "nowhere.bin", "zero", "zero")], {}, ["warmup sample 'absent'", "no such file"]),
    ([sample("up", "../model.onnx", "zero", "zero")], {}, ["model_warmup 'up'", "no '..'"]),
    ([sample("rooted", "/etc/hostname", "zero", "zero")], {}, ["model_warmup 'rooted'", "not absolute"]),
    ([sample("big", "zero", "zero", "zero", batch_size=5)], {}, ["model_warmup 'big' batch_size", "5"]),
    (['{ batch_size: 1 inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } } }'], {},
     ["model_warmup name"]),
], ids=["dims", "datatype", "input name", "file size", "bytes elements", "missing file", "dot-dot", "absolute",
        "batch size", "no name"])
def test_a_bad_warmup_sample_makes_the_model_fail_to_load_naming_the_sample(tmp_path, samples, files, fragments):
    repo = add_model(tmp_path / "repo", "bad", samples, files)
    models, failed = loaded(repo, "bad")
    assert models == [] and len(failed) == 1
    assert all(fragment in failed[0] for fragment in fragments), failed[0]
    assert str(tmp_path) not in failed[0]  # repository paths only


def test_a_warmup_file_linked_out_of_its_folder_is_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(FILES["x.bin"])
    repo = add_model(tmp_path / "repo", "linked", [sample("link", "x.bin", "zero", "zero")])
    (repo / "linked" / "1" / "warmup" / "x.bin").symlink_to(outside)
    models, failed = loaded(repo, "linked")
    assert models == [] and "warmup sample 'link'" in failed[0] and "leads out of" in failed[0]


@pytest.fixture
def warming_server(tmp_path):
    repo = add_model(tmp_path / "repo", "warming", [sample("held", "x.bin", "zero", "zero")])
    os.mkfifo(repo / "warming" / "1" / "warmup" / "x.bin")  # the warmup waits on it until the test writes
    running = Server(repo, "--model-control-mode", "explicit", "--strict-readiness", "false")
    yield running, repo / "warming" / "1" / "warmup" / "x.bin"
    running.stop()


def test_a_model_is_not_ready_until_its_warmup_has_run(warming_server):
    import tritonclient.grpc as grpc_client

    server, pipe = warming_server
    answers: list[tuple[int, dict]] = []
    loading = threading.Thread(target=lambda: answers.append(
        server.post("/v2/repository/models/warming/load", b"{}")))
    loading.start()
    with open(pipe, "wb") as feed:  # opens once the warmup opened it to read: the model is warming now
        status, _ = server.get("/v2/models/warming/ready")
        grpc_ready = grpc_client.InferenceServerClient(server.grpc_url).is_model_ready("warming")
        assert loading.is_alive()
        feed.write(FILES["x.bin"])
    loading.join(60)
    assert (status, grpc_ready) == (503, False)
    assert answers == [(200, {})]
    assert server.get("/v2/models/warming/ready")[0] == 200
    with urllib.request.urlopen(f"http://{server.url}/v2/models/warming/stats", timeout=30) as response:
        import json
        [stats] = json.loads(response.read())["model_stats"]
    assert (stats["inference_count"], stats["execution_count"]) == (0, 0)
