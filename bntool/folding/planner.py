"""The fold decisions, written against a small graph interface (`FoldGraph`) that a PyTorch trace and an
ONNX graph both implement: where a BN's scale and shift can go exactly, and why not. Decides only; changes
nothing (surgery.py applies a plan; math.py computes the new weights).

The rules:
- Into the producer: the BN's input is made, channel by channel, of the outputs of conv/linear layers,
  through data movement (reshape, transpose, …, with the channel mapping checked on a probe), plain sums
  (every term scaled, one term takes the shift) and channel concats; every tensor on the way is read by
  nothing else, and each layer can take a per-output-channel scale (the adapter says why not: shared
  weights, weight transformed in forward, …).
- Into the consumer: the BN's output is read, through data movement only, by one conv/linear alone that
  does not zero-pad (a padded zero would take the shift too), with channels mapped one to one.
- Otherwise an exact per-channel affine (decided by the caller).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from ..choices import FoldAction
from ..errors import InputError, param

if TYPE_CHECKING:
    import torch

# What a BN became (see FoldAction).
FOLDED = FoldAction.FOLDED
FOLDED_FORWARD = FoldAction.FOLDED_FORWARD
AFFINE = FoldAction.AFFINE
REFUSED = FoldAction.REFUSED

# Folding forward computes W·s·x + W·t instead of W·((x - μ)·s): rounding grows with |μ|/σ when x is exact
# (a model input). Past this, an affine that subtracts μ first is used instead.
MAX_FORWARD_FOLD_MEAN = 4.0
OUTPUT = "output"  # what `FoldGraph.value_readers` lists for a graph output


class OpKind(Enum):
    """What an op is to the planner."""

    LAYER = "layer"  # conv/convT/linear (or Gemm, MatMul by a constant): a fold target
    MOVE = "move"  # one data input, each output element is one input element (reshape, transpose, eval dropout)
    ADD = "add"  # a + b, both of the output's shape (no broadcasting)
    CONCAT = "concat"  # concatenation along some axis
    COPY_PAD = "copy-pad"  # reflect/replicate/circular padding whose only reader is the layer it pads for
    OTHER = "other"  # anything else: stops a search


class FoldGraph(Protocol):
    """What the planner needs from a graph. Nodes and tensors are the adapter's own objects (compared by `is`).
    A PyTorch adapter: folding/torch_plan.py (`TorchGraph`)."""

    def producer(self, tensor: Any) -> Any | None:
        """The node that wrote `tensor`; None for a graph input or a constant."""

    def value_readers(self, tensor: Any) -> list[Any]:
        """Nodes that read `tensor`'s values (not only its shape), plus OUTPUT if the graph returns it."""

    def kind(self, node: Any) -> OpKind: ...

    def op_name(self, node: Any) -> str:
        """For messages: "conv2d", "relu", "Concat"."""

    def inputs(self, node: Any) -> list[Any]:
        """MOVE: [the moved tensor]; ADD: [a, b]; CONCAT: the parts in order; LAYER: [its data input]."""

    def output(self, node: Any) -> Any:
        """The node's (first) output tensor."""

    def shape(self, tensor: Any) -> tuple[int, ...]: ...

    def concat_axis(self, node: Any) -> int: ...

    def move_probe(self, node: Any, probe: torch.Tensor) -> torch.Tensor:
        """A MOVE node applied to `probe` (a float64 tensor of its input's shape): the channel mapping."""

    def layer_name(self, node: Any) -> str:
        """The name a FoldTarget records (the module, or the initializer owner)."""

    def layer_has_bias(self, node: Any) -> bool: ...

    def channel_axes(self, node: Any) -> tuple[int, int]:
        """A LAYER's (input channel axis, output channel axis) in its data tensors: conv (1, 1), linear (-1, -1)."""

    def producer_refusal(self, node: Any) -> str:
        """Why this LAYER's output cannot take a per-output-channel scale and shift ("" where it can)."""

    def consumer_refusal(self, node: Any, x: Any) -> str | None:
        """Whether this LAYER can take a per-input-channel scale and shift on its input `x`: "" yes; a reason;
        or None where it is no candidate at all (says nothing)."""


