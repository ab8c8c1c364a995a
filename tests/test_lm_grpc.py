"""A decoder export's generation over gRPC (ModelStreamInfer, as Triton streams a decoupled model) and its metrics
and statistics (vLLM's names at /metrics, the generation counts in /stats), driven with tritonclient.grpc against
`yatdeploy serve` of a Yat GPT exported with its KV cache and the bytes tokenizer; tokens are checked against the
PyTorch model's own greedy generation (full recompute)."""

from __future__ import annotations

import json
import queue
import time

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="the gRPC tests need tritonclient[grpc]")
import tritonclient.grpc as grpcclient  # noqa: E402
import torch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import yatdeploy  # noqa: E402
from tests.model_zoo import yat_gpt  # noqa: E402
from tests.servers import Server  # noqa: E402
from yatdeploy.serving.text import TextCodec  # noqa: E402

pytestmark = pytest.mark.slow  # one export, one server subprocess

VOCABULARY, CONTEXT = 260, 512  # the bytes tokenizer's ids; a context long enough to cancel a generation in
FINAL = "triton_final_response"


def _model() -> torch.nn.Module:
    return yat_gpt(vocabulary=VOCABULARY, context=CONTEXT)  # seeded: the same weights each time


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "gpt.onnx"
    yatdeploy.export(_model(), path=path, kv_cache=True, tokenizer="bytes", validate=False)
    return path


@pytest.fixture(scope="module")
def server(exported):
    running = Server(exported)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def codec(exported):
    return TextCodec.beside(exported)


