"""The YatGemm TensorRT plugin's facts and arithmetic, importable without TensorRT (and without Triton).

`yatdeploy.trt.plugin` wires these into tensorrt.plugin's register/autotune/aot_impl functions. The
kernels are the Triton YatGemm kernels compiled ahead of time (yatdeploy/gpu/aot.py): the plugin returns
the PTX of a `yat_gemm_trt` entry of the installed manifest (`native.gpu_kernels_manifest()`) with the
grid, block and shared memory the manifest states. Every function that TensorRT's symbolic shapes go
through uses only +, * and // on them, so the tests check, on ints, exactly the expressions TensorRT
evaluates.

What tensorrt.plugin's ahead-of-time path allows (TensorRT 10.9 to 11.x, `_TemplateAOTPlugin`):
- one kernel per aot_impl call: a name, PTX (or cubin) text, launch parameters (grid, block, dynamic
  shared memory, each an int32 expression of the input shapes) and a list of int32 extra arguments;
- TensorRT launches it with the inputs' pointers, then the extra arguments, then the outputs' pointers;
- no workspace and no persistent per-plugin buffer, and no second kernel.
Hence the `yat_gemm_trt` entry: |w|² summed from the W tiles inside the GEMM (no precomputed vector),
eps and alpha as 16-bit halves of their float32 bits (extra arguments are int32 expressions), row-major
strides derived from K and N, and no split-K tactic (its partial sums need a workspace).
"""

from __future__ import annotations

import ast
import ctypes
import functools
import itertools
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from yatdeploy import native
from yatdeploy.errors import YatDeployError
from yatdeploy.spec import (
    IMPLEMENTATIONS,
    MATH_ATTRIBUTES,
    ONNX_BFLOAT16,
    ONNX_FLOAT,
    ONNX_FLOAT16,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    YAT_GEMM,
)

PLUGIN_NAME = YAT_GEMM.name
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"  # tensorrt.plugin's "namespace::name"
# The plugin's inputs: the spec's, B included. TensorRT plugins have a fixed input count, so the TensorRT
# path needs B on every node; the exporter always writes it (zeros for a bias-free layer).
INPUTS = tuple(t.name for t in YAT_GEMM.inputs)
ATTRIBUTES = MATH_ATTRIBUTES  # the plugin fields, from the node attributes of the same names

# The manifest's kernel for the plugin (yatdeploy/gpu/kernel.py: yat_gemm_trt_kernel).
TRT_KERNEL = "yat_gemm_trt"
# Its parameters in the order TensorRT passes them: the inputs' pointers, the extra (int32) arguments,
# the output's pointer. The manifest's parameter list must be exactly this (check_entry).
INPUT_PARAMS = ("x_ptr", "w_ptr", "b_ptr")
EXTRA_ARGS = ("M", "N", "K", "eps_high", "eps_low", "alpha_high", "alpha_low")
OUTPUT_PARAMS = ("y_ptr",)
KERNEL_PARAMS = (*INPUT_PARAMS, *EXTRA_ARGS, *OUTPUT_PARAMS)

# The "aligned" variant assumes K and N (hence every row stride) multiples of this, and 16-byte aligned
# pointers (yatdeploy/gpu/aot.py); otherwise the plugin takes the "generic" one.
ALIGNMENT = 16

# Below 8.0 there are no bfloat16 tensor cores and Triton's sm_80 PTX does not load.
MIN_COMPUTE_CAPABILITY = (8, 0)
# The most dynamic shared memory a block may opt into, for when the device can't be asked
# (CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN): A100 (8.0) and H100/H200 (9.0).
DEFAULT_MAX_SHARED_MEMORY = {"sm_80": 166912, "sm_90a": 232448}
# Without cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) a launch gets at most this much; whether
# TensorRT raises the limit for an AOT plugin's kernel is not known (docs/tensorrt.md).
DEFAULT_DYNAMIC_SHARED_LIMIT = 48 * 1024


