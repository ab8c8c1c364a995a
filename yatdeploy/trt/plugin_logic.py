"""The YatGemm TensorRT plugin's facts and arithmetic, importable without TensorRT.

`yatdeploy.trt.plugin` wires these into tensorrt.plugin's register/autotune/aot_impl functions. Every
function here works on plain ints as well as on tensorrt.plugin's symbolic shape expressions (it uses
only +, * and //), so the tests check, on ints, exactly the expressions TensorRT evaluates.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from yatdeploy import native
from yatdeploy.errors import YatDeployError
from yatdeploy.spec import MATH_ATTRIBUTES, PLUGIN_NAMESPACE, PLUGIN_VERSION, YAT_GEMM

PLUGIN_NAME = YAT_GEMM.name
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"  # tensorrt.plugin's "namespace::name"
# The plugin's inputs: the spec's, B included. TensorRT plugins have a fixed input count, so the TensorRT
# path needs B on every node; the exporter always writes it (zeros for a bias-free layer).
INPUTS = tuple(t.name for t in YAT_GEMM.inputs)
ATTRIBUTES = MATH_ATTRIBUTES  # the plugin fields, from the node attributes of the same names

# Launch geometry of kernels/yat_gemm_tile.cuh (stated in kernels/yat_gemm.cuh; a test compares them).
TILE_M = 64
TILE_N = 64
THREADS_X = 16
THREADS_Y = 16
MAX_GRID_Y = 65535  # CUDA's limit on grid.y, which walks the output units

# The kernel entry's parameters in order: TensorRT passes the inputs, then the extra (int32) args,
# then the output (plugins/yat_gemm/yat_gemm_plugin.cu).
EXTRA_ARGS = ("m", "k", "n", "eps_high", "eps_low", "alpha_high", "alpha_low")
KERNEL_PARAMS = ("x", "w", "b", *EXTRA_ARGS, "y")


@dataclass(frozen=True)
class PluginType:
    dtype: str  # yatdeploy's name (dtypes.py)
    trt: str  # the tensorrt.DataType member
    autotune: str  # the spelling in tensorrt.plugin.AutoTuneCombination
    kernel: str  # the PTX entry point


PLUGIN_TYPES: tuple[PluginType, ...] = (
    PluginType("float32", "FLOAT", "FP32", "yat_gemm_trt_f32"),
    PluginType("float16", "HALF", "FP16", "yat_gemm_trt_f16"),
    PluginType("bfloat16", "BF16", "BF16", "yat_gemm_trt_bf16"),
)


class PluginInputError(YatDeployError):
    """A YatGemm node TensorRT's plugin can't take (wrong ranks or mixed dtypes)."""


def plugin_type(trt_name: str) -> PluginType:
    for t in PLUGIN_TYPES:
        if t.trt == trt_name:
            return t
    supported = ", ".join(t.dtype for t in PLUGIN_TYPES)
    raise PluginInputError(f"YatGemm's TensorRT plugin has no {trt_name} kernel (it has {supported})")


def check_inputs(ranks: Sequence[int], trt_types: Sequence[str]) -> PluginType:
    """The kernel for these inputs (X, W, B), or an error naming what the plugin can't take."""
    if len(ranks) != len(INPUTS):
        raise PluginInputError(f"YatGemm's TensorRT plugin takes {len(INPUTS)} inputs ({', '.join(INPUTS)}), "
                               f"got {len(ranks)}")
    x_rank, w_rank, b_rank = ranks
    if x_rank < 1 or w_rank != 2 or b_rank != 1:
        raise PluginInputError(f"YatGemm takes X [..., K], W [N, K] and B [N]; got ranks {x_rank}, {w_rank}, {b_rank}")
    if len(set(trt_types)) != 1:
        raise PluginInputError(f"YatGemm's inputs must share one dtype; got {', '.join(trt_types)}")
    return plugin_type(trt_types[0])


def autotune_types() -> str:
    """Every I/O (X, W, B, Y) in the same dtype, one of the kernel's, for AutoTuneCombination."""
    same = "|".join(t.autotune for t in PLUGIN_TYPES)
    return ", ".join([same] * (len(INPUTS) + 1))


