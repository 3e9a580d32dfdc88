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
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn

from .choices import RecalibrationMode
from .devices import Placement, as_float64, check_not_meta, device_of, float64_device, modes_kept, resolve_device
from .errors import InputError, UserCodeError, param, user_code
from .layers import bn_eps, bn_modules, bn_stats, is_frozen_bn
from .layout import layout_of
from .segments import SegmentCache, default_cache_budget
from .utils import plural, short_list

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
    cache_bypassed: list[str] = field(default_factory=list)  # "module: why" the cache does not replay around it
    # exact mode: why whole passes were iterated to the fixed point instead of one pass per BN level ("": not)
    whole_passes: str = ""

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


@dataclass
class _Run:
    """What every mode's passes need: the model, its usable BN layers, the batches, and the settings."""

    model: nn.Module
    layers: list[tuple[str, nn.Module]]
    batches: _Batches
    report: RecalibrationReport
    progress: ProgressFn | None
    device: torch.device
    momentum: float = 0.1
    reset: bool = True
    prior: _Prior | None = None
    cache_budget: int | None = None


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
    batches = _Batches(data, first_input, input_key, dev, num_batches, num_samples, channels_last,
                       same_every_pass=mode == RecalibrationMode.EXACT)
    report = RecalibrationReport(mode=str(mode), prior=prior or None)
    old = {n: (as_float64(mean).clone(), as_float64(var).clone(), bn_eps(m))
           for n, m in usable for mean, var in [bn_stats(m)]}
    started = time.perf_counter()
    with _recalibrating(model, usable, dev if device is not None else None, channels_last) as saved:
        run = _Run(model, usable, batches, report, progress, dev, momentum, reset,
                   _Prior(prior, saved, batches) if prior else None, cache_budget)
        with torch.no_grad(), _autocast(dev, amp):
            _MODES[mode](run)
        _check_finite(usable, amp)
        _keep_training_history(usable, saved)
    report.seconds = time.perf_counter() - started
    report.samples, report.batches = _global_counts(batches.samples_per_pass, batches.batches_per_pass)
    report.world_size = _world_size()
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
                   ) -> Iterator[dict[str, _Saved]]:
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


# ---------------------------------------------------------------- passes


class _Batches:
    """Model inputs moved to the device, limited to num_batches/num_samples, checked for NaN/Inf.

    With `same_every_pass` (exact mode), every pass must yield as many batches as the first: data that can be
    read only once (a generator behind a re-iterable wrapper) is refused instead of used in part."""

    def __init__(self, data, first_input, input_key, device, num_batches, num_samples, channels_last,
                 same_every_pass=False):
        self.data, self.first_input, self.input_key = data, first_input, input_key
        self.device, self.num_batches, self.num_samples = device, num_batches, num_samples
        self.channels_last, self.same_every_pass = channels_last, same_every_pass
        self.samples_per_pass = self.batches_per_pass = 0
        self.passes = 0
        self.traced: torch.Tensor | None = None
        self.values_per_channel: dict[str, int] = {}

    def __iter__(self):
        seen = batches = 0
        first = None
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
            first = x if first is None else first
            yield x
        if self.same_every_pass and self.passes == 0 and self._read_only_once(first):
            raise InputError("exact mode reads the calibration data several times, and this data can be read only "
                             "once: give a re-iterable (a list or a DataLoader, not a generator)")
        if batches == 0:
            raise InputError("the calibration data yielded no batches" + (
                " in a later pass: exact mode reads the data several times, give a re-iterable (a list or a "
                "DataLoader, not a generator)" if self.passes and self.same_every_pass else ""))
        if self.passes and self.same_every_pass and (seen, batches) != (self.samples_per_pass, self.batches_per_pass):
            raise InputError(f"the calibration data yielded {plural(self.batches_per_pass, 'batch', 'batches')} "
                             f"({plural(self.samples_per_pass, 'sample')}) in one pass and {batches} ({seen}) in "
                             "another: exact mode reads the data several times and needs the same batches each "
                             "time (a list or a DataLoader, not a generator)")
        self.samples_per_pass, self.batches_per_pass = seen, batches
        self.passes += 1

    def first(self) -> torch.Tensor:
        """The first batch, read apart from the passes (exact mode's trace)."""
        self.traced = next(iter(self), None)
        if self.traced is None:
            raise InputError("the calibration data yielded no batches")
        return self.traced

    def _read_only_once(self, first: torch.Tensor | None) -> bool:
        """After the first pass: its first batch is not the traced one, and the data yields nothing more."""
        if self.traced is None or first is None or torch.equal(first, self.traced):
            return False
        return next(iter(_reading(self.data)), None) is None


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
                             f"recalibration; use a larger {param('batch_size')} or {param('mode')} exact"
                             ) from e.__cause__
        raise


