"""What every recalibration mode stands on: the report, float64 statistics, the batches, one pass over them.

recalibration.py holds the API and the train-mode modes (cumulative, ema), recalibration_exact.py exact mode;
both run their passes through `run_pass` over `Batches`, pool in `ChannelStats`, and write with `write_all`.
Under torch.distributed every rank runs each pass over its own data; `agree` makes a failure on one rank raise on
all, and the statistics are merged exactly across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .devices import as_float64, float64_device
from .errors import InputError, UserCodeError, param, user_code
from .tempfiles import current_session
from .utils import bn_eps, plural

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
class SavedState:
    """A BN's mode, momentum and statistics as given: put back after the run, and the source of a prior."""

    training: bool
    momentum: float | None
    mean: torch.Tensor
    var: torch.Tensor
    tracked: torch.Tensor | None


@dataclass
class Run:
    """What every mode's passes need: the model, its usable BN layers, the batches, and the settings."""

    model: nn.Module
    layers: list[tuple[str, nn.Module]]
    batches: Batches
    report: RecalibrationReport
    progress: ProgressFn | None
    device: torch.device
    momentum: float = 0.1
    reset: bool = True
    prior: Prior | None = None
    cache_budget: int | None = None


class Batches:
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
                raise InputError(f"{param('data')}: calibration batch {batches + 1} contains NaN or Inf values")
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
            where = (f"calibration batch {batch_index + 1} holds {len(x)} sample" + ("s" if len(x) != 1 else "")
                     + (" (a short last batch: the data's size leaves it over)" if batch_index else ""))
            raise InputError(f"{where}, one value per channel for a BatchNorm1d in train-mode recalibration; choose "
                             f"{param('batch_size')} so that no batch holds a single sample, or use "
                             f"{param('mode')} exact") from e.__cause__
        raise


def run_pass(model, batches, progress, pass_number, passes, cache=None, observer=None) -> None:
    """Pass `pass_number` of `passes` over the data; across processes, every rank learns whether another one failed."""
    agree(lambda: _run_local_pass(model, batches, progress, pass_number, passes, cache, observer))


def agree(run):
    """Run on every rank; if any rank raised, raise on all of them (the failing rank's error, or a
    one-line message naming it), so no rank waits forever in a collective and none writes output."""
    if world_size() == 1:
        return run()
    import torch.distributed as dist

    error, result = None, None
    try:
        result = run()
    except BaseException as e:  # KeyboardInterrupt too: the other ranks must hear of it
        error = e
    messages = [None] * world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, m) for rank, m in enumerate(messages) if m]
    if error is not None:
        raise error
    if failed:
        rank, message = failed[0]
        raise InputError(f"rank {rank} failed ({' '.join(message.split())}); nothing written")
    return result


def any_rank(flag: bool) -> bool:
    if world_size() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(t)
    return bool(t.item())


def _run_local_pass(model, batches, progress, pass_number, passes, cache=None, observer=None) -> None:
    if progress is not None:  # name the pass before its first batch is done (a slow model's first forward)
        progress(0, pass_number, passes)
    done = 0
    session = current_session()
    for i, x in enumerate(batches):
        if session.interrupted:  # a Ctrl-C whose KeyboardInterrupt was swallowed on the way: stop now
            raise KeyboardInterrupt
        if cache is not None:
            cache.begin_batch(i, x)
        level_done = False
        try:
            _forward(model, x, i)
        except LevelDone:
            level_done = True
        if observer is not None:
            observer.forward_ended(level_done)
        done += len(x)
        if progress is not None:
            progress(done, pass_number, passes)
    if cache is not None:
        cache.end_pass()


class LevelDone(Exception):
    """Raised inside a forward once every BN of the level being measured has run: the rest is not needed."""


def _write(m, mean: torch.Tensor, var: torch.Tensor, batches: int | None) -> None:
    with torch.no_grad():
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if batches is not None and getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked.fill_(batches)


def write_all(layers, stats: dict[str, ChannelStats], batches: int | None, prior: Prior | None = None) -> float:
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


class Prior:
    """Schneider et al. 2020 (arXiv 2006.16971): the source statistics count as N samples next to the n target
    samples seen: μ = (N·μs + n·μt)/(N + n), σ² = (N·σs² + n·σt²)/(N + n)."""

    def __init__(self, pseudo_count: float, source: dict[str, SavedState], batches: Batches):
        self.count, self.source, self.batches = float(pseudo_count), source, batches
        self._samples: float | None = None

    def blend(self, name: str, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._samples is None:  # samples per pass over all ranks (the same for every level)
            self._samples = float(global_counts(self.batches.samples_per_pass, self.batches.batches_per_pass)[0])
        big_n, n = self.count, self._samples
        source = self.source[name]
        mean_s, var_s = source.mean.to(mean.device, torch.float64), source.var.to(var.device, torch.float64)
        return (big_n * mean_s + n * mean) / (big_n + n), (big_n * var_s + n * var) / (big_n + n)


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_counts(samples: int, batches: int) -> tuple[int, int]:
    if world_size() == 1:
        return samples, batches
    import torch.distributed as dist

    counts = torch.tensor([samples, batches], dtype=torch.float64)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def all_reduce(stats: dict[str, ChannelStats], batches: Batches) -> None:
    if world_size() > 1:
        for s in stats.values():
            s.all_reduce()
    for name, s in stats.items():
        batches.values_per_channel[name] = int(s.count)

