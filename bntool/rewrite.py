"""Rewrite one module's forward so that summed branches become one call: the structure of a branch merge.

A merge replaces, inside the forward of the module that adds the branches up, the branch calls and the adds by
one new layer. The forward is the user's Python code, so it is rewritten with torch.fx: the module is traced
with every submodule as a leaf (its own code only), and the graph edited. The result is a GraphModule: it
scripts, traces, exports and compiles. `MergeRecord` says what was merged in names that tracing the same code
gives again, so `apply_merge` rebuilds the merged structure on a freshly built architecture (load_model).
Depends only on errors.py and layers.py.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import skip_init

from .errors import InputError
from .layers import replace_module

ADD_TARGETS = (operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__", "__radd__")
SUB_TARGETS = (operator.sub, operator.isub, torch.sub, "sub", "sub_", "__sub__")
# Modules that return their input in eval mode; a sum may pass through them (timm's drop_path after a sum).
PASS_THROUGH_CLASS_NAMES = {"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "DropPath"}


@dataclass
class MergeRecord:
    """One merge: in module `module`, the terms `terms` (fx node names: branch calls, or the input itself for
    an identity branch) of the sum ending at node `root`, all reading node `input`, became one call of the
    new layer `name` (a Conv1d/2d/3d or Linear built from `layer`)."""

    module: str
    root: str
    input: str
    terms: list[str]
    name: str
    layer: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergeRecord:
        """Raises InputError if `text` is not a merge record."""
        try:
            data = json.loads(text)
            record = cls(**data)
            valid = (isinstance(record.terms, list) and all(isinstance(t, str) for t in record.terms)
                     and all(isinstance(v, str) for v in (record.module, record.root, record.input, record.name))
                     and isinstance(record.layer, dict))
        except (ValueError, TypeError) as e:
            raise InputError(f"corrupt branch-merge record in the fold layout ({type(e).__name__})") from e
        if not valid:
            raise InputError(f"corrupt branch-merge record in the fold layout: {text[:100]!r}")
        return record


class _LeafTracer(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_graph(module: nn.Module) -> fx.Graph:
    """The graph of the module's own forward (submodules are leaves), without generating its code."""
    return _LeafTracer().trace(module)


def trace_forward(module: nn.Module) -> fx.GraphModule:
    """The module's forward as a GraphModule of its own code (submodules are leaves). Raises what fx raises
    where the code cannot be traced symbolically (data-dependent control flow, *args, …)."""
    graph = _LeafTracer().trace(module)
    return fx.GraphModule(module, graph, class_name=type(module).__name__)


def is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in ADD_TARGETS and len(node.args) == 2 \
        and "alpha" not in node.kwargs


