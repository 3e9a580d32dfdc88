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
Statistics are merged in float64 with Chan's parallel formula; across processes with torch.distributed.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .devices import Placement, as_float64, device_of, float64_device, resolve_device
from .errors import InputError, UserCodeError, user_code
from .layers import bn_eps, bn_modules, is_frozen_bn
from .layout import layout_of
from .segments import SegmentCache, default_cache_budget

MODES = ("cumulative", "ema", "exact")
ProgressFn = Callable[[int, int, int], None]  # (samples done in this pass, pass number, number of passes)


@dataclass
class LayerShift:
    name: str
    channels: int
    samples: int  # values per channel seen in the last pass
    mean_shift: float  # max over channels of |new mean - old mean| / old std
    var_ratio_min: float  # new var / old var
    var_ratio_max: float
    skipped: str = ""


@dataclass
class RecalibrationReport:
    mode: str
    layers: list[LayerShift] = field(default_factory=list)
    samples: int = 0  # samples per pass
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0
    world_size: int = 1
    prior: float | None = None  # pseudo-count of source samples blended in (Schneider et al. 2020)
    # exact mode's activation cache (segments.py)
    segment_replays: int = 0  # forwards started from a cached activation
    cache_peak_bytes: int = 0
    cache_budget_bytes: int = 0
    cache_over_budget: int = 0  # activations left uncached (recomputed) because the budget was full
    cache_note: str = ""

    @property
    def samples_per_second(self) -> float:
        return self.samples * self.passes / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples_per_second"] = self.samples_per_second
        return d