@dataclass(frozen=True)
class PluginType:
    dtype: str  # yatdeploy's name (dtypes.py), the manifest's "dtype"
    trt: str  # the tensorrt.DataType member
    autotune: str  # the spelling in tensorrt.plugin.AutoTuneCombination
    triton_pointer: str  # the manifest's type of X, W, B and Y
    itemsize: int  # bytes per element (a batched W's slices are pointer offsets)


# TensorRT's and Triton's spellings of each ONNX element type the GPU kernels could have.
_SPELLINGS = {
    ONNX_FLOAT: PluginType("float32", "FLOAT", "FP32", "*fp32", 4),
    ONNX_FLOAT16: PluginType("float16", "HALF", "FP16", "*fp16", 2),
    ONNX_BFLOAT16: PluginType("bfloat16", "BF16", "BF16", "*bf16", 2),
}
# The plugin's kernels are the AOT GPU kernels: it takes the dtypes the spec's "cuda" implementation covers.
PLUGIN_TYPES: tuple[PluginType, ...] = tuple(_SPELLINGS[t] for t in IMPLEMENTATIONS["cuda"].dtypes)
_ALL_DTYPES = tuple(t.dtype for t in PLUGIN_TYPES)


@dataclass(frozen=True)
class Tactic:
    """A TensorRT custom tactic: one tile configuration of yatdeploy.gpu.configs.TILE_CONFIGS."""

    id: int  # positive (tensorrt.plugin's rule) and stable across versions (timing caches key on it)
    config: str  # a TILE_CONFIGS name
    dtypes: tuple[str, ...]  # the dtypes it is offered for


# Every one-pass tile configuration; the split-K ones are left out (they need a workspace). The large
# tiles are offered for the dtype they were sized for (docs/gpu-kernel.md's table); TensorRT times the
# rest at the engine's shapes and keeps the fastest.
TACTICS: tuple[Tactic, ...] = (
    Tactic(1, "large_16bit", ("float16", "bfloat16")),
    Tactic(2, "large_float32", ("float32",)),
    Tactic(3, "medium_m", _ALL_DTYPES),
    Tactic(4, "small_m", _ALL_DTYPES),
)


class PluginInputError(YatDeployError):
    """A YatGemm node TensorRT's plugin can't take (wrong ranks or mixed dtypes)."""


def plugin_type(trt_name: str) -> PluginType:
    for t in PLUGIN_TYPES:
        if t.trt == trt_name:
            return t
    supported = ", ".join(t.dtype for t in PLUGIN_TYPES)
    raise PluginInputError(f"YatGemm's TensorRT plugin has no {trt_name} kernel (it has {supported})")


def check_inputs(ranks: Sequence[int], trt_types: Sequence[str], *, batched_w: bool) -> PluginType:
    """The kernel type for these inputs (X, W, B), or an error naming what the plugin can't take. `batched_w`:
    whether this plugin takes a batched W [..., N, K] (attention scores), which it runs as one launch per slice."""
    if len(ranks) != len(INPUTS):
        raise PluginInputError(f"YatGemm's TensorRT plugin takes {len(INPUTS)} inputs ({', '.join(INPUTS)}), "
                               f"got {len(ranks)}")
    x_rank, w_rank, b_rank = ranks
    if x_rank < 1 or w_rank < 2 or b_rank != 1 or (w_rank > 2 and x_rank < 2):
        raise PluginInputError(f"YatGemm takes X [..., K], W [N, K] and B [N], or batched X [..., M, K] and "
                               f"W [..., N, K]; got ranks {x_rank}, {w_rank}, {b_rank}")
    if w_rank > 2 and not batched_w:
        raise PluginInputError(
            f"YatGemm's ahead-of-time TensorRT plugin takes W [N, K] only, not a batched W of rank {w_rank} "
            "(attention scores): TensorRT launches one kernel per ahead-of-time plugin node, and the kernels have "
            "no batched grid yet (docs/yatgemm.md)")
    if len(set(trt_types)) != 1:
        raise PluginInputError(f"YatGemm's inputs must share one dtype; got {', '.join(trt_types)}")
    return plugin_type(trt_types[0])


