"""Serving language models over HTTP: the OpenAI-compatible API (driven with the real `openai` client and with raw
server-sent events over httpx) and Triton's generate extension, on a Yat GPT exported with its KV cache; every
generated token checked against PyTorch's own greedy run (argmax, full recompute).

One server serves a repository of the same export three ways: "gpt" (a byte tokenizer, id = UTF-8 byte, and a chat
template), "plain" (the byte tokenizer, no chat template) and "ids" (no tokenizer: token-id prompts only). It runs
in this process, on 127.0.0.1 (uvicorn in a thread, the app `yatdeploy serve` runs), so that the tests can read its
engines' state: a client that disconnects must leave no sequence running and no KV cache held. The last test runs
`yatdeploy serve` itself in a subprocess. The request parsing and answers are tested first, without a server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
pytest.importorskip("tokenizers", reason="the service extra is not installed")
openai = pytest.importorskip("openai", reason="the test extra is not installed")
import httpx  # noqa: E402

from tests.servers import Server, free_port  # noqa: E402
from yatdeploy.serving.generation import SamplingParams  # noqa: E402
from yatdeploy.serving.lm_endpoints import (  # noqa: E402
    Generated,
    OpenAIAnswer,
    chat_request,
    completion_request,
    generate_request,
    openai_error,
)
from yatdeploy.serving.protocol import HTTP_STATUS, InvalidInput, NotFound, Unavailable  # noqa: E402

CONTEXT = 1024  # long enough that a stream is still generating when its client goes
VOCABULARY = 260  # >= 256: the byte tokenizer's ids
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
WAIT_S = 30.0  # the longest a condition is polled for


def chat_prompt(messages: list[dict]) -> str:
    """CHAT_TEMPLATE rendered by hand."""
    return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


# --- request parsing and answers, without a server -----------------------------------------------------------

def test_a_completion_request_reads_its_prompt_and_sampling_fields():
    asked = completion_request({"model": "gpt", "prompt": "hi", "max_tokens": 5, "temperature": 0, "top_k": 3,
                                "seed": 1, "stop": "\n", "stop_token_ids": [7], "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}, "user": "ignored"})
    assert (asked.model, asked.prompt, asked.stream, asked.include_usage) == ("gpt", "hi", True, True)
    assert asked.params == SamplingParams(max_tokens=5, temperature=0.0, top_k=3, seed=1, stop=("\n",),
                                          stop_token_ids=(7,), ignore_eos=True)
    assert completion_request({"model": "m", "prompt": [1, 2]}).prompt == [1, 2]
    assert completion_request({"model": "m", "prompt": [[1, 2]]}).prompt == [1, 2]  # a list of one prompt
    assert completion_request({"model": "m", "prompt": ["x"], "n": 1, "echo": False, "logprobs": None}).prompt == "x"
    defaults = completion_request({"model": "m", "prompt": "x", "max_tokens": None, "seed": None, "stop": None})
    assert defaults.params == SamplingParams() and defaults.params.max_tokens == 16


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x"}, "'model' must name the model"),
    ({"model": "m", "prompt": ["a", "b"]}, "'prompt' holds 2 prompts: one prompt per request"),
    ({"model": "m", "prompt": [[1], [2]]}, "'prompt' holds 2 prompts"),
    ({"model": "m", "prompt": {"text": "x"}}, "'prompt' must be a string or a list of token ids"),
    ({"model": "m", "prompt": []}, "'prompt' must be a string or a list of token ids"),
    ({"model": "m", "prompt": "x", "n": 2}, "'n' 2 is not supported: one completion per request"),
    ({"model": "m", "prompt": "x", "echo": True}, "'echo' true is not supported"),
    ({"model": "m", "prompt": "x", "logprobs": 1}, "'logprobs' 1 is not supported: log probabilities"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens 0: a whole number of at least 1"),
    ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "'max_tokens' must be a whole number, not a number"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "'temperature' must be a number, not a string"),
    ({"model": "m", "prompt": "x", "top_p": 0}, "top_p 0.0: greater than 0, at most 1"),
    ({"model": "m", "prompt": "x", "stop": [1]}, "'stop' must be a string or a list of strings"),
    ({"model": "m", "prompt": "x", "stop_token_ids": ["a"]}, "'stop_token_ids' must be a list of token ids"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "'stream_options' is for streamed"),
])
def test_a_completion_request_that_cant_be_served_is_invalid_naming_the_field(body, message):
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(")):
        completion_request(body)


def test_a_chat_request_reads_messages_and_takes_the_rest_of_the_context_by_default():
    asked = chat_request({"model": "gpt", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]})
    assert asked.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    assert not asked.max_tokens_given
    assert chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}],
                         "max_completion_tokens": 4}).params.max_tokens == 4
    for body, message in [
        ({"model": "m", "messages": []}, "'messages' must be a list of messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, r"messages\[0\] must be an object with a 'role'"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
          "max_completion_tokens": 2}, "not both"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         "'tools' .* is not supported"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            chat_request(body)


def test_a_generate_request_takes_its_fields_at_the_top_or_in_parameters():
    top = generate_request({"text_input": "hi", "max_tokens": 3, "temperature": 0, "id": "r1"}, "gpt", None)
    nested = generate_request({"text_input": "hi", "parameters": {"max_tokens": 3, "temperature": 0}}, "gpt", "1")
    assert top.params == nested.params == SamplingParams(max_tokens=3, temperature=0.0)
    assert (top.request_id, nested.version) == ("r1", "1")
    assert generate_request({"input_ids": [5, 6]}, "gpt", None).prompt == [5, 6]
    assert generate_request({"text_input": ["x"]}, "gpt", None).prompt == "x"  # a tensor of one string
    for body, message in [({}, "give the prompt as 'text_input'"),
                          ({"text_input": "x", "input_ids": [1]}, "one of them"),
                          ({"input_ids": "x"}, "'input_ids' must be a list of token ids"),
                          ({"text_input": "x", "max_tokens": 2, "parameters": {"max_tokens": 3}},
                           "'max_tokens' is given both at the top level and in 'parameters'")]:
        with pytest.raises(InvalidInput, match=message):
            generate_request(body, "gpt", None)


def test_openai_answers_and_errors_are_spelled_as_openai_spells_them():
    generated = Generated("hi!", [104, 105, 33], "length", 4, 3)
    completion = OpenAIAnswer(False, "gpt", "cmpl-1", 7).whole(generated)
    assert completion == {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "gpt",
                          "choices": [{"index": 0, "text": "hi!", "logprobs": None, "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}}
    chat = OpenAIAnswer(True, "gpt", "chatcmpl-1", 7, return_token_ids=True)
    assert chat.whole(generated)["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi!"},
                                                 "logprobs": None, "finish_reason": "length",
                                                 "token_ids": [104, 105, 33]}]
    assert chat.chunk("", None, role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunk = chat.chunk("!", "stop", 33, with_usage=True)
    assert (chunk["object"], chunk["choices"][0]["delta"], chunk["choices"][0]["token_ids"], chunk["usage"]) == \
        ("chat.completion.chunk", {"content": "!"}, [33], None)
    assert chat.usage_chunk(4, 3)["choices"] == []
    assert openai_error(NotFound("no such model")) == {"error": {
        "message": "no such model", "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
    assert openai_error(Unavailable("busy"))["error"]["type"] == "server_error"
    assert HTTP_STATUS[Unavailable] == 503


# --- the models served and their PyTorch reference -----------------------------------------------------------

@dataclass
class LanguageModels:
    repository: Path  # gpt, plain, ids: the same export with a chat template, without one, without a tokenizer
    onnx: Path  # the export itself, its tokenizer beside it
    torch_model: object

    def greedy(self, prompt: list[int] | str, count: int) -> list[int]:
        """PyTorch's greedy continuation of `prompt` (text: its UTF-8 bytes): argmax over a full recompute."""
        import torch

        ids = list(prompt.encode()) if isinstance(prompt, str) else list(prompt)
        start = len(ids)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this small model runs ~10x faster on one thread than on two busy ones
        try:
            with torch.no_grad():
                for _ in range(count):
                    ids.append(int(self.torch_model(torch.tensor([ids]))[0, -1].argmax()))
        finally:
            torch.set_num_threads(threads)
        return ids[start:]

    def text(self, ids: list[int]) -> str:
        """The text the model's tokenizer makes of `ids`."""
        from yatdeploy.serving.text import TextCodec

        return TextCodec.beside(self.onnx).decode(ids)