class ChannelStats:
    """count, mean and M2 per channel in float64, merged with Chan et al.'s formula (stable for any split)."""

    def __init__(self, channels: int, device: torch.device):
        self.count = 0.0
        device = float64_device(device)
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    def add(self, n: float, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        mean, m2 = as_float64(mean), as_float64(m2)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta.square() * (self.count * n / total)
        self.count = total

    def all_reduce(self) -> None:
        """Merge the statistics of every rank (exactly: counts, sums, then centered M2)."""
        import torch.distributed as dist

        count = torch.tensor([self.count], dtype=torch.float64, device=self.mean.device)
        dist.all_reduce(count)
        total = float(count.item())
        if total == 0:
            return
        weighted = self.mean * self.count
        dist.all_reduce(weighted)
        mean = weighted / total
        m2 = self.m2 + (self.mean - mean).square() * self.count
        dist.all_reduce(m2)
        self.count, self.mean, self.m2 = total, mean, m2

    @property
    def unbiased_var(self) -> torch.Tensor:
        return self.m2 / max(self.count - 1.0, 1.0)


@dataclass
class _Saved:
    training: bool
    momentum: float | None
    mean: torch.Tensor
    var: torch.Tensor
    tracked: torch.Tensor | None


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
            the start of each pass; the number of passes is known from the first call (exact: one per BN level).

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

    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "ema" and not (0.0 < momentum <= 1.0):
        raise InputError(f"--momentum {momentum}: must be in (0, 1]")
    layers = [(n, m) for n, m in bn_modules(model)]
    if not layers:
        folded = " (bntool folded it: recalibrate the checkpoint from before the fold, then fold again)"
        raise InputError("the model has no BatchNorm layers: nothing to recalibrate"
                         + (folded if layout_of(model) is not None else ""))
    usable = [(n, m) for n, m in layers if _skip_reason(m) == ""]
    if not usable:
        raise InputError("no BatchNorm layer tracks running statistics: nothing to recalibrate")
    dev = device_of(model) if device is None else resolve_device(device)
    if prior is not None and not (prior >= 0 and math.isfinite(prior)):
        raise InputError(f"prior {prior}: the pseudo-count of source samples must be a finite number >= 0")
    if prior and mode == "ema":
        raise InputError("prior: blending with the source statistics applies to cumulative and exact modes")
    if cache_budget is not None and cache_budget < 0:
        raise InputError(f"cache_budget {cache_budget}: must be >= 0 bytes")
    if mode == "exact" and iter(data) is data:
        raise InputError("exact mode passes over the data several times: give a re-iterable (list, DataLoader)")

    batches = _Batches(data, first_input, input_key, dev, num_batches, num_samples, channels_last)
    saved = {n: _save(m) for n, m in usable}
    blend = _Prior(prior, saved, batches) if prior else None
    if blend is not None:
        for n, s in saved.items():
            if not (torch.isfinite(s.mean).all() and torch.isfinite(s.var).all()):
                raise InputError(f"prior: the statistics of {n} contain NaN/Inf, there is no source to blend with; "
                                 "recalibrate without a prior")
    old = {n: (as_float64(s.mean).clone(), as_float64(s.var).clone(), bn_eps(m)) for (n, m), s in
           zip(usable, saved.values())}
    model_training = [mod.training for mod in model.modules()]
    report = RecalibrationReport(mode=mode, prior=prior or None)
    started = time.perf_counter()
    placement = Placement(model)
    local_forwards = _local_sync_bn(usable)
    try:
        model.eval()
        if device is not None:
            model.to(dev)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(dev, amp):
            if mode == "ema":
                _ema_pass(model, usable, batches, momentum, reset, progress)
                report.passes = 1
            elif mode == "exact":
                _exact_passes(model, usable, batches, progress, report, cache_budget, dev, blend)
            else:
                stats = _batch_stats_pass(model, usable, batches, progress)
                _write_all(usable, stats, batches.batches_per_pass, blend)
                report.passes = 1
        _check_finite(usable, amp)
        _keep_training_history(usable, saved)
    except BaseException:
        for n, m in usable:
            _restore(m, saved[n])
        raise
    finally:
        placement.restore()
        for m in local_forwards:
            del m.forward
        for mod, training in zip(model.modules(), model_training):
            mod.training = training
        for n, m in usable:
            m.momentum = saved[n].momentum
    report.seconds = time.perf_counter() - started
    report.samples, report.batches = _global_counts(batches.samples_per_pass, batches.batches_per_pass)
    report.world_size = _world_size()
    report.layers = [_shift(n, m, old.get(n), batches.values_per_channel.get(n, 0), counted=mode != "ema")
                     for n, m in layers]
    return report


# ---------------------------------------------------------------- passes


class _Batches:
    """Model inputs moved to the device, limited to num_batches/num_samples, checked for NaN/Inf."""

    def __init__(self, data, first_input, input_key, device, num_batches, num_samples, channels_last):
        self.data, self.first_input, self.input_key = data, first_input, input_key
        self.device, self.num_batches, self.num_samples = device, num_batches, num_samples
        self.channels_last = channels_last
        self.samples_per_pass = self.batches_per_pass = 0
        self.values_per_channel: dict[str, int] = {}

    def __iter__(self):
        seen = batches = 0
        for raw in _reading(self.data):
            if self.num_batches is not None and batches >= self.num_batches:
                break
            x = raw if isinstance(raw, torch.Tensor) else self.first_input(raw, self.input_key)
            if self.num_samples is not None:
                if seen >= self.num_samples:
                    break
                x = x[: self.num_samples - seen]
            if x.is_floating_point() and not _all_finite(x):
                raise InputError(f"calibration batch {batches + 1} contains NaN or Inf values")
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            seen += len(x)
            batches += 1
            yield x
        if batches == 0:
            raise InputError("the calibration data yielded no batches")
        self.samples_per_pass, self.batches_per_pass = seen, batches


def _all_finite(x: torch.Tensor) -> bool:
    """One reduction: a NaN or Inf anywhere makes the sum non-finite; only then look element by element
    (a finite sum can also overflow)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _reading(data):
    """Iterate the user's data; its failures (a bad file, a broken loader) are input errors, not ours."""
    with user_code("reading the calibration data"):
        iterator = iter(data)
    while True:
        try:
            with user_code("reading the calibration data"):
                item = next(iterator)
        except StopIteration:
            return
        yield item


def _forward(model: nn.Module, x: torch.Tensor, batch_index: int) -> None:
    try:
        with user_code(f"the model's forward on calibration batch {batch_index + 1} of shape {tuple(x.shape)}"):
            model(x)
    except UserCodeError as e:
        if "Expected more than 1 value per channel" in str(e.__cause__):
            raise InputError(f"a batch of {len(x)} gives one value per channel to a BatchNorm1d in train-mode "
                             "recalibration; use a larger --batch-size or --mode exact") from e.__cause__
        raise


def _batch_stats_pass(model, layers, batches, progress) -> dict[str, ChannelStats]:
    """BN layers normalize with batch statistics (train mode, momentum 1 so the buffers hold the batch's
    mean and unbiased variance after each call); those are pooled in float64."""
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
        _run_pass(model, batches, progress, 1, passes=1)
    finally:
        for h in handles:
            h.remove()
        for n, m in layers:
            m.training = False
            if stats[n].count == 0:
                m.running_mean.copy_(before[n][0])
                m.running_var.copy_(before[n][1])
    _all_reduce(stats, batches)
    return stats


def _observe_pass(model, layers, batches, progress, pass_number, passes, stop_after=False, cache=None
                  ) -> dict[str, ChannelStats]:
    """Eval-mode forward (current statistics normalize); the input statistics of `layers` are pooled.
    With stop_after, each forward ends once all of `layers` have run."""
    stats = {n: ChannelStats(m.running_mean.numel(), m.running_mean.device) for n, m in layers}

    def collect(name):
        def hook(module, args):
            x = args[0]
            dims = [0, *range(2, x.dim())]
            xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
            var, mean = torch.var_mean(xf, dim=dims, correction=0)
            n = x.numel() // x.shape[1]
            stats[name].add(n, mean, as_float64(var) * n)
        return hook

    pending = set()

    def finish(name):
        def hook(module, args, output):
            pending.discard(name)
            if not pending:
                raise _LevelDone
        return hook

    def restart(module, args):
        pending.update(n for n, _ in layers)

    handles = [m.register_forward_pre_hook(collect(n)) for n, m in layers]
    if stop_after:
        handles.append(model.register_forward_pre_hook(restart))
        handles += [m.register_forward_hook(finish(n)) for n, m in layers]
    try:
        _run_pass(model, batches, progress, pass_number, passes, cache)
    finally:
        for h in handles:
            h.remove()
    _all_reduce(stats, batches)
    return stats


class _LevelDone(Exception):
    """Raised inside a forward once every BN of the level being measured has run: the rest is not needed."""


def _exact_passes(model, layers, batches, progress, report, cache_budget, device, prior=None) -> None:
    """One eval-mode pass per BN level: level k's inputs depend only on BNs of levels < k, whose statistics
    are final by then, so each pass measures its level exactly and the forward stops after it. The segment
    cache (segments.py) lets each pass start from the last final activation before its level."""
    levels, flow = _agree(lambda: _levels(model, layers, batches))
    depth = max(levels.values(), default=0)
    unreached = [(n, m) for n, m in layers if n not in levels]
    passes = depth + bool(unreached)  # known before the first pass, so progress can say "pass k of n" from the start
    budget = default_cache_budget(device) if cache_budget is None else int(cache_budget)
    cache = SegmentCache(model, flow, {id(m): levels[n] for n, m in layers if n in levels},
                         [id(m) for _, m in unreached], budget)
    del flow
    cache.install()
    try:
        for level in range(1, depth + 1):
            members = [(n, m) for n, m in layers if levels.get(n) == level]
            cache.begin_pass(level, record=level < depth or bool(unreached))
            stats = _observe_pass(model, members, batches, progress, level, passes, stop_after=True, cache=cache)
            _write_all(members, stats, batches.batches_per_pass, prior)  # before the next level is measured
            report.passes += 1
        if unreached:  # not run on the traced batch (data-dependent branches): measure them last, together
            cache.begin_pass(depth + 1, record=False)
            stats = _observe_pass(model, unreached, batches, progress, depth + 1, passes, cache=cache)
            _write_all(unreached, stats, batches.batches_per_pass, prior)
            report.passes += 1
    finally:
        cache.remove()
    report.segment_replays = cache.stats.replays
    report.cache_peak_bytes = cache.stats.peak_bytes
    report.cache_budget_bytes = cache.stats.budget_bytes
    report.cache_over_budget = cache.stats.over_budget
    report.cache_note = cache.stats.note


def _levels(model, layers, batches):
    """BN name → dependency level, and the traced dataflow, from one forward of the first batch's first samples."""
    from .graph import dependency_levels, trace

    first = next(iter(batches), None)
    if first is None:
        raise InputError("the calibration data yielded no batches")
    with user_code(f"the model's forward on calibration batch 1 of shape {tuple(first.shape)}"):
        flow, _ = trace(model, (first[:2],))
    by_id = dependency_levels(flow, [m for _, m in layers])
    return {n: by_id[id(m)] for n, m in layers if id(m) in by_id}, flow


def _ema_pass(model, layers, batches, momentum, reset, progress) -> None:
    for _, m in layers:
        if reset:
            m.reset_running_stats()
        m.momentum = momentum
        m.training = True  # not m.train(): that would also switch a BN subclass's own dropout/drop-path on
    try:
        _run_pass(model, batches, progress, 1, passes=1)
    finally:
        for _, m in layers:
            m.training = False
    if _world_size() > 1:  # each rank saw its own shard: average the EMAs
        import torch.distributed as dist

        for _, m in layers:
            for t in (m.running_mean, m.running_var):
                t64 = t.double()
                dist.all_reduce(t64)
                t.copy_(t64 / _world_size())


def _run_pass(model, batches, progress, pass_number, passes, cache=None) -> None:
    """Pass `pass_number` of `passes` over the data; across processes, every rank learns whether another one failed."""
    _agree(lambda: _run_local_pass(model, batches, progress, pass_number, passes, cache))


def _agree(run):
    """Run on every rank; if any rank raised, raise on all of them (the failing rank's error, or a
    one-line message naming it), so no rank waits forever in a collective and none writes output."""
    if _world_size() == 1:
        return run()
    import torch.distributed as dist

    error, result = None, None
    try:
        result = run()
    except BaseException as e:  # KeyboardInterrupt too: the other ranks must hear of it
        error = e
    messages = [None] * _world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, m) for rank, m in enumerate(messages) if m]
    if error is not None:
        raise error
    if failed:
        rank, message = failed[0]
        raise InputError(f"rank {rank} failed ({' '.join(message.split())}); nothing written")
    return result


