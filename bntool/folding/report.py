"""The fold's report (FoldReport) and its default tolerance: records only, no torch, so the ONNX fold reports in the
PyTorch path's shape without importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..compare import ComparedReport, Comparison, Tolerance
from ..layout import FoldLayout, MergeDecision
from .planner import AFFINE, FOLDED, FOLDED_FORWARD, REFUSED, BNDecision


def default_tolerance(dtype: Any) -> Tolerance:
    """|Δ| ≤ a share of each output's largest magnitude, by dtype (a torch or numpy dtype, or its name): rounding
    changes when ops are merged."""
    name = str(dtype).removeprefix("torch.")
    if name == "float64":
        return Tolerance(rtol=0.0, atol=1e-9)
    if name in ("float16", "bfloat16"):
        return Tolerance(rtol=0.0, atol=5e-2)
    return Tolerance(rtol=0.0, atol=1e-4)


@dataclass
class FoldReport(ComparedReport):
    """What `fold` did to each BN, and the check of folded against original outputs.

    Each comparison is folded vs original outputs on one input. Where they differ by more than the tolerance,
    both are also compared with the original run in float64: folding passes if it is no less accurate than
    the original (≤ 1.5× its float32 error), since deep networks differ from themselves under reordering."""

    decisions: list[BNDecision] = field(default_factory=list)
    batch_norm_ops_before: int = 0
    batch_norm_ops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    comparisons: list[Comparison] = field(default_factory=list)
    tolerance: Tolerance = field(default_factory=lambda: default_tolerance("float32"))
    passed: bool = True
    fold_seconds: float = 0.0
    check_seconds: float = 0.0
    layout: FoldLayout = field(default_factory=FoldLayout)
    opaque: list[str] = field(default_factory=list)  # TorchScript submodules run as they are
    ops_left: list[str] = field(default_factory=list)  # batch_norm calls the folded model still makes, and why
    # Values the fold wrote that float32/16/bf16 holds only as subnormals (slow on many CPUs), set to 0.
    subnormals_flushed: int = 0
    notes: list[str] = field(default_factory=list)  # about the model as a whole (a compiled model unwrapped)
    merges: list[MergeDecision] = field(default_factory=list)  # summed branches merged into one layer, or not

    def count(self, action: str) -> int:
        return sum(d.action == action for d in self.decisions)

    @property
    def counts(self) -> dict[str, int]:
        """BNs per action: {"folded": 6, "folded-forward": 0, "affine": 1, "refused": 0}."""
        return {getattr(a, "value", a): self.count(a) for a in (FOLDED, FOLDED_FORWARD, AFFINE, REFUSED)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = self.tolerance.to_dict()
        d["counts"] = self.counts
        d.update(self.summary_figures())
        return d