def is_sub(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in SUB_TARGETS and len(node.args) == 2 \
        and "alpha" not in node.kwargs


def is_pass_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    m = gm.get_submodule(cast(str, node.target))  # a call_module's target is the module's name
    if isinstance(m, nn.Sequential) and len(m) == 0:  # an empty shortcut
        return True
    return type(m).__name__ in PASS_THROUGH_CLASS_NAMES and (type(m).__name__ == "Identity" or not m.training)


def sum_terms(gm: fx.GraphModule, root: fx.Node) -> tuple[list[tuple[Any, int]], list[fx.Node]]:
    """The terms of the sum ending at `root`, each with its sign (+1/-1), in order; and the inner nodes (adds,
    subs, pass-throughs) that only this sum reads. A term is an fx node or a Python number."""
    terms: list[tuple[Any, int]] = []
    inner: list[fx.Node] = []

    def walk(value: Any, sign: int, top: bool) -> None:
        if isinstance(value, fx.Node) and (top or len(value.users) == 1):
            if is_add(value) or is_sub(value):
                inner.append(value)
                walk(value.args[0], sign, False)
                walk(value.args[1], -sign if is_sub(value) else sign, False)
                return
            if not top and is_pass_through(gm, value):
                inner.append(value)
                walk(value.args[0], sign, False)
                return
        terms.append((value, sign))

    walk(root, 1, True)
    return terms, inner


def sum_roots(gm: fx.GraphModule) -> list[fx.Node]:
    """Adds/subs whose result is not itself only a term of another sum."""
    roots = []
    for node in gm.graph.nodes:
        if not (is_add(node) or is_sub(node)):
            continue
        users = list(node.users)
        while len(users) == 1 and is_pass_through(gm, users[0]):
            users = list(users[0].users)
        if len(users) == 1 and (is_add(users[0]) or is_sub(users[0])):
            continue
        roots.append(node)
    return roots


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """An empty (zero) Conv1d/2d/3d or Linear as `spec` (from `layer_spec`) describes it."""
    kind = spec["kind"]
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if kind == "Linear":
        layer = skip_init(nn.Linear, spec["in"], spec["out"], bias=True, dtype=dtype)  # filled by load_state_dict
    elif kind in ("Conv1d", "Conv2d", "Conv3d"):
        layer = skip_init(getattr(nn, kind), spec["in"], spec["out"], tuple(spec["kernel"]),
                          stride=tuple(spec["stride"]), padding=tuple(spec["padding"]),
                          dilation=tuple(spec["dilation"]), groups=spec["groups"], bias=True,
                          padding_mode=spec["padding_mode"], dtype=dtype)
    else:
        raise InputError(f"corrupt branch-merge record: unknown layer kind {kind!r}")
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return layer


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    dtype = str(layer.weight.dtype).replace("torch.", "")
    if isinstance(layer, nn.Linear):
        return {"kind": "Linear", "in": layer.in_features, "out": layer.out_features, "dtype": dtype}
    conv = cast(nn.modules.conv._ConvNd, layer)  # layer_spec is called on Linear and conv layers only
    return {"kind": type(conv).__name__, "in": conv.in_channels, "out": conv.out_channels,
            "kernel": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
            "dilation": list(conv.dilation), "groups": conv.groups, "padding_mode": conv.padding_mode,
            "dtype": dtype}


def merge_in_graph(gm: fx.GraphModule, record: MergeRecord, layer: nn.Module) -> None:
    """Edit `gm` in place: the record's terms of its sum become one call of `layer` (added as record.name).

    Raises:
        InputError: the graph has no such sum or terms (the record does not fit this architecture).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    root, source = nodes.get(record.root), nodes.get(record.input)
    if root is None or source is None:
        raise InputError(f"branch-merge record for {record.module!r} does not fit this architecture's forward "
                         f"(no node {record.root!r} or {record.input!r})")
    terms, inner = sum_terms(gm, root)
    names: list[str | None] = [t.name if isinstance(t, fx.Node) else None for t, _ in terms]
    if not set(record.terms) <= set(names):
        raise InputError(f"branch-merge record for {record.module!r} does not fit this architecture's forward "
                         f"(terms {record.terms} are not all in the sum {record.root!r})")
    gm.add_submodule(record.name, layer)
    kept, removed = [], []
    remaining: Counter[str | None] = Counter(record.terms)
    with gm.graph.inserting_before(root):
        merged = gm.graph.call_module(record.name, (source,))
        for (term, sign), name in zip(terms, names):
            if remaining[name] > 0:
                remaining[name] -= 1
                removed.append(term)
                if len(removed) == 1:
                    kept.append((merged, 1))
            elif not (isinstance(term, (int, float)) and not isinstance(term, bool) and term == 0):
                kept.append((term, sign))
        total = _rebuild_sum(gm.graph, kept)
    root.replace_all_uses_with(total)
    for node in dict.fromkeys([root, *inner]):
        if not node.users and node is not total:
            gm.graph.erase_node(node)
    for term in removed:  # each removed branch: its chain of module calls, now read by nothing
        while isinstance(term, fx.Node) and term.op == "call_module" and not term.users and term is not source:
            before = term.args[0] if term.args else None
            gm.graph.erase_node(term)
            term = before
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _rebuild_sum(graph: fx.Graph, terms: list[tuple[Any, int]]) -> fx.Node:
    """Σ sign·term as a chain of adds and subs; the first term is the merged call (positive)."""
    total = terms[0][0]
    for term, sign in terms[1:]:
        total = graph.call_function(operator.add if sign > 0 else operator.sub, (total, term))
    return total


def apply_merges(model: nn.Module, records: list[MergeRecord]) -> None:
    """Rebuild merges on a freshly built (and BN-layout-applied) architecture, in their order; each merged
    layer is empty, to be filled by load_state_dict. Raises InputError where a record does not fit."""
    rewritten: dict[str, fx.GraphModule] = {}
    for record in records:
        gm = rewritten.get(record.module)
        if gm is None:
            try:
                owner = model.get_submodule(record.module)
            except AttributeError as e:
                raise InputError(f"branch-merge record names {record.module!r}, which this architecture does not "
                                 "have") from e
            gm = rewritten[record.module] = _traced(owner, record.module)
            replace_module(model, record.module, gm)
        merge_in_graph(gm, record, build_layer(record.layer))


def _traced(module: nn.Module, name: str) -> fx.GraphModule:
    try:
        return trace_forward(module)
    except Exception as e:
        raise InputError(f"branch-merge record for {name!r}: its forward does not trace with torch.fx here "
                         f"({type(e).__name__}: {e})") from e
