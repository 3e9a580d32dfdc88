"""The fold check: folded against original outputs on the example and random inputs, with the float64
original as arbiter where float32 rounding is in question (the FoldReport that carries it: report.py)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..compare import (
    Comparison,
    Float64Reference,
    RecordedRuns,
    Tolerance,
    combine,
    compare_outputs,
    random_like,
    random_stream,
)
from ..graph import OPAQUE, Dataflow, trace
from ..layers import bn_modules, is_frozen_bn
from .planner import FOLDED, REFUSED, FoldPlan
from .report import FoldReport


def ops_left(plan: FoldPlan) -> list[str]:
    """Every batch_norm call the folded model still makes, with why."""
    left = []
    for step in plan.steps:
        d = step.decision
        if step.functional is not None:
            state = ("now computes the identity (its statistics were rewritten); the call itself stays in "
                     "its owner's forward" if d.action == FOLDED else d.reason)
            left.append(f"F.batch_norm of {d.name!r}: {state}")
        elif d.action == REFUSED:
            left.append(f"{d.name}: {d.reason}")
    return left + plan.unaccounted_ops


def eval_copy(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """A deep copy in eval mode, except BNs the user left in training mode inside an eval model."""
    by_request = {n for n, m in bn_modules(model) if m.training and not model.training}
    copied = copy.deepcopy(model).eval()
    for name, m in copied.named_modules():
        if name in by_request:
            m.training = True  # the BN only, not a subclass's own dropout/drop-path children
    return copied, by_request


def norm_op_count(flow: Dataflow, model: nn.Module) -> int:
    """batch_norm ops per forward; a TorchScript submodule counts one per BN inside it per call (not traced)."""
    frozen = sum(len(flow.calls_of(m)) for m in model.modules() if is_frozen_bn(m))
    opaque = sum(sum(op.module is m for op in flow.ops if op.name == OPAQUE) * len(bn_modules(m))
                 for m in flow.opaque)
    return flow.count("batch_norm") + frozen + opaque


def compare(model, folded, inputs, samples, seed, by_request, report: FoldReport,
            runs: RecordedRuns | None = None) -> int:
    """Fill report.comparisons; return the batch_norm op count of the folded model. The original's outputs are
    kept in (or reused from) `runs`."""
    if by_request:
        reference = eval_copy(model)[0]
        flags = None
    else:
        reference, flags = model, [m.training for m in model.modules()]
        model.eval()
    float64 = Float64Reference(reference)
    runs = runs if runs is not None else RecordedRuns()
    try:
        flow, out = trace(folded, inputs)
        with torch.no_grad():
            cases = [("example", inputs, runs(reference, inputs), out)]
            g = random_stream(seed)
            for i in range(samples):
                x = random_like(inputs, g)
                cases.append((f"random #{i + 1}", x, runs(reference, x), folded(*x)))
            for label, x, ref_out, folded_out in cases:
                report.comparisons.append(check_case(label, x, ref_out, folded_out, float64, report.tolerance))
    finally:
        if flags is not None:
            for m, training in zip(model.modules(), flags):
                m.training = training
    return norm_op_count(flow, folded)


def check_case(label, x, ref_out, folded_out, float64: Float64Reference, tolerance: Tolerance) -> Comparison:
    """Folded vs original on one input; over tolerance (but finite), the float64 original arbitrates."""
    c = combine(compare_outputs(label, ref_out, folded_out, tolerance))
    if not c.passed and math.isfinite(c.max_abs):
        exact = float64(x)
        exact_only = Tolerance(0.0, 0.0, atol_relative=False)
        c.float64_error_original = combine(compare_outputs(label, exact, ref_out, exact_only)).max_abs
        c.float64_error_candidate = combine(compare_outputs(label, exact, folded_out, exact_only)).max_abs
        # 1% of the tolerance as slack: where the original is exact in float64, the fold may round once.
        c.passed = c.float64_error_candidate <= 1.5 * c.float64_error_original + 0.01 * c.threshold
    return c
