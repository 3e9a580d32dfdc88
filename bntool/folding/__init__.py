"""Fold BatchNorm into the conv/linear that feeds it (or that it feeds), from the model's real dataflow.

The package, top to bottom (imports point down):
    __init__.py     the public API, each name imported on first use: importing the package (or its torch-free
                    planner and math, as the ONNX path does) imports no torch
    api.py          fold (on a copy, with its check), the broken-statistics refusals
    torch_plan.py   a PyTorch model's fold decisions (plan_fold): BN modules, functional calls, target dtypes
    check.py        the fold check (folded vs original, float64 arbiter)
    surgery.py      applies a plan to a module, casting once
    torch_graph.py  a traced forward as the planner's graph (TorchGraph)
    report.py       FoldReport and the default tolerance: records, no torch (the ONNX fold reports in them)
    planner.py      the rules against an abstract graph (FoldGraph), shared with the ONNX path
    math.py         pure float64 fold math on tensors (BN → scale/shift, producer, consumer, affine, ranges)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what editors and type checkers see; at run time each name is imported on first use
    from .api import broken_layers_text, fold
    from .math import fold_value_range
    from .planner import (
        AFFINE,
        FOLDED,
        FOLDED_FORWARD,
        MAX_FORWARD_FOLD_MEAN,
        REFUSED,
        BNDecision,
        FoldGraph,
        FoldPlan,
        FoldStep,
        FoldTarget,
        FunctionalBN,
        OpKind,
        check_skip_patterns,
    )
    from .report import FoldReport, default_tolerance
    from .surgery import apply_fold_plan
    from .torch_plan import mean_in_stds, plan_fold

_EXPORTS = {
    **dict.fromkeys(["fold", "broken_layers_text"], "api"),
    **dict.fromkeys(["FoldReport", "default_tolerance"], "report"),
    "fold_value_range": "math",
    **dict.fromkeys(["AFFINE", "FOLDED", "FOLDED_FORWARD", "MAX_FORWARD_FOLD_MEAN", "REFUSED", "BNDecision",
                     "FoldGraph", "FoldPlan", "FoldStep", "FoldTarget", "FunctionalBN", "OpKind",
                     "check_skip_patterns"], "planner"),
    "apply_fold_plan": "surgery",
    **dict.fromkeys(["mean_in_stds", "plan_fold"], "torch_plan"),
}

__all__ = [
    "AFFINE", "FOLDED", "FOLDED_FORWARD", "MAX_FORWARD_FOLD_MEAN", "REFUSED", "BNDecision", "FoldGraph", "FoldPlan",
    "FoldReport", "FoldStep", "FoldTarget", "FunctionalBN", "OpKind", "apply_fold_plan", "broken_layers_text",
    "check_skip_patterns", "default_tolerance", "fold", "fold_value_range", "mean_in_stds", "plan_fold",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


assert set(__all__) == set(_EXPORTS)
