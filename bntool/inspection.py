"""Every BN layer of a model: its configuration, statistics, health, and what `fold` would do with it.

The records and the health rules are numpy (a BN module's tensors are read as float64 arrays): an ONNX file is
inspected by the same rules without importing torch, and both paths judge alike to the last bit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .choices import FoldAction
from .folding.math import bn_scale_shift, numpy64
from .layout import layout_of
from .utils import StrEnum, bn_eps, plural

if TYPE_CHECKING:  # torch where a PyTorch model is inspected, imported there
    import torch
    from torch import nn

DEAD_GAMMA = 1e-8  # |γ| below this (absolute) or below 1e-6·max|γ|: the channel outputs only its bias
FEW_UPDATES = 100  # running statistics averaged over fewer batches than this are noisy (a warning, not a failure)
BFLOAT16_MAX = 3.3895313892515355e38  # torch.finfo(torch.bfloat16).max; numpy has no bfloat16


class HealthKind(StrEnum):
    """What is wrong with a BN layer. Verdicts read the kind, never the message (messages are for people)."""

    NO_RUNNING_STATS = "no-running-stats"
    NON_FINITE = "non-finite"
    VAR_BELOW_EPS = "var-below-eps"
    NEVER_UPDATED = "never-updated"
    NEAR_DEAD = "near-dead-gamma"
    FEW_UPDATES = "few-updates"
    FOLD_SUBNORMAL = "fold-subnormal"
    FOLD_OVERFLOWS_HALF = "fold-overflows-half"


# Kinds that make eval-mode outputs wrong: verify fails on them. The others are reported, not failed.
FATAL_KINDS = frozenset({HealthKind.NO_RUNNING_STATS, HealthKind.NON_FINITE, HealthKind.VAR_BELOW_EPS,
                         HealthKind.NEVER_UPDATED})
# Kinds that are advice (yellow in tables, not counted as health problems).
ADVISORY_KINDS = frozenset({HealthKind.FEW_UPDATES, HealthKind.FOLD_SUBNORMAL, HealthKind.FOLD_OVERFLOWS_HALF})

# The words for each kind: str.format templates. Rewording one changes no verdict (tests/test_report.py).
HEALTH_MESSAGES = {
    HealthKind.NO_RUNNING_STATS: "no running statistics (track_running_stats=False)",
    HealthKind.NON_FINITE: "NaN/Inf in {tensor} ({channels})",
    HealthKind.VAR_BELOW_EPS: "var <= eps in {channels}",
    HealthKind.NEVER_UPDATED: "never updated: running stats are exactly 0/1",
    HealthKind.NEAR_DEAD: "near-dead: |gamma| ~ 0 in {channels}",
    HealthKind.FEW_UPDATES: "few updates: num_batches_tracked {tracked} < {few}; recalibrate",
    HealthKind.FOLD_SUBNORMAL: "subnormal fold: folding writes subnormal float32 values in {channels} "
                               "(|γ/√(var+eps)| down to {smallest:.2g})",
    HealthKind.FOLD_OVERFLOWS_HALF: "{dtypes} overflow: folding writes values beyond {dtypes} in {channels} "
                                    "(largest {largest:.3g})",
}


@dataclass
class HealthFlag:
    """One health problem of a BN layer: its kind, whether it fails `verify`, and the words for people."""

    kind: HealthKind
    message: str
    fatal: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fatal = self.kind in FATAL_KINDS

    @property
    def advisory(self) -> bool:
        return self.kind in ADVISORY_KINDS

    @classmethod
    def of(cls, kind: HealthKind, **details: Any) -> HealthFlag:
        return cls(kind, HEALTH_MESSAGES[kind].format(**details))


@dataclass
class TensorSummary:
    """min, max and mean over the finite values; how many are NaN/Inf (never hidden by the range)."""

    min: float
    max: float
    mean: float
    non_finite: int = 0

    @classmethod
    def of(cls, t: Any) -> TensorSummary | None:
        """Of a tensor or array (None: None)."""
        if t is None:
            return None
        values = numpy64(t)
        if values.size == 0:
            return None
        finite = values[np.isfinite(values)]
        bad = values.size - finite.size
        if finite.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), bad)
        return cls(float(finite.min()), float(finite.max()), float(finite.mean()), bad)


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
    health: list[HealthFlag] = field(default_factory=list)
    fold_action: str | None = None
    fold_target: str | None = None
    fold_reason: str = ""

    @property
    def flags(self) -> list[str]:
        """The health messages, for people."""
        return [f.message for f in self.health]

    @property
    def fatal(self) -> bool:
        return any(f.fatal for f in self.health)

    @property
    def problems(self) -> list[HealthFlag]:
        """Health flags that are more than advice."""
        return [f for f in self.health if not f.advisory]

    def to_dict(self) -> dict[str, Any]:
        """The layer's fields; `health` typed ({kind, message, fatal}), `flags` its messages for reading."""
        return {**asdict(self), "flags": self.flags}


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
        return {**asdict(self), "layers": [layer.to_dict() for layer in self.layers]}


