"""Merge summed linear branches of a folded model into one layer (structural re-parameterisation).

RepVGG-style blocks add several branches that read the same tensor: k×k and 1×1 convs (BN folded into
each), an identity, an average pool, a 1×1 conv feeding a k×k one. All are linear in the input, so their sum is
one conv whose kernel is the sum of the branch kernels, each zero-padded to the largest with its centre
aligned:
    Σ_b conv(x, W_b, p_b) + c_b = conv(x, Σ_b pad(W_b), P) + Σ_b c_b   when every p_b - (k_b - 1)/2 is equal
An identity branch is a conv with an identity kernel; an average pool with count_include_pad a conv with
1/kᵈ on the diagonal; a 1×1 conv then a k×k conv one k×k conv W_k·W_1 (exact at the border only where the
1×1 adds no bias, since the k×k conv pads its input with zeros). Kernels are composed and summed in float64
and cast once. Which sums exist comes from the dataflow (modules whose forward adds tensors); the structure
changes through torch.fx in that module only (bntool.rewrite).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import skip_init

from .devices import as_float64
from .graph import Dataflow, trace
from .layers import ChannelAffine, channel_view, is_bn, replace_module
from .rewrite import (
    MergeRecord,
    is_add,
    is_pass_through,
    is_sub,
    layer_spec,
    merge_in_graph,
    sum_roots,
    sum_terms,
    trace_forward,
    trace_graph,
)
from .utils import iter_tensors

SUM_OP_NAMES = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__"}
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass
class MergeDecision:
    """One sum of branches reading one tensor: merged into one layer, or not, and why."""

    module: str  # the module whose forward adds them ("" for the model itself)
    branches: list[str]  # qualified names of the branch modules; "identity" for the input itself
    merged: bool
    into: str = ""  # the new layer's qualified name
    reason: str = ""
    left_out: list[str] = field(default_factory=list)  # branches of the sum kept, each with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NoMerge(Exception):
    """Why a branch, or a set of branches, cannot be merged exactly."""


# ---------------------------------------------------------------- the math (float64, no modules changed)


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
        raise _NoMerge("a transposed conv")
    k, d = conv.kernel_size, conv.dilation
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(k)
        elif any(di * (ki - 1) % 2 for ki, di in zip(k, d)):
            raise _NoMerge("padding='same' with an even kernel (uneven padding)")
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
        raise _NoMerge("an average pool with ceil_mode")
    if getattr(pool, "divisor_override", None):
        raise _NoMerge("an average pool with divisor_override")
    if any(p) and not pool.count_include_pad:
        raise _NoMerge("an average pool with padding and count_include_pad=False (its border divides by fewer)")
    weight = torch.zeros(channels, channels, *k, dtype=torch.float64, device=like.device)
    idx = torch.arange(channels, device=like.device)
    weight[idx, idx] = 1.0 / math.prod(k)
    return LinearMap(weight, weight.new_zeros(channels), s, p, (1,) * dims)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n


def then(first: LinearMap, second: LinearMap) -> LinearMap:
    """second(first(x)) as one map, where that is exact."""
    if first.dims != second.dims:
        raise _NoMerge("a linear and a conv map in a row")
    if second.pointwise:  # W2·(W1 x + b1) + b2
        w2 = second.weight.reshape(second.weight.shape[:2])
        weight = torch.einsum("om,mi...->oi...", w2, first.weight)
        return LinearMap(weight, w2 @ first.bias + second.bias, first.stride, first.padding, first.dilation,
                         first.padding_mode)
    if first.pointwise:
        # The second map pads its input (first's output) with zeros; one map pads x with zeros, where the first
        # would give its bias: exact only without that bias, or without padding.
        if any(second.padding) and bool(first.bias.abs().max() > 0):
            raise _NoMerge("a bias before a padded conv (the border would differ: the conv pads with zeros, "
                           "not with that bias)")
        if any(second.padding) and second.padding_mode != "zeros":
            raise _NoMerge(f"a map before a conv with padding_mode={second.padding_mode!r}")
        w1 = first.weight.reshape(first.weight.shape[:2])
        weight = torch.einsum("om...,mi->oi...", second.weight, w1)
        bias = second.bias + second.weight.sum(dim=tuple(range(2, second.weight.dim()))) @ first.bias
        return LinearMap(weight, bias, second.stride, second.padding, second.dilation, second.padding_mode)
    raise _NoMerge("two spatial maps in a row (k>1 or strided each)")


def _sum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum() of tensors, typed: its start 0 only matters for an empty sequence, which no caller passes."""
    return cast(torch.Tensor, sum(tensors))


