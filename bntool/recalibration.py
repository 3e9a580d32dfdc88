"""Re-estimate BatchNorm running statistics over calibration data.

Only BN layers gather statistics; every other module stays in eval mode (dropout, drop-path off).
Modes:
  cumulative  BN layers normalize with batch statistics as in training; the stored statistics are the exact
              pooled mean and unbiased variance over every sample seen (order independent).
  ema         what training does: running = (1 - momentum)·running + momentum·batch.
  exact       eval-mode statistics: every BN input is normalized exactly over the data given the final
              statistics of the BNs before it, independent of the batch size. Takes one pass per BN level
              (the longest chain of BNs, from the dataflow); each pass stops after its level's last BN and
              starts from the last cached final activation before it (segments.py), within a memory budget.
              Where one traced forward cannot show every batch's BN dependencies (a BN run more than once per
              forward, data-dependent control flow), whole passes are iterated to the same fixed point instead.
Statistics are merged in float64 with Chan's parallel formula; across processes with torch.distributed.
This module is the API and the train-mode modes; exact mode is recalibration_exact.py, and what every mode's
passes share (the report, the batches, a pass on every rank, float64 statistics) is recalibration_passes.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import nn

from .choices import RecalibrationMode
from .devices import Placement, as_float64, check_not_meta, device_of, modes_kept, resolve_device
from .errors import InputError, param
from .layers import bn_modules, bn_stats, is_frozen_bn
from .layout import layout_of
from .recalibration_exact import exact_statistics
from .recalibration_passes import (  # the report types and ChannelStats are part of this module's API
    Batches,
    ChannelStats,
    LayerShift,
    Prior,
    ProgressFn,
    RecalibrationReport,
    Run,
    SavedState,
    all_reduce,
    global_counts,
    run_pass,
    world_size,
    write_all,
)
from .utils import bn_eps, short_list


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    mode: str = "cumulative",
    momentum: float = 0.1,
    reset: bool = True,
    num_batches: int | None = None,
    num_samples: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    channels_last: bool = False,
    input_key: str | None = None,
    prior: float | None = None,
    cache_budget: int | None = None,
    progress: ProgressFn | None = None,
) -> RecalibrationReport:
    """Re-estimate the running statistics of every BN layer of `model` in place; return what changed.

    Args:
        model: any nn.Module. Only its BN layers gather statistics; every other module runs in eval mode
            (dropout and drop-path off, also those inside a BN subclass).
        data: batches: tensors, (input, label) tuples or dicts. `exact` mode iterates over it several times,
            so it must be re-iterable (a list or DataLoader) and yield the same batches each time.
        mode: "cumulative" (train-mode normalization, exact pooled mean and unbiased variance over all samples),
            "ema" (as training does, with `momentum`) or "exact" (eval-mode statistics, batch-size independent).
        momentum, reset: `ema` mode only: the EMA factor, and whether to start from mean 0 / variance 1.
        num_batches, num_samples: use at most this many batches / samples (per pass, per process).
        device: run on this device (default: where the model's parameters are).
        amp: autocast (bfloat16 on CPU, float16 on CUDA).
        channels_last: run 4-D activations in channels_last memory format.
        input_key: the model input's key in dict batches.
        prior: `cumulative`/`exact`: blend with the model's current (source) statistics as N pseudo-samples
            (Schneider et al. 2020): μ = (N·μs + n·μt)/(N + n), σ² = (N·σs² + n·σt²)/(N + n), n the
            calibration samples. Helps when adapting from few images; None or 0: target statistics only.
        cache_budget: `exact` mode: bytes of activations the segment cache may hold (default: half the free
            memory of the device the model runs on; 0: no cache, one whole forward per BN level).
        progress: called as progress(samples done in this pass, pass number, number of passes), with 0 done at
            the start of each pass; the number of passes is known from the first call (exact: one per BN level;
            an estimate where exact mode iterates whole passes to a fixed point).

    Returns:
        A RecalibrationReport: per-layer shift of the statistics, samples, batches, passes, seconds.

    Raises:
        InputError: bad arguments, a model without usable BN layers, data the model rejects or that contains
            NaN/Inf, statistics that overflow. Under torch.distributed, a failure on one rank raises on all.

    Side effects: only the BN buffers (running_mean, running_var, num_batches_tracked) change. Module modes,
    momentum, and the device and memory format of every parameter and buffer are put back as they were given
    (the same tensor objects, so optimizers holding them keep working); while a `device` or `channels_last` run
    is in progress the original tensors are kept alongside the moved ones. On any error or Ctrl-C the statistics
    are restored too. Under torch.distributed, each rank passes over its own data and the statistics are merged
    exactly across ranks, so every rank ends with the same model.
    """
    from .data import first_input

    mode = _check_arguments(model, data, mode, momentum, prior, cache_budget)
    layers, usable = _bn_layers(model, prior)
    dev = device_of(model) if device is None else resolve_device(device)
    batches = Batches(data, first_input, input_key, dev, num_batches, num_samples, channels_last,
                      same_every_pass=mode == RecalibrationMode.EXACT)
    report = RecalibrationReport(mode=str(mode), prior=prior or None)
    old = {n: (as_float64(mean).clone(), as_float64(var).clone(), bn_eps(m))
           for n, m in usable for mean, var in [bn_stats(m)]}
    started = time.perf_counter()
    with _recalibrating(model, usable, dev if device is not None else None, channels_last) as saved:
        run = Run(model, usable, batches, report, progress, dev, momentum, reset,
                  Prior(prior, saved, batches) if prior else None, cache_budget)
        with torch.no_grad(), _autocast(dev, amp):
            _MODES[mode](run)
        _check_finite(usable, amp)
        _keep_training_history(usable, saved)
    report.seconds = time.perf_counter() - started
    report.samples, report.batches = global_counts(batches.samples_per_pass, batches.batches_per_pass)
    report.world_size = world_size()
    report.layers = [_shift(n, m, old.get(n), batches.values_per_channel.get(n, 0), counted=mode != "ema")
                     for n, m in layers]
    return report


def _check_arguments(model, data, mode, momentum, prior, cache_budget) -> RecalibrationMode:
    """The arguments' own checks, before anything runs: InputError naming the parameter."""
    check_not_meta(model)
    if mode not in set(RecalibrationMode):
        raise InputError(f"{param('mode')} {mode!r}: choose one of {', '.join(RecalibrationMode)}", param="mode")
    mode = RecalibrationMode(mode)
    if mode == RecalibrationMode.EMA and not (isinstance(momentum, (int, float)) and 0.0 < momentum <= 1.0):
        raise InputError(f"{param('momentum')} {momentum}: must be in (0, 1]", param="momentum")
    if prior is not None and not (isinstance(prior, (int, float)) and prior >= 0 and math.isfinite(prior)):
        raise InputError(f"{param('prior')} {prior}: the pseudo-count of source samples must be a finite number "
                         ">= 0", param="prior")
    if prior and mode == RecalibrationMode.EMA:
        raise InputError(f"{param('prior')}: blending with the source statistics applies to cumulative and exact "
                         "modes", param="prior")
    if cache_budget is not None and not (isinstance(cache_budget, (int, float)) and not isinstance(cache_budget, bool)
                                         and math.isfinite(cache_budget) and cache_budget >= 0):
        raise InputError(f"{param('cache_budget')} {cache_budget!r}: must be a finite number of bytes >= 0",
                         param="cache_budget")
    if mode == RecalibrationMode.EXACT and iter(data) is data:
        raise InputError("exact mode passes over the data several times: give a re-iterable (list, DataLoader)")
    return mode


def _bn_layers(model, prior) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """Every BN layer (for the report), and those that can be recalibrated; InputError where none can, or where
    a prior has no source to blend with."""
    layers = bn_modules(model)
    if not layers:
        folded = " (bntool folded it: recalibrate the checkpoint from before the fold, then fold again)"
        raise InputError("the model has no BatchNorm layers: nothing to recalibrate"
                         + (folded if layout_of(model) is not None else ""))
    usable = [(n, m) for n, m in layers if _skip_reason(m) == ""]
    if not usable:
        raise InputError("no BatchNorm layer tracks running statistics: nothing to recalibrate")
    if prior:
        _check_prior_source(usable)
    return layers, usable


def _check_prior_source(layers) -> None:
    """A prior trusts the checkpoint's statistics as N samples. NaN/Inf, or statistics that were never updated
    (num_batches_tracked 0 with the initial mean 0 and variance 1, a layer added after training), are no
    source: blending would pull the target statistics toward N(0, 1) without a word, so it is refused."""
    for n, m in layers:
        if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
            raise InputError(f"{param('prior')}: the statistics of {n} contain NaN/Inf, there is no source to blend "
                             "with; recalibrate without a prior", param="prior")
    fresh = [n for n, m in layers if _never_updated(m)]
    if fresh:
        raise InputError(f"{param('prior')}: the statistics of {short_list(fresh)} were never updated "
                         "(num_batches_tracked 0, mean 0, variance 1), there is no source to blend with; "
                         "recalibrate without a prior", param="prior")


def _never_updated(m: nn.Module) -> bool:
    tracked = getattr(m, "num_batches_tracked", None)
    return (tracked is not None and int(tracked) == 0 and not bool(cast(torch.Tensor, m.running_mean).any())
            and bool((cast(torch.Tensor, m.running_var) == 1).all()))


@contextlib.contextmanager
def _recalibrating(model: nn.Module, layers, device: torch.device | None, channels_last: bool
                   ) -> Iterator[dict[str, SavedState]]:
    """The model in eval mode (on `device`, in channels_last) with SyncBatchNorm normalizing per process;
    afterwards every module's flag, each BN's momentum, and every tensor's place and format as they were, and on
    any error or Ctrl-C the statistics too. Yields the statistics as given (the source of a prior)."""
    saved = {n: _save(m) for n, m in layers}
    placement = Placement(model)
    try:
        with modes_kept(model), _sync_bn_per_process(model):
            model.eval()
            if device is not None:
                model.to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs omit it
            yield saved
    except BaseException:
        for n, m in layers:
            _restore(m, saved[n])
        raise
    finally:
        placement.restore()
        for n, m in layers:
            m.momentum = saved[n].momentum


def _cumulative(run: Run) -> None:
    stats = _batch_stats_pass(run.model, run.layers, run.batches, run.progress)
    write_all(run.layers, stats, run.batches.batches_per_pass, run.prior)
    run.report.passes = 1


def _batch_stats_pass(model, layers, batches, progress) -> dict[str, ChannelStats]:
    """BN layers normalize with batch statistics (train mode, momentum 1 so the buffers hold the batch's
    mean and unbiased variance after each call); those are pooled in float64, over every call of a BN
    that runs more than once per forward."""
    stats = {n: ChannelStats(m.running_mean.numel(), m.running_mean.device) for n, m in layers}
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers}

    def collect(name):
        def hook(module, args, output):
            x = args[0]
            n = x.numel() // x.shape[1]
            stats[name].add(n, module.running_mean, as_float64(module.running_var) * (n - 1))
        return hook

    handles = []
    for n, m in layers:
        # momentum 1 overwrites the buffers with each batch's statistics, but as 0·old + 1·batch: NaN/Inf in
        # the old statistics would survive it. Start from finite values; layers no batch reached get theirs back.
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
        m.training = True  # the BN itself only: children of a BN subclass (dropout, drop-path) stay in eval
        m.momentum = 1.0
        handles.append(m.register_forward_hook(collect(n)))
    try:
        run_pass(model, batches, progress, 1, passes=1)
    finally:
        for h in handles:
            h.remove()
        for n, m in layers:
            m.training = False
            if stats[n].count == 0:
                m.running_mean.copy_(before[n][0])
                m.running_var.copy_(before[n][1])
    all_reduce(stats, batches)
    return stats


