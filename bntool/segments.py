"""Exact-mode activation cache: each level's pass replays only the segment that holds that level.

Exact mode measures the BNs of dependency level k with an eval-mode forward in which every level < k is final.
Without a cache each of those forwards recomputes everything before level k. Here, the outputs of the children
of every `nn.Sequential` whose forward is the plain chain (recursively; torchvision's ResNet stages and
MobileNet/EfficientNet `features`, timm's `stages`/`blocks`), and of those Sequentials themselves, are kept per
batch once they are final: once every BN that feeds them or runs inside them has its final statistics. A chain
then starts from its last cached child and a cached Sequential returns its output at once, so a pass costs the
segment that holds its level. Entries a newer one makes useless (earlier children of the same chain, the
children of a cached module) are dropped at once: the cache holds a frontier. What does not fit the byte budget
is simply not cached and recomputed as before; so is everything outside such chains.

Correctness rests on the passes seeing the same batches in the same order: each batch's float64 sum and sum of
squares are compared with the first pass's, and any difference switches the cache off (nothing cached is used
for a batch that differs). A cached tensor changed in place by the model after it was handed out is detected
by its version counter and not used again; that module's entries are then copied on every hand-out. A change
made through `.data` (no version bump) is seen by the tensor's sum, checked when a forward that recorded or
handed it out ends. A user's forward hook or pre-hook on a module keeps the cache off that module, the modules
around it and the chain children after it (a replay would skip the hook, or run it on a cached output that
already went through it); a global module hook keeps it off entirely. What it stepped aside for is listed in
`CacheStats.bypassed`.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import InputError, param

if TYPE_CHECKING:
    from typing import TypeGuard  # Python 3.10

    from .graph import Dataflow


@dataclass
class CacheStats:
    """What the cache did over all exact passes."""

    budget_bytes: int = 0
    peak_bytes: int = 0
    replays: int = 0  # forwards (segments) started from a cached activation instead of the model's input
    over_budget: int = 0  # activations not cached because the budget was full
    note: str = ""  # why the cache was switched off, if it was
    # modules the cache does not replay around, and why (a user's hook on or inside them; an output the model
    # changed behind the version counter, through `.data`): "name: reason"
    bypassed: list[str] = field(default_factory=list)


def default_cache_budget(device: torch.device) -> int:
    """Half the free memory where the activations live: the device's on CUDA, the machine's otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 2
    return _available_host_memory() // 2


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*([0-9]+\.?[0-9]*|\.[0-9]+)(?:E\+?([0-9]+))?\s*(?:([KMGT])I?B?|B)?\s*", re.IGNORECASE)


def parse_bytes(text: str, option: str = "cache_budget") -> int:
    """'4G', '4GiB', '4GB', '512M', '100k', '0' or a plain byte count → bytes (powers of 1024).

    Raises:
        InputError: anything else ('4ib', 'inf', 'nan', '-1', '1e400'), naming `option` and the accepted units.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InputError(f"{param(option)} {text!r}: expected a size in bytes like 4G, 4GiB, 512M, 100K or 0 "
                         "(units K, M, G, T: powers of 1024; B for bytes)", param=option)
    number, exponent, unit = match.groups()
    value = float(f"{number}e{exponent or 0}") * _UNITS[(unit or "").upper()]
    if not math.isfinite(value):
        raise InputError(f"{param(option)} {text!r}: too large", param=option)
    return int(value)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def is_plain_chain(module: nn.Module) -> TypeGuard[nn.Sequential]:
    """An nn.Sequential whose forward is nn.Sequential's own: the output of child i is the input of child i+1."""
    return (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
            and "forward" not in vars(module))


