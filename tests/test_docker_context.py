"""The service image's build, checked without a Docker engine.

No Docker engine runs on these machines, so the image itself is never built here. What can be checked is
that the image gets everything its build reads: the files the Dockerfile COPYs (minus .dockerignore) are
laid out as in the image, and the native build (CMake, as `pip install .` runs it) is configured and built
from that tree alone. A directory the build needs but the Dockerfile forgets (plugins/ once) fails here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "service" / "Dockerfile"


def dockerfile_copies(text: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context, destinations made absolute."""
    workdir = "/"
    copies = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        instruction = words[0].upper()
        if instruction == "WORKDIR":
            workdir = os.path.join(workdir, words[1])
        elif instruction in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]):
                continue  # from another stage, not the context
            *sources, destination = args
            copies.append((sources, os.path.join(workdir, destination)))
    return copies


def ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(parts[0], pattern):
            return True
    return False


def tracked_files() -> list[str]:
    done = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def image_tree(root: Path) -> Path:
    """The files the Dockerfile copies from the context (tracked files, as a fresh clone has them)."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    context = [f for f in tracked_files() if not ignored(f, patterns)]
    for sources, destination in dockerfile_copies(DOCKERFILE.read_text()):
        into = Path(str(root) + destination)
        for source in (s.rstrip("/") for s in sources):
            matched = [f for f in context if f == source or f.startswith(source + "/")]
            assert matched, f"the Dockerfile copies {source}, which the build context does not hold"
            if matched == [source]:  # a file: into a folder (dest/ or several sources), else to the path
                target = into / Path(source).name if destination.endswith("/") or len(sources) > 1 else into
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / source, target)
                continue
            for name in matched:  # a folder: its contents go into the destination
                target = into / name[len(source) + 1:]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / name, target)
    return root


def test_the_dockerfile_is_parsed_as_docker_reads_it():
    copies = dockerfile_copies("WORKDIR /src\nCOPY a b ./\nCOPY --chown=1 dir dir\nCOPY --from=x /y /z\n")
    assert copies == [(["a", "b"], "/src/./"), (["dir"], "/src/dir")]
    assert ignored("x/__pycache__/m.pyc", ["**/__pycache__"]) and ignored(".venv/bin/python", [".venv"])
    assert not ignored("yatdeploy/cli.py", ["**/__pycache__", ".venv"])


@pytest.fixture(scope="module")
def image_src(tmp_path_factory) -> Path:
    root = image_tree(tmp_path_factory.mktemp("image"))
    workdirs = [w for w in (shlex.split(line)[1:2] for line in DOCKERFILE.read_text().splitlines()
                            if line.upper().startswith("WORKDIR")) if w]
    return Path(str(root) + workdirs[-1][0])


def test_the_package_metadata_finds_its_files_in_the_image(image_src):
    project = tomllib.loads((image_src / "pyproject.toml").read_text())
    assert (image_src / project["project"]["readme"]).is_file()
    for package in project["tool"]["scikit-build"]["wheel"]["packages"]:
        assert (image_src / package / "__init__.py").is_file(), f"the image lacks the package {package}"
    assert (image_src / "CMakeLists.txt").is_file()


def _cached_ort_headers() -> list[str]:
    """Reuse the headers the package install fetched, so this test needs no download."""
    for cache in sorted((REPO / "build").glob("*/CMakeCache.txt")):
        for line in cache.read_text().splitlines():
            if line.startswith("ORT_INCLUDE_DIR:PATH=") and Path(line.split("=", 1)[1]).is_dir():
                return [f"-DORT_INCLUDE_DIR={line.split('=', 1)[1]}"]
    return []


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="CMake is not installed")
def test_the_native_build_runs_from_the_image_files_alone(image_src, tmp_path):
    """CMake configures and builds every target from the copied tree, CUDA parts included where nvcc is (the GPU
    kernels are compiled by this Python's triton, as the package build's own environment does)."""
    cuda = "ON" if shutil.which("nvcc") else "OFF"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(
        ["cmake", "-S", str(image_src), "-B", str(tmp_path / "build"), *generator, f"-DYATDEPLOY_CUDA={cuda}",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DYATDEPLOY_CUDA_ARCHITECTURES=80", *_cached_ort_headers()],
        capture_output=True, text=True, timeout=600,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = subprocess.run(["cmake", "--build", str(tmp_path / "build"), "--parallel", "2"],
                           capture_output=True, text=True, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    built = {p.name for p in (tmp_path / "build").rglob("*.so")}
    assert "libyatdeploy_ort.so" in built
    if cuda == "ON":  # the GPU kernels (Triton AOT, sm_80 here) and the CUDA op that launches them
        assert "libyatdeploy_ort_cuda.so" in built
        manifest = json.loads((tmp_path / "build" / "gpu_kernels" / "manifest.json").read_text())
        assert {e["arch"] for e in manifest["entries"]} == {"sm_80"}
        assert all((tmp_path / "build" / "gpu_kernels" / e["cubin"]).is_file() for e in manifest["entries"])
