"""The Python API (yatdeploy.api: every command as a function) and how library errors name options."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

import yatdeploy
from tests.model_zoo import yat_mlp
from yatdeploy import backends
from yatdeploy.cli import EXIT_USAGE, main
from yatdeploy.errors import ModelLoadError, YatDeployError
from yatdeploy.loading import load_model
from yatdeploy.progress import QUIET


@pytest.mark.slow
def test_export_of_an_in_memory_module_validates_and_runs_in_plain_onnxruntime(tmp_path):
    model = yat_mlp(in_features=8, hidden=6, out_features=3)
    result = yatdeploy.export(model, torch.randn(2, 8), tmp_path / "m.onnx")
    assert result.yat_gemm_nodes == result.yat_layers == 2
    assert result.report is not None and result.report.passed, result.report.failures()
    assert result.report.against == "<Sequential>"
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    with torch.inference_mode():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_validate_takes_a_module_or_a_file_and_sees_a_changed_module(tmp_path):
    model = yat_mlp()
    torch.save(model, tmp_path / "m.pt")
    yatdeploy.export(tmp_path / "m.pt", (1, 16), tmp_path / "m.onnx", validate=False)
    assert yatdeploy.validate(tmp_path / "m.onnx", tmp_path / "m.pt", backends=["ort-cpu"]).passed
    assert yatdeploy.validate(tmp_path / "m.onnx", model, backends=["ort-cpu"], batches=(3,)).passed
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    report = yatdeploy.validate(tmp_path / "m.onnx", model, backends=["ort-cpu"])
    assert not report.passed


@pytest.mark.slow
def test_validation_reuses_the_exports_reference(tmp_path, monkeypatch):
    """The model is prepared (cast to the export dtype) once for export and validation together."""
    from yatdeploy import reference

    calls = []
    real = reference.Reference.of
    monkeypatch.setattr(reference.Reference, "of", staticmethod(lambda *a, **k: calls.append(a) or real(*a, **k)))
    result = yatdeploy.export(yat_mlp(), (1, 16), tmp_path / "m.onnx", dtype="float16")
    assert result.report.passed and result.report.dtype == "float16"
    assert len(calls) == 1


def test_import_yatdeploy_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, yatdeploy; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert yatdeploy.export.__module__ == "yatdeploy.api"
    assert all(getattr(yatdeploy, name).__module__ in ("yatdeploy.api", "yatdeploy.build")
               for name in ("bench", "build_engine", "export", "load", "serve", "validate"))
    with pytest.raises(AttributeError, match="no attribute 'exports'"):
        yatdeploy.exports  # noqa: B018


def test_library_errors_name_keywords_and_the_cli_names_its_flags(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save(yat_mlp().state_dict(), path)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    assert "pass `arch` module:callable" in str(caught.value) and "--" not in str(caught.value)
    assert main(["export", "-q", str(path), "--input-shape", "1,16"]) == EXIT_USAGE
    assert "pass --arch module:callable" in capsys.readouterr().err
    # The CLI's spelling ends with the command: the library speaks Python again.
    with pytest.raises(ModelLoadError) as again:
        load_model(path)
    assert str(again.value) == str(caught.value)


def test_a_negated_switch_is_spelled_both_ways():
    from yatdeploy.errors import YatDeployError, option, spelled

    error = YatDeployError(f"exported with {option('dynamic_batch', False)}; pass {option('trust_pickle', True)}")
    assert str(error) == "exported with dynamic_batch=False; pass trust_pickle=True"
    with spelled(lambda name, value: {"dynamic_batch": "--static-batch", "trust_pickle": "--trust-pickle"}[name]):
        assert str(error) == "exported with --static-batch; pass --trust-pickle"
    assert error.text == "exported with dynamic_batch=False; pass trust_pickle=True"


def test_messages_carry_no_terminal_colour_codes():
    """torch's exporter colours parts of its messages; a message yatdeploy shows never carries the codes."""
    from yatdeploy.errors import YatDeployError

    error = YatDeployError("torch.onnx.export failed: \x1b[96mThis is step 1/3\x1b[0m of exporting",
                           "\x1b]8;;https://x\x07see\x1b]8;;\x07 the \x1b[1;31mdocs\x1b[m")
    assert str(error) == "torch.onnx.export failed: This is step 1/3 of exporting (see the docs)"
    assert "\x1b" not in error.text