@dataclass
class BNDecision:
    name: str
    type: str
    channels: int
    action: FoldAction
    target: str | None = None  # the conv/linear it was folded into (several, comma-separated, across add/cat)
    reason: str = ""
    replaced_by: str = ""  # Identity, ChannelAffine, FoldedNormAct, intercepted forward (unknown BN subclasses)


@dataclass
class FoldTarget:
    """One conv/linear a BN folds into. `channels[c]` is the BN channel of the layer's channel c (its output
    channel when folded into a producer, its input channel when folded forward); `shift[c]` says whether that
    channel takes the BN's shift (the terms of a sum share one shift: only one of them takes it)."""

    layer: str
    channels: list[int]
    shift: list[bool]


@dataclass
class FunctionalBN:
    """An F.batch_norm call in some module's forward whose statistics and affine are that model's tensors."""

    op_index: int  # the call's position among the traced ops
    running_mean: str  # qualified names of the tensors it reads (weight/bias None when not given)
    running_var: str
    weight: str | None
    bias: str | None
    eps: float
    batch_statistics: bool = False  # called with training=True: the running statistics are not what it uses


@dataclass
class FoldStep:
    """What happens to one BN (a module, or a functional call): the decision, and where the math goes."""

    decision: BNDecision
    targets: list[FoldTarget] = field(default_factory=list)
    functional: FunctionalBN | None = None
    centered: bool = False  # an affine that subtracts the mean first (statistics far from zero)
    norm_act: bool = False  # a known BN+act class, replaced by a FoldedNormAct


@dataclass
class FoldPlan:
    """The decisions of a fold, and nothing changed yet: what `plan_fold` returns and `fold` applies."""

    steps: list[FoldStep] = field(default_factory=list)
    batch_norm_ops: int = 0  # batch_norm ops per forward of the model as planned
    params: int = 0
    by_request: set[str] = field(default_factory=set)  # BNs the user left in training mode inside an eval model
    opaque: list[str] = field(default_factory=list)  # TorchScript submodules: not traced into, nothing folded inside
    unaccounted_ops: list[str] = field(default_factory=list)  # batch_norm calls no step covers, and why
    notes: list[str] = field(default_factory=list)  # about the model as a whole (a compiled model unwrapped)

    @property
    def decisions(self) -> list[BNDecision]:
        return [s.decision for s in self.steps]


class NoFold(Exception):
    """Why a BN cannot be folded in the direction tried."""


# ---------------------------------------------------------------- into the producer


def producer_targets(graph: FoldGraph, x: Any, is_bn_reader, channels: int) -> list[FoldTarget]:
    """The layers whose outputs make up x, the BN's input (axis 1 its channels), each read by nothing else.

    Args:
        graph: the graph.
        x: the tensor the BN normalizes.
        is_bn_reader: node → whether it is the BN's own read of x.
        channels: the BN's channel count.

    Raises:
        NoFold: with the reason, where the BN cannot go into its producers.
    """
    sources = _sources(graph, x, is_bn_reader, [], top=True)
    targets = []
    for node, path in sources:
        reason = graph.producer_refusal(node)
        if reason:
            raise NoFold(reason)
        mapping = _producer_channels(graph, node, path, channels)
        targets.append(FoldTarget(graph.layer_name(node), mapping, [False] * len(mapping)))
    # Every BN channel takes its shift exactly once; layers with a bias first, so no bias needs adding.
    has_bias = {graph.layer_name(node): graph.layer_has_bias(node) for node, _ in sources}
    given: set[int] = set()
    for t in sorted(targets, key=lambda t: not has_bias[t.layer]):
        for c, b in enumerate(t.channels):
            if b not in given:
                t.shift[c] = True
                given.add(b)
    if len(given) != channels:
        raise NoFold("the layers feeding it do not cover all its channels")
    return targets


