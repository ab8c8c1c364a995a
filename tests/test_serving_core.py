"""The serving core in process, without a socket: InferenceServer on a real ServedModel (the session's exported
Yat MLP on ONNX Runtime) for inference, batching, the kinds of error and their status codes, statistics,
readiness and repository control; the protocol's parsing and encoding, the batcher, and both transports'
handlers driven directly (HTTP through an ASGI transport, gRPC through the servicer). The end-to-end tests, with
`yatdeploy serve` in a subprocess, are the other tests/test_serving*.py and tests/test_conformance.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")

from tests.servers import reference  # noqa: E402
from yatdeploy import backends  # noqa: E402
from yatdeploy.progress import QUIET  # noqa: E402
from yatdeploy.serving.batching import DynamicBatcher  # noqa: E402
from yatdeploy.serving.core import InferenceServer, InferResult, ServerSettings  # noqa: E402
from yatdeploy.serving.metrics import Metrics  # noqa: E402
from yatdeploy.serving.model import ServedModel, UnavailableModel  # noqa: E402
from yatdeploy.serving.protocol import (  # noqa: E402
    HTTP_STATUS,
    AlreadyExists,
    DeadlineExceeded,
    InferRequest,
    Internal,
    InvalidInput,
    NotFound,
    ProtocolError,
    RequestedOutput,
    ResourceExhausted,
    Unavailable,
    UnsupportedMediaType,
    encode_response,
    parse_raw_request,
    parse_request,
)
from yatdeploy.serving.queue_policy import QueuePolicies, QueuePolicy  # noqa: E402
from yatdeploy.serving.repository import discover  # noqa: E402
from yatdeploy.serving.server import load_models  # noqa: E402


def served(onnx: Path) -> ServedModel:
    """The model at `onnx` (named after its file) as `yatdeploy serve` opens it: the default backend, 1 thread."""
    [source] = discover(onnx)
    return ServedModel(source, backends.default(), intra_op_threads=1)


@pytest.fixture
def mlp(exported_mlp) -> ServedModel:
    """A ServedModel of the MLP ("mlp", version 1, input [-1, 16] FP32, output [-1, 5]); each test its own, since
    the core sets its batching and closes it on unload."""
    return served(exported_mlp.onnx)


def rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 16)).astype(np.float32)


def request(x: np.ndarray, **fields) -> InferRequest:
    return InferRequest(id=fields.pop("id", None), inputs={"input": x}, input_datatypes={"input": "FP32"}, **fields)


def given(parsed: InferRequest):
    """A transport's decode that has `parsed` already."""

    async def decode(model: ServedModel) -> InferRequest:
        return parsed

    return decode


async def as_is(result: InferResult) -> InferResult:
    """A transport's encode that sends the result itself."""
    return result


async def infer(core: InferenceServer, parsed: InferRequest, name: str = "mlp", version: str | None = None):
    return await core.infer(name, version, given(parsed), as_is)


@asynccontextmanager
async def running(*models: ServedModel, unavailable=(), **settings):
    core = InferenceServer(list(models), list(unavailable), settings=ServerSettings(**settings))
    await core.start()
    try:
        yield core
    finally:
        await core.stop()


def run(scenario) -> None:
    asyncio.run(scenario())


def stats(core: InferenceServer, name: str = "mlp") -> dict:
    [entry] = core.statistics(name)
    return entry


# --- inference --------------------------------------------------------------------------------------------

def test_an_inference_answers_what_onnx_runtime_computes(mlp, exported_mlp):
    x = rows(3)

    async def scenario():
        async with running(mlp) as core:
            result = await infer(core, request(x, id="r-1"))
            assert (result.request.id, result.batch, result.model.name) == ("r-1", 3, "mlp")
            [(name, array, binary)] = result.outputs
            assert (name, binary) == ("output", False)
            np.testing.assert_allclose(array, reference(exported_mlp.onnx, x), rtol=1e-6)
            assert result.queue_s >= 0 and result.compute_s > 0 and result.input_s > 0

    run(scenario)


