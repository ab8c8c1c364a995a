"""Deliberately broken exports for localization (tests/test_localize.py, benchmarks/localize_zoo.py): three small
models of their own (a YatNMN MLP, a small conv net, a tiny Yat GPT with LayerNorm) and breakages of their ONNX
graphs, each naming the module(s) it breaks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from nmn.torch import MultiHeadYatAttention, YatEmbed, YatNMN
from onnx import numpy_helper
from torch import nn

from tests.model_zoo import perturb
from yatdeploy.localize import node_scopes


class YatMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = YatNMN(10, 24)
        self.norm = nn.LayerNorm(24)
        self.mid = YatNMN(24, 24, epsilon=1e-3)
        self.act = nn.GELU()
        self.out = YatNMN(24, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.mid(self.norm(self.inp(x)))))


class YatPair(nn.Module):
    """Two YatNMN layers: every op has a bfloat16 kernel on ONNX Runtime's CPU provider."""

    def __init__(self) -> None:
        super().__init__()
        self.first = YatNMN(10, 16)
        self.second = YatNMN(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.act2 = nn.ReLU()
        self.flat = nn.Flatten()
        self.head = YatNMN(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flat(self.act2(self.conv2(self.pool(self.act1(self.conv1(x)))))))


class TinyYatGPT(nn.Module):
    """YatEmbed tokens + learned positions, one pre-norm block (causal MultiHeadYatAttention, a YatNMN MLP), a final
    LayerNorm and the tied attend head."""

    def __init__(self, vocabulary: int = 29, width: int = 16, heads: int = 2, context: int = 12) -> None:
        super().__init__()
        self.tok = YatEmbed(vocabulary, width)
        self.pos = nn.Embedding(context, width)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = MultiHeadYatAttention(width, heads)
        self.mlp = YatNMN(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(length, device=ids.device))
        mask = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None, None]
        x = x + self.attention(self.ln1(x), mask=mask)
        x = x + self.mlp(self.ln2(x))
        return self.tok.attend(self.ln_f(x))


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(1)
    return perturb(cls(), seed=1).eval()


# name: (build, export's example inputs)
MODELS: dict[str, tuple[Callable[[], nn.Module], dict]] = {
    "mlp": (lambda: _seeded(YatMLP), {"example_inputs": (4, 10)}),
    "yat": (lambda: _seeded(YatPair), {"example_inputs": (4, 10)}),
    "conv": (lambda: _seeded(ConvNet), {"example_inputs": (2, 3, 8, 8)}),
    "gpt": (lambda: _seeded(TinyYatGPT), {"example_inputs": ["ids:int64[batch=2,seq=6]"]}),
}


def export(name: str, folder: Path, dtype: str | None = None) -> tuple[nn.Module, Path]:
    """The model `name`, built, and its faithful export in `folder`."""
    from yatdeploy import api

    build, options = MODELS[name]
    model = build()
    path = folder / f"{name}{'' if dtype is None else '-' + dtype}.onnx"
    api.export(model, options["example_inputs"], path, dtype=dtype, validate=False)
    return model, path


# --- breakages: each changes the graph in place and returns the module(s) a localization must name --------------

def nodes_of(model: onnx.ModelProto, module: str, op_type: str | None = None) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if module in (node_scopes(n) or [])
            and (op_type is None or n.op_type == op_type)]


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _own_initializers(model: onnx.ModelProto, module: str) -> list[onnx.TensorProto]:
    """The initializers only `module`'s nodes read, largest first."""
    inside = nodes_of(model, module)
    names = {i for n in inside for i in n.input}
    outside = {i for n in model.graph.node if n not in inside for i in n.input}
    found = [i for i in model.graph.initializer if i.name in names and i.name not in outside]
    return sorted(found, key=lambda i: -int(np.prod(i.dims)))


def perturbed(module: str, which: int = 0, factor: float = 1.01) -> Callable[[onnx.ModelProto], set[str]]:
    def breakage(model: onnx.ModelProto) -> set[str]:
        init = _own_initializers(model, module)[which]
        array = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array((array.astype(np.float64) * factor).astype(array.dtype), init.name))
        return {module}

    return breakage


def transposed(module: str, axes: tuple[int, ...] | None = None, op_type: str | None = None
               ) -> Callable[[onnx.ModelProto], set[str]]:
    """A square weight transposed (`axes`: of a 4-D kernel), the first of `op_type`'s nodes' in the module."""

    def breakage(model: onnx.ModelProto) -> set[str]:
        own = {i.name for i in _own_initializers(model, module)}
        nodes = nodes_of(model, module, op_type)
        name = next(i for n in nodes for i in n.input if i in own and len(_initializer(model, i).dims) >= 2)
        init = _initializer(model, name)
        array = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(array, axes)), init.name))
        return {module}

    return breakage


