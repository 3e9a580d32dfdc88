"""Merge summed linear branches of a folded ONNX graph into one Conv (bntool.merging's rule, on ONNX nodes).

RepVGG/MobileOne-style blocks add branches that read one tensor x: k×k and 1×1 Convs (their BNs folded in), and
an identity whose BN folded nowhere (a per-channel Mul then Add by constants), or x itself. All are linear in x,
so their sum is one Conv whose kernel is the sum of the branch kernels, each zero-padded to the largest with its
centre aligned (an identity is a kernel with scale at the centre of its own channel):
    Σ_b conv(x, W_b, p_b) + c_b = conv(x, Σ_b pad(W_b), P) + Σ_b c_b   when every p_b - (k_b - 1)/2 is equal
Kernels are summed in float64 and cast once. Only what is exact merges: equal strides and groups, no dilation,
odd kernels, a padding offset shared by every branch (zero where an identity takes part), every branch and
partial sum read by nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import MergeDecision

Value = Callable[[str], "np.ndarray | None"]  # a tensor's constant value, None when computed at run time


@dataclass
class _Branch:
    """One term of a sum, as a conv of x: a Conv (weight float64, out × in/groups × kernel), x itself (an
    identity), or a constant; times `factors` (per-channel constants of the Muls and Subs on its way)."""

    name: str
    x: str  # "" for a constant
    weight: Any  # an np.ndarray; None: an identity, or a constant (Any: read after `is not None` filters)
    bias: np.ndarray | None  # a Conv's bias; a constant's value
    factors: list = field(default_factory=list)
    strides: tuple[int, ...] = ()
    groups: int = 1
    pads: tuple[int, ...] = ()
    dtype: Any = None

    def times(self, factor: np.ndarray) -> _Branch:
        self.factors.append(factor)
        return self


class _NoMerge(Exception):
    pass


def merge_summed_branches(nodes: list, value: Value, outputs: set[str], new_constant: Callable[[np.ndarray, Any, str],
                          str], new_name: Callable[[str], str]) -> tuple[list, list[MergeDecision]]:
    """The node list with every mergeable sum of branches of one tensor made one Conv, and what merged.

    Args:
        nodes: the main graph's nodes, in order (not changed; the list returned is new).
        value: a tensor's constant value (initializers as the fold left them).
        outputs: the graph's output names (a graph output is never an inner tensor of a merge).
        new_constant: (value, dtype, base name) → the name of a new initializer holding value cast once.
        new_name: base → a node name not used yet.
    """
    import onnx

    producers = {o: n for n in nodes for o in n.output if o}
    readers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    decisions, replaced, gone = [], {}, set()
    for root in reversed(nodes):  # outermost sums first: a merged sum takes its inner sums with it
        if id(root) in gone or root.op_type not in ("Add", "Sub") or root.domain not in ("", "ai.onnx") or \
                len(root.input) != 2:
            continue
        tree: list = []
        try:
            branches = _terms(root, producers, readers, outputs, value, tree)
            weight, bias, pads, first = _merged(branches)
        except _NoMerge:
            continue
        name = new_name(f"{root.name or root.output[0]}_merged")
        w = new_constant(weight, first.dtype, f"{name}.weight")
        b = new_constant(bias, first.dtype, f"{name}.bias")
        replaced[id(root)] = onnx.helper.make_node(
            "Conv", [first.x, w, b], [root.output[0]], name=name, group=first.groups, strides=list(first.strides),
            pads=list(pads), kernel_shape=list(weight.shape[2:]))
        gone |= {id(n) for n in tree if n is not root}
        decisions.append(MergeDecision(module=root.name or root.output[0],
                                       branches=[br.name for br in branches if br.x], merged=True, into=name))
    return [replaced.get(id(n), n) for n in nodes if id(n) not in gone], decisions[::-1]  # in graph order


def _terms(node, producers: dict, readers: dict, outputs: set[str], value: Value, tree: list) -> list[_Branch]:
    """`node`'s output as a sum of branches, through Add, Sub and Mul by constants whose outputs nothing else
    reads; `tree` collects those nodes and the Convs (removed once merged)."""
    tree.append(node)
    if node.op_type == "Conv":
        return [_conv_branch(node, value)]
    if node.op_type == "Mul":
        for i in (0, 1):
            factor = value(node.input[1 - i])
            if factor is not None and value(node.input[i]) is None:
                return [b.times(factor) for b in _term(node.input[i], node, producers, readers, outputs, value, tree)]
        raise _NoMerge
    a, b = (_term(t, node, producers, readers, outputs, value, tree) for t in node.input)
    if node.op_type == "Sub":
        b = [br.times(np.array(-1.0)) for br in b]
    return a + b


def _term(tensor: str, reader, producers: dict, readers: dict, outputs: set[str], value: Value,
          tree: list) -> list[_Branch]:
    constant = value(tensor)
    if constant is not None:  # `0 + conv(x)`, a BN's shift: a term of the bias (its Constant node goes if unread)
        return [_Branch(name=tensor, x="", weight=None, bias=np.asarray(constant, dtype=np.float64))]
    node = producers.get(tensor)
    sole = tensor not in outputs and len(readers.get(tensor, [])) == 1 and readers[tensor][0] is reader
    if node is not None and sole and node.domain in ("", "ai.onnx") and \
            node.op_type in ("Conv", "Mul", "Add", "Sub") and len(node.input) >= 2:
        return _terms(node, producers, readers, outputs, value, tree)
    return [_Branch(name="identity", x=tensor, weight=None, bias=None)]  # x itself (others may read it)


def _per_channel(v: np.ndarray, rank: int, channels: int) -> np.ndarray:
    """A constant that broadcasts against a [N, C, …] tensor of `rank` along C only, as C float64 values."""
    shape = (1,) * (rank - v.ndim) + tuple(v.shape)
    if v.ndim > rank or shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        raise _NoMerge
    return np.broadcast_to(np.asarray(v, dtype=np.float64).reshape(-1), (channels,))


def _conv_branch(node, value: Value) -> _Branch:
    from .onnx_graph import attr

    w = value(node.input[1])
    b = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or (len(node.input) > 2 and node.input[2] and b is None) or not np.issubdtype(w.dtype, np.floating):
        raise _NoMerge
    spatial = w.ndim - 2
    if attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "") or any(d != 1 for d in attr(node, "dilations", [1])):
        raise _NoMerge
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
    return _Branch(name=node.name or node.output[0], x=node.input[0], weight=np.asarray(w, dtype=np.float64),
                   bias=bias, strides=tuple(attr(node, "strides", [1] * spatial)), groups=int(attr(node, "group", 1)),
                   pads=tuple(attr(node, "pads", [0] * 2 * spatial)), dtype=w.dtype)


def _channel_scale(conv: _Branch) -> list[_Branch]:
    """A depthwise 1×1 Conv (stride 1, no padding: `--affine-as conv`'s per-channel affine) as what it is, x itself
    times a per-channel scale plus a constant, so it merges with dense Convs as an identity does; any other Conv
    as it is."""
    w = conv.weight
    channels, spatial = w.shape[0], w.ndim - 2
    depthwise = conv.groups == channels and w.shape[1:] == (1,) * (spatial + 1)
    if not depthwise or any(s != 1 for s in conv.strides) or any(conv.pads):
        return [conv]
    per_channel = (channels, *(1,) * spatial)  # broadcasts along C of an [N, C, …] tensor
    scaled = _Branch(name=conv.name, x=conv.x, weight=None, bias=None).times(w.reshape(per_channel))
    bias = conv.bias if conv.bias is not None else np.zeros(channels)
    shift = _Branch(name=f"{conv.name}.bias", x="", weight=None, bias=bias.reshape(per_channel))
    return [scaled, shift]


def _merged(branches: list[_Branch]) -> tuple[np.ndarray, np.ndarray, tuple[int, ...], _Branch]:
    """The summed kernel, bias and pads, and the first Conv branch (its x, strides, groups, dtype)."""
    convs = [b for b in branches if b.weight is not None]
    if len({b.groups for b in convs}) > 1:  # a depthwise 1×1 Conv beside dense ones: take it as the identity it is
        branches = [part for b in branches for part in (_channel_scale(b) if b.weight is not None else [b])]
        convs = [b for b in branches if b.weight is not None]
    if not convs or len(branches) < 2 or len({b.x for b in branches if b.x}) != 1:
        raise _NoMerge
    first = convs[0]
    if any(b.strides != first.strides or b.groups != first.groups or b.weight.shape[:2] != first.weight.shape[:2]
           for b in convs):
        raise _NoMerge
    spatial = first.weight.ndim - 2
    if any(k % 2 == 0 for b in convs for k in b.weight.shape[2:]):
        raise _NoMerge  # an even kernel has no centre to align
    offsets = {tuple(b.pads[i] - (b.weight.shape[2 + i % spatial] - 1) // 2 for i in range(2 * spatial))
               for b in convs}  # each side's padding beyond the kernel's half-width: equal, or no common conv
    if len(offsets) != 1:
        raise _NoMerge
    offset = offsets.pop()
    out_channels, per_group = first.weight.shape[:2]
    identities = [b for b in branches if b.x and b.weight is None]
    if identities and (any(offset) or any(s != 1 for s in first.strides) or out_channels != per_group * first.groups):
        raise _NoMerge  # an identity needs x's own positions and channels
    kernel = tuple(max(b.weight.shape[2 + d] for b in convs) for d in range(spatial))
    weight, bias = np.zeros((out_channels, per_group, *kernel)), np.zeros(out_channels)
    centre, channels = tuple(k // 2 for k in kernel), np.arange(out_channels)
    for b in branches:
        factor = np.ones(out_channels)
        for f in b.factors:
            factor = factor * _per_channel(f, spatial + 2, out_channels)
        if b.weight is not None:
            start = [(kernel[d] - b.weight.shape[2 + d]) // 2 for d in range(spatial)]
            window = (slice(None), slice(None), *(slice(s, s + k) for s, k in zip(start, b.weight.shape[2:])))
            weight[window] += b.weight * factor.reshape(-1, *[1] * (spatial + 1))
        elif b.x:
            weight[(channels, channels % per_group) + centre] += factor
        if b.bias is not None:
            bias += factor * (b.bias if b.x else _per_channel(b.bias, spatial + 2, out_channels))
    pads = tuple(offset[i] + kernel[i % spatial] // 2 for i in range(2 * spatial))
    return weight, bias, pads, first