def _ema(run: Run) -> None:
    counted = run.batches.values_per_channel
    hooks = []
    for name, m in run.layers:
        if run.reset:
            m.reset_running_stats()  # type: ignore[operator]  # a BN's method: torch types it Tensor | Module
        m.momentum = run.momentum  # type: ignore[assignment]
        m.training = True  # not m.train(): that would also switch a BN subclass's own dropout/drop-path on
        hooks.append(m.register_forward_pre_hook(functools.partial(_count_values, counted, name)))
    try:
        run_pass(run.model, run.batches, run.progress, 1, passes=1)
    finally:
        for hook in hooks:
            hook.remove()
        for _, m in run.layers:
            m.training = False
    run.report.passes = 1
    if world_size() > 1:  # each rank saw its own shard: average the EMAs
        import torch.distributed as dist

        for _, m in run.layers:
            for t in bn_stats(m):
                t64 = t.double()
                dist.all_reduce(t64)
                t.copy_(t64 / world_size())


def _count_values(counted: dict[str, int], name: str, module, args) -> None:
    """The values per channel a BN's EMA update saw (the report's values/ch, as the other modes count them)."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is not None and x.dim() >= 2:
        counted[name] = counted.get(name, 0) + x.numel() // x.shape[1]


_MODES: dict[RecalibrationMode, Callable[[Run], None]] = {
    RecalibrationMode.CUMULATIVE: _cumulative, RecalibrationMode.EMA: _ema, RecalibrationMode.EXACT: exact_statistics}


# ---------------------------------------------------------------- state


@contextlib.contextmanager
def _sync_bn_per_process(model: nn.Module) -> Iterator[None]:
    """SyncBatchNorm under torch.distributed would normalize over all ranks' batches in train mode (and refuses
    CPU tensors); during recalibration each batch is normalized by itself, as in a single-process run, and the
    statistics are merged exactly afterwards. Swapping an instance's forward would drop what a subclass adds
    around `super().forward` (timm's SyncBatchNormAct: its activation and drop), so SyncBatchNorm's own forward
    is replaced for the duration, at the class, by the plain BatchNorm forward. Without an initialized process
    group, SyncBatchNorm already is a plain BatchNorm: nothing changes."""
    import torch.distributed as dist
    from torch.nn.modules.batchnorm import _BatchNorm

    if not (dist.is_available() and dist.is_initialized()
            and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())):
        yield
        return
    original = nn.SyncBatchNorm.__dict__["forward"]
    nn.SyncBatchNorm.forward = _BatchNorm.forward  # type: ignore[method-assign]  # restored below
    try:
        yield
    finally:
        nn.SyncBatchNorm.forward = original  # type: ignore[method-assign]


def _skip_reason(m: nn.Module) -> str:
    if is_frozen_bn(m):
        return "frozen BatchNorm: statistics are fixed by design"
    if getattr(m, "running_mean", None) is None or not getattr(m, "track_running_stats", True):
        return "track_running_stats=False: uses batch statistics"
    return ""


def _save(m) -> SavedState:
    tracked = getattr(m, "num_batches_tracked", None)
    return SavedState(m.training, m.momentum, m.running_mean.detach().clone(), m.running_var.detach().clone(),
                  tracked.clone() if tracked is not None else None)


def _keep_training_history(layers, saved: dict[str, SavedState]) -> None:
    """num_batches_tracked: the batches the new statistics summarize, or the checkpoint's own count where that is
    larger. A trained model keeps its history; inspect and verify read a small count as briefly trained."""
    with torch.no_grad():
        for n, m in layers:
            before = saved[n].tracked
            if before is not None and getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.copy_(torch.maximum(m.num_batches_tracked, before))


def _restore(m, s: SavedState) -> None:
    with torch.no_grad():
        m.running_mean.copy_(s.mean)
        m.running_var.copy_(s.var)
        if s.tracked is not None:
            m.num_batches_tracked.copy_(s.tracked)
    m.training, m.momentum = s.training, s.momentum


def _check_finite(layers, amp: bool) -> None:
    for n, m in layers:
        if not (torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()):
            cause = "overflow in reduced precision: try without amp" if amp else "the activations overflow"
            raise InputError(f"recalibrated statistics of {n} contain NaN/Inf ({cause}); nothing written")


def _shift(name, m, old, values, counted=True) -> LayerShift:
    skip = _skip_reason(m) or ("no calibration batch reached it: statistics kept" if counted and values == 0 else "")
    c = int(m.running_mean.numel()) if getattr(m, "running_mean", None) is not None else 0
    if skip or old is None:
        return LayerShift(name, c, 0, 0.0, 1.0, 1.0, skipped=skip)
    old_mean, old_var, eps = old
    new_mean, new_var = as_float64(m.running_mean).cpu(), as_float64(m.running_var).cpu()
    old_mean, old_var = old_mean.cpu(), old_var.cpu()
    mean_shift = float(((new_mean - old_mean).abs() / (old_var + eps).sqrt()).max())
    ratio = (new_var + eps) / (old_var + eps)
    return LayerShift(name, c, values, mean_shift, float(ratio.min()), float(ratio.max()))


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
