"""The math of a branch merge, in float64: each branch as a linear map, maps composed and summed, the one layer.

A branch (a conv, a linear, an identity, an average pool, a folded affine, a chain of those, a parameter-only
per-channel scale) is a `LinearMap` x → conv(x, W) + b with a dense float64 kernel. Two maps in a row compose into
one where that is exact (`then`); maps that read one tensor sum into one, kernels zero-padded to the largest with
their centres aligned (`summed`); `build_merged` casts the result once into a Conv1d/2d/3d or Linear, keeping the
branches' grouping. Nothing here changes a module: merging.py finds the sums and rewrites the model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import skip_init

from .devices import as_float64
from .layers import ChannelAffine, channel_view, is_bn
from .rewrite import is_add, is_sub, trace_graph

POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


class NoMerge(Exception):
    """Why a branch, or a set of branches, cannot be merged exactly."""


@dataclass
class LinearMap:
    """A conv (dims ≥ 1) or linear (dims 0) map x → conv(x, weight) + bias with a dense (ungrouped) float64
    weight (out, in, *kernel)."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2

    @property
    def pointwise(self) -> bool:
        return all(k == 1 for k in self.weight.shape[2:]) and all(s == 1 for s in self.stride) \
            and all(p == 0 for p in self.padding)

    @classmethod
    def diagonal(cls, scale: torch.Tensor, bias: torch.Tensor, dims: int) -> LinearMap:
        """x·scale + bias per channel, as a pointwise conv."""
        weight = torch.diag(scale).reshape(*scale.shape, *scale.shape, *[1] * dims)
        return cls(weight, bias, (1,) * dims, (0,) * dims, (1,) * dims)


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight (out, in/groups, *k) as the dense (out, in, *k) weight it computes with."""
    w = as_float64(weight)
    if groups == 1:
        return w
    out, per_group = w.shape[0], w.shape[1]
    dense = w.new_zeros(out, per_group * groups, *w.shape[2:])
    step = out // groups
    for g in range(groups):
        dense[g * step:(g + 1) * step, g * per_group:(g + 1) * per_group] = w[g * step:(g + 1) * step]
    return dense


def conv_map(conv: _ConvNd) -> LinearMap:
    if isinstance(conv, _ConvTransposeNd):
        raise NoMerge("a transposed conv")
    k, d = conv.kernel_size, conv.dilation
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(k)
        elif any(di * (ki - 1) % 2 for ki, di in zip(k, d)):
            raise NoMerge("padding='same' with an even kernel (uneven padding)")
        else:
            padding = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    bias = as_float64(conv.bias) if conv.bias is not None else as_float64(conv.weight).new_zeros(conv.out_channels)
    return LinearMap(dense_weight(conv.weight, conv.groups), bias, tuple(conv.stride), tuple(padding), tuple(d),
                     conv.padding_mode if any(padding) else "zeros")


def pool_map(pool: nn.Module, channels: int, like: torch.Tensor) -> LinearMap:
    """An average pool as a conv: 1/kᵈ on the diagonal (exact where padded zeros count, count_include_pad)."""
    dims = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(pool)]
    k, s, p = (_tuple(v, dims) for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding))
    if pool.ceil_mode:
        raise NoMerge("an average pool with ceil_mode")
    if getattr(pool, "divisor_override", None):
        raise NoMerge("an average pool with divisor_override")
    if any(p) and not pool.count_include_pad:
        raise NoMerge("an average pool with padding and count_include_pad=False (its border divides by fewer)")
    weight = torch.zeros(channels, channels, *k, dtype=torch.float64, device=like.device)
    idx = torch.arange(channels, device=like.device)
    weight[idx, idx] = 1.0 / math.prod(k)
    return LinearMap(weight, weight.new_zeros(channels), s, p, (1,) * dims)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def then(first: LinearMap, second: LinearMap) -> LinearMap:
    """second(first(x)) as one map, where that is exact."""
    if first.dims != second.dims:
        raise NoMerge("a linear and a conv map in a row")
    if second.pointwise:  # W2·(W1 x + b1) + b2
        w2 = second.weight.reshape(second.weight.shape[:2])
        weight = torch.einsum("om,mi...->oi...", w2, first.weight)
        return LinearMap(weight, w2 @ first.bias + second.bias, first.stride, first.padding, first.dilation,
                         first.padding_mode)
    if first.pointwise:
        # The second map pads its input (first's output) with zeros; one map pads x with zeros, where the first
        # would give its bias: exact only without that bias, or without padding.
        if any(second.padding) and bool(first.bias.abs().max() > 0):
            raise NoMerge("a bias before a padded conv (the border would differ: the conv pads with zeros, "
                           "not with that bias)")
        if any(second.padding) and second.padding_mode != "zeros":
            raise NoMerge(f"a map before a conv with padding_mode={second.padding_mode!r}")
        w1 = first.weight.reshape(first.weight.shape[:2])
        weight = torch.einsum("om...,mi->oi...", second.weight, w1)
        bias = second.bias + second.weight.sum(dim=tuple(range(2, second.weight.dim()))) @ first.bias
        return LinearMap(weight, bias, second.stride, second.padding, second.dilation, second.padding_mode)
    raise NoMerge("two spatial maps in a row (k>1 or strided each)")


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum() of tensors, typed: its start 0 only matters for an empty sequence, which no caller passes."""
    return cast(torch.Tensor, sum(tensors))