E = TypeVar("E")


def output_dims(x_dims: Sequence[E], w_dims: Sequence[E]) -> list[E]:
    """Y's shape: X's leading dimensions, then N (W's rows)."""
    return [*x_dims[:-1], w_dims[0]]


def rows(x_dims: Sequence[E], one: E) -> E:
    """M, the rows the kernel sees: the product of X's leading dimensions (`one` for a 1-D X)."""
    if len(x_dims) == 1:
        return one
    m = x_dims[0]
    for d in x_dims[1:-1]:
        m = m * d
    return m


def launch_grid(m: E, n: E) -> tuple[E, E]:
    """(grid.x, grid.y): one block per TILE_M rows x TILE_N output units."""
    return (m + (TILE_M - 1)) // TILE_M, (n + (TILE_N - 1)) // TILE_N


def block_dims() -> tuple[int, int, int]:
    return THREADS_X, THREADS_Y, 1


def float_halves(value: float) -> tuple[int, int]:
    """A float's float32 bit pattern as two non-negative 16-bit ints (TensorRT's extra args are ints)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return bits >> 16, bits & 0xFFFF


def float_from_halves(high: int, low: int) -> float:
    """The inverse of float_halves, as the kernel computes it."""
    (value,) = struct.unpack("<f", struct.pack("<I", (high << 16) | low))
    return value


def extra_args(m: E, k: E, n: E, eps: float, alpha: float) -> list:
    """The kernel's scalar arguments, in EXTRA_ARGS order."""
    return [m, k, n, *float_halves(eps), *float_halves(alpha)]


def check_static_limits(n: int) -> None:
    """Shapes the kernel can't launch for, known when the network is built."""
    grid_y = (n + TILE_N - 1) // TILE_N
    if grid_y > MAX_GRID_Y:
        raise PluginInputError(f"YatGemm with N={n} output units needs {grid_y} blocks along grid.y; "
                               f"CUDA allows {MAX_GRID_Y}")


# --- the PTX ---------------------------------------------------------------------------------------

_ENTRY = re.compile(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)")
_PARAM = re.compile(r"\.param\s+\.(\w+)\s+\w+")


def ptx_entries(ptx: str) -> dict[str, list[str]]:
    """The PTX's kernel entry points and their parameters' PTX types, e.g. {"k": ["u64", "u32"]}."""
    return {name: _PARAM.findall(params) for name, params in _ENTRY.findall(ptx)}


def expected_entry_params() -> list[str]:
    """PTX parameter types of a plugin entry: pointers are u64, the extra args 32-bit."""
    return ["u64"] * len(INPUTS) + ["u32"] * len(EXTRA_ARGS) + ["u64"]


def check_ptx(ptx: str, source: str = "the plugin PTX") -> None:
    """Fail early, naming the problem, if the PTX does not have the entries the plugin launches."""
    entries = ptx_entries(ptx)
    for t in PLUGIN_TYPES:
        if t.kernel not in entries:
            raise YatDeployError(f"{source} has no kernel {t.kernel}: rebuild yatdeploy (pip install -e .)")
        if entries[t.kernel] != expected_entry_params():
            raise YatDeployError(f"{source}: kernel {t.kernel} takes ({', '.join(entries[t.kernel])}), "
                                 f"the plugin launches it with ({', '.join(expected_entry_params())})")


def ptx_path() -> Path:
    path = native.trt_plugin_ptx_path()
    if path is None:
        raise YatDeployError("the YatGemm TensorRT plugin's PTX was not built: install yatdeploy on a machine "
                             "with nvcc (the CUDA toolkit), see `yatdeploy doctor`")
    return path


def read_ptx() -> str:
    path = ptx_path()
    ptx = path.read_text()
    check_ptx(ptx, str(path))
    return ptx


def describe() -> dict:
    """What `yatdeploy doctor` and the docs say about the plugin."""
    return {
        "id": PLUGIN_ID,
        "version": PLUGIN_VERSION,
        "inputs": list(INPUTS),
        "fields": list(ATTRIBUTES),
        "dtypes": [t.dtype for t in PLUGIN_TYPES],
        "kernels": [t.kernel for t in PLUGIN_TYPES],
    }
