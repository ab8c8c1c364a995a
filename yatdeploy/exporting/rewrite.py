"""Stage 3, rewrite: swap every nmn YatNMN layer for a module that calls the YatGemm op.

`rewrite_model` hands the exporter its target: the example run's module rewritten (`rewrite_yat_layers`), or a compiled
model (TorchScript, torch.export) as loaded, whose Yat layers keep no options and export as ordinary ops; with the
number of Yat products the export must have as YatGemm nodes, and notes for the user.

What is fixed at inference is folded here, at export time, into the op's inputs and attributes:
alpha (learnable, constant or none), eps (constant or softplus of the learnable parameter), the bias
(learnable, softplus, scalar, constant or none), weight normalisation and the spherical kernel
normalisation; spherical input normalisation stays as ordinary ops in front of the node.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from nmn.torch import YatEmbed, YatNMN
from torch import Tensor, nn

from yatdeploy import dtypes
from yatdeploy.errors import UnsupportedLayerError
from yatdeploy.exporting.example import ExampleRun
from yatdeploy.loading import LoadedModel
from yatdeploy.ops.torch_op import yat_gemm
from yatdeploy.progress import QUIET, Progress
from yatdeploy.reference import count_yat_layers

# nmn adds this to norms before dividing (spherical and weight_normalized modes).
_NMN_NORM_EPS = 1e-8
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Attributes nmn >= 0.3.3 sets on every YatNMN; a pickle from an older nmn lacks some of them, and
# its formula differs (see docs/yatgemm.md), so such a layer is refused rather than mis-exported.
_REQUIRED_STATE = (
    "_constant_alpha_value", "_constant_bias_value", "softplus_bias", "scalar_bias", "learnable_epsilon",
    "spherical", "weight_normalized", "tie_kernel_bank", "epsilon", "dtype", "use_alpha",
)


def _saturated(y: Tensor, dtype: torch.dtype) -> Tensor:
    """A float32 result in a 16-bit `dtype`, clamped to its finite range first (as nmn and YatGemm saturate)."""
    limit = torch.finfo(dtype).max
    return y.clamp(-limit, limit).to(dtype)


class YatGemmLayer(nn.Module):
    """The export form of one YatNMN layer: optional input normalisation, then one YatGemm."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        *,
        eps: float,
        alpha: float,
        alpha_in_compute_dtype: bool,
        normalize_input: bool,
        compute_dtype: torch.dtype | None,
        widen: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.eps = eps
        self.alpha = alpha
        self.alpha_in_compute_dtype = alpha_in_compute_dtype
        self.normalize_input = normalize_input
        self.compute_dtype = compute_dtype
        # A 16-bit layer in a float32/float64 model: its product in float32 on the 16-bit operands, saturated
        # to the 16-bit range (exactly YatGemm's 16-bit semantics), so that every YatGemm node of the model
        # is of one precision class and one ONNX function serves them all.
        self.widen = widen

    def forward(self, x: Tensor) -> Tensor:
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        if self.normalize_input:
            work = x.float() if x.dtype in _SIXTEEN_BIT else x
            work = work / (torch.linalg.vector_norm(work, dim=-1, keepdim=True) + _NMN_NORM_EPS)
            x = work.to(x.dtype)
        alpha = self.alpha
        if self.alpha_in_compute_dtype:
            # nmn casts a learnable alpha to the compute dtype before it upcasts to float32.
            alpha = float(torch.tensor(alpha, dtype=x.dtype))
        if self.widen and x.dtype in _SIXTEEN_BIT:
            y = yat_gemm(x.float(), self.weight.to(x.dtype).float(), self.bias.to(x.dtype).float(), self.eps, alpha)
            return _saturated(y, x.dtype)
        return yat_gemm(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps, alpha)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return (
            f"in_features={in_features}, out_features={out_features}, eps={self.eps:g}, alpha={self.alpha:g}, "
            f"normalize_input={self.normalize_input}"
        )


