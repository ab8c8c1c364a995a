"""What a fusion did: per pattern how many Yat products became YatGemm nodes, what was left decomposed and why,
and the check of the fused model against the unfused one (`FusionReport`, printed by `yatdeploy fuse`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LeftDecomposed:
    """A subgraph a pattern matched in shape but whose conditions failed: it stays as ordinary ops."""

    pattern: str
    node: str  # the node the pattern ends at (the Div of the product, the Mul of a scale)
    reason: str


@dataclass(frozen=True)
class FusionCheck:
    """The fused model against the unfused one on random inputs, in plain ONNX Runtime (docs/fusion.md#the-check)."""

    cases: int
    max_abs_diff: float
    bound: float  # the largest difference allowed (the worst output's, where the bound is per output)
    worst_output: str
    passed: bool


@dataclass
class FusionReport:
    fused: dict[str, int] = field(default_factory=dict)  # pattern -> Yat products (or scales) fused by it
    left: list[LeftDecomposed] = field(default_factory=list)
    yat_gemm_nodes: int = 0  # in the fused model, those it had before included
    nodes_before: int = 0
    nodes_after: int = 0
    check: FusionCheck | None = None  # None: nothing was fused, so the model is unchanged

    @property
    def total(self) -> int:
        """Yat products turned into YatGemm nodes (scales folded into one are not counted again)."""
        return sum(count for name, count in self.fused.items() if name != "yat_scale")

    def as_json(self) -> dict:
        data = asdict(self)
        data["total"] = self.total
        return data


def format_report(report: FusionReport) -> str:
    lines = [f"fused {report.total} Yat product(s) into YatGemm: {report.nodes_before} → {report.nodes_after} nodes, "
             f"{report.yat_gemm_nodes} YatGemm node(s) in the model"]
    for name, count in report.fused.items():
        lines.append(f"  {name:<22} {count}")
    if report.left:
        lines.append(f"left decomposed: {len(report.left)}")
        lines += [f"  {item.pattern} at '{item.node}': {item.reason}" for item in report.left]
    if report.check is None:
        lines.append("nothing fused: the model is unchanged")
    else:
        check = report.check
        lines.append(f"check against the unfused model ({check.cases} random cases, ONNX Runtime): "
                     f"max |fused − unfused| {check.max_abs_diff:.3g} ≤ {check.bound:.3g} "
                     f"(worst output '{check.worst_output}'): {'passed' if check.passed else 'FAILED'}")
    return "\n".join(lines)
