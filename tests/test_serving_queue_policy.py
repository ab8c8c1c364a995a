"""Queue policies and cancellation on a real server (issue 25): Triton's priority levels and queue policies from
config.pbtxt, the request's `priority` and `timeout` parameters over HTTP and gRPC, requests whose queue timeout
passes answered while a long batch runs and never run, exact per-level queue limits, and requests whose client
goes away taken out of the queue (the statistics' execution counts prove what ran)."""

from __future__ import annotations

import http.client
import json
import queue
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conformance_models import slow_repository  # noqa: E402
from tests.servers import Server  # noqa: E402

LONG = 2000  # the slow model's iterations for a run of about a second
# The occupying run (_occupy): every step a test takes while it runs (sends, waits on /metrics, cancels) must end
# before it does, also on a loaded 2-core machine, where a run of about a second was once outlasted.
OCCUPY = 4 * LONG
POLICY = "default_queue_policy { timeout_action: %s allow_timeout_override: true max_queue_size: 8 }"
CONFIGS = {
    "reject": "max_batch_size: 1\ndynamic_batching { %s }" % (POLICY % "REJECT"),
    "delay": "max_batch_size: 1\ndynamic_batching { %s }" % (POLICY % "DELAY"),
    "levels": """max_batch_size: 1
dynamic_batching {
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 3 allow_timeout_override: true }
  priority_queue_policy { key: 1 value: { max_queue_size: 2 } }
}""",
    "cancel": "max_batch_size: 1\ndynamic_batching { }",
    "strict": "max_batch_size: 1\ndynamic_batching { default_queue_policy { default_timeout_microseconds: 10000000 }"
              " }",
}


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    running = Server(slow_repository(tmp_path_factory.mktemp("queue-policy"), CONFIGS))
    yield running
    running.stop()


def _tensor(module, value: float):
    tensor = module.InferInput("x", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.full((1, 1), value, np.float32))
    return tensor


class Calls:
    """gRPC calls sent one after another from one channel, each answer recorded in the order it came."""

    def __init__(self, server: Server) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.answers: queue.Queue = queue.Queue()
        self.contexts = {}

    def send(self, label: str, model: str, value: float, **options) -> None:
        def done(result, error) -> None:
            self.answers.put((label, "ok" if error is None else f"{error.status()} {error.message()}"))

        self.contexts[label] = self.client.async_infer(model, [_tensor(grpcclient, value)], done, **options)

    def next(self) -> tuple[str, str]:
        return self.answers.get(timeout=120)


def _stats(server: Server, model: str) -> dict:
    return json.loads(server.get(f"/v2/models/{model}/stats")[1])["model_stats"][0]


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def _occupy(server: Server, model: str) -> Calls:
    """The model's worker running a long request with nothing queued: two long calls, one of them queued behind
    the other (which one, gRPC does not say), then both cancelled (the running one runs on). Its stats then
    count 2 cancels and, once it ends, 1 execution."""
    calls = Calls(server)
    calls.send("first", model, OCCUPY)
    calls.send("second", model, OCCUPY)
    _wait_for(lambda: server.pending(model) == 1, "one long call running, the other queued")
    calls.contexts["first"].cancel()
    calls.contexts["second"].cancel()
    _wait_for(lambda: server.pending(model) == 0, "the queued long call out of the queue")
    assert sorted(calls.next()[0] for _ in range(2)) == ["first", "second"]  # the client's cancels
    return calls


def _ran(server: Server, model: str, before: dict) -> int:
    """How many batches the model has run since `before`, once nothing is waiting or running."""
    _wait_for(lambda: server.pending(model) == 0 and int(_stats(server, model)["execution_count"]) >
              int(before["execution_count"]), "the long request's run ended")
    return int(_stats(server, model)["execution_count"]) - int(before["execution_count"])


