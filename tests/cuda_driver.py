"""Just enough of the CUDA driver API (through ctypes) to load PTX and launch a kernel the way
TensorRT launches an ahead-of-time plugin: cuModuleLoadData on the PTX text, then cuLaunchKernel with
the grid, block, dynamic shared memory and an array of pointers to the arguments. Needs only libcuda (the
driver), no toolkit, no TensorRT.

A kernel that needs more than 48 KB of dynamic shared memory must have its limit raised first
(cuFuncSetAttribute MAX_DYNAMIC_SHARED_SIZE_BYTES); `launch` does that, as TensorRT would have to for
such a plugin kernel (whether it does is open: docs/tensorrt.md)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

_DEFAULT_DYNAMIC_SHARED = 48 * 1024
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class CudaError(RuntimeError):
    pass


def load_driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


class Driver:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self._check(lib.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self._check(lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device), "cuDevicePrimaryCtxRetain")
        self._check(lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        name = ctypes.create_string_buffer(256)
        self._check(lib.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
        self.device_name = name.value.decode()
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device), "cuDeviceGetAttribute (major)")
        self._check(lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device), "cuDeviceGetAttribute (minor)")
        self.capability = (major.value, minor.value)

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(code, ctypes.byref(text))
            raise CudaError(f"{what} failed: {code} {text.value.decode() if text.value else ''}")

    def load_function(self, ptx: str, name: str) -> ctypes.c_void_p:
        module = ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(ptx.encode() + b"\0")),
                    "cuModuleLoadData")
        function = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(function), module, name.encode()), "cuModuleGetFunction")
        return function

    def to_device(self, array: np.ndarray) -> ctypes.c_uint64:
        pointer = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(pointer), ctypes.c_size_t(max(array.nbytes, 1))), "cuMemAlloc")
        data = np.ascontiguousarray(array)
        self._check(self.lib.cuMemcpyHtoD_v2(pointer, data.ctypes.data_as(ctypes.c_void_p),
                                             ctypes.c_size_t(data.nbytes)), "cuMemcpyHtoD")
        return pointer

    def from_device(self, pointer: ctypes.c_uint64, like: np.ndarray) -> np.ndarray:
        out = np.empty_like(like)
        self._check(self.lib.cuMemcpyDtoH_v2(out.ctypes.data_as(ctypes.c_void_p), pointer,
                                             ctypes.c_size_t(out.nbytes)), "cuMemcpyDtoH")
        return out

    def free(self, pointer: ctypes.c_uint64) -> None:
        self._check(self.lib.cuMemFree_v2(pointer), "cuMemFree")

    def launch(self, function: ctypes.c_void_p, grid: Sequence[int], block: Sequence[int], shared: int,
               args: Sequence[ctypes._SimpleCData]) -> None:
        holders = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        if shared > _DEFAULT_DYNAMIC_SHARED:
            self._check(self.lib.cuFuncSetAttribute(function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                    ctypes.c_int(shared)), "cuFuncSetAttribute (dynamic shared memory)")
        gx, gy, gz = (list(grid) + [1, 1, 1])[:3]
        bx, by, bz = (list(block) + [1, 1, 1])[:3]
        self._check(self.lib.cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared, None, holders, None),
                    "cuLaunchKernel")
        self._check(self.lib.cuCtxSynchronize(), "cuCtxSynchronize (the kernel)")
