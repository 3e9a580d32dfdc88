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
    combine,
    compare_outputs,
    random_like,
    random_stream,
)
from .errors import CheckFailed
from .graph import LAYER_OPS, Dataflow, OpCall, channel_map, channel_probe, is_eval_identity, replay, trace
from .layers import (
    ChannelAffine,
    affine_of,
    bn_eps,
    bn_modules,
    bn_num_features,
    has_standard_forward,
    is_frozen_bn,
    make_custom_bn_folded,
)
from .layout import FoldLayout, attach_layout, layout_of

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
    target: str | None = None  # the conv/linear it was folded into
    reason: str = ""


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

    def count(self, action: str) -> int:
        return sum(d.action == action for d in self.decisions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tolerance"] = self.tolerance.to_dict()
        d["counts"] = {a: self.count(a) for a in (FOLDED, FOLDED_FORWARD, AFFINE, REFUSED)}
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

    Returns:
        (folded, report): the folded copy in eval mode, carrying its FoldLayout (saved with it by
        save_checkpoint / state_dict_of), and a FoldReport.

    Raises:
        CheckFailed: with `check`, the folded model differs beyond tolerance (`.report` is the FoldReport).
        InputError: a tolerance is negative or not finite.

    Side effects: none on `model` (its training flags are restored after the check); the copy doubles
    its memory, and the float64 reference of the check doubles it again where it is needed.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    started = time.perf_counter()
    folded, by_request = _eval_copy(model)
    flow, _ = trace(folded, inputs)
    report = FoldReport(batch_norm_ops_before=_norm_op_count(flow, folded),
                        params_before=sum(p.numel() for p in folded.parameters()))
    names = {id(m): n for n, m in folded.named_modules()}
    tied = Counter(id(p) for m in folded.modules() for p in m._parameters.values() if p is not None)
    plans = [_decide(name, bn, flow, names, tied, by_request, skip) for name, bn in bn_modules(folded)]
    _apply(folded, plans, report)
    attach_layout(folded, (layout_of(model) or FoldLayout()).merged(report.layout))
    report.fold_seconds = time.perf_counter() - started
    report.decisions = [p.decision for p in plans]
    report.params_after = sum(p.numel() for p in folded.parameters())

    started = time.perf_counter()
    report.tolerance = Tolerance.resolve(rtol, atol, default_tolerance(model_dtype(model)))
    report.batch_norm_ops_after = _compare(model, folded, inputs, samples, seed, by_request, report)
    report.passed = all(c.passed for c in report.comparisons)
    report.check_seconds = time.perf_counter() - started
    if check and not report.passed:
        raise CheckFailed(
            f"folded model differs from the original: max abs error {report.max_abs:.3g} "
            f"({report.max_abs_over_scale:.3g} of the output's magnitude) exceeds {report.tolerance.describe()}",
            report=report)
    return folded, report


# ---------------------------------------------------------------- decisions


@dataclass
class _Plan:
    decision: BNDecision
    bn: nn.Module
    layer: nn.Module | None = None
    mapping: list[int] | None = None  # backward: BN channel -> layer channel; forward: layer input -> BN channel


def _decide(name, bn, flow: Dataflow, names, tied, by_request, skip) -> _Plan:
    decision = BNDecision(name=name, type=type(bn).__name__, channels=bn_num_features(bn) if _has_stats(bn) else 0,
                          action=REFUSED)
    plan = _Plan(decision, bn)
    refusal = _refusal(name, bn, by_request, skip)
    if refusal:
        decision.reason = refusal
        return plan
    calls = flow.calls_of(bn)
    if len(calls) != 1:
        decision.action = AFFINE
        decision.reason = "not executed on the example input" if not calls else f"called {len(calls)} times"
        return plan
    layer, mapping, why_not = _producer_layer(bn, flow, tied)
    if layer is not None:
        decision.action, decision.target, plan.layer, plan.mapping = FOLDED, names[id(layer)], layer, mapping
        return plan
    consumer, fwd_mapping, why_not_forward = _consumer_layer(bn, flow, tied)
    if consumer is not None:
        decision.action, decision.target, plan.layer, plan.mapping = (
            FOLDED_FORWARD, names[id(consumer)], consumer, fwd_mapping)
        decision.reason = why_not
        return plan
    decision.action = AFFINE
    decision.reason = why_not if why_not_forward is None else f"{why_not}; {why_not_forward}"
    return plan


def _has_stats(bn) -> bool:
    return getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None


def _refusal(name, bn, by_request, skip) -> str:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip):
        return "skipped by request"
    if name in by_request:
        return "in training mode by request (normalizes with batch statistics)"
    if not _has_stats(bn) or getattr(bn, "track_running_stats", True) is False:
        return "track_running_stats=False: normalizes with batch statistics at inference"
    tensors = [bn.running_mean, bn.running_var] + [t for t in (getattr(bn, "weight", None), getattr(bn, "bias", None))
                                                   if t is not None]
    if any(not torch.isfinite(t).all() for t in tensors):
        return "statistics or affine parameters contain NaN/Inf"
    if (bn.running_var.double() + float(getattr(bn, "eps", 1e-5)) <= 0).any():
        return "running_var + eps <= 0"
    return ""


