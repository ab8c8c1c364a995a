"""The YatGemm operator, specified once.

Everything else that describes the op (the torch custom op, the ONNX schema, the onnxscript
function, the kernels and the TensorRT plugin fields) is derived from the objects in this module.
docs/yatgemm.md is the prose form of the same specification.

    Y = alpha * (X·Wᵀ + B)² / (max(|X|² + |W|² − 2·X·Wᵀ, 0) + eps)

computed per output unit n over the last axis of X. 16-bit inputs are computed with float32
accumulation and the result is clamped to the finite range of the input dtype before the cast back.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

# ONNX element types, by their numbers in onnx.proto (tests/test_spec.py checks them against onnx).
# This module imports nothing outside the standard library: the native build runs it as a script
# to generate the C++ header that the kernels and the TensorRT plugin include.
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
        TensorSpec("X", "[..., K]", "Input rows; any number of leading dimensions."),
        TensorSpec("W", "[N, K]", "Weights, one row per output unit (torch.nn.Linear layout)."),
        TensorSpec("B", "[N]", "Bias added inside the square; absent means zero.", optional=True),
    ),
    outputs=(TensorSpec("Y", "[..., N]", "Yat scores, in the dtype of X."),),
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


def cpp_header(spec: OpSpec = YAT_GEMM) -> str:
    """The C++ form of the spec's constants, for the kernels and the TensorRT plugin."""
    eps = spec.attribute("eps")
    alpha = spec.attribute("alpha")
    lines = [
        "// Generated from yatdeploy/spec.py by the native build. Do not edit.",
        "#pragma once",
        "",
        "namespace yat::spec {",
        f'inline constexpr const char* kOpName = "{spec.name}";',
        f'inline constexpr const char* kDomain = "{spec.domain}";',
        f"inline constexpr int kVersion = {spec.version};",
        f"inline constexpr float kDefaultEps = {float(eps.default)!r}f;",
        f"inline constexpr float kDefaultAlpha = {float(alpha.default)!r}f;",
        f'inline constexpr const char* kPluginNamespace = "{PLUGIN_NAMESPACE}";',
        f'inline constexpr const char* kPluginVersion = "{PLUGIN_VERSION}";',
        f"inline constexpr int kInputCount = {len(spec.inputs)};",
        f"inline constexpr int kRequiredInputCount = {sum(not t.optional for t in spec.inputs)};",
        f"inline constexpr float kFloat16FiniteMax = {FINITE_MAX[ONNX_FLOAT16]!r}f;",
        f"inline constexpr float kBFloat16FiniteMax = {FINITE_MAX[ONNX_BFLOAT16]!r}f;",
        "}  // namespace yat::spec",
        "",
    ]
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
