"""Triton's own Python client examples run unchanged against `yatdeploy serve` (issue 25's goal): which pass, which
fail for a reason the issue accepts, and which fail for a reason it does not.

The examples are third-party code fetched by the user (they never enter this repository):

    git clone --depth 1 https://github.com/triton-inference-server/client /tmp/triton-client
    python benchmarks/triton_client_examples.py /tmp/triton-client/src/python/examples [--json FILE]

In a temporary folder it writes a model repository with the interfaces Triton's qa repository gives the examples
(tests/conformance_models.py: "simple" INT32 add/sub, "simple_string", "simple_identity", "simple_int8",
"custom_identity_int32" and a stand-in "densenet_onnx" with a label file; no sequence or decoupled model: yatdeploy
has neither a sequence batcher nor decoupled models), starts `yatdeploy serve` on 127.0.0.1 (on Triton's ports
8000/8001 when they are free, because memory_growth_test.py has them written in), runs each example as a
subprocess with `-u 127.0.0.1:PORT` (the HTTP port or the gRPC one, as the example's protocol) and a timeout, and
prints a table: the example, pass or fail, the class of an expected failure, and the last line of its output on a
failure. The model-control examples each count the models of the repository (7 over HTTP, 8 over gRPC), so each gets
its own server with `--model-control-mode explicit` on a repository of that many models.

Expected classes (the issue's exceptions and what can't be had offline): cuda-shm (no CUDA shared memory without a
GPU), sequence (no sequence batcher), decoupled (no decoupled models), server-name (the example asserts the server
calls itself "triton"), offline (an ensemble of DALI/Python preprocessing and a real image network). Every other
example is required; the summary counts the passes among those. The exit status is 0 whatever the figures (this is
a measurement); --json FILE writes them with the date, the examples' commit (--examples-commit, or read from
EXAMPLES_DIR's git tree), the machine and the versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere in the checkout: tests.conformance_models
    sys.path.insert(0, str(ROOT))

from served import free_port  # noqa: E402  (the sibling module: the server process)

TIMEOUT_S = 120

# An expected failure's class, by example file; every example not named here is required to pass.
EXPECTED = {
    "simple_grpc_cudashm_client.py": "cuda-shm",
    "simple_http_cudashm_client.py": "cuda-shm",
    "simple_grpc_aio_sequence_stream_infer_client.py": "sequence",
    "simple_grpc_sequence_stream_infer_client.py": "sequence",
    "simple_grpc_sequence_sync_infer_client.py": "sequence",
    "simple_http_sequence_sync_infer_client.py": "sequence",
    "simple_grpc_custom_repeat.py": "decoupled",
    "simple_grpc_health_metadata.py": "server-name",
    "simple_http_health_metadata.py": "server-name",
    "ensemble_image_client.py": "offline",
}

# Arguments besides -u, by example; {image} is a generated picture. An example run twice (both protocols) has two.
IMAGE_ARGS = ["-m", "densenet_onnx", "-c", "3", "-s", "INCEPTION", "{image}"]
EXTRA_ARGS: dict[str, list[list[str]]] = {
    # over HTTP it needs attrdict (unmaintained; not a tritonclient dependency): its gRPC form is run
    "image_client.py": [["-i", "grpc", *IMAGE_ARGS]],
    "grpc_image_client.py": [IMAGE_ARGS],
    "ensemble_image_client.py": [["{image}"]],
    "reuse_infer_objects_client.py": [[], ["-i", "grpc"]],
    "memory_growth_test.py": [["-r", "20"], ["-i", "grpc", "-r", "20"]],
}
MODEL_CONTROL_COUNTS = {"simple_http_model_control.py": 7, "simple_grpc_model_control.py": 8}


@dataclass
class Row:
    example: str
    args: list[str]
    passed: bool
    expected: str  # the class of an expected failure, "" for a required example
    seconds: float
    last_line: str  # on a failure


def _repository(folder: Path) -> Path:
    from onnx import TensorProto

    from tests import conformance_models as models

    models.add_sub(folder)  # "simple"
    models.add_sub_strings(folder)  # "simple_string"
    models.add_sub(folder, "simple_int8", element=TensorProto.INT8, data_type="TYPE_INT8")
    models.identity(folder, "simple_identity", TensorProto.STRING, "TYPE_STRING")
    models.identity(folder, "custom_identity_int32", TensorProto.INT32, "TYPE_INT32")
    models.image_classifier(folder)  # "densenet_onnx"
    return folder


def _model_control_repository(folder: Path, count: int) -> Path:
    """`count` models, "simple" among them: the model-control examples check how many the index lists."""
    from tests import conformance_models as models

    models.add_sub(folder)
    models.add_sub_strings(folder)
    for i in range(count - 2):
        models.add_sub(folder, f"simple_copy_{i}")
    return folder


def _image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = folder / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(path)
    return path


class _Serve:
    """`yatdeploy serve` on 127.0.0.1, its output in a file; waited for until live."""

    def __init__(self, repository: Path, log: Path, *args: str, port: int = 0, grpc_port: int = 0) -> None:
        self.port, self.grpc_port = free_port(port), free_port(grpc_port)
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "yatdeploy", "serve", str(repository), "--port", str(self.port),
                 "--grpc-port", str(self.grpc_port), "--threads", "1", "--log-level", "warning", *args],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"yatdeploy serve exited: {log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/live", timeout=1).status == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("yatdeploy serve was not live in 90 s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _is_grpc(example: Path, args: list[str]) -> bool:
    if "-i" in args:
        return args[args.index("-i") + 1].lower() == "grpc"
    return 'default="localhost:8001"' in example.read_text()


def _run(example: Path, args: list[str], url: str | None, timeout_s: float) -> tuple[bool, float, str]:
    command = [sys.executable, str(example), *args] + (["-u", url] if url else [])
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=example.parent)
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        lines = [line for line in text.splitlines() if line.strip()]
        return False, time.monotonic() - start, f"timed out after {timeout_s:.0f} s" + (
            f" (last: {lines[-1].strip()})" if lines else "")
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]
    return done.returncode == 0, time.monotonic() - start, "" if done.returncode == 0 else (
        f"exit {done.returncode}: " + (lines[-1] if lines else "(no output)"))


def _examples_commit(folder: Path, given: str | None) -> str | None:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_all(examples_dir: Path, timeout_s: float) -> list[Row]:
    rows: list[Row] = []
    examples = sorted(examples_dir.glob("*.py"))
    with tempfile.TemporaryDirectory(prefix="triton-examples-") as tmp:
        work = Path(tmp)
        image = _image(work)
        server = _Serve(_repository(work / "repo"), work / "serve.log", port=8000, grpc_port=8001)
        print(f"yatdeploy serve: HTTP 127.0.0.1:{server.port}, gRPC 127.0.0.1:{server.grpc_port}", flush=True)
        try:
            for example in examples:
                if example.name in MODEL_CONTROL_COUNTS:
                    continue
                for args in EXTRA_ARGS.get(example.name, [[]]):
                    args = [a.replace("{image}", str(image)) for a in args]
                    grpc = _is_grpc(example, args)
                    fixed = '"-u"' not in example.read_text()  # memory_growth_test.py: localhost:8000/8001
                    url = None if fixed else f"127.0.0.1:{server.grpc_port if grpc else server.port}"
                    if fixed and (server.port, server.grpc_port) != (8000, 8001):
                        rows.append(Row(example.name, args, False, EXPECTED.get(example.name, ""), 0.0,
                                        "not run: it needs localhost:8000/8001, which were taken"))
                        continue
                    passed, seconds, last = _run(example, args, url, timeout_s)
                    rows.append(Row(example.name, args, passed, EXPECTED.get(example.name, ""), seconds, last))
                    print(f"  {example.name} {_short(args)}".rstrip() + f": {'pass' if passed else 'FAIL'}", flush=True)
        finally:
            server.stop()
        for name, count in MODEL_CONTROL_COUNTS.items():
            example = examples_dir / name
            if not example.exists():
                continue
            control = _Serve(_model_control_repository(work / f"repo-{count}", count), work / f"serve-{count}.log",
                             "--model-control-mode", "explicit")
            try:
                grpc = _is_grpc(example, [])
                passed, seconds, last = _run(
                    example, [], f"127.0.0.1:{control.grpc_port if grpc else control.port}", timeout_s)
            finally:
                control.stop()
            rows.append(Row(name, [], passed, EXPECTED.get(name, ""), seconds, last))
            print(f"  {name}: {'pass' if passed else 'FAIL'}", flush=True)
    rows.sort(key=lambda row: (row.example, row.args))
    return rows


def _short(args: list[str]) -> str:
    return " ".join("IMAGE" if a.endswith("picture.png") else a for a in args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples_dir", type=Path, help="client/src/python/examples of a Triton client checkout")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--examples-commit", help="the client repository's commit (default: read from its git tree)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per example (default 120)")
    options = parser.parse_args(argv)

    rows = run_all(options.examples_dir.resolve(), options.timeout)
    width = max(len(f"{row.example} {_short(row.args)}") for row in rows)
    print(f"\n{'example'.ljust(width)}  result  expected   last line on failure")
    for row in rows:
        name = f"{row.example} {_short(row.args)}".strip()
        print(f"{name.ljust(width)}  {'pass' if row.passed else 'FAIL':6}  {row.expected or '-':9}  "
              f"{row.last_line[:160]}")
    required = [row for row in rows if not row.expected]
    passed = sum(row.passed for row in required)
    unexpected = [row for row in required if not row.passed]
    print(f"\nrequired: {passed}/{len(required)} pass; expected failures: "
          f"{sum(not row.passed for row in rows if row.expected)}/{sum(bool(row.expected) for row in rows)} "
          f"({', '.join(sorted({row.expected for row in rows if row.expected}))}); "
          f"all runs: {sum(row.passed for row in rows)}/{len(rows)}")
    for row in unexpected:
        print(f"  unexpected failure: {row.example} {_short(row.args)}: {row.last_line}")

    if options.json:
        report = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "examples_dir": str(options.examples_dir), "examples_commit": _examples_commit(
                options.examples_dir, options.examples_commit),
            "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                        "cores": os.cpu_count()},
            "versions": {"python": platform.python_version(),
                         **{p: _version(p) for p in ("yatdeploy", "tritonclient", "onnxruntime", "grpcio")}},
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "required_passed": passed, "required": len(required),
            "rows": [{**asdict(row), "args": _short(row.args).split()} for row in rows],
        }
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