def _sources(graph: FoldGraph, t: Any, is_reader, path: list, top: bool = False) -> list[tuple[Any, list]]:
    """The LAYER nodes whose outputs make up t, each with the path of nodes from its output to the BN's input."""
    readers = graph.value_readers(t)
    sole = len(readers) == 1 and readers[0] != OUTPUT and is_reader(readers[0])
    what = "its input" if top else (f"a {'term' if path[0][0] == 'add' else 'part'} of the "
                                    f"{graph.op_name(path[0][1])} feeding it")
    if not sole:
        raise NoFold(f"{what} is also read by {_describe(graph, readers, is_reader)}")
    node = graph.producer(t)
    if node is None:
        raise NoFold("fed by a model input" if top else f"{what} is a model input")
    kind = graph.kind(node)
    if kind is OpKind.LAYER:
        return [(node, path)]
    if kind is OpKind.MOVE:
        return _sources(graph, graph.inputs(node)[0], _is(node), [("move", node)] + path, top)
    if kind is OpKind.ADD:
        return [s for term in graph.inputs(node) for s in _sources(graph, term, _is(node), [("add", node)] + path)]
    if kind is OpKind.CONCAT:
        return [s for j, part in enumerate(graph.inputs(node))
                for s in _sources(graph, part, _is(node), [("cat", node, j)] + path)]
    name = graph.op_name(node)
    raise NoFold(f"fed by {name}, not a conv/linear" if top else f"{what} comes from {name}, not a conv/linear")


def _is(node: Any):
    return lambda other: other is node


def _producer_channels(graph: FoldGraph, node: Any, path: list, channels: int) -> list[int]:
    """For each output channel of the layer, the BN channel it becomes (checked on a probe carried along path)."""
    out = graph.output(node)
    shape = graph.shape(out)
    out_axis = graph.channel_axes(node)[1] % len(shape)
    per_bn = _direct_channels(graph, path, shape, out_axis)
    if per_bn is None:
        from ..graph import channel_map, channel_probe  # a probe only where data moves: the module imports no torch

        per_bn = channel_map(_carry(graph, path, channel_probe(shape, out_axis)), 1)
    layer_channels = shape[out_axis]
    if per_bn is None or sorted(c for c in per_bn if c >= 0) != list(range(layer_channels)) or len(per_bn) != channels:
        raise NoFold("the reshape between conv/linear and BN mixes channels")
    mapping = [0] * layer_channels
    for bn_channel, layer_channel in enumerate(per_bn):
        if layer_channel >= 0:
            mapping[layer_channel] = bn_channel
    return mapping


def _direct_channels(graph: FoldGraph, path: list, shape: tuple[int, ...], out_axis: int) -> list[int] | None:
    """What `_carry` + `channel_map` give, without a probe, where nothing moves data on the path (sums, and
    concats along axis 1): the layer's channel c is BN channel offset + c. None where a probe must decide."""
    if out_axis != 1 or 0 in shape or any(step[0] == "move" for step in path):
        return None
    channels, offset = shape[1], 0
    total = channels
    for step in path:
        if step[0] != "cat":
            continue
        parts = [graph.shape(p) for p in graph.inputs(step[1])]
        if graph.concat_axis(step[1]) % len(parts[0]) != 1:
            return None
        offset += sum(p[1] for p in parts[:step[2]])
        total = sum(p[1] for p in parts)
    before, after = [-1] * offset, [-1] * (total - offset - channels)
    return before + list(range(channels)) + after


