"""Fold decisions for a PyTorch model: its traced dataflow (bntool/graph.py) seen through `TorchGraph`, the
planner's graph interface, plus what only a module has (BN subclasses, functional batch_norm calls, tied
weights, attributes read from outside). `plan_fold` is the entry point."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..devices import as_float64, check_not_meta, statistics_kept
from ..errors import InputError, user_code
from ..graph import Dataflow, OpCall, trace
from ..layers import (
    FoldedNormAct,
    bn_modules,
    bn_num_features,
    bn_stats,
    bn_type_name,
    has_standard_forward,
    is_bn,
    is_frozen_bn,
    norm_act_parts,
)
from ..utils import bn_eps
from . import math as fm
from .check import norm_op_count
from .planner import (
    AFFINE,
    FOLDED,
    FOLDED_FORWARD,
    MAX_FORWARD_FOLD_MEAN,
    REFUSED,
    BNDecision,
    FoldPlan,
    FoldStep,
    FoldTarget,
    FunctionalBN,
    NoFold,
    check_skip_patterns,
    consumer_target,
    producer_targets,
)
from .report import default_tolerance
from .surgery import affine_module, bn_affine, fold_weights_consumer, fold_weights_producer
from .torch_graph import TorchGraph


def mean_in_stds(bn) -> float:
    """max |μ| / √(σ² + ε) of a BN module: how far its statistics sit from zero, in standard deviations."""
    return fm.mean_in_stds(bn.running_mean, bn.running_var, bn_eps(bn))


# ---------------------------------------------------------------- plan_fold


@dataclass
class _Context:
    graph: TorchGraph
    modules: dict[str, nn.Module]
    by_request: set[str]
    skip: Sequence[str]
    opaque: set[str]

    @property
    def flow(self) -> Dataflow:
        return self.graph.flow


def plan_fold(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, skip: Sequence[str] = ()) -> FoldPlan:
    """Decide, for every BN of `model`, what folding would do with it, from one traced forward; change nothing.

    Args:
        model: an eager model. It runs once in eval mode (BNs the user left in training mode inside an eval
            model stay so, and are refused); its modes are put back afterwards. A `torch.compile`d model is
            planned on the module it wraps (a note says so).
        example_inputs: the positional inputs of one forward (a tensor or a sequence).
        skip: fnmatch patterns of BN names to leave as they are.

    Returns:
        A FoldPlan: per BN (module or functional call) the action, the layer(s) it folds into and why not.

    Raises:
        InputError: `model` is a TorchScript module (its dataflow cannot be traced).
    """
    check_not_meta(model)
    model, notes = unwrap_compiled(model)
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError("a TorchScript module cannot be folded: fold the eager model, then script the result")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with statistics_kept(model):  # a BN left in training mode updates them in the trace
        return _plan(model, inputs, skip, notes)


def _plan(model: nn.Module, inputs: tuple, skip: Sequence[str], notes: list[str]) -> FoldPlan:
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
        context = _Context(TorchGraph(flow, names, tied), dict(model.named_modules()), by_request, skip, opaque)
        steps = [_decide(name, bn, context) for name, bn in bns]
        steps += _functional_steps(model, context)
        check_skip_patterns(skip, [s.decision.name for s in steps])
        plan = FoldPlan(steps=steps, batch_norm_ops=norm_op_count(flow, model), by_request=by_request,
                        params=sum(p.numel() for p in model.parameters()), opaque=sorted(opaque), notes=notes)
        plan.unaccounted_ops = _unaccounted_ops(flow, plan, names)
    finally:
        for m, training in flags:
            m.training = training
    return plan


def unwrap_compiled(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A `torch.compile`d model's original module (folding works on eager modules), with a note saying so."""
    original = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module):
        return original, ["the model is torch.compile'd: folded the module it wraps (its _orig_mod); "
                          "torch.compile the folded model again"]
    return model, []