def test_the_queue_policy_is_read_and_shown_in_the_model_config(queue_server):
    config = json.loads(queue_server.get("/v2/models/levels/config")[1])["dynamic_batching"]
    assert (config["priority_levels"], config["default_priority_level"]) == (2, 2)
    assert config["default_queue_policy"] == {"timeout_action": "REJECT", "default_timeout_microseconds": 0,
                                              "allow_timeout_override": True, "max_queue_size": 3}
    assert config["priority_queue_policy"]["1"]["max_queue_size"] == 2
    over_grpc = grpcclient.InferenceServerClient(queue_server.grpc_url).get_model_config("delay", as_json=True)
    assert over_grpc["config"]["dynamic_batching"]["default_queue_policy"]["timeout_action"] == "DELAY"


def test_expired_requests_are_answered_while_a_long_batch_runs_and_never_run(queue_server):
    """Requests queued behind a long run with a 50 ms timeout are answered UNAVAILABLE "Request timeout
    expired" (Triton's code and words) while it still runs, over gRPC and HTTP, and never run."""
    before = _stats(queue_server, "reject")
    calls = _occupy(queue_server, "reject")
    for index in range(3):
        calls.send(f"expiring-{index}", "reject", LONG, timeout=50_000)
    with httpclient.InferenceServerClient(queue_server.url) as client:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("reject", [_tensor(httpclient, LONG)], timeout=50_000)
    assert caught.value.status() == "503" and caught.value.message() == "Request timeout expired"
    assert sorted(calls.next() for _ in range(3)) == [
        (f"expiring-{i}", "StatusCode.UNAVAILABLE Request timeout expired") for i in range(3)]
    assert int(_stats(queue_server, "reject")["execution_count"]) == int(before["execution_count"])  # still running
    assert _ran(queue_server, "reject", before) == 1  # only the long request ran
    after = _stats(queue_server, "reject")
    assert int(after["inference_stats"]["fail"]["count"]) - int(before["inference_stats"]["fail"]["count"]) == 4
    assert after["cancel"]["count"] - before["cancel"]["count"] == 2


def test_higher_priority_runs_first(queue_server):
    """With the worker busy, two priority-1 requests sent after two of the default level (2) run before them."""
    calls = _occupy(queue_server, "levels")
    for index in range(2):
        calls.send(f"low-{index}", "levels", 10)
    _wait_for(lambda: queue_server.pending("levels") == 2, "the low requests queued")
    for index in range(2):
        calls.send(f"high-{index}", "levels", 10, priority=1)
    _wait_for(lambda: queue_server.pending("levels") == 4, "the four requests queued behind the long run")
    order = [calls.next()[0] for _ in range(4)]
    assert sorted(order[:2]) == ["high-0", "high-1"] and sorted(order[2:]) == ["low-0", "low-1"]


def test_max_queue_size_is_exact_per_level_and_cancelled_calls_leave_the_queue(queue_server):
    """Level 2 takes 3 waiting requests, level 1 takes 2: the next of each is refused at once. Then every
    queued call is cancelled: they leave the queue unrun, counted in the statistics' `cancel`."""
    before = _stats(queue_server, "levels")
    calls = _occupy(queue_server, "levels")
    for index in range(3):
        calls.send(f"low-{index}", "levels", LONG)
    _wait_for(lambda: queue_server.pending("levels") == 3, "level 2 full")
    calls.send("low-3", "levels", LONG)
    assert calls.next() == ("low-3", "StatusCode.UNAVAILABLE model 'levels' is overloaded: its queue of 3 requests "
                                     "is full (priority level 2)")
    for index in range(2):
        calls.send(f"high-{index}", "levels", LONG, priority=1)
    _wait_for(lambda: queue_server.pending("levels") == 5, "level 1 full")
    calls.send("high-2", "levels", LONG, priority=1)
    assert calls.next() == ("high-2", "StatusCode.UNAVAILABLE model 'levels' is overloaded: its queue of 2 requests "
                                      "is full (priority level 1)")
    for label in ("low-0", "low-1", "low-2", "high-0", "high-1"):
        calls.contexts[label].cancel()
    _wait_for(lambda: queue_server.pending("levels") == 0, "the cancelled calls out of the queue")
    assert sorted(calls.next()[0] for _ in range(5)) == ["high-0", "high-1", "low-0", "low-1", "low-2"]
    assert _ran(queue_server, "levels", before) == 1
    assert _stats(queue_server, "levels")["cancel"]["count"] - before["cancel"]["count"] == 2 + 5
    metrics = queue_server.get("/metrics")[1].decode()
    assert 'yatdeploy_inference_request_cancelled{model="levels",version="1"}' in metrics