def _fingerprint(x: torch.Tensor) -> tuple:
    """Shape, dtype, the float32 sum and 4096 sampled values: any other batch (another sample, another crop)
    differs in them, at the cost of one reduction."""
    n = x.numel()
    sample = torch.take(x.detach(), torch.arange(0, n, max(1, n // 4096), device=x.device)) if n else x
    return (tuple(x.shape), x.dtype, float(x.sum()), tuple(sample.double().cpu().tolist()))


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class SegmentCache:
    """Per-batch cache of final activations at chain boundaries; see the module docstring.

    `bn_levels` maps id(BN module) → its dependency level; `unreached` holds the ids of BNs the traced
    forward did not run (their levels are unknown, so nothing around them is cached).
    """

    def __init__(self, model: nn.Module, flow: Dataflow, bn_levels: dict[int, int], unreached: Iterable[int],
                 budget: int):
        self.model, self.budget = model, budget
        self.stats = CacheStats(budget_bytes=budget)
        self.level = 0
        self.recording = False
        self.names = {id(m): name for name, m in model.named_modules()}
        self.active = budget > 0
        if self.active and _global_module_hooks():
            self.active = False
            self.stats.note = "a global module hook is set (register_module_forward_hook): activation cache off"
        self.batch = 0
        self.total = 0
        self.entries: dict[int, dict[int, tuple[torch.Tensor, int, float]]] = defaultdict(dict)
        self.handed_out: list[int] = []  # entries handed out in the current forward, checked when it ends
        self.copy_out: set[int] = set()
        self.fingerprints: dict[int, tuple] = {}
        self.pending: list[int] = []  # recorded in the current forward, not yet settled
        self.holders: dict[int, tuple[int, int]] = {}  # storage pointer → (entries holding it, bytes)
        self.out_level, self.obsoletes = self._plan(flow, bn_levels, set(unreached))
        self.handles: list = []
        self.chains: list[nn.Module] = []

    # ------------------------------------------------------------ planning

    def _plan(self, flow, bn_levels, unreached):
        """Which modules may be cached, from which level on, and which entries each one makes useless."""
        tensor_level = _tensor_levels(flow, bn_levels)
        parents = defaultdict(list)
        for p in self.model.modules():
            for c in p.children():
                parents[id(c)].append(p)
        out_level, obsoletes = {}, {}
        unsafe = self._unsafe_to_skip(parents) if self.active else set()
        for m in self.model.modules():
            if m is self.model or len(parents[id(m)]) != 1 or id(m) in unsafe:
                continue
            parent = parents[id(m)][0]
            if not (is_plain_chain(m) or is_plain_chain(parent)):
                continue
            calls = flow.calls_of(m)
            if len(calls) != 1 or len(calls[0].outputs) != 1:
                continue
            inner = [id(x) for x in m.modules()]
            if any(i in unreached for i in inner):
                continue
            level = max([tensor_level.get(id(calls[0].outputs[0]), 0)] + [bn_levels.get(i, 0) for i in inner])
            out_level[id(m)] = level
        for m in self.model.modules():
            if id(m) not in out_level:
                continue
            dropped = [id(x) for x in m.modules() if x is not m]
            parent = parents[id(m)][0]
            if is_plain_chain(parent):
                for sibling in parent.children():
                    if sibling is m:
                        break
                    dropped += [id(x) for x in sibling.modules()]
            obsoletes[id(m)] = [i for i in dropped if i in out_level]
        return out_level, obsoletes

    def _unsafe_to_skip(self, parents: dict[int, list[nn.Module]]) -> set[int]:
        """Modules whose cached output must not be used: a replay from it would skip, or run twice, a user's
        forward hook or pre-hook (which may change an output, or count calls). That is a hooked module, every
        module around it, and in a chain every child after one of those."""
        hooked = [(name, m) for name, m in self.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        self.stats.bypassed += [f"{name or 'the model'}: a forward hook" for name, _ in hooked]
        unsafe: set[int] = set()
        todo = [m for _, m in hooked]
        while todo:  # the hooked modules and all their ancestors
            m = todo.pop()
            if id(m) not in unsafe:
                unsafe.add(id(m))
                todo += parents[id(m)]
        for chain in self.model.modules():
            if is_plain_chain(chain):
                after = False
                for child in chain.children():
                    after = after or id(child) in unsafe
                    if after:
                        unsafe.update(id(x) for x in child.modules())
        return unsafe

    # ------------------------------------------------------------ install / remove

    def install(self) -> None:
        if not self.active:
            return
        for m in self.model.modules():
            if id(m) in self.out_level:
                self.handles.append(m.register_forward_hook(self._record))
            if is_plain_chain(m):
                m.forward = self._chain_forward(m)  # type: ignore[method-assign]  # this instance's, for the pass
                self.chains.append(m)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for m in self.chains:
            del m.forward
        self.handles, self.chains = [], []
        self._clear()

    def _clear(self) -> None:
        self.entries.clear()
        self.pending.clear()
        self.holders.clear()
        self.total = 0

    # ------------------------------------------------------------ passes and batches

    def begin_pass(self, level: int, record: bool) -> None:
        """Level `level` is measured now: activations with out-level < level are final and may be recorded."""
        self.level, self.recording = level, record

    def begin_batch(self, index: int, x: torch.Tensor) -> None:
        self._settle()
        self.batch = index
        if not self.active:
            return
        fingerprint = _fingerprint(x)
        if self.fingerprints.setdefault(index, fingerprint) != fingerprint:
            self.stats.note = (f"batch {index + 1} differs between passes (shuffled or augmented data?): "
                               "activation cache switched off")
            self.active = False
            self._clear()

    def end_pass(self) -> None:
        self._settle()

    # ------------------------------------------------------------ hooks

    def _record(self, module, args, output) -> None:
        """Keep the module's output itself (no copy) with its version; _settle checks at the end of the
        forward that nothing changed it in place since (or drops it)."""
        key = id(module)
        if not (self.active and self.recording and isinstance(output, torch.Tensor)):
            return
        if self.out_level[key] >= self.level or self.batch in self.entries[key]:
            return
        shared = output.untyped_storage().data_ptr() in self.holders
        if not shared and self.total + _nbytes(output) > self.budget:
            self.stats.over_budget += 1
            return
        self.entries[key][self.batch] = (output.detach(), _version(output), _checksum(output))
        self._hold(output)
        self.pending.append(key)
        for other in self.obsoletes[key]:
            self._drop(other)

    def _settle(self) -> None:
        """After a batch's forward: drop what was changed in place after it was recorded or handed out (seen by
        its version counter, or by its sum where `.data` changed it behind the counter); compact views."""
        for key in self.handed_out:
            entry = self.entries[key].get(self.batch)
            if entry is not None and _checksum(entry[0]) != entry[2]:
                self._changed_behind_the_counter(key)
        for key in self.pending:
            entry = self.entries[key].get(self.batch)
            if entry is None:
                continue
            t, version, checksum = entry
            if _version(t) != version:
                self._drop(key)
            elif _checksum(t) != checksum:
                self._changed_behind_the_counter(key)
            elif t.untyped_storage().nbytes() > t.numel() * t.element_size():  # a view keeps its base alive
                self._release(t)
                t = t.clone()
                self._hold(t)
                self.entries[key][self.batch] = (t, _version(t), checksum)
        self.pending.clear()
        self.handed_out.clear()

    def _changed_behind_the_counter(self, key: int) -> None:
        self._drop(key)
        if key not in self.copy_out:
            self.copy_out.add(key)
            self.stats.bypassed.append(f"{self.names.get(key, '?')}: its output was changed in place through .data "
                                       "(no version bump); cached copies are handed out")

    def _drop(self, key: int) -> None:
        entry = self.entries.get(key, {}).pop(self.batch, None)
        if entry is not None:
            self._release(entry[0])

    def _hold(self, t: torch.Tensor) -> None:
        """Count each storage once: a module's output is often its last child's (the same tensor)."""
        ptr = t.untyped_storage().data_ptr()
        count, nbytes = self.holders.get(ptr, (0, t.untyped_storage().nbytes()))
        if count == 0:
            self.total += nbytes
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.total)
        self.holders[ptr] = (count + 1, nbytes)

    def _release(self, t: torch.Tensor) -> None:
        ptr = t.untyped_storage().data_ptr()
        count, nbytes = self.holders[ptr]
        if count == 1:
            del self.holders[ptr]
            self.total -= nbytes
        else:
            self.holders[ptr] = (count - 1, nbytes)

    def _lookup(self, module: nn.Module) -> torch.Tensor | None:
        key = id(module)
        if not self.active or key not in self.out_level:
            return None
        entry = self.entries[key].get(self.batch)
        if entry is None:
            return None
        t, version, _ = entry
        if _version(t) != version:  # changed in place downstream after an earlier hand-out
            self._drop(key)
            self.copy_out.add(key)
            return None
        self.stats.replays += 1
        if key in self.copy_out:
            return t.clone()
        self.handed_out.append(key)
        return t

    def _chain_forward(self, chain: nn.Sequential):
        children = list(chain)

        def forward(input):
            hit = self._lookup(chain)
            if hit is not None:
                return hit
            start = 0
            for j in range(len(children) - 1, -1, -1):
                cached = self._lookup(children[j])
                if cached is not None:
                    input, start = cached, j + 1
                    break
            for child in children[start:]:
                input = child(input)
            return input

        return forward


def _checksum(t: torch.Tensor) -> float:
    """The sum, in the tensor's own precision (the same reduction order each time, so an unchanged tensor gives
    the same number): a change made through `.data` does not bump the version counter, but changes this. NaN
    compares unequal to itself, so an activation holding NaN is never reused."""
    return float(t.detach().sum())


def _global_module_hooks() -> bool:
    from torch.nn.modules import module

    return any(getattr(module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))


def _tensor_levels(flow: Dataflow, bn_levels: dict[int, int]) -> dict[int, int]:
    """id(tensor) → the highest BN level upstream of it (0: no BN), by the sweep of graph.dependency_levels."""
    tensor_level: dict[int, int] = {}
    for op in flow.ops:
        level = max((tensor_level.get(id(t), 0) for t in op.inputs), default=0)
        if op.module is not None and id(op.module) in bn_levels and op.name == "batch_norm":
            level += 1
        for t in op.outputs:
            tensor_level[id(t)] = max(tensor_level.get(id(t), 0), level)
    return tensor_level
