"""The PyTorch side of export and validation: the reference model, its outputs and their names.

export and validate share one `Reference`: the loaded model in the export dtype (cast once), which
checks that the model runs on the example input, names the outputs, gives the expected values of
every input case and, for the derived tolerances, a float64 run of the same inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from yatdeploy import dtypes
from yatdeploy.errors import InputSpecError, YatDeployError
from yatdeploy.loading import LoadedModel


def model_dtype(module: nn.Module) -> str:
    """The name of the dtype of the module's first floating parameter or buffer; float32 without one."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            try:
                return dtypes.by_torch(tensor.dtype).name
            except KeyError:
                break
    return "float32"


def output_names_for(count: int) -> list[str]:
    """The names yatdeploy gives a model's outputs: `output`, or `output_0`, `output_1`, ..."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def example_input(shape: Sequence[int], dtype: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtypes.by_name(dtype).torch)


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    if dtypes.by_name(dtype).name == "bfloat16":  # numpy's bfloat16 (ml_dtypes) has no torch bridge
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(dtypes.by_name("bfloat16").numpy)
    return tensor.numpy()


def _outputs(out: object) -> list[torch.Tensor]:
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise YatDeployError("the model returns something other than a tensor or a tuple of tensors")
    return outputs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class Reference:
    """The PyTorch model as export and validation run it: `loaded`'s module in `dtype`."""

    loaded: LoadedModel
    dtype: str
    module: nn.Module

    @staticmethod
    def of(loaded: LoadedModel, dtype: str | None = None) -> Reference:
        """`dtype` None: the model's own. A model in another dtype is cast in a copy (the loaded one is kept);
        compiled archives (TorchScript, torch.export) keep the dtype they were saved in."""
        module = loaded.module
        dtype = dtype or model_dtype(module)
        if loaded.layers_are_identifiable and model_dtype(module) != dtype:
            module = copy.deepcopy(module).to(dtypes.by_name(dtype).torch)
        return Reference(loaded, dtype, module)

    def run_tensor(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        """The outputs on `x`; an InputSpecError telling the user to check `what` when the model can't run it."""
        try:
            with torch.inference_mode():
                out = self.module(x)
        except Exception as exc:
            raise InputSpecError(
                f"the model can't run on an input of shape {tuple(x.shape)} and dtype {x.dtype}: {_first_line(exc)}",
                f"check {what}",
            ) from exc
        return _outputs(out)

    def run(self, array: np.ndarray, what: str) -> list[np.ndarray]:
        return [to_numpy(t) for t in self.run_tensor(to_torch(array, self.dtype), what)]

    def float64_runs(self, arrays: Sequence[np.ndarray],
                     expected: Sequence[list[np.ndarray]]) -> tuple[list[list[np.ndarray]] | None, str]:
        """The model run in float64 on every input (each with its `expected` outputs), and what that was.

        None where it can't be: a TorchScript or torch.export archive whose graph is fixed to its own dtype, or
        a layer with a fixed compute dtype that keeps the result out of float64.
        """
        if self.dtype == "float64":
            return ([[np.asarray(w, dtype=np.float64) for w in want] for want in expected],
                    "the PyTorch run itself (a float64 export)")
        try:
            module64 = copy.deepcopy(self.module).to(torch.float64)
        except Exception as exc:
            return None, f"none: the model can't be cast to float64 ({_first_line(exc)})"
        runs = []
        for array, want in zip(arrays, expected):
            try:
                with torch.inference_mode():
                    outs = _outputs(module64(torch.from_numpy(np.asarray(array, dtype=np.float64))))
            except Exception as exc:
                return None, f"none: the model does not run in float64 ({_first_line(exc)})"
            if len(outs) != len(want) or not all(
                o.dtype == torch.float64 and tuple(o.shape) == tuple(w.shape) for o, w in zip(outs, want)
            ):
                return None, "none: cast to float64, the model does not compute in float64 (a fixed compute dtype?)"
            runs.append([o.detach().cpu().numpy() for o in outs])
        return runs, "a float64 run of the PyTorch model on the same inputs"