def test_the_api_module_and_the_commands_that_run_no_pytorch_do_not_import_torch():
    """build-engine, serve, bench and doctor go through yatdeploy.api without paying for torch's import."""
    code = ("import sys, yatdeploy.api, yatdeploy.cli; from yatdeploy.cli import main; "
            "status = main(['doctor', '--json']); print('torch' in sys.modules, status, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1] == "False 0"
    assert yatdeploy.api.doctor()["backends"].keys() == set(backends.names())
    assert "ort-cpu" in json.loads(out.stdout)["backends"]


def test_api_options_are_checked_before_any_work_and_named_as_keywords(tmp_path):
    from yatdeploy import api
    from yatdeploy.errors import YatDeployError

    refused = {
        "bench": [(lambda: api.bench("http://127.0.0.1:1", "m", concurrencies=(), rates=()),
                   "nothing to run: give `concurrencies` and/or `rates`"),
                  (lambda: api.bench("grpc://127.0.0.1:1", "m", json_payload=True),
                   "json_payload=True is for HTTP endpoints"),
                  (lambda: api.bench("http://127.0.0.1:1", "m", concurrencies=[0]), "`concurrencies` [0]: expected"),
                  (lambda: api.bench("http://127.0.0.1:1", "m", onnx=tmp_path / "absent.onnx"), "`onnx`"),
                  (lambda: api.bench("http://127.0.0.1:1", "m", duration=0), "`duration` must be > 0")],
        "demo": [(lambda: api.demo(tmp_path, epochs=0), "`epochs` 0: must be positive"),
                 (lambda: api.demo(tmp_path, lm=True, tensorrt=True),
                  "tensorrt=True is for the digits demo, not lm=True")],
        "serve": [(lambda: api.serve(tmp_path, max_batch_size=0), "`max_batch_size` 0: must be at least 1"),
                  (lambda: api.serve(tmp_path, strict_readiness="maybe"), "`strict_readiness` maybe: must be true"),
                  (lambda: api.serve(tmp_path, load_models=["a"]),
                   "`load_models` is for `model_control_mode` explicit"),
                  (lambda: api.serve(tmp_path, max_body_mb=float("nan")), "`max_body_mb` nan"),
                  (lambda: api.serve(tmp_path, grpc_port=8000), "`grpc_port` 8000: not a port number other than"),
                  (lambda: api.serve(tmp_path, threads=0), "`threads` 0: must be between 1 and"),
                  (lambda: api.serve(tmp_path, log_level="loud"), "`log_level` loud: one of debug")],
        "validate": [(lambda: api.validate(tmp_path / "m.onnx", tmp_path / "absent.pt", batches="1,x"),
                      "`batches` '1,x': expected comma-separated positive integers"),
                     (lambda: api.validate(tmp_path / "m.onnx", tmp_path / "absent.pt", backends=["nope"]),
                      "unknown backend 'nope'"),
                     (lambda: api.validate(tmp_path / "m.onnx", tmp_path / "absent.pt", engine=tmp_path / "e.plan"),
                      "`engine`")],
    }
    for function, cases in refused.items():
        for call, message in cases:
            with pytest.raises(YatDeployError) as caught:
                call()
            assert message in str(caught.value), (function, str(caught.value))
    with pytest.raises(YatDeployError, match="`atol` -1.0: must be a finite number >= 0"):
        api.Tolerance(-1.0, None)


@pytest.mark.slow
def test_serve_returns_a_handle_that_answers_over_http_and_grpc_and_stops(exported_mlp, tmp_path):
    """yatdeploy.serve in this process: a real server on 127.0.0.1 (a background thread), asked over HTTP, measured
    by yatdeploy.bench, stopped by its with block."""
    import urllib.request

    from tests.servers import free_port

    port, grpc_port = free_port(), free_port()
    with yatdeploy.serve(exported_mlp.onnx, port=port, grpc_port=grpc_port, threads=1,
                         log_level="warning") as server:
        assert server.url == f"http://127.0.0.1:{port}" and server.grpc_url == f"grpc://127.0.0.1:{grpc_port}"
        assert server.running
        body = json.dumps({"inputs": [{"name": "input", "shape": [2, 16], "datatype": "FP32",
                                       "data": [0.5] * 32}]}).encode()
        request = urllib.request.Request(f"{server.url}/v2/models/mlp/infer", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        x = np.full((2, 16), 0.5, dtype=np.float32)
        with torch.inference_mode():
            want = exported_mlp.loaded.module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], want.shape), want, rtol=1e-4, atol=1e-5)
        for url in (server.url, server.grpc_url):
            result = yatdeploy.bench(url, "mlp", concurrencies=(2,), duration=0.3, warmup=0,
                                     out=tmp_path / url.split(":")[0])
            [step] = result.steps
            assert step.errors == 0 and step.latencies_us, step.first_error
            assert [p.name for p in result.written] == ["bench.csv", "bench.html", "bench.json"]
    assert not server.running
    with pytest.raises(OSError):  # stopped: the port no longer answers
        urllib.request.urlopen(f"{server.url}/v2/health/live", timeout=5)
    again = yatdeploy.serve(exported_mlp.onnx, port=port, grpc_port=0, threads=1, log_level="warning")
    try:  # the port is free again for another server of this process
        assert urllib.request.urlopen(f"{again.url}/v2/health/ready", timeout=5).status == 200
    finally:
        again.stop()