def _run_local_pass(model, batches, progress, pass_number, passes, cache=None) -> None:
    if progress is not None:  # name the pass before its first batch is done (a slow model's first forward)
        progress(0, pass_number, passes)
    done = 0
    for i, x in enumerate(batches):
        if cache is not None:
            cache.begin_batch(i, x)
        try:
            _forward(model, x, i)
        except _LevelDone:
            pass
        done += len(x)
        if progress is not None:
            progress(done, pass_number, passes)
    if cache is not None:
        cache.end_pass()


# ---------------------------------------------------------------- state


def _local_sync_bn(layers) -> list[nn.Module]:
    """SyncBatchNorm in train mode would normalize over all ranks' batches (and refuses CPU tensors); run it
    as a plain BatchNorm so each batch is normalized as in a single-process run, then restore it."""
    import types

    from torch.nn.modules.batchnorm import _BatchNorm

    patched = []
    for _, m in layers:
        if isinstance(m, nn.SyncBatchNorm) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_BatchNorm.forward, m)
            patched.append(m)
    return patched



def _skip_reason(m: nn.Module) -> str:
    if is_frozen_bn(m):
        return "frozen BatchNorm: statistics are fixed by design"
    if getattr(m, "running_mean", None) is None or not getattr(m, "track_running_stats", True):
        return "track_running_stats=False: uses batch statistics"
    return ""


