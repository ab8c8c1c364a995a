"""Small file helpers shared across the package (standard library only: the AOT build imports it too).

Every output is written whole or not at all: a file into a temporary beside it, renamed into place once
complete (`writing`, `write_atomically`); a set of files, such as a model repository's entry, into a
staging folder beside its folder, moved into place once every file is written (`staged_folder`). A write
that fails (a full disk, a read-only place, a folder where a file is meant, Ctrl-C) leaves what was there
before and no partial file, and an OSError becomes a YatDeployError saying what to change (`output_error`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from yatdeploy.errors import YatDeployError


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_ELSEWHERE = "write somewhere else"
# errno → (what happened, what the user can change)
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", f"free some space there, or {_ELSEWHERE}"),
    errno.EDQUOT: ("disk quota exceeded", f"free some space there, or {_ELSEWHERE}"),
    errno.EFBIG: ("larger than the file size limit allows (ulimit -f)", f"raise the limit, or {_ELSEWHERE}"),
    errno.EROFS: ("the file system is read-only", _ELSEWHERE),
    errno.EACCES: ("permission denied", f"{_ELSEWHERE}, or get write permission there"),
    errno.EPERM: ("permission denied", f"{_ELSEWHERE}, or get write permission there"),
    errno.EISDIR: ("it is a folder", "name a file in it instead"),
    errno.ENOTDIR: ("a part of its path is a file, not a folder", "give a path through folders"),
    errno.ENOENT: ("its folder can't be created there", _ELSEWHERE),
    errno.ENAMETOOLONG: ("the name is too long", "give a shorter path"),
}


# The errors of a write that are the machine's state, not the path given: a full disk, a quota, a file size limit, a
# read-only file system. The CLI reports them as the user's to change (exit 2) wherever the write was made.
WRITE_ENVIRONMENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def output_error(path: str | Path, exc: OSError) -> YatDeployError:
    """The one-line error for an output at `path` that could not be written: what happened and what to change."""
    what, change = _WRITE_ERRORS.get(exc.errno, (exc.strerror or str(exc), _ELSEWHERE))
    return YatDeployError(f"can't write {path}: {what}", change)


def check_output(path: str | Path) -> Path:
    """`path` as an output file, checked before any work is done: not a folder, not under a file."""
    path = Path(path)
    if path.is_dir():
        raise output_error(path, IsADirectoryError(errno.EISDIR, "is a folder"))
    _check_parent(path)
    return path


def check_output_folder(path: str | Path) -> Path:
    """`path` as an output folder (created if absent), checked before any work is done: not a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise YatDeployError(f"can't write {path}: it is not a folder", "give a folder's path, or a new one")
    _check_parent(path)
    return path


def _check_parent(path: Path) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise output_error(path, NotADirectoryError(errno.ENOTDIR, "not a folder"))


def _new_mode(folder: bool = False) -> int:
    """The mode a new file (folder) gets here: mkstemp's and mkdtemp's are private (0600, 0700), an output gets the
    usual one."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def _in_place(path: Path) -> bool:
    """A device or a pipe (/dev/stdout, /dev/null): written as it is, never replaced by a file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


@contextmanager
def writing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write the output into: renamed to `path` when the block succeeds,
    removed when it fails. An OSError of the block or the rename becomes `output_error`."""
    path = check_output(path)
    if _in_place(path):
        try:
            yield path
        except OSError as exc:
            raise output_error(path, exc) from None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise output_error(path, exc) from None
    partial = Path(name)
    try:
        yield partial
        os.chmod(partial, _new_mode())
        os.replace(partial, path)
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (`writing`)."""
    with writing(path) as partial:
        partial.write_bytes(data)


@contextmanager
def staged_folder(folder: str | Path, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """A new empty folder beside `folder` to write a set of files into. When the block succeeds they take their
    places in `folder`: the staged folder renamed to it where `folder` is new, else each file renamed over its
    old copy (files of `folder` not written again are kept), the files named in `last` (a config) after the others.
    When it fails, `folder` is as it was and the
    staged files are gone. An OSError becomes `output_error`."""
    folder = check_output_folder(folder)
    created = [p for p in (folder.parent, *folder.parent.parents) if not p.exists()]
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    except OSError as exc:
        raise output_error(folder, exc) from None
    done = False
    try:
        yield stage
        os.chmod(stage, _new_mode(folder=True))
        _commit(stage, folder, last)
        done = True
    except OSError as exc:
        raise output_error(folder, exc) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done:
            for parent in created:  # the folders made for it, innermost first, if still empty
                try:
                    parent.rmdir()
                except OSError:
                    break


def _commit(stage: Path, folder: Path, last: tuple[str, ...]) -> None:
    if not folder.exists():
        try:
            os.rename(stage, folder)
            return
        except OSError:
            if not folder.is_dir():  # not a folder made meanwhile by another writer
                raise
    for source in sorted((p for p in stage.rglob("*") if not p.is_dir()), key=lambda p: (p.name in last, str(p))):
        target = folder / source.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
