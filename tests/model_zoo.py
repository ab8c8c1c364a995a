"""Small models the tests build, save and export; importable for --arch (tests.model_zoo:NAME)."""

from __future__ import annotations

import torch
from nmn.torch import MultiHeadYatAttention, YatEmbed, YatNMN
from torch import nn

# One entry per YatNMN option yatdeploy folds; values are constructor keyword arguments.
YATNMN_OPTIONS: dict[str, dict] = {
    "default": {},
    "no_alpha": {"alpha": False},
    "constant_alpha_sqrt2": {"constant_alpha": True},
    "constant_alpha_value": {"constant_alpha": 2.5},
    "epsilon_1e-3": {"epsilon": 1e-3},
    "learnable_epsilon": {"learnable_epsilon": True, "epsilon": 1e-2},
    "no_bias": {"bias": False},
    "softplus_bias": {"softplus_bias": True},
    "constant_bias": {"constant_bias": 0.25},
    "scalar_bias": {"scalar_bias": True},
    "weight_normalized": {"weight_normalized": True},
    "spherical": {"spherical": True},
    "spherical_weight_normalized": {"spherical": True, "weight_normalized": True},
    "lazy": {"lazy": True},
    "compute_dtype_float64": {"dtype": torch.float64},
}


def perturb(module: nn.Module, seed: int = 0) -> nn.Module:
    """Move alpha, bias and the learnable eps away from their initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "alpha":
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
            elif leaf == "epsilon_param":
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
            elif leaf == "bias":
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return module


def yat_mlp(options: dict | None = None, in_features: int = 16, hidden: int = 12, out_features: int = 5) -> nn.Module:
    """YatNMN → LayerNorm → YatNMN → Linear, with `options` on both Yat layers."""
    options = options or {}
    torch.manual_seed(0)
    model = nn.Sequential(
        YatNMN(in_features, hidden, **options),
        nn.LayerNorm(hidden),
        YatNMN(hidden, hidden, **options),
        nn.Linear(hidden, out_features),
    )
    if options.get("dtype") is not None:
        # A YatNMN with a compute dtype outputs that dtype; the ordinary layers after it must take it.
        model[1].to(options["dtype"])
        model[3].to(options["dtype"])
    return perturb(model).eval()


def build_mlp() -> nn.Module:
    """The --arch entry point for yat_mlp's default architecture (weights come from the state_dict)."""
    return yat_mlp()


def build_wrong_mlp() -> nn.Module:
    """An architecture that does not fit yat_mlp's state_dict (other hidden width, one layer more)."""
    model = yat_mlp(hidden=10)
    model.append(nn.ReLU())
    model.append(nn.Linear(5, 3))
    return model


class CustomNet(nn.Module):
    """A user-defined module class: not on the unpickling allowlist."""

    def __init__(self) -> None:
        super().__init__()
        self.yat = YatNMN(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.yat(x) * 2


class PatchedYat(YatNMN):
    """A YatNMN subclass whose forward differs: its math can't be folded into YatGemm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class TwoInputs(nn.Module):
    """Float features and int64 token ids in, a dict out: {"logits", "features"}."""

    def __init__(self, vocabulary: int = 50, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.yat = YatNMN(width, 8)
        self.head = YatNMN(8, 4)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.yat(self.embed(ids).mean(dim=1) + x)
        return {"logits": self.head(features), "features": features}


class TokenTagger(nn.Module):
    """int64 ids [batch, seq] -> per-token logits [batch, seq, vocabulary]: every dim but the last is dynamic."""

    def __init__(self, vocabulary: int = 30, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.yat = YatNMN(width, width)
        self.out = nn.Linear(width, vocabulary)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.yat(self.embed(ids)))


def build_two_inputs() -> nn.Module:
    torch.manual_seed(0)
    return perturb(TwoInputs()).eval()


def build_token_tagger() -> nn.Module:
    torch.manual_seed(0)
    return perturb(TokenTagger()).eval()


def build_tiny_lm() -> nn.Module:
    """yatdeploy's LM demo architecture (YatEmbed + positions, causal MultiHeadYatAttention, YatNMN, the attend
    head) untrained, for 40 symbols, width 32, 4 heads, 64 positions."""
    from yatdeploy.demo_lm import CharYatLM

    torch.manual_seed(0)
    return perturb(CharYatLM(40, width=32, heads=4, context=64)).eval()


class ReusedAndUnused(nn.Module):
    """One YatNMN called twice, one never called: the export has a node per call."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = YatNMN(8, 8)
        self.spare = YatNMN(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x))


def build_reused_and_unused() -> nn.Module:
    torch.manual_seed(0)
    return perturb(ReusedAndUnused()).eval()


class YatGPTBlock(nn.Module):
    """LayerNorm → causal MultiHeadYatAttention → residual → LayerNorm → YatNMN (or a Linear MLP) → residual."""

    def __init__(self, width: int, heads: int, linear_mlp: bool = False, **attention) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = MultiHeadYatAttention(width, heads, **attention)
        self.mlp = (nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)) if linear_mlp
                    else YatNMN(width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class YatGPT(nn.Module):
    """A small Yat GPT as nmn's examples write one: YatEmbed tokens + nn.Embedding positions over arange (or none),
    blocks of causal attention (mask tril) and YatNMN, a final LayerNorm and the tied `tok.attend` head.
    `attention`: MultiHeadYatAttention's options (spherical, normalize_qk, constant_alpha, bias, ...); `tokens`
    "embedding": an nn.Embedding (then `head` must not be "attend"); `head` "linear" or "yatnmn": an untied head."""

    def __init__(self, vocabulary: int = 53, width: int = 32, heads: int = 4, layers: int = 2, context: int = 40,
                 positions: bool = True, linear_mlp: bool = False, tokens: str = "yat", head: str = "attend",
                 **attention) -> None:
        super().__init__()
        self.tok = YatEmbed(vocabulary, width) if tokens == "yat" else nn.Embedding(vocabulary, width)
        self.pos = nn.Embedding(context, width) if positions else None
        self.blocks = nn.ModuleList(YatGPTBlock(width, heads, linear_mlp, **attention) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = {"attend": None, "linear": nn.Linear(width, vocabulary), "yatnmn": YatNMN(width, vocabulary)}[head]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.tok(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(length, device=ids.device))
        mask = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()[None, None]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        return self.tok.attend(x) if self.head is None else self.head(x)


def yat_gpt(**options) -> nn.Module:
    """A YatGPT with `options` (YatGPT's and MultiHeadYatAttention's keywords), seeded, alpha and biases moved
    off their initial values as training would."""
    torch.manual_seed(0)
    return perturb(YatGPT(**options)).eval()


def build_yat_gpt() -> nn.Module:
    """The --arch entry point for yat_gpt's default architecture (weights come from the state_dict)."""
    return yat_gpt()