def _save(m) -> _Saved:
    tracked = getattr(m, "num_batches_tracked", None)
    return _Saved(m.training, m.momentum, m.running_mean.detach().clone(), m.running_var.detach().clone(),
                  tracked.clone() if tracked is not None else None)


def _keep_training_history(layers, saved: dict[str, _Saved]) -> None:
    """num_batches_tracked: the batches the new statistics summarize, or the checkpoint's own count where that is
    larger. A trained model keeps its history; inspect and verify read a small count as briefly trained."""
    with torch.no_grad():
        for n, m in layers:
            before = saved[n].tracked
            if before is not None and getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.copy_(torch.maximum(m.num_batches_tracked, before))


def _restore(m, s: _Saved) -> None:
    with torch.no_grad():
        m.running_mean.copy_(s.mean)
        m.running_var.copy_(s.var)
        if s.tracked is not None:
            m.num_batches_tracked.copy_(s.tracked)
    m.training, m.momentum = s.training, s.momentum


def _write(m, mean: torch.Tensor, var: torch.Tensor, batches: int | None) -> None:
    with torch.no_grad():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if batches is not None and getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked.fill_(batches)


def _write_all(layers, stats: dict[str, ChannelStats], batches: int | None, prior: _Prior | None = None) -> None:
    """Write the pooled statistics (blended with the source's under a prior); a layer no batch reached (a
    data-dependent branch) keeps its own."""
    for n, m in layers:
        if stats[n].count > 0:
            mean, var = stats[n].mean, stats[n].unbiased_var
            if prior is not None:
                mean, var = prior.blend(n, mean, var)
            _write(m, mean, var, batches)


class _Prior:
    """Schneider et al. 2020 (arXiv 2006.16971): the source statistics count as N samples next to the n target
    samples seen: μ = (N·μs + n·μt)/(N + n), σ² = (N·σs² + n·σt²)/(N + n)."""

    def __init__(self, pseudo_count: float, source: dict[str, _Saved], batches: _Batches):
        self.count, self.source, self.batches = float(pseudo_count), source, batches
        self._samples: float | None = None

    def blend(self, name: str, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._samples is None:  # samples per pass over all ranks (the same for every level)
            self._samples = float(_global_counts(self.batches.samples_per_pass, self.batches.batches_per_pass)[0])
        big_n, n = self.count, self._samples
        source = self.source[name]
        mean_s, var_s = source.mean.to(mean.device, torch.float64), source.var.to(var.device, torch.float64)
        return (big_n * mean_s + n * mean) / (big_n + n), (big_n * var_s + n * var) / (big_n + n)


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


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_counts(samples: int, batches: int) -> tuple[int, int]:
    if _world_size() == 1:
        return samples, batches
    import torch.distributed as dist

    counts = torch.tensor([samples, batches], dtype=torch.float64)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _all_reduce(stats: dict[str, ChannelStats], batches: _Batches) -> None:
    if _world_size() > 1:
        for s in stats.values():
            s.all_reduce()
    for name, s in stats.items():
        batches.values_per_channel[name] = int(s.count)


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
