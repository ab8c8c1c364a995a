"""`yatdeploy bench --lm` (yatdeploy.loadgen_lm) against a real `yatdeploy serve` of a decoder export on 127.0.0.1:
streamed /v1/completions read as server-sent events, every field of the report, token counts that add up
(ignore_eos: each request gets its max_tokens), the in-process floor beside it, and the options it refuses. No
timing is asserted: the machine is shared."""

from __future__ import annotations

import json

import pytest

import yatdeploy
from tests.model_zoo import yat_gpt
from tests.servers import Server
from yatdeploy.cli import EXIT_OK, EXIT_REQUESTS_FAILED, main
from yatdeploy.errors import YatDeployError

CONTEXT = 48
STEP_FIELDS = {"concurrency", "requests", "errors", "seconds", "output_tokens", "tokens_per_second",
               "tokens_requested", "tokens_received", "prompt_tokens", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
               "tpot_p99_ms", "ttft_by_prompt", "first_error"}
FLOOR_FIELDS = {"prefill_ms", "step_p50_ms", "step_p99_ms", "requests"}


@pytest.fixture(scope="module")
def decoder_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-lm") / "gpt" / "model.onnx"
    yatdeploy.export(yat_gpt(context=CONTEXT), path=path, kv_cache=True, validate=False)
    return path


@pytest.fixture(scope="module")
def lm_server(decoder_export):
    server = Server(decoder_export)
    yield server
    server.stop()


def test_bench_lm_streams_completions_and_writes_every_figure(lm_server, decoder_export, tmp_path, capsys):
    status = main(["bench", "-q", "--lm", f"http://{lm_server.url}", "--model", "model", "--concurrency", "1,3",
                   "--prompt-tokens", "4,9", "--max-tokens", "3,7", "--requests", "8", "--warmup", "0.2",
                   "--lm-export", str(decoder_export), "--lm-threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == EXIT_OK, out
    assert "TTFT p50" in out and "in-process yatdeploy's loop (1 thread(s))" in out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["model"] == "model"
    assert report["mix"] == {"prompt_tokens": [4, 9], "max_tokens": [3, 7]}
    assert set(report["machine"]) == {"usable_cpus", "load_average_before", "load_average_after"}
    assert [s["concurrency"] for s in report["steps"]] == [1, 3]
    for step in report["steps"]:
        assert set(step) == STEP_FIELDS
        assert step["errors"] == 0 and step["first_error"] is None, step
        assert step["requests"] == 8
        # ignore_eos: every request answered its max_tokens, and the usage chunk counted them
        assert step["tokens_received"] == step["tokens_requested"] > 0
        assert step["prompt_tokens"] == sum(step["ttft_by_prompt"][p]["requests"] * int(p) for p in ("4", "9"))
        assert sum(v["requests"] for v in step["ttft_by_prompt"].values()) == 8
        assert step["output_tokens"] > 0 and step["tokens_per_second"] > 0
        assert all(step[key] > 0 for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"))
    floor = report["floor"]
    assert floor["threads"] == 1 and floor["export"] == str(decoder_export)
    assert set(floor["loop"]) >= FLOOR_FIELDS and set(floor["loop"]["prefill_ms"]) == {"4", "9"}
    assert floor["loop"]["requests"] == 3 * 4  # FLOOR_ROUNDS passes over the mix of four
    if "skipped" not in floor["genai"]:  # onnxruntime_genai is the test extra's
        assert set(floor["genai"]) >= FLOOR_FIELDS and floor["genai"]["requests"] == 12
    against = report["against_floor"]
    assert against["concurrency"] == 1 and against["prompt_tokens"] == 9 and against["ttft_over_prefill"] > 0
    page = (tmp_path / "bench.html").read_text()
    assert page.count("<svg") == 3 and "time to first token" in page and "loop step p50" in page


def test_the_api_finds_the_model_and_runs_for_a_duration(lm_server):
    result = yatdeploy.bench(f"http://{lm_server.url}", lm=True, concurrencies=[2], prompt_tokens=[5],
                             max_tokens=[4], duration=1.0, warmup=0.2)
    assert result.model == "model"  # the first of /v1/models
    step = result.steps[0]
    assert step.errors == 0 and step.requests > 0, step.first_error
    assert step.tokens_received == step.tokens_requested == 4 * step.requests
    assert result.floor is None and result.to_json()["against_floor"] is None


def test_a_refused_request_is_counted_with_its_status(lm_server, tmp_path, capsys):
    status = main(["bench", "-q", "--lm", f"http://{lm_server.url}", "--concurrency", "1", "--prompt-tokens", "40",
                   "--max-tokens", "30", "--requests", "2", "--warmup", "0", "--out", str(tmp_path), "--json"])
    assert status == EXIT_REQUESTS_FAILED
    captured = capsys.readouterr()
    printed = json.loads(captured.out)  # --json: the report on stdout, as written
    step = json.loads((tmp_path / "bench.json").read_text())["steps"][0]
    assert printed["steps"][0] == step
    assert step["errors"] == step["requests"] == 2 and step["first_error"].startswith("HTTP 400")
    assert f"context of {CONTEXT} tokens" in step["first_error"]
    assert "2 request(s) failed" in captured.err


@pytest.mark.parametrize("options,refused", [
    ({"lm": True, "batch": 4}, "batch"),
    ({"lm": True, "rates": "100"}, "rates"),
    ({"prompt_tokens": "4"}, "prompt_tokens"),
    ({"model": "m", "requests": 3}, "requests"),
    ({"lm": True, "lm_threads": 1}, "lm_threads"),
    ({"lm": True, "lm_export": "nowhere.onnx"}, "no such file"),
    ({"lm": True, "prompt_tokens": "4,x"}, "prompt_tokens"),
])
def test_options_of_the_other_mode_are_refused_before_any_request(options, refused):
    with pytest.raises(YatDeployError, match=refused):
        yatdeploy.bench("http://127.0.0.1:9", **{"model": "m", **options})


def test_lm_needs_an_http_server():
    with pytest.raises(YatDeployError, match="OpenAI-compatible HTTP server"):
        yatdeploy.bench("grpc://127.0.0.1:9", "m", lm=True)