def summed(maps: list[LinearMap]) -> LinearMap:
    """Σ maps as one: kernels zero-padded to the largest, centres aligned (float64)."""
    dims = maps[0].dims
    if any(m.dims != dims for m in maps) or len({m.weight.shape[:2] for m in maps}) != 1:
        raise NoMerge("branches of different kinds or channel counts")
    if dims == 0:
        return LinearMap(_sum(m.weight for m in maps), _sum(m.bias for m in maps))
    strides = {m.stride for m in maps}
    if len(strides) > 1:
        raise NoMerge(f"different strides ({', '.join(str(s) for s in sorted(strides))})")
    modes = {m.padding_mode for m in maps if any(m.padding)}
    if len(modes) > 1:
        raise NoMerge(f"padding modes differ ({', '.join(sorted(modes))})")
    spatial = [m for m in maps if any(k > 1 for k in m.weight.shape[2:])]
    dilations = {m.dilation for m in spatial}
    if len(dilations) > 1:
        raise NoMerge("different dilations")
    dilation = dilations.pop() if dilations else (1,) * dims
    kernel = [max(m.weight.shape[2 + i] for m in maps) for i in range(dims)]
    padding = [max(m.padding[i] for m in maps) for i in range(dims)]
    weight = maps[0].weight.new_zeros(*maps[0].weight.shape[:2], *kernel)
    for m in maps:
        index = [slice(None), slice(None)]
        for i in range(dims):
            shift, rest = divmod(padding[i] - m.padding[i], dilation[i])
            k = m.weight.shape[2 + i]
            # Same output size and alignment: each branch's centre offset p - d(k-1)/2 must be equal.
            if rest or shift < 0 or shift + k > kernel[i] or \
                    2 * padding[i] - dilation[i] * (kernel[i] - 1) != 2 * m.padding[i] - m.dilation[i] * (k - 1):
                raise NoMerge("kernel centres not aligned (each branch's padding − (kernel−1)/2 differs)")
            index.append(slice(shift, shift + k))
        weight[tuple(index)] += m.weight
    return LinearMap(weight, _sum(m.bias for m in maps), maps[0].stride, tuple(padding), dilation,
                     modes.pop() if modes else "zeros")