def health_flags(module: Any) -> list[str]:
    """The messages of `health(module)`."""
    return [f.message for f in health(module)]


def health(module: Any) -> list[HealthFlag]:
    """Problems that make a BN produce wrong or degenerate outputs in eval mode, and folds that would give
    subnormal or half-precision-overflowing values (judged from the BN alone: weights of magnitude 1)."""
    if getattr(module, "running_mean", None) is None or getattr(module, "running_var", None) is None:
        return [HealthFlag.of(HealthKind.NO_RUNNING_STATS)]
    flags = []
    mean, var = numpy64(module.running_mean), numpy64(module.running_var)
    tensors = {"running_mean": mean, "running_var": var,
               **{key: None if getattr(module, key, None) is None else numpy64(getattr(module, key))
                  for key in ("weight", "bias")}}
    for key, t in tensors.items():
        if t is not None and not np.isfinite(t).all():
            flags.append(HealthFlag.of(HealthKind.NON_FINITE, tensor=key,
                                       channels=plural(int((~np.isfinite(t)).sum()), "channel")))
    low = int((var <= bn_eps(module)).sum())
    if low:
        flags.append(HealthFlag.of(HealthKind.VAR_BELOW_EPS, channels=plural(low, "channel")))
    weight = tensors["weight"]
    if weight is not None and weight.size:
        gamma = np.abs(weight)
        dead = int(((gamma < DEAD_GAMMA) | (gamma < 1e-6 * float(gamma.max()))).sum())
        if dead:
            flags.append(HealthFlag.of(HealthKind.NEAR_DEAD, channels=plural(dead, "channel")))
    tracked = getattr(module, "num_batches_tracked", None)
    # Only statistics still at their initial values mean "never updated": num_batches_tracked is 0 in healthy
    # checkpoints saved before the buffer existed, converted from other frameworks, or with buffers filtered.
    if bool((mean == 0).all()) and bool((var == 1).all()):
        flags.append(HealthFlag.of(HealthKind.NEVER_UPDATED))
    elif tracked is not None and 0 < int(tracked) < FEW_UPDATES:
        flags.append(HealthFlag.of(HealthKind.FEW_UPDATES, tracked=int(tracked), few=FEW_UPDATES))
    if not any(f.fatal for f in flags):
        scale, shift = bn_scale_shift(mean, var, tensors["weight"], tensors["bias"], bn_eps(module))
        flags += fold_range_flags(scale, shift, np.abs(scale).reshape(-1, 1))
    return flags


FOLD_RANGE_KINDS = (HealthKind.FOLD_SUBNORMAL, HealthKind.FOLD_OVERFLOWS_HALF)


def _judge_planned_fold_ranges(model: nn.Module, plan, layers: list[BNLayerInfo], tensors) -> None:
    """With a fold plan, judge the fold's range on the values it would write: the BN's scale times the weights
    of the layers it folds into (not weights of magnitude 1); a refused BN writes nothing."""
    modules = dict(model.named_modules())
    by_name = {layer.name: layer for layer in layers}
    for step in plan.steps:
        layer = by_name[step.decision.name]
        action = step.decision.action
        if layer.fatal or action == FoldAction.AFFINE:  # an affine writes the scale: judged as it is
            continue
        layer.health = [f for f in layer.health if f.kind not in FOLD_RANGE_KINDS]
        if action == FoldAction.REFUSED:
            continue
        f = step.functional
        if f is not None:
            scale, shift = bn_scale_shift(tensors[f.running_mean], tensors[f.running_var], tensors.get(f.weight),
                                       tensors.get(f.bias), f.eps)
        else:
            bn = modules[layer.name]
            scale, shift = bn_scale_shift(bn.running_mean, bn.running_var, getattr(bn, "weight", None),
                                       getattr(bn, "bias", None), bn_eps(bn))
        bounds = _weight_bounds(step, modules, scale.numel(), forward=action == FoldAction.FOLDED_FORWARD)
        scale, shift = numpy64(scale), numpy64(shift)
        layer.health += fold_range_flags(scale, shift, np.abs(scale).reshape(-1, 1) * bounds.numpy())