def io_types(t: PluginType) -> str:
    """Every I/O (X, W, B, Y) in dtype `t`, as AutoTuneCombination spells it."""
    return ", ".join([t.autotune] * (len(INPUTS) + 1))


E = TypeVar("E")


def broadcast_dim(a: int, b: int) -> int:
    """One leading dimension of Y from X's and W's, as MatMul (numpy) broadcasts them."""
    if a != b and a != 1 and b != 1:
        raise PluginInputError(f"YatGemm: leading dimensions {a} and {b} of X and W do not broadcast")
    return b if a == 1 else a


def output_dims(x_dims: Sequence[E], w_dims: Sequence[E],
                broadcast: Callable[[E, E], E] = broadcast_dim) -> list[E]:
    """Y's shape (yatdeploy/ops/reference.py's output_shape). W [N, K]: X's leading dimensions, then N. Batched W
    [..., N, K]: the leading dimensions of X and W, right-aligned, each pair joined by `broadcast` (broadcast_dim
    on ints; a host's own on symbolic dimensions), then M and N."""
    if len(w_dims) == 2:
        return [*x_dims[:-1], w_dims[0]]
    x_lead, w_lead = list(x_dims[:-2]), list(w_dims[:-2])
    width = max(len(x_lead), len(w_lead))
    lead = []
    for i in range(width):
        xd = x_lead[i - width + len(x_lead)] if i >= width - len(x_lead) else None
        wd = w_lead[i - width + len(w_lead)] if i >= width - len(w_lead) else None
        lead.append(wd if xd is None else xd if wd is None else broadcast(xd, wd))
    return [*lead, x_dims[-2], w_dims[-2]]


@dataclass(frozen=True)
class Slices:
    """A node's product as the 2-D kernel launches it: each slice is X [m, k] against W [n, k] into Y [m, n], at
    these element offsets (X, W, Y) from the tensors' first elements."""

    m: int
    n: int
    k: int
    offsets: tuple[tuple[int, int, int], ...]


def slices(x_dims: Sequence[int], w_dims: Sequence[int]) -> Slices:
    """The launches of a node with these (actual) shapes: one for W [N, K] (or a batched W whose leading dimensions
    are all 1), every row of X against it; one per slice of Y for a batched W, a broadcast dimension reading the
    same slice of X or W again. No launch when Y is empty."""
    n, k = w_dims[-2], w_dims[-1]
    w_lead = list(w_dims[:-2])
    if math.prod(w_lead) == 1:
        m = rows(x_dims, 1)
        return Slices(m, n, k, ((0, 0, 0),) if m and n else ())
    m = x_dims[-2]
    lead = output_dims(x_dims, w_dims)[:-2]
    if m == 0 or n == 0 or math.prod(lead) == 0:
        return Slices(m, n, k, ())

    def strides(dims: Sequence[int]) -> list[int]:  # slice strides over Y's leading dims; 0 where broadcast
        padded = [1] * (len(lead) - len(dims)) + list(dims)
        out, step = [0] * len(lead), 1
        for i in reversed(range(len(lead))):
            out[i] = 0 if padded[i] == 1 else step
            step *= padded[i]
        return out

    x_strides, w_strides = strides(x_dims[:-2]), strides(w_dims[:-2])
    offsets = []
    for s, index in enumerate(itertools.product(*map(range, lead))):
        xi = sum(i * st for i, st in zip(index, x_strides))
        wi = sum(i * st for i, st in zip(index, w_strides))
        offsets.append((xi * m * k, wi * n * k, s * m * n))
    return Slices(m, n, k, tuple(offsets))


def rows(x_dims: Sequence[E], one: E) -> E:
    """M, the rows the kernel sees: the product of X's leading dimensions (`one` for a 1-D X)."""
    if len(x_dims) == 1:
        return one
    m = x_dims[0]
    for d in x_dims[1:-1]:
        m = m * d
    return m


