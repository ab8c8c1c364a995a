"""The HTTP service, language models: an OpenAI-compatible API (`GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`) and Triton's generate extension (`POST /v2/models/{m}[/versions/{v}]/generate` and
`/generate_stream`) over the generation engines of an InferenceServer's decoder exports (serving.generation).

Transport-neutral parts first: a request body read into a `GenerationRequest` (`completion_request`,
`chat_request`, `generate_request`: the model, the prompt as text, token ids or chat messages, SamplingParams),
its prompt as token ids for an engine (`prompt_ids`), and the answers built from the engine's TokenEvents
(OpenAI's completion and chat objects and their chunks, the generate extension's JSON). `LmEndpoints` then has one
method per route (LM_ROUTES), registered on the app by `register_lm_endpoints`, as app.V2Endpoints are.

Streams are server-sent events: `data: {json}` per generated token; OpenAI's end with `data: [DONE]`, Triton's
with the last token's event. A failure before the first token is answered with its status (the kinds of
ProtocolError, protocol.HTTP_STATUS); after it, as an `error` event. The OpenAI routes answer errors as OpenAI's
JSON ({"error": {"message", "type", "param", "code"}}), the generate routes as the v2 protocol's ({"error": msg}).
A client that disconnects, while its tokens stream or while it waits for a whole answer, cancels its engine
stream: its sequence leaves the batch with its KV cache.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.responses import StreamingResponse
from starlette.routing import Route

from yatdeploy.errors import YatDeployError
from yatdeploy.serving.core import CLIENT_GONE, Deployed, InferenceServer, access_log
from yatdeploy.serving.generation import GenerationEngine, SamplingParams, Stream, TokenEvent
from yatdeploy.serving.model import ServedModel
from yatdeploy.serving.protocol import (
    HTTP_STATUS,
    InvalidInput,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    UnsupportedMediaType,
)

OWNER = "yatdeploy"  # /v1/models' owned_by
DEFAULT_MAX_TOKENS = SamplingParams.max_tokens  # OpenAI's completions default (16); chat's: the rest of the context
SSE_DONE = b"data: [DONE]\n\n"

# OpenAI's error types, by the kind of failure.
OPENAI_ERROR_TYPES: dict[type[ProtocolError], str] = {
    InvalidInput: "invalid_request_error", NotFound: "invalid_request_error",
    ResourceExhausted: "invalid_request_error", UnsupportedMediaType: "invalid_request_error",
}
_SERVER_ERROR = "server_error"

# The request fields of OpenAI's API that change what is generated and are not implemented: refused unless they
# hold their default (None means absent or null, the default of most).
_OPENAI_UNSUPPORTED: dict[str, tuple[object, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
    "top_logprobs": (None, 0), "suffix": (None, ""), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
}
_UNSUPPORTED_WHY = {"n": "one completion per request (n=1): send several requests",
                    "best_of": "one completion per request (best_of=1)", "echo": "the prompt is not echoed",
                    "logprobs": "log probabilities are not returned", "top_logprobs": "log probabilities are not "
                    "returned", "suffix": "no suffix (insertion)", "logit_bias": "no logit bias",
                    "presence_penalty": "no presence penalty", "frequency_penalty": "no frequency penalty",
                    "tools": "no tool calls", "functions": "no function calls", "tool_choice": "no tool calls"}

Result = TypeVar("Result")


# -- requests ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """One generation asked for, whatever the endpoint: the model, the prompt (text, token ids or chat messages),
    how to sample and when to stop, and how to answer."""

    model: str
    version: str | None
    prompt: str | list[int] | None  # text or token ids; None for a chat
    messages: list[dict] | None  # a chat's messages: rendered by the model's chat template
    params: SamplingParams
    max_tokens_given: bool = True  # False: max_tokens is the rest of the context (a chat without max_tokens)
    stream: bool = False
    include_usage: bool = False  # OpenAI's stream_options.include_usage: a last chunk with the token counts
    return_token_ids: bool = False  # an extension (vLLM's name): the generated token ids beside the text
    request_id: str | None = None  # the generate extension's "id", given back


def _given(body: Mapping, key: str) -> object:
    """body[key], None when absent or null (OpenAI's clients send null for an option left unset)."""
    return body.get(key)


def _number(body: Mapping, key: str, default: float) -> float:
    value = _given(body, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"'{key}' must be a number, not {_json_kind(value)}")
    return float(value)


def _whole(body: Mapping, key: str, default: int | None) -> int | None:
    value = _given(body, key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"'{key}' must be a whole number, not {_json_kind(value)}")
    return value


def _flag(body: Mapping, key: str) -> bool:
    value = _given(body, key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"'{key}' must be true or false, not {_json_kind(value)}")
    return value


def _token_ids(value: object) -> list[int] | None:
    """`value` as token ids when it is a list of whole numbers, else None."""
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    return None


def _json_kind(value: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def sampling_params(body: Mapping) -> tuple[SamplingParams, bool]:
    """The sampling fields of a request (OpenAI's names, with vLLM's extensions top_k, stop_token_ids and
    ignore_eos), checked; and whether max_tokens was given (else the default, 16)."""
    stop = _given(body, "stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidInput(f"'stop' must be a string or a list of strings, not {_json_kind(stop)}")
    stop_ids = _given(body, "stop_token_ids")
    if stop_ids is not None and stop_ids != [] and _token_ids(stop_ids) is None:
        raise InvalidInput("'stop_token_ids' must be a list of token ids")
    given = [key for key in ("max_tokens", "max_completion_tokens") if _given(body, key) is not None]
    if len(given) > 1:
        raise InvalidInput("give 'max_tokens' or 'max_completion_tokens' (chat's newer name), not both")
    max_tokens = _whole(body, given[0], None) if given else None
    params = SamplingParams(
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", SamplingParams.temperature),
        top_p=_number(body, "top_p", SamplingParams.top_p),
        top_k=_top_k(body),
        seed=_whole(body, "seed", None),
        stop=stops,
        stop_token_ids=tuple(stop_ids or ()),
        ignore_eos=_flag(body, "ignore_eos"),
    )
    params.check()
    return params, max_tokens is not None


def _top_k(body: Mapping) -> int:
    top_k = _whole(body, "top_k", 0)
    return 0 if top_k == -1 else top_k  # -1: all, as vLLM spells it


def _refuse_unsupported(body: Mapping) -> None:
    for key, defaults in _OPENAI_UNSUPPORTED.items():
        value = body.get(key)
        if key in body and not any(value == d and type(value) is type(d) for d in defaults):
            raise InvalidInput(f"'{key}' {orjson.dumps(value).decode()} is not supported: {_UNSUPPORTED_WHY[key]}")


def _model_name(body: Mapping) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("'model' must name the model (GET /v1/models lists them)")
    return model


def _stream_options(body: Mapping) -> tuple[bool, bool]:
    """Whether to stream, and whether with a last usage chunk."""
    stream = _flag(body, "stream")
    options = _given(body, "stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise InvalidInput("'stream_options' is for streamed requests (stream: true)")
    if not isinstance(options, dict):
        raise InvalidInput(f"'stream_options' must be an object, not {_json_kind(options)}")
    return True, _flag(options, "include_usage")


def completion_request(body: Mapping) -> GenerationRequest:
    """POST /v1/completions' body: `prompt` is a string, a list of token ids, or a list of one of those."""
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) > 1:
            raise InvalidInput(f"'prompt' holds {len(prompt)} prompts: one prompt per request (send a request for "
                               "each)")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        prompt = _token_ids(prompt)
        if prompt is None:
            raise InvalidInput("'prompt' must be a string or a list of token ids")
    params, _ = sampling_params(body)
    stream, usage = _stream_options(body)
    return GenerationRequest(_model_name(body), None, prompt, None, params, stream=stream, include_usage=usage,
                             return_token_ids=_flag(body, "return_token_ids"))


def chat_request(body: Mapping) -> GenerationRequest:
    """POST /v1/chat/completions' body: `messages` with a role and a content (a string, or a list of text parts)."""
    _refuse_unsupported(body)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise InvalidInput("'response_format' is not supported: the answer is text")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a list of messages, each with a 'role' and a 'content'")
    chat = [_message(message, i) for i, message in enumerate(messages)]
    params, given = sampling_params(body)
    stream, usage = _stream_options(body)
    return GenerationRequest(_model_name(body), None, None, chat, params, max_tokens_given=given, stream=stream,
                             include_usage=usage, return_token_ids=_flag(body, "return_token_ids"))


def _message(message: object, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidInput(f"{where} must be an object with a 'role' (a string) and a 'content'")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text ones only
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise InvalidInput(f"{where}: only text content parts ({{'type': 'text', 'text': ...}}) are supported")
        content = "".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise InvalidInput(f"{where}: 'content' must be a string or a list of text parts")
    return {**message, "content": content}


_GENERATE_FIELDS = ("text_input", "input_ids", "parameters", "id", "stream", "model_name", "model_version")


def generate_request(body: Mapping, name: str, version: str | None) -> GenerationRequest:
    """The generate extension's body: `text_input` (or `input_ids`) and the sampling fields, at the top level or
    in Triton's `parameters` object (a field in both is refused)."""
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' must be an object, not {_json_kind(parameters)}")
    both = sorted(set(parameters) & (set(body) - set(_GENERATE_FIELDS)))
    if both:
        raise InvalidInput(f"'{both[0]}' is given both at the top level and in 'parameters'")
    fields = {**parameters, **{k: v for k, v in body.items() if k not in _GENERATE_FIELDS}}
    text, ids = body.get("text_input"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise InvalidInput("give the prompt as 'text_input' (a string) or 'input_ids' (token ids), one of them")
    if isinstance(text, list) and len(text) == 1:  # a tensor of one string, as Triton's JSON inputs may be
        text = text[0]
    if text is not None and not isinstance(text, str):
        raise InvalidInput(f"'text_input' must be a string, not {_json_kind(text)}")
    prompt = text if text is not None else _token_ids(ids)
    if prompt is None:
        raise InvalidInput("'input_ids' must be a list of token ids")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"'id' must be a string, not {_json_kind(request_id)}")
    params, _ = sampling_params(fields)
    return GenerationRequest(name, version, prompt, None, params, request_id=request_id)


def prompt_ids(request: GenerationRequest, engine: GenerationEngine) -> tuple[list[int], SamplingParams]:
    """The request's prompt as the engine's token ids (through the model's tokenizer, and its chat template for a
    chat), and its sampling parameters (a chat without max_tokens: the rest of the context). InvalidInput when the
    model can't take it: text for a model without a tokenizer, a chat without a chat template."""
    codec = engine.codec
    if codec is None and (request.messages is not None or isinstance(request.prompt, str)):
        raise InvalidInput(f"model '{engine.name}' has no tokenizer (no tokenizer.json beside it): send the prompt "
                           "as token ids" + (" to /v1/completions" if request.messages is not None else ""))
    if request.messages is not None:
        try:
            text = codec.render_chat(request.messages)
        except YatDeployError as exc:
            raise InvalidInput(f"model '{engine.name}': {exc.text}") from None
        ids = codec.encode(text)
    elif isinstance(request.prompt, str):
        ids = codec.encode(request.prompt)
    else:
        ids = list(request.prompt)
    params = request.params
    if not request.max_tokens_given:
        params = replace(params, max_tokens=max(1, engine.layout.context_length - len(ids)))
    return ids, params


# -- answers ----------------------------------------------------------------------------------------------------

@dataclass
class Generated:
    """A whole generation, as a non-streamed answer gives it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int

    @staticmethod
    def of(stream: Stream, events: list[TokenEvent]) -> Generated:
        return Generated("".join(e.text for e in events), [e.token_id for e in events if e.token_id is not None],
                         events[-1].finish_reason if events else None, stream.prompt_tokens,
                         stream.completion_tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class OpenAIAnswer:
    """How OpenAI's answers to one request are spelled: completion or chat, its id, when and by which model."""

    chat: bool
    model: str
    id: str
    created: int
    return_token_ids: bool = False

    @staticmethod
    def new(request: GenerationRequest) -> OpenAIAnswer:
        chat = request.messages is not None
        return OpenAIAnswer(chat, request.model, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                            int(time.time()), request.return_token_ids)

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, generated: Generated) -> dict:
        """The non-streamed answer: a `text_completion` or a `chat.completion`, with its usage."""
        choice: dict = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": generated.text}
        else:
            choice["text"] = generated.text
        choice.update(logprobs=None, finish_reason=generated.finish_reason)
        if self.return_token_ids:
            choice["token_ids"] = generated.token_ids
        answer = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        answer["usage"] = usage(generated.prompt_tokens, generated.completion_tokens)
        return answer

    def chunk(self, text: str, finish_reason: str | None, token_id: int | None = None, *, role: bool = False,
              with_usage: bool = False) -> dict:
        """One streamed chunk: a token's text (a chat's first chunk, `role`, only says who speaks)."""
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=finish_reason)
        if self.return_token_ids and not role:
            choice["token_ids"] = [] if token_id is None else [token_id]
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if with_usage:
            chunk["usage"] = None  # OpenAI's: null in every chunk but the last, which has the counts
        return chunk

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        chunk["usage"] = usage(prompt_tokens, completion_tokens)
        return chunk


def openai_error(error: ProtocolError) -> dict:
    """A failure as OpenAI's error JSON (its HTTP status: protocol.HTTP_STATUS)."""
    return {"error": {"message": error.message, "type": OPENAI_ERROR_TYPES.get(type(error), _SERVER_ERROR),
                      "param": None, "code": "model_not_found" if isinstance(error, NotFound) else None}}


def generate_answer(model: str, version: str, generated: Generated, request_id: str | None = None) -> dict:
    """The generate extension's answer: `text_output`, with the generated token ids and why it ended."""
    answer = {"model_name": model, "model_version": version}
    if request_id is not None:
        answer["id"] = request_id
    answer.update(text_output=generated.text, output_ids=generated.token_ids, finish_reason=generated.finish_reason)
    return answer


def generate_chunk(model: str, version: str, event: TokenEvent, request_id: str | None = None) -> dict:
    """One event of /generate_stream: a token's text."""
    chunk = {"model_name": model, "model_version": version}
    if request_id is not None:
        chunk["id"] = request_id
    chunk.update(text_output=event.text, output_ids=[] if event.token_id is None else [event.token_id],
                 finish_reason=event.finish_reason)
    return chunk


def sse(data: dict) -> bytes:
    """One server-sent event carrying `data` as JSON."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


# -- the routes -------------------------------------------------------------------------------------------------

class _Generation:
    """One generation as a route runs it: the version generating, the engine's stream once submitted, and its one
    line in the access log (written when it ends: 200, the failure's status, or 499 for a client that went)."""

    def __init__(self, deployed: Deployed, request_id: str | None) -> None:
        self.model: ServedModel = deployed.model
        self.engine: GenerationEngine = deployed.generator
        self.request_id = request_id
        self.started = time.perf_counter()
        self.stream: Stream | None = None

    def submit(self, asked: GenerationRequest) -> Stream:
        ids, params = prompt_ids(asked, self.engine)
        self.stream = self.engine.submit(ids, params)
        return self.stream

    def ended(self, status: int, error: str | None = None) -> None:
        access_log(self.model.name, self.model.version, self.request_id, status, self.started, error=error)

    def failed(self, error: ProtocolError) -> None:
        self.ended(HTTP_STATUS[type(error)], error.message)

    async def wait(self, request: Request, work: Awaitable[Result]) -> Result | None:
        """`work`'s result (the whole generation, or its first token) while the client stays; None once it has gone
        (the stream cancelled, the generation logged as 499); a failure is logged, then raised."""
        try:
            result = await _while_connected(request, self.stream, work)
        except ProtocolError as exc:
            self.failed(exc)
            raise
        if result is None:
            self.ended(CLIENT_GONE)
        return result


class _EventStream(StreamingResponse):
    """Server-sent events of one generation. Its stream is cancelled however the response ends: when the client
    disconnects, Starlette cancels the iteration, and nothing is left to read the tokens."""

    def __init__(self, generation: _Generation, first: TokenEvent,
                 chunks: Callable[[AsyncIterator[TokenEvent | ProtocolError]], AsyncIterator[bytes]]) -> None:
        """`chunks`: the events of the generation (from its `first`, a failure as the last) as the bytes to send."""
        self.generation = generation
        self.status = CLIENT_GONE  # until the events end: 200, or the status of the failure they end with
        self.error: str | None = None
        super().__init__(chunks(self._events(first)), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.stream.cancel()  # nothing when it ended
            await self.body_iterator.aclose()
            self.generation.ended(self.status, self.error)

    async def _events(self, first: TokenEvent) -> AsyncIterator[TokenEvent | ProtocolError]:
        """`first`, then the stream's other events; a failure ends them as the last item."""
        yield first
        try:
            async for event in self.generation.stream:
                yield event
        except ProtocolError as exc:
            self.status, self.error = HTTP_STATUS[type(exc)], exc.message
            yield exc
        else:
            self.status = 200


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _openai_failure(error: ProtocolError) -> Response:
    return _json(openai_error(error), HTTP_STATUS[type(error)])


async def disconnected(request: Request) -> None:
    """Returns once the client has gone (its body already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _while_connected(request: Request, stream: Stream, work: Awaitable[Result]) -> Result | None:
    """`work`'s result, or None when the client disconnects first: then its stream is cancelled."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected(request))
    finished = False
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        finished = task.done()
    finally:
        gone.cancel()
        if not finished:
            stream.cancel()
            task.cancel()
    return task.result() if finished else None


class LmEndpoints:
    """The language-model routes over an InferenceServer (this module's docstring): one method per route
    (LM_ROUTES). `read_json`: the request's JSON object body, read within the HTTP app's limits."""

    def __init__(self, server: InferenceServer, read_json: Callable[[Request], Awaitable[dict]]) -> None:
        self.server = server
        self.read_json = read_json

    # -- OpenAI -----------------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return _json({"object": "list", "data": [self._model_card(name) for name in self._served()]})

    async def model(self, request: Request, model: str) -> Response:
        try:
            return _json(self._model_card(self._language_model(model).model.name))
        except ProtocolError as exc:
            return _openai_failure(exc)

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, completion_request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat_request)

    def _served(self) -> list[str]:
        """The names of the language models served."""
        return sorted({engine.name for engine in self.server.generators()})

    def _model_card(self, name: str) -> dict:
        try:
            created = int(os.stat(self.server.model(name).source.path).st_mtime)
        except OSError:
            created = 0
        return {"id": name, "object": "model", "created": created, "owned_by": OWNER}

    def _language_model(self, name: str) -> Deployed:
        """The newest served version of language model `name`; NotFound naming those served otherwise."""
        try:
            self.server.generator(name)
        except (NotFound, InvalidInput):
            served = ", ".join(self._served()) or "none"
            raise NotFound(f"The model '{name}' does not exist: the language models served are {served}") from None
        return self.server.deployed(name)

    async def _openai(self, request: Request, parse: Callable[[Mapping], GenerationRequest]) -> Response:
        try:
            asked = parse(await self.read_json(request))
            answer = OpenAIAnswer.new(asked)
            generation = _Generation(self._language_model(asked.model), answer.id)
        except ProtocolError as exc:  # no model to count it for (as a v2 request that names none)
            return _openai_failure(exc)
        try:
            stream = generation.submit(asked)
        except ProtocolError as exc:
            generation.failed(exc)
            return _openai_failure(exc)
        try:
            result = await generation.wait(request, anext(stream) if asked.stream else stream.collect())
        except ProtocolError as exc:
            return _openai_failure(exc)
        if result is None:
            return Response(status_code=CLIENT_GONE)
        if not asked.stream:
            generation.ended(200)
            return _json(answer.whole(Generated.of(stream, result)))
        return _EventStream(generation, result, partial(_openai_chunks, answer, asked.include_usage, stream))

    # -- Triton's generate extension --------------------------------------------------------------------------

    async def generate(self, request: Request, name: str, version: str | None = None) -> Response:
        asked, generation = await self._generation(request, name, version)
        stream = generation.stream
        events = await generation.wait(request, stream.collect())
        if events is None:
            return Response(status_code=CLIENT_GONE)
        generation.ended(200)
        return _json(generate_answer(name, generation.model.version, Generated.of(stream, events),
                                     asked.request_id))

    async def generate_stream(self, request: Request, name: str, version: str | None = None) -> Response:
        asked, generation = await self._generation(request, name, version)
        first = await generation.wait(request, anext(generation.stream))
        if first is None:
            return Response(status_code=CLIENT_GONE)
        served = generation.model.version

        async def chunks(events: AsyncIterator[TokenEvent | ProtocolError]) -> AsyncIterator[bytes]:
            async for event in events:
                yield sse({"error": event.message} if isinstance(event, ProtocolError) else
                          generate_chunk(name, served, event, asked.request_id))

        return _EventStream(generation, first, chunks)

    async def _generation(self, request: Request, name: str,
                          version: str | None) -> tuple[GenerationRequest, _Generation]:
        """The generate request and its generation, submitted. A failure is raised for the app to answer as the
        v2 protocol does ({"error": message}); once the model is known, it is written to the access log."""
        self.server.generator(name, version)  # NotFound, Unavailable, or InvalidInput for a model that doesn't
        generation = _Generation(self.server.deployed(name, version), None)
        try:
            asked = generate_request(await self.read_json(request), name, version)
            generation.request_id = asked.request_id
            generation.submit(asked)
        except ProtocolError as exc:
            generation.failed(exc)
            raise
        return asked, generation


async def _openai_chunks(answer: OpenAIAnswer, include_usage: bool, stream: Stream,
                         events: AsyncIterator[TokenEvent | ProtocolError]) -> AsyncIterator[bytes]:
    """OpenAI's stream: a chat's role chunk, a chunk per token, the usage chunk when asked, then [DONE]; a failure
    as OpenAI's error JSON in its place."""
    if answer.chat:
        yield sse(answer.chunk("", None, role=True, with_usage=include_usage))
    async for event in events:
        if isinstance(event, ProtocolError):
            yield sse(openai_error(event))
            break
        yield sse(answer.chunk(event.text, event.finish_reason, event.token_id, with_usage=include_usage))
    else:
        if include_usage:
            yield sse(answer.usage_chunk(stream.prompt_tokens, stream.completion_tokens))
    yield SSE_DONE


# Every route: (method, path, LmEndpoints' method).
LM_ROUTES = [
    ("GET", "/v1/models", "models"),
    ("GET", "/v1/models/{model:path}", "model"),
    ("POST", "/v1/completions", "completions"),
    ("POST", "/v1/chat/completions", "chat_completions"),
    ("POST", "/v2/models/{name}/generate", "generate"),
    ("POST", "/v2/models/{name}/versions/{version}/generate", "generate"),
    ("POST", "/v2/models/{name}/generate_stream", "generate_stream"),
    ("POST", "/v2/models/{name}/versions/{version}/generate_stream", "generate_stream"),
]


def register_lm_endpoints(app: FastAPI, endpoints: LmEndpoints) -> None:
    """LM_ROUTES on the app, as plain Starlette routes (no FastAPI parameter solving per token-streaming request),
    each handed the request and its path parameters."""
    for method, path, name in LM_ROUTES:
        endpoint = getattr(endpoints, name)

        async def call(request: Request, endpoint=endpoint) -> Response:
            return await endpoint(request, **request.path_params)

        app.router.routes.append(Route(path, call, methods=[method], name=f"lm_{name}"))
