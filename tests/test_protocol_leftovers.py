"""Three corners of Triton's HTTP protocol against a real `yatdeploy serve`, spoken to over raw sockets: a raw binary
request (Inference-Header-Content-Length: 0) to a batching model with one more free dimension (the batch is 1 and
the other dimension comes from the size, as Triton deduces it), `GET /v2/` (the server metadata, as `GET /v2`), and
a body framed both by Transfer-Encoding: chunked and by Content-Length (read as chunked, as Triton reads it, and
the connection closed after the answer: RFC 9112 section 6.3)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")

from tests import conformance_models  # noqa: E402
from tests.servers import Server  # noqa: E402


@pytest.fixture(scope="module")
def leftovers_server(tmp_path_factory):
    from onnx import TensorProto, helper

    repo = tmp_path_factory.mktemp("leftovers") / "repo"
    value = helper.make_tensor_value_info
    for name, dims in (("rows", ["N", "M"]), ("grid", ["N", "H", "W"])):  # batch + 1 and batch + 2 free dims
        conformance_models._save([helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], name,
                                 [value("INPUT0", TensorProto.FLOAT, dims)], [value("OUTPUT0", TensorProto.FLOAT, dims)],
                                 repo / name / "1" / "model.onnx")
        (repo / name / "config.pbtxt").write_text(conformance_models._config(
            name, 8, ("INPUT0",), ("OUTPUT0",), "TYPE_FP32", ", ".join(["-1"] * (len(dims) - 1))))
    running = Server(repo)
    yield running
    running.stop()


def _exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes, bool]:
    """One request on a new connection: the status line, headers, body, and whether the server then closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(headers["content-length"]):
            body += connection.recv(65536)
        try:
            closed = connection.recv(1) == b""
        except TimeoutError:
            closed = False
        return lines[0], headers, body, closed


def _post(path: str, body: bytes, headers: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n".encode() + body


def test_a_raw_binary_request_deduces_the_free_dim_beside_the_batch(leftovers_server):
    data = np.arange(12, dtype=np.float32)
    status, headers, body, _ = _exchange(leftovers_server.port, _post(
        "/v2/models/rows/infer", data.tobytes(),
        f"Inference-Header-Content-Length: 0\r\nContent-Length: {data.nbytes}\r\n"))
    assert status.endswith("200 OK"), body
    length = int(headers["inference-header-content-length"])
    output = json.loads(body[:length])["outputs"][0]
    assert output["shape"] == [1, 12]  # the batch is 1, the other dimension from the 48 bytes
    np.testing.assert_array_equal(np.frombuffer(body[length:], np.float32), data)


def test_a_raw_binary_request_with_two_free_dims_beside_the_batch_is_refused(leftovers_server):
    data = np.arange(12, dtype=np.float32)
    status, _, body, _ = _exchange(leftovers_server.port, _post(
        "/v2/models/grid/infer", data.tobytes(),
        f"Inference-Header-Content-Length: 0\r\nContent-Length: {data.nbytes}\r\n"))
    assert status.endswith("400 Bad Request")
    assert "can't be deduced: input 'INPUT0' has 2 free dimensions" in json.loads(body)["error"]


def test_get_v2_with_a_slash_answers_the_server_metadata(leftovers_server):
    answers = [_exchange(leftovers_server.port, f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
               for path in ("/v2", "/v2/")]
    assert [status for status, *_ in answers] == ["HTTP/1.1 200 OK"] * 2
    assert json.loads(answers[0][2]) == json.loads(answers[1][2])
    assert json.loads(answers[1][2])["name"] == "yatdeploy"


def test_a_chunked_body_with_a_content_length_is_read_as_chunked(leftovers_server):
    """http_test.py test_content_encoding_chunked_manually sends both headers (requests adds a Content-Length):
    Triton answers it. The Content-Length here is deliberately short, as in a smuggling attempt: the chunks decide
    the body, and the connection is closed after the answer, so nothing after it is read as a request."""
    data = np.arange(8, dtype=np.float32).tobytes()
    chunked = f"{len(data):X}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    smuggled = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n"
    status, headers, body, closed = _exchange(leftovers_server.port, _post(
        "/v2/models/rows/infer", chunked + smuggled,
        "Inference-Header-Content-Length: 0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"))
    assert status.endswith("200 OK"), body
    assert headers["connection"] == "close" and closed
    length = int(headers["inference-header-content-length"])
    assert body[length:] == data