def test_the_answer_is_what_encode_returns_and_outputs_are_chosen_and_classified(mlp, exported_mlp):
    x = rows(2, seed=1)
    top = np.argsort(-reference(exported_mlp.onnx, x), axis=1, kind="stable")[:, :2]

    async def encode(result: InferResult) -> bytes:
        return encode_response(result.model.name, result.model.version, result.request.id, result.outputs)[0]

    async def scenario():
        async with running(mlp) as core:
            asked = request(x, outputs=[RequestedOutput("output", binary=False, class_count=2)])
            body = json.loads(await core.infer("mlp", "1", given(asked), encode))
            [output] = body["outputs"]
            assert (body["model_name"], body["model_version"], output["datatype"], output["shape"]) == \
                ("mlp", "1", "BYTES", [2, 2])
            labels = np.array(output["data"]).reshape(2, 2)  # "value:index", largest first
            assert [[int(label.split(":")[1]) for label in row] for row in labels] == top.tolist()

    run(scenario)


# --- batching ---------------------------------------------------------------------------------------------

def test_requests_are_merged_along_the_batch_dimension_and_split_back(mlp, exported_mlp):
    """Three requests of 1, 2 and 3 rows fill a batch of 6 at once (the 1 s delay never runs out): one run."""
    xs = [rows(n, seed=n) for n in (1, 2, 3)]

    async def scenario():
        async with running(mlp, max_batch_size=6, max_queue_delay_us=1_000_000) as core:
            results = await asyncio.wait_for(asyncio.gather(*(infer(core, request(x)) for x in xs)), 0.9)
            for x, result in zip(xs, results):
                np.testing.assert_allclose(result.outputs[0][1], reference(exported_mlp.onnx, x), rtol=1e-5,
                                           atol=1e-6)
            entry = stats(core)
            assert (entry["execution_count"], entry["inference_count"]) == (1, 6)
            assert [b["batch_size"] for b in entry["batch_stats"]] == [6]

    run(scenario)


def test_a_full_queue_is_unavailable_at_once_and_counted(mlp):
    async def scenario():
        async with running(mlp, max_queue_size=1, max_queue_delay_us=10_000_000) as core:
            first = asyncio.ensure_future(infer(core, request(rows(1))))  # waits for a batch to fill
            await asyncio.sleep(0.01)
            with pytest.raises(Unavailable, match="queue of 1 requests is full"):
                await infer(core, request(rows(1)))
            core.flush()  # the first runs now, without the delay
            assert (await first).outputs[0][1].shape == (1, 5)
            phases = stats(core)["inference_stats"]
            assert (phases["success"]["count"], phases["fail"]["count"]) == (1, 1)

    run(scenario)


def test_a_request_that_leaves_the_queue_lets_its_tensors_go(mlp):
    """Cancelled and expired requests stay in their deque until the worker pops them: they must not keep their
    tensors meanwhile (a flood of short timeouts during a long batch would hold them all)."""
    async def scenario():
        batcher = DynamicBatcher(mlp, Metrics(), max_batch_size=8, max_queue_delay_s=0,
                                 policies=QueuePolicies(QueuePolicy(max_queue_size=8)))
        feeds = {"input": np.zeros((1, 16), np.float32)}
        cancelled = asyncio.ensure_future(batcher.submit(dict(feeds), 1))  # the worker is not started yet
        expired = asyncio.ensure_future(batcher.submit(dict(feeds), 1, timeout_us=1000))
        kept = asyncio.ensure_future(batcher.submit(dict(feeds), 1))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(Unavailable, match="Request timeout expired"):
            await expired
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        left = [p for p in batcher._queues[0] if p.state == "left"]
        assert len(left) == 2 and all(p.feeds == {} for p in left) and batcher.waiting() == 1
        batcher.start()
        assert (await kept).outputs[0].shape == (1, 5)
        await batcher.stop()

    asyncio.run(scenario())


def test_the_batcher_alone_refuses_past_its_queue_and_serves_what_it_queued(mlp):
    async def scenario():
        batcher = DynamicBatcher(mlp, Metrics(), max_batch_size=8, max_queue_delay_s=0,
                                 policies=QueuePolicies(QueuePolicy(max_queue_size=1)))
        feeds = {"input": np.zeros((1, 16), np.float32)}
        first = asyncio.ensure_future(batcher.submit(feeds, 1))  # the worker is not started: it stays queued
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="queue of 1 requests is full"):
            await batcher.submit(feeds, 1)
        batcher.start()
        assert (await first).outputs[0].shape == (1, 5)  # once started, the queued request is served
        await batcher.stop()

    run(scenario)


