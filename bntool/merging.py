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
changes through torch.fx in that module only (bntool.rewrite). This module finds the sums and rewrites them;
the maps, their composition and sum, and the merged layer are merge_math.py.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from .graph import Dataflow, trace
from .layers import replace_module
from .layout import MergeDecision  # the record, torch-free: an ONNX merge's too
from .merge_math import LinearMap, NoMerge, branch_map, build_merged, shape_after, summed, then
from .rewrite import (
    MergeRecord,
    is_pass_through,
    layer_spec,
    merge_in_graph,
    sum_roots,
    sum_terms,
    trace_forward,
)
from .utils import iter_tensors

SUM_OP_NAMES = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__"}


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
                    raise NoMerge("its output is also read elsewhere")
                m, shape = None, x.shape
                for node in _chain(term, source):
                    sub = gm.get_submodule(node.target)
                    step = branch_map(sub, shape, x)  # first: a nonlinearity (a shared ReLU) is the reason
                    if len(flow.calls_of(sub)) > len(flow.calls_of(module)):
                        raise NoMerge("the branch module is called more than once per call of its owner")
                    if step is not None:
                        m = step if m is None else then(m, step)
                        shape = shape_after(step, shape)
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
        except NoMerge as e:
            left_out.append(f"{label}: {e}")
    branches = [label for label, _ in labels]
    if len(maps) < 2 or "layer" not in kinds:
        if not left_out or sum(term is not source for term, _ in terms) < 2:
            return None, None  # nothing to say, or a plain residual x + f(x) with a non-linear f
        return None, MergeDecision(name, branches + [s.split(":")[0] for s in left_out], False,
                                   reason="; ".join(left_out[:3]))
    try:
        merged = summed(maps)
    except NoMerge as e:
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