def _cumulative(run: _Run) -> None:
    stats = _batch_stats_pass(run.model, run.layers, run.batches, run.progress)
    _write_all(run.layers, stats, run.batches.batches_per_pass, run.prior)
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


def _ema(run: _Run) -> None:
    for _, m in run.layers:
        if run.reset:
            m.reset_running_stats()  # type: ignore[operator]  # a BN's method: torch types it Tensor | Module
        m.momentum = run.momentum  # type: ignore[assignment]
        m.training = True  # not m.train(): that would also switch a BN subclass's own dropout/drop-path on
    try:
        _run_pass(run.model, run.batches, run.progress, 1, passes=1)
    finally:
        for _, m in run.layers:
            m.training = False
    run.report.passes = 1
    if _world_size() > 1:  # each rank saw its own shard: average the EMAs
        import torch.distributed as dist

        for _, m in run.layers:
            for t in bn_stats(m):
                t64 = t.double()
                dist.all_reduce(t64)
                t.copy_(t64 / _world_size())


class _Observer:
    """Eval-mode forwards (the current statistics normalize) that pool the input statistics of `layers` over
    every call. With `stop_after` (a level pass), each forward ends once every layer has run, and a forward
    that runs one of them twice or not at all (data-dependent control flow) marks the pass as diverged."""

    def __init__(self, model, layers, stop_after=False, untraced=()):
        self.model, self.layers, self.stop_after, self.untraced = model, layers, stop_after, untraced
        self.stats = {n: ChannelStats(m.running_mean.numel(), m.running_mean.device) for n, m in layers}
        self.pending: set[str] = set()
        self.diverged = False
        self.handles: list = []

    def __enter__(self) -> _Observer:
        self.handles = [m.register_forward_pre_hook(self._collect(n)) for n, m in self.layers]
        if self.stop_after:
            self.handles.append(self.model.register_forward_pre_hook(self._restart))
            self.handles += [m.register_forward_hook(self._finish(n)) for n, m in self.layers]
            self.handles += [m.register_forward_pre_hook(self._untraced_ran) for _, m in self.untraced]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _collect(self, name):
        def hook(module, args):
            if self.stop_after and name not in self.pending:
                self.diverged = True  # a second call where the traced forward made one
            x = args[0]
            dims = [0, *range(2, x.dim())]
            xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
            var, mean = torch.var_mean(xf, dim=dims, correction=0)
            n = x.numel() // x.shape[1]
            self.stats[name].add(n, mean, as_float64(var) * n)
        return hook

    def _untraced_ran(self, module, args):
        self.diverged = True  # a BN the traced forward did not run, before this level ended: it may feed it

    def _restart(self, module, args):
        self.pending.update(n for n, _ in self.layers)

    def _finish(self, name):
        def hook(module, args, output):
            self.pending.discard(name)
            if not self.pending:
                raise _LevelDone
        return hook

    def forward_ended(self, level_done: bool) -> None:
        if self.stop_after and not level_done:
            self.diverged = True  # a BN of the level never ran in this forward


