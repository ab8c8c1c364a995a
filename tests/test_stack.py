"""The compose benchmark stack, checked without a Docker engine: the file validates with Debian's
docker-compose, and the commands its services run are run here directly on 127.0.0.1."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

import yatdeploy
from tests.model_zoo import yat_gpt, yat_mlp
from tests.servers import REPO, Server, free_port
from yatdeploy.cli import main

pytestmark = pytest.mark.slow  # the benchmark stack: docker-compose, prometheus, a server subprocess

COMPOSE = REPO / "docker-compose.yml"
needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                   reason="Debian's docker-compose is not installed (make test installs it)")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="Debian's prometheus is not installed (make test installs it)")


def compose_config() -> dict:
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@needs_compose
def test_the_compose_file_validates():
    for extra in ([], ["--profile", "gpu"], ["--profile", "grpc"], ["--profile", "lm"]):
        done = subprocess.run(["docker-compose", "-f", str(COMPOSE), *extra, "config", "-q"],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0, done.stderr


@needs_compose
def test_the_stack_has_its_services():
    services = compose_config()["services"]
    assert set(services) == {"server", "server-gpu", "loadgen", "loadgen-grpc", "server-lm", "loadgen-lm",
                             "prometheus"}
    assert services["loadgen-grpc"]["profiles"] == ["grpc"]
    assert services["server-lm"]["profiles"] == services["loadgen-lm"]["profiles"] == ["lm"]
    assert services["loadgen-lm"]["depends_on"]["server-lm"]["condition"] == "service_healthy"
    host_ports = [p.get("published") if isinstance(p, dict) else p.split(":")[0]
                  for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(map(str, host_ports))), host_ports  # GPU and CPU servers can run together
    assert services["server"]["healthcheck"]["test"][0] == "CMD"
    assert (REPO / services["server"]["build"]["dockerfile"]).is_file()
    assert services["loadgen"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["loadgen"]["command"][:2] == ["yatdeploy", "bench"]
    assert "service/prometheus.yml" in str(services["prometheus"]["volumes"][0])
    gpu = services["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("stack")
    torch.save(yat_mlp(), folder / "model.pt")
    assert main(["export", "-q", str(folder / "model.pt"), "--input-shape", "1,16", "--no-validate",
                 "--repository", str(folder / "repository"), "--name", "model"]) == 0
    return folder / "repository"


def _service_command(name: str) -> list[str]:
    return list(yaml.safe_load(COMPOSE.read_text())["services"][name]["command"])


@pytest.fixture(scope="module")
def stack_server(repository):
    command = _service_command("server")
    assert command[:3] == ["yatdeploy", "serve", "/models"]
    # The same command, on the model repository here and a free port of 127.0.0.1.
    args = command[3:]
    args[args.index("--host") + 1] = "127.0.0.1"
    for flag in ("--port", "--grpc-port"):  # the Server takes free ports
        index = args.index(flag)
        del args[index:index + 2]
    server = Server(repository, *args)
    yield server
    server.stop()


@pytest.mark.parametrize("service,scheme", [("loadgen", "http"), ("loadgen-grpc", "grpc")])
def test_the_loadgen_command_runs_against_the_server(stack_server, tmp_path, service, scheme):
    command = _service_command(service)
    assert command[:2] == ["yatdeploy", "bench"] and command[2].startswith(f"{scheme}://")
    args = command[2:]
    args[0] = f"{scheme}://{stack_server.url if scheme == 'http' else stack_server.grpc_url}"
    args[args.index("--duration") + 1] = "0.5"
    args[args.index("--out") + 1] = str(tmp_path)
    args[args.index("--concurrency") + 1] = "1,4"
    assert main(["bench", "-q", *args, "--warmup", "0.1"]) == 0
    assert (tmp_path / "bench.csv").is_file() and (tmp_path / "bench.html").is_file()


@pytest.fixture(scope="module")
def lm_stack_server(tmp_path_factory):
    """The lm profile's server command on a decoder export of the demo LM's context (64: the load generator's
    default mix fits it) in place of /lm."""
    command = _service_command("server-lm")
    assert command[:3] == ["yatdeploy", "serve", "/lm/model.onnx"]
    export = tmp_path_factory.mktemp("stack-lm") / "lm" / "model.onnx"
    yatdeploy.export(yat_gpt(context=64), path=export, kv_cache=True, validate=False)
    args = command[3:]
    args[args.index("--host") + 1] = "127.0.0.1"
    for flag in ("--port", "--grpc-port"):
        index = args.index(flag)
        del args[index:index + 2]
    server = Server(export, *args)
    yield server, export
    server.stop()


def test_the_lm_loadgen_command_runs_against_the_lm_server(lm_stack_server, tmp_path):
    server, export = lm_stack_server
    command = _service_command("loadgen-lm")
    assert command[:3] == ["yatdeploy", "bench", "--lm"]
    args = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in command[3:]]  # ${VAR:-default}: the default
    args[0] = f"http://{server.url}"
    args[args.index("--duration") + 1] = "0.5"
    args[args.index("--concurrency") + 1] = "1,4"
    args[args.index("--lm-export") + 1] = str(export)
    args[args.index("--out") + 1] = str(tmp_path)
    assert main(["bench", "-q", "--lm", *args, "--warmup", "0.1"]) == 0
    assert (tmp_path / "bench.html").is_file() and (tmp_path / "bench.json").is_file()


@needs_prometheus
def test_prometheus_scrapes_the_server(stack_server, tmp_path):
    config = yaml.safe_load((REPO / "service" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [stack_server.url]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        stack_server.post("/v2/models/model/infer", b'{"inputs": [{"name": "input", "shape": [1, 16], '
                          b'"datatype": "FP32", "data": [' + b",".join([b"0.5"] * 16) + b"]}]}")
        query = urllib.parse.quote('nv_inference_request_success{job="yatdeploy",model="model"}')
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline and value is None:
            time.sleep(1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=5) as r:
                    result = yaml.safe_load(r.read())["data"]["result"]
            except OSError:
                continue
            if result:
                value = float(result[0]["value"][1])
        assert value is not None and value >= 1, "prometheus never saw the server's success counter"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