def _greedy(prompt: list[int], count: int) -> list[int]:
    """PyTorch's greedy continuation of `prompt`: the whole sequence recomputed for every token."""
    model, ids = _model(), list(prompt)
    with torch.inference_mode():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _text_input(text: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return tensor


def _ids_input(ids: list[int], datatype: str = "INT64") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input_ids", [1, len(ids)], datatype)
    tensor.set_data_from_numpy(np.array([ids], np.int64 if datatype == "INT64" else np.int32))
    return tensor


class Streaming:
    """A tritonclient stream whose callback collects (result, error) pairs."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, model: str, inputs, request_id: str, **parameters) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, parameters=parameters or None)

    def next(self, timeout: float = 60):
        return self.answers.get(timeout=timeout)

    def generation(self) -> tuple[list[int], str, str]:
        """The next generation's tokens, text and finish reason (its responses read to the final one)."""
        tokens, text = [], ""
        while True:
            result, error = self.next()
            assert error is None, error
            response = result.get_response()
            tokens.append(int(result.as_numpy("token_id")[0]))
            text += result.as_numpy("text_output")[0].decode()
            if response.parameters[FINAL].bool_param:
                return tokens, text, result.as_numpy("finish_reason")[0].decode()
            assert result.as_numpy("finish_reason") is None

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


@pytest.fixture
def streaming(server):
    opened = Streaming(server.grpc_url)
    yield opened
    opened.close()


def _metrics(server) -> dict[str, float]:
    """/metrics' samples of the served model, by name and labels, parsed with prometheus_client's parser."""
    status, body = server.get("/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("model_name", "version")}
            if sample.labels.get("model_name", "gpt") == "gpt":
                samples[sample.name + (json.dumps(labels, sort_keys=True) if labels else "")] = sample.value
    return samples


def _wait_until_idle(server, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = _metrics(server)
        if samples["vllm:num_requests_running"] == 0 and samples["vllm:num_requests_waiting"] == 0:
            return samples
        assert time.monotonic() < deadline, "the engine still runs sequences"
        time.sleep(0.05)


def test_a_text_prompt_streams_pytorchs_greedy_tokens_one_response_each(streaming, codec):
    prompt = "Yat serving"
    expected = _greedy(codec.encode(prompt), 12)
    streaming.send("gpt", [_text_input(prompt)], "g1", max_tokens=12, temperature=0, ignore_eos=True)
    tokens, text, reason = streaming.generation()
    assert tokens == expected
    assert reason == "length"
    assert text == codec.decode(expected)


def test_token_ids_in_int32_and_the_answers_ids(streaming):
    prompt = [5, 80, 120, 33, 7]
    streaming.send("gpt", [_ids_input(prompt, "INT32")], "ids", max_tokens=6, temperature=0.0)
    result, error = streaming.next()
    assert error is None
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("ids", "gpt", "1")
    assert {o.name: o.datatype for o in response.outputs} == {"text_output": "BYTES", "token_id": "INT64"}
    tokens = [int(result.as_numpy("token_id")[0])]
    rest, _, _ = streaming.generation()
    assert tokens + rest == _greedy(prompt, 6)


def test_two_generations_on_one_stream_each_get_their_own_tokens(streaming, codec):
    prompts = {"a": "first prompt", "b": "a second, longer prompt"}
    for request_id, prompt in prompts.items():
        streaming.send("gpt", [_text_input(prompt)], request_id, max_tokens=20, temperature=0, ignore_eos=True)
    got: dict[str, list[int]] = {"a": [], "b": []}
    finished = set()
    while finished != {"a", "b"}:
        result, error = streaming.next()
        assert error is None, error
        response = result.get_response()
        got[response.id].append(int(result.as_numpy("token_id")[0]))
        if response.parameters[FINAL].bool_param:
            finished.add(response.id)
    for request_id, prompt in prompts.items():
        assert got[request_id] == _greedy(codec.encode(prompt), 20)


def test_stop_token_ids_seeded_sampling_and_chosen_outputs(streaming, codec):
    prompt = codec.encode("stop here")
    greedy = _greedy(prompt, 10)
    stop = greedy[4]
    streaming.send("gpt", [_ids_input(prompt)], "stop", max_tokens=10, temperature=0, stop_token_ids=stop)
    tokens, _, reason = streaming.generation()
    assert tokens == greedy[:greedy.index(stop) + 1] and reason == "stop"
    runs = []
    for i in range(2):
        streaming.send("gpt", [_ids_input(prompt)], f"seed{i}", max_tokens=8, temperature=1.0, top_k=50, top_p=0.9,
                       seed=1234)
        runs.append(streaming.generation()[0])
    assert runs[0] == runs[1]
    streaming.client.async_stream_infer("gpt", [_ids_input(prompt)], request_id="only text", parameters={
        "max_tokens": 2}, outputs=[grpcclient.InferRequestedOutput("text_output")])
    for _ in range(2):
        result, error = streaming.next()
        assert error is None and [o.name for o in result.get_response().outputs] == ["text_output"]


def test_errors_arrive_in_the_stream_and_it_goes_on(streaming):
    streaming.send("nope", [_text_input("x")], "unknown")
    streaming.send("gpt", [_ids_input([1] * CONTEXT)], "too long")
    streaming.send("gpt", [_ids_input([1, 2, 3])], "past the context", max_tokens=CONTEXT)
    streaming.send("gpt", [_ids_input([1, 2])], "bad parameter", max_new_tokens=3)
    streaming.send("gpt", [_ids_input([1, 2])], "bad value", temperature="hot")
    streaming.client.async_stream_infer("gpt", [_ids_input([1, 2])], request_id="late", timeout=1,
                                        parameters={"max_tokens": 400})
    errors = sorted(str(streaming.next()[1]) for _ in range(6))
    assert any("Request for unknown model: 'nope' is not found" in e for e in errors)
    assert any(f"the prompt has {CONTEXT} tokens; the model's context is {CONTEXT} tokens" in e for e in errors)
    assert any(f"max_tokens {CONTEXT} with a prompt of 3 tokens is past the model's context of {CONTEXT}" in e
               for e in errors)
    assert any("parameter 'max_new_tokens' is not one a generation takes" in e for e in errors)
    assert any("parameter 'temperature': a number, not 'hot'" in e for e in errors)
    assert any("the request's timeout of 1 µs expired before its generation ended" in e for e in errors)
    streaming.send("gpt", [_ids_input([1, 2])], "after", max_tokens=2, temperature=0)
    assert len(streaming.generation()[0]) == 2


def test_cancelling_the_stream_frees_the_sequence(server):
    cancelled = Streaming(server.grpc_url)
    cancelled.send("gpt", [_ids_input([3, 1, 4, 1, 5])], "long", max_tokens=CONTEXT - 10, temperature=0,
                   ignore_eos=True)
    result, error = cancelled.next()
    assert error is None and not result.get_response().parameters[FINAL].bool_param
    cancelled.close(cancel=True)
    _wait_until_idle(server)
    status, body = server.get("/v2/models/gpt/stats")
    generation = json.loads(body)["model_stats"][0]["generation"]
    assert status == 200 and generation["requests_cancelled"] >= 1
    assert generation["running"] == 0 and generation["kv_cache_usage"] == 0.0
    status, body = server.get("/metrics")
    aborted = [line for line in body.decode().splitlines()
               if line.startswith("vllm:request_success_total{") and 'finished_reason="abort"' in line]
    assert status == 200 and aborted and float(aborted[0].rsplit(" ", 1)[1]) >= 1  # as vLLM counts a cancel


def test_the_raw_decoder_still_answers_model_infer_and_a_stream_once(server):
    ids = np.array([[10, 20, 30, 40]], np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        metadata = client.get_model_metadata("gpt")
        past = [i for i in metadata.inputs if i.name.startswith("past_key_values")]
        tensors = []
        for name, array in inputs.items():
            tensors.append(grpcclient.InferInput(name, list(array.shape), "INT64"))
            tensors[-1].set_data_from_numpy(array.astype(np.int64))
        for info in past:
            shape = [1, int(info.shape[1]), 0, int(info.shape[3])]
            tensors.append(grpcclient.InferInput(info.name, shape, info.datatype))
            tensors[-1].set_data_from_numpy(np.zeros(shape, np.float32))
        logits = client.infer("gpt", tensors, outputs=[grpcclient.InferRequestedOutput("logits")]).as_numpy("logits")
    with torch.inference_mode():
        expected = _model()(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    stream = Streaming(server.grpc_url)
    try:
        stream.client.async_stream_infer("gpt", tensors, request_id="raw",
                                         outputs=[grpcclient.InferRequestedOutput("logits")])
        result, error = stream.next()
        assert error is None and result.get_response().parameters[FINAL].bool_param
        np.testing.assert_allclose(result.as_numpy("logits"), logits)
    finally:
        stream.close()


def test_metrics_count_every_token_and_the_gauges_return_to_zero(server, streaming, codec):
    before = _wait_until_idle(server)
    prompts = ["one", "two words", "three words here"]
    lengths = [5, 9, 3]
    for i, (prompt, count) in enumerate(zip(prompts, lengths)):
        streaming.send("gpt", [_text_input(prompt)], f"m{i}", max_tokens=count, temperature=0, ignore_eos=True)
    for _ in prompts:
        streaming.generation()
    after = _wait_until_idle(server)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    generated, requests = sum(lengths), len(prompts)
    assert grew("vllm:time_to_first_token_seconds_count") == requests
    assert grew("vllm:inter_token_latency_seconds_count") == generated - requests
    assert grew("vllm:time_per_output_token_seconds_count") == generated - requests
    assert grew("vllm:generation_tokens_total") == generated
    assert grew("vllm:prompt_tokens_total") == sum(len(codec.encode(p)) for p in prompts)
    assert grew('vllm:request_success_total{"finished_reason": "length"}') == requests
    assert grew("vllm:request_generation_tokens_sum") == generated
    assert grew("vllm:time_to_first_token_seconds_sum") > 0
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    status, body = server.get("/v2/models/gpt/stats")
    stats = json.loads(body)["model_stats"][0]
    assert stats["generation"]["running"] == 0 and stats["generation"]["generation_tokens"] >= generated
    with grpcclient.InferenceServerClient(server.grpc_url) as client:  # Triton's schema: gRPC still reads it
        assert client.get_inference_statistics("gpt").model_stats[0].name == "gpt"
