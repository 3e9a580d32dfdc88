"""Fold BatchNorm into the conv/linear that feeds it (or that it feeds), from the model's real dataflow.

The fold of an eval-mode BN y = (x - μ)·γ/√(σ²+ε) + β = x·s + t into the layer that produces x:
    W'[o] = W[o]·s[o]        b'[o] = b[o]·s[o] + t[o]
and into a layer that consumes y (no zero padding in between, so every input element is a BN output):
    W'[:, i] = W[:, i]·s[i]  b' = b + Σ_i,k W[:, i, k]·t[i]
Both are computed in float64 and cast once to the layer's dtype. Anything else becomes ChannelAffine.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .choices import FoldAction
from .compare import (
    ComparedReport,
    Comparison,
    Float64Reference,
    Tolerance,
    check_samples,
    combine,
    compare_outputs,
    random_like,
    random_stream,
)
from .devices import as_float64, device_of, moved_to, to_device
from .errors import CheckFailed, InputError, param, user_code
from .graph import LAYER_OPS, OPAQUE, Dataflow, OpCall, channel_map, channel_probe, is_eval_identity, replay, trace
from .layers import (
    ChannelAffine,
    FoldedNormAct,
    affine_from,
    affine_of,
    bn_eps,
    bn_modules,
    bn_num_features,
    bn_type_name,
    has_standard_forward,
    is_bn,
    is_frozen_bn,
    make_custom_bn_folded,
    norm_act_parts,
)
from .layout import FoldLayout, attach_layout, layout_of, named_module, replace_module
from .merging import MergeDecision, merge_branches

STANDARD_CONSUMERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Folding forward computes W·s·x + W·t instead of W·((x - μ)·s): rounding grows with |μ|/σ when x is exact
# (a model input). Past this, an affine that subtracts μ first is used instead.
MAX_FORWARD_FOLD_MEAN = 4.0

# What a BN became (see FoldAction).
FOLDED = FoldAction.FOLDED
FOLDED_FORWARD = FoldAction.FOLDED_FORWARD
AFFINE = FoldAction.AFFINE
REFUSED = FoldAction.REFUSED


@dataclass
class BNDecision:
    name: str
    type: str
    channels: int
    action: FoldAction
    target: str | None = None  # the conv/linear it was folded into (several, comma-separated, across add/cat)
    reason: str = ""
    replaced_by: str = ""  # Identity, ChannelAffine, FoldedNormAct, intercepted forward (unknown BN subclasses)


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
    tolerance: Tolerance = field(default_factory=lambda: default_tolerance(torch.float32))
    passed: bool = True
    fold_seconds: float = 0.0
    check_seconds: float = 0.0
    layout: FoldLayout = field(default_factory=FoldLayout)
    opaque: list[str] = field(default_factory=list)  # TorchScript submodules run as they are
    ops_left: list[str] = field(default_factory=list)  # batch_norm calls the folded model still makes, and why
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


def default_tolerance(dtype: torch.dtype) -> Tolerance:
    """|Δ| ≤ a share of each output's largest magnitude, by dtype: rounding changes when ops are merged."""
    if dtype == torch.float64:
        return Tolerance(rtol=0.0, atol=1e-9)
    if dtype in (torch.float16, torch.bfloat16):
        return Tolerance(rtol=0.0, atol=5e-2)
    return Tolerance(rtol=0.0, atol=1e-4)


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


# ---------------------------------------------------------------- public API


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

    Returns:
        (folded, report): the folded copy in eval mode on the device `model` was on, carrying its FoldLayout
        (saved with it by save_checkpoint / state_dict_of), and a FoldReport.

    Raises:
        CheckFailed: with `check`, the folded model differs beyond tolerance (`.report` is the FoldReport).
        InputError: a tolerance is negative or not finite, `model` is a TorchScript module, or `device` is not
            available.

    Side effects: none on `model` (its training flags, and with `device` its placement, are restored after the
    check); the copy doubles its memory, and the float64 reference of the check doubles it again where it is
    needed.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    check_samples(samples)
    tolerance = Tolerance.resolve(rtol, atol, default_tolerance(model_dtype(model)))  # before any work
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("a TorchScript module cannot be folded: fold the eager model, then script the result")
    home = device_of(model)
    with moved_to(model, device) as dev:
        inputs = to_device(inputs, dev) if device is not None else inputs
        folded, report = _fold_and_check(model, inputs, samples, seed, tolerance, skip, plan, merge)
    if device is not None:
        folded.to(home)  # the result where the model was, as recalibrate leaves it
    if check and not report.passed:
        raise CheckFailed(
            f"folded model differs from the original: max abs error {report.max_abs:.3g} "
            f"({report.max_abs_over_scale:.3g} of the output's magnitude) exceeds {report.tolerance.describe()}"
            + (f" ({report.first_note})" if report.first_note else ""), report=report)
    return folded, report