def test_a_request_past_its_timeout_is_rejected_as_triton_does_and_counted(mlp):
    async def scenario():
        async with running(mlp, max_queue_delay_us=10_000_000) as core:
            with pytest.raises(Unavailable, match="^Request timeout expired$"):
                await infer(core, request(rows(1), timeout_us=2000))
            assert stats(core)["inference_stats"]["fail"]["count"] == 1

    run(scenario)


def test_a_cancelled_request_is_neither_counted_nor_held(mlp):
    """A client gone (gRPC cancels the call's task): nothing is counted and the version holds no request."""

    async def scenario():
        async with running(mlp, max_queue_delay_us=10_000_000) as core:
            call = asyncio.ensure_future(infer(core, request(rows(1))))
            await asyncio.sleep(0.01)
            assert core.deployed("mlp").in_flight == 1
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            deployed = core.deployed("mlp")
            assert deployed.in_flight == 0 and deployed.drained.is_set()
            phases = stats(core)["inference_stats"]
            assert (phases["success"]["count"], phases["fail"]["count"]) == (0, 0)

    run(scenario)


# --- the kinds of error -----------------------------------------------------------------------------------

def test_each_kind_of_error_has_one_http_status_and_one_grpc_code():
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc", reason="the gRPC service needs tritonclient[grpc]")
    from yatdeploy.serving.grpc_service import GRPC_CODES

    kinds = set(ProtocolError.__subclasses__())
    assert set(HTTP_STATUS) == kinds == set(GRPC_CODES)
    code = grpc.StatusCode
    assert {kind: (HTTP_STATUS[kind], GRPC_CODES[kind]) for kind in kinds} == {
        InvalidInput: (400, code.INVALID_ARGUMENT), AlreadyExists: (400, code.ALREADY_EXISTS),
        NotFound: (404, code.NOT_FOUND),
        ResourceExhausted: (413, code.RESOURCE_EXHAUSTED), UnsupportedMediaType: (415, code.INVALID_ARGUMENT),
        Internal: (500, code.INTERNAL), Unavailable: (503, code.UNAVAILABLE),
        DeadlineExceeded: (504, code.DEADLINE_EXCEEDED),
    }


def test_unknown_models_and_versions_are_not_found_and_not_counted(mlp):
    async def scenario():
        async with running(mlp) as core:
            with pytest.raises(NotFound) as unknown:
                await infer(core, request(rows(1)), name="nope")
            assert unknown.value.message == "Request for unknown model: 'nope' is not found"
            with pytest.raises(NotFound, match=r"'mlp' version 7 is not found \(served: 1\)"):
                await infer(core, request(rows(1)), version="7")
            assert stats(core)["inference_stats"]["fail"]["count"] == 0

    run(scenario)


def test_a_model_that_did_not_load_is_unavailable_with_its_reason(mlp):
    broken = UnavailableModel("broken", "1", "model 'broken': model.onnx does not load")

    async def scenario():
        async with running(mlp, unavailable=[broken]) as core:
            with pytest.raises(Unavailable, match="'broken' is not ready: model 'broken': model.onnx does not load"):
                await infer(core, request(rows(1)), name="broken")

    run(scenario)


def test_a_request_that_does_not_fit_is_invalid_input_counted_with_its_id(mlp, caplog):
    async def failing_decode(model: ServedModel) -> InferRequest:
        raise InvalidInput("malformed JSON: unexpected end")

    async def scenario():
        async with running(mlp) as core:
            with pytest.raises(InvalidInput, match=r"input 'input': shape \[1, 15\], the model takes \[-1, 16\]"):
                await infer(core, request(np.zeros((1, 15), np.float32), id="short"))
            with pytest.raises(InvalidInput, match="malformed JSON"):
                await core.infer("mlp", None, failing_decode, as_is, request_id="sent-id")
            assert stats(core)["inference_stats"]["fail"]["count"] == 2

    with caplog.at_level("INFO", logger="yatdeploy.serving"):
        run(scenario)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert [(line["id"], line["status"]) for line in lines] == [("short", 400), ("sent-id", 400)]
    assert "shape [1, 15]" in lines[0]["error"] and "malformed JSON" in lines[1]["error"]


