"""The fold's API, behind the package's lazy names: `fold` on a copy with its check, broken-statistics refusals."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..compare import RecordedRuns, Tolerance, check_samples
from ..devices import check_not_meta, device_of, model_dtype, moved_to, statistics_kept, to_device
from ..errors import BrokenStatistics, CheckFailed, InputError, broken_layers_text, param, user_code
from ..layout import FoldLayout, attach_layout, layout_of
from ..merging import merge_branches
from .check import compare, eval_copy, ops_left
from .planner import FoldPlan
from .report import FoldReport, default_tolerance
from .surgery import apply_plan, depthwise_to_affine, fold_target_modules
from .torch_plan import (
    broken_functional_statistics,
    broken_statistics,
    keep_what_would_overflow,
    plan_fold,
    unwrap_compiled,
)

__all__ = ["broken_layers_text", "fold"]


def fold(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    samples: int = 0,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    skip: Sequence[str] = (),
    check: bool = True,
    plan: FoldPlan | None = None,
    device: str | torch.device | None = None,
    merge: bool = True,
    reference_runs: RecordedRuns | None = None,
) -> tuple[nn.Module, FoldReport]:
    """Fold every BatchNorm of `model` into the conv/linear next to it, on a copy, and check the result.

    Each BN is folded into the layer that feeds it, else into the one it feeds, else replaced by an exact
    per-channel affine (ChannelAffine), else left as it is; the report says which and why. Folding is computed
    in float64 and cast once to each layer's dtype.

    Args:
        model: the model; BNs in training mode inside an eval-mode model are left as they are.
        example_inputs: one tensor or a sequence of the model's positional inputs; one forward on them
            traces who feeds each BN.
        samples: random inputs of the example's shapes checked besides the example.
        seed: seed of the random inputs.
        rtol, atol: the check's tolerance, elementwise |Δ| ≤ atol + rtol·|original| (bntool.compare.Tolerance);
            by default rtol 0 and atol a share of each output's largest magnitude by dtype (1e-4 for float32);
            an atol given here is absolute.
        skip: BN names or glob patterns to leave as they are.
        check: raise CheckFailed when the folded outputs differ beyond tolerance.
        plan: the decisions to apply, from `plan_fold(model, example_inputs)` (possibly edited); by default
            `plan_fold(model, example_inputs, skip=skip)`.
        device: run the trace and the check on this device ("cpu", "cuda", "cuda:1", "mps"); the inputs are
            moved there. Default: where the model is, inputs as given.
        merge: after folding, merge linear branches that read one tensor and are summed (RepVGG, MobileOne,
            ACNet, DBB blocks) into one conv/linear where exact (bntool.merging); the report lists each sum.
        reference_runs: where the check's runs of `model` are kept (bntool.compare.RecordedRuns), for a later
            check on the same inputs to reuse (verify's ONNX check).

    Returns:
        (folded, report): the folded copy in eval mode on the device `model` was on, carrying its FoldLayout
        (saved with it by save_checkpoint / state_dict_of), and a FoldReport.

    Raises:
        CheckFailed: with `check`, the folded model differs beyond tolerance (`.report` is the FoldReport).
        InputError: a tolerance is negative or not finite, `model` is a TorchScript module, `device` is not
            available, or a BN not skipped (a module, or an F.batch_norm call on the model's own tensors) has
            NaN/Inf statistics or affine, or running_var + eps ≤ 0 (the
            checkpoint is broken: recalibrate first, or skip those layers).

    A `torch.compile`d model is folded through the module it wraps (`_orig_mod`; a note says so): the result
    is that module folded, in eager mode. Values the fold writes that its dtype holds only as subnormals (slow
    on many CPU paths) become zero, counted in `report.subnormals_flushed`, unless the check fails that way.

    Side effects: none on `model` (its training flags, and with `device` its placement, are restored after the
    check); the copy doubles its memory, and the float64 reference of the check doubles it again where it is
    needed.
    """
    check_not_meta(model)
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    check_samples(samples)
    model, notes = unwrap_compiled(model)
    tolerance = Tolerance.resolve(rtol, atol, default_tolerance(model_dtype(model)))  # before any work
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("a TorchScript module cannot be folded: fold the eager model, then script the result")
    if not isinstance(skip, str):
        _refuse_broken_statistics(model, skip)
    home = device_of(model)
    with moved_to(model, device) as dev, statistics_kept(model):  # the check runs a BN left in training mode
        inputs = to_device(inputs, dev) if device is not None else inputs
        if plan is None:  # once, on the original: the flush retry below applies the same decisions
            plan = plan_fold(model, inputs, skip=skip)
        _refuse_broken_statistics(model, skip, plan)
        runs = reference_runs if reference_runs is not None else RecordedRuns()  # a retry reuses the first check's
        folded, report = _fold_and_check(model, inputs, samples, seed, tolerance, skip, plan, flush=True,
                                         merge=merge, runs=runs)
        if not report.passed and report.subnormals_flushed:  # the flush made the difference: keep them
            folded, report = _fold_and_check(model, inputs, samples, seed, tolerance, skip, plan, flush=False,
                                             merge=merge, runs=runs)
            report.notes.append("subnormal values were kept: the check failed with them flushed to zero")
    report.notes = list(dict.fromkeys(notes + report.notes))
    if device is not None:
        folded.to(home)  # the result where the model was, as recalibrate leaves it
    if check and not report.passed:
        raise CheckFailed(
            f"folded model differs from the original: max abs error {report.max_abs:.3g} "
            f"({report.max_abs_over_scale:.3g} of the output's magnitude) exceeds {report.tolerance.describe()}"
            + (f" ({report.first_note})" if report.first_note else ""), report=report)
    return folded, report


def _refuse_broken_statistics(model: nn.Module, skip: Sequence[str], plan: FoldPlan | None = None) -> None:
    """NaN/Inf or negative running_var: the checkpoint is broken, not the fold (exit 2 before any work).
    BN modules are read directly; with a plan, also the model's tensors its F.batch_norm calls read."""
    broken = broken_statistics(model, skip) if plan is None else broken_functional_statistics(model, plan, skip)
    if not broken:
        return
    raise BrokenStatistics(f"{broken_layers_text(broken)}: these statistics cannot be folded. Run `bntool "
                           f"recalibrate` first, or leave them as they are with {param('skip')}", broken, param="skip")


def _fold_and_check(model, inputs, samples, seed, tolerance, skip, plan, flush: bool, merge: bool = True,
                    runs: RecordedRuns | None = None) -> tuple[nn.Module, FoldReport]:
    """fold() on the model and inputs where they are: the folded copy and its report (passed or not).
    `flush`: the subnormals the fold writes become zero. `merge`: then summed linear branches become one layer."""
    started = time.perf_counter()
    with user_code("copying the model (copy.deepcopy)"):
        folded, by_request = eval_copy(model)
    with statistics_kept(folded):  # a BN left in training mode in the copy: its statistics as given
        if plan is None:
            plan = plan_fold(folded, inputs, skip=skip)
        keep_what_would_overflow(folded, plan)
        report = FoldReport(batch_norm_ops_before=plan.batch_norm_ops, params_before=plan.params,
                            decisions=plan.decisions, opaque=plan.opaque, notes=list(plan.notes))
        targets = fold_target_modules(folded, plan)
        applied = apply_plan(folded, plan, flush_subnormals=flush)
        report.layout, report.subnormals_flushed = applied.layout, applied.subnormals_flushed
        if merge:
            with user_code("the folded model's forward (finding branches to merge)"):
                records, report.merges = merge_branches(folded, inputs)
            report.layout.merges = [r.to_json() for r in records]
        report.layout.depthwise_affine = depthwise_to_affine(folded, targets)  # after merging: they may merge
        if report.layout.depthwise_affine:
            report.notes.append(f"{len(report.layout.depthwise_affine)} depthwise 1×1 conv(s) with a BN folded in "
                                "became a per-channel x·w + b (DepthwiseAffine): the same numbers, faster on CPU")
        attach_layout(folded, (layout_of(model) or FoldLayout()).merged(report.layout))
        report.ops_left = ops_left(plan)
        report.fold_seconds = time.perf_counter() - started
        report.params_after = sum(p.numel() for p in folded.parameters())

        started = time.perf_counter()
        report.tolerance = tolerance
        report.batch_norm_ops_after = compare(model, folded, inputs, samples, seed, by_request, report, runs)
        report.passed = all(c.passed for c in report.comparisons)
        report.check_seconds = time.perf_counter() - started
    return folded, report