def _fold_and_check(model, inputs, samples, seed, tolerance, skip, plan, merge=True) -> tuple[nn.Module, FoldReport]:
    """fold() on the model and inputs where they are: the folded copy and its report (passed or not)."""
    started = time.perf_counter()
    with user_code("copying the model (copy.deepcopy)"):
        folded, by_request = _eval_copy(model)
    if plan is None:
        plan = plan_fold(folded, inputs, skip=skip)
    _keep_what_would_overflow(folded, plan)
    report = FoldReport(batch_norm_ops_before=plan.batch_norm_ops, params_before=plan.params,
                        decisions=plan.decisions, opaque=plan.opaque)
    report.layout = apply_fold_plan(folded, plan)
    if merge:
        with user_code("the folded model's forward (finding branches to merge)"):
            records, report.merges = merge_branches(folded, inputs)
        report.layout.merges = [r.to_json() for r in records]
    attach_layout(folded, (layout_of(model) or FoldLayout()).merged(report.layout))
    report.ops_left = _ops_left(plan)
    report.fold_seconds = time.perf_counter() - started
    report.params_after = sum(p.numel() for p in folded.parameters())

    started = time.perf_counter()
    report.tolerance = tolerance
    report.batch_norm_ops_after = _compare(model, folded, inputs, samples, seed, by_request, report)
    report.passed = all(c.passed for c in report.comparisons)
    report.check_seconds = time.perf_counter() - started
    return folded, report


def _ops_left(plan: FoldPlan) -> list[str]:
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


def check_skip_patterns(skip: Sequence[str], names: Sequence[str]) -> None:
    """Every skip pattern must name at least one BN: a typo would otherwise fold the layer it meant to keep."""
    if isinstance(skip, str):
        raise InputError(f"{param('skip')} {skip!r}: give a list of patterns, not one string", param="skip")
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(names[:6]) + (f", … {len(names) - 6} more" if len(names) > 6 else "")
        raise InputError(f"{param('skip')} {unmatched[0]!r}: matches no BatchNorm layer (they are: "
                         f"{shown or 'none'})", param="skip")


# ---------------------------------------------------------------- decisions


@dataclass
class FoldTarget:
    """One conv/linear a BN folds into. `channels[c]` is the BN channel of the layer's channel c (its output
    channel when folded into a producer, its input channel when folded forward); `shift[c]` says whether that
    channel takes the BN's shift (the terms of a sum share one shift: only one of them takes it)."""

    layer: str
    channels: list[int]
    shift: list[bool]


@dataclass
class FunctionalBN:
    """An F.batch_norm call in some module's forward whose statistics and affine are that model's tensors."""

    op_index: int  # the call's position among the traced ops
    running_mean: str  # qualified names of the tensors it reads (weight/bias None when not given)
    running_var: str
    weight: str | None
    bias: str | None
    eps: float


@dataclass
class FoldStep:
    """What happens to one BN (a module, or a functional call): the decision, and where the math goes."""

    decision: BNDecision
    targets: list[FoldTarget] = field(default_factory=list)
    functional: FunctionalBN | None = None
    centered: bool = False  # an affine that subtracts the mean first (statistics far from zero)
    norm_act: bool = False  # a known BN+act class, replaced by a FoldedNormAct


@dataclass
class FoldPlan:
    """The decisions of a fold, and nothing changed yet: what `plan_fold` returns and `fold` applies."""

    steps: list[FoldStep] = field(default_factory=list)
    batch_norm_ops: int = 0  # batch_norm ops per forward of the model as planned
    params: int = 0
    by_request: set[str] = field(default_factory=set)  # BNs the user left in training mode inside an eval model
    opaque: list[str] = field(default_factory=list)  # TorchScript submodules: not traced into, nothing folded inside
    unaccounted_ops: list[str] = field(default_factory=list)  # batch_norm calls no step covers, and why

    @property
    def decisions(self) -> list[BNDecision]:
        return [s.decision for s in self.steps]


class _NoFold(Exception):
    """Why a BN cannot be folded in the direction tried."""