def float_halves(value: float) -> tuple[int, int]:
    """A float's float32 bit pattern as two non-negative 16-bit ints (TensorRT's extra args are int32
    expressions; halves keep them non-negative whatever the sign)."""
    (bits,) = struct.unpack("<I", struct.pack("<f", value))
    return bits >> 16, bits & 0xFFFF


def float_from_halves(high: int, low: int) -> float:
    """The inverse of float_halves, as the kernel computes it."""
    (value,) = struct.unpack("<f", struct.pack("<I", (high << 16) | low))
    return value


# --- the installed kernels -------------------------------------------------------------------------

def kernels() -> tuple[Path, dict]:
    """(folder, manifest) of the installed AOT GPU kernels, or an error saying how to get them."""
    folder, manifest = native.gpu_kernels_dir(), native.gpu_kernels_manifest()
    if folder is None or manifest is None:
        raise YatDeployError(
            "the YatGemm GPU kernels were not built, and the TensorRT plugin runs them",
            "install yatdeploy on a machine with nvcc and with triton in the build (see `yatdeploy doctor`)",
        )
    return folder, manifest


def arch_for(capability: tuple[int, int], manifest: dict) -> str:
    """The manifest arch to run on a device of this compute capability: sm_90a (wgmma) on 9.0, whose
    PTX loads on 9.0 only; sm_80 (mma.sync) PTX elsewhere from 8.0 on, which the driver JIT-compiles."""
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        raise YatDeployError(f"YatGemm's GPU kernels need compute capability 8.0 or newer; this GPU has "
                             f"{capability[0]}.{capability[1]}")
    archs = {e["arch"] for e in manifest["entries"] if e["kernel"] == TRT_KERNEL}
    if tuple(capability) == (9, 0) and "sm_90a" in archs:
        return "sm_90a"
    if "sm_80" in archs:
        return "sm_80"
    raise YatDeployError(f"the installed GPU kernels have no TensorRT entry ({TRT_KERNEL}) that runs on compute "
                         f"capability {capability[0]}.{capability[1]} (they have: {', '.join(sorted(archs)) or 'none'})",
                         "rebuild yatdeploy with a current yatdeploy.gpu.aot")


def variant_for(k: int | None, n: int | None) -> str:
    """"aligned" when K and N are known at build time and multiples of ALIGNMENT, else "generic"."""
    aligned = k is not None and n is not None and k % ALIGNMENT == 0 and n % ALIGNMENT == 0
    return "aligned" if aligned else "generic"


def _entries(manifest: dict, arch: str, dtype: str, variant: str | None = None) -> list[dict]:
    return [
        e for e in manifest["entries"]
        if e["kernel"] == TRT_KERNEL and e["arch"] == arch and e["dtype"] == dtype
        and (variant is None or e["variant"] == variant)
        and e.get("float32_precision") in (None, "ieee")  # float32 at float32 accuracy
    ]


ENV_MAX_SHARED_MEMORY = "YATDEPLOY_TRT_MAX_SHARED_MEMORY"


def shared_memory_limit(arch: str, device_limit: int | None) -> int:
    """The most dynamic shared memory a tactic may need: the device's opt-in limit (or the arch's when
    the device can't be asked), lowered by $YATDEPLOY_TRT_MAX_SHARED_MEMORY (e.g. 49152, should TensorRT
    turn out not to raise a kernel's limit above 48 KB)."""
    limit = device_limit or DEFAULT_MAX_SHARED_MEMORY[arch]
    override = os.environ.get(ENV_MAX_SHARED_MEMORY)
    if override:
        try:
            limit = min(limit, int(override))
        except ValueError:
            raise YatDeployError(f"${ENV_MAX_SHARED_MEMORY} must be a number of bytes, not {override!r}") from None
    return limit


def tactics(manifest: dict, arch: str, dtype: str, max_shared_memory: int) -> list[int]:
    """The tactic ids offered for `dtype` on `arch`: those meant for the dtype whose entries exist in
    every variant and fit the device's shared memory."""
    found: dict[str, list[dict]] = {}
    for e in _entries(manifest, arch, dtype):
        found.setdefault(e["config"], []).append(e)
    variants = {e["variant"] for e in _entries(manifest, arch, dtype)}
    offered = []
    for tactic in TACTICS:
        entries = found.get(tactic.config, [])
        if (dtype in tactic.dtypes and entries and {e["variant"] for e in entries} == variants
                and all(e["shared_memory_bytes"] <= max_shared_memory for e in entries)):
            offered.append(tactic.id)
    return offered


