"""The README's set-up commands: what the first `make demo` / `make test` shows while it installs and compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def install_recipe(tmp_path: Path, **variables: str) -> list[str]:
    """The commands the install step would run into a fresh venv under tmp_path (make -n: nothing runs)."""
    venv = tmp_path / "venv"
    settings = [f"{key}={value}" for key, value in {"VENV": str(venv), **variables}.items()]
    done = subprocess.run(["make", "-n", "-B", str(venv / ".installed"), *settings], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_first_install_says_what_it_does_before_the_long_steps(tmp_path: Path) -> None:
    lines = install_recipe(tmp_path)
    steps = [line for line in lines if "[install " in line]
    assert [s.split("]")[0].split("[")[1] for s in steps] == ["install 1/3", "install 2/3", "install 3/3"]
    pip = next(i for i, line in enumerate(lines) if "-m pip install" in line)
    announced = next(i for i, line in enumerate(lines) if "[install 2/3]" in line)
    assert announced < pip, "the long install step is announced before it starts"
    # pip lists what it fetches (no -q), and the announcement says the build is quiet and takes minutes.
    assert " -q" not in lines[pip]
    assert "several minutes" in " ".join(lines[announced:pip])


@pytest.mark.parametrize(("cuda", "mentions_gpu"), [("ON", True), ("AUTO", False)])
def test_the_announcement_names_the_native_parts_this_machine_builds(tmp_path: Path, cuda: str,
                                                                      mentions_gpu: bool) -> None:
    text = " ".join(install_recipe(tmp_path, YATDEPLOY_CUDA=cuda))
    assert "custom-op library" in text
    assert ("GPU kernels" in text) == mentions_gpu
