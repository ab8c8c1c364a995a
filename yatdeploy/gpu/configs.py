"""The YatGemm kernel's tile configurations, and the choice of one by problem shape.

These are starting points chosen on paper (tensor-core tile shapes that fit sm_80's shared memory in
every dtype); they have not been tuned on a GPU yet. The AOT build compiles every one of them, and the
TensorRT plugin offers them as tactics. The choice is a table of rules (CHOICE_RULES) so that the ONNX
Runtime host (custom_ops/, C++) runs the same rule: the build generates its copy from this table.

Imports no torch: the package build runs the AOT compile where torch is absent (common.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from yatdeploy.gpu.common import dtype_name


@dataclass(frozen=True)
class TileConfig:
    name: str
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # K is cut into this many slices, each reduced by its own programs; a second kernel sums the
    # partial dot products and |x|² before the epilogue. 1: one pass, the epilogue in the GEMM kernel.
    split_k: int = 1
    # Output tiles are visited in groups of this many tile rows so that consecutive programs share W
    # tiles in L2.
    group_m: int = 8

    @property
    def threads_per_block(self) -> int:
        return 32 * self.num_warps

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


LARGE_16BIT = TileConfig("large_16bit", block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
LARGE_FLOAT32 = TileConfig("large_float32", block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3)
MEDIUM_M = TileConfig("medium_m", block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=4)
# Decode-like M (1..16): one 16-row MMA tile, narrow in N so that enough programs stream W.
SMALL_M = TileConfig("small_m", block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4)
SMALL_M_SPLIT_K = TileConfig(
    "small_m_split_k", block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=4, split_k=4
)

TILE_CONFIGS: dict[str, TileConfig] = {
    c.name: c for c in (LARGE_16BIT, LARGE_FLOAT32, MEDIUM_M, SMALL_M, SMALL_M_SPLIT_K)
}

# An H100 SXM has 132 SMs: a small-M problem with fewer output tiles than this leaves SMs idle
# unless K is split.
_SPLIT_K_BELOW_TILES = 132
# Each split must still loop over a few K tiles, or the partial sums cost more than they save.
_MIN_K_TILES_PER_SPLIT = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ChoiceRule:
    """One rule of choose_config: `config` applies when every condition that is set holds."""

    config: str  # a TILE_CONFIGS name
    max_m: int | None = None  # m <= max_m
    max_n_tiles: int | None = None  # cdiv(n, the config's block_n) <= max_n_tiles
    min_k: int | None = None  # k >= min_k
    dtype: str | None = None  # the operands' dtype, by name

    def holds(self, m: int, n: int, k: int, dtype: str) -> bool:
        return (
            (self.max_m is None or m <= self.max_m)
            and (self.max_n_tiles is None or cdiv(n, TILE_CONFIGS[self.config].block_n) <= self.max_n_tiles)
            and (self.min_k is None or k >= self.min_k)
            and (self.dtype is None or dtype == self.dtype)
        )


# choose_config takes the first rule that holds; the last holds always.
CHOICE_RULES: tuple[ChoiceRule, ...] = (
    # Decode-like M with fewer output tiles than SMs, and K long enough that each slice still loops
    # over a few K tiles: split K.
    ChoiceRule(
        SMALL_M_SPLIT_K.name, max_m=SMALL_M_SPLIT_K.block_m, max_n_tiles=_SPLIT_K_BELOW_TILES - 1,
        min_k=SMALL_M_SPLIT_K.split_k * SMALL_M_SPLIT_K.block_k * _MIN_K_TILES_PER_SPLIT,
    ),
    ChoiceRule(SMALL_M.name, max_m=SMALL_M.block_m),
    ChoiceRule(MEDIUM_M.name, max_m=MEDIUM_M.block_m),
    ChoiceRule(LARGE_FLOAT32.name, dtype="float32"),
    ChoiceRule(LARGE_16BIT.name),
)
assert CHOICE_RULES[-1] == ChoiceRule(CHOICE_RULES[-1].config), "the last rule must hold always"


def choose_config(m: int, n: int, k: int, dtype: object) -> TileConfig:
    """The tile configuration for an [m, k] x [n, k]ᵀ YatGemm in `dtype` (a name or a torch.dtype)."""
    name = dtype_name(dtype)
    return TILE_CONFIGS[next(rule.config for rule in CHOICE_RULES if rule.holds(m, n, k, name))]


def split_k_slices(k: int, config: TileConfig) -> tuple[int, int]:
    """(slice count, K elements per slice) for a split-K launch; each slice is a whole number of K tiles."""
    k_tiles = max(cdiv(k, config.block_k), 1)
    tiles_per_slice = cdiv(k_tiles, config.split_k)
    k_per_slice = tiles_per_slice * config.block_k
    return cdiv(k_tiles, tiles_per_slice), k_per_slice
