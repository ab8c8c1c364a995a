"""The PyTorch side of export and validation: the reference model, its outputs and their names.

export and validate share one `Reference`: the loaded model in the export dtype (cast once), which
checks that the model runs on the example input, names the outputs, gives the expected values of
every input case and, for the derived tolerances, a float64 run of the same inputs. `yat_calls` counts
the Yat products a run computes (the YatGemm nodes an export must have, which validation checks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from nmn.torch import YatEmbed, YatNMN
from torch import Tensor, nn

from yatdeploy import dtypes
from yatdeploy.errors import YatDeployError, cannot_run, first_line
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


def _flatten(out: object) -> tuple[list[torch.Tensor], list[str]]:
    """A model's outputs as a list, and their ONNX names: a tensor or a tuple/list of tensors (`output`,
    `output_0`, ...), or a dict of tensors (its keys, in order)."""
    if isinstance(out, Mapping):
        values, names = list(out.values()), [str(k) for k in out]
    else:
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        names = output_names_for(len(values))
    if not values or not all(isinstance(o, torch.Tensor) for o in values):
        raise YatDeployError("the model returns something other than a tensor, a tuple of tensors or a dict of tensors")
    return values, names


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == dtypes.by_name("bfloat16").numpy:  # numpy's bfloat16 (ml_dtypes) has no torch bridge
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy().astype(dtypes.by_name("bfloat16").numpy)
    return tensor.numpy()


def cast_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` in `dtype`, as module.to(dtype) gives it, nmn's tied kernel-bank YatNMN layers included
    (nmn refuses to move them; their bank is shared by several layers, and is cast once here). Learnable eps
    parameters keep their dtype, as nmn's own conversion keeps them."""
    module = copy.deepcopy(module)
    if not any(getattr(sub, "tie_kernel_bank", False) for sub in module.modules()):
        return module.to(dtype)

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    seen: set[int] = set()
    for sub in module.modules():
        if not getattr(sub, "tie_kernel_bank", False):
            sub._apply(convert, recurse=False)
            continue
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if tensor is not None and id(tensor) not in seen and "epsilon" not in name:
                seen.add(id(tensor))
                tensor.data = convert(tensor.data)
    return module


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating) or array.dtype == dtypes.by_name("bfloat16").numpy