def _weight_bounds(step, modules: dict[str, nn.Module], channels: int, forward: bool) -> torch.Tensor:
    """Per BN channel, (smallest nonzero |w|, largest |w|) over the target weights its scale multiplies."""
    import torch

    low = torch.full((channels,), float("inf"), dtype=torch.float64)
    high = torch.zeros(channels, dtype=torch.float64)
    for target in step.targets:
        rows = _rows_per_channel(modules[target.layer], forward).abs()
        index = torch.tensor(target.channels, dtype=torch.long)
        nonzero = torch.where(rows > 0, rows, torch.full_like(rows, float("inf")))
        low = low.scatter_reduce(0, index, nonzero.amin(dim=1), "amin")
        high = high.scatter_reduce(0, index, rows.amax(dim=1), "amax")
    low = torch.where(torch.isinf(low), torch.ones_like(low), low)  # no target weight: judge the scale alone
    high = torch.where(high == 0, torch.ones_like(high), high)
    return torch.stack([low, high], dim=1).to(torch.float64)


def _rows_per_channel(layer: nn.Module, forward: bool) -> torch.Tensor:
    """The layer's weight as one row per channel the BN's scale multiplies: output channels when the BN folds
    into its producer, input channels when it folds forward (grouped convolutions: per group)."""
    import torch
    from torch import nn

    w = cast(torch.Tensor, layer.weight).detach().cpu().double()
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    if isinstance(layer, nn.Linear):
        return w.t() if forward else w
    g = cast(int, layer.groups)
    if transposed != forward:  # channels along the weight's second axis, per group
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
        return grouped.permute(0, 2, 1, 3).reshape(g * w.shape[1], -1)
    return w.reshape(w.shape[0], -1)


def fold_range_flags(scale: np.ndarray, shift: np.ndarray, folded: np.ndarray) -> list[HealthFlag]:
    """Flags for folded values out of range. `folded`: |values| a fold writes, one row per BN channel (float64):
    nonzero below float32's smallest normal is subnormal (slow on many CPUs and runtimes); over float16's
    (or bfloat16's) largest is inf once cast to half precision. `shift` is the BN's shift (a bias written too)."""
    folded = np.concatenate([np.abs(folded), np.abs(shift).reshape(-1, 1)], axis=1)
    flags = []
    tiny = float(np.finfo(np.float32).tiny)
    subnormal = ((folded > 0) & (folded < tiny)).any(axis=1)
    if subnormal.any():
        flags.append(HealthFlag.of(HealthKind.FOLD_SUBNORMAL, channels=plural(int(subnormal.sum()), "channel"),
                                   smallest=float(np.abs(scale)[subnormal].min())))
    half_max, bf16_max = float(np.finfo(np.float16).max), BFLOAT16_MAX
    overflowing = (folded > half_max).any(axis=1)
    if overflowing.any():
        largest = float(folded.max())
        dtypes = "float16 and bfloat16" if largest > bf16_max else "float16"
        flags.append(HealthFlag.of(HealthKind.FOLD_OVERFLOWS_HALF, dtypes=dtypes, largest=largest,
                                   channels=plural(int(overflowing.sum()), "channel")))
    return flags


def describe_layer(name: str, module: nn.Module) -> BNLayerInfo:
    from .layers import bn_type_name

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
        health=health(module),
    )


def inspect(model: nn.Module, example_inputs: Sequence[Any] | torch.Tensor | None = None, *,
            device: str | torch.device | None = None) -> InspectReport:
    """Describe every BN-family layer; with example inputs, also plan the fold (`plan_fold`: decisions only,
    the model is not copied or changed) and find F.batch_norm calls made on a module's own tensors.

    `device`: run the fold plan's forward there (inputs moved too; the model is put back afterwards).
    Default: where the model is, inputs as given."""
    import torch

    from .devices import check_not_meta, moved_to, to_device

    check_not_meta(model)
    with moved_to(model, device) as dev:
        if example_inputs is not None and device is not None:
            inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
            example_inputs = to_device(inputs, dev)
        return _inspect(model, example_inputs)


def _inspect(model: nn.Module, example_inputs) -> InspectReport:
    import torch

    from .layers import bn_modules

    layers = [describe_layer(name, m) for name, m in bn_modules(model)]
    report = InspectReport(layers=layers, total_modules=sum(1 for _ in model.modules()),
                           total_params=sum(p.numel() for p in model.parameters()), fold_planned=False,
                           folded=layout_of(model) is not None)
    if example_inputs is not None and not isinstance(model, torch.jit.ScriptModule):
        from .folding import plan_fold

        plan = plan_fold(model, example_inputs)
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(model.named_buffers(remove_duplicate=False))
        # F.batch_norm calls on a module's own tensors are BN layers too, found only by running the forward.
        layers += [describe_functional(s.decision.name, s.functional, tensors) for s in plan.steps
                   if s.functional is not None]
        by_name = {d.name: d for d in plan.decisions}
        for layer in layers:
            d = by_name[layer.name]
            layer.fold_action, layer.fold_target, layer.fold_reason = d.action, d.target, d.reason
        _judge_planned_fold_ranges(model, plan, layers, tensors)
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
        weight=TensorSummary.of(state.weight), bias=TensorSummary.of(state.bias), health=health(state))
