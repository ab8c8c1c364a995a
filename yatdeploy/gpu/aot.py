"""Ahead-of-time compilation of the YatGemm Triton kernels to PTX and cubin, without a GPU.

    python -m yatdeploy.gpu.aot --out DIR [--arch 80 90] [--dtype ...] [--config ...] [--variant ...]

writes one PTX and one cubin per (kernel, arch, dtype, tile config, variant) and DIR/manifest.json,
which tells a host everything it needs to launch them: entry name, exact parameter list, block size,
dynamic shared memory, grid.

The artifacts are for row-major X, W and Y (the unit strides are compiled in); the leading strides are
parameters. Variant "aligned" assumes every pointer 16-byte aligned and K, N and the leading strides
multiples of 16 (vectorised, pipelined loads); "generic" assumes nothing. Triton appends two scratch
pointers (global and profile scratch) to every entry; these kernels use neither, so they are cut from
the PTX entry and the cubin is assembled from that PTX: the parameter list is exactly the manifest's.

Needs triton and not torch: the package build runs it in an environment without torch (common.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from triton.runtime.jit import JITFunction

from yatdeploy.files import file_sha256
from yatdeploy.gpu import kernel
from yatdeploy.gpu.common import (
    FLOAT32_PRECISIONS,
    KERNEL_DTYPES,
    ROW_SQ_NORM_BLOCK_K,
    ROW_SQ_NORM_BLOCK_N,
    ROW_SQ_NORM_NUM_WARPS,
    Float32Precision,
    dot_input_precision,
    output_saturation,
)
from yatdeploy.gpu.configs import TILE_CONFIGS, TileConfig

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

# Compute capability -> the PTX/cubin target Triton compiles it for (sm_90 gets the Hopper-only wgmma).
ARCHS: dict[int, str] = {80: "sm_80", 90: "sm_90a"}
VARIANTS = ("aligned", "generic")
_TRITON_POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
_PTX_PARAM_TYPES = {"*": ".u64", "i32": ".u32", "fp32": ".f32"}

# Hosts pass row-major tensors.
UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_yn")
# Values the "aligned" variant may assume divisible by 16 (pointers: in bytes, integers: in elements).
_ALIGNED_INTEGERS = ("K", "N", "stride_xm", "stride_wn", "stride_ym")
# A multiple of BLOCK_K by construction (configs.split_k_slices), so hinted in every variant.
_ALWAYS_ALIGNED_INTEGERS = ("k_per_slice",)


@dataclass(frozen=True)
class KernelJob:
    """One artifact to compile."""

    # "yat_gemm", "yat_gemm_split_k_partial", "yat_gemm_split_k_epilogue", "row_sq_norm", or "yat_gemm_trt"
    # (TensorRT's AOT plugin ABI: inputs, int32 scalars, output; |w|² from the W tiles)
    kernel: str
    cc: int
    dtype: str
    variant: str
    config: str | None  # a TILE_CONFIGS name; None for row_sq_norm
    float32_precision: Float32Precision = "ieee"

    @property
    def stem(self) -> str:
        parts = [self.kernel, ARCHS[self.cc], self.dtype]
        if self.dtype == "float32" and self.float32_precision != "ieee":
            parts.append(self.float32_precision)
        if self.config is not None:
            parts.append(self.config)
        parts.append(self.variant)
        return ".".join(parts)


@dataclass
class ManifestEntry:
    kernel: str
    arch: str
    dtype: str
    config: str | None
    variant: str
    float32_precision: str | None
    tile: dict[str, int | str] | None
    entry: str
    ptx: str
    cubin: str
    params: list[dict[str, str]]
    constants: dict[str, int | float | bool | str]
    divisible_by_16: list[str]
    num_warps: int
    block: list[int]
    grid: list[str]
    shared_memory_bytes: int
    ptx_version: str
    compile_seconds: float
    workspace: dict[str, str] = field(default_factory=dict)


def _jit_function(name: str):
    if not isinstance(kernel.yat_gemm_kernel, JITFunction):
        raise RuntimeError(
            "yatdeploy.gpu.aot needs the compiled kernels, but TRITON_INTERPRET=1 made them interpreter "
            "functions: run it without TRITON_INTERPRET"
        )
    return getattr(kernel, f"{name}_kernel")


def _grid(job: KernelJob, config: TileConfig | None) -> list[str]:
    if config is None:
        return [f"cdiv(N, {ROW_SQ_NORM_BLOCK_N})", "1", "1"]
    tiles = f"cdiv(M, {config.block_m}) * cdiv(N, {config.block_n})"
    if job.kernel == "yat_gemm_split_k_partial":
        return [tiles, "k_slices", "1"]
    return [tiles, "1", "1"]


def _constants(job: KernelJob, dtype: str, config: TileConfig | None) -> dict[str, int | float | bool | str]:
    if config is None:
        return {"stride_wk": 1, "BLOCK_N": ROW_SQ_NORM_BLOCK_N, "BLOCK_K": ROW_SQ_NORM_BLOCK_K}
    saturate, finite_max = output_saturation(dtype)
    tile = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "GROUP_M": config.group_m}
    dot = {
        "BLOCK_K": config.block_k,
        "INPUT_PRECISION": dot_input_precision(dtype, job.float32_precision),
        "UPCAST_DOT_OPERANDS": False,
    }
    epilogue = {"SATURATE": saturate, "FINITE_MAX": finite_max}
    if job.kernel == "yat_gemm":
        return {"stride_xk": 1, "stride_wk": 1, "stride_yn": 1, **tile, **dot, **epilogue}
    if job.kernel == "yat_gemm_trt":  # row-major by construction: no stride parameters
        return {**tile, **dot, **epilogue}
    if job.kernel == "yat_gemm_split_k_partial":
        return {"stride_xk": 1, "stride_wk": 1, **tile, **dot}
    return {"stride_yn": 1, **tile, **epilogue}


def _signature(fn, dtype: str, constants: dict) -> dict[str, str]:
    pointer = _TRITON_POINTER_TYPES[dtype]
    float32_buffers = ("w_sq_ptr", "partial_dot_ptr", "partial_x_sq_ptr")
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in float32_buffers else pointer
        elif name in ("eps", "alpha"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def strip_scratch_params(ptx: str, entry: str, kept: int) -> str:
    """Cut the .param declarations after the first `kept` from `entry`'s parameter list."""
    header = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if header is None:
        raise ValueError(f"no .entry {entry} in the PTX")
    params = [p.strip() for p in header.group(1).split(",") if p.strip()]
    for dropped in params[kept:]:
        name = dropped.split()[-1]
        if re.search(rf"\b{re.escape(name)}\b", ptx[header.end():]):
            raise ValueError(f"{entry}: the appended parameter {name} is used by the kernel body; it can't be cut")
    body = ",\n".join(f"\t{p}" for p in params[:kept])
    return ptx[: header.start(1)] + "\n" + body + "\n" + ptx[header.end(1):]