def plan_fold(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, skip: Sequence[str] = ()) -> FoldPlan:
    """Decide, for every BN of `model`, what folding would do with it, from one traced forward; change nothing.

    Args:
        model: an eager model. It runs once in eval mode (BNs the user left in training mode inside an eval
            model stay so, and are refused); its modes are put back afterwards.
        example_inputs: the positional inputs of one forward (a tensor or a sequence).
        skip: fnmatch patterns of BN names to leave as they are.

    Returns:
        A FoldPlan: per BN (module or functional call) the action, the layer(s) it folds into and why not.

    Raises:
        InputError: `model` is a TorchScript module (its dataflow cannot be traced).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("a TorchScript module cannot be folded: fold the eager model, then script the result")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    by_request = {n for n, m in bn_modules(model) if m.training and not model.training}
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    for name, m in model.named_modules():
        if name in by_request:
            m.training = True  # the BN only, not a subclass's own dropout/drop-path children
    bns = bn_modules(model)
    try:
        with user_code("the model's forward on the example inputs"):
            flow, _ = trace(model, inputs, watch=[m for _, m in bns if not isinstance(m, torch.jit.ScriptModule)])
        names = {id(m): n for n, m in model.named_modules()}
        opaque = {names[id(m)] for m in flow.opaque}
        tied = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)
        context = _Context(flow, names, dict(model.named_modules()), tied, by_request, skip, opaque)
        steps = [_decide(name, bn, context) for name, bn in bns]
        steps += _functional_steps(model, context)
        check_skip_patterns(skip, [s.decision.name for s in steps])
        plan = FoldPlan(steps=steps, batch_norm_ops=_norm_op_count(flow, model), by_request=by_request,
                        params=sum(p.numel() for p in model.parameters()), opaque=sorted(opaque))
        plan.unaccounted_ops = _unaccounted_ops(flow, plan, names)
    finally:
        for m, training in flags:
            m.training = training
    return plan


@dataclass
class _Context:
    flow: Dataflow
    names: dict[int, str]
    modules: dict[str, nn.Module]
    tied: Counter
    by_request: set[str]
    skip: Sequence[str]
    opaque: set[str]


def _decide(name: str, bn: nn.Module, ctx: _Context) -> FoldStep:
    channels = bn_num_features(bn) if _has_stats(bn) else 0
    step = FoldStep(BNDecision(name=name, type=bn_type_name(bn), channels=channels, action=REFUSED))
    decision = step.decision
    decision.reason = _refusal(name, bn, ctx)
    if decision.reason:
        return step
    calls = ctx.flow.calls_of(bn)
    if len(calls) != 1:
        decision.action = AFFINE
        decision.reason = "not executed on the example input" if not calls else f"called {len(calls)} times"
        return _replacement(step, bn, ctx)
    x, reader = _normalized_input(bn, ctx.flow)
    try:
        if x is None:
            raise _NoFold("its forward runs no single batch_norm op")
        step.targets = _producer_targets(x, reader, bn, channels, ctx)
        decision.action, decision.target = FOLDED, ", ".join(t.layer for t in step.targets)
        return _replacement(step, bn, ctx)
    except _NoFold as e:
        why_not = str(e)
    consumer, why_not_forward = _consumer_target(bn, ctx)
    if consumer is not None:
        step.targets = [consumer]
        decision.action, decision.target, decision.reason = FOLDED_FORWARD, consumer.layer, why_not
        return _replacement(step, bn, ctx)
    decision.action = AFFINE
    decision.reason = why_not if why_not_forward is None else f"{why_not}; {why_not_forward}"
    return _replacement(step, bn, ctx)


def _replacement(step: FoldStep, bn: nn.Module, ctx: _Context) -> FoldStep:
    """Say what the BN module becomes: Identity or ChannelAffine (a plain BN), FoldedNormAct (a known BN+act
    class whose behaviour it reproduces), or the same module with its batch_norm call intercepted (others)."""
    d = step.decision
    if has_standard_forward(bn):
        d.replaced_by = "ChannelAffine" if d.action == AFFINE else "Identity"
    elif _acts_as_norm_act(bn, ctx):
        step.norm_act, d.replaced_by = True, "FoldedNormAct"
    else:
        d.replaced_by = "intercepted forward"
    step.centered = _centered(step, bn)
    return step


def _centered(step: FoldStep, bn: nn.Module) -> bool:
    """An affine replacement subtracts the mean first where the statistics sit far from zero."""
    return (step.decision.action == AFFINE and (has_standard_forward(bn) or step.norm_act)
            and mean_in_stds(bn) > MAX_FORWARD_FOLD_MEAN)


def _acts_as_norm_act(bn: nn.Module, ctx: _Context) -> bool:
    """A known BN+act class, checked on its recorded input: the affine, drop and act in that order give
    its output (a look-alike class with another forward falls back to interception)."""
    parts = norm_act_parts(bn)
    if parts is None:
        return False
    calls = ctx.flow.calls_of(bn)
    if not calls or len(calls[0].inputs) != 1 or not calls[0].inputs[0].is_floating_point():
        return not calls
    x = calls[0].inputs[0]
    scale, shift = affine_of(bn)
    with torch.no_grad():
        expected = as_float64(bn(x.clone()))
        got = as_float64(FoldedNormAct(_affine_module(bn, scale, shift), *parts)(x.clone()))
    if expected.shape != got.shape:
        return False
    share = default_tolerance(x.dtype).atol  # of the output's largest magnitude, as the fold's own check
    return bool((expected - got).abs().max() <= share * expected.abs().max()) if expected.numel() else True


def _has_stats(bn) -> bool:
    return getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None


def _refusal(name: str, bn: nn.Module, ctx: _Context) -> str:
    inside = next((o for o in sorted(ctx.opaque) if name.startswith(o + ".")), None)
    if inside is not None:
        return f"inside TorchScript module {inside!r}, which is run as it is (not traced into)"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in ctx.skip):
        return "skipped by request"
    if name in ctx.by_request:
        return "in training mode by request (normalizes with batch statistics)"
    if not _has_stats(bn) or getattr(bn, "track_running_stats", True) is False:
        return "track_running_stats=False: normalizes with batch statistics at inference"
    tensors = [bn.running_mean, bn.running_var] + [t for t in (getattr(bn, "weight", None), getattr(bn, "bias", None))
                                                   if t is not None]
    if any(not torch.isfinite(t).all() for t in tensors):
        return "statistics or affine parameters contain NaN/Inf"
    if (as_float64(bn.running_var) + float(getattr(bn, "eps", 1e-5)) <= 0).any():
        return "running_var + eps <= 0"
    return _foreign_reads(bn, ctx)


def _foreign_reads(bn: nn.Module, ctx: _Context) -> str:
    """Folding removes a BN's attributes: refuse where the forward reads them outside the BN's own call."""
    reads = list(ctx.flow.foreign_reads.get(id(bn), []))
    for attr in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, attr, None)
        if isinstance(t, torch.Tensor):
            reads += [(attr, r.module) for r in ctx.flow.readers(t) if isinstance(r, OpCall) and r.module is not bn]
    if not reads:
        return ""
    attr, reader = reads[0]
    return f"its {attr} is read outside its own forward (in {_where(reader, ctx)}), so it must stay a BatchNorm"


def _where(module: nn.Module | None, ctx: _Context) -> str:
    name = ctx.names.get(id(module)) if module is not None else None
    return f"{name!r}'s forward" if name else "the model's forward"


def _normalized_input(bn, flow: Dataflow) -> tuple[torch.Tensor | None, OpCall | None]:
    """The tensor this BN normalizes, and the op that reads it (None: the module's own ops read it)."""
    norm_ops = flow.ops_in(bn, "batch_norm")
    if len(norm_ops) == 1:
        op = norm_ops[0]
        return (op.args[0] if op.args else op.kwargs["input"]), op
    if is_frozen_bn(bn) and (has_standard_forward(bn) or norm_act_parts(bn) is not None):
        return flow.calls_of(bn)[0].inputs[0], None
    return None, None


def _producer_targets(x: torch.Tensor, reader: OpCall | None, owner: nn.Module | None, channels: int,
                      ctx: _Context) -> list[FoldTarget]:
    """The conv/linear layers whose outputs make up x (through data movement, sums and channel concats), each
    read by nothing else. Raises _NoFold with the reason where there are none."""
    sources = _sources(x, reader, owner, [], ctx.flow, top=True)
    targets = []
    for op, path in sources:
        layer, mapping = _check_producer(op, path, channels, ctx)
        targets.append(FoldTarget(ctx.names[id(layer)], mapping, [False] * len(mapping)))
    # Every BN channel takes its shift exactly once; layers with a bias first, so no bias needs adding.
    given: set[int] = set()
    for t in sorted(targets, key=lambda t: ctx.modules[t.layer].bias is None):
        for c, b in enumerate(t.channels):
            if b not in given:
                t.shift[c] = True
                given.add(b)
    if len(given) != channels:
        raise _NoFold("the layers feeding it do not cover all its channels")
    return targets


def _sources(t: torch.Tensor, reader: OpCall | None, owner: nn.Module | None, path: list, flow: Dataflow,
             top: bool = False) -> list[tuple[OpCall, list]]:
    """The layer ops whose outputs make up t, each with the path of ops from its output to the BN's input."""
    readers = flow.value_readers(t)
    sole = len(readers) == 1 and (readers[0] is reader if reader is not None else
                                  isinstance(readers[0], OpCall) and readers[0].module is owner)
    what = "its input" if top else f"a {'term' if path[0][0] == 'add' else 'part'} of the {path[0][1].name} feeding it"
    if not sole:
        raise _NoFold(f"{what} is also read by {_describe(readers, reader)}")
    op = flow.producer(t)
    if op is None:
        raise _NoFold("fed by a model input" if top else f"{what} is a model input")
    if op.name in LAYER_OPS:
        return [(op, path)]
    if is_eval_identity(op) and len(op.inputs) == 1 and op.args and op.args[0] is op.inputs[0]:
        return _sources(op.args[0], op, None, [("op", op)] + path, flow, top)
    if _is_plain_sum(op):
        return [s for term in op.args[:2] for s in _sources(term, op, None, [("add", op)] + path, flow)]
    if op.name in CONCAT_OPS:
        parts = _cat_parts(op)
        return [s for j, part in enumerate(parts) for s in _sources(part, op, None, [("cat", op, j)] + path, flow)]
    raise _NoFold(f"fed by {op.name}, not a conv/linear" if top else f"{what} comes from {op.name}, not a conv/linear")


CONCAT_OPS = {"cat", "concat", "concatenate"}


def _is_plain_sum(op: OpCall) -> bool:
    """a + b of two tensors of the output's shape (no broadcasting, no alpha, not in place)."""
    if op.name not in ("add", "__add__", "__radd__") or len(op.args) != 2 or op.kwargs.get("alpha", 1) != 1:
        return False
    a, b = op.args
    out = op.outputs[0]
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is not b
            and a.shape == out.shape and b.shape == out.shape and not any(o is a or o is b for o in op.outputs))


