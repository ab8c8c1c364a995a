"""The YatGemm GPU kernel (Triton) on torch tensors, and the CUDA implementation of `yatdeploy::yat_gemm`.

Needs triton (`pip install 'yatdeploy[gpu-kernels]'`); without it this package still imports,
`available()` is False, and the torch op keeps its reference implementation on every device.
CPU tensors run under Triton's interpreter, which triton reads from TRITON_INTERPRET=1 when functions are
decorated: set it before triton and this package are first imported, and keep it set (docs/gpu-kernel.md).

The ahead-of-time build (`python -m yatdeploy.gpu.aot`) runs where triton is and torch is not (the
package build's isolated environment): importing this package then defines the configs only.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from yatdeploy.gpu.configs import TILE_CONFIGS, TileConfig, choose_config

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["TILE_CONFIGS", "TileConfig", "available", "choose_config", "row_sq_norms", "yat_gemm"]

TRITON_MISSING = "yatdeploy.gpu needs triton: pip install 'yatdeploy[gpu-kernels]'"


def available() -> bool:
    """Whether the kernels can run on torch tensors here (triton and torch are importable)."""
    return importlib.util.find_spec("triton") is not None and importlib.util.find_spec("torch") is not None


if available():
    # yatdeploy.ops.torch_op registers launch.op_cuda_kernel as the torch op's CUDA kernel, lazily.
    from yatdeploy.gpu.launch import row_sq_norms, yat_gemm
else:

    def yat_gemm(x: Tensor, w: Tensor, b: Tensor | None, eps: float, alpha: float, **options: object) -> Tensor:
        raise ImportError(TRITON_MISSING)

    def row_sq_norms(w: Tensor) -> Tensor:
        raise ImportError(TRITON_MISSING)