@pytest.fixture(scope="module")
def language_models(tmp_path_factory) -> LanguageModels:
    import yatdeploy
    from tests.model_zoo import yat_gpt

    root = tmp_path_factory.mktemp("lm")
    model = yat_gpt(vocabulary=VOCABULARY, context=CONTEXT)
    yatdeploy.export(model, path=root / "export" / "gpt.onnx", kv_cache=True, tokenizer="bytes", validate=False)
    for name, tokenizer_config in (("gpt", {"chat_template": CHAT_TEMPLATE}), ("plain", {}), ("ids", None)):
        version = root / "repository" / name / "1"
        version.mkdir(parents=True)
        shutil.copy(root / "export" / "gpt.onnx", version / "model.onnx")
        if tokenizer_config is not None:
            shutil.copy(root / "export" / "tokenizer.json", version / "tokenizer.json")
            (version / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return LanguageModels(root / "repository", root / "export" / "gpt.onnx", model)


@dataclass
class InProcessServer:
    url: str
    core: object  # the InferenceServer

    def engine(self, name: str = "gpt"):
        return self.core.generator(name)

    def idle(self, name: str = "gpt") -> bool:
        engine = self.engine(name)
        return engine.running == 0 and engine.waiting == 0 and engine.kv_cache_usage == 0.0


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S:g} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def lm_server(language_models):
    """The repository served in this process on 127.0.0.1: the app of `yatdeploy serve`, under uvicorn."""
    import uvicorn

    from yatdeploy.progress import QUIET
    from yatdeploy.serving.app import create_app
    from yatdeploy.serving.core import InferenceServer
    from yatdeploy.serving.server import load_models

    models, unavailable = load_models(language_models.repository, None, 1, QUIET)
    core = InferenceServer(models, unavailable)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(core), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lm-server", daemon=True)
    thread.start()
    eventually(lambda: server.started or not thread.is_alive(), "the server started")
    assert server.started
    running = InProcessServer(f"http://127.0.0.1:{port}", core)
    yield running
    server.should_exit = True
    thread.join(60)
    assert not thread.is_alive() and core.generators() == []  # shut down: every engine stopped with its model