def _cat_parts(op: OpCall) -> list[torch.Tensor]:
    return list(op.args[0] if op.args else op.kwargs["tensors"])


def _cat_dim(op: OpCall) -> int:
    return op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)


def _check_producer(op: OpCall, path: list, channels: int, ctx: _Context) -> tuple[nn.Module, list[int]]:
    layer = op.module
    if not isinstance(layer, (_ConvNd, nn.Linear)):
        raise _NoFold(f"fed by a bare {op.name} call, not a conv/linear module")
    bias_arg = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
    if op.args[1] is not layer.weight or bias_arg is not layer.bias:
        raise _NoFold("the conv transforms its weight in forward (e.g. weight standardization)")
    calls = ctx.flow.calls_of(layer)
    if len(calls) != 1:
        raise _NoFold(f"the conv/linear feeding it is called {len(calls)} times")
    if not any(o is op.outputs[0] for o in calls[0].outputs):
        raise _NoFold("the conv/linear post-processes its output")
    _check_not_shared(layer, op, ctx)
    out = op.outputs[0]
    out_axis = -1 if isinstance(layer, nn.Linear) else 1
    per_bn = channel_map(_replay_path(path, channel_probe(out.shape, out_axis % out.dim())), 1)
    layer_channels = out.shape[out_axis]
    if per_bn is None or sorted(c for c in per_bn if c >= 0) != list(range(layer_channels)) or len(per_bn) != channels:
        raise _NoFold("the reshape between conv/linear and BN mixes channels")
    mapping = [0] * layer_channels
    for bn_channel, layer_channel in enumerate(per_bn):
        if layer_channel >= 0:
            mapping[layer_channel] = bn_channel
    return layer, mapping