def _normalized_input(bn, flow: Dataflow) -> tuple[torch.Tensor | None, OpCall | None]:
    """The tensor this BN normalizes, and the op that reads it (None: the module's own ops read it)."""
    norm_ops = flow.ops_in(bn, "batch_norm")
    if len(norm_ops) == 1:
        op = norm_ops[0]
        return (op.args[0] if op.args else op.kwargs["input"]), op
    if is_frozen_bn(bn) and has_standard_forward(bn):
        return flow.calls_of(bn)[0].inputs[0], None
    return None, None


def _producer_layer(bn, flow: Dataflow, tied) -> tuple[nn.Module | None, list[int] | None, str]:
    """The conv/linear whose output (through data movement only) is this BN's input and read by nothing else."""
    x, reader = _normalized_input(bn, flow)
    if x is None:
        return None, None, "its forward runs no single batch_norm op"
    chain: list[OpCall] = []
    while True:
        readers = flow.readers(x)
        sole = len(readers) == 1 and (readers[0] is reader if reader is not None else
                                      isinstance(readers[0], OpCall) and readers[0].module is bn)
        if not sole:
            return None, None, f"its input is also read by {_describe(readers, reader)}"
        op = flow.producer(x)
        if op is None:
            return None, None, "fed by a model input"
        if op.name in LAYER_OPS:
            return _check_producer(op, x, chain, bn, flow, tied)
        if is_eval_identity(op) and len(op.inputs) == 1 and op.args and op.args[0] is op.inputs[0]:
            chain.append(op)
            x, reader = op.args[0], op
            continue
        return None, None, f"fed by {op.name}, not a conv/linear"


def _check_producer(op: OpCall, x, chain, bn, flow, tied):
    layer = op.module
    if not isinstance(layer, (_ConvNd, nn.Linear)):
        return None, None, f"fed by a bare {op.name} call, not a conv/linear module"
    bias_arg = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
    if op.args[1] is not layer.weight or bias_arg is not layer.bias:
        return None, None, "the conv transforms its weight in forward (e.g. weight standardization)"
    calls = flow.calls_of(layer)
    if len(calls) != 1:
        return None, None, f"the conv/linear feeding it is called {len(calls)} times"
    if not any(o is op.outputs[0] for o in calls[0].outputs):
        return None, None, "the conv/linear post-processes its output"
    if tied[id(layer.weight)] > 1:
        return None, None, "the conv/linear weight is shared with another module"
    channels = bn_num_features(bn)
    out_axis, x_ndim = layer_channel_axis(layer), op.outputs[0].dim()
    if not chain:
        if op.outputs[0].shape[out_axis] != channels:
            return None, None, "channel counts differ"
        return layer, list(range(channels)), ""
    probe = replay(reversed(chain), channel_probe(op.outputs[0].shape, out_axis % x_ndim))
    mapping = channel_map(probe, 1)
    if mapping is None or sorted(mapping) != list(range(op.outputs[0].shape[out_axis])):
        return None, None, "the reshape between conv/linear and BN mixes channels"
    return layer, mapping, ""