@pytest.fixture
def client(lm_server):
    """The openai client, pointed at the server."""
    with openai.OpenAI(base_url=lm_server.url + "/v1", api_key="unused", max_retries=0) as connected:
        yield connected


@pytest.fixture
def http(lm_server):
    with httpx.Client(base_url=lm_server.url, timeout=60) as connected:
        yield connected


def events(response: httpx.Response) -> list:
    """A server-sent-event response's events: each `data:` line's JSON ("[DONE]" as the string), checking that
    events are separated by blank lines and carry nothing else."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    found = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        found.append(data if data == "[DONE]" else json.loads(data))
    return found


# --- the OpenAI-compatible API -------------------------------------------------------------------------------

def test_v1_models_lists_the_language_models_served(client, http, lm_server):
    listed = client.models.list()
    assert sorted(m.id for m in listed.data) == ["gpt", "ids", "plain"]
    assert all(m.object == "model" and m.owned_by == "yatdeploy" and m.created > 0 for m in listed.data)
    assert client.models.retrieve("gpt").id == "gpt"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert http.get("/v1/models").json()["object"] == "list"


@pytest.mark.parametrize("prompt", ["Hello, Yat!", "a", "The quick brown fox"])
def test_the_openai_client_completes_with_pytorch_greedy_tokens(client, language_models, lm_server, prompt):
    expected = language_models.greedy(prompt, 12)
    answer = client.completions.create(model="gpt", prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    [choice] = answer.choices
    assert choice.token_ids == expected
    assert choice.text == language_models.text(expected)
    assert choice.finish_reason == "length" and answer.object == "text_completion" and answer.model == "gpt"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == \
        (len(prompt.encode()), 12, len(prompt.encode()) + 12)

    chunks = list(client.completions.create(model="gpt", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"return_token_ids": True}))
    assert [c.choices[0].token_ids for c in chunks] == [[t] for t in expected]  # one chunk per token
    assert "".join(c.choices[0].text for c in chunks) == language_models.text(expected)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 11 + ["length"]
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    eventually(lm_server.idle, "the engine idle")


def test_token_id_prompts_and_a_model_without_a_tokenizer(client, language_models):
    prompt = [72, 105, 33, 258]
    expected = language_models.greedy(prompt, 6)
    for model in ("gpt", "ids"):
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                           extra_body={"return_token_ids": True})
        assert answer.choices[0].token_ids == expected
    assert answer.choices[0].text == ""  # no tokenizer, no text
    with pytest.raises(openai.BadRequestError, match="model 'ids' has no tokenizer .*send the prompt as token ids"):
        client.completions.create(model="ids", prompt="Hi!", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="model 'ids' has no tokenizer"):
        client.chat.completions.create(model="ids", messages=[{"role": "user", "content": "hi"}])


def test_the_openai_client_chats_through_the_chat_template(client, language_models, lm_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = language_models.greedy(chat_prompt(messages), 10)
    answer = client.chat.completions.create(model="gpt", messages=messages, max_tokens=10, temperature=0)
    [choice] = answer.choices
    assert (choice.message.role, choice.message.content) == ("assistant", language_models.text(expected))
    assert choice.finish_reason == "length" and answer.object == "chat.completion"
    assert answer.usage.prompt_tokens == len(chat_prompt(messages).encode())

    chunks = list(client.chat.completions.create(model="gpt", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == language_models.text(expected)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.object == "chat.completion.chunk" for c in chunks)

    # Without max_tokens a chat may take the rest of the context.
    rest = client.chat.completions.create(model="gpt", messages=messages, temperature=0, stop=["\x00"],
                                          extra_body={"stop_token_ids": list(range(256, VOCABULARY))})
    assert rest.usage.prompt_tokens + rest.usage.completion_tokens <= CONTEXT
    eventually(lm_server.idle, "the engine idle")


def test_raw_server_sent_events_as_openai_streams_them(http, language_models):
    expected = language_models.greedy("abc", 5)
    with http.stream("POST", "/v1/completions", json={
            "model": "gpt", "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        found = events(response)
    assert found[-1] == "[DONE]"
    *tokens, usage = found[:-1]
    assert [chunk["choices"][0]["token_ids"] for chunk in tokens] == [[t] for t in expected]
    assert all(chunk["object"] == "text_completion" and chunk["usage"] is None for chunk in tokens)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5,
                                                         "total_tokens": 8}
    # Without include_usage: the token chunks then [DONE], no usage field.
    chat = {"model": "gpt", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=chat) as response:
        found = events(response)
    assert len(found) == 1 + 2 + 1 and found[-1] == "[DONE]" and all("usage" not in c for c in found[:-1])


def test_stop_strings_and_stop_token_ids_end_the_completion(client, language_models):
    expected = language_models.greedy("Hello", 20)
    stop_at = 6
    answer = client.completions.create(model="gpt", prompt="Hello", max_tokens=20, temperature=0,
                                       extra_body={"stop_token_ids": [expected[stop_at]], "return_token_ids": True})
    # The first occurrence of that id ends it; the stop token itself is not in the text.
    first = expected.index(expected[stop_at])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].token_ids == expected[:first + 1]
    assert answer.choices[0].text == language_models.text(expected[:first])
    text = language_models.text(expected)
    needle = next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stopped = client.completions.create(model="gpt", prompt="Hello", max_tokens=20, temperature=0, stop=[needle])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:text.index(needle)]


def test_the_errors_are_openai_errors_with_the_right_status(http, client):
    def error(path: str, body: dict) -> tuple[int, dict]:
        response = http.post(path, json=body)
        return response.status_code, response.json()

    status, body = error("/v1/completions", {"model": "gpt", "prompt": "x" * CONTEXT})
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert f"the prompt has {CONTEXT} tokens; the model's context is {CONTEXT} tokens" in body["error"]["message"]
    status, body = error("/v1/completions", {"model": "gpt", "prompt": "x" * 1000, "max_tokens": 100})
    assert status == 400
    assert (f"max_tokens 100 with a prompt of 1000 tokens is past the model's context of {CONTEXT} tokens (at most "
            f"{CONTEXT - 1000})") in body["error"]["message"]
    status, body = error("/v1/completions", {"model": "llama", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "'llama' does not exist: the language models served are gpt, ids, plain" in body["error"]["message"]
    status, body = error("/v1/chat/completions", {"model": "plain", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "model 'plain': the model's tokenizer has no chat template" in body["error"]["message"]
    status, body = error("/v1/completions", {"model": "gpt", "prompt": ["a", "b"]})
    assert status == 400 and "one prompt per request" in body["error"]["message"]
    status, body = error("/v1/completions", {"model": "gpt", "prompt": [VOCABULARY]})
    assert status == 400 and f"token id {VOCABULARY} is outside the model's vocabulary" in body["error"]["message"]
    response = http.post("/v1/completions", content=b"{not json")
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="the language models served are gpt, ids, plain"):
        client.completions.create(model="llama", prompt="x")
    with pytest.raises(openai.BadRequestError, match="is past the model's context"):
        client.completions.create(model="gpt", prompt="x" * 1000, max_tokens=100, stream=True)


def test_sampling_with_a_seed_is_reproducible(client, http):
    def sample(seed: int) -> list[int]:
        answer = client.completions.create(model="gpt", prompt="Once", max_tokens=24, temperature=1.0, top_p=0.95,
                                           seed=seed, extra_body={"return_token_ids": True, "top_k": 50})
        return answer.choices[0].token_ids

    async def both(seed: int) -> list[list[int]]:  # two at once: the same tokens whatever else runs
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as session:
            body = {"model": "gpt", "prompt": "Once", "max_tokens": 24, "temperature": 1.0, "top_p": 0.95,
                    "top_k": 50, "seed": seed, "return_token_ids": True}
            answers = await asyncio.gather(*(session.post("completions", json=body) for _ in range(2)))
        return [a.json()["choices"][0]["token_ids"] for a in answers]

    first = sample(7)
    assert sample(7) == first
    assert asyncio.run(both(7)) == [first, first]
    assert sample(8) != first
    assert http.post("/v2/models/gpt/generate", json={"text_input": "Once", "max_tokens": 24, "temperature": 1.0,
                                                      "top_p": 0.95, "top_k": 50, "seed": 7}).json()["output_ids"] \
        == first


# --- Triton's generate extension -----------------------------------------------------------------------------

def test_the_generate_extension_answers_text_output(http, language_models, lm_server):
    expected = language_models.greedy("Hello", 8)
    for path, body in [("/v2/models/gpt/generate", {"text_input": "Hello", "max_tokens": 8, "temperature": 0}),
                       ("/v2/models/gpt/versions/1/generate",
                        {"text_input": "Hello", "id": "r-1", "parameters": {"max_tokens": 8, "temperature": 0}}),
                       ("/v2/models/ids/generate", {"input_ids": list(b"Hello"), "max_tokens": 8, "temperature": 0})]:
        response = http.post(path, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["output_ids"] == expected and answer["finish_reason"] == "length"
        assert answer["model_version"] == "1" and answer.get("id") == body.get("id")
        assert answer["text_output"] == (language_models.text(expected) if answer["model_name"] == "gpt" else "")

    with http.stream("POST", "/v2/models/gpt/generate_stream",
                     json={"text_input": "Hello", "max_tokens": 8, "temperature": 0}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        found = events(response)
    assert "[DONE]" not in found  # Triton's streams end with their last response
    assert [e["output_ids"] for e in found] == [[t] for t in expected]
    assert "".join(e["text_output"] for e in found) == language_models.text(expected)
    assert {(e["model_name"], e["model_version"]) for e in found} == {("gpt", "1")}
    assert [e["finish_reason"] for e in found][-2:] == [None, "length"]

    # Its errors are the v2 protocol's: {"error": message}.
    for path, body, status, message in [
            ("/v2/models/nope/generate", {"text_input": "x"}, 404, "Request for unknown model: 'nope' is not found"),
            ("/v2/models/gpt/versions/9/generate", {"text_input": "x"}, 404, "version 9 is not found"),
            ("/v2/models/gpt/generate", {}, 400, "give the prompt as 'text_input'"),
            ("/v2/models/ids/generate", {"text_input": "x"}, 400, "model 'ids' has no tokenizer"),
            ("/v2/models/gpt/generate_stream", {"text_input": "x" * CONTEXT}, 400, f"context is {CONTEXT} tokens")]:
        response = http.post(path, json=body)
        assert response.status_code == status and message in response.json()["error"], (path, response.text)
    eventually(lm_server.idle, "the engine idle")


# --- many clients at once, and clients that go -----------------------------------------------------------------

def test_32_concurrent_streams_each_get_their_own_greedy_tokens(lm_server, language_models):
    """Different prompts and lengths, all streaming at once through continuous batching: each stream's tokens are
    its own PyTorch greedy run (none mixed up), and the decoding steps were shared."""
    words = ["alpha", "Yat", "kernel", "the", "zebra!", "0123", "serving", "tokens"]
    asks = [(" ".join(words[(i + k) % len(words)] for k in range(1 + i % 5)), 4 + (i * 7) % 21) for i in range(32)]
    expected = [language_models.greedy(prompt, count) for prompt, count in asks]
    engine = lm_server.engine()
    steps_before = engine.stats.decode_steps

    async def stream(session: httpx.AsyncClient, prompt: str, count: int) -> list[int]:
        body = {"model": "gpt", "prompt": prompt, "max_tokens": count, "temperature": 0, "stream": True,
                "return_token_ids": True}
        tokens = []
        async with session.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    tokens += json.loads(line[len("data: "):])["choices"][0]["token_ids"]
        return tokens

    async def run_all() -> list[list[int]]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=lm_server.url, timeout=120, limits=limits) as session:
            return await asyncio.gather(*(stream(session, prompt, count) for prompt, count in asks))

    got = asyncio.run(run_all())
    mixed_up = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mixed_up, f"streams {mixed_up} got other tokens than their own greedy run"
    steps = engine.stats.decode_steps - steps_before
    assert steps < sum(count for _, count in asks) // 2, f"{steps} decode steps: the streams were not batched"
    eventually(lm_server.idle, "the engine idle")


def access_log(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records
            if r.name == "yatdeploy.serving" and r.getMessage().startswith("{")]


def test_a_generation_is_written_once_to_the_access_log(http, caplog):
    caplog.set_level(logging.INFO, logger="yatdeploy.serving")
    http.post("/v1/completions", json={"model": "gpt", "prompt": "a", "max_tokens": 2})
    http.post("/v2/models/gpt/generate", json={"text_input": "a", "max_tokens": 2, "id": "g-1"})
    http.post("/v2/models/gpt/generate", json={"text_input": "a", "max_tokens": CONTEXT})
    with http.stream("POST", "/v1/completions", json={"model": "gpt", "prompt": "a", "max_tokens": 2,
                                                     "stream": True}) as response:
        response.read()
    eventually(lambda: len(access_log(caplog)) == 4, "four lines")
    lines = access_log(caplog)
    assert [(line["model"], line["version"], line["status"]) for line in lines] == [("gpt", "1", 200)] * 2 + \
        [("gpt", "1", 400), ("gpt", "1", 200)]
    assert lines[0]["id"].startswith("cmpl-") and lines[1]["id"] == "g-1"
    assert "past the model's context" in lines[2]["error"]


def test_a_client_that_disconnects_mid_stream_frees_its_sequence_and_cache(lm_server, http, caplog):
    caplog.set_level(logging.INFO, logger="yatdeploy.serving")
    engine = lm_server.engine()
    for path, body in [("/v1/completions", {"model": "gpt", "prompt": "a", "stream": True}),
                       ("/v1/chat/completions", {"model": "gpt", "messages": [{"role": "user", "content": "a"}],
                                                 "stream": True}),
                       ("/v2/models/gpt/generate_stream", {"text_input": "a"})]:
        cancelled, generated = engine.stats.requests_cancelled, engine.stats.generation_tokens
        with http.stream("POST", path, json={**body, "max_tokens": CONTEXT - 100, "temperature": 0}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.running == 1 and engine.kv_cache_usage > 0
        # Leaving the block closed the connection mid-stream.
        eventually(lambda: engine.stats.requests_cancelled == cancelled + 1, f"{path}: the stream cancelled")
        eventually(lm_server.idle, f"{path}: no sequence running and no KV cache held")
        assert engine.stats.generation_tokens - generated < CONTEXT - 100, "it ran to its end"
    eventually(lambda: len(access_log(caplog)) == 3, "a line for each")
    assert [line["status"] for line in access_log(caplog)] == [499] * 3  # nginx's "client closed request"


def test_a_client_that_gives_up_waiting_for_a_whole_answer_frees_its_sequence(lm_server):
    engine = lm_server.engine()
    for path, body in [("/v1/completions", {"model": "gpt", "prompt": "a"}),
                       ("/v2/models/gpt/generate", {"text_input": "a"})]:
        cancelled = engine.stats.requests_cancelled
        with httpx.Client(base_url=lm_server.url, timeout=httpx.Timeout(60, read=0.2)) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post(path, json={**body, "max_tokens": CONTEXT - 100, "temperature": 0})
        eventually(lambda: engine.stats.requests_cancelled == cancelled + 1, f"{path}: the request cancelled")
        eventually(lm_server.idle, f"{path}: no sequence running and no KV cache held")


# --- `yatdeploy serve` itself ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_yatdeploy_serve_answers_the_openai_client_with_pytorch_greedy_tokens(language_models):
    served = Server(language_models.onnx, "--log-level", "warning")
    try:
        with openai.OpenAI(base_url=f"http://{served.url}/v1", api_key="unused", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == ["gpt"]
            expected = language_models.greedy("Serve me", 10)
            answer = client.completions.create(model="gpt", prompt="Serve me", max_tokens=10, temperature=0)
            assert answer.choices[0].text == language_models.text(expected)
            streamed = client.completions.create(model="gpt", prompt="Serve me", max_tokens=10, temperature=0,
                                                 stream=True)
            assert "".join(c.choices[0].text for c in streamed) == language_models.text(expected)
    finally:
        served.stop()