def _check_not_shared(layer: nn.Module, op: OpCall, ctx: _Context) -> None:
    """Folding rewrites the layer's weight and bias: nothing else may use them (a tied module, a bare call)."""
    if ctx.tied[id(layer.weight)] > 1:
        raise _NoFold("the conv/linear weight is shared with another module")
    for attr in ("weight", "bias"):
        t = getattr(layer, attr)
        others = [r for r in ctx.flow.readers(t) if r is not op] if t is not None else []
        if others:
            by = others[0]
            what = f"{by.name} in {_where(by.module, ctx)}" if isinstance(by, OpCall) else "the model's output"
            raise _NoFold(f"the conv/linear {attr} is also read by {what}: folding into it would change that too")


def _replay_path(path: list, probe: torch.Tensor) -> torch.Tensor:
    """Carry a channel-index probe from a layer's output to the BN's input along the recorded path: data
    movement replayed, a sum passes it through, a concat places it among -1s (the other parts' channels)."""
    for step in path:
        kind, op = step[0], step[1]
        if kind == "op":
            probe = op.func(probe, *op.args[1:], **op.kwargs)
        elif kind == "cat":
            parts = [probe if i == step[2] else torch.full(p.shape, -1.0, dtype=probe.dtype, device=probe.device)
                     for i, p in enumerate(_cat_parts(op))]
            probe = torch.cat(parts, dim=_cat_dim(op))
    return probe


def _consumer_target(bn, ctx: _Context) -> tuple[FoldTarget | None, str | None]:
    """The conv/linear that alone reads this BN's output with no zero padding in between."""
    if not has_standard_forward(bn):
        return None, None
    if mean_in_stds(bn) > MAX_FORWARD_FOLD_MEAN:
        return None, (f"folding forward would lose precision (|mean| is {mean_in_stds(bn):.0f} stds from 0, "
                      f"limit {MAX_FORWARD_FOLD_MEAN:g})")
    flow = ctx.flow
    y = bn_output = flow.calls_of(bn)[0].outputs[0]
    chain: list[OpCall] = []
    while True:
        readers = flow.value_readers(y)
        if len(readers) != 1 or readers[0] == "output":
            return None, None
        op = readers[0]
        if op.name == "pad" and type(op.module) in STANDARD_CONSUMERS and op.module.padding_mode != "zeros":
            pad_readers = flow.value_readers(op.outputs[0])  # reflect/replicate/circular padding copies BN outputs
            if len(pad_readers) == 1 and isinstance(pad_readers[0], OpCall) and pad_readers[0].module is op.module:
                return _check_consumer(pad_readers[0], op.outputs[0], chain, ctx, bn_output.shape)
            return None, None
        if op.name in LAYER_OPS:
            return _check_consumer(op, y, chain, ctx, bn_output.shape)
        if is_eval_identity(op) and len(op.inputs) == 1 and op.args and op.args[0] is y:
            chain.append(op)
            y = op.outputs[0]
            continue
        return None, None


def _check_consumer(op, y, chain, ctx: _Context, y_shape) -> tuple[FoldTarget | None, str | None]:
    layer = op.module
    if type(layer) not in STANDARD_CONSUMERS or op.args[1] is not layer.weight or op.args[0] is not y:
        return None, None
    if isinstance(layer, _ConvNd) and layer.padding_mode == "zeros" and any(layer._reversed_padding_repeated_twice):
        return None, "the next conv zero-pads its input"
    if len(ctx.flow.calls_of(layer)) != 1:
        return None, None
    try:
        _check_not_shared(layer, op, ctx)
    except _NoFold as e:
        return None, str(e)
    in_axis = 1 if isinstance(layer, _ConvNd) else -1
    probe = replay(chain, channel_probe(y_shape, 1))
    mapping = channel_map(probe, in_axis % probe.dim()) if probe.dim() > 1 else None
    if mapping is None:
        return None, "the reshape between BN and the next layer mixes channels"
    return FoldTarget(ctx.names[id(layer)], mapping, [True] * len(mapping)), None


