"""Apply a fold plan to a PyTorch module, in place: the new weights from folding/math.py, cast once; each BN
replaced by Identity, ChannelAffine or FoldedNormAct (or its batch_norm call intercepted). Decides nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from ..layers import (
    ChannelAffine,
    DepthwiseAffine,
    FoldedNormAct,
    has_standard_forward,
    make_custom_bn_folded,
    norm_act_parts,
    plain_depthwise_1x1,
    replace_module,
)
from ..layout import FoldLayout, named_module
from ..utils import bn_eps
from . import math as fm
from .planner import AFFINE, FOLDED, REFUSED, FoldPlan, FunctionalBN

# The `type: ignore`s below: torch types a module's attributes (a BN's running_mean, a layer's weight) as
# Tensor | Module (nn.Module.__getattr__), though these are tensors; [misc] on norm_act_parts(bn): not None where
# the plan says norm_act.


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 such that the eval-mode BN module computes x·scale + shift per channel."""
    return fm.bn_scale_shift(bn.running_mean, bn.running_var, getattr(bn, "weight", None),
                             getattr(bn, "bias", None), bn_eps(bn))


def fold_weights_producer(layer: nn.Module, scale, shift):
    """The layer's folded (weight, bias) in float64, with a per-output-channel affine folded into it."""
    return fm.fold_into_producer(layer.weight, layer.bias, scale, shift,
                                 groups=getattr(layer, "groups", 1),
                                 transposed=isinstance(layer, _ConvTransposeNd))


def fold_weights_consumer(layer: nn.Module, scale, shift):
    """The layer's folded (weight, bias) in float64, with a per-input-channel affine folded into it."""
    return fm.fold_into_consumer(layer.weight, layer.bias, scale, shift,
                                 groups=getattr(layer, "groups", 1))


@dataclass
class Applied:
    """What apply_fold_plan changed: the layout, and how many values it flushed from subnormal to zero."""

    layout: FoldLayout
    subnormals_flushed: int = 0
    flushed_in: list[str] = field(default_factory=list)  # the layers and BN replacements that had some


def apply_fold_plan(model: nn.Module, plan: FoldPlan, *, flush_subnormals: bool = False) -> FoldLayout:
    """Carry out `plan` (made by plan_fold on this model or an identical copy) on `model`, in place.
    Returns the fold layout: which BNs became identity or affine, which layers got a bias."""
    return apply_plan(model, plan, flush_subnormals=flush_subnormals).layout


def apply_plan(model: nn.Module, plan: FoldPlan, *, flush_subnormals: bool = False) -> Applied:
    """apply_fold_plan, also counting the subnormals flushed (with `flush_subnormals`: every value the fold
    writes that its dtype holds only as a subnormal, and that was not one before, becomes 0)."""
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    layout = FoldLayout()
    writer = _Writer(flush_subnormals)
    for step in plan.steps:
        d = step.decision
        if d.action == REFUSED:
            continue
        if step.functional is not None:
            f = step.functional
            scale, shift = fm.bn_scale_shift(tensors[f.running_mean], tensors[f.running_var],
                                             tensors.get(f.weight), tensors.get(f.bias), f.eps)  # type: ignore[arg-type]  # get(None): None
        else:
            bn = named_module(modules, d.name)
            scale, shift = bn_affine(bn)
        for target in step.targets:
            layer = named_module(modules, target.layer)
            layer_scale, layer_shift = fm.select_channels(scale, shift, target.channels, target.shift)
            if d.action == FOLDED:
                weight, bias = fold_weights_producer(layer, layer_scale, layer_shift)
            else:
                weight, bias = fold_weights_consumer(layer, layer_scale, layer_shift)
            if writer.assign(layer, weight, bias, target.layer):
                layout.bias_added.append(target.layer)
        if step.functional is not None:
            _make_batch_norm_identity(tensors, step.functional)
        elif d.action == AFFINE:
            layout.affine.append(d.name)
            if step.centered:
                layout.centered.append(d.name)
            _replace_bn(model, d.name, bn, writer, (scale, shift), step.norm_act, step.centered)
        else:
            layout.identity.append(d.name)
            _replace_bn(model, d.name, bn, writer, None, step.norm_act)
        if step.norm_act:
            layout.norm_act.append(d.name)
    layout.bias_added = sorted(set(layout.bias_added))
    return Applied(layout, writer.flushed, sorted(set(writer.flushed_in)))