def ptx_params(ptx: str, entry: str) -> list[tuple[str, str]]:
    """(PTX type, name) of each .param of `entry`, in order."""
    header = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if header is None:
        raise ValueError(f"no .entry {entry} in the PTX")
    declarations = [p.split() for p in header.group(1).split(",") if p.strip()]
    return [(d[1], d[-1]) for d in declarations]


def _compile(job: KernelJob, out_dir: Path) -> ManifestEntry:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn = _jit_function(job.kernel)
    dtype = job.dtype
    config = TILE_CONFIGS[job.config] if job.config is not None else None
    constants = _constants(job, dtype, config)
    signature = _signature(fn, dtype, constants)
    hinted = [n for n in signature if n in _ALWAYS_ALIGNED_INTEGERS]
    if job.variant == "aligned":
        hinted += [n for n in signature if signature[n] != "constexpr" and (n.endswith("_ptr") or n in _ALIGNED_INTEGERS)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    num_warps = config.num_warps if config else ROW_SQ_NORM_NUM_WARPS
    options = {"num_warps": num_warps}
    if config is not None:
        options["num_stages"] = config.num_stages
    target = GPUTarget("cuda", job.cc, 32)

    started = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target, options=options)
    metadata = compiled.metadata
    if metadata.global_scratch_size or metadata.profile_scratch_size:
        raise RuntimeError(f"{job.stem}: the kernel needs Triton scratch memory, which the hosts don't provide")
    params = [n for n in fn.arg_names if signature[n] != "constexpr"]
    ptx = strip_scratch_params(compiled.asm["ptx"], metadata.name, kept=len(params))
    backend = make_backend(target)
    cubin = backend.make_cubin(ptx, {}, backend.parse_options(options), job.cc)
    seconds = time.perf_counter() - started

    ptx_name, cubin_name = f"{job.stem}.ptx", f"{job.stem}.cubin"
    (out_dir / ptx_name).write_text(ptx)
    (out_dir / cubin_name).write_bytes(cubin)
    ptx_version = re.search(r"^\.version\s+(\S+)", ptx, re.M)
    workspace = {}
    if job.kernel.startswith("yat_gemm_split_k"):
        workspace = {"partial_dot_ptr": "float32[k_slices, M, N]", "partial_x_sq_ptr": "float32[k_slices, M]"}
    return ManifestEntry(
        kernel=job.kernel,
        arch=ARCHS[job.cc],
        dtype=job.dtype,
        config=job.config,
        variant=job.variant,
        float32_precision=job.float32_precision if job.dtype == "float32" and config is not None else None,
        tile=config.as_dict() if config else None,
        entry=metadata.name,
        ptx=ptx_name,
        cubin=cubin_name,
        params=[{"name": n, "type": signature[n], "ptx_type": _ptx_type(signature[n])} for n in params],
        constants=constants,
        divisible_by_16=hinted,
        num_warps=num_warps,
        block=[32 * num_warps, 1, 1],
        grid=_grid(job, config),
        shared_memory_bytes=metadata.shared,
        ptx_version=ptx_version.group(1) if ptx_version else "",
        compile_seconds=round(seconds, 3),
        workspace=workspace,
    )