def _describe(readers, expected) -> str:
    others = [r for r in readers if r is not expected]
    names = sorted({r if isinstance(r, str) else r.name for r in others})
    return ", ".join(names) or "nothing"


def layer_channel_axis(layer: nn.Module) -> int:
    """The channel axis of a conv (1) or linear (-1) layer's output."""
    return -1 if isinstance(layer, nn.Linear) else 1


# ---------------------------------------------------------------- functional batch_norm


def _batch_norm_args(op: OpCall) -> dict[str, Any]:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5)
    values = dict(zip(names, op.args))
    return {n: values.get(n, op.kwargs.get(n, defaults.get(n))) for n in names}


def _tensor_names(model: nn.Module) -> dict[int, str]:
    named: dict[int, str] = {}
    for prefix, m in model.named_modules():
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                named.setdefault(id(t), f"{prefix}.{attr}" if prefix else attr)
    return named


def _is_module_bn_op(op: OpCall) -> bool:
    return op.module is not None and is_bn(op.module)


def _functional_steps(model: nn.Module, ctx: _Context) -> list[FoldStep]:
    """A step per F.batch_norm call made outside a BN module with the model's own statistics and affine."""
    tensor_names = _tensor_names(model)
    steps: list[FoldStep] = []
    for op in ctx.flow.ops:
        if op.name != "batch_norm" or _is_module_bn_op(op):
            continue
        a = _batch_norm_args(op)
        stats = [tensor_names.get(id(a[k])) if isinstance(a[k], torch.Tensor) else None
                 for k in ("running_mean", "running_var", "weight", "bias")]
        if stats[0] is None or stats[1] is None or any(a[k] is not None and s is None for k, s in
                                                       zip(("weight", "bias"), stats[2:])):
            continue  # not the model's tensors: reported among the batch_norm calls left
        owner = stats[0].rpartition(".")[0]
        name = owner or "(model)"
        taken = {s.decision.name for s in steps}
        name = next(f"{name} #{i}" for i in range(2, len(steps) + 3) if f"{name} #{i}" not in taken) \
            if name in taken else name
        functional = FunctionalBN(op.index, stats[0], stats[1], stats[2], stats[3], float(a["eps"]))
        channels = a["running_mean"].numel()
        step = FoldStep(BNDecision(name=name, type="F.batch_norm", channels=channels, action=REFUSED),
                        functional=functional)
        step.decision.reason = _functional_refusal(op, a, name, ctx)
        if not step.decision.reason:
            try:
                step.targets = _producer_targets(a["input"], op, None, channels, ctx)
                step.decision.action = FOLDED
                step.decision.target = ", ".join(t.layer for t in step.targets)
            except _NoFold as e:
                step.decision.reason = f"{e}; its owner's forward calls F.batch_norm itself, so it stays"
        steps.append(step)
    return steps


def _functional_refusal(op: OpCall, a: dict[str, Any], name: str, ctx: _Context) -> str:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in ctx.skip):
        return "skipped by request"
    if a["training"]:
        return "called with training=True: normalizes with batch statistics"
    tensors = {k: a[k] for k in ("running_mean", "running_var", "weight", "bias") if a[k] is not None}
    if any(not torch.isfinite(t).all() for t in tensors.values()):
        return "statistics or affine parameters contain NaN/Inf"
    if (as_float64(a["running_var"]) + float(a["eps"]) <= 0).any():
        return "running_var + eps <= 0"
    for key, t in tensors.items():
        others = [r for r in ctx.flow.readers(t) if r is not op]
        if others:
            return (f"its {key} is also read by {_describe(others, None)}: folding would rewrite it "
                    f"(F.batch_norm with the owner's own tensors)")
    return ""


def _unaccounted_ops(flow: Dataflow, plan: FoldPlan, names: dict[int, str]) -> list[str]:
    """batch_norm calls that neither a BN module nor a functional step covers, each with why."""
    covered = {s.functional.op_index for s in plan.steps if s.functional is not None}
    left = []
    for op in flow.ops:
        if op.name != "batch_norm" or _is_module_bn_op(op) or op.index in covered:
            continue
        where = names.get(id(op.module), "?") if op.module is not None else ""
        why = ("training=True (batch statistics)" if _batch_norm_args(op)["training"]
               else "its statistics are not parameters/buffers of the model")
        left.append(f"F.batch_norm in {where or 'the model'!r}: {why}")
    return left


# ---------------------------------------------------------------- surgery