def summed(maps: list[LinearMap]) -> LinearMap:
    """Σ maps as one: kernels zero-padded to the largest, centres aligned (float64)."""
    dims = maps[0].dims
    if any(m.dims != dims for m in maps) or len({m.weight.shape[:2] for m in maps}) != 1:
        raise _NoMerge("branches of different kinds or channel counts")
    if dims == 0:
        return LinearMap(_sum(m.weight for m in maps), _sum(m.bias for m in maps))
    strides = {m.stride for m in maps}
    if len(strides) > 1:
        raise _NoMerge(f"different strides ({', '.join(str(s) for s in sorted(strides))})")
    modes = {m.padding_mode for m in maps if any(m.padding)}
    if len(modes) > 1:
        raise _NoMerge(f"padding modes differ ({', '.join(sorted(modes))})")
    spatial = [m for m in maps if any(k > 1 for k in m.weight.shape[2:])]
    dilations = {m.dilation for m in spatial}
    if len(dilations) > 1:
        raise _NoMerge("different dilations")
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
                raise _NoMerge("kernel centres not aligned (each branch's padding − (kernel−1)/2 differs)")
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
    """The map a branch module computes on an input of `shape` (None: the identity). Raises _NoMerge where it
    is not one exact linear map."""
    dims = len(shape) - 2 if len(shape) > 2 else 0
    if is_pass_through_module(module):
        return None
    if isinstance(module, _ConvNd):
        if len(shape) != module.weight.dim():
            raise _NoMerge("a conv on an unbatched input")
        return conv_map(module)
    if isinstance(module, nn.Linear):
        if len(shape) != 2:
            raise _NoMerge("a Linear on a tensor of more than 2 dims (its channel axis is the last one)")
        return LinearMap(as_float64(module.weight), as_float64(module.bias) if module.bias is not None
                         else as_float64(module.weight).new_zeros(module.out_features))
    if isinstance(module, ChannelAffine):
        scale = as_float64(module.scale)
        shift = as_float64(module.shift) - (as_float64(module.center) * scale if module.center is not None else 0)
        return LinearMap.diagonal(scale, shift, dims)
    if is_bn(module):  # refused or skipped by the fold: merging it would undo that decision
        raise _NoMerge(f"a BatchNorm the fold left as it is ({type(module).__name__})")
    if isinstance(module, POOLS):
        if len(shape) != {nn.AvgPool1d: 3, nn.AvgPool2d: 4, nn.AvgPool3d: 5}[type(module)]:
            raise _NoMerge("an average pool on an unbatched input")
        return pool_map(module, shape[1], like)
    if type(module).__module__.startswith("torch.nn.modules") and not isinstance(module, nn.Sequential):
        raise _NoMerge(f"a nonlinearity or non-linear layer between ({type(module).__name__})")
    try:
        return _chain_map(module, shape, like)
    except _NoMerge:
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
        raise _NoMerge(f"{type(module).__name__}'s forward does not trace with torch.fx ({type(e).__name__})") \
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
            raise _NoMerge(f"{type(module).__name__}'s forward is not one chain of layers "
                           f"({getattr(what, '__name__', what)})")
        step = branch_map(module.get_submodule(node.target), shape, like)
        if step is not None:
            result = step if result is None else then(result, step)
            shape = _shape_after(step, shape)
        current = node
    output = next(n for n in graph.nodes if n.op == "output")
    if output.args[0] is not current:
        raise _NoMerge(f"{type(module).__name__}'s forward does not return its last layer's output")
    return result


def _adds_zero(node: fx.Node, current: fx.Node | None) -> bool:
    return (is_add(node) or is_sub(node)) and current in node.args and any(
        isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0 for a in node.args)


def _shape_after(m: LinearMap, shape: torch.Size) -> torch.Size:
    if m.dims == 0:
        return torch.Size((shape[0], m.weight.shape[0]))
    sizes = [(n + 2 * p - d * (k - 1) - 1) // s + 1
             for n, k, s, p, d in zip(shape[2:], m.weight.shape[2:], m.stride, m.padding, m.dilation)]
    return torch.Size((shape[0], m.weight.shape[0], *sizes))


# ---------------------------------------------------------------- finding and rewriting sums