def _consumer_layer(bn, flow: Dataflow, tied) -> tuple[nn.Module | None, list[int] | None, str | None]:
    """The conv/linear that alone reads this BN's output with no zero padding in between."""
    if not has_standard_forward(bn):
        return None, None, None
    if mean_in_stds(bn) > MAX_FORWARD_FOLD_MEAN:
        return None, None, (f"folding forward would lose precision (|mean| is {mean_in_stds(bn):.0f} stds from 0, "
                            f"limit {MAX_FORWARD_FOLD_MEAN:g})")
    y = bn_output = flow.calls_of(bn)[0].outputs[0]
    chain: list[OpCall] = []
    while True:
        readers = flow.readers(y)
        if len(readers) != 1 or readers[0] == "output":
            return None, None, None
        op = readers[0]
        if op.name == "pad" and type(op.module) in STANDARD_CONSUMERS and op.module.padding_mode != "zeros":
            pad_readers = flow.readers(op.outputs[0])  # reflect/replicate/circular padding copies BN outputs
            if len(pad_readers) == 1 and isinstance(pad_readers[0], OpCall) and pad_readers[0].module is op.module:
                return _check_consumer(pad_readers[0], op.outputs[0], chain, bn, flow, tied, bn_output.shape)
            return None, None, None
        if op.name in LAYER_OPS:
            return _check_consumer(op, y, chain, bn, flow, tied, bn_output.shape)
        if is_eval_identity(op) and len(op.inputs) == 1 and op.args and op.args[0] is y:
            chain.append(op)
            y = op.outputs[0]
            continue
        return None, None, None


def _check_consumer(op, y, chain, bn, flow, tied, y_shape):
    layer = op.module
    if type(layer) not in STANDARD_CONSUMERS or op.args[1] is not layer.weight or op.args[0] is not y:
        return None, None, None
    if isinstance(layer, _ConvNd) and layer.padding_mode == "zeros" and any(layer._reversed_padding_repeated_twice):
        return None, None, "the next conv zero-pads its input"
    if len(flow.calls_of(layer)) != 1 or tied[id(layer.weight)] > 1:
        return None, None, None
    in_axis = 1 if isinstance(layer, _ConvNd) else -1
    probe = replay(chain, channel_probe(y_shape, 1))
    mapping = channel_map(probe, in_axis % probe.dim()) if probe.dim() > 1 else None
    if mapping is None:
        return None, None, "the reshape between BN and the next layer mixes channels"
    return layer, mapping, None


def _describe(readers, expected) -> str:
    others = [r for r in readers if r is not expected]
    names = sorted({r if isinstance(r, str) else r.name for r in others})
    return ", ".join(names) or "nothing"


def layer_channel_axis(layer: nn.Module) -> int:
    """The channel axis of a conv (1) or linear (-1) layer's output."""
    return -1 if isinstance(layer, nn.Linear) else 1


# ---------------------------------------------------------------- surgery


