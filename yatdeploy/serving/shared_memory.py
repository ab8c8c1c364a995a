"""System shared memory (Triton's shared-memory extension), whatever the transport: the regions clients register,
each a name for the window [offset, offset + byte_size) of a POSIX shared-memory object, and the tensors the
server reads from them and writes into them. Stage: inference (InferenceServer.infer reads a request's shared
inputs after decoding it and writes its shared outputs before encoding the answer); the HTTP and gRPC endpoints of
the extension call SharedMemoryRegions directly.

Safety, Triton's CVE-2025-23319/23320 chain being the attack in mind (a key naming an object the server did not
mean to share, then writes past a region): a key is a POSIX shared-memory name ('/' then at most 255 characters of
[A-Za-z0-9_.-], no '..', no leading '.', not a named semaphore's 'sem.'), opened as shm_open opens it, in
/dev/shm and nowhere else (relative to the folder's descriptor, O_NOFOLLOW: a symbolic link is refused), and it
must be a regular file of that file system with one link. Nothing is mapped: a tensor is copied in or out with
pread/pwrite inside its region, checked against the region and against the object's size at that moment (an
object shrunk since its registration is refused, where a mapping would have faulted). A region's name is taken
until it is unregistered; its descriptor is closed only once no request uses it. The status answers name, key,
offset and byte size, nothing the server holds.

CUDA shared memory is not served: its status lists no region, registering one is Unavailable, saying why.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from yatdeploy.serving.protocol import (
    AlreadyExists,
    InferRequest,
    InvalidInput,
    NotFound,
    SharedTensor,
    Unavailable,
    tensor_bytes,
    tensor_from_bytes,
)

SHM_FOLDER = "/dev/shm"  # where Linux's shm_open keeps its objects
# A key as shm_open takes it, without what would leave /dev/shm or name what is not a client's object.
_KEY = re.compile(r"/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,254}")
_SEMAPHORE = "sem."  # POSIX named semaphores live in /dev/shm/sem.NAME: never a tensor
_NAME = re.compile(r"[^\x00-\x1f\x7f/]{1,255}")  # a region's name: it is also a URL path segment
CUDA_UNSUPPORTED = ("CUDA shared memory is not supported by this server: it reads and writes tensors in host "
                    "memory only (register system shared memory instead)")


@dataclass
class _Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    users: int = 0  # requests reading or writing it now
    unregistered: bool = False  # closed once its last user is done

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def check_key(name: str, key: object) -> str:
    """`key` if it is a POSIX shared-memory name this server opens; InvalidInput saying why not."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or ".." in key:
        raise InvalidInput(f"cannot register shared memory region '{name}': key {str(key)[:300]!r} is not a POSIX "
                           "shared-memory name ('/' followed by 1 to 255 of A-Z a-z 0-9 _ . -, no '..', no "
                           "other '/')")
    if key[1:].startswith(_SEMAPHORE):
        raise InvalidInput(f"cannot register shared memory region '{name}': key '{key}' names a POSIX semaphore, "
                           "not shared memory")
    return key