def _observe_pass(run: _Run, layers, pass_number, passes, stop_after=False, cache=None, untraced=()
                  ) -> tuple[dict[str, ChannelStats], bool]:
    """One eval-mode pass pooling the input statistics of `layers`; returns them, and whether any rank saw a
    forward that ran the level's BNs differently from the traced one, or ran one of `untraced`."""
    with _Observer(run.model, layers, stop_after, untraced) as observer:
        _run_pass(run.model, run.batches, run.progress, pass_number, passes, cache, observer)
    _all_reduce(observer.stats, run.batches)
    return observer.stats, _any_rank(observer.diverged)


class _LevelDone(Exception):
    """Raised inside a forward once every BN of the level being measured has run: the rest is not needed."""


def _exact(run: _Run) -> None:
    """Eval-mode statistics: each BN's input statistics over the data, given the final statistics of every BN
    (the fixed point of whole eval-mode forwards). Level passes reach it directly when the traced forward shows
    the whole dependency structure; otherwise whole passes are iterated until nothing changes."""
    levels, flow = _agree(lambda: _levels(run.model, run.layers, run.batches))
    reason = _why_whole_passes(run.layers, flow)
    if not reason:
        reason = _level_passes(run, levels, flow)
    del flow
    if reason:
        run.report.whole_passes = reason
        _fixed_point_passes(run, max(levels.values(), default=0))


def _why_whole_passes(layers, flow) -> str:
    """Why one forward of the first batch cannot give the BN levels, or ""."""
    shared = [f"{n} ({len(flow.calls_of(m))} calls)" for n, m in layers if len(flow.calls_of(m)) > 1]
    if shared:
        return f"{short_list(shared)} run more than once per forward: their statistics pool every call"
    return ""


def _level_passes(run: _Run, levels: dict[str, int], flow) -> str:
    """One eval-mode pass per BN level: level k's inputs depend only on BNs of levels < k, whose statistics
    are final by then, so each pass measures its level exactly and the forward stops after it. The segment
    cache (segments.py) lets each pass start from the last final activation before its level. BNs the traced
    forward did not run are measured last, in a whole pass. Returns why the levels did not hold (a batch ran
    the BNs of a level otherwise than the traced one, or ran an untraced BN before a level ended), or ""."""
    depth = max(levels.values(), default=0)
    unreached = [(n, m) for n, m in run.layers if n not in levels]
    passes = depth + bool(unreached)  # known before the first pass, so progress can say "pass k of n" from the start
    budget = default_cache_budget(run.device) if run.cache_budget is None else int(run.cache_budget)
    cache = SegmentCache(run.model, flow, {id(m): levels[n] for n, m in run.layers if n in levels},
                         [id(m) for _, m in unreached], budget)
    cache.install()
    try:
        for level in range(1, depth + 1):
            members = [(n, m) for n, m in run.layers if levels.get(n) == level]
            cache.begin_pass(level, record=level < passes)
            stats, diverged = _observe_pass(run, members, level, passes, stop_after=True, cache=cache,
                                            untraced=unreached)
            if diverged:
                return (f"a calibration batch ran the BN layers of level {level} ({short_list(n for n, _ in members)}) "
                        "otherwise than the traced batch, or one the traced batch did not run "
                        "(data-dependent control flow)")
            _write_all(members, stats, run.batches.batches_per_pass, run.prior)  # before the next level is measured
            run.report.passes += 1
        if unreached:  # not run on the traced batch, nor before any level ended: nothing measured depends on them
            cache.begin_pass(depth + 1, record=False)
            stats, _ = _observe_pass(run, unreached, depth + 1, passes, cache=cache)
            _write_all(unreached, stats, run.batches.batches_per_pass, run.prior)
            run.report.passes += 1
    finally:
        cache.remove()
        _cache_figures(run.report, cache.stats)
    return ""


