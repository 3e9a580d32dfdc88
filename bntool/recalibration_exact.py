"""Exact mode: eval-mode statistics, every BN input normalized over the data given the final statistics of the
BNs before it, independent of the batch size.

One pass per BN level (the longest chain of BNs, from the dataflow); each pass stops after its level's last BN and
starts from the last cached final activation before it (segments.py), within a memory budget. Where one traced
forward cannot show every batch's BN dependencies (a BN run more than once per forward, data-dependent control
flow), whole passes are iterated to the same fixed point instead.
"""

from __future__ import annotations

import torch

from .devices import as_float64
from .errors import user_code
from .recalibration_passes import (
    ChannelStats,
    LevelDone,
    RecalibrationReport,
    Run,
    agree,
    all_reduce,
    any_rank,
    run_pass,
    write_all,
)
from .segments import SegmentCache, default_cache_budget
from .utils import plural, short_list


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
                raise LevelDone
        return hook

    def forward_ended(self, level_done: bool) -> None:
        if self.stop_after and not level_done:
            self.diverged = True  # a BN of the level never ran in this forward


def _observe_pass(run: Run, layers, pass_number, passes, stop_after=False, cache=None, untraced=()
                  ) -> tuple[dict[str, ChannelStats], bool]:
    """One eval-mode pass pooling the input statistics of `layers`; returns them, and whether any rank saw a
    forward that ran the level's BNs differently from the traced one, or ran one of `untraced`."""
    with _Observer(run.model, layers, stop_after, untraced) as observer:
        run_pass(run.model, run.batches, run.progress, pass_number, passes, cache, observer)
    all_reduce(observer.stats, run.batches)
    return observer.stats, any_rank(observer.diverged)


def exact_statistics(run: Run) -> None:
    """Eval-mode statistics: each BN's input statistics over the data, given the final statistics of every BN
    (the fixed point of whole eval-mode forwards). Level passes reach it directly when the traced forward shows
    the whole dependency structure; otherwise whole passes are iterated until nothing changes."""
    levels, flow = agree(lambda: _levels(run.model, run.layers, run.batches))
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


def _level_passes(run: Run, levels: dict[str, int], flow) -> str:
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
            write_all(members, stats, run.batches.batches_per_pass, run.prior)  # before the next level is measured
            run.report.passes += 1
        if unreached:  # not run on the traced batch, nor before any level ended: nothing measured depends on them
            cache.begin_pass(depth + 1, record=False)
            stats, _ = _observe_pass(run, unreached, depth + 1, passes, cache=cache)
            write_all(unreached, stats, run.batches.batches_per_pass, run.prior)
            run.report.passes += 1
    finally:
        cache.remove()
        _cache_figures(run.report, cache.stats)
    return ""


def _fixed_point_passes(run: Run, depth: int) -> None:
    """Whole eval-mode passes, each measuring every BN (pooled over all its calls) under the statistics the
    previous pass wrote, until a pass changes none: a fixed point, the statistics of whole forwards. Where the
    BNs feed each other without a cycle, pass k makes every BN k levels deep final, so this ends after the
    depth + 1 passes; a BN that feeds itself (a block applied twice) converges geometrically, up to a limit."""
    estimate, limit = depth + 2, depth + FIXED_POINT_EXTRA_PASSES
    for k in range(1, limit + 1):
        number = run.report.passes + 1
        stats, _ = _observe_pass(run, run.layers, number, max(estimate + run.report.passes - k + 1, number))
        change = write_all(run.layers, stats, run.batches.batches_per_pass, run.prior)
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