def largest_groups(weight: torch.Tensor) -> int:
    """The largest group count whose block structure holds every nonzero weight: the merged conv keeps its
    branches' grouping (depthwise stays depthwise, and costs what a depthwise conv costs)."""
    out, inp = weight.shape[:2]
    nonzero = weight.reshape(out, inp, -1).ne(0).any(dim=2)
    for g in sorted({g for g in range(1, math.gcd(out, inp) + 1) if out % g == 0 and inp % g == 0}, reverse=True):
        blocks = nonzero.reshape(g, out // g, g, inp // g).any(dim=3).any(dim=1)  # (g, g): any weight in block
        if not (blocks & ~torch.eye(g, dtype=torch.bool, device=weight.device)).any():
            return g
    return 1


def build_merged(m: LinearMap, dtype: torch.dtype) -> nn.Module:
    """The merged map as a Conv1d/2d/3d or Linear of `dtype`, cast once."""
    out, inp = m.weight.shape[:2]
    device = m.weight.device
    if m.dims == 0:
        layer = skip_init(nn.Linear, inp, out, device=device, dtype=dtype)  # no random init: the RNG is the user's
        weight = m.weight
    else:
        g = largest_groups(m.weight)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[m.dims]
        layer = skip_init(conv, inp, out, tuple(m.weight.shape[2:]), stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=g, padding_mode=m.padding_mode, device=device, dtype=dtype)
        step_o, step_i = out // g, inp // g
        weight = torch.cat([m.weight[j * step_o:(j + 1) * step_o, j * step_i:(j + 1) * step_i] for j in range(g)])
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        layer.bias.copy_(m.bias.to(dtype))
    return layer


# ---------------------------------------------------------------- one branch as a map


def branch_map(module: nn.Module, shape: torch.Size, like: torch.Tensor) -> LinearMap | None:
    """The map a branch module computes on an input of `shape` (None: the identity). Raises NoMerge where it
    is not one exact linear map."""
    dims = len(shape) - 2 if len(shape) > 2 else 0
    if is_pass_through_module(module):
        return None
    if isinstance(module, _ConvNd):
        if len(shape) != module.weight.dim():
            raise NoMerge("a conv on an unbatched input")
        return conv_map(module)
    if isinstance(module, nn.Linear):
        if len(shape) != 2:
            raise NoMerge("a Linear on a tensor of more than 2 dims (its channel axis is the last one)")
        return LinearMap(as_float64(module.weight), as_float64(module.bias) if module.bias is not None
                         else as_float64(module.weight).new_zeros(module.out_features))
    if isinstance(module, ChannelAffine):
        scale = as_float64(module.scale)
        shift = as_float64(module.shift) - (as_float64(module.center) * scale if module.center is not None else 0)
        return LinearMap.diagonal(scale, shift, dims)
    if is_bn(module):  # refused or skipped by the fold: merging it would undo that decision
        raise NoMerge(f"a BatchNorm the fold left as it is ({type(module).__name__})")
    if isinstance(module, POOLS):
        if len(shape) != {nn.AvgPool1d: 3, nn.AvgPool2d: 4, nn.AvgPool3d: 5}[type(module)]:
            raise NoMerge("an average pool on an unbatched input")
        return pool_map(module, shape[1], like)
    if type(module).__module__.startswith("torch.nn.modules") and not isinstance(module, nn.Sequential):
        raise NoMerge(f"a nonlinearity or non-linear layer between ({type(module).__name__})")
    try:
        return _chain_map(module, shape, like)
    except NoMerge:
        probed = _probed_affine(module, shape, like)
        if probed is None:
            raise
        return probed


def _probed_affine(module: nn.Module, shape: torch.Size, like: torch.Tensor) -> LinearMap | None:
    """A parameter-only leaf module (timm's LayerScale: x·γ) that computes a per-channel x·s + t: s and t
    measured in float64 on zeros and ones, then confirmed on a random input. None where it is anything else."""
    if next(module.children(), None) is not None or len(shape) < 2 or isinstance(module, torch.jit.ScriptModule):
        return None
    try:
        m64 = copy.deepcopy(module).double()
        probe = {v: torch.full(shape, float(v), dtype=torch.float64, device=like.device) for v in (0, 1)}
        r = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(like.device)
        with torch.no_grad():
            shift, one, out = m64(probe[0]), m64(probe[1]), m64(r.clone())
    except Exception:
        return None
    if not all(isinstance(t, torch.Tensor) and t.shape == shape for t in (shift, one, out)):
        return None
    scale = one - shift
    per_channel = [t.movedim(1, 0).reshape(shape[1], -1) for t in (scale, shift)]
    if any(bool((t - t[:, :1]).abs().max() > 0) for t in per_channel):
        return None
    s, t = per_channel[0][:, 0], per_channel[1][:, 0]
    expected = r * channel_view(s, len(shape)) + channel_view(t, len(shape))
    if float((out - expected).abs().max()) > 1e-12 * max(float(expected.abs().max()), 1.0):
        return None
    return LinearMap.diagonal(s, t, len(shape) - 2)


def is_pass_through_module(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0) or (
        type(module).__name__ in ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "DropPath")
        and not module.training)


def _chain_map(module: nn.Module, shape: torch.Size, like: torch.Tensor) -> LinearMap | None:
    """A container whose forward calls submodules one after another: the composition of their maps."""
    try:
        graph = trace_graph(module)
    except Exception as e:
        raise NoMerge(f"{type(module).__name__}'s forward does not trace with torch.fx ({type(e).__name__})") \
            from e
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    current, result = inputs[0] if len(inputs) == 1 else None, None
    for node in nodes:
        if _adds_zero(node, current):  # MobileOne's `0 + identity(x)` where a branch is absent
            current = node
            continue
        if node.op != "call_module" or len(node.args) != 1 or node.args[0] is not current or node.kwargs:
            what = node.target if node.op != "get_attr" else "a parameter"
            raise NoMerge(f"{type(module).__name__}'s forward is not one chain of layers "
                           f"({getattr(what, '__name__', what)})")
        step = branch_map(module.get_submodule(node.target), shape, like)
        if step is not None:
            result = step if result is None else then(result, step)
            shape = shape_after(step, shape)
        current = node
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is not current:
        raise NoMerge(f"{type(module).__name__}'s forward does not return its last layer's output")
    return result


def _adds_zero(node: fx.Node, current: fx.Node | None) -> bool:
    return (is_add(node) or is_sub(node)) and current in node.args and any(
        isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0 for a in node.args)


def shape_after(m: LinearMap, shape: torch.Size) -> torch.Size:
    if m.dims == 0:
        return torch.Size((shape[0], m.weight.shape[0]))
    sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1
             for n, k, s, p, d in zip(shape[2:], m.weight.shape[2:], m.stride, m.padding, m.dilation)]
    return torch.Size((shape[0], m.weight.shape[0], *sizes))
