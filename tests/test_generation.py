"""The generation engine (yatdeploy.serving.generation) in process, on a real decoder export and ONNX Runtime:
continuous batching gives each sequence what it would get alone, sequences join and leave between steps with
their caches, the KV-cache bound makes prompts wait then refuses them, sampling is per sequence and seeded, and
sequences end on their end token, stop tokens, stop strings and max_tokens."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import yatdeploy
from yatdeploy.decoding import Decoder
from yatdeploy.serving.generation import GenerationEngine, GenerationSettings, SamplingParams
from yatdeploy.serving.protocol import InvalidInput, Unavailable
from yatdeploy.serving.text import TextCodec

from tests.model_zoo import yat_gpt

pytestmark = pytest.mark.slow  # exports a model

VOCABULARY, CONTEXT = 260, 40
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    model = yat_gpt(vocabulary=VOCABULARY, context=CONTEXT)
    folder = tmp_path_factory.mktemp("gpt")
    result = yatdeploy.export(model, path=folder / "model.onnx", kv_cache=True, tokenizer="bytes", validate=False,
                              genai_ops="function")
    return model, result.path


def _engine(path, **settings) -> GenerationEngine:
    return GenerationEngine(Decoder.open(path, "ort-cpu"), TextCodec.beside(path), GenerationSettings(**settings),
                            name="gpt")


def _greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """PyTorch's greedy tokens, the whole sequence recomputed each step."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _run(coroutine):
    return asyncio.run(coroutine)


async def _tokens(stream) -> list[int]:
    return [e.token_id async for e in stream if e.token_id is not None]