def attribute(module: str, op_type: str, name: str, value: float) -> Callable[[onnx.ModelProto], set[str]]:
    """An attribute (YatGemm's eps or alpha, LayerNormalization's epsilon) of the module's node set to `value`."""

    def breakage(model: onnx.ModelProto) -> set[str]:
        [node] = nodes_of(model, module, op_type)
        for attr in node.attribute:
            if attr.name == name:
                attr.f = value
                return {module}
        node.attribute.append(onnx.helper.make_attribute(name, value))
        return {module}

    return breakage


def scaled_attribute(module: str, op_type: str, name: str, factor: float) -> Callable[[onnx.ModelProto], set[str]]:
    def breakage(model: onnx.ModelProto) -> set[str]:
        [node] = nodes_of(model, module, op_type)
        attr = next(a for a in node.attribute if a.name == name)
        attr.f = attr.f * factor
        return {module}

    return breakage


def swapped(first: str, second: str) -> Callable[[onnx.ModelProto], set[str]]:
    """The last node of `first` and the node of `second` that reads it swapped: x -A-> a -B-> b becomes
    x -B-> a -A-> b (each node keeps its other inputs and its scope)."""

    def breakage(model: onnx.ModelProto) -> set[str]:
        a = nodes_of(model, first)[-1]
        b = next(n for n in nodes_of(model, second) if a.output[0] in n.input)
        x = a.input[0]
        a_out, b_out = a.output[0], b.output[0]
        b.input[list(b.input).index(a_out)] = x
        b.output[0] = a_out
        a.input[0] = a_out
        a.output[0] = b_out
        nodes = list(model.graph.node)
        i, j = nodes.index(a), nodes.index(b)
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return {first, second}

    return breakage


@dataclass(frozen=True)
class Broken:
    name: str
    model: str  # a MODELS key
    breakage: Callable[[onnx.ModelProto], set[str]]
    dtype: str | None = None


BROKEN: list[Broken] = [
    Broken("mlp: perturbed YatNMN weight", "mlp", perturbed("mid")),
    Broken("mlp: perturbed YatNMN bias", "mlp", perturbed("inp", which=1, factor=1.2)),
    Broken("mlp: YatGemm eps x10", "mlp", scaled_attribute("mid", "YatGemm", "eps", 10.0)),
    Broken("mlp: YatGemm alpha x1.1", "mlp", scaled_attribute("out", "YatGemm", "alpha", 1.1)),
    Broken("mlp: LayerNorm epsilon 0.1", "mlp", attribute("norm", "LayerNormalization", "epsilon", 0.1)),
    Broken("mlp: transposed YatNMN weight", "mlp", transposed("mid")),
    Broken("mlp: LayerNorm and YatNMN swapped", "mlp", swapped("norm", "mid")),
    Broken("conv: perturbed conv weight", "conv", perturbed("conv2")),
    Broken("conv: perturbed conv bias", "conv", perturbed("conv1", which=1, factor=1.5)),
    Broken("conv: transposed conv kernel", "conv", transposed("conv1", axes=(0, 1, 3, 2))),
    Broken("conv: ReLU and AvgPool swapped", "conv", swapped("act1", "pool")),
    Broken("conv: YatGemm alpha x1.1", "conv", scaled_attribute("head", "YatGemm", "alpha", 1.1)),
    Broken("conv: YatGemm eps x100", "conv", scaled_attribute("head", "YatGemm", "eps", 100.0)),
    Broken("gpt: perturbed YatNMN weight", "gpt", perturbed("mlp")),
    Broken("gpt: perturbed position table", "gpt", perturbed("pos")),
    Broken("gpt: attend YatGemm eps x100", "gpt", scaled_attribute("tok.head", "YatGemm", "eps", 100.0)),
    Broken("gpt: YatGemm alpha x1.1", "gpt", scaled_attribute("mlp", "YatGemm", "alpha", 1.1)),
    Broken("gpt: LayerNorm epsilon 0.1", "gpt", attribute("ln2", "LayerNormalization", "epsilon", 0.1)),
    Broken("gpt: transposed attention projection", "gpt", transposed("attention", op_type="MatMul")),
    Broken("gpt: LayerNorm and YatNMN swapped", "gpt", swapped("ln2", "mlp")),
    Broken("mlp float16: perturbed YatNMN weight", "mlp", perturbed("mid", factor=1.05), "float16"),
    Broken("mlp float16: LayerNorm epsilon 0.1", "mlp", attribute("norm", "LayerNormalization", "epsilon", 0.1),
           "float16"),
    Broken("yat bfloat16: YatGemm alpha x1.1", "yat", scaled_attribute("second", "YatGemm", "alpha", 1.1),
           "bfloat16"),
]


def expected_modules(broken: set[str]) -> set[str]:
    """The PyTorch modules a breakage's ONNX scopes are (a YatEmbed's attend is exported as its `head` layer)."""
    return {f"{m.rpartition('.')[0]}.attend" if m.endswith(".head") else m for m in broken}


def break_export(case: Broken, source: Path, target: Path) -> set[str]:
    """`source` broken as `case` says, written to `target`; the PyTorch modules a localization must name."""
    model = onnx.load(str(source))
    modules = case.breakage(model)
    onnx.save(model, str(target))
    return expected_modules(modules)