def _yatdeploy_threads() -> list[str]:
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name.startswith(("infer-", "yatdeploy-")))


@pytest.mark.slow
def test_a_handle_whose_start_fails_says_so_and_leaves_nothing_behind(exported_mlp):
    """The gRPC port taken after serve probed it (here: before start): uvicorn ends such a start-up with
    SystemExit, which must not reach the caller; the HTTP port, the batcher and the pools are let go."""
    import socket

    from tests.servers import free_port
    from yatdeploy.serving.server import ServeSettings, _prepare

    before = _yatdeploy_threads()
    port, grpc_port = free_port(), free_port()
    handle = _prepare(exported_mlp.onnx, ServeSettings(port=port, grpc_port=grpc_port, threads=1,
                                                       log_level="error"), QUIET)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc_port))
        taken.listen()
        with pytest.raises(YatDeployError, match=f"the server did not start on http://127.0.0.1:{port} and gRPC "
                                                 f"port {grpc_port}"):
            handle.start()
    assert _yatdeploy_threads() == before
    with socket.socket() as again:  # the HTTP port is free
        again.bind(("127.0.0.1", port))


@pytest.mark.slow
def test_stop_runs_what_the_batchers_hold_at_once_and_ends_every_thread(exported_mlp):
    """A request waiting out an 8 s batching delay is answered as soon as stop() is called (as SIGTERM does for
    the command), and the server's threads end with it."""
    import threading
    import urllib.request

    from tests.servers import free_port

    before = _yatdeploy_threads()
    server = yatdeploy.serve(exported_mlp.onnx, port=free_port(), grpc_port=0, threads=1, log_level="warning",
                             max_queue_delay_us=8_000_000)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32",
                                   "data": [0.5] * 16}]}).encode()
    answered = {}

    def ask() -> None:
        request = urllib.request.Request(f"{server.url}/v2/models/mlp/infer", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            answered["status"] = response.status

    client = threading.Thread(target=ask)
    client.start()
    time.sleep(0.5)  # the request is in the batcher, waiting for the delay
    started = time.perf_counter()
    server.stop()
    stopped_after = time.perf_counter() - started
    client.join(30)
    assert answered == {"status": 200}
    assert stopped_after < 4.0, f"stop() waited {stopped_after:.1f} s: the batching delay was not cut short"
    assert _yatdeploy_threads() == before


def test_a_seed_numpy_cannot_take_is_refused_before_any_work(tmp_path):
    for call in (lambda: yatdeploy.export(tmp_path / "absent.pt", (1, 16), tmp_path / "m.onnx", seed=-1),
                 lambda: yatdeploy.validate(tmp_path / "absent.onnx", tmp_path / "absent.pt", seed=-1)):
        with pytest.raises(YatDeployError, match="`seed` -1: must be a whole number from 0 to 4294967295"):
            call()