def test_a_failure_of_the_model_is_internal_and_logged_with_its_traceback(mlp, caplog, monkeypatch):
    def fail(feeds):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(mlp, "run", fail)

    async def scenario():
        async with running(mlp) as core:
            with pytest.raises(Internal) as failed:
                await infer(core, request(rows(1)))
            assert failed.value.message == "internal error: RuntimeError: injected failure"

    with caplog.at_level("INFO", logger="yatdeploy.serving"):
        run(scenario)
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.exc_info is not None and "500 internal error" in error.getMessage()
    [line] = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
    assert line["status"] == 500 and "error" not in line  # a server failure is its own log line, not the client's


# --- statistics, metrics, readiness -----------------------------------------------------------------------

def test_a_served_model_has_its_metrics_at_zero_before_its_first_request(mlp):
    """As Triton's: a loaded model's counters and histograms are shown at 0; they are made at load, not on the
    first request (whose answer paid ~0.25 ms for making them)."""
    async def scenario():
        async with running(mlp) as core:
            metrics = core.metrics.exposition().decode()
            for line in ('nv_inference_request_success{model="mlp",version="1"} 0.0',
                         'nv_inference_exec_count{model="mlp",version="1"} 0.0',
                         'yatdeploy_request_duration_seconds_count{model="mlp",version="1"} 0.0',
                         'yatdeploy_batch_size_count{model="mlp",version="1"} 0.0'):
                assert line in metrics, line
            assert stats(core)["inference_stats"]["success"]["count"] == 0

    run(scenario)


def test_statistics_and_metrics_count_every_request_once(mlp):
    async def scenario():
        async with running(mlp) as core:
            await infer(core, request(rows(1)))
            await infer(core, request(rows(3)))
            with pytest.raises(InvalidInput):
                await infer(core, request(rows(1)[:, :8]))
            entry = stats(core)
            phases = entry["inference_stats"]
            assert {p: phases[p]["count"] for p in ("success", "fail", "queue", "compute_input", "compute_infer",
                                                     "compute_output")} == \
                {"success": 2, "fail": 1, "queue": 2, "compute_input": 2, "compute_infer": 2, "compute_output": 2}
            assert (entry["inference_count"], entry["execution_count"], entry["last_inference"] > 0) == (4, 2, True)
            assert [(b["batch_size"], b["compute_infer"]["count"]) for b in entry["batch_stats"]] == [(1, 1), (3, 1)]
            assert core.statistics() == [entry]
            metrics = core.metrics.exposition().decode()
            assert 'nv_inference_request_success{model="mlp",version="1"} 2.0' in metrics
            assert 'nv_inference_request_failure{model="mlp",version="1"} 1.0' in metrics
            assert 'nv_inference_count{model="mlp",version="1"} 4.0' in metrics

    run(scenario)


def test_readiness_strict_and_not(mlp, exported_mlp):
    broken = UnavailableModel("broken", "1", "it does not load")

    async def scenario():
        core = InferenceServer([mlp], [broken])
        assert not core.is_ready()  # not started
        await core.start()
        assert not core.is_ready()  # strict (Triton's default): a model asked for is not served
        assert core.model_ready("mlp") == (True, None)
        assert core.model_ready("broken") == (False, "model 'broken' is not ready: it does not load")
        with pytest.raises(NotFound):
            core.model_ready("nope")
        await core.stop()
        lenient = InferenceServer([served(exported_mlp.onnx)], [broken],
                                  settings=ServerSettings(strict_readiness=False))
        await lenient.start()
        assert lenient.is_ready()
        await lenient.stop()

    run(scenario)


# --- repository control -----------------------------------------------------------------------------------