def tactic(tactic_id: int) -> Tactic:
    for t in TACTICS:
        if t.id == tactic_id:
            return t
    raise YatDeployError(f"YatGemm's TensorRT plugin has no tactic {tactic_id} (it has "
                         f"{', '.join(f'{t.id} ({t.config})' for t in TACTICS)})")


def select_entry(manifest: dict, arch: str, dtype: str, tactic_id: int, variant: str) -> dict:
    """The manifest entry aot_impl returns for this tactic, checked against TensorRT's argument order."""
    config = tactic(tactic_id).config
    matches = [e for e in _entries(manifest, arch, dtype, variant) if e["config"] == config]
    if not matches:
        raise YatDeployError(f"the installed GPU kernels have no {TRT_KERNEL} entry for {arch} {dtype} {config} "
                             f"{variant}", "rebuild yatdeploy with a current yatdeploy.gpu.aot")
    entry = matches[0]
    check_entry(entry)
    return entry


def check_entry(entry: dict) -> None:
    """Fail, naming the difference, unless the entry's parameters are exactly what TensorRT passes:
    X, W, B pointers (of the entry's dtype), the int32 EXTRA_ARGS, then the Y pointer."""
    pointer = next(t.triton_pointer for t in PLUGIN_TYPES if t.dtype == entry["dtype"])
    expected = [(n, pointer) for n in INPUT_PARAMS] + [(n, "i32") for n in EXTRA_ARGS]
    expected += [(n, pointer) for n in OUTPUT_PARAMS]
    got = [(p["name"], p["type"]) for p in entry["params"]]
    if got != expected:
        raise YatDeployError(
            f"GPU kernel {entry['ptx']} takes ({', '.join(f'{n}: {t}' for n, t in got)}); TensorRT passes "
            f"({', '.join(f'{n}: {t}' for n, t in expected)})",
            "rebuild yatdeploy so that its GPU kernels and its TensorRT plugin match",
        )


# --- launch parameters -----------------------------------------------------------------------------

def _cdiv(a: E, b: int) -> E:
    return (a + (b - 1)) // b


def grid_value(formula: str, values: dict[str, E]) -> E | int:
    """A manifest grid formula ("cdiv(M, 128) * cdiv(N, 64)", "1") evaluated on ints or on symbolic
    expressions: names from `values`, int constants, +, *, // and cdiv (as (a + b - 1) // b)."""
    operators = {ast.Add: lambda a, b: a + b, ast.Mult: lambda a, b: a * b, ast.FloorDiv: lambda a, b: a // b}

    def evaluate(node: ast.AST):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](evaluate(node.left), evaluate(node.right))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "cdiv"
                and len(node.args) == 2 and not node.keywords):
            divisor = evaluate(node.args[1])
            if not isinstance(divisor, int) or divisor <= 0:
                raise ValueError(f"grid formula {formula!r}: cdiv by a non-constant")
            return _cdiv(evaluate(node.args[0]), divisor)
        raise ValueError(f"grid formula {formula!r}: can't evaluate {ast.unparse(node)!r}")

    return evaluate(ast.parse(formula, mode="eval").body)


@dataclass(frozen=True)
class Launch:
    grid: tuple  # (x, y, z): ints or symbolic expressions
    block: tuple[int, int, int]
    shared_memory: int  # dynamic shared memory, bytes


def launch(entry: dict, m: E, n: E, k: E) -> Launch:
    """Grid (the manifest's formula on the actual M, N, K), block (32·num_warps) and dynamic shared memory."""
    values = {"M": m, "N": n, "K": k}
    grid = tuple(grid_value(g, values) for g in entry["grid"])
    block = tuple(int(b) for b in entry["block"])
    if block != (32 * entry["num_warps"], 1, 1):
        raise YatDeployError(f"GPU kernel {entry['ptx']}: block {block} is not 32·num_warps")
    return Launch(grid, block, int(entry["shared_memory_bytes"]))


