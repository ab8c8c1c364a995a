"""System shared memory (Triton's extension) against a real `yatdeploy serve`, with the real tritonclient HTTP and
gRPC clients and tritonclient.utils.shared_memory, the way Triton's simple_http_shm_client / simple_grpc_shm_client
examples use them (written afresh here): regions registered, listed and unregistered, inputs read from them and
outputs written into them (numbers compared with ONNX Runtime run directly), offsets and sizes checked, hostile
keys refused (the CVE-2025-23319/23320 chain: a key that reaches a file, a link, a semaphore or another object),
CUDA shared memory answered as not supported."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service extra is not installed")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")

import tritonclient.utils.shared_memory as shm  # noqa: E402
from tritonclient.utils import InferenceServerException, serialize_byte_tensor  # noqa: E402

from tests import conformance_models  # noqa: E402
from tests.servers import Server, reference  # noqa: E402

if not os.path.isdir("/dev/shm"):
    pytest.skip("no /dev/shm on this machine", allow_module_level=True)

CLIENTS = {"http": httpclient, "grpc": grpcclient}
X0 = np.arange(16, dtype=np.int32)[None]
X1 = np.full((1, 16), 3, np.int32)
TENSOR = X0.nbytes  # 64 bytes: one [1, 16] INT32 tensor


@pytest.fixture(scope="module")
def repository(tmp_path_factory, exported_mlp) -> Path:
    from yatdeploy.packaging import write_repository

    repo = tmp_path_factory.mktemp("shm") / "repo"
    conformance_models.add_sub(repo)  # "simple": INT32 [-1, 16] twice -> sum, difference
    conformance_models.add_sub_strings(repo)  # "simple_string": the same on BYTES
    write_repository(repo, "mlp", exported_mlp.onnx, op_library=None)
    return repo


@pytest.fixture(scope="module")
def shm_server(repository):
    running = Server(repository)
    yield running
    running.stop()


@pytest.fixture(params=["http", "grpc"])
def client(request, shm_server):
    module = CLIENTS[request.param]
    made = module.InferenceServerClient(shm_server.url if request.param == "http" else shm_server.grpc_url)
    made.unregister_system_shared_memory()
    yield module, made
    made.unregister_system_shared_memory()
    made.close()


@pytest.fixture
def regions():
    """Shared-memory objects made by the test (tritonclient's handles), destroyed after it."""
    made = []

    def make(size: int) -> tuple[str, object]:
        key = f"/yat_test_{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, size)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _status(module, client, name: str | None = None) -> dict[str, dict]:
    """The regions the server lists, by name, as {key, offset, byte_size}, over either client."""
    if module is httpclient:
        entries = client.get_system_shared_memory_status(name or "")
    else:
        answer = client.get_system_shared_memory_status(name or "", as_json=True)
        entries = list(answer.get("regions", {}).values())
    return {e["name"]: {"key": e["key"], "offset": int(e.get("offset", 0)), "byte_size": int(e["byte_size"])}
            for e in entries}


def _simple_in_shm(module, input_region: str, output_region: str, offset: int = 0):
    inputs = [module.InferInput(n, [1, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory(input_region, TENSOR, offset)
    inputs[1].set_shared_memory(input_region, TENSOR, offset + TENSOR)
    outputs = [module.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
    outputs[0].set_shared_memory(output_region, TENSOR)
    outputs[1].set_shared_memory(output_region, TENSOR, TENSOR)
    return inputs, outputs


def test_inputs_and_outputs_in_regions_as_the_shm_examples_do(client, regions):
    """The simple_*_shm_client flow: unregister all, register an input and an output region, list them, infer with
    both inputs read from one region and both outputs written into another, then unregister."""
    module, c = client
    in_key, in_handle = regions(2 * TENSOR)
    out_key, out_handle = regions(2 * TENSOR)
    shm.set_shared_memory_region(in_handle, [X0, X1])
    c.register_system_shared_memory("input_data", in_key, 2 * TENSOR)
    c.register_system_shared_memory("output_data", out_key, 2 * TENSOR)
    assert _status(module, c) == {"input_data": {"key": in_key, "offset": 0, "byte_size": 2 * TENSOR},
                                  "output_data": {"key": out_key, "offset": 0, "byte_size": 2 * TENSOR}}

    inputs, outputs = _simple_in_shm(module, "input_data", "output_data")
    result = c.infer("simple", inputs, outputs=outputs)
    for index, (name, expected) in enumerate((("OUTPUT0", X0 + X1), ("OUTPUT1", X0 - X1))):
        answered = result.get_output(name)
        shape = answered["shape"] if module is httpclient else list(answered.shape)
        assert [int(d) for d in shape] == [1, 16]
        if module is httpclient:  # the answer says where the output is, and carries no data
            assert "data" not in answered and answered["parameters"] == {
                "shared_memory_region": "output_data", "shared_memory_byte_size": TENSOR,
                **({"shared_memory_offset": TENSOR} if index else {})}
        else:
            assert answered.parameters["shared_memory_region"].string_param == "output_data"
        got = shm.get_contents_as_numpy(out_handle, np.int32, [1, 16], offset=index * TENSOR)
        np.testing.assert_array_equal(got, expected)

    c.unregister_system_shared_memory("input_data")
    assert set(_status(module, c)) == {"output_data"}
    c.unregister_system_shared_memory()
    assert _status(module, c) == {}


def test_the_mlp_through_shared_memory_matches_onnx_runtime(client, regions, exported_mlp):
    module, c = client
    x = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
    expected = reference(exported_mlp.onnx, x)
    in_key, in_handle = regions(4096 + x.nbytes)
    out_key, out_handle = regions(4096 + expected.nbytes)
    shm.set_shared_memory_region(in_handle, [x], offset=4096)
    c.register_system_shared_memory("mlp_in", in_key, x.nbytes, offset=4096)  # a region starting at an offset
    c.register_system_shared_memory("mlp_out", out_key, 4096 + expected.nbytes)
    given = module.InferInput("input", list(x.shape), "FP32")
    given.set_shared_memory("mlp_in", x.nbytes)
    asked = module.InferRequestedOutput("output")
    asked.set_shared_memory("mlp_out", expected.nbytes, offset=100)  # a tensor at an offset within its region
    c.infer("mlp", [given], outputs=[asked])
    got = shm.get_contents_as_numpy(out_handle, np.float32, list(expected.shape), offset=100)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not shm.get_contents_as_numpy(out_handle, np.uint8, [100]).any()  # nothing written before the offset


def test_bytes_tensors_through_shared_memory(client, regions):
    """simple_*_shm_string_client: BYTES inputs serialized into a region, BYTES outputs read back from one."""
    module, c = client
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["1"] * 16], dtype=object)
    blobs = [serialize_byte_tensor(t) for t in (a, b)]
    sizes = [len(blob.item()) for blob in blobs]
    in_key, in_handle = regions(sum(sizes))
    out_key, out_handle = regions(1024)
    shm.set_shared_memory_region(in_handle, blobs)
    c.register_system_shared_memory("strings_in", in_key, sum(sizes))
    c.register_system_shared_memory("strings_out", out_key, 1024)
    inputs = [module.InferInput(n, [1, 16], "BYTES") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_shared_memory("strings_in", sizes[0])
    inputs[1].set_shared_memory("strings_in", sizes[1], sizes[0])
    outputs = [module.InferRequestedOutput("OUTPUT0")]
    outputs[0].set_shared_memory("strings_out", 1024)
    c.infer("simple_string", inputs, outputs=outputs)
    got = shm.get_contents_as_numpy(out_handle, np.object_, [1, 16])
    assert [int(v) for v in got.ravel()] == [i + 1 for i in range(16)]


def _refused(call) -> str:
    with pytest.raises(InferenceServerException) as refused:
        call()
    return str(refused.value)


def test_sizes_offsets_and_unknown_regions_are_refused_naming_them(client, regions):
    module, c = client
    in_key, in_handle = regions(2 * TENSOR)
    out_key, _ = regions(2 * TENSOR)
    shm.set_shared_memory_region(in_handle, [X0, X1])
    c.register_system_shared_memory("in", in_key, 2 * TENSOR)
    c.register_system_shared_memory("out_small", out_key, TENSOR)

    # A region past the end of its object.
    assert "pass the end of shared memory object" in _refused(
        lambda: c.register_system_shared_memory("too_big", in_key, 2 * TENSOR + 1))
    assert "pass the end" in _refused(lambda: c.register_system_shared_memory("shifted", in_key, TENSOR,
                                                                               offset=TENSOR + 1))
    # A tensor's byte size that is not its shape's.
    wrong = module.InferInput("INPUT0", [1, 16], "INT32")
    wrong.set_shared_memory("in", TENSOR - 4)
    other = module.InferInput("INPUT1", [1, 16], "INT32")
    other.set_shared_memory("in", TENSOR, TENSOR)
    message = _refused(lambda: c.infer("simple", [wrong, other]))
    assert "input 'INPUT0'" in message and "shared_memory_byte_size is 60 bytes" in message
    # A tensor past its region's end.
    inputs, outputs = _simple_in_shm(module, "in", "out_small", offset=TENSOR)
    message = _refused(lambda: c.infer("simple", inputs))
    assert "input 'INPUT1'" in message and "pass the end of shared memory region 'in'" in message
    # An output region too small for its output (the second output lies past it).
    inputs, outputs = _simple_in_shm(module, "in", "out_small")
    message = _refused(lambda: c.infer("simple", inputs, outputs=outputs))
    assert "output 'OUTPUT1'" in message and "shared memory region 'out_small'" in message
    # A byte size smaller than the output.
    inputs, _ = _simple_in_shm(module, "in", "out_small")
    small = module.InferRequestedOutput("OUTPUT0")
    small.set_shared_memory("out_small", 8)
    message = _refused(lambda: c.infer("simple", inputs, outputs=[small]))
    assert "output 'OUTPUT0' takes 64 bytes but shared_memory_byte_size is 8" in message
    # Unknown regions, for an input and for an output.
    inputs, outputs = _simple_in_shm(module, "nowhere", "out_small")
    assert "unable to find system shared memory region: 'nowhere'" in _refused(lambda: c.infer("simple", inputs))
    inputs, outputs = _simple_in_shm(module, "in", "gone")
    message = _refused(lambda: c.infer("simple", inputs, outputs=outputs))
    assert "output 'OUTPUT0'" in message and "'gone'" in message
    assert "Unable to find system shared memory region: 'nowhere'" in _refused(lambda: _status(module, c, "nowhere"))


def test_a_name_is_registered_once(client, regions):
    module, c = client
    key, _ = regions(TENSOR)
    other, _ = regions(2 * TENSOR)
    c.register_system_shared_memory("taken", key, TENSOR)
    assert "shared memory region 'taken' already in manager" in _refused(
        lambda: c.register_system_shared_memory("taken", other, 2 * TENSOR))
    assert _status(module, c) == {"taken": {"key": key, "offset": 0, "byte_size": TENSOR}}  # unchanged


HOSTILE_KEYS = ["/../../etc/passwd", "/proc/self/mem", "etc_passwd", "//dev/shm/x", "/a/b", "/..", "/.hidden",
                "/", "", "/" + "a" * 300, "/sem.mp-lock", "/x\x00y", "/x y"]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=range(len(HOSTILE_KEYS)))
def test_keys_that_are_not_shared_memory_names_are_refused(client, key):
    module, c = client
    message = _refused(lambda: c.register_system_shared_memory("hostile", key, 16))
    assert "cannot register shared memory region 'hostile'" in message
    assert _status(module, c) == {}


def test_links_fifos_and_missing_objects_in_dev_shm_are_refused(client, regions, tmp_path):
    """What the name rules let through is opened as shm_open does, and must be a shared-memory object itself: a
    symbolic link (to a file outside /dev/shm), a hard link (a second name of another client's object) and a FIFO
    are refused, and so is a name nothing has."""
    module, c = client
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * 4096)
    key, handle = regions(4096)
    tag = uuid.uuid4().hex[:12]
    made = {"symlink": f"/dev/shm/yat_test_link_{tag}", "hardlink": f"/dev/shm/yat_test_hard_{tag}",
            "fifo": f"/dev/shm/yat_test_fifo_{tag}"}
    os.symlink(secret, made["symlink"])
    os.link(f"/dev/shm{key}", made["hardlink"])
    os.mkfifo(made["fifo"])
    try:
        for kind, path in made.items():
            message = _refused(lambda: c.register_system_shared_memory(kind, path[len("/dev/shm"):], 16))
            assert f"cannot register shared memory region '{kind}'" in message, (kind, message)
        assert "no such shared memory object" in _refused(
            lambda: c.register_system_shared_memory("missing", f"/yat_test_missing_{tag}", 16))
        assert _status(module, c) == {}
    finally:
        for path in made.values():
            os.unlink(path)
    assert secret.read_bytes() == b"S" * 4096


def test_a_region_whose_object_shrank_is_refused_and_the_server_lives(client, regions, shm_server):
    """A client that truncates its object after registering it: reading past the end would fault in a server that
    maps regions; here the request is refused and the server goes on."""
    module, c = client
    key, handle = regions(2 * TENSOR)
    c.register_system_shared_memory("shrinking", key, 2 * TENSOR)
    os.truncate(f"/dev/shm{key}", 8)
    inputs, _ = _simple_in_shm(module, "shrinking", "shrinking")
    assert "no longer as large as registered" in _refused(lambda: c.infer("simple", inputs))
    assert c.is_server_live()


def test_shared_memory_parameters_mixed_with_data_are_refused(shm_server, regions):
    key, handle = regions(2 * TENSOR)
    c = httpclient.InferenceServerClient(shm_server.url)
    c.register_system_shared_memory("mixed", key, 2 * TENSOR)
    try:
        import json
        import urllib.request

        body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": X0.ravel().tolist(),
                            "parameters": {"shared_memory_region": "mixed", "shared_memory_byte_size": TENSOR}},
                           {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": X1.ravel().tolist()}]}
        status, answer = shm_server.post("/v2/models/simple/infer", json.dumps(body).encode())
        assert status == 400 and "input 'INPUT0' must give one of 'data'" in answer["error"]
        body["inputs"][0] = {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": X0.ravel().tolist()}
        body["outputs"] = [{"name": "OUTPUT0", "parameters": {"shared_memory_region": "mixed",
                                                              "shared_memory_byte_size": TENSOR, "classification": 2}}]
        status, answer = shm_server.post("/v2/models/simple/infer", json.dumps(body).encode())
        assert status == 400 and "can't be both written to shared memory and classified" in answer["error"]
        status, answer = shm_server.post("/v2/systemsharedmemory/region/extra/register",
                                         json.dumps({"key": key, "byte_size": 16, "fd": 3}).encode())
        assert status == 400 and "not 'fd'" in answer["error"]
        request = urllib.request.Request(f"http://{shm_server.url}/v2/systemsharedmemory/status")
        assert [r["name"] for r in json.loads(urllib.request.urlopen(request).read())] == ["mixed"]
    finally:
        c.unregister_system_shared_memory()


def test_cuda_shared_memory_is_answered_as_not_supported(client):
    module, c = client
    if module is httpclient:
        assert c.get_cuda_shared_memory_status() == []
    else:
        assert not c.get_cuda_shared_memory_status(as_json=True).get("regions")
    handle = "AAAA" if module is httpclient else b"\0" * 64  # no real CUDA IPC handle: never opened
    message = _refused(lambda: c.register_cuda_shared_memory("gpu", handle, 0, 16))
    assert "CUDA shared memory is not supported by this server" in message
    c.unregister_cuda_shared_memory()
    metadata = c.get_server_metadata()
    extensions = metadata["extensions"] if module is httpclient else list(metadata.extensions)
    assert "system_shared_memory" in extensions and "cuda_shared_memory" not in extensions