def _fixed_point_passes(run: _Run, depth: int) -> None:
    """Whole eval-mode passes, each measuring every BN (pooled over all its calls) under the statistics the
    previous pass wrote, until a pass changes none: a fixed point, the statistics of whole forwards. Where the
    BNs feed each other without a cycle, pass k makes every BN k levels deep final, so this ends after the
    depth + 1 passes; a BN that feeds itself (a block applied twice) converges geometrically, up to a limit."""
    estimate, limit = depth + 2, depth + FIXED_POINT_EXTRA_PASSES
    for k in range(1, limit + 1):
        number = run.report.passes + 1
        stats, _ = _observe_pass(run, run.layers, number, max(estimate + run.report.passes - k + 1, number))
        change = _write_all(run.layers, stats, run.batches.batches_per_pass, run.prior)
        run.report.passes += 1
        if change <= FIXED_POINT_TOLERANCE:
            return
    run.report.whole_passes += (f"; not converged after {plural(limit, 'whole pass', 'whole passes')} "
                                f"(last change {change:.2g} σ)")


FIXED_POINT_TOLERANCE = 1e-6  # largest change of a mean (in σ) or a variance (relative) that counts as none
FIXED_POINT_EXTRA_PASSES = 60  # beyond the traced depth, for BNs that feed themselves


def _cache_figures(report: RecalibrationReport, stats) -> None:
    report.segment_replays = stats.replays
    report.cache_peak_bytes = stats.peak_bytes
    report.cache_budget_bytes = stats.budget_bytes
    report.cache_over_budget = stats.over_budget
    report.cache_note = stats.note
    report.cache_bypassed = list(stats.bypassed)


def _levels(model, layers, batches):
    """BN name → dependency level, and the traced dataflow, from one forward of the first batch's first samples."""
    from .graph import dependency_levels, trace

    first = batches.first()
    with user_code(f"the model's forward on calibration batch 1 of shape {tuple(first.shape)}"):
        flow, _ = trace(model, (first[:2],))
    by_id = dependency_levels(flow, [m for _, m in layers])
    return {n: by_id[id(m)] for n, m in layers if id(m) in by_id}, flow


_MODES: dict[RecalibrationMode, Callable[[_Run], None]] = {
    RecalibrationMode.CUMULATIVE: _cumulative, RecalibrationMode.EMA: _ema, RecalibrationMode.EXACT: _exact}


def _run_pass(model, batches, progress, pass_number, passes, cache=None, observer=None) -> None:
    """Pass `pass_number` of `passes` over the data; across processes, every rank learns whether another one failed."""
    _agree(lambda: _run_local_pass(model, batches, progress, pass_number, passes, cache, observer))


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


def _any_rank(flag: bool) -> bool:
    if _world_size() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(t)
    return bool(t.item())


def _run_local_pass(model, batches, progress, pass_number, passes, cache=None, observer=None) -> None:
    if progress is not None:  # name the pass before its first batch is done (a slow model's first forward)
        progress(0, pass_number, passes)
    done = 0
    for i, x in enumerate(batches):
        if cache is not None:
            cache.begin_batch(i, x)
        level_done = False
        try:
            _forward(model, x, i)
        except _LevelDone:
            level_done = True
        if observer is not None:
            observer.forward_ended(level_done)
        done += len(x)
        if progress is not None:
            progress(done, pass_number, passes)
    if cache is not None:
        cache.end_pass()


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


def _write_all(layers, stats: dict[str, ChannelStats], batches: int | None, prior: _Prior | None = None) -> float:
    """Write the pooled statistics (blended with the source's under a prior); a layer no batch reached (a
    data-dependent branch) keeps its own. Returns the largest change: of a mean in σ, of a variance relative."""
    change = 0.0
    for n, m in layers:
        if stats[n].count > 0:
            mean, var = stats[n].mean, stats[n].unbiased_var
            if prior is not None:
                mean, var = prior.blend(n, mean, var)
            before_mean, before_var = as_float64(m.running_mean), as_float64(m.running_var)
            _write(m, mean, var, batches)
            scale = as_float64(m.running_var) + bn_eps(m)
            step = torch.maximum((as_float64(m.running_mean) - before_mean).abs() / scale.sqrt(),
                                 (as_float64(m.running_var) - before_var).abs() / scale)
            change = max(change, float(step.nan_to_num(math.inf).max()))
    return change


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