def _ptx_type(triton_type: str) -> str:
    return _PTX_PARAM_TYPES["*" if triton_type.startswith("*") else triton_type]


def jobs_for(
    ccs: list[int], dtypes: list[str], configs: list[str], variants: list[str],
    float32_precisions: list[Float32Precision], trt: bool = True,
) -> list[KernelJob]:
    """The artifacts to compile; `trt`: the TensorRT plugin's entries (yat_gemm_trt) too, for the tile
    configs the plugin offers as tactics for each dtype (yatdeploy/trt/plugin_logic.py)."""
    from yatdeploy.trt.plugin_logic import TACTICS  # standard library and yatdeploy.spec only

    jobs = []
    for cc in ccs:
        for dtype in dtypes:
            precisions = float32_precisions if dtype == "float32" else ["ieee"]
            for variant in variants:
                jobs.append(KernelJob("row_sq_norm", cc, dtype, variant, None))
                for precision in precisions:
                    for name in configs:
                        # Split-K needs a workspace, which TensorRT's AOT plugins don't get: no TRT entry.
                        tactic = any(t.config == name and dtype in t.dtypes for t in TACTICS)
                        kernels = ["yat_gemm", *(["yat_gemm_trt"] if trt and tactic else [])]
                        if TILE_CONFIGS[name].split_k > 1:
                            kernels = ["yat_gemm_split_k_partial", "yat_gemm_split_k_epilogue"]
                        jobs += [KernelJob(k, cc, dtype, variant, name, precision) for k in kernels]
    return jobs


def _compile_in_worker(job: KernelJob, out_dir: str) -> ManifestEntry:
    return _compile(job, Path(out_dir))


def build(out_dir: Path, jobs: list[KernelJob], workers: int = 1) -> dict:
    """Compile `jobs` into out_dir and write the manifest; returns it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            entries = list(pool.map(_compile_in_worker, jobs, [str(out_dir)] * len(jobs)))
    else:
        entries = [_compile(job, out_dir) for job in jobs]
    import triton

    manifest = {
        "format": MANIFEST_FORMAT,
        "triton_version": triton.__version__,
        "kernel_source_sha256": file_sha256(Path(kernel.__file__)),
        "entries": [asdict(e) for e in entries],
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile the YatGemm Triton kernels to PTX and cubin (no GPU needed).")
    parser.add_argument("--out", required=True, type=Path, help="folder for the artifacts and manifest.json")
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS),
                        help="compute capabilities (90 compiles for sm_90a)")
    parser.add_argument("--dtype", nargs="+", choices=sorted(KERNEL_DTYPES), default=sorted(KERNEL_DTYPES))
    parser.add_argument("--config", nargs="+", choices=sorted(TILE_CONFIGS), default=list(TILE_CONFIGS))
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--float32-precision", nargs="+", choices=FLOAT32_PRECISIONS, default=["ieee"])
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--no-trt", action="store_true",
                        help="leave out the TensorRT plugin's entries (yat_gemm_trt)")
    args = parser.parse_args(argv)
    jobs = jobs_for(args.arch, args.dtype, args.config, args.variant, args.float32_precision, trt=not args.no_trt)
    started = time.perf_counter()
    manifest = build(args.out, jobs, args.jobs)
    print(f"{len(manifest['entries'])} kernels in {time.perf_counter() - started:.1f} s -> {args.out / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