def _apply(model: nn.Module, plans: list[_Plan], report: FoldReport) -> None:
    identity, affine, centered, bias_added = [], [], [], []
    names = {id(m): n for n, m in model.named_modules()}
    for plan in plans:
        action = plan.decision.action
        if action == REFUSED:
            continue
        scale, shift = affine_of(plan.bn)
        if action == FOLDED:
            inverse = [0] * len(plan.mapping)
            for bn_channel, layer_channel in enumerate(plan.mapping):
                inverse[layer_channel] = bn_channel
            idx = torch.tensor(inverse)
            if fold_into_producer(plan.layer, scale[idx], shift[idx]):
                bias_added.append(names[id(plan.layer)])
            identity.append(plan.decision.name)
            _replace_bn(model, plan.decision.name, plan.bn, None, None)
        elif action == FOLDED_FORWARD:
            idx = torch.tensor(plan.mapping)
            if fold_into_consumer(plan.layer, scale[idx], shift[idx]):
                bias_added.append(names[id(plan.layer)])
            identity.append(plan.decision.name)
            _replace_bn(model, plan.decision.name, plan.bn, None, None)
        else:
            affine.append(plan.decision.name)
            if has_standard_forward(plan.bn) and mean_in_stds(plan.bn) > MAX_FORWARD_FOLD_MEAN:
                centered.append(plan.decision.name)
            _replace_bn(model, plan.decision.name, plan.bn, scale, shift)
    report.layout = FoldLayout(identity, affine, centered, sorted(set(bias_added)))


def fold_into_producer(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """layer(x)·scale + shift per output channel, folded into its weight and bias (float64, cast once).
    Returns True if a bias had to be added."""
    w = layer.weight.detach().double()
    if isinstance(layer, _ConvTransposeNd):  # weight: (in, out/groups, *k); output channel = group·(out/groups)+j
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        new_w = (grouped * scale.view(g, 1, w.shape[1], *[1] * (w.dim() - 2))).reshape(w.shape)
    else:  # conv (out, in/groups, *k) and linear (out, in)
        new_w = w * scale.view(-1, *[1] * (w.dim() - 1))
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    return _assign(layer, new_w, bias * scale + shift)


def fold_into_consumer(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """layer(x·scale + shift) with scale/shift per input channel, folded into its weight and bias."""
    w = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if isinstance(layer, nn.Linear):
        return _assign(layer, w * scale.view(1, -1), bias + w @ shift)
    g, out, per_group = layer.groups, w.shape[0], w.shape[1]
    grouped = w.reshape(g, out // g, per_group, *w.shape[2:])
    ones = [1] * (w.dim() - 2)
    new_w = (grouped * scale.view(g, 1, per_group, *ones)).reshape(w.shape)
    # A constant input t per channel contributes Σ_i,k W[o,i,k]·t[i] to every output (no padding).
    added = (grouped * shift.view(g, 1, per_group, *ones)).sum(dim=tuple(range(2, grouped.dim()))).reshape(out)
    return _assign(layer, new_w, bias + added)


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    dtype = layer.weight.dtype
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=layer.weight.requires_grad)
            return True
        layer.bias.copy_(bias.to(dtype))
    return False


def mean_in_stds(bn) -> float:
    """max |μ| / √(σ² + ε): how far statistics sit from zero, in standard deviations."""
    mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
    return float((mean.abs() / (var + bn_eps(bn)).sqrt()).max()) if mean.numel() else 0.0


def _affine_module(bn, scale, shift) -> ChannelAffine:
    """x·s + t in one op; (x - μ)·s + β where μ is far from zero, so the subtraction happens first."""
    dtype = bn.running_mean.dtype
    if mean_in_stds(bn) <= MAX_FORWARD_FOLD_MEAN:
        return ChannelAffine(scale.to(dtype), shift.to(dtype))
    mean = bn.running_mean.detach().double()
    return ChannelAffine(scale.to(dtype), (shift + mean * scale).to(dtype), center=mean.to(dtype))


def _replace_bn(model, name, bn, scale, shift) -> None:
    dtype = bn.running_mean.dtype
    if has_standard_forward(bn):
        new = nn.Identity() if scale is None else _affine_module(bn, scale, shift)
        _replace_module(model, name, new)
    else:
        if scale is None:
            make_custom_bn_folded(bn, None, None)
        else:
            make_custom_bn_folded(bn, scale.to(dtype), shift.to(dtype))


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


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
    frozen = sum(len(flow.calls_of(m)) for m in model.modules() if is_frozen_bn(m))
    return flow.count("batch_norm") + frozen


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