def _carry(graph: FoldGraph, path: list, probe: torch.Tensor) -> torch.Tensor:
    """Carry a channel-index probe from a layer's output to the BN's input along the path: data movement
    replayed, a sum passes it through, a concat places it among -1s (the other parts' channels)."""
    import torch

    for step in path:
        kind, node = step[0], step[1]
        if kind == "move":
            probe = graph.move_probe(node, probe)
        elif kind == "cat":
            parts = [probe if i == step[2] else torch.full(graph.shape(p), -1.0, dtype=probe.dtype)
                     for i, p in enumerate(graph.inputs(node))]
            probe = torch.cat(parts, dim=graph.concat_axis(node))
    return probe


def _describe(graph: FoldGraph, readers: list, is_reader) -> str:
    others = [r for r in readers if r == OUTPUT or not is_reader(r)]
    names = sorted({r if isinstance(r, str) else graph.op_name(r) for r in others})
    return ", ".join(names) or "nothing"


# ---------------------------------------------------------------- into the consumer


def consumer_target(graph: FoldGraph, y: Any) -> tuple[FoldTarget | None, str | None]:
    """The layer that alone reads y, the BN's output (axis 1 its channels), through data movement only.

    Returns:
        (target, None) where the BN can go forward into it; (None, reason) where a candidate refuses;
        (None, None) where there is no candidate.
    """
    chain: list[Any] = []
    x = y
    while True:
        readers = graph.value_readers(x)
        if len(readers) != 1 or readers[0] == OUTPUT:
            return None, None
        node = readers[0]
        kind = graph.kind(node)
        if kind is OpKind.COPY_PAD:  # reflect/replicate/circular padding copies BN outputs: their reader is next
            pad_readers = graph.value_readers(graph.output(node))
            if len(pad_readers) != 1 or pad_readers[0] == OUTPUT or graph.kind(pad_readers[0]) is not OpKind.LAYER:
                return None, None
            return _consumer(graph, pad_readers[0], graph.output(node), chain, graph.shape(y))
        if kind is OpKind.LAYER:
            return _consumer(graph, node, x, chain, graph.shape(y))
        if kind is OpKind.MOVE:
            chain.append(node)
            x = graph.output(node)
            continue
        return None, None


def _consumer(graph: FoldGraph, node: Any, x: Any, chain: list, y_shape) -> tuple[FoldTarget | None, str | None]:
    reason = graph.consumer_refusal(node, x)
    if reason is None or reason:
        return None, reason
    in_axis = graph.channel_axes(node)[0]
    mapping = _direct_consumer_channels(chain, tuple(y_shape), in_axis)
    if mapping is None:
        from ..graph import channel_map, channel_probe

        probe = channel_probe(y_shape, 1)
        for move in chain:
            probe = graph.move_probe(move, probe)
        mapping = channel_map(probe, in_axis % probe.dim()) if probe.dim() > 1 else None
    if mapping is None:
        return None, "the reshape between BN and the next layer mixes channels"
    return FoldTarget(graph.layer_name(node), mapping, [True] * len(mapping)), None


def _direct_consumer_channels(chain: list, y_shape: tuple[int, ...], in_axis: int) -> list[int] | None:
    """What the probe gives, without one, where the layer reads the BN's output directly on axis 1: channel for
    channel. None where a probe must decide."""
    if chain or len(y_shape) < 2 or in_axis % len(y_shape) != 1 or 0 in y_shape:
        return None
    return list(range(y_shape[1]))


def check_skip_patterns(skip: Sequence[str], names: Sequence[str]) -> None:
    """Every skip pattern must name at least one BN: a typo would otherwise fold the layer it meant to keep."""
    if isinstance(skip, str):
        raise InputError(f"{param('skip')} {skip!r}: give a list of patterns, not one string", param="skip")
    unmatched = [p for p in skip if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = ", ".join(names[:6]) + (f", … {len(names) - 6} more" if len(names) > 6 else "")
        raise InputError(f"{param('skip')} {unmatched[0]!r}: matches no BatchNorm layer (they are: "
                         f"{shown or 'none'})", param="skip")