def _keep_what_would_overflow(model: nn.Module, plan: FoldPlan) -> None:
    """Half-precision layers: a fold computed in float64 can exceed float16's range when cast (large γ/σ times
    large weights). Such a BN becomes an exact affine instead; if even its scale overflows, it stays a BN."""
    modules = dict(model.named_modules())
    for step in plan.steps:
        d = step.decision
        if step.functional is not None or step.norm_act or d.name not in modules:
            continue
        bn = modules[d.name]
        if not _has_stats(bn):
            continue
        scale, shift = affine_of(bn)
        if d.action in (FOLDED, FOLDED_FORWARD) and step.targets:
            overflowing = [t.layer for t in step.targets
                           if _fold_overflows(modules[t.layer], d.action, t, scale, shift)]
            if overflowing:
                dtype = str(modules[overflowing[0]].weight.dtype).replace("torch.", "")
                d.reason = f"folding into {overflowing[0]} overflows {dtype}" + (f"; {d.reason}" if d.reason else "")
                d.action, d.target, step.targets = AFFINE, None, []
                d.replaced_by = "ChannelAffine" if d.replaced_by == "Identity" else d.replaced_by
                step.centered = _centered(step, bn)
        if d.action == AFFINE:
            dtype = bn.running_mean.dtype
            if not (torch.isfinite(scale.to(dtype)).all() and torch.isfinite(shift.to(dtype)).all()):
                d.action = REFUSED
                d.reason = f"its scale γ/√(σ²+ε) overflows {str(dtype).replace('torch.', '')}; kept as a BatchNorm"


def _fold_overflows(layer: nn.Module, action, target: FoldTarget, scale, shift) -> bool:
    """Fold into a copy of the target layer and check that every cast weight and bias is still finite."""
    layer = copy.deepcopy(layer)
    finite_before = all(torch.isfinite(t).all() for t in (layer.weight, layer.bias) if t is not None)
    into = fold_into_producer if action == FOLDED else fold_into_consumer
    into(layer, *_target_affine(target, scale, shift))
    finite_after = all(torch.isfinite(t).all() for t in (layer.weight, layer.bias) if t is not None)
    return finite_before and not finite_after


def apply_fold_plan(model: nn.Module, plan: FoldPlan) -> FoldLayout:
    """Carry out `plan` (made by plan_fold on this model or an identical copy) on `model`, in place.
    Returns the fold layout: which BNs became identity or affine, which layers got a bias."""
    modules = dict(model.named_modules())
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    identity, affine, centered, bias_added, norm_act = [], [], [], [], []
    for step in plan.steps:
        d = step.decision
        if d.action == REFUSED:
            continue
        if step.functional is not None:
            f = step.functional
            scale, shift = affine_from(tensors[f.running_mean], tensors[f.running_var],
                                       tensors.get(f.weight), tensors.get(f.bias), f.eps)
        else:
            bn = named_module(modules, d.name)
            scale, shift = affine_of(bn)
        for target in step.targets:
            layer_scale, layer_shift = _target_affine(target, scale, shift)
            into = fold_into_producer if d.action == FOLDED else fold_into_consumer
            if into(named_module(modules, target.layer), layer_scale, layer_shift):
                bias_added.append(target.layer)
        if step.functional is not None:
            _make_batch_norm_identity(tensors, step.functional)
        elif d.action == AFFINE:
            affine.append(d.name)
            if step.centered:
                centered.append(d.name)
            _replace_bn(model, d.name, bn, scale, shift, step.norm_act, step.centered)
        else:
            identity.append(d.name)
            _replace_bn(model, d.name, bn, None, None, step.norm_act)
        if step.norm_act:
            norm_act.append(d.name)
    return FoldLayout(identity, affine, centered, sorted(set(bias_added)), norm_act)