def extra_args(entry: dict, m: E, n: E, k: E, eps: float, alpha: float) -> list:
    """The int32 arguments TensorRT passes between the inputs and the outputs, in the entry's order."""
    values = {"M": m, "N": n, "K": k}
    values.update(zip(("eps_high", "eps_low"), float_halves(eps)))
    values.update(zip(("alpha_high", "alpha_low"), float_halves(alpha)))
    names = [p["name"] for p in entry["params"]][len(INPUT_PARAMS):-len(OUTPUT_PARAMS)]
    unknown = [name for name in names if name not in values]
    if unknown:
        raise YatDeployError(f"GPU kernel {entry['ptx']} takes {', '.join(unknown)}, which the plugin can't pass")
    return [values[name] for name in names]


# --- the PTX ---------------------------------------------------------------------------------------

_ENTRY = re.compile(r"\.visible\s+\.entry\s+(\w+)\s*\(([^)]*)\)")


def ptx_entries(ptx: str) -> dict[str, list[str]]:
    """The PTX's kernel entry points and their parameters' PTX types, e.g. {"k": ["u64", "u32"]}."""
    return {
        name: [re.match(r"\s*\.param\s+\.(\w+)", p).group(1) for p in params.split(",") if p.strip()]
        for name, params in _ENTRY.findall(ptx)
    }


_PTX_TYPES = {"i32": "u32", "fp32": "f32"}


def check_ptx(ptx: str, entry: dict) -> None:
    """Fail early, naming the problem, if the PTX lacks the entry or declares other parameters than the
    manifest's (TensorRT passes exactly those)."""
    entries = ptx_entries(ptx)
    if entry["entry"] not in entries:
        raise YatDeployError(f"{entry['ptx']} has no kernel {entry['entry']}", "rebuild yatdeploy")
    expected = ["u64" if p["type"].startswith("*") else _PTX_TYPES[p["type"]] for p in entry["params"]]
    if entries[entry["entry"]] != expected:
        raise YatDeployError(f"{entry['ptx']}: kernel {entry['entry']} takes ({', '.join(entries[entry['entry']])}); "
                             f"the manifest says ({', '.join(expected)})", "rebuild yatdeploy")


@functools.cache
def _read_text(path: Path) -> str:
    return path.read_text()


def read_ptx(folder: Path, entry: dict) -> str:
    ptx = _read_text(folder / entry["ptx"])
    check_ptx(ptx, entry)
    return ptx


# --- the device ------------------------------------------------------------------------------------

_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
_CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97


def current_device() -> tuple[tuple[int, int], int] | None:
    """(compute capability, most dynamic shared memory a block may opt into) of the current CUDA device
    (device 0 when no context is current), through the driver API; None without a driver or device."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if lib.cuInit(0) != 0:
        return None
    device = ctypes.c_int()
    if lib.cuCtxGetDevice(ctypes.byref(device)) != 0 and lib.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    values = []
    for attribute in (_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                      _CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN):
        value = ctypes.c_int()
        if lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, device) != 0:
            return None
        values.append(value.value)
    major, minor, shared = values
    return (major, minor), shared


def describe() -> dict:
    """What `yatdeploy doctor` and the docs say about the plugin."""
    return {
        "id": PLUGIN_ID,
        "version": PLUGIN_VERSION,
        "inputs": list(INPUTS),
        "fields": list(ATTRIBUTES),
        "dtypes": [t.dtype for t in PLUGIN_TYPES],
        "kernel": TRT_KERNEL,
        "kernel_params": list(KERNEL_PARAMS),
        "tactics": [{"id": t.id, "config": t.config, "dtypes": list(t.dtypes)} for t in TACTICS],
        "split_k": "not offered: TensorRT gives an ahead-of-time plugin no workspace",
    }