def test_explicit_control_loads_serves_and_unloads(exported_mlp, tmp_path):
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(exported_mlp.onnx, repo / name / "1" / "model.onnx")

    def loader(name: str, config=None):
        return load_models(repo, None, 1, QUIET, only=name, config=config)

    async def scenario():
        core = InferenceServer([], settings=ServerSettings(control_mode="explicit"), loader=loader,
                               repository_models=["a", "b"])
        await core.start()
        assert core.index() == [{"name": "a"}, {"name": "b"}]
        with pytest.raises(Unavailable, match="'a' is not loaded"):
            await infer(core, request(rows(1)), name="a")
        await core.load("a", json.dumps({"max_batch_size": 4}))
        assert core.config("a")["max_batch_size"] == 4
        assert (await infer(core, request(rows(2)), name="a")).outputs[0][1].shape == (2, 5)
        assert core.index(ready_only=True) == [{"name": "a", "version": "1", "state": "READY", "reason": ""}]
        await core.unload("a")
        with pytest.raises(Unavailable, match=r"'a' is not loaded \(unloaded\)"):
            await infer(core, request(rows(1)), name="a")
        assert core.index()[0] == {"name": "a", "state": "UNAVAILABLE", "reason": "unloaded"}
        with pytest.raises(InvalidInput, match="failed to unload 'c': no such model in the repository"):
            await core.unload("c")
        with pytest.raises(InvalidInput, match="model files sent with the request"):
            await core.load("b", None, ["file:1/model.onnx"])
        await core.stop()

    run(scenario)


def test_control_is_refused_in_mode_none(mlp):
    async def scenario():
        async with running(mlp) as core:
            with pytest.raises(InvalidInput, match="explicit model load is not allowed"):
                await core.load("mlp")
            with pytest.raises(InvalidInput, match="explicit model unload is not allowed"):
                await core.unload("mlp")

    run(scenario)


# --- the protocol's wire format ---------------------------------------------------------------------------

def test_a_request_parses_from_json_and_binary_tensors():
    x = rows(2)
    header = json.dumps({"id": "p-1", "inputs": [
        {"name": "a", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
        {"name": "b", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 3]]}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True, "classification": 2}}],
        "parameters": {"timeout": 500, "binary_data_output": True}}).encode()
    parsed = parse_request(header + x.tobytes(), str(len(header)))
    np.testing.assert_array_equal(parsed.inputs["a"], x)
    assert parsed.inputs["b"].tolist() == [[1, 2, 3]] and parsed.input_datatypes == {"a": "FP32", "b": "INT64"}
    assert (parsed.id, parsed.timeout_us, parsed.binary_default) == ("p-1", 500, True)
    assert parsed.outputs == [RequestedOutput("y", True, 2)]
    with pytest.raises(ResourceExhausted, match="exceeds the JSON limit of 10 bytes"):
        parse_request(header, None, max_json_bytes=10)
    with pytest.raises(InvalidInput, match="'data' must be a list"):
        parse_request(b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": 1}]}', None)
    raw = parse_raw_request(x.tobytes(), "input", "FP32", (-1, 16))  # the batch deduced from the size
    assert raw.inputs["input"].shape == (2, 16) and raw.binary_default


def test_a_response_encodes_json_and_binary_outputs():
    y = np.array([[1.5, np.nan], [np.inf, -2.0]], np.float32)
    labels = np.array(["a", "é"], dtype=object)
    body, length = encode_response("m", "1", "r", [("y", y, False), ("labels", labels, True)])
    header = json.loads(body[:length])
    assert header["model_name"] == "m" and header["id"] == "r"
    assert header["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [2, 2],
                                    "data": [1.5, "NaN", "Infinity", -2.0]}
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 4 + 1 + 4 + 2}
    assert body[length:] == b"\x01\x00\x00\x00a\x02\x00\x00\x00" + "é".encode()
    body, length = encode_response("m", "1", None, [("y", y[:1, :1], False)])
    assert length is None and "id" not in json.loads(body)


# --- the transports' handlers, in process -----------------------------------------------------------------

