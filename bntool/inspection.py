"""Every BN layer of a model: its configuration, statistics, health, and what `fold` would do with it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .devices import as_float64, check_not_meta, moved_to, to_device
from .layers import bn_eps, bn_modules, bn_type_name
from .layout import layout_of
from .utils import plural

DEAD_GAMMA = 1e-8  # |γ| below this (absolute) or below 1e-6·max|γ|: the channel outputs only its bias
FEW_UPDATES = 100  # running statistics averaged over fewer batches than this are noisy (a warning, not a failure)
FEW_UPDATES_FLAG = "few updates"


@dataclass
class TensorSummary:
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, t: torch.Tensor | None) -> TensorSummary | None:
        if t is None or t.numel() == 0:
            return None
        t = as_float64(t)
        finite = t[torch.isfinite(t)]
        if finite.numel() == 0:
            return cls(float("nan"), float("nan"), float("nan"))
        return cls(float(finite.min()), float(finite.max()), float(finite.mean()))


@dataclass
class BNLayerInfo:
    name: str
    type: str
    channels: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    num_batches_tracked: int | None
    running_mean: TensorSummary | None
    running_var: TensorSummary | None
    weight: TensorSummary | None
    bias: TensorSummary | None
    flags: list[str] = field(default_factory=list)
    fold_action: str | None = None
    fold_target: str | None = None
    fold_reason: str = ""


@dataclass
class InspectReport:
    layers: list[BNLayerInfo]
    total_modules: int
    total_params: int
    fold_planned: bool
    batch_norm_calls_unplanned: list[str] = field(default_factory=list)  # F.batch_norm calls fold cannot handle
    folded: bool = False  # bntool folded this model (it carries a fold layout)

    @property
    def unhealthy(self) -> list[BNLayerInfo]:
        return [layer for layer in self.layers if layer.flags]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def health_flags(module: nn.Module) -> list[str]:
    """Problems that make a BN produce wrong or degenerate outputs in eval mode."""
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if mean is None or var is None:
        return ["no running statistics (track_running_stats=False)"]
    flags = []
    tensors = {"running_mean": mean, "running_var": var, "weight": getattr(module, "weight", None),
               "bias": getattr(module, "bias", None)}
    for key, t in tensors.items():
        if t is not None and not torch.isfinite(t).all():
            flags.append(f"NaN/Inf in {key} ({plural(int((~torch.isfinite(t)).sum()), 'channel')})")
    low = int((as_float64(var) <= bn_eps(module)).sum())
    if low:
        flags.append(f"var <= eps in {plural(low, 'channel')}")
    weight = tensors["weight"]
    if weight is not None and weight.numel():
        gamma = as_float64(weight).abs()
        dead = int(((gamma < DEAD_GAMMA) | (gamma < 1e-6 * float(gamma.max()))).sum())
        if dead:
            flags.append(f"near-dead: |gamma| ~ 0 in {plural(dead, 'channel')}")
    tracked = getattr(module, "num_batches_tracked", None)
    # Only statistics still at their initial values mean "never updated": num_batches_tracked is 0 in healthy
    # checkpoints saved before the buffer existed, converted from other frameworks, or with buffers filtered.
    if bool((mean == 0).all()) and bool((var == 1).all()):
        flags.append("never updated: running stats are exactly 0/1")
    elif tracked is not None and 0 < int(tracked) < FEW_UPDATES:
        flags.append(f"{FEW_UPDATES_FLAG}: num_batches_tracked {int(tracked)} < {FEW_UPDATES}; recalibrate")
    return flags


def describe_layer(name: str, module: nn.Module) -> BNLayerInfo:
    mean = getattr(module, "running_mean", None)
    tracked = getattr(module, "num_batches_tracked", None)
    weight = getattr(module, "weight", None)
    return BNLayerInfo(
        name=name,
        type=bn_type_name(module),
        channels=int(mean.numel()) if mean is not None else int(getattr(module, "num_features", 0)),
        eps=bn_eps(module),
        momentum=getattr(module, "momentum", None),
        affine=bool(getattr(module, "affine", weight is not None)),
        track_running_stats=bool(getattr(module, "track_running_stats", mean is not None)),
        training=module.training,
        num_batches_tracked=int(tracked) if tracked is not None else None,
        running_mean=TensorSummary.of(mean),
        running_var=TensorSummary.of(getattr(module, "running_var", None)),
        weight=TensorSummary.of(weight),
        bias=TensorSummary.of(getattr(module, "bias", None)),
        flags=health_flags(module),
    )


def inspect(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
            device: str | torch.device | None = None) -> InspectReport:
    """Describe every BN-family layer; with example inputs, also plan the fold (`plan_fold`: decisions only,
    the model is not copied or changed) and find F.batch_norm calls made on a module's own tensors.

    `device`: run the fold plan's forward there (inputs moved too; the model is put back afterwards).
    Default: where the model is, inputs as given."""
    check_not_meta(model)
    with moved_to(model, device) as dev:
        if example_inputs is not None and device is not None:
            inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
            example_inputs = to_device(inputs, dev)
        return _inspect(model, example_inputs)


def _inspect(model: nn.Module, example_inputs) -> InspectReport:
    layers = [describe_layer(name, m) for name, m in bn_modules(model)]
    report = InspectReport(layers=layers, total_modules=sum(1 for _ in model.modules()),
                           total_params=sum(p.numel() for p in model.parameters()), fold_planned=False,
                           folded=layout_of(model) is not None)
    if example_inputs is not None and not isinstance(model, torch.jit.ScriptModule):
        from .folding import plan_fold

        plan = plan_fold(model, example_inputs)
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        # F.batch_norm calls on a module's own tensors are BN layers too, found only by running the forward.
        layers += [describe_functional(s.decision.name, s.functional, tensors) for s in plan.steps
                   if s.functional is not None]
        by_name = {d.name: d for d in plan.decisions}
        for layer in layers:
            d = by_name[layer.name]
            layer.fold_action, layer.fold_target, layer.fold_reason = d.action, d.target, d.reason
        report.fold_planned = True
        report.batch_norm_calls_unplanned = plan.unaccounted_ops
    return report


def describe_functional(name: str, call, tensors: dict[str, torch.Tensor]) -> BNLayerInfo:
    """A BN layer that is an F.batch_norm call on some module's own statistics (no BatchNorm module)."""
    state = SimpleNamespace(running_mean=tensors[call.running_mean], running_var=tensors[call.running_var],
                            weight=tensors.get(call.weight), bias=tensors.get(call.bias), eps=call.eps)
    return BNLayerInfo(
        name=name, type="F.batch_norm", channels=int(state.running_mean.numel()), eps=call.eps, momentum=None,
        affine=state.weight is not None, track_running_stats=True, training=False, num_batches_tracked=None,
        running_mean=TensorSummary.of(state.running_mean), running_var=TensorSummary.of(state.running_var),
        weight=TensorSummary.of(state.weight), bias=TensorSummary.of(state.bias), flags=health_flags(state))
