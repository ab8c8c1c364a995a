"""The command line: exit codes, one-line errors without tracebacks, reports, help, one module per command."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.model_zoo import PatchedYat, yat_mlp
from tests.test_validate import tamper_first_yat_weight
from yatdeploy import api
from yatdeploy.cli import EXIT_OK, EXIT_USAGE, EXIT_VALIDATION_FAILED, main

REPO = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "yatdeploy", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture
def model_file(save_whole) -> Path:
    return save_whole(yat_mlp())


def test_export_then_validate(model_file, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    report = tmp_path / "report.json"
    args = ["export", "-q", str(model_file), "-o", str(out), "--input-shape", "1,16", "--report", str(report)]
    assert main(args) == EXIT_OK
    printed = capsys.readouterr().out
    assert "2 YatGemm node(s) (2 YatNMN)" in printed
    assert "ort-function" in printed and "PASSED" in printed
    assert json.loads(report.read_text())["passed"] is True

    assert main(["validate", "-q", str(out), "--against", str(model_file), "--batches", "1,7"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "random batch 7" in printed and "max rel err" in printed


def test_validate_exits_1_and_names_the_output_when_weights_changed(exported_mlp, tmp_path, capsys):
    out = exported_mlp.onnx_copy(tmp_path)
    tamper_first_yat_weight(out)
    capsys.readouterr()
    assert main(["validate", "-q", str(out), "--against", str(exported_mlp.source)]) == EXIT_VALIDATION_FAILED
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "output 'output'" in printed


@pytest.mark.slow
def test_default_output_path_is_next_to_the_model(model_file, capsys):
    assert main(["export", "-q", str(model_file), "--input-shape", "1,16", "--no-validate"]) == EXIT_OK
    assert model_file.with_suffix(".onnx").is_file()


def _single_error(stderr: str) -> str:
    """The one error line among the progress lines, and no traceback."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("yatdeploy ") and " error: " in line]
    assert len(errors) == 1, stderr
    return errors[0]


def _error_line(capsys) -> str:
    return _single_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda t, m: ["export", str(t / "absent.pt"), "--input-shape", "1,16"], "no such file"),
        (lambda t, m: ["export", str(m), "--input-shape", "1,99"], "can't run on an input of shape (1, 99)"),
        (lambda t, m: ["export", str(m), "--input-shape", "a,b"], "expected comma-separated positive integers"),
        (lambda t, m: ["export", str(m), "--input-shape", "0,16"], "expected comma-separated positive integers"),
        (lambda t, m: ["export", str(m), "--input-shape", "1,16", "-o", str(m)], "would overwrite the model"),
        (lambda t, m: ["export", str(m), "--input-shape", "1,16", "--atol", "-1"], "--atol -1.0: must be"),
        (lambda t, m: ["validate", str(t / "x.onnx"), "--against", str(m)], "no such file"),
        (lambda t, m: ["validate", str(m), "--against", str(m)], "not an ONNX model"),
        (lambda t, m: ["validate", str(m), "--against", str(m), "--backend", "nope"], "unknown backend 'nope'"),
        (lambda t, m: ["validate", str(m), "--against", str(m), "--batches", "1,x"], "--batches '1,x'"),
        (lambda t, m: ["demo", "--epochs", "0"], "--epochs 0: must be positive"),
    ],
    ids=["missing", "wrong-shape", "bad-shape", "zero-dim", "overwrite", "atol", "missing-onnx", "not-onnx",
         "backend", "batches", "epochs"],
)
def test_errors_are_one_line_with_exit_2(model_file, tmp_path, capsys, make_args, message):
    assert main(make_args(tmp_path, model_file)) == EXIT_USAGE
    line = _error_line(capsys)
    assert line.startswith("yatdeploy ") and message in line