@dataclass
class Reference:
    """The PyTorch model as export and validation run it: `loaded`'s module in `dtype` (a
    model_reference.ModelReference)."""

    framework: ClassVar[str] = "PyTorch"
    loaded: LoadedModel
    dtype: str
    module: nn.Module
    output_names: list[str] = field(default_factory=list)  # known once the model has run

    @staticmethod
    def of(loaded: LoadedModel, dtype: str | None = None) -> Reference:
        """`dtype` None: the model's own. A model in another dtype is cast in a copy (the loaded one is kept);
        compiled archives (TorchScript, torch.export) keep the dtype they were saved in."""
        module = loaded.module
        own = model_dtype(module)
        dtype = dtype or own
        if loaded.layers_are_identifiable and own != dtype:
            module = cast_copy(module, dtypes.by_name(dtype).torch)
        return Reference(loaded, dtype, module)

    def run_tensors(self, xs: Sequence[torch.Tensor], what: str) -> list[torch.Tensor]:
        """The outputs on the inputs `xs` (positional, in the model's order); an InputSpecError telling the user to
        check `what` when the model can't run them."""
        try:
            with torch.inference_mode():
                out = self.module(*xs)
        except Exception as exc:
            raise cannot_run([f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in xs], exc,
                             what) from exc
        values, self.output_names = _flatten(out)
        return values

    def run_tensor(self, x: torch.Tensor, what: str) -> list[torch.Tensor]:
        return self.run_tensors([x], what)

    def run(self, arrays: Mapping[str, np.ndarray], what: str) -> list[np.ndarray]:
        """The outputs on named arrays (in the model's input order)."""
        return [to_numpy(t) for t in self.run_tensors([to_torch(a) for a in arrays.values()], what)]

    def run_counting(self, arrays: Mapping[str, np.ndarray], what: str) -> tuple[list[np.ndarray], int]:
        """`run`, and the Yat products it computed (yat_calls): the YatGemm nodes its export should have."""
        outputs: list[list[np.ndarray]] = []
        calls = yat_calls(self.module, lambda: outputs.append(self.run(arrays, what)))
        return outputs[0], sum(calls.values())

    def yat_gemm_check(self, nodes: int, calls: int) -> tuple[bool, str]:
        """One YatGemm node per Yat layer call (YatNMN, YatEmbed.attend), where the layers are live objects; a
        compiled archive keeps no YatNMN options, so its layers export decomposed."""
        if self.loaded.layers_are_identifiable:
            return nodes == calls, f"{nodes} YatGemm nodes for {calls} Yat layer calls"
        layers = count_yat_layers(self.loaded.module)
        return True, f"{nodes} YatGemm nodes; {self.loaded.format} keeps no YatNMN options ({layers} layers decomposed)"

    def int_range(self) -> tuple[int, int]:
        """Where integer inputs (token ids) are valid: [0, the smallest embedding table's size) when the model
        has embedding tables, else cases.DEFAULT_INT_RANGE."""
        from yatdeploy.cases import DEFAULT_INT_RANGE

        sizes = [m.num_embeddings for m in self.module.modules() if isinstance(getattr(m, "num_embeddings", None), int)]
        return (0, min(sizes)) if sizes else DEFAULT_INT_RANGE

    def float64_runs(self, cases: Sequence[Mapping[str, np.ndarray]],
                     expected: Sequence[list[np.ndarray]]) -> tuple[list[list[np.ndarray]] | None, str]:
        """The model run in float64 on every input (each with its `expected` outputs), and what that was.

        None where it can't be: a TorchScript or torch.export archive whose graph is fixed to its own dtype, or
        a layer with a fixed compute dtype that keeps the result out of float64.
        """
        if self.dtype == "float64":
            return ([[np.asarray(w, dtype=np.float64) for w in want] for want in expected],
                    "the PyTorch run itself (a float64 export)")
        try:
            module64 = cast_copy(self.module, torch.float64)
        except Exception as exc:
            return None, f"none: the model can't be cast to float64 ({first_line(exc)})"
        runs = []
        for arrays, want in zip(cases, expected):
            xs = [torch.from_numpy(np.asarray(a, dtype=np.float64)) if _is_float(a) else torch.from_numpy(a)
                  for a in arrays.values()]
            try:
                with torch.inference_mode():
                    outs, _ = _flatten(module64(*xs))
            except Exception as exc:
                return None, f"none: the model does not run in float64 ({first_line(exc)})"
            if len(outs) != len(want) or not all(
                o.dtype == torch.float64 and tuple(o.shape) == tuple(w.shape) for o, w in zip(outs, want)
            ):
                return None, "none: cast to float64, the model does not compute in float64 (a fixed compute dtype?)"
            runs.append([o.detach().cpu().numpy() for o in outs])
        return runs, "a float64 run of the PyTorch model on the same inputs"


@contextmanager
def observed(module: nn.Module, on_module: Callable[[str, nn.Module, tuple, dict, object], None] | None,
             on_attend: Callable[[str, Tensor, Tensor], None], *, modules: tuple[type, ...] = (nn.Module,)
             ) -> Iterator[None]:
    """While the block runs, every call of a sub-module of `module` that is one of `modules` reports (path, module,
    args, kwargs, output) to `on_module` (None: none), and every YatEmbed.attend (not a module call: the tied head)
    reports (path, query, output) to `on_attend`; the hooks and the wrappers are removed after."""
    hooks = [] if on_module is None else [
        m.register_forward_hook(lambda m_, args, kwargs, out, _path=path: on_module(_path, m_, args, kwargs, out),
                                with_kwargs=True)
        for path, m in module.named_modules() if isinstance(m, modules)]
    patched = []
    for path, sub in module.named_modules():
        if isinstance(sub, YatEmbed):
            def attend(query: Tensor, _bound=sub.attend, _path=path) -> Tensor:
                out = _bound(query)
                on_attend(_path, query, out)
                return out

            sub.attend = attend  # an instance attribute, removed below
            patched.append(sub)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for sub in patched:
            del sub.attend


def yat_calls(module: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """The Yat dense products `run()` computes through `module`, per layer path: YatNMN calls and YatEmbed.attend
    calls (a layer called twice counts twice, one never called 0). Their sum is the YatGemm nodes of an export."""
    calls = {path: 0 for path, m in module.named_modules() if isinstance(m, (YatNMN, YatEmbed))}

    def count(path: str, *_: object) -> None:
        calls[path] += 1

    with observed(module, count, count, modules=(YatNMN,)):
        run()
    return calls


def count_yat_layers(module: nn.Module) -> int:
    """YatNMN layers in a module, including compiled (TorchScript) ones, which keep the class name."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, YatNMN) or getattr(sub, "original_name", None) == "YatNMN":
            count += 1
    return count