def test_concurrent_sequences_of_different_lengths_each_get_their_own_greedy_tokens(export):
    model, path = export
    engine = _engine(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCABULARY, int(rng.integers(1, 12))).tolist() for _ in range(12)]
    lengths = [int(rng.integers(1, CONTEXT - 12)) for _ in prompts]

    async def main():
        streams = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True, **GREEDY))
                   for p, n in zip(prompts, lengths)]
        return await asyncio.gather(*(_tokens(s) for s in streams))

    try:
        got = _run(main())
    finally:
        engine.stop()
    assert got == [_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    assert engine.stats.prefill_runs < len(prompts)  # prompts were prefilled together
    assert engine.stats.decode_steps < sum(lengths)  # and stepped together
    assert engine.running == 0 and engine.kv_cache_usage == 0.0


def test_a_prompt_joins_a_running_batch_between_steps_and_the_batch_s_cache_shrinks_as_sequences_end(export):
    model, path = export
    engine = _engine(path)
    first, later = [5, 6, 7, 8, 9, 10, 11], [200, 201]

    async def main():
        long = engine.submit(first, SamplingParams(max_tokens=25, ignore_eos=True, **GREEDY))
        events = []
        async for event in long:
            events.append(event.token_id)
            if len(events) == 5:  # the first is running: a second joins it
                short = engine.submit(later, SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
                joined = asyncio.ensure_future(_tokens(short))
        return events, await joined

    try:
        long_tokens, short_tokens = _run(main())
    finally:
        engine.stop()
    assert long_tokens == _greedy(model, first, 25)
    assert short_tokens == _greedy(model, later, 4)
    assert engine.stats.prefill_runs == 2 and engine.running == 0


def test_a_cancelled_stream_leaves_the_batch_and_frees_its_cache(export):
    _, path = export
    engine = _engine(path)

    async def main():
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
        other = engine.submit([4, 5], SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
        async for event in stream:
            if event.index == 2:
                stream.cancel()
                break
        rest = await _tokens(other)
        return rest

    try:
        rest = _run(main())
    finally:
        engine.stop()
    assert len(rest) == 30
    assert engine.stats.requests_cancelled == 1 and engine.running == 0 and engine.kv_cache_usage == 0.0


def test_the_kv_cache_bound_makes_prompts_wait_then_refuses_them(export):
    _, path = export
    layout = Decoder.open(path, "ort-function").layout
    per_sequence = 30 * layout.cache_bytes_per_token()  # room for one prompt of 10 tokens and 20 more
    params = SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY)

    async def one_at_a_time(engine):
        first = engine.submit(list(range(10)), params)
        second = engine.submit(list(range(10, 20)), params)  # no room until the first ends: it waits
        tokens = await _tokens(first)
        return tokens, await _tokens(second)

    async def waits_too_long(engine):
        running = engine.submit(list(range(10)), params)
        waiting = engine.submit(list(range(10)), params)
        with pytest.raises(Unavailable, match="no room in model 'gpt''s KV cache for 0.001 s"):
            await _tokens(waiting)
        return await _tokens(running)

    engine = _engine(path, kv_cache_bytes=per_sequence)
    try:
        first, second = _run(one_at_a_time(engine))
        assert len(first) == len(second) == 20
        assert engine.stats.prefill_runs == 2  # never together
        # a sequence longer than the bound alone: refused at once, saying how much it needs
        with pytest.raises(Unavailable, match=r"a sequence of 35 tokens needs .* MB of KV cache, more than the "):
            _run(_submit(engine, list(range(10)), SamplingParams(max_tokens=25)))
    finally:
        engine.stop()
    impatient = _engine(path, kv_cache_bytes=per_sequence, queue_timeout_s=0.001)
    try:
        assert len(_run(waits_too_long(impatient))) == 20
        assert impatient.stats.requests_refused == 1
    finally:
        impatient.stop()


async def _submit(engine, prompt, params):
    return engine.submit(prompt, params)


def test_prompts_and_max_tokens_past_the_context_are_refused_naming_the_limit(export):
    _, path = export
    engine = _engine(path)
    try:
        with pytest.raises(InvalidInput, match=f"the prompt has {CONTEXT} tokens; the model's context is {CONTEXT}"):
            _run(_submit(engine, [1] * CONTEXT, SamplingParams()))
        with pytest.raises(InvalidInput, match=f"max_tokens 35 with a prompt of 10 tokens is past the model's "
                                               f"context of {CONTEXT} tokens .at most 30."):
            _run(_submit(engine, [1] * 10, SamplingParams(max_tokens=35)))
        with pytest.raises(InvalidInput, match=f"token id {VOCABULARY} is outside the model's vocabulary"):
            _run(_submit(engine, [1, VOCABULARY], SamplingParams()))
        for bad, message in [({"max_tokens": 0}, "max_tokens 0"), ({"temperature": -1.0}, "temperature -1.0"),
                             ({"top_p": 0.0}, "top_p 0.0"), ({"top_k": -1}, "top_k -1"), ({"stop": ("",)}, "stop")]:
            with pytest.raises(InvalidInput, match=message):
                _run(_submit(engine, [1], SamplingParams(**bad)))
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it(export):
    _, path = export
    engine = _engine(path)
    params = SamplingParams(max_tokens=20, temperature=1.3, top_p=0.9, top_k=50, seed=7, ignore_eos=True)

    async def alone():
        return await _tokens(engine.submit([65, 66, 67], params))

    async def crowded():
        others = [engine.submit([i, i + 1], SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
                  for i in range(5)]
        mine = engine.submit([65, 66, 67], params)
        results = await asyncio.gather(_tokens(mine), *(_tokens(o) for o in others))
        return results[0]

    try:
        first, second, third = _run(alone()), _run(crowded()), _run(alone())
        unseeded = _run(_tokens_of(engine, [65, 66, 67], SamplingParams(max_tokens=20, temperature=1.3,
                                                                         ignore_eos=True)))
    finally:
        engine.stop()
    assert first == second == third
    assert len(unseeded) == 20


async def _tokens_of(engine, prompt, params):
    return await _tokens(engine.submit(prompt, params))


def test_top_k_of_one_is_greedy(export):
    model, path = export
    engine = _engine(path)
    try:
        got = _run(_tokens_of(engine, [70, 71], SamplingParams(max_tokens=10, temperature=2.0, top_k=1,
                                                               ignore_eos=True)))
    finally:
        engine.stop()
    assert got == _greedy(model, [70, 71], 10)


def test_stop_tokens_and_stop_strings_end_a_sequence_and_the_text_is_cut_before_them(export):
    model, path = export
    engine = _engine(path)
    prompt = list(b"The yat ")
    greedy = _greedy(model, prompt, 20)
    text = bytes(greedy).decode("utf-8", errors="replace")

    async def run(params):
        events = [e async for e in engine.submit(prompt, params)]
        return [e.token_id for e in events], "".join(e.text for e in events), events[-1].finish_reason

    try:
        stop_token = greedy[5]
        tokens, _, reason = _run(run(SamplingParams(max_tokens=20, stop_token_ids=(stop_token,), **GREEDY)))
        assert tokens == greedy[:greedy.index(stop_token) + 1] and reason == "stop"
        _, all_text, reason = _run(run(SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY)))
        assert all_text == text and reason == "length"
        # a stop string of several tokens (bytes), found once in the text: the first such after the start
        needle = next(text[i:i + 2] for i in range(3, len(text) - 1)
                      if "\ufffd" not in text[i:i + 2] and text.count(text[i:i + 2]) == 1)
        _, cut, reason = _run(run(SamplingParams(max_tokens=20, stop=(needle, "no such"), **GREEDY)))
        assert cut == text[:text.index(needle)] and reason == "stop"
    finally:
        engine.stop()


def test_stopping_the_engine_ends_every_stream_with_unavailable(export):
    _, path = export
    engine = _engine(path)

    async def main():
        stream = engine.submit([1, 2], SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        with pytest.raises(Unavailable, match="was unloaded"):
            async for _ in stream:
                pass
        with pytest.raises(Unavailable, match="is unloading"):
            engine.submit([1], SamplingParams())

    _run(main())