def test_corrupt_and_unknown_files(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 not a model")
    assert main(["export", str(garbage), "--input-shape", "1,4"]) == EXIT_USAGE
    assert "not a PyTorch model file" in _error_line(capsys)
    state = tmp_path / "weights.pt"
    torch.save(yat_mlp().state_dict(), state)
    assert main(["export", str(state), "--input-shape", "1,16"]) == EXIT_USAGE
    assert "pass --arch" in _error_line(capsys)


def test_an_unsupported_layer_option_names_layer_and_option(save_whole, capsys):
    path = save_whole(torch.nn.Sequential(PatchedYat(4, 2)))
    assert main(["export", "-q", str(path), "--input-shape", "1,4", "--trust-pickle"]) == EXIT_USAGE
    line = _error_line(capsys)
    assert "layer '0': option forward can't be exported" in line


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["export", "--debug", str(tmp_path / "absent.pt"), "--input-shape", "1,4"]) == EXIT_USAGE
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_process_errors_cleanly_and_exports(model_file, tmp_path):
    failed = _run_cli("export", str(tmp_path / "absent.pt"), "--input-shape", "1,16")
    assert failed.returncode == EXIT_USAGE
    assert "no such file" in _single_error(failed.stderr)
    done = _run_cli("export", str(model_file), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16")
    assert done.returncode == EXIT_OK, done.stderr
    assert "PASSED" in done.stdout
    assert "exporting to ONNX" in done.stderr  # progress goes to stderr
    assert "torchvision" not in done.stderr  # library chatter is kept out without --debug


@pytest.mark.parametrize("command", [[], ["export"], ["validate"], ["build-engine"], ["demo"], ["serve"], ["bench"],
                                     ["doctor"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: yatdeploy" in text
    if command == ["export"]:
        assert "--input-shape" in text and "--trust-pickle" in text and "--arch" in text


def test_bench_exits_4_when_requests_fail(exported_mlp, tmp_path, capsys):
    """Failed requests are not a failed validation: bench has an exit status of its own."""
    pytest.importorskip("fastapi", reason="the service extra is not installed")
    from tests.servers import Server
    from yatdeploy.cli import EXIT_REQUESTS_FAILED

    out = exported_mlp.onnx_copy(tmp_path)  # served as model "m"
    server = Server(out, "--max-batch-size", "4")
    try:
        status = main(["bench", "-q", f"http://{server.url}", "--model", "m", "--concurrency", "1", "--batch", "8",
                       "--duration", "0.3", "--warmup", "0", "--out", str(tmp_path / "bench")])
    finally:
        server.stop()
    assert status == EXIT_REQUESTS_FAILED != EXIT_VALIDATION_FAILED
    assert "request(s) failed; first:" in capsys.readouterr().err


@pytest.mark.slow
def test_a_failed_consistency_check_of_ours_is_an_internal_error(model_file, tmp_path, monkeypatch, capsys):
    """Our own check on our own output failing is a bug (exit 3, asks for a report), not bad input (2)."""
    from yatdeploy.cli import EXIT_INTERNAL
    from yatdeploy.exporting import check

    monkeypatch.setattr(check, "yat_gemm_nodes", lambda model: [])  # as if the exporter dropped the nodes
    assert main(["export", "-q", str(model_file), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16"]) \
        == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "consistency check failed: export wrote 0 YatGemm nodes for 2 Yat layer calls" in err
    assert "please report it" in err and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("member,message", [
    ("object", r"objs.npz\[a\]: Object arrays cannot be loaded"),
    ("crc", r"crc.npz\[a\]: can't be read \(BadZipFile"),
])
def test_a_bad_npz_member_is_bad_input(exported_mlp, tmp_path, capsys, member, message):
    import re

    import numpy as np

    out, model_file = exported_mlp.onnx, exported_mlp.source
    if member == "object":
        path = tmp_path / "objs.npz"
        np.savez(path, a=np.array([{"a": 1}], dtype=object))
    else:
        path = tmp_path / "crc.npz"
        np.savez(path, a=np.zeros((2, 16), np.float32))
        data = bytearray(path.read_bytes())
        data[data.find(b"\x93NUMPY") + 200] ^= 1  # inside the array's values
        path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["validate", "-q", str(out), "--against", str(model_file), "--inputs", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0])


# ---- outputs: written whole or not at all; a place that can't take them is the user's to change (exit 2)

# `python -c` with this, then `yatdeploy ARGS...`: writes past the limit fail with EFBIG (SIGXFSZ ignored), as on a
# full disk, for any user. The limit is set by the child itself, not by a preexec_fn: a preexec_fn makes Python
# fork() (not vfork) and run code in the child, where the atfork handlers of what this test process has loaded
# (grpc's event engine, from earlier tests) run too; one aborted such a child once (SIGABRT, "epoll_wait error").
_LIMITED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "limit = int(sys.argv.pop(1)); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
            "sys.argv[0] = 'yatdeploy'; runpy.run_module('yatdeploy', run_name='__main__', alter_sys=True)")


def _run_limited(max_bytes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", _LIMITED, str(max_bytes), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


@pytest.mark.slow
def test_an_export_onto_a_full_disk_leaves_the_previous_file_and_no_partial_one(model_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"previous export")
    done = _run_limited(2000, "export", "-q", str(model_file), "-o", str(out / "m.onnx"), "--input-shape", "1,16",
                        "--no-validate")
    assert done.returncode == EXIT_USAGE, done.stderr
    line = _single_error(done.stderr)
    assert "m.onnx" in line and "file size limit" in line and "internal error" not in line
    assert _tree(out) == {"m.onnx": b"previous export"}


@pytest.mark.slow
def test_a_repository_entry_is_written_whole_or_not_at_all(model_file, exported_mlp, tmp_path):
    from yatdeploy import native
    from yatdeploy.packaging import write_repository

    library = native.ort_library_path()
    if library is None or library.stat().st_size < 60_000:
        pytest.skip("needs the built custom-op library (larger than the model) to fill the disk while copying it")
    repo = tmp_path / "repo"
    write_repository(repo, "m", exported_mlp.onnx, op_library=None)  # a previous entry
    before = _tree(repo)
    # model.onnx (a few kB) fits; the custom-op library copied beside config.pbtxt does not
    done = _run_limited(50_000, "export", "-q", str(model_file), "-o", str(tmp_path / "m.onnx"), "--input-shape",
                        "1,16", "--no-validate", "--repository", str(repo))
    assert done.returncode == EXIT_USAGE, done.stderr
    assert "file size limit" in _single_error(done.stderr)
    assert _tree(repo) == before  # no half entry, no staging folder left beside it
    fresh = tmp_path / "fresh"
    done = _run_limited(50_000, "export", "-q", str(model_file), "-o", str(tmp_path / "m.onnx"), "--input-shape",
                        "1,16", "--no-validate", "--repository", str(fresh))
    assert done.returncode == EXIT_USAGE, done.stderr
    assert not fresh.exists()


@pytest.mark.slow
def test_a_validation_report_onto_a_full_disk_leaves_no_file(exported_mlp, tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text("previous report")
    # The file size limit set once validation has run (ONNX Runtime's profiler writes files while it runs).
    script = (
        "import resource, signal, sys, yatdeploy\n"
        "from yatdeploy.errors import YatDeployError\n"
        f"report = yatdeploy.validate({str(exported_mlp.onnx)!r}, {str(exported_mlp.source)!r}, batches=(1,))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "try:\n"
        f"    report.write_json({str(report)!r})\n"
        "except YatDeployError as exc:\n"
        "    sys.exit(str(exc))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 1 and "report.json" in done.stderr and "file size limit" in done.stderr, done.stderr
    assert _tree(tmp_path) == {"report.json": b"previous report"}
    # /dev/full: ENOSPC, written in place (a device is not replaced by a file)
    assert main(["validate", "-q", str(exported_mlp.onnx), "--against", str(exported_mlp.source), "--batches", "1",
                 "--report", "/dev/full"]) == EXIT_USAGE
    assert "no space left" in _error_line(capsys)
    assert Path("/dev/full").is_char_device()


@pytest.mark.parametrize("make_args,message", [
    (lambda t, m, o: ["export", str(m), "--input-shape", "1,16", "-o", str(t)], "is a folder"),
    (lambda t, m, o: ["export", str(m), "--input-shape", "1,16", "-o", str(t / "file" / "m.onnx")], "not a folder"),
    (lambda t, m, o: ["export", str(m), "--input-shape", "1,16", "-o", str(t / "m.onnx"), "--repository",
                      str(t / "file")], "not a folder"),
    (lambda t, m, o: ["export", str(m), "--input-shape", "1,16", "-o", str(t / "m.onnx"), "--report", str(t)],
     "is a folder"),
    (lambda t, m, o: ["validate", str(o), "--against", str(m), "--report", str(t)], "is a folder"),
    (lambda t, m, o: ["export", str(m), "--input-shape", "1,16", "-o", "/sys/yatdeploy-test/m.onnx"], "/sys"),
], ids=["output-dir", "output-under-a-file", "repository-file", "report-dir", "validate-report-dir", "read-only"])
def test_an_output_that_cannot_be_written_is_one_line_exit_2(exported_mlp, tmp_path, capsys, make_args, message):
    (tmp_path / "file").write_text("a file, not a folder")
    before = _tree(tmp_path)
    assert main(make_args(tmp_path, exported_mlp.source, exported_mlp.onnx)) == EXIT_USAGE
    line = _error_line(capsys)
    assert message in line and "internal error" not in line
    assert _tree(tmp_path) == before


@pytest.mark.slow
def test_ctrl_c_during_export_exits_130_with_one_line_and_no_files(save_whole, tmp_path):
    """SIGINT while torch.onnx.export runs (the exporter wraps the KeyboardInterrupt in its own error)."""
    import signal
    import time

    from nmn.torch import YatNMN

    torch.manual_seed(0)
    source = save_whole(torch.nn.Sequential(*[YatNMN(64, 64) for _ in range(40)]).eval())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "yatdeploy", "export", str(source), "--input-shape", "1,64", "-o", str(out / "m.onnx"),
         "--repository", str(out / "repo")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=env)
    seen = ""
    while "exporting to ONNX" not in seen:
        char = process.stderr.read(1)
        assert char, seen
        seen += char
    time.sleep(1.5)  # inside torch.onnx.export (seconds for 40 layers; its first import of torch._dynamo among them)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, seen + stderr
    assert "Traceback" not in stderr
    lines = [line for line in (seen + stderr).splitlines() if line.startswith("yatdeploy ")]
    assert lines == ["yatdeploy export: interrupted"], seen + stderr
    assert _tree(out) in ({}, {"": b"<dir>"}) and not list(tmp_path.glob("**/*.partial"))


class Branchy(torch.nn.Module):
    """Control flow on a value: torch.export can't trace it."""

    def __init__(self):
        super().__init__()
        from nmn.torch import YatNMN

        self.yat = YatNMN(16, 4)

    def forward(self, x):
        y = self.yat(x)
        return y if y.sum() > 0 else -y


@pytest.mark.slow
def test_an_exporter_error_names_its_cause_without_colour_codes(tmp_path, capsys):
    torch.save(Branchy().state_dict(), tmp_path / "branchy.pt")
    assert main(["export", "-q", str(tmp_path / "branchy.pt"), "--arch", "tests.test_cli:Branchy", "--input-shape",
                 "1,16", "-o", str(tmp_path / "b.onnx")]) == EXIT_USAGE
    err = capsys.readouterr().err
    line = _single_error(err)
    assert "\x1b" not in err
    assert "torch.onnx.export failed" in line and "data-dependent" in line, line
    assert not (tmp_path / "b.onnx").exists()


def test_a_ctrl_c_a_library_swallowed_stops_the_work_at_the_next_step():
    """torch's exporter may catch what a Ctrl-C raises inside one of its capture strategies and try the next one;
    the CLI's handler records the interrupt, and the next step boundary raises it again."""
    from yatdeploy import progress as steps
    from yatdeploy.progress import Progress

    progress = Progress(enabled=False)
    ran = []
    steps.clear_interrupt()
    try:
        with progress.step("a library's work"):
            try:
                steps.on_interrupt(2, None)
            except KeyboardInterrupt:
                ran.append("swallowed")  # as a library catching BaseException would
            ran.append("went on")
        ran.append("next step")  # the end of the step raised first
    except KeyboardInterrupt:
        ran.append("interrupted")
    finally:
        steps.clear_interrupt()
    assert ran == ["swallowed", "went on", "interrupted"]
    with progress.step("after clearing"):  # a new command starts clean
        pass


# --- the command line's layout: one module per command over the API ------------------------------------------------

_CLI_LINE_BUDGET = 200  # cli.py: the top parser, dispatch, errors spelled as flags, the exit-code map


def _functions(path) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def test_every_command_is_one_module_registered_in_one_list_and_runs_the_api():
    """A command is a module of yatdeploy/commands/ (its flags, help and run) and its line in COMMANDS; its run turns
    the flags into a call of yatdeploy.api. cli.py holds none of them: no cmd_* function, no command's name."""
    from yatdeploy import cli, commands

    folder = Path(commands.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__", "common"}
    assert {c.__name__.rpartition(".")[2] for c in commands.COMMANDS} == modules
    names = [c.NAME for c in commands.COMMANDS]
    assert names == ["export", "fuse", "validate", "build-engine", "demo", "serve", "bench", "doctor"]  # --help's order
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subparsers.choices) == names
    for command in commands.COMMANDS:
        run = _functions(Path(command.__file__))["run"]
        calls = {f"{node.func.value.id}.{node.func.attr}" for node in ast.walk(run) if isinstance(node, ast.Call)
                 and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)}
        assert any(call.startswith("api.") for call in calls), f"{command.NAME}'s run calls no yatdeploy.api function"
        api_name = command.NAME.replace("-", "_")
        assert f"api.{api_name}" in calls and callable(getattr(api, api_name))

    source = Path(cli.__file__)
    assert len(source.read_text().splitlines()) <= _CLI_LINE_BUDGET
    assert not [name for name in _functions(source) if name.startswith("cmd_")]
    named = [node.value for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.Constant) and node.value in names]
    assert named == [], f"cli.py names commands: {named}"


def test_the_cli_spells_the_apis_keywords_as_each_commands_flags(tmp_path, capsys):
    """One check, two spellings: the API's keyword in Python, the command's flag (its own name or its ALIASES)."""
    assert main(["serve", "-q", str(tmp_path), "--no-batching", "--load-model", "a"]) == EXIT_USAGE
    assert "--load-model is for --model-control-mode explicit" in _error_line(capsys)
    assert main(["bench", "-q", "http://127.0.0.1:1", "--model", "m", "--concurrency", "0"]) == EXIT_USAGE
    assert "--concurrency '0': expected comma-separated positive integers" in _error_line(capsys)
    assert main(["validate", "-q", str(tmp_path / "m.onnx"), "--against", "m.pt", "--engine", "e.plan"]) == EXIT_USAGE
    assert "--engine e.plan: no such file" in _error_line(capsys)
