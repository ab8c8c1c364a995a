"""`export --repository` writes a model folder that loads on its own, as Triton's ONNX Runtime backend loads it.

The repository is copied alone to a new place (nothing of the venv) and loaded by a clean interpreter
(`python -I -S`: no site-packages, so neither yatdeploy nor scipy-openblas32) that imports only the onnxruntime
of Triton's current ONNX Runtime backend (`make triton-ort` installs it into .venv/triton-ort; docs/triton.md
says which version and where it comes from). The child reads op_library_filename from config.pbtxt, maps the
repository root written there (/models) onto the copy as a container's bind mount would, registers the library
with SessionOptions.register_custom_ops_library (what the backend's RegisterCustomOpsLibrary call is) and runs
<model>/1/model.onnx; its answers must equal this venv's. No Triton server and no container run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

pytest.importorskip("tritonclient", reason="tritonclient is not installed")

from tests.model_zoo import yat_mlp  # noqa: E402
from yatdeploy import backends, native  # noqa: E402
from yatdeploy.backends import ort  # noqa: E402
from yatdeploy.cli import main  # noqa: E402
from yatdeploy.packaging import DEFAULT_OP_LIBRARY_ROOT  # noqa: E402
from yatdeploy.serving.repository import discover, parse_config  # noqa: E402

pytestmark = pytest.mark.slow  # exports, then loads them in a clean interpreter

ROOT = Path(__file__).resolve().parents[1]
# The onnxruntime version Triton's ORT backend ships, as the Makefile pins and installs it (target triton-ort).
_PINNED = re.search(r"^TRITON_ORT_VERSION\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
TRITON_ORT_VERSION = _PINNED.group(1) if _PINNED else None
TRITON_ORT_DIR = Path(os.environ.get("YATDEPLOY_TRITON_ORT_DIR", ROOT / ".venv" / "triton-ort"))

# Runs in the clean interpreter: argv = ORT folder, config.pbtxt, the root written in it, where that root is
# mounted here, the model file, inputs .npz, outputs .npz.
CHILD = r'''
import importlib.util, json, re, sys
ort_dir, config, root, mount, model, inputs, outputs = sys.argv[1:]
sys.path.insert(0, ort_dir)
import numpy as np
import onnxruntime

text = open(config).read()
[library] = re.findall(r'op_library_filename:\s*"([^"]+)"', text)
assert library == root or library.startswith(root.rstrip("/") + "/"), (library, root)
host_path = mount + library[len(root.rstrip("/")):]  # what a bind mount of the copy at `root` shows
options = onnxruntime.SessionOptions()
options.register_custom_ops_library(host_path)
session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
feed = dict(np.load(inputs))
np.savez(outputs, *session.run(None, feed))
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/" in line.split()[-1]})
print(json.dumps({
    "ort": onnxruntime.__version__, "ort_file": onnxruntime.__file__, "library": library, "host_path": host_path,
    "maps": maps, "yatdeploy": importlib.util.find_spec("yatdeploy") is not None,
    "scipy_openblas32": importlib.util.find_spec("scipy_openblas32") is not None,
}))
'''


def _clean_run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """The child in an interpreter without site-packages, user site, PYTHONPATH or LD_LIBRARY_PATH."""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def triton_ort() -> Path:
    if TRITON_ORT_VERSION is None:
        pytest.skip("the Makefile pins no TRITON_ORT_VERSION")
    if not (TRITON_ORT_DIR / f"onnxruntime-{TRITON_ORT_VERSION}.dist-info").is_dir():
        pytest.skip(f"onnxruntime {TRITON_ORT_VERSION} (Triton's ORT backend) is not in {TRITON_ORT_DIR}: "
                    "run `make triton-ort` (needs PyPI once)")
    return TRITON_ORT_DIR


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    if native.ort_library_path() is None:
        pytest.skip("the custom-op library is not built")
    folder = tmp_path_factory.mktemp("portable")
    torch.save(yat_mlp(), folder / "mlp.pt")
    assert main(["export", "-q", str(folder / "mlp.pt"), "-o", str(folder / "mlp.onnx"), "--input-shape", "1,16",
                 "--no-validate", "--repository", str(folder / "repo"), "--name", "mlp"]) == 0
    return folder


def test_the_model_folder_carries_the_library_and_its_openblas(exported):
    model = exported / "repo" / "mlp"
    config = parse_config(model / "config.pbtxt")  # Triton's own ModelConfig schema
    [written] = config.model_operations.op_library_filename
    assert written == f"{DEFAULT_OP_LIBRARY_ROOT}/mlp/libyatdeploy_ort.so" == "/models/mlp/libyatdeploy_ort.so"
    library = model / "libyatdeploy_ort.so"
    dynamic = native.elf_dynamic(library)
    assert dynamic.runpath[0] == "$ORIGIN", dynamic.runpath
    outside = [name for name in dynamic.needed if name.startswith("libscipy_openblas")]
    assert outside and all((model / name).is_file() for name in outside)
    # Everything it needs from outside the system resolves beside it, in the model folder itself.
    assert {path.parent for path in native.library_dependencies(library).values()} == {model.resolve()}
    assert library.read_bytes() == native.ort_library_path().read_bytes()
    # yatdeploy serve ignores op_library_filename (it registers its own library) and the extra files.
    [source] = discover(exported / "repo")
    assert (source.name, source.version, source.error) == ("mlp", "1", None)


def test_the_copied_repository_runs_alone_with_tritons_onnxruntime(exported, triton_ort, tmp_path):
    moved = tmp_path / "elsewhere" / "models"  # stands for the container's /models
    shutil.copytree(exported / "repo", moved)
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", input=x)
    run = _clean_run(triton_ort, moved / "mlp" / "config.pbtxt", DEFAULT_OP_LIBRARY_ROOT, moved,
                     moved / "mlp" / "1" / "model.onnx", tmp_path / "inputs.npz", tmp_path / "outputs.npz",
                     cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert facts["ort"] == TRITON_ORT_VERSION and Path(facts["ort_file"]).is_relative_to(triton_ort)
    assert not facts["yatdeploy"] and not facts["scipy_openblas32"]
    assert Path(facts["host_path"]) == moved / "mlp" / "libyatdeploy_ort.so"
    loaded = [Path(p) for p in facts["maps"]]
    # The library and OpenBLAS came from the copy, not from this venv or its build.
    # (numpy's own libscipy_openblas64_ is another library, with another name.)
    wanted = {"libyatdeploy_ort.so", *native.library_dependencies(moved / "mlp" / "libyatdeploy_ort.so")}
    ours = [p for p in loaded if p.name in wanted]
    assert {p.name for p in ours} == wanted and "libscipy_openblas.so" in wanted
    assert all(p.parent == moved / "mlp" for p in ours), ours
    assert not any(str(p).startswith(str(ROOT)) and "triton-ort" not in str(p) for p in loaded), loaded

    session = ort.create_session(exported / "mlp.onnx", backends.get("ort-cpu"))
    expected = ort.run(session, {"input": x})[0]
    with np.load(tmp_path / "outputs.npz") as answers:
        got = answers["arr_0"]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_without_the_copied_openblas_the_library_does_not_load(exported, triton_ort, tmp_path):
    # The failure: the library alone, as the old config pointed at it, needs the venv's OpenBLAS.
    moved = tmp_path / "models"
    shutil.copytree(exported / "repo", moved)
    for blas in (moved / "mlp").glob("libscipy_openblas*"):
        blas.unlink()
    np.savez(tmp_path / "inputs.npz", input=np.ones((1, 16), np.float32))
    run = _clean_run(triton_ort, moved / "mlp" / "config.pbtxt", DEFAULT_OP_LIBRARY_ROOT, moved,
                     moved / "mlp" / "1" / "model.onnx", tmp_path / "inputs.npz", tmp_path / "outputs.npz",
                     cwd=tmp_path)
    assert run.returncode != 0 and "libscipy_openblas" in run.stderr, run.stderr[-2000:]


def test_the_root_is_where_the_repository_will_be(exported, tmp_path):
    out = exported / "mlp.pt"
    assert main(["export", "-q", str(out), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16", "--no-validate",
                 "--repository", str(tmp_path / "repo"), "--name", "m", "--op-library-root", "/mnt/models"]) == 0
    config = parse_config(tmp_path / "repo" / "m" / "config.pbtxt")
    assert list(config.model_operations.op_library_filename) == ["/mnt/models/m/libyatdeploy_ort.so"]
    # A Triton on this machine: the repository's own absolute path.
    here = (tmp_path / "repo").resolve()
    assert main(["export", "-q", str(out), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16", "--no-validate",
                 "--repository", str(here), "--name", "m", "--op-library-root", str(here)]) == 0
    [written] = parse_config(here / "m" / "config.pbtxt").model_operations.op_library_filename
    assert Path(written) == here / "m" / "libyatdeploy_ort.so" and Path(written).is_file()
    assert PurePosixPath(written).is_absolute()


def test_a_relative_root_is_refused(exported, tmp_path, capsys):
    status = main(["export", "-q", str(exported / "mlp.pt"), "-o", str(tmp_path / "m.onnx"), "--input-shape", "1,16",
                   "--no-validate", "--repository", str(tmp_path / "repo"), "--op-library-root", "models"])
    assert status != 0
    err = capsys.readouterr().err
    assert "--op-library-root" in err and "absolute" in err
    assert not (tmp_path / "repo").exists()  # refused before anything was written