def test_delay_runs_an_expired_request_after_the_others_of_its_level(queue_server):
    calls = _occupy(queue_server, "delay")
    calls.send("expired", "delay", 10, timeout=1_000)
    _wait_for(lambda: queue_server.pending("delay") == 1, "the expiring request queued")
    calls.send("on-time-0", "delay", 10)
    calls.send("on-time-1", "delay", 10)
    _wait_for(lambda: queue_server.pending("delay") == 3, "the others queued")
    answers = [calls.next() for _ in range(3)]
    assert sorted(answers[:2]) == [("on-time-0", "ok"), ("on-time-1", "ok")] and answers[2] == ("expired", "ok")


def test_without_allow_timeout_override_the_policy_default_applies(queue_server):
    """`strict` states a 10 s default and no override: a request's 1 µs timeout is ignored, it runs."""
    with httpclient.InferenceServerClient(queue_server.url) as client:
        assert client.infer("strict", [_tensor(httpclient, 1)], timeout=1).as_numpy("y").tolist() == [[1.0]]


def test_a_grpc_call_past_its_deadline_leaves_the_queue(queue_server):
    before = _stats(queue_server, "cancel")
    calls = _occupy(queue_server, "cancel")
    calls.send("impatient", "cancel", LONG, client_timeout=0.3)
    assert calls.next() == ("impatient", "StatusCode.DEADLINE_EXCEEDED Deadline Exceeded")
    _wait_for(lambda: _stats(queue_server, "cancel")["cancel"]["count"] - before["cancel"]["count"] == 3,
              "the call's cancel counted")
    assert _ran(queue_server, "cancel", before) == 1


def test_an_http_client_that_disconnects_leaves_the_queue(queue_server):
    before = _stats(queue_server, "cancel")
    _occupy(queue_server, "cancel")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [LONG]}]}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", queue_server.port, timeout=30)
    connection.request("POST", "/v2/models/cancel/infer", body=body)
    _wait_for(lambda: queue_server.pending("cancel") == 1, "the request queued")
    connection.close()
    _wait_for(lambda: queue_server.pending("cancel") == 0, "the request out of the queue")
    assert _stats(queue_server, "cancel")["cancel"]["count"] - before["cancel"]["count"] == 3
    assert _ran(queue_server, "cancel", before) == 1


@pytest.mark.parametrize("parameters,message", [
    ({"priority": 3}, "'priority' parameter 3 is not a priority level of model 'levels': 1 (highest) to 2"),
    ({"priority": -1}, "'priority' parameter must be a priority level >= 0"),
    ({"priority": "high"}, "'priority' parameter must be a priority level >= 0"),
    ({"timeout": -5}, "'timeout' parameter must be a number of microseconds >= 0"),
])
def test_bad_priority_and_timeout_values_are_refused_naming_the_parameter(queue_server, parameters, message):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1]}],
                       "parameters": parameters}).encode()
    status, answer = queue_server.post("/v2/models/levels/infer", body)
    assert status == 400 and message in answer["error"]


def test_a_priority_outside_the_levels_is_invalid_argument_over_grpc(queue_server):
    client = grpcclient.InferenceServerClient(queue_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("levels", [_tensor(grpcclient, 1)], priority=5)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and "'priority' parameter 5" in caught.value.message()
