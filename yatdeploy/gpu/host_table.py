"""The C++ launch table of the AOT kernels, for the ONNX Runtime CUDA op (custom_ops/src/cuda/gpu_kernels.cc).

    python -m yatdeploy.gpu.host_table --manifest DIR/manifest.json --out yat_gemm_kernels.h

The native build runs this after `yatdeploy.gpu.aot`, so the C++ side never parses JSON: the header holds,
for every entry the ORT host launches (yat_gemm, the split-K pair and row_sq_norm; ieee float32), its
entry name, artifact files, exact parameter order, block, dynamic shared memory, grid formula and the
parameters the "aligned" variant assumes divisible by 16; and the tile configs with choose_config's rule
table (configs.CHOICE_RULES), so that the C++ chooser is the Python one.

It refuses a manifest it can't describe exactly (an unknown parameter or grid term, a parameter of the
wrong kind, a tile that isn't configs.py's, a layout other than row-major): a stale or changed manifest
fails the build instead of launching wrongly. Standard library and yatdeploy.gpu.configs only (no torch).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from yatdeploy.gpu.common import KERNEL_DTYPES
from yatdeploy.gpu.configs import CHOICE_RULES, TILE_CONFIGS

# The kernels the ORT host launches, by manifest name -> C++ enumerator.
KERNELS = {
    "yat_gemm": "kYatGemm",
    "yat_gemm_split_k_partial": "kSplitKPartial",
    "yat_gemm_split_k_epilogue": "kSplitKEpilogue",
    "row_sq_norm": "kRowSqNorm",
}
DTYPES = {"float32": "kFloat32", "float16": "kFloat16", "bfloat16": "kBFloat16"}
ARCHS = {"sm_80": 80, "sm_90a": 90}
# Every value a launch passes: manifest name -> (C++ enumerator, kind: "pointer", "i32" or "fp32").
PARAMS: dict[str, tuple[str, str]] = {
    "x_ptr": ("kX", "pointer"),
    "w_ptr": ("kW", "pointer"),
    "b_ptr": ("kB", "pointer"),
    "w_sq_ptr": ("kWSq", "pointer"),
    "y_ptr": ("kY", "pointer"),
    "partial_dot_ptr": ("kPartialDot", "pointer"),
    "partial_x_sq_ptr": ("kPartialXSq", "pointer"),
    "M": ("kM", "i32"),
    "N": ("kN", "i32"),
    "K": ("kK", "i32"),
    "k_per_slice": ("kKPerSlice", "i32"),
    "k_slices": ("kKSlices", "i32"),
    "stride_xm": ("kStrideXm", "i32"),
    "stride_wn": ("kStrideWn", "i32"),
    "stride_ym": ("kStrideYm", "i32"),
    "has_bias": ("kHasBias", "i32"),
    "eps": ("kEps", "fp32"),
    "alpha": ("kAlpha", "fp32"),
}
# The host passes row-major tensors: these strides must be compiled in as 1 where a kernel has them.
UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_yn")
MAX_PARAMS = 16
_PARAM_KINDS = {"pointer": "ParamKind::kPointer", "i32": "ParamKind::kI32", "fp32": "ParamKind::kF32"}
_GRID_FACTOR = re.compile(r"^(?:cdiv\((?P<dim>[MN]), (?P<block>\d+)\)|(?P<slices>k_slices)|(?P<one>1))$")


class ManifestError(ValueError):
    pass


def _kind(triton_type: str) -> str:
    if triton_type.startswith("*"):
        return "pointer"
    if triton_type in ("i32", "fp32"):
        return triton_type
    raise ManifestError(f"parameter type {triton_type!r} has no C++ counterpart")


def grid_terms(expression: str) -> tuple[int, int, bool]:
    """(cdiv_m, cdiv_n, times_k_slices) of one grid dimension: the product of cdiv(M, cdiv_m) (0: absent),
    cdiv(N, cdiv_n) (0: absent) and k_slices."""
    cdiv = {"M": 0, "N": 0}
    slices = False
    for factor in (f.strip() for f in expression.split("*")):
        match = _GRID_FACTOR.match(factor)
        if match is None:
            raise ManifestError(f"grid term {factor!r} (in {expression!r}) is not cdiv(M|N, n), k_slices or 1")
        if match["dim"]:
            if cdiv[match["dim"]]:
                raise ManifestError(f"grid {expression!r} divides {match['dim']} twice")
            cdiv[match["dim"]] = int(match["block"])
        elif match["slices"]:
            slices = True
    return cdiv["M"], cdiv["N"], slices


def host_entries(manifest: dict) -> list[dict]:
    """The manifest entries the ORT host launches, checked; in manifest order."""
    entries = []
    for e in manifest["entries"]:
        if e["kernel"] not in KERNELS or e.get("float32_precision") not in (None, "ieee"):
            continue
        where = f"{e['ptx']}"
        if e["arch"] not in ARCHS or e["dtype"] not in DTYPES or e["variant"] not in ("aligned", "generic"):
            raise ManifestError(f"{where}: unknown arch, dtype or variant")
        if e["config"] is not None:
            config = TILE_CONFIGS.get(e["config"])
            if config is None or e["tile"] != config.as_dict():
                raise ManifestError(f"{where}: tile config {e['config']!r} is not configs.py's: rebuild the kernels")
        elif e["kernel"] != "row_sq_norm":
            raise ManifestError(f"{where}: {e['kernel']} without a tile config")
        if len(e["params"]) > MAX_PARAMS:
            raise ManifestError(f"{where}: more than {MAX_PARAMS} parameters")
        for p in e["params"]:
            if p["name"] not in PARAMS:
                raise ManifestError(f"{where}: parameter {p['name']!r} is unknown to the ORT host")
            if PARAMS[p["name"]][1] != _kind(p["type"]):
                raise ManifestError(f"{where}: parameter {p['name']} is {p['type']}, the host passes "
                                    f"{PARAMS[p['name']][1]}")
        names = {p["name"] for p in e["params"]}
        for hinted in e["divisible_by_16"]:
            if hinted not in names:
                raise ManifestError(f"{where}: divisible_by_16 names {hinted!r}, which is not a parameter")
        for stride in UNIT_STRIDES:
            if stride in e["constants"] and e["constants"][stride] != 1:
                raise ManifestError(f"{where}: {stride} is compiled in as {e['constants'][stride]}, not 1")
            if stride in names:
                raise ManifestError(f"{where}: {stride} is a parameter; the host passes row-major tensors only")
        if e["block"][1:] != [1, 1] or len(e["grid"]) != 3:
            raise ManifestError(f"{where}: block {e['block']} / grid {e['grid']} is not (x, 1, 1) / 3 terms")
        for expression in e["grid"]:
            grid_terms(expression)
        entries.append(e)
    if not entries:
        raise ManifestError("no entry the ORT host launches (yat_gemm, split-K, row_sq_norm)")
    return entries


def _cpp_string(text: str) -> str:
    if not re.fullmatch(r"[\w.+-]*", text):
        raise ManifestError(f"{text!r} can't be written as a plain C++ string here")
    return f'"{text}"'


def _grid_dim(expression: str) -> str:
    cdiv_m, cdiv_n, slices = grid_terms(expression)
    return f"{{{cdiv_m}, {cdiv_n}, {'true' if slices else 'false'}}}"


def _limit(value: int | None) -> str:
    return "-1" if value is None else str(value)


def cpp_header(manifest: dict, source: str = "manifest.json") -> str:
    entries = host_entries(manifest)
    config_index = {name: i for i, name in enumerate(TILE_CONFIGS)}
    dtype_index = {name: i for i, name in enumerate(DTYPES)}
    assert list(DTYPES) == list(KERNEL_DTYPES)
    lines = [
        f"// Generated by yatdeploy/gpu/host_table.py from {Path(source).name} (yatdeploy/gpu/aot.py) and",
        "// yatdeploy/gpu/configs.py. Do not edit.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "",
        "namespace yat::gpu_kernels {",
        "",
        f'inline constexpr const char* kTritonVersion = {_cpp_string(manifest.get("triton_version", ""))};',
        f'inline constexpr const char* kKernelSourceSha256 = "{manifest.get("kernel_source_sha256", "")}";',
        "",
        f"enum class Kernel : int {{ {', '.join(KERNELS.values())} }};",
        f"inline constexpr const char* kKernelNames[] = {{{', '.join(_cpp_string(n) for n in KERNELS)}}};",
        f"enum class Dtype : int {{ {', '.join(DTYPES.values())} }};",
        f"inline constexpr const char* kDtypeNames[] = {{{', '.join(_cpp_string(n) for n in DTYPES)}}};",
        "// Every value a launch passes; an entry lists them in its parameter order.",
        f"enum class Param : int {{ {', '.join(e for e, _ in PARAMS.values())}, kCount }};",
        "// The manifest's names and the kinds of value (64-bit device pointer, int32, float32), by Param.",
        f"inline constexpr const char* kParamNames[] = {{{', '.join(_cpp_string(n) for n in PARAMS)}}};",
        "enum class ParamKind : int { kPointer, kI32, kF32 };",
        f"inline constexpr ParamKind kParamKinds[] = {{{', '.join(_PARAM_KINDS[k] for _, k in PARAMS.values())}}};",
        "",
        "// yatdeploy.gpu.configs.TILE_CONFIGS, in order.",
        "struct Config {",
        "  const char* name;",
        "  int block_m, block_n, block_k, num_warps, num_stages, split_k, group_m;",
        "};",
        "inline constexpr Config kConfigs[] = {",
    ]
    for c in TILE_CONFIGS.values():
        lines.append(f"    {{{_cpp_string(c.name)}, {c.block_m}, {c.block_n}, {c.block_k}, {c.num_warps}, "
                     f"{c.num_stages}, {c.split_k}, {c.group_m}}},")
    lines += [
        "};",
        f"inline constexpr int kConfigCount = {len(TILE_CONFIGS)};",
        "",
        "// yatdeploy.gpu.configs.CHOICE_RULES: the first rule whose conditions hold (-1: none) gives the config.",
        "struct ChoiceRule {",
        "  int config;             // index into kConfigs",
        "  int64_t max_m;          // m <= max_m",
        "  int64_t max_n_tiles;    // cdiv(n, kConfigs[config].block_n) <= max_n_tiles",
        "  int64_t min_k;          // k >= min_k",
        "  int dtype;              // Dtype",
        "};",
        "inline constexpr ChoiceRule kChoiceRules[] = {",
    ]
    for rule in CHOICE_RULES:
        dtype = "-1" if rule.dtype is None else str(dtype_index[rule.dtype])
        lines.append(f"    {{{config_index[rule.config]}, {_limit(rule.max_m)}, {_limit(rule.max_n_tiles)}, "
                     f"{_limit(rule.min_k)}, {dtype}}},  // {rule.config}")
    lines += [
        "};",
        f"inline constexpr int kChoiceRuleCount = {len(CHOICE_RULES)};",
        "",
        "// One grid dimension: cdiv(M, cdiv_m) * cdiv(N, cdiv_n) * (k_slices if times_k_slices); 0: factor absent.",
        "struct GridDim {",
        "  int cdiv_m;",
        "  int cdiv_n;",
        "  bool times_k_slices;",
        "};",
        f"inline constexpr int kMaxParams = {MAX_PARAMS};",
        "struct Entry {",
        "  Kernel kernel;",
        "  int arch;  // 80: sm_80 (mma.sync), 90: sm_90a (wgmma, compute capability 9.0 only)",
        "  Dtype dtype;",
        "  int config;  // index into kConfigs; -1 for row_sq_norm",
        "  bool aligned;  // the \"aligned\" variant: divisible_by_16's values must be multiples of 16",
        "  const char* entry;",
        "  const char* cubin;  // file names in the gpu_kernels folder",
        "  const char* ptx;",
        "  unsigned block_x;",
        "  unsigned shared_memory_bytes;  // dynamic; above 48 KiB the launch must opt in",
        "  GridDim grid[3];",
        "  uint32_t divisible_by_16;  // bit (1 << Param): that value must be a multiple of 16 (pointers: bytes)",
        "  int param_count;",
        "  Param params[kMaxParams];  // the entry's parameters, in order",
        "};",
        "inline constexpr Entry kEntries[] = {",
    ]
    for e in entries:
        grid = ", ".join(_grid_dim(expression) for expression in e["grid"])
        mask = " | ".join(f"(1u << int(Param::{PARAMS[n][0]}))" for n in e["divisible_by_16"]) or "0u"
        params = ", ".join(f"Param::{PARAMS[p['name']][0]}" for p in e["params"])
        config = config_index[e["config"]] if e["config"] is not None else -1
        lines.append(
            f"    {{Kernel::{KERNELS[e['kernel']]}, {ARCHS[e['arch']]}, Dtype::{DTYPES[e['dtype']]}, {config}, "
            f"{'true' if e['variant'] == 'aligned' else 'false'}, {_cpp_string(e['entry'])}, "
            f"{_cpp_string(e['cubin'])}, {_cpp_string(e['ptx'])}, {e['block'][0]}u, {e['shared_memory_bytes']}u, "
            f"{{{grid}}}, {mask}, {len(e['params'])}, {{{params}}}}},"
        )
    lines += [
        "};",
        f"inline constexpr int kEntryCount = {len(entries)};",
        "",
        "}  // namespace yat::gpu_kernels",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the AOT kernels' C++ launch table for the ORT CUDA op.")
    parser.add_argument("--manifest", required=True, type=Path, help="manifest.json written by yatdeploy.gpu.aot")
    parser.add_argument("--out", required=True, type=Path, help="the header to write")
    args = parser.parse_args(argv)
    try:
        text = cpp_header(json.loads(args.manifest.read_text()), str(args.manifest))
    except ManifestError as error:
        print(f"{args.manifest}: {error}", file=sys.stderr)
        return 1
    if not args.out.exists() or args.out.read_text() != text:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