def _target_affine(target: FoldTarget, scale: torch.Tensor, shift: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The BN's scale and shift in the target layer's channel order; the shift only where this target takes it
    (None where it takes none: another term of a sum does)."""
    idx = torch.tensor(target.channels, dtype=torch.long, device=scale.device)
    mask = torch.tensor(target.shift, dtype=torch.bool, device=scale.device)
    if not any(target.shift):
        return scale[idx], None
    return scale[idx], torch.where(mask, shift[idx], torch.zeros_like(shift[idx]))


def _make_batch_norm_identity(tensors: dict[str, torch.Tensor], f: FunctionalBN) -> None:
    """Rewrite the tensors a functional batch_norm reads so that it computes x: mean 0, var + eps = 1 (exactly,
    in the tensor's precision: 1 - eps rounds so that adding eps back rounds to 1), weight 1, bias 0."""
    with torch.no_grad():
        tensors[f.running_mean].zero_()
        var = tensors[f.running_var]
        var.fill_(float(torch.tensor(1.0 - f.eps, dtype=var.dtype)))
        if f.weight is not None:
            tensors[f.weight].fill_(1.0)
        if f.bias is not None:
            tensors[f.bias].zero_()


def fold_into_producer(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> bool:
    """layer(x)·scale + shift per output channel, folded into its weight and bias (float64, cast once).
    `shift` None: scale only (another term of a sum takes the shift). Returns True if a bias had to be added."""
    w = as_float64(layer.weight)
    if isinstance(layer, _ConvTransposeNd):  # weight: (in, out/groups, *k); output channel = group·(out/groups)+j
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        new_w = (grouped * scale.view(g, 1, w.shape[1], *[1] * (w.dim() - 2))).reshape(w.shape)
    else:  # conv (out, in/groups, *k) and linear (out, in)
        new_w = w * scale.view(-1, *[1] * (w.dim() - 1))
    if layer.bias is None and shift is None:
        return _assign(layer, new_w, None)
    bias = as_float64(layer.bias) if layer.bias is not None else torch.zeros_like(scale)
    return _assign(layer, new_w, bias * scale + (shift if shift is not None else 0))


def fold_into_consumer(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """layer(x·scale + shift) with scale/shift per input channel, folded into its weight and bias."""
    w = as_float64(layer.weight)
    bias = as_float64(layer.bias) if layer.bias is not None else w.new_zeros(w.shape[0])
    if isinstance(layer, nn.Linear):
        return _assign(layer, w * scale.view(1, -1), bias + w @ shift)
    g, out, per_group = layer.groups, w.shape[0], w.shape[1]
    grouped = w.reshape(g, out // g, per_group, *w.shape[2:])
    ones = [1] * (w.dim() - 2)
    new_w = (grouped * scale.view(g, 1, per_group, *ones)).reshape(w.shape)
    # A constant input t per channel contributes Σ_i,k W[o,i,k]·t[i] to every output (no padding).
    added = (grouped * shift.view(g, 1, per_group, *ones)).sum(dim=tuple(range(2, grouped.dim()))).reshape(out)
    return _assign(layer, new_w, bias + added)


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    dtype = layer.weight.dtype
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if bias is None:
            return False
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(layer.weight.device, dtype), requires_grad=layer.weight.requires_grad)
            return True
        layer.bias.copy_(bias.to(dtype))
    return False


def mean_in_stds(bn) -> float:
    """max |μ| / √(σ² + ε): how far statistics sit from zero, in standard deviations."""
    mean, var = as_float64(bn.running_mean), as_float64(bn.running_var)
    return float((mean.abs() / (var + bn_eps(bn)).sqrt()).max()) if mean.numel() else 0.0


def _affine_module(bn, scale, shift, centered: bool | None = None) -> ChannelAffine:
    """x·s + t in one op; (x - μ)·s + β where μ is far from zero (`centered`, by default decided from the
    statistics), so the subtraction happens first."""
    device, dtype = bn.running_mean.device, bn.running_mean.dtype
    if centered is None:
        centered = mean_in_stds(bn) > MAX_FORWARD_FOLD_MEAN
    if not centered:
        return ChannelAffine(scale.to(device, dtype), shift.to(device, dtype))
    mean = as_float64(bn.running_mean)
    return ChannelAffine(scale.to(device, dtype), (shift + mean * scale).to(device, dtype),
                         center=mean.to(device, dtype))


def _replace_bn(model, name, bn, scale, shift, norm_act: bool = False, centered: bool | None = None) -> None:
    device, dtype = bn.running_mean.device, bn.running_mean.dtype
    if has_standard_forward(bn) or norm_act:
        new = nn.Identity() if scale is None else _affine_module(bn, scale, shift, centered)
        replace_module(model, name, FoldedNormAct(new, *norm_act_parts(bn)) if norm_act else new)
    else:
        if scale is None:
            make_custom_bn_folded(bn, None, None)
        else:
            make_custom_bn_folded(bn, scale.to(device, dtype), shift.to(device, dtype))


# ---------------------------------------------------------------- checking


def _eval_copy(model: nn.Module) -> tuple[nn.Module, set[str]]:
    """A deep copy in eval mode, except BNs the user left in training mode inside an eval model."""
    by_request = {n for n, m in bn_modules(model) if m.training and not model.training}
    copied = copy.deepcopy(model).eval()
    for name, m in copied.named_modules():
        if name in by_request:
            m.training = True  # the BN only, not a subclass's own dropout/drop-path children
    return copied, by_request


def _norm_op_count(flow: Dataflow, model: nn.Module) -> int:
    """batch_norm ops per forward; a TorchScript submodule counts one per BN inside it per call (not traced)."""
    frozen = sum(len(flow.calls_of(m)) for m in model.modules() if is_frozen_bn(m))
    opaque = sum(sum(op.module is m for op in flow.ops if op.name == OPAQUE) * len(bn_modules(m))
                 for m in flow.opaque)
    return flow.count("batch_norm") + frozen + opaque


def _compare(model, folded, inputs, samples, seed, by_request, report: FoldReport) -> int:
    """Fill report.comparisons; return the batch_norm op count of the folded model."""
    if by_request:
        reference = _eval_copy(model)[0]
        flags = None
    else:
        reference, flags = model, [m.training for m in model.modules()]
        model.eval()
    float64 = Float64Reference(reference)
    try:
        flow, out = trace(folded, inputs)
        with torch.no_grad():
            cases = [("example", inputs, reference(*inputs), out)]
            g = random_stream(seed)
            for i in range(samples):
                x = random_like(inputs, g)
                cases.append((f"random #{i + 1}", x, reference(*x), folded(*x)))
            for label, x, ref_out, folded_out in cases:
                report.comparisons.append(_check_case(label, x, ref_out, folded_out, float64, report.tolerance))
    finally:
        if flags is not None:
            for m, training in zip(model.modules(), flags):
                m.training = training
    return _norm_op_count(flow, folded)


def _check_case(label, x, ref_out, folded_out, float64: Float64Reference, tolerance: Tolerance) -> Comparison:
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