def candidate_modules(flow: Dataflow, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose own forward sums outputs of two of its children called on one tensor (or one such output
    and that tensor), from the dataflow; parents first. A residual block whose sum reads a body and a shortcut
    of different tensors is no candidate (and is never traced with torch.fx)."""
    return [(n, m) for n, m in model.named_modules() if next(m.children(), None) is not None
            and _sums_branches(flow, m)]


def _sums_branches(flow: Dataflow, module: nn.Module) -> bool:
    source_of: dict[int, int] = {}  # a submodule's output tensor → the one tensor that call read
    for child in list(module.modules())[1:]:  # items of a ModuleList are called, the list is not
        for call in flow.calls_of(child):
            if len(call.inputs) == 1:
                for out in call.outputs:
                    source_of.setdefault(id(out), id(call.inputs[0]))  # the outermost call decides
    for op in flow.ops_in(module):
        if op.name not in SUM_OP_NAMES:
            continue
        terms = _sum_leaves(flow, module, op)
        sources = [source_of.get(id(t)) for t in terms]
        ids = [id(t) for t in terms]
        branch_sources = [src for src in sources if src is not None]
        if len(set(branch_sources)) < len(branch_sources) or any(src in ids for src in branch_sources):
            return True
    return False


def _sum_leaves(flow: Dataflow, module: nn.Module, op) -> list[torch.Tensor]:
    """The tensors a chain of adds/subs in `module`'s own code sums (in-place adds keep their first term)."""
    leaves = []
    for t in op.inputs:
        producer = flow.producer(t)
        if producer is not None and producer is not op and producer.module is module \
                and producer.name in SUM_OP_NAMES:
            leaves += _sum_leaves(flow, module, producer)
        else:
            leaves.append(t)
    return leaves


def merge_branches(model: nn.Module, inputs: tuple) -> tuple[list[MergeRecord], list[MergeDecision]]:
    """Merge, in place, every sum of linear branches of `model` that reads one tensor, where exact.

    Args:
        model: a folded model in eval mode (BNs already folded; a branch with a BN the fold left is kept).
        inputs: the positional inputs of one forward: its dataflow says which modules add tensors, and each
            such module's first call (arguments and output) is recorded.

    Returns:
        (records, decisions): what `rewrite.apply_merges` needs to rebuild the structure, one decision per sum.
    """
    containers = [m for m in model.modules() if next(m.children(), None) is not None
                  and not isinstance(m, torch.jit.ScriptModule)]  # TorchScript parts run as they are
    calls: dict[int, tuple] = {}

    def record_call(module, args, kwargs, output):  # copies: later in-place ops must not change them
        if id(module) not in calls:
            calls[id(module)] = _copied((args, kwargs, output))

    handles = [m.register_forward_hook(record_call, with_kwargs=True) for m in containers]
    try:
        flow, _ = trace(model, inputs)
    finally:
        for h in handles:
            h.remove()
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(m), []).append(n)
    records, decisions = [], []
    names_in_order = [n for n, _ in model.named_modules()]
    for name, module in reversed(candidate_modules(flow, model)):  # inner blocks first: merged, they are
        # linear branches of an outer sum (FastViT's RepMixer: x + γ·(mixer(x) − norm(x)))
        if not name or id(module) not in calls:
            continue  # the model itself keeps its class (and its other methods)
        if len(names_of.get(id(module), [])) > 1:
            decisions.append(MergeDecision(name, [], False, reason="the module is reachable under several names"))
            continue
        new, recs, decs = _merge_in_module(name, module, calls[id(module)], flow)
        decisions += decs
        if recs:
            replace_module(model, name, new)
            records += recs
    order = {n: i for i, n in enumerate(names_in_order)}
    return records, sorted(decisions, key=lambda d: order.get(d.module, -1))  # reported in model order


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def _merge_in_module(name: str, module: nn.Module, call: tuple, flow: Dataflow):
    """Merge the sums in one module's forward: (the rewritten module, records, decisions)."""
    try:
        gm = trace_forward(module)
        shapes = _node_values(gm, call)
    except Exception as e:
        return module, [], [MergeDecision(name, [], False, reason=f"its forward does not trace with torch.fx "
                                          f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}); "
                                          "branches kept")]
    records, decisions = [], []
    for root in sum_roots(gm):
        for source, terms in _terms_by_source(gm, root).items():
            record, decision = _merge_one(name, module, gm, root, source, terms, shapes, flow)
            if decision is not None:
                decisions.append(decision)
            if record is not None:
                records.append(record)
                break  # the root node is gone; other sources of this sum are left as they are
    if records and not _same_outputs(gm, call):
        for d in decisions:
            if d.merged:
                d.merged, d.into, d.reason = False, "", "the rewritten forward differs from the original"
        return module, [], decisions
    return gm, records, decisions


