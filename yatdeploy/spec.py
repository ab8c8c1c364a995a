"""The YatGemm operator, specified once.

The torch custom op, the ONNX schema, the onnxscript function and the TensorRT plugin's inputs, fields
and types are derived from the objects in this module. The native build runs this file as a script to
write the C++ header yat_gemm_spec.h (cpp_header), which the ONNX Runtime library's sources include for
the op's identity, attribute names and defaults, finite limits, execution providers and per-implementation
dtype coverage; the GPU kernels' AOT build takes FINITE_MAX through yatdeploy.gpu.common.
docs/yatgemm.md is the prose form of the same specification.

    Y = alpha * (X·Wᵀ + B)² / (max(|X|² + |W|² − 2·X·Wᵀ, 0) + eps)

computed per output unit n over the last axis of X. W is [N, K] (a layer: every row of X against it) or batched
[..., N, K] (attention scores: queries against keys), its leading dims broadcast with X's as MatMul's do. 16-bit inputs are computed with float32
accumulation and the result is clamped to the finite range of the input dtype before the cast back.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

# ONNX element types, by their numbers in onnx.proto (tests/test_spec.py checks them against onnx).
# This module imports nothing outside the standard library: the native build runs it as a script
# to generate the C++ header that the ONNX Runtime custom-op library includes.
ONNX_FLOAT = 1
ONNX_FLOAT16 = 10
ONNX_DOUBLE = 11
ONNX_BFLOAT16 = 16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: str
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    kind: type  # float or str
    default: float | str
    doc: str


@dataclass(frozen=True)
class OpSpec:
    name: str
    domain: str
    version: int
    doc: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: tuple[AttributeSpec, ...]
    # ONNX element types admitted for every tensor of the op (one type variable "T").
    dtypes: tuple[int, ...]
    # Element types that are computed in float32 and saturated back to their finite range.
    float32_accumulated: tuple[int, ...]

    def attribute(self, name: str) -> AttributeSpec:
        for attribute in self.attributes:
            if attribute.name == name:
                return attribute
        raise KeyError(name)


YAT_DOMAIN = "yat"
# TensorRT's ONNX parser reads these node attributes to pick a registered plugin over the
# model-local function. The namespace must not contain '.', and "", "trt", "tensorrt" are reserved.
# The ONNX opset the YatGemm function is written in and the models are exported at by default; its ops
# (MatMul, Transpose, ReduceSumSquare with axes as an input, Max, Cast, CastLike, Clip) mean the same from
# opset 18 to 22, so the function is declared at the model's opset in that range (ops/onnx_function.py).
FUNCTION_OPSET = 20
SUPPORTED_OPSETS = range(18, 23)

PLUGIN_NAMESPACE = "yat"
PLUGIN_VERSION = "1"

DEFAULT_EPS = 1e-5

YAT_GEMM = OpSpec(
    name="YatGemm",
    domain=YAT_DOMAIN,
    version=1,
    doc=(
        "Yat product dense layer: Y = alpha * (X·Wᵀ + B)² / (max(|X|² + |W|² − 2·X·Wᵀ, 0) + eps). "
        "float16 and bfloat16 are computed with float32 accumulation and clamped to the dtype's "
        "finite range."
    ),
    inputs=(
        TensorSpec("X", "[..., M, K]", "Input rows; any number of leading dimensions."),
        TensorSpec("W", "[..., N, K]", "Weights, one row per output unit (torch.nn.Linear layout): [N, K] applies to "
                                      "every row of X; batched (rank > 2, attention's keys), the leading dims of X "
                                      "and W broadcast as MatMul's do."),
        TensorSpec("B", "[N]", "Bias added inside the square; absent means zero.", optional=True),
    ),
    outputs=(TensorSpec("Y", "[..., M, N]", "Yat scores, in the dtype of X; MatMul's shape for X and Wᵀ."),),
    attributes=(
        AttributeSpec("eps", float, DEFAULT_EPS, "Added to the squared distance; must be > 0."),
        AttributeSpec("alpha", float, 1.0, "Output scale."),
        AttributeSpec(
            "plugin_namespace", str, PLUGIN_NAMESPACE,
            "Read by TensorRT's ONNX parser to choose the registered plugin; ignored by the math.",
        ),
        AttributeSpec(
            "plugin_version", str, PLUGIN_VERSION,
            "Read by TensorRT's ONNX parser to choose the registered plugin; ignored by the math.",
        ),
    ),
    dtypes=(ONNX_FLOAT, ONNX_DOUBLE, ONNX_FLOAT16, ONNX_BFLOAT16),
    float32_accumulated=(ONNX_FLOAT16, ONNX_BFLOAT16),
)

# Attributes that change the result, in the order the torch op takes them.
MATH_ATTRIBUTES = ("eps", "alpha")

# The largest finite value of each float32-accumulated type: results are clamped to ±FINITE_MAX before
# the cast back, so a score too large saturates instead of becoming inf (tests/test_spec.py checks these
# against torch.finfo). The GPU kernels, their AOT build and the C++ kernels take them from here.
FINITE_MAX: dict[int, float] = {
    ONNX_FLOAT16: (2 - 2**-10) * 2**15,  # 65504
    ONNX_BFLOAT16: (2 - 2**-7) * 2**127,  # 3.3895313892515355e38
}

@dataclass(frozen=True)
class Implementation:
    """One set of YatGemm kernels in the native library and the dtypes it implements."""

    name: str
    provider: str  # the ONNX Runtime execution provider its kernels are registered for
    dtypes: tuple[int, ...]  # ONNX element types, each a subset of YAT_GEMM.dtypes
    doc: str


# Which dtypes each implementation has a kernel for: the one table of kernel coverage. The generated
# header carries it and the library registers exactly these kernels (custom_ops/src/cpu/, custom_ops/src/cuda/;
# a dtype listed here without a kernel there fails the native build). "cuda" is the Triton kernels compiled
# ahead of time (yatdeploy/gpu/), which the ONNX Runtime CUDA op and the TensorRT plugin both launch;
# yatdeploy/trt/plugin_logic.py takes the plugin's types from it, and yatdeploy/backends/ort.py its per-library
# kernel tables (which dtypes a backend's library runs natively, on which provider).
IMPLEMENTATIONS: dict[str, Implementation] = {
    "cpu": Implementation(
        "cpu", "CPUExecutionProvider", (ONNX_FLOAT, ONNX_DOUBLE, ONNX_FLOAT16, ONNX_BFLOAT16),
        "C++ (OpenBLAS GEMM core + Yat epilogue; AVX-512 micro-kernel for float32). Every dtype the op "
        "admits: ONNX Runtime never falls back from a registered library to the model's function.",
    ),
    "cuda": Implementation(
        "cuda", "CUDAExecutionProvider", (ONNX_FLOAT, ONNX_FLOAT16, ONNX_BFLOAT16),
        "The Triton kernels compiled ahead of time, launched through the CUDA driver API. No double.",
    ),
}

_CPP_ELEM_TYPES = {ONNX_FLOAT: "kFloat", ONNX_DOUBLE: "kDouble", ONNX_FLOAT16: "kFloat16", ONNX_BFLOAT16: "kBFloat16"}


def _cpp_identifier(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def cpp_header(spec: OpSpec = YAT_GEMM) -> str:
    """The C++ form of the spec, for the ONNX Runtime custom-op library (custom_ops/src/)."""
    lines = [
        "// Generated from yatdeploy/spec.py by the native build. Do not edit.",
        "#pragma once",
        "",
        "namespace yat::spec {",
        f'inline constexpr const char* kOpName = "{spec.name}";',
        f'inline constexpr const char* kDomain = "{spec.domain}";',
        f"inline constexpr int kVersion = {spec.version};",
        "",
        "// The attributes that change the result: their names on the node and their defaults.",
    ]
    for name in MATH_ATTRIBUTES:
        attribute = spec.attribute(name)
        ident = _cpp_identifier(name)
        lines.append(f'inline constexpr const char* k{ident}Attribute = "{attribute.name}";')
        lines.append(f"inline constexpr float kDefault{ident} = {float(attribute.default)!r}f;")
    lines += [
        "",
        "// ONNX element types (onnx.proto numbers).",
        "enum class ElemType : int { "
        + ", ".join(f"{_CPP_ELEM_TYPES[t]} = {t}" for t in sorted(_CPP_ELEM_TYPES)) + " };",
        "",
        "// The largest finite value of each float32-accumulated type: results saturate to it.",
    ]
    for elem_type, limit in FINITE_MAX.items():
        lines.append(f"inline constexpr float {_CPP_ELEM_TYPES[elem_type]}FiniteMax = {limit!r}f;")
    lines += ["", "// The dtypes each implementation has kernels for (spec.IMPLEMENTATIONS), and its provider."]
    for implementation in IMPLEMENTATIONS.values():
        ident = _cpp_identifier(implementation.name)
        types = ", ".join(f"ElemType::{_CPP_ELEM_TYPES[t]}" for t in implementation.dtypes)
        lines.append(f'inline constexpr const char* k{ident}Provider = "{implementation.provider}";')
        lines.append(f"inline constexpr ElemType k{ident}Dtypes[] = {{{types}}};")
    lines += ["}  // namespace yat::spec", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the YatGemm spec as a C++ header.")
    parser.add_argument("--cpp-header", required=True, type=Path, help="the header file to write")
    args = parser.parse_args(argv)
    text = cpp_header()
    if not args.cpp_header.exists() or args.cpp_header.read_text() != text:
        args.cpp_header.parent.mkdir(parents=True, exist_ok=True)
        args.cpp_header.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