class _Writer:
    """Casts float64 results once to their destination dtype, flushing new subnormals when asked to."""

    flushed_in: list[str]

    def __init__(self, flush: bool):
        self.flush, self.flushed, self.flushed_in = flush, 0, []

    def cast(self, value: torch.Tensor, dtype: torch.dtype, before: torch.Tensor | None, where: str) -> torch.Tensor:
        if not self.flush:
            return value.to(dtype)
        cast, count = fm.cast_flushing_subnormals(value, dtype, before)
        if count:
            self.flushed += count
            self.flushed_in.append(where)
        return cast

    def assign(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> bool:
        """Write the folded weight and bias into the layer; True where a bias had to be added."""
        dtype = layer.weight.dtype
        with torch.no_grad():
            layer.weight.copy_(self.cast(weight, dtype, layer.weight, name))  # type: ignore[operator, arg-type]
            if bias is None:
                return False
            if layer.bias is None:
                new_bias = self.cast(bias, dtype, None, name).to(layer.weight.device)
                layer.bias = nn.Parameter(new_bias, requires_grad=layer.weight.requires_grad)
                return True
            layer.bias.copy_(self.cast(bias, dtype, layer.bias, name))  # type: ignore[operator, arg-type]
        return False


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


def affine_module(bn: nn.Module, scale: torch.Tensor, shift: torch.Tensor, centered: bool,
                  writer: _Writer | None = None, name: str = "") -> ChannelAffine:
    """x·s + t in one op; (x - μ)·s + β where `centered` (μ far from zero), so the subtraction happens first."""
    device, dtype = bn.running_mean.device, bn.running_mean.dtype
    writer = writer or _Writer(False)
    center = None
    if centered:
        scale, shift = fm.affine_with_center(scale, shift, bn.running_mean)
        center = bn.running_mean.detach().to(device, dtype)  # type: ignore[operator, arg-type]
    return ChannelAffine(writer.cast(scale, dtype, None, name).to(device),  # type: ignore[arg-type]
                         writer.cast(shift, dtype, None, name).to(device), center=center)  # type: ignore[arg-type]


def _replace_bn(model: nn.Module, name: str, bn: nn.Module, writer: _Writer,
                affine: tuple[torch.Tensor, torch.Tensor] | None, norm_act: bool = False,
                centered: bool = False) -> None:
    """The BN module becomes Identity (affine None: folded) or the exact affine, keeping a BN+act's own act."""
    if has_standard_forward(bn) or norm_act:
        new = nn.Identity() if affine is None else affine_module(bn, *affine, centered, writer, name)
        replace_module(model, name, FoldedNormAct(new, *norm_act_parts(bn)) if norm_act else new)  # type: ignore[misc]
    elif affine is None:
        make_custom_bn_folded(bn, None, None)
    else:
        device, dtype = bn.running_mean.device, bn.running_mean.dtype
        scale, shift = (writer.cast(t, dtype, None, name).to(device) for t in affine)  # type: ignore[arg-type]
        make_custom_bn_folded(bn, scale, shift)


def fold_target_modules(model: nn.Module, plan: FoldPlan) -> list[nn.Module]:
    """The conv/linear modules a plan folds BNs into."""
    modules = dict(model.named_modules())
    return [named_module(modules, t.layer) for s in plan.steps if s.decision.action != REFUSED for t in s.targets]


def depthwise_to_affine(model: nn.Module, layers: list[nn.Module]) -> list[str]:
    """Replace each of `layers` still in `model` that is a plain depthwise 1×1 conv by the DepthwiseAffine
    computing the same numbers: PyTorch runs such a conv as one small conv per channel at small batches
    (its bias added per channel too), so with a BN folded in it ran slower than conv + BN. Returns every
    name replaced (a module registered under several names: all of them)."""
    wanted = {id(m) for m in layers if plain_depthwise_1x1(m)}
    names = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if id(m) in wanted]
    made: dict[int, DepthwiseAffine] = {}
    for name, conv in names:
        if id(conv) not in made:
            w = conv.weight.detach().reshape(-1)
            b = conv.bias.detach() if conv.bias is not None else torch.zeros_like(w)
            made[id(conv)] = DepthwiseAffine(w, b, conv.weight.dim() - 2)
        replace_module(model, name, made[id(conv)])
    return [name for name, _ in names]