def _node_values(gm: fx.GraphModule, call: tuple) -> dict[str, Any]:
    """Each node's value in one run of gm on a captured call (ShapeProp without its restrictions)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            values[n.name] = result
            return result

    args, kwargs, _ = call
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = list(args) + [kwargs[p.target] for p in placeholders[len(args):] if p.target in kwargs]
    with torch.no_grad():
        Recorder(gm).run(*bound)
    return values


def _terms_by_source(gm: fx.GraphModule, root: fx.Node) -> dict[fx.Node, list[tuple[Any, int]]]:
    """The sum's branch terms grouped by the tensor they read: a chain of module calls on it (each read only by
    the next), or the tensor itself."""
    terms, _ = sum_terms(gm, root)
    groups: dict[fx.Node, list[tuple[Any, int]]] = {}
    for term, sign in terms:
        if not isinstance(term, fx.Node) or not _is_module_call(gm, term):
            continue
        first = term
        # Each step's argument is a Node: _is_module_call and is_pass_through hold on one-argument calls of Nodes.
        while (_is_module_call(gm, previous := cast(fx.Node, first.args[0])) or is_pass_through(gm, previous)) \
                and len(previous.users) == 1:
            first = previous
        groups.setdefault(previous, []).append((term, sign))
    for term, sign in terms:  # identity branches: the source itself
        if isinstance(term, fx.Node) and term in groups:
            groups[term].append((term, sign))
    return {s: t for s, t in groups.items() if len(t) >= 2}


def _is_module_call(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs \
        and isinstance(node.args[0], fx.Node) and not is_pass_through(gm, node)


def _chain(term: fx.Node, source: fx.Node) -> list[fx.Node]:
    """The module calls from `source` to `term`, in order."""
    chain = [term]
    while chain[0].args[0] is not source:
        chain.insert(0, cast(fx.Node, chain[0].args[0]))  # a module call's one argument
    return chain


def _merge_one(name, module, gm, root, source, terms, values, flow):
    """Merge the terms of one sum that read `source`; (record or None, decision or None)."""
    prefix = f"{name}." if name else ""
    x = values.get(source.name)
    if not isinstance(x, torch.Tensor):
        return None, None
    labels, maps, left_out, kinds = [], [], [], set()
    for term, sign in terms:
        label = "identity" if term is source else prefix + str(term.target)
        try:
            if term is not source:
                if len(term.users) > 1:
                    raise _NoMerge("its output is also read elsewhere")
                m, shape = None, x.shape
                for node in _chain(term, source):
                    sub = gm.get_submodule(node.target)
                    if len(flow.calls_of(sub)) > len(flow.calls_of(module)):
                        raise _NoMerge("the branch module is called more than once per call of its owner")
                    step = branch_map(sub, shape, x)
                    if step is not None:
                        m = step if m is None else then(m, step)
                        shape = _shape_after(step, shape)
            else:
                m = None
            if m is None:
                dims = x.dim() - 2 if x.dim() > 2 else 0
                m = LinearMap.diagonal(x.new_ones(x.shape[1], dtype=torch.float64),
                                       x.new_zeros(x.shape[1], dtype=torch.float64), dims)
            else:
                kinds.add("layer")
            maps.append(m if sign > 0 else LinearMap(-m.weight, -m.bias, m.stride, m.padding, m.dilation,
                                                      m.padding_mode))
            labels.append((label, term))
        except _NoMerge as e:
            left_out.append(f"{label}: {e}")
    branches = [label for label, _ in labels]
    if len(maps) < 2 or "layer" not in kinds:
        if not left_out or sum(term is not source for term, _ in terms) < 2:
            return None, None  # nothing to say, or a plain residual x + f(x) with a non-linear f
        return None, MergeDecision(name, branches + [s.split(":")[0] for s in left_out], False,
                                   reason="; ".join(left_out[:3]))
    try:
        merged = summed(maps)
    except _NoMerge as e:
        return None, MergeDecision(name, branches, False, reason=str(e), left_out=left_out)
    if merged.dims == 0 and x.dim() != 2:
        return None, MergeDecision(name, branches, False, reason="Linear branches on a tensor of more than 2 dims")
    layer = build_merged(merged, x.dtype)
    new_name = _free_name(gm, "reparam")
    record = MergeRecord(name, root.name, source.name, [t.name for _, t in labels], new_name, layer_spec(layer))
    merge_in_graph(gm, record, layer)
    return record, MergeDecision(name, branches, True, into=prefix + new_name, left_out=left_out)


def _free_name(gm: fx.GraphModule, base: str) -> str:
    taken = {n for n, _ in gm.named_children()}
    return next(f"{base}_{i}" if i else base for i in range(len(taken) + 1)
                if (f"{base}_{i}" if i else base) not in taken)


def _same_outputs(after: nn.Module, call: tuple) -> bool:
    """The rewritten forward against the original's recorded output: catches what a rewrite might change besides
    rounding (an in-place op the traced code no longer performs). The whole model is then checked against its
    float64 original as every fold is."""
    args, kwargs, before = call
    with torch.no_grad():
        result = after(*args, **kwargs)
    pairs = list(zip(iter_tensors(before), iter_tensors(result)))
    if len(pairs) != len(list(iter_tensors(before))) or any(a.shape != b.shape for a, b in pairs):
        return False
    for a, b in pairs:
        scale = float(a.abs().max()) if a.numel() and a.is_floating_point() else 0.0
        if a.numel() and float((a.double() - b.double()).abs().max()) > 1e-4 * scale:
            return False
    return True