@dataclass
class FoldedLayer:
    path: str
    in_features: int
    out_features: int
    options: dict[str, object]


@dataclass
class RewriteResult:
    module: nn.Module
    yat_layers: list[FoldedLayer] = field(default_factory=list)
    # Paths of nmn layers that are exported through ordinary ONNX ops (conv, attention, embed).
    decomposed_layers: list[str] = field(default_factory=list)


def is_nmn_layer(module: nn.Module) -> bool:
    return type(module).__module__.startswith("nmn.")


def _finite_scalar(path: str, option: str, value: float) -> float:
    if not math.isfinite(value) or abs(value) > torch.finfo(torch.float32).max:
        raise UnsupportedLayerError(path, option, f"value {value} is not a finite float32 attribute")
    return value


def _check_eps(path: str, eps: float) -> float:
    _finite_scalar(path, "epsilon", eps)
    if not eps > 0:
        raise UnsupportedLayerError(path, "epsilon", f"eps must be > 0, got {eps}")
    return eps


def _fold_alpha(layer: YatNMN | YatEmbed, path: str, options: dict[str, object]) -> tuple[float, bool]:
    """(alpha, whether nmn applies it in the compute dtype) of a YatNMN's or YatEmbed's constant, learnable or
    absent alpha; the option is recorded in `options`."""
    if layer._constant_alpha_value is not None:
        alpha, in_compute_dtype = float(layer._constant_alpha_value), False
        options["alpha"] = f"constant {alpha:g}"
    elif layer.alpha is not None:
        alpha, in_compute_dtype = float(layer.alpha.detach().reshape(-1)[0]), True
        options["alpha"] = f"learnable {alpha:g}"
    else:
        alpha, in_compute_dtype = 1.0, False
        options["alpha"] = "none"
    return _finite_scalar(path, "alpha", alpha), in_compute_dtype


def fold_yatnmn(layer: YatNMN, path: str, model_dtype: torch.dtype | None = None) -> tuple[YatGemmLayer, FoldedLayer]:
    """Fold one YatNMN's options into YatGemm inputs and attributes."""
    if type(layer).forward is not YatNMN.forward:
        raise UnsupportedLayerError(
            path, "forward", f"{type(layer).__qualname__} overrides YatNMN.forward; its math is not known"
        )
    for name in _REQUIRED_STATE:
        if not hasattr(layer, name):
            raise UnsupportedLayerError(
                path, name, "the layer was pickled by an nmn release older than 0.3.3, whose formula differs"
            )
    compute_dtype = layer.dtype
    if compute_dtype is not None and compute_dtype not in {t.torch for t in dtypes.FLOAT_TYPES}:
        raise UnsupportedLayerError(path, "dtype", f"{compute_dtype} is not a floating type YatGemm admits")

    with torch.no_grad():
        weight = layer.weight.detach()
        if layer.tie_kernel_bank:
            weight = weight[layer._kernel_slice]
        fold_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        weight = weight.to(fold_dtype)
        if layer.spherical:
            weight = weight / (torch.linalg.vector_norm(weight, dim=-1, keepdim=True) + _NMN_NORM_EPS)
        if layer.weight_normalized:
            weight = weight / (torch.sqrt(torch.sum(weight**2, dim=-1, keepdim=True)) + _NMN_NORM_EPS)
        out_features, in_features = weight.shape

        options: dict[str, object] = {}
        if layer._constant_bias_value is not None:
            bias = torch.full((out_features,), float(layer._constant_bias_value), dtype=fold_dtype)
            options["bias"] = f"constant {layer._constant_bias_value:g}"
        elif layer.bias is not None:
            bias = layer.bias.detach()
            if layer.softplus_bias:
                bias = F.softplus(bias)
            bias = bias.to(fold_dtype).expand(out_features).clone()
            options["bias"] = ("softplus " if layer.softplus_bias else "") + (
                "scalar" if layer.scalar_bias else "learnable"
            )
        else:
            bias = torch.zeros(out_features, dtype=fold_dtype)
            options["bias"] = "none"

        if layer.learnable_epsilon and layer.epsilon_param is not None:
            eps = float(F.softplus(layer.epsilon_param.detach().to(torch.promote_types(fold_dtype, layer.epsilon_param.dtype))))
            options["eps"] = f"learnable {eps:.6g}"
        else:
            eps = float(layer.epsilon)
            options["eps"] = f"{eps:g}"
        _check_eps(path, eps)
        alpha, alpha_in_compute_dtype = _fold_alpha(layer, path, options)

    for tensor_name, tensor in (("weight", weight), ("bias", bias)):
        if not torch.isfinite(tensor).all():
            raise UnsupportedLayerError(path, tensor_name, "holds NaN or infinite values")
    if layer.spherical:
        options["spherical"] = True
    if layer.weight_normalized:
        options["weight_normalized"] = True
    if compute_dtype is not None:
        options["dtype"] = str(compute_dtype)

    export_layer = YatGemmLayer(
        weight.contiguous(),
        bias.contiguous(),
        eps=eps,
        alpha=alpha,
        alpha_in_compute_dtype=alpha_in_compute_dtype,
        normalize_input=bool(layer.spherical),
        compute_dtype=compute_dtype,
        widen=compute_dtype in _SIXTEEN_BIT and model_dtype not in _SIXTEEN_BIT,
    )
    return export_layer, FoldedLayer(path, in_features, out_features, options)


