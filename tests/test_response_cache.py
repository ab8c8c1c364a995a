"""The response cache (serving.response_cache): the LRU itself (eviction within its size, oversize answers, threads),
its keying against 10,000 random repeats and near-repeats through the InferenceServer in process (0 wrong hits), and
a real `yatdeploy serve --cache-config` driven by tritonclient over HTTP and gRPC: hits and misses in the statistics
and Triton's nv_cache_* metrics, and a hit that runs nothing."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytest.importorskip("fastapi", reason="the service extra is not installed")

from tests.servers import Server  # noqa: E402
from yatdeploy import backends  # noqa: E402
from yatdeploy.errors import YatDeployError  # noqa: E402
from yatdeploy.serving.core import InferenceServer, ServerSettings  # noqa: E402
from yatdeploy.serving.model import ServedModel  # noqa: E402
from yatdeploy.serving.protocol import InferRequest, RequestedOutput  # noqa: E402
from yatdeploy.serving.repository import discover  # noqa: E402
from yatdeploy.serving.response_cache import (  # noqa: E402
    ANSWER_NEUTRAL,
    ResponseCache,
    entry_size,
    parse_cache_config,
    request_key,
)
from yatdeploy.serving.server import ServeSettings  # noqa: E402

CONFIG = '''name: "twice"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "t" data_type: TYPE_STRING dims: [ 2 ] } ]
output [ { name: "double" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "negated" data_type: TYPE_FP32 dims: [ 4 ] },
         { name: "same" data_type: TYPE_STRING dims: [ 2 ] } ]
dynamic_batching { }
response_cache { enable: true }
'''


def cached_repository(folder: Path) -> Path:
    """A repository with the model "twice": x FP32 [N, 4], t BYTES [N, 2] -> double = 2x, negated = -x, same = t;
    its config enables the response cache."""
    value = helper.make_tensor_value_info
    nodes = [helper.make_node("Add", ["x", "x"], ["double"]), helper.make_node("Neg", ["x"], ["negated"]),
             helper.make_node("Identity", ["t"], ["same"])]
    model = helper.make_model(helper.make_graph(
        nodes, "twice", [value("x", TensorProto.FLOAT, ["N", 4]), value("t", TensorProto.STRING, ["N", 2])],
        [value("double", TensorProto.FLOAT, ["N", 4]), value("negated", TensorProto.FLOAT, ["N", 4]),
         value("same", TensorProto.STRING, ["N", 2])]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "repo" / "twice" / "1").mkdir(parents=True)
    onnx.save(model, str(folder / "repo" / "twice" / "1" / "model.onnx"))
    (folder / "repo" / "twice" / "config.pbtxt").write_text(CONFIG)
    return folder / "repo"


def outputs(*sizes: int) -> tuple:
    return tuple((f"o{i}", np.arange(size, dtype=np.uint8), True) for i, size in enumerate(sizes))


# --- the cache ---------------------------------------------------------------------------------------------

def test_the_cache_evicts_the_least_recently_used_within_its_size():
    one = entry_size(b"k" * 32, outputs(100))
    cache = ResponseCache(3 * one)
    for key in (b"a", b"b", b"c"):
        assert cache.put(key.ljust(32), 0, outputs(100))
    assert cache.used == 3 * one and len(cache) == 3
    assert cache.get(b"a".ljust(32)) is not None  # a is now the most recently used: b goes first
    assert cache.put(b"d".ljust(32), 0, outputs(100))
    assert [cache.get(k.ljust(32)) is not None for k in (b"a", b"b", b"c", b"d")] == [True, False, True, True]
    assert cache.used == 3 * one
    assert cache.put(b"e".ljust(32), 0, outputs(250))  # takes the room of two and a half: three go
    assert [cache.get(k.ljust(32)) is not None for k in (b"a", b"c", b"d", b"e")] == [False, False, False, True]
    assert cache.used <= cache.capacity


def test_an_answer_larger_than_the_cache_is_not_stored_and_stored_answers_are_read_only_copies():
    cache = ResponseCache(entry_size(b"k" * 32, outputs(100)))
    assert not cache.put(b"big".ljust(32), 0, outputs(101))
    assert len(cache) == 0 and cache.used == 0
    original = np.arange(100, dtype=np.uint8)
    assert cache.put(b"fit".ljust(32), 0, (("o0", original, True),))
    original[:] = 7  # the model's buffer changes afterwards: the cache keeps what was answered
    [(_, stored, _)] = cache.get(b"fit".ljust(32))
    assert np.array_equal(stored, np.arange(100, dtype=np.uint8)) and not stored.flags.writeable


def test_forgetting_an_owner_drops_its_entries_only():
    cache = ResponseCache(1 << 20)
    cache.put(b"a".ljust(32), 1, outputs(10))
    cache.put(b"b".ljust(32), 2, outputs(10))
    cache.forget(1)
    assert cache.get(b"a".ljust(32)) is None and cache.get(b"b".ljust(32)) is not None
    assert cache.used == entry_size(b"b".ljust(32), outputs(10))


def test_the_cache_is_consistent_under_threads():
    sizes = {i: 1 + (i * 37) % 200 for i in range(64)}
    keys = {i: i.to_bytes(32, "little") for i in sizes}
    cache = ResponseCache(sum(entry_size(keys[i], outputs(sizes[i])) for i in range(16)))
    wrong: list[int] = []
    barrier = threading.Barrier(8)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(3000):
            i = int(rng.integers(64))
            if rng.random() < 0.5:
                cache.put(keys[i], 0, outputs(sizes[i]))
            else:
                found = cache.get(keys[i])
                if found is not None and len(found[0][1]) != sizes[i]:
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    held = [i for i in sizes if cache.get(keys[i]) is not None]
    assert cache.used == sum(entry_size(keys[i], outputs(sizes[i])) for i in held) <= cache.capacity
    assert len(cache) == len(held) > 0


def test_cache_config_takes_tritons_form_and_refuses_anything_else():
    assert parse_cache_config("local,size=1048576") == 1 << 20
    assert ServeSettings(cache_config="local,size=4096").server_settings().response_cache_bytes == 4096
    assert ServeSettings().server_settings().response_cache_bytes == 0
    for bad in ("local", "local,size=", "local,size=0", "local,size=-5", "local,size=1k", "redis,size=10",
                "local,size=10,shards=2", ""):
        with pytest.raises(YatDeployError, match="local,size=BYTES"):
            ServeSettings(cache_config=bad)


def test_a_key_tells_apart_what_the_bytes_alone_would_not():
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    t = np.array([[b"a", b"b"]], dtype=object)

    def key(**fields) -> bytes:
        inputs = fields.pop("inputs", {"x": x, "t": t})
        datatypes = fields.pop("datatypes", {"x": "FP32", "t": "BYTES"})
        return request_key(fields.pop("owner", 1), "twice", fields.pop("version", "1"),
                           InferRequest(fields.pop("id", None), inputs, datatypes, **fields))

    base = key()
    assert key() == base and key(id="another id") == base
    assert key(parameters={name: 5 for name in ANSWER_NEUTRAL}) == base
    variants = {
        "owner": key(owner=2), "version": key(version="2"),
        "dtype, same bytes": key(inputs={"x": x.view(np.int32), "t": t}, datatypes={"x": "INT32", "t": "BYTES"}),
        "shape, same bytes": key(inputs={"x": x.reshape(2, 2), "t": t}),
        "str for bytes": key(inputs={"x": x, "t": np.array([["a", "b"]], dtype=object)}),
        "elements split otherwise": key(inputs={"x": x, "t": np.array([[b"ab", b""]], dtype=object)}),
        "an output": key(outputs=[RequestedOutput("double", False)]),
        "binary": key(outputs=[RequestedOutput("double", True)]),
        "classification": key(outputs=[RequestedOutput("double", False, 2)]),
        "binary default": key(binary_default=True),
        "a parameter": key(parameters={"custom": 1}),
    }
    assert base not in variants.values() and len(set(variants.values())) == len(variants)


# --- 10,000 requests through the server in process ----------------------------------------------------------

def _canonical(request: InferRequest) -> tuple:
    """What decides an answer, written independently of request_key: two requests agree here iff they must hit."""
    inputs = tuple((name, request.input_datatypes[name], a.dtype.str, a.shape,
                    tuple(a.reshape(-1).tolist()) if a.dtype == object else a.tobytes())
                   for name, a in sorted(request.inputs.items()))
    asked = None if request.outputs is None else tuple((o.name, o.binary, o.class_count) for o in request.outputs)
    parameters = tuple(sorted((k, v) for k, v in request.parameters.items() if k not in ANSWER_NEUTRAL))
    return inputs, asked, request.binary_default if request.outputs is None else None, parameters


def _mutated(request: InferRequest, rng: np.random.Generator) -> InferRequest:
    """`request` changed in one thing: a byte of x, a BYTES element, the rows, the outputs asked for, a binary flag,
    a classification count, the binary default, a parameter, or only what decides nothing (timeout, priority)."""
    x, t = request.inputs["x"].copy(), request.inputs["t"].copy()
    outputs, binary_default, parameters = request.outputs, request.binary_default, dict(request.parameters)
    kind = int(rng.integers(9))
    if kind == 0:
        raw = x.view(np.uint8).reshape(-1)
        raw[int(rng.integers(raw.size))] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        t[int(rng.integers(t.shape[0])), int(rng.integers(2))] = bytes(rng.integers(97, 100, size=2).tolist())
    elif kind == 2:
        rows = int(rng.integers(1, 5))
        x = np.resize(x, (rows, 4)).astype(np.float32)
        t = np.resize(t, (rows, 2)).astype(object)
    elif kind == 3:
        outputs = [RequestedOutput(name, bool(rng.integers(2)))
                   for name in ("double", "negated", "same") if rng.random() < 0.6] or None
    elif kind == 4 and outputs:
        first = outputs[0]
        outputs = [RequestedOutput(first.name, not first.binary, first.class_count), *outputs[1:]]
    elif kind == 5:
        outputs = [RequestedOutput("double", bool(rng.integers(2)), int(rng.integers(0, 4)))]
    elif kind == 6:
        binary_default = not binary_default
    elif kind == 7:
        parameters["custom"] = int(rng.integers(3))
    else:
        parameters[sorted(ANSWER_NEUTRAL)[int(rng.integers(len(ANSWER_NEUTRAL)))]] = int(rng.integers(10**6, 10**7))
    return InferRequest(None, {"x": x, "t": t}, {"x": "FP32", "t": "BYTES"}, outputs, binary_default, parameters)


def _same_answer(got, expected) -> bool:
    if [(n, b) for n, _, b in got] != [(n, b) for n, _, b in expected]:
        return False
    for (_, a, _), (_, b, _) in zip(got, expected):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if (a.reshape(-1).tolist() != b.reshape(-1).tolist()) if a.dtype == object else a.tobytes() != b.tobytes():
            return False
    return True


def test_ten_thousand_random_repeats_and_near_repeats_give_no_wrong_hit(tmp_path):
    repo = cached_repository(tmp_path)

    def model() -> ServedModel:
        [source] = discover(repo)
        return ServedModel(source, backends.get("ort-cpu"), intra_op_threads=1)

    async def scenario() -> dict:
        cached = InferenceServer([model()], settings=ServerSettings(response_cache_bytes=256 << 20))
        plain = InferenceServer([model()], settings=ServerSettings())  # the answers without a cache
        await cached.start()
        await plain.start()
        rng = np.random.default_rng(25)
        seen: dict[tuple, list] = {}  # canonical request -> its first answer
        history: list[InferRequest] = []
        tally = {"hits": 0, "misses": 0, "wrong_hits": 0, "missed_repeats": 0, "wrong_answers": 0}
        try:
            for step in range(10_000):
                if not history or rng.random() < 0.1:
                    rows = int(rng.integers(1, 4))
                    request = InferRequest(None, {"x": rng.standard_normal((rows, 4)).astype(np.float32),
                                                  "t": np.array([[b"a", b"b"]] * rows, dtype=object)},
                                           {"x": "FP32", "t": "BYTES"})
                elif rng.random() < 0.4:
                    old = history[int(rng.integers(len(history)))]
                    request = InferRequest(None, {k: v.copy() for k, v in old.inputs.items()}, dict(old.input_datatypes),
                                           old.outputs, old.binary_default, dict(old.parameters))
                else:
                    request = _mutated(history[int(rng.integers(len(history)))], rng)
                history.append(request)
                canonical = _canonical(request)

                async def given(model, request=request):
                    return request

                async def as_is(result):
                    return result

                result = await cached.infer("twice", None, given, as_is)
                expected = (await plain.infer("twice", None, given, as_is)).outputs
                repeat = canonical in seen
                tally["hits" if result.cache.hit else "misses"] += 1
                tally["wrong_hits"] += result.cache.hit and not repeat
                tally["missed_repeats"] += repeat and not result.cache.hit
                tally["wrong_answers"] += not _same_answer(result.outputs, expected) or (
                    repeat and not _same_answer(result.outputs, seen[canonical]))
                seen.setdefault(canonical, result.outputs)
            [stats] = cached.statistics("twice")
            tally["stats"] = stats
        finally:
            await cached.stop()
            await plain.stop()
        return tally

    tally = asyncio.run(scenario())
    stats = tally.pop("stats")
    assert (tally["wrong_hits"], tally["missed_repeats"], tally["wrong_answers"]) == (0, 0, 0), tally
    assert tally["hits"] > 2000 and tally["misses"] > 2000, tally  # both kinds were exercised
    inference = stats["inference_stats"]
    assert inference["cache_hit"]["count"] == tally["hits"] and inference["cache_miss"]["count"] == tally["misses"]
    assert stats["execution_count"] == tally["misses"] == inference["compute_infer"]["count"]
    assert inference["success"]["count"] == inference["queue"]["count"] == 10_000


# --- a real server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_server(tmp_path_factory):
    repo = cached_repository(tmp_path_factory.mktemp("cache"))
    running = Server(repo, "--cache-config", "local,size=1048576")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def no_cache_server(tmp_path_factory):
    repo = cached_repository(tmp_path_factory.mktemp("no_cache"))
    running = Server(repo)  # the model enables the cache, the server has none: nothing is cached, as in Triton
    yield running
    running.stop()


def _send_twice(server: Server, protocol: str, x: np.ndarray) -> list[np.ndarray]:
    if protocol == "http":
        import tritonclient.http as client
        connection = client.InferenceServerClient(server.url)
    else:
        import tritonclient.grpc as client
        connection = client.InferenceServerClient(server.grpc_url)
    x_in = client.InferInput("x", list(x.shape), "FP32")
    x_in.set_data_from_numpy(x)
    t_in = client.InferInput("t", [x.shape[0], 2], "BYTES")
    t_in.set_data_from_numpy(np.array([[b"p", b"q"]] * x.shape[0], dtype=object))
    answers = [connection.infer("twice", [x_in, t_in]).as_numpy("double") for _ in range(2)]
    return answers


def _statistics(server: Server) -> tuple[dict, dict]:
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    [over_http] = http_client.InferenceServerClient(server.url).get_inference_statistics("twice")["model_stats"]
    [over_grpc] = grpc_client.InferenceServerClient(server.grpc_url).get_inference_statistics(
        "twice", as_json=True)["model_stats"]
    return over_http, over_grpc


def _metric(server: Server, name: str) -> float | None:
    status, body = server.get("/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(f'{name}{{model="twice",version="1"}} '):
            return float(line.split()[-1])
    return None


def test_a_repeated_request_is_answered_from_the_cache_over_http_and_grpc_without_running_the_model(cache_server):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for protocol in ("http", "grpc"):  # their requests differ (HTTP asks for binary outputs): a miss, then a hit
        first, second = _send_twice(cache_server, protocol, x)
        assert np.array_equal(first, 2 * x) and np.array_equal(second, 2 * x)
    over_http, over_grpc = _statistics(cache_server)
    for stats in (over_http, over_grpc):
        inference = stats["inference_stats"]
        assert int(inference["cache_hit"]["count"]) == 2 and int(inference["cache_miss"]["count"]) == 2
        assert int(inference["success"]["count"]) == 4
        assert int(stats["execution_count"]) == 2 and int(inference["compute_infer"]["count"]) == 2
        assert int(inference["cache_hit"]["ns"]) > 0 and int(inference["cache_miss"]["ns"]) > 0
    assert _metric(cache_server, "nv_cache_num_hits_per_model") == 2
    assert _metric(cache_server, "nv_cache_num_misses_per_model") == 2
    assert _metric(cache_server, "nv_cache_hit_duration_per_model") > 0
    assert _metric(cache_server, "nv_cache_miss_duration_per_model") > 0
    assert _metric(cache_server, "nv_inference_exec_count") == 2
    # a near-repeat (one value changed) misses and runs
    changed = x.copy()
    changed[1, 3] += 1
    _send_twice(cache_server, "http", changed)
    assert _metric(cache_server, "nv_cache_num_misses_per_model") == 3
    assert _metric(cache_server, "nv_inference_exec_count") == 3


def test_without_cache_config_a_model_that_enables_the_cache_caches_nothing(no_cache_server):
    x = np.ones((1, 4), dtype=np.float32)
    _send_twice(no_cache_server, "http", x)
    over_http, _ = _statistics(no_cache_server)
    assert over_http["execution_count"] == 2
    assert over_http["inference_stats"]["cache_hit"]["count"] == 0
    assert over_http["inference_stats"]["cache_miss"]["count"] == 0
    status, body = no_cache_server.get("/metrics")
    assert b"nv_cache_num_hits_per_model" not in body
