"""The server a benchmark measures, as a process of its own on 127.0.0.1: free ports, `yatdeploy serve` started
with the benchmark's options, and the wait until /v2/health/ready answers 200 (for any server of the v2
protocol: KServe's too), and the access log it writes with `--log-level info`. Shared by the benchmark scripts beside it (imported as a sibling: `from served import ...`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free on 127.0.0.1 (0: none preferred), else a port the system picks."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(process: subprocess.Popen, port: int, log: Path | None = None, seconds: float = 180.0) -> None:
    """Return once the server on `port` answers /v2/health/ready with 200; RuntimeError (with the end of `log`,
    where it writes one) when it exits first or isn't ready in `seconds` (it is killed then)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status == 200:
                return
        except OSError:
            pass
        exited = process.poll() is not None
        if exited or time.monotonic() > deadline:
            if not exited:
                process.kill()
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            why = f"exited with {process.returncode}" if exited else f"was not ready in {seconds:g} s"
            raise RuntimeError(f"the server {why}" + (f":\n{tail}" if tail else ""))
        time.sleep(0.2)


def yatdeploy_serve(path: Path, *options: str, port: int, grpc_port: int | str = "0",
                    log: Path | None = None, seconds: float = 180.0) -> subprocess.Popen:
    """`yatdeploy serve PATH --port PORT --grpc-port GRPC_PORT OPTIONS...` in this interpreter, its output in `log`
    (None: discarded), once it is ready."""
    command = [sys.executable, "-m", "yatdeploy", "serve", str(path), "--port", str(port), "--grpc-port",
               str(grpc_port), *options]
    if log is None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    wait_ready(process, port, log, seconds)
    return process


def access_lines(log: Path) -> list[dict]:
    """The access log's JSON lines in the server's output `log` (`--log-level info`: one per inference request, in
    order), the server's other lines skipped."""
    lines = []
    for text in log.read_text(errors="replace").splitlines():
        start = text.find('{"time"')
        if start >= 0:
            try:
                lines.append(json.loads(text[start:]))
            except ValueError:  # a line cut short (the server killed while writing it)
                continue
    return lines