class SharedMemoryRegions:
    """The system shared-memory regions registered with the server; thread-safe (tensors are read and written from
    worker threads)."""

    def __init__(self, folder: str = SHM_FOLDER) -> None:
        self.folder = folder
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    # -- the extension's calls ------------------------------------------------------------------------------

    def register(self, name: str, key: object, offset: object, byte_size: object) -> None:
        """Register `name` for `byte_size` bytes from `offset` of the object `key`. InvalidInput for a bad name,
        key or size, or an object that isn't one; AlreadyExists for a name taken."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidInput(f"a shared memory region's name is 1 to 255 characters without '/' or control "
                               f"characters, not {str(name)[:300]!r}")
        check_key(name, key)
        for field, value, least in (("offset", offset, 0), ("byte_size", byte_size, 1)):
            if type(value) is not int or not least <= value < 2**63:
                raise InvalidInput(f"cannot register shared memory region '{name}': '{field}' must be a whole "
                                   f"number of bytes >= {least}, not {str(value)[:40]!r}")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' already in manager")
            fd = self._open(name, key)
            try:
                if offset + byte_size > os.fstat(fd).st_size:
                    raise InvalidInput(f"cannot register shared memory region '{name}': offset {offset} + "
                                       f"byte_size {byte_size} pass the end of shared memory object '{key}'")
            except BaseException:
                os.close(fd)
                raise
            self._regions[name] = _Region(name, key, offset, byte_size, fd)

    def _open(self, name: str, key: str) -> int:
        """The object `key` opened for reading and writing as shm_open opens it: in the folder, never through a
        link; InvalidInput unless it is a regular file of the folder's file system with one link."""
        try:
            folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise Unavailable(f"system shared memory is not available on this machine (no {self.folder})") from None
        folder_device = os.fstat(folder).st_dev
        try:
            fd = os.open(key[1:], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=folder)
        except OSError as exc:
            why = "it is a symbolic link" if os.path.islink(os.path.join(self.folder, key[1:])) else \
                "no such shared memory object" if isinstance(exc, FileNotFoundError) else exc.strerror
            raise InvalidInput(f"cannot register shared memory region '{name}': unable to open shared memory "
                               f"object '{key}' ({why})") from None
        finally:
            os.close(folder)
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1 or found.st_dev != folder_device:
            os.close(fd)
            raise InvalidInput(f"cannot register shared memory region '{name}': '{key}' is not a shared memory "
                               "object")
        return fd

    def status(self, name: str | None = None) -> list[dict]:
        """Every region's name, key, offset and byte size, or one's; NotFound for a name not registered."""
        with self._lock:
            if name is None:
                return [region.status() for region in self._regions.values()]
            if name not in self._regions:
                raise NotFound(f"Unable to find system shared memory region: '{name}'")
            return [self._regions[name].status()]

    def unregister(self, name: str | None = None) -> None:
        """Forget one region (None: all); a name not registered is nothing to do (as Triton). A region in use is
        closed once its requests are done with it."""
        with self._lock:
            names = list(self._regions) if name is None else [name] if name in self._regions else []
            for gone in names:
                region = self._regions.pop(gone)
                region.unregistered = True
                if region.users == 0:
                    os.close(region.fd)

    def close(self) -> None:
        """Unregister every region (the server stops)."""
        self.unregister()

    # -- tensors ----------------------------------------------------------------------------------------------

    @contextmanager
    def _using(self, place: SharedTensor, what: str) -> Iterator[tuple[_Region, int]]:
        """The region `place` lies in, held while the block runs, and where `place` starts in its object;
        InvalidInput (naming `what`) for an unknown region, or a place outside it or past the object's end."""
        with self._lock:
            region = self._regions.get(place.region)
            if region is None:
                raise InvalidInput(f"{what}: unable to find system shared memory region: '{place.region}'")
            if place.offset + place.byte_size > region.byte_size:
                raise InvalidInput(f"{what}: offset {place.offset} + byte size {place.byte_size} pass the end of "
                                   f"shared memory region '{region.name}' ({region.byte_size} bytes)")
            region.users += 1
        try:
            start = region.offset + place.offset
            if start + place.byte_size > os.fstat(region.fd).st_size:
                raise InvalidInput(f"{what}: shared memory region '{region.name}' is no longer as large as "
                                   "registered (its object was truncated)")
            yield region, start
        finally:
            with self._lock:
                region.users -= 1
                if region.unregistered and region.users == 0:
                    os.close(region.fd)

    def check(self, place: SharedTensor, what: str) -> None:
        """InvalidInput unless `place` lies in a registered region."""
        with self._using(place, what):
            pass

    def read(self, place: SharedTensor, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
        """Input `name` (`datatype`, `shape`) copied out of shared memory."""
        with self._using(place, f"input '{name}'") as (region, start):
            data = bytearray(place.byte_size)
            if place.byte_size and os.preadv(region.fd, [data], start) != place.byte_size:
                raise InvalidInput(f"input '{name}': shared memory region '{region.name}' ended early")
        return tensor_from_bytes(data, datatype, shape, name)

    def write(self, place: SharedTensor, array: np.ndarray, name: str) -> int:
        """Output `name` copied into shared memory; the bytes written. InvalidInput when it does not fit."""
        data = tensor_bytes(array)
        if len(data) > place.byte_size:
            raise InvalidInput(f"output '{name}' takes {len(data)} bytes but shared_memory_byte_size is "
                               f"{place.byte_size} for region '{place.region}'")
        with self._using(place, f"output '{name}'") as (region, start):
            if data and os.pwrite(region.fd, data, start) != len(data):
                raise InvalidInput(f"output '{name}': shared memory region '{region.name}' ended early")
        return len(data)

    def read_inputs(self, request: InferRequest) -> None:
        """The request's shared inputs read into `request.inputs`, its shared outputs' regions checked (before the
        model runs for nothing)."""
        for name, (shape, place) in request.shared_inputs.items():
            request.inputs[name] = self.read(place, request.input_datatypes[name], shape, name)
        for output in request.outputs or []:
            if output.shared is not None:
                self.check(output.shared, f"output '{output.name}'")

    def write_outputs(self, request: InferRequest, outputs: list[tuple[str, np.ndarray, bool]]) -> dict[str, dict]:
        """The outputs asked for in shared memory written there: for each, the parameters its answer carries
        instead of data (region, bytes written, offset)."""
        places = {o.name: o.shared for o in request.outputs or [] if o.shared is not None}
        answered: dict[str, dict] = {}
        for name, array, _ in outputs:
            place = places.get(name)
            if place is not None:
                written = self.write(place, array, name)
                answered[name] = {"shared_memory_region": place.region, "shared_memory_byte_size": written}
                if place.offset:
                    answered[name]["shared_memory_offset"] = place.offset
        return answered

    @staticmethod
    def shared_bytes(request: InferRequest) -> int:
        """The bytes a request's shared inputs and outputs move: worth a worker thread when large."""
        return sum(place.byte_size for _, place in request.shared_inputs.values()) + sum(
            o.shared.byte_size for o in request.outputs or [] if o.shared is not None)

    # -- CUDA shared memory: not served ---------------------------------------------------------------------

    @staticmethod
    def cuda_status(name: str | None = None) -> list[dict]:
        """No CUDA region is ever registered: none listed, NotFound for a name."""
        if name:
            raise NotFound(f"Unable to find cuda shared memory region: '{name}'")
        return []

    @staticmethod
    def cuda_register(name: str) -> None:
        raise Unavailable(f"failed to register CUDA shared memory region '{name}': {CUDA_UNSUPPORTED}")