def broken_statistics(model: nn.Module, skip: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(name, problem) of every BN module not skipped whose statistics or affine cannot be folded (NaN/Inf,
    running_var + eps ≤ 0): the checkpoint is broken there, whatever the fold does."""
    broken = []
    for name, bn in bn_modules(model):
        by_request = bn.training and not model.training  # normalizes with batch statistics: these are unused
        if not _has_stats(bn) or by_request or any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        problem = fm.statistics_problem(*bn_stats(bn), getattr(bn, "weight", None), getattr(bn, "bias", None),
                                        bn_eps(bn))
        if problem:
            broken.append((name, problem))
    return broken


def broken_functional_statistics(model: nn.Module, plan: FoldPlan, skip: Sequence[str] = ()
                                 ) -> list[tuple[str, str]]:
    """(name, problem) of every F.batch_norm call of the plan, not skipped, whose statistics or affine (the
    model's own tensors) cannot be folded: broken_statistics for what no BN module holds."""
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    broken = []
    for step in plan.steps:
        f = step.functional
        if f is None or f.batch_statistics or any(fnmatch.fnmatchcase(step.decision.name, p) for p in skip):
            continue
        weight, bias = (tensors[n] if n is not None else None for n in (f.weight, f.bias))
        problem = fm.statistics_problem(tensors[f.running_mean], tensors[f.running_var], weight, bias, f.eps)
        if problem:
            broken.append((step.decision.name, problem))
    return broken


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
            raise NoFold("its forward runs no single batch_norm op")
        is_reader = ((lambda r: r is reader) if reader is not None else
                     (lambda r: isinstance(r, OpCall) and r.module is bn))
        step.targets = producer_targets(ctx.graph, x, is_reader, channels)
        decision.action, decision.target = FOLDED, ", ".join(t.layer for t in step.targets)
        return _replacement(step, bn, ctx)
    except NoFold as e:
        why_not = str(e)
    consumer, why_not_forward = _consumer_target(bn, ctx)
    if consumer is not None:
        step.targets = [consumer]
        decision.action, decision.target, decision.reason = FOLDED_FORWARD, consumer.layer, why_not
        return _replacement(step, bn, ctx)
    decision.action = AFFINE
    decision.reason = why_not if why_not_forward is None else f"{why_not}; {why_not_forward}"
    return _replacement(step, bn, ctx)


def _consumer_target(bn, ctx: _Context) -> tuple[FoldTarget | None, str | None]:
    """The conv/linear that alone reads this BN's output with no zero padding in between."""
    if not has_standard_forward(bn):
        return None, None
    if mean_in_stds(bn) > MAX_FORWARD_FOLD_MEAN:
        return None, (f"folding forward would lose precision (|mean| is {mean_in_stds(bn):.0f} stds from 0, "
                      f"limit {MAX_FORWARD_FOLD_MEAN:g})")
    return consumer_target(ctx.graph, ctx.flow.calls_of(bn)[0].outputs[0])


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
    scale, shift = bn_affine(bn)
    centered = mean_in_stds(bn) > MAX_FORWARD_FOLD_MEAN
    with torch.no_grad():
        expected = as_float64(bn(x.clone()))
        got = as_float64(FoldedNormAct(affine_module(bn, scale, shift, centered), *parts)(x.clone()))
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
    problem = fm.statistics_problem(*bn_stats(bn), getattr(bn, "weight", None), getattr(bn, "bias", None), bn_eps(bn))
    return problem or _foreign_reads(bn, ctx)


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
    return f"its {attr} is read outside its own forward (in {ctx.graph.where(reader)}), so it must stay a BatchNorm"


def _normalized_input(bn, flow: Dataflow) -> tuple[torch.Tensor | None, OpCall | None]:
    """The tensor this BN normalizes, and the op that reads it (None: the module's own ops read it)."""
    norm_ops = flow.ops_in(bn, "batch_norm")
    if len(norm_ops) == 1:
        op = norm_ops[0]
        return (op.args[0] if op.args else op.kwargs["input"]), op
    if is_frozen_bn(bn) and (has_standard_forward(bn) or norm_act_parts(bn) is not None):
        return flow.calls_of(bn)[0].inputs[0], None
    return None, None


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
        steps.append(_functional_step(op, a, stats, steps, ctx))
    return steps


def _functional_step(op: OpCall, a: dict[str, Any], stats: list, steps: list[FoldStep], ctx: _Context) -> FoldStep:
    owner = stats[0].rpartition(".")[0]
    name = owner or "(model)"
    taken = {s.decision.name for s in steps}
    name = next(f"{name} #{i}" for i in range(2, len(steps) + 3) if f"{name} #{i}" not in taken) \
        if name in taken else name
    functional = FunctionalBN(op.index, stats[0], stats[1], stats[2], stats[3], float(a["eps"]), bool(a["training"]))
    channels = a["running_mean"].numel()
    step = FoldStep(BNDecision(name=name, type="F.batch_norm", channels=channels, action=REFUSED),
                    functional=functional)
    step.decision.reason = _functional_refusal(op, a, name, ctx)
    if not step.decision.reason:
        try:
            step.targets = producer_targets(ctx.graph, a["input"], lambda r: r is op, channels)
            step.decision.action = FOLDED
            step.decision.target = ", ".join(t.layer for t in step.targets)
        except NoFold as e:
            step.decision.reason = f"{e}; its owner's forward calls F.batch_norm itself, so it stays"
    return step


def _functional_refusal(op: OpCall, a: dict[str, Any], name: str, ctx: _Context) -> str:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in ctx.skip):
        return "skipped by request"
    if a["training"]:
        return "called with training=True: normalizes with batch statistics"
    tensors = {k: a[k] for k in ("running_mean", "running_var", "weight", "bias") if a[k] is not None}
    problem = fm.statistics_problem(a["running_mean"], a["running_var"], a["weight"], a["bias"], float(a["eps"]))
    if problem:
        return problem
    for key, t in tensors.items():
        others = [r for r in ctx.flow.readers(t) if r is not op]
        if others:
            names = sorted({r if isinstance(r, str) else r.name for r in others})
            return (f"its {key} is also read by {', '.join(names) or 'nothing'}: folding would rewrite it "
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


# ---------------------------------------------------------------- the target dtype


def keep_what_would_overflow(model: nn.Module, plan: FoldPlan) -> None:
    """Half-precision layers: a fold computed in float64 can exceed float16's range when cast (large γ/σ times
    large weights). Such a BN becomes an exact affine instead; if even its scale overflows, it stays a BN.
    Edits `plan` only."""
    modules = dict(model.named_modules())
    for step in plan.steps:
        d = step.decision
        if step.functional is not None or step.norm_act or d.name not in modules:
            continue
        bn = modules[d.name]
        if not _has_stats(bn):
            continue
        scale, shift = bn_affine(bn)
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
    """Whether the fold's weight or bias, cast to the layer's dtype, is no longer finite where it was."""
    dtype = layer.weight.dtype
    before = [cast(torch.Tensor, t) for t in (layer.weight, layer.bias) if t is not None]
    if not all(torch.isfinite(t).all() for t in before):
        return False
    layer_scale, layer_shift = fm.select_channels(scale, shift, target.channels, target.shift)
    weight, bias = (fold_weights_producer(layer, layer_scale, layer_shift) if action == FOLDED
                    else fold_weights_consumer(layer, layer_scale, layer_shift))
    return not all(torch.isfinite(t.to(dtype)).all() for t in (weight, bias) if t is not None)