class YatEmbedLayer(nn.Module):
    """The export form of one nmn YatEmbed: the lookup as it is, and `attend` (the tied LM head) as one
    YatGemm with W = the embedding table and no bias."""

    def __init__(self, embedding: Tensor, head: YatGemmLayer) -> None:
        super().__init__()
        self.register_buffer("embedding", embedding)
        self.head = head

    def forward(self, inputs: Tensor) -> Tensor:
        return F.embedding(inputs, self.embedding)

    def attend(self, query: Tensor) -> Tensor:
        if query.dtype in _SIXTEEN_BIT and self.embedding.dtype not in _SIXTEEN_BIT:
            # nmn computes a 16-bit query against the table as stored (float32), then saturates to the query's
            # dtype; YatGemm in 16-bit would round the table first.
            return _saturated(self.head(query.float()), query.dtype)
        return self.head(query)


class PaddedYatConv(nn.Module):
    """An nmn YatConv with reflect/replicate/circular padding as an explicit pad and the conv without padding:
    nmn's own form writes a Conv whose pads attribute has the wrong length for 2-D and 3-D (ONNX Runtime
    refuses to load it)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.pad = tuple(layer._reversed_padding_repeated_twice)
        self.mode = layer.padding_mode
        self.conv = copy.deepcopy(layer)
        self.conv.padding_mode = "zeros"
        self.conv.padding = (0,) * len(layer.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad, mode=self.mode))


def _padded_conv(module: nn.Module) -> bool:
    return (is_nmn_layer(module) and getattr(module, "padding_mode", "zeros") != "zeros"
            and hasattr(module, "_reversed_padding_repeated_twice") and not getattr(module, "transposed", False))


def fold_yatembed(layer: YatEmbed, path: str) -> tuple[YatEmbedLayer, FoldedLayer]:
    """YatEmbed.attend is y = alpha * (q·E)^2 / (|q - E|^2 + eps) against every row of the table E: YatGemm with
    W = E and B = 0 (spherical: q and E unit-normalised, as YatNMN's spherical mode; weight_normalized
    acts at initialisation only)."""
    if type(layer).attend is not YatEmbed.attend or type(layer).forward is not YatEmbed.forward:
        raise UnsupportedLayerError(path, "attend", f"{type(layer).__qualname__} overrides YatEmbed's methods; "
                                                    "their math is not known")
    with torch.no_grad():
        table = layer.embedding.detach()
        fold_dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
        weight = table.to(fold_dtype)
        if layer.spherical:
            weight = weight / torch.linalg.vector_norm(weight, dim=-1, keepdim=True).clamp(min=_NMN_NORM_EPS)
        options: dict[str, object] = {"head": "attend", "bias": "none", "eps": f"{float(layer.epsilon):g}"}
        eps = _check_eps(path, float(layer.epsilon))
        alpha, alpha_in_compute_dtype = _fold_alpha(layer, path, options)
        if not torch.isfinite(weight).all():
            raise UnsupportedLayerError(path, "embedding", "holds NaN or infinite values")
        if layer.spherical:
            options["spherical"] = True
    out_features, in_features = weight.shape
    head = YatGemmLayer(weight.contiguous(), torch.zeros(out_features, dtype=fold_dtype), eps=eps, alpha=alpha,
                        alpha_in_compute_dtype=alpha_in_compute_dtype, normalize_input=bool(layer.spherical),
                        compute_dtype=None)
    return YatEmbedLayer(table.clone(), head), FoldedLayer(path, in_features, out_features, options)


def rewrite_yat_layers(model: nn.Module, dtype: torch.dtype | None = None) -> RewriteResult:
    """Return a copy of `model` whose YatNMN layers call YatGemm; the input model is left untouched.

    `dtype`: the model's (export) dtype; 16-bit layers inside a float32/float64 model are widened (YatGemmLayer).
    """
    model = copy.deepcopy(model)
    result = RewriteResult(module=model)
    replacements: list[tuple[str, nn.Module]] = []
    for path, sub in model.named_modules():
        if any(path.startswith(done + ".") for done, _ in replacements):
            continue
        if isinstance(sub, YatNMN):
            export_layer, folded = fold_yatnmn(sub, path, dtype)
        elif isinstance(sub, YatEmbed):
            export_layer, folded = fold_yatembed(sub, path)
        else:
            if is_nmn_layer(sub) and not isinstance(sub, (YatGemmLayer, YatEmbedLayer)):
                result.decomposed_layers.append(path)
                if _padded_conv(sub):
                    replacements.append((path, PaddedYatConv(sub)))
            continue
        replacements.append((path, export_layer))
        result.yat_layers.append(folded)
    for path, export_layer in replacements:
        if path == "":
            result.module = export_layer
            continue
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, export_layer)
    return result


@dataclass(frozen=True)
class Rewritten:
    target: object  # what torch.onnx.export is handed: the rewritten module, or a compiled model as loaded
    rewrite: RewriteResult | None  # None for a compiled model
    yat_layers: int  # the Yat products the model computes: the YatGemm nodes a rewritten model's export must have
    notes: tuple[str, ...]


def rewrite_model(loaded: LoadedModel, run: ExampleRun, progress: Progress = QUIET) -> Rewritten:
    reference = run.reference
    if not loaded.layers_are_identifiable:
        yat_layers = count_yat_layers(loaded.module)
        notes = () if not yat_layers else (
            f"{loaded.format} keeps no YatNMN options, so its {yat_layers} YatNMN layer(s) export as ordinary "
            "ONNX ops; save the model with torch.save(model) to get YatGemm nodes",)
        return Rewritten(loaded.program if loaded.program is not None else loaded.module, None, yat_layers, notes)
    with progress.step("rewriting Yat layers to YatGemm"):
        result = rewrite_yat_layers(reference.module, dtypes.by_name(reference.dtype).torch)
    said = []
    unused = [path or "<root>" for path, count in run.calls.items() if count == 0
              and not (isinstance(reference.module.get_submodule(path), YatEmbed))]
    if unused:
        said.append(f"Yat layer(s) {', '.join(unused)} did not run on the example input, so the export has no "
                    "node for them")
    if result.decomposed_layers:
        said.append(decomposed_note(result.decomposed_layers))
    return Rewritten(result.module, result, sum(run.calls.values()), tuple(said))


def decomposed_note(paths: list[str]) -> str:
    return "exported through ordinary ONNX ops (no YatGemm form yet): " + ", ".join(paths)