def test_the_http_endpoints_answer_through_the_core_in_process(mlp, exported_mlp):
    httpx = pytest.importorskip("httpx")
    from yatdeploy.serving.app import ROUTES, create_app
    from yatdeploy.serving.lm_endpoints import LM_ROUTES

    x = rows(2)

    async def scenario():
        async with running(mlp) as core:
            app = create_app(core)
            v2 = ("/v2", "/metrics")
            assert [(sorted(r.methods)[0], r.path) for r in app.routes if r.path.startswith(v2)] == \
                [(method, path) for method, path, _ in [*ROUTES, *LM_ROUTES] if path.startswith(v2)]
            transport = httpx.ASGITransport(app=app)  # no socket: the ASGI app called directly
            async with httpx.AsyncClient(transport=transport, base_url="http://core") as client:
                assert (await client.get("/v2/health/ready")).json() == {"ready": True}
                body = {"id": "h-1", "inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32",
                                                 "data": x.ravel().tolist()}]}
                answer = await client.post("/v2/models/mlp/infer", json=body)
                assert answer.status_code == 200 and answer.json()["id"] == "h-1"
                got = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(2, 5)
                np.testing.assert_allclose(got, reference(exported_mlp.onnx, x), rtol=1e-5, atol=1e-6)
                unknown = await client.post("/v2/models/nope/infer", json=body)
                assert (unknown.status_code, unknown.json()) == \
                    (404, {"error": "Request for unknown model: 'nope' is not found"})
                bad = await client.post("/v2/models/mlp/infer", content=b'{"inputs": [')
                assert bad.status_code == 400 and bad.json()["error"].startswith("malformed JSON")
                assert (await client.get("/v2/models/mlp/stats")).json()["model_stats"][0]["inference_stats"][
                    "fail"]["count"] == 1

    run(scenario)


def test_the_grpc_servicer_answers_through_the_core_in_process(mlp, exported_mlp):
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc", reason="the gRPC service needs tritonclient[grpc]")
    from tritonclient.grpc import service_pb2

    from yatdeploy.serving.grpc_service import InferenceServicer
    from yatdeploy.serving.protocol import BodyBudget

    class Aborted(Exception):
        pass

    class Context:
        """What the servicer asks of grpc.aio's context: abort(code, details), which ends the call."""

        async def abort(self, code, details):
            self.code, self.details = code, details
            raise Aborted

    def message(model: str, x: np.ndarray) -> service_pb2.ModelInferRequest:
        built = service_pb2.ModelInferRequest(model_name=model, id="g-1", raw_input_contents=[x.tobytes()])
        built.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
        return built

    x = rows(3)

    async def scenario():
        async with running(mlp) as core:
            servicer = InferenceServicer(core, BodyBudget(1 << 20))
            response = await servicer.ModelInfer(message("mlp", x), Context())
            assert (response.model_name, response.id, list(response.outputs[0].shape)) == ("mlp", "g-1", [3, 5])
            got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 5)
            np.testing.assert_allclose(got, reference(exported_mlp.onnx, x), rtol=1e-5, atol=1e-6)
            for model, x_sent, code, details in (
                ("nope", x, grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'nope' is not found"),
                ("mlp", x[:, :8], grpc.StatusCode.INVALID_ARGUMENT, "input 'input': shape [3, 8], the model takes"),
            ):
                context = Context()
                with pytest.raises(Aborted):
                    await servicer.ModelInfer(message(model, x_sent), context)
                assert context.code == code and context.details.startswith(details)

    run(scenario)


def test_a_merged_batch_whose_output_is_not_batched_fails_every_request_of_it(tmp_path):
    """A model whose declared batch output comes back with other rows (here: always the first row) can't be split
    among the requests merged into its batch: each gets an Internal error, none a wrong part or no answer."""
    import onnx
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info
    constants = [helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], [v]))
                 for name, v in (("zero", 0), ("one", 1))]
    graph = helper.make_graph([*constants, helper.make_node("Slice", ["x", "zero", "one", "zero"], ["y"])], "first",
                              [value("x", TensorProto.FLOAT, ["N", 2])], [value("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "first.onnx"))

    async def scenario():
        async with running(served(tmp_path / "first.onnx"), max_queue_delay_us=200_000) as core:
            asked = [InferRequest(id=None, inputs={"x": np.full((1, 2), i, np.float32)}, input_datatypes={"x": "FP32"})
                     for i in range(3)]
            answers = await asyncio.wait_for(
                asyncio.gather(*(core.infer("first", None, given(a), as_is) for a in asked), return_exceptions=True),
                10)
            assert all(isinstance(a, Internal) and "for a batch of 3" in a.message for a in answers), answers

    run(scenario)
