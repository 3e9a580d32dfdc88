"""ONNX files as input of inspect and fold: every BatchNormalization node's health, the fold decisions from the
graph's dataflow, the surgery in float64 on the initializers (cast once), and the onnxruntime check of the
folded file against the original before anything is written.

The decisions fill the same dataclasses as the PyTorch path (`FoldStep`, `BNDecision`, `FoldTarget`; a target
is an ONNX node name), and the reports are the PyTorch path's (`InspectReport`, `FoldReport`), so JSON reads
alike for both.
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .choices import AffineAs, FoldAction
from .compare import Tolerance, compare_arrays
from .errors import InputError, first_line, param
from .files import Outputs
from .onnx_graph import CONSTANT_OPS, OnnxGraph, attr, node_name
from .onnx_model import (
    BNNode,
    OnnxFile,
    TensorChanges,
    batch_norm_nodes,
    graph_output_names,
    load_onnx,
    plan_onnx_output,
    save_onnx,
    unique_name,
)

DEFAULT_TOLERANCE = Tolerance(rtol=0.0, atol=1e-4)  # the fold check's float32 rule (bntool.folding)
BN_TYPE = "BatchNormalization"


# ---------------------------------------------------------------- inspect


def inspect_onnx(source: str | os.PathLike | OnnxFile, input_shapes: Sequence[Sequence[int]] | None = None):
    """Every BatchNormalization node: configuration, statistics, health (bntool.inspection's rules) and what
    `fold_onnx` would do with it and why. Returns an InspectReport (the PyTorch path's shape).

    The decisions are fold's: where shape inference leaves a shape the rules need unknown, the same one
    onnxruntime run on random inputs tells it (`input_shapes` for symbolic input dimensions, as for fold).
    Without them, a decision that may depend on such a shape says that fold decides after that run."""
    from .inspection import InspectReport

    onnx_file = source if isinstance(source, OnnxFile) else load_onnx(source)
    graph = _fold_graph(onnx_file, input_shapes)
    plan = plan_onnx_fold(onnx_file.model, graph=graph)
    steps = {s.decision.name: s for s in plan.steps}
    layers = []
    for bn in batch_norm_nodes(onnx_file.model):
        info = describe_bn_node(bn)
        d = steps[bn.name].decision
        info.fold_action, info.fold_target, info.fold_reason = d.action, d.target, d.reason
        if graph.unknown and d.action != FoldAction.FOLDED and not _refusal(bn, ()):
            info.fold_reason += ("; " if d.reason else "") + UNKNOWN_SHAPES
        layers.append(info)
    graph = onnx_file.model.graph
    total_params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return InspectReport(layers=layers, total_modules=len(graph.node), total_params=total_params, fold_planned=True)


UNKNOWN_SHAPES = ("fold decides after one onnxruntime run (shapes the graph does not give: the input shapes, "
                  "--input-shape, show its decision here)")


def _fold_graph(onnx_file: OnnxFile, input_shapes: Sequence[Sequence[int]] | None) -> OnnxGraph:
    """The OnnxGraph fold_onnx plans on (shapes from one onnxruntime run where inference leaves them unknown);
    without that run where a symbolic input dimension has no `input_shapes`."""
    model = onnx_file.model
    try:
        inputs = example_inputs(model, input_shapes, 0, onnx_file.path)
    except InputError:
        if input_shapes is not None:
            raise
        return OnnxGraph.of(model)
    specs = _graph_inputs(model)
    return OnnxGraph.of(model, {s.name: tuple(x.shape) for s, x in zip(specs, inputs)},
                        {s.name: x.numpy() for s, x in zip(specs, inputs)})


def describe_bn_node(bn: BNNode):
    """A BNLayerInfo for one node, its health from the same rules as a PyTorch BN (inspection.health);
    momentum in PyTorch's sense (ONNX's 0.9 keeps 90% of the old statistics: PyTorch's 0.1)."""
    from .inspection import BNLayerInfo, HealthFlag, HealthKind, TensorSummary, health

    values = bn.as_module_values()
    if values.running_mean is None or values.running_var is None:
        flags = [HealthFlag(HealthKind.NO_RUNNING_STATS, "statistics computed at run time (mean/var are not "
                                                         "initializers)")]
    else:
        flags = health(values)
    return BNLayerInfo(
        name=bn.name, type=BN_TYPE, channels=bn.channels, eps=bn.epsilon, momentum=1.0 - bn.momentum, affine=True,
        track_running_stats=values.running_mean is not None, training=bool(bn.training_mode),
        num_batches_tracked=None, running_mean=TensorSummary.of(values.running_mean),
        running_var=TensorSummary.of(values.running_var), weight=TensorSummary.of(values.weight),
        bias=TensorSummary.of(values.bias), health=flags)


# ---------------------------------------------------------------- the plan


@dataclass
class OnnxFoldPlan:
    """The decisions for every BatchNormalization node (bntool.folding's FoldStep; target = an ONNX node)."""

    steps: list = field(default_factory=list)
    merges: list = field(default_factory=list)  # MergeDecisions: summed branches made one Conv when applied

    @property
    def decisions(self) -> list:
        return [s.decision for s in self.steps]


def plan_onnx_fold(model, skip: Sequence[str] = (), input_shapes: dict[str, tuple[int, ...]] | None = None,
                   example: dict[str, np.ndarray] | None = None, graph: OnnxGraph | None = None) -> OnnxFoldPlan:
    """Decide, for each BatchNormalization node, where its math goes, with the shared planner's rules
    (bntool.folding.planner) on the ONNX graph: into the layers producing its input (across Add, Concat,
    Reshape, Transpose, …), else into the one layer reading its output, else an exact per-channel affine; left
    as it is, with the reason, when its statistics are not constants or are broken, it runs in training mode, it
    sits in a subgraph or function, or `skip` names it. `input_shapes`: concrete shapes for symbolic input
    dimensions (1 where not given), for the planner's channel mappings; `example` (inputs by name): shapes
    inference cannot tell come from one onnxruntime run on it. `graph`: OnnxGraph.of(model, …) made already (the
    same one can then apply the plan)."""
    graph = graph if graph is not None else OnnxGraph.of(model, input_shapes, example)
    plan = OnnxFoldPlan()
    for bn in batch_norm_nodes(model):
        plan.steps.append(_decide(bn, graph, skip))
    return plan


def _decide(bn: BNNode, graph: OnnxGraph, skip: Sequence[str]):
    """One BN's decision, in the PyTorch path's order: refusal → producer → consumer → affine."""
    from .folding import MAX_FORWARD_FOLD_MEAN
    from .folding.math import mean_in_stds
    from .folding.planner import BNDecision, FoldStep, NoFold, consumer_target, producer_targets

    decision = BNDecision(name=bn.name, type=BN_TYPE, channels=bn.channels, action=FoldAction.REFUSED)
    step = FoldStep(decision=decision)
    decision.reason = _refusal(bn, skip)
    if decision.reason:
        return step
    try:
        step.targets = producer_targets(graph, bn.x, lambda node: node is bn.node, bn.channels)
        decision.action = FoldAction.FOLDED
        decision.target = ", ".join(t.layer for t in step.targets)
        return step
    except NoFold as why:
        decision.reason = str(why)
    stats = {k: torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)) for k, v in bn.values.items()}
    far = mean_in_stds(stats["mean"], stats["var"], bn.epsilon)
    if far > MAX_FORWARD_FOLD_MEAN:
        decision.reason += (f"; folding forward would lose precision (|mean| is {far:.0f} stds from 0, limit "
                            f"{MAX_FORWARD_FOLD_MEAN:g})")
    elif bn.y in graph.shapes:
        target, why_not = consumer_target(graph, bn.y)
        if target is not None:
            step.targets, decision.reason = [target], ""
            decision.action, decision.target = FoldAction.FOLDED_FORWARD, target.layer
            return step
        if why_not:
            decision.reason += f"; not forward: {why_not}"
    if graph.ranks.get(bn.x) is None or graph.elem_types.get(bn.x) is None:
        decision.reason += "; its input's rank or type is unknown (no exact affine without it)"
        return step
    decision.action, decision.replaced_by = FoldAction.AFFINE, "Mul+Add"
    step.centered = far > MAX_FORWARD_FOLD_MEAN  # subtract the mean first: keeps precision far from zero
    return step


def _refusal(bn: BNNode, skip: Sequence[str]) -> str:
    """Why a BN node is left as it is ("" when it can be folded or made an affine)."""
    if any(fnmatch.fnmatchcase(bn.name, pattern) for pattern in skip):
        return f"skipped ({param('skip')})"
    if bn.where:
        return f"inside {bn.where}: left as it is"
    if bn.training_mode or bn.extra_outputs:
        return "training mode: its statistics are computed at run time"
    missing = [key for key, value in bn.values.items() if value is None]
    if missing:
        return f"{', '.join(missing)} computed at run time (not an initializer or Constant)"
    if len({v.size for v in bn.values.values()}) != 1:  # type: ignore[union-attr]  # none missing (above)
        return "scale, bias, mean and var have different lengths"
    problem = _statistics_problem(bn)
    return f"{problem}; recalibrate first" if problem else ""


def _statistics_problem(bn: BNNode) -> str:
    """folding.math.statistics_problem on the node's constants ("" when sound, or when not all are constants)."""
    from .folding.math import statistics_problem

    if any(v is None for v in bn.values.values()) or len({v.size for v in bn.values.values()}) != 1:  # type: ignore[union-attr]
        return ""
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)) for k, v in bn.values.items()}
    return statistics_problem(t["mean"], t["var"], t["scale"], t["bias"], bn.epsilon)


def _refuse_unfoldable(onnx_file: OnnxFile, skip: Sequence[str]) -> None:
    """Exit 2 before any work, as for a checkpoint: a BN in training mode (onnxruntime computes it from the batch,
    differently at each optimisation level, so no check could pass) or with broken statistics (NaN/Inf, var +
    eps ≤ 0: the file is broken, not the fold), unless --skip leaves it."""
    from .folding import broken_layers_text

    broken = []
    for bn in batch_norm_nodes(onnx_file.model):
        if bn.where or any(fnmatch.fnmatchcase(bn.name, pattern) for pattern in skip):
            continue
        if bn.training_mode or bn.extra_outputs:
            broken.append((bn.name, "training_mode=1: normalizes with the batch's statistics"))
        elif problem := _statistics_problem(bn):
            broken.append((bn.name, problem))
    if broken:
        raise InputError(f"{onnx_file.path}: {broken_layers_text(broken)}: cannot be folded or checked. Export the "
                         f"model in eval mode, or run `bntool recalibrate` first, or leave them with {param('skip')}",
                         param="skip")


def bn_scale_shift(bn: BNNode) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x·scale + shift in float64 (bntool.folding.math.bn_scale_shift on the node's constants)."""
    from .folding.math import bn_scale_shift as scale_shift

    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)) for k, v in bn.values.items()}
    return scale_shift(t["mean"], t["var"], t["scale"], t["bias"], bn.epsilon)


# ---------------------------------------------------------------- surgery


class _Surgery:
    """Changes to one ModelProto's main graph: new or replaced constants (copied when shared), node rewrites."""

    def __init__(self, model, graph: OnnxGraph):
        self.model, self.graph = model, graph
        self.initializers = {t.name for t in model.graph.initializer}
        self.changes = TensorChanges()
        self.removed_nodes: set[int] = set()
        self.inserted: dict[int, list] = {}  # position of a removed BN → nodes in its place
        self.after: dict[int, list] = {}  # id of a node → nodes to put right after it
        self.merges: list = []  # what finish(merge=True) merged

    def set_constant(self, node, index: int, value: np.ndarray, dtype, base: str) -> None:
        """Give input `index` of `node` the value `value` cast once to `dtype`: in place when the tensor is an
        initializer only this node reads, else as a new initializer (the old one stays for its other readers)."""
        from onnx import numpy_helper

        name = node.input[index] if len(node.input) > index else ""
        cast = np.ascontiguousarray(value.astype(dtype))
        if name and name in self.initializers and not self.graph.shared(name, node):
            tensor = numpy_helper.from_array(cast, name)
            self.changes.replaced[name] = self.graph.constants.tensors[name] = tensor
            return
        new = self.new_constant(value, dtype, base)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new

    def new_constant(self, value: np.ndarray, dtype, base: str) -> str:
        from onnx import numpy_helper

        name = unique_name(self.graph.names, base)
        tensor = numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name)
        self.changes.added.append(tensor)
        self.initializers.add(name)
        self.graph.constants.tensors[name] = tensor
        return name

    def add_bias_after(self, node, bias: np.ndarray, dtype, base: str) -> None:
        """node → Add(bias): the node writes a new tensor, the Add writes the node's old output."""
        import onnx

        b = self.new_constant(bias, dtype, base)
        out = node.output[0]
        node.output[0] = unique_name(self.graph.names, f"{out}_unbiased")
        add = onnx.helper.make_node("Add", [node.output[0], b], [out],
                                    name=unique_name(self.graph.names, f"{base}_add"))
        self.after.setdefault(id(node), []).append(add)

    def remove_bn(self, bn: BNNode, replacement: list | None = None) -> None:
        index = _index_of(self.model.graph, bn.node)
        self.removed_nodes.add(index)
        if replacement:
            self.inserted[index] = replacement

    def finish(self, merge: bool = False) -> None:
        """Rebuild the node list (replacements where their BN was, order kept); with `merge`, summed branches of
        one tensor become one Conv (onnx_merge); then drop what the fold left unread: constant-only nodes (a
        weight's Transpose), initializers and value_info. Only what was read before the fold goes: anything the
        file already carried unread stays."""
        g = self.model.graph
        nodes = []
        for i, node in enumerate(g.node):
            if i in self.removed_nodes:
                nodes.extend(self.inserted.get(i, []))
            else:
                nodes.append(node)
                nodes.extend(self.after.get(id(node), []))
        outputs = graph_output_names(g)
        if merge:
            from .onnx_merge import merge_summed_branches

            nodes, self.merges = merge_summed_branches(nodes, self.graph.value, outputs, self.new_constant,
                                                       lambda base: unique_name(self.graph.names, base))
        was_read = set(self.graph.readers) | outputs
        while True:  # nodes whose outputs the fold made unread, until none is left
            read = _names_read(nodes) | outputs
            dead = [n for n in nodes if n.op_type in CONSTANT_OPS | {"Constant"} and
                    not any(o in read for o in n.output) and any(o in was_read for o in n.output)]
            if not dead:
                break
            nodes = [n for n in nodes if all(n is not d for d in dead)]
        del g.node[:]
        g.node.extend(nodes)
        read = _names_read(g.node) | outputs
        inputs = {i.name for i in g.input}
        self.changes.removed |= {t for t in self.initializers if t in was_read and t not in read and t not in inputs}
        self.changes.added = [t for t in self.changes.added if t.name in read]  # a merge leaves some unread
        known = {o for node in g.node for o in node.output} | inputs | (self.initializers - self.changes.removed)
        for v in [v for v in g.value_info if v.name not in known]:
            g.value_info.remove(v)


def _names_read(nodes) -> set[str]:
    return {name for node in nodes for name in (*node.input, *_subgraph_reads(node))}


def _subgraph_reads(node) -> set[str]:
    from .onnx_model import _outer_names

    return _outer_names(node)


def _index_of(graph, node) -> int:
    for i, n in enumerate(graph.node):
        if n is node:
            return i
    raise ValueError("node not in graph")


def apply_onnx_fold_plan(model, plan: OnnxFoldPlan, affine_as: str = "mul",
                         input_shapes: dict[str, tuple[int, ...]] | None = None,
                         example: dict[str, np.ndarray] | None = None, graph: OnnxGraph | None = None,
                         merge: bool = True) -> TensorChanges:
    """Apply `plan` to `model`: each folded BN's scale and shift into its target layers' constants
    (bntool.folding.math, float64, cast once to each tensor's dtype), each affine BN replaced by Mul+Add (or a
    depthwise 1×1 Conv; Sub, Mul, Add where its mean is far from zero). Nodes change in place; the
    initializers' changes are returned (`save_onnx(..., changes=)` writes them without a second copy of the
    model in memory; `changes.apply_to(model)` puts them in the model). `graph`: the OnnxGraph the plan was
    made on, if the model has not changed since (saves building it again). `merge`: then summed branches of one
    tensor (RepVGG, MobileOne) become one Conv where exact (bntool.onnx_merge; listed in `plan.merges`)."""
    graph = graph if graph is not None else OnnxGraph.of(model, input_shapes, example)
    surgery = _Surgery(model, graph)
    bns = {bn.name: bn for bn in batch_norm_nodes(model) if not bn.where}
    layers = {node_name(node): node for node in model.graph.node}
    for step in plan.steps:
        bn = bns.get(step.decision.name)
        action = step.decision.action
        if bn is None or action == FoldAction.REFUSED:
            continue
        scale, shift = bn_scale_shift(bn)
        if action in (FoldAction.FOLDED, FoldAction.FOLDED_FORWARD):
            for target in step.targets:
                _fold_into(layers[target.layer], target, scale, shift, action == FoldAction.FOLDED, surgery)
            _bypass(bn, surgery, producer_side=action == FoldAction.FOLDED)
            surgery.remove_bn(bn)
        else:
            nodes = _affine_nodes(bn, scale, shift, surgery, affine_as, graph, step.centered)
            step.decision.replaced_by = "+".join(n.op_type for n in nodes)
            surgery.remove_bn(bn, nodes)
    surgery.finish(merge)
    plan.merges = surgery.merges
    return surgery.changes


def _fold_into(node, target, scale: torch.Tensor, shift: torch.Tensor, producer: bool, surgery: _Surgery) -> None:
    """A layer's new weight and bias with the BN's scale and shift on its output (`producer`) or input channels:
    bntool.folding.math on the weight in (out, in, …) layout; Gemm/MatMul weights turned to it and back."""
    from .folding.math import fold_into_consumer, fold_into_producer, select_channels

    graph = surgery.graph
    bias_node, bias_index = node, 2
    if node.op_type == "Add":  # a linear written as MatMul + Add(bias)
        node, bias_index = graph.linear_parts(bias_node)  # type: ignore[misc]  # the plan matched it: not None
    w: Any = graph.value(node.input[1])  # not None: the plan targets layers with a constant weight
    bias_name = bias_node.input[bias_index] if bias_node is not node or graph.layer_has_bias(node) else ""
    bias = graph.value(bias_name) if bias_name else None
    op = node.op_type
    out_in = op in ("Conv", "ConvTranspose") or (op == "Gemm" and attr(node, "transB", 0))
    weight = torch.from_numpy(np.asarray(w, dtype=np.float64))
    weight = weight if out_in else weight.T
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    b = None if bias is None else torch.from_numpy(np.asarray(bias, dtype=np.float64).reshape(-1))
    if producer:
        s, t = select_channels(scale, shift, target.channels, target.shift)
        if b is not None and b.numel() == 1 < s.numel():
            b = b.expand(s.numel())
        if op == "Gemm" and t is not None:
            t = t / beta  # α·A·B + β·C: the shift enters through β·C
        new_w, new_b = fold_into_producer(weight, b, s, t, groups=int(attr(node, "group", 1)),
                                          transposed=op == "ConvTranspose")
    else:
        idx = torch.tensor(target.channels)
        new_w, added = fold_into_consumer(weight, None, scale[idx], shift[idx], groups=int(attr(node, "group", 1)))
        if op == "Gemm":
            added = added * (alpha / beta)
        new_b = added if b is None else b + added
    new_w = new_w if out_in else new_w.T
    base = node.name or node.output[0]
    surgery.set_constant(node, 1, new_w.numpy(), w.dtype, f"{base}.weight_folded")
    if new_b is None:
        return
    dtype = w.dtype if bias is None else bias.dtype
    if bias is not None and bias.ndim > 1:
        new_b = new_b.reshape(bias.shape)
    if op == "MatMul" and bias_node is node:  # no bias input: an Add after it, as a linear layer's export has
        surgery.add_bias_after(node, new_b.numpy(), dtype, f"{base}.bias_folded")
    else:
        surgery.set_constant(bias_node, bias_index, new_b.numpy(), dtype, f"{base}.bias_folded")


def _bypass(bn: BNNode, surgery: _Surgery, producer_side: bool) -> None:
    """Take the BN out of the dataflow: folded into its producers, the node writing its input now writes its
    output (name kept for readers and graph outputs); folded forward, its readers read its input instead."""
    graph = surgery.graph
    if producer_side:
        writer = graph.producers[bn.x]
        if bn.x not in writer.output:  # a MatMul given a bias Add: the Add writes it now
            writer = next(n for n in surgery.after.get(id(writer), []) if bn.x in n.output)
        writer.output[list(writer.output).index(bn.x)] = bn.y
        for reader in graph.readers.get(bn.x, []):  # shape-only readers (Shape) follow the renamed tensor
            if reader is not bn.node:
                _rename_input(reader, bn.x, bn.y)
    else:
        for reader in graph.readers.get(bn.y, []):
            _rename_input(reader, bn.y, bn.x)


def _rename_input(node, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def _affine_nodes(bn: BNNode, scale: torch.Tensor, shift: torch.Tensor, surgery: _Surgery, affine_as: str,
                  graph: OnnxGraph, centered: bool = False) -> list:
    """y = x·scale + shift per channel (axis 1), exactly the BN in eval mode: Mul and Add with [C, 1, …]
    constants; (x − mean)·scale + shift' where the mean is far from zero; or one depthwise 1×1 Conv."""
    import onnx

    from .folding.math import affine_with_center

    helper = onnx.helper
    rank = graph.ranks[bn.x]
    dtype = helper.tensor_dtype_to_np_dtype(graph.elem_types[bn.x])  # X's type (opset 15 lets γ, β differ)
    base = bn.name
    scale, shift = scale.numpy(), shift.numpy()
    if affine_as == "conv" and rank >= 3 and not centered:
        ones = [1] * (rank - 2)
        w = surgery.new_constant(scale.reshape(-1, 1, *ones), dtype, f"{base}.affine_weight")
        b = surgery.new_constant(shift, dtype, f"{base}.affine_bias")
        return [helper.make_node("Conv", [bn.x, w, b], [bn.y], name=f"{base}_affine", group=bn.channels,
                                 kernel_shape=ones)]
    trailing = [1] * max(rank - 2, 0)
    nodes, x = [], bn.x
    if centered:
        mean = np.asarray(bn.values["mean"], dtype=np.float64).reshape(-1)
        shift = affine_with_center(torch.from_numpy(scale), torch.from_numpy(shift),
                                   torch.from_numpy(mean))[1].numpy()
        m = surgery.new_constant(mean.reshape(-1, *trailing), dtype, f"{base}.affine_mean")
        x_centered = unique_name(graph.names, f"{base}_centered")
        nodes.append(helper.make_node("Sub", [x, m], [x_centered], name=f"{base}_sub"))
        x = x_centered
    s = surgery.new_constant(scale.reshape(-1, *trailing), dtype, f"{base}.affine_scale")
    t = surgery.new_constant(shift.reshape(-1, *trailing), dtype, f"{base}.affine_shift")
    mid = unique_name(graph.names, f"{base}_scaled")
    return nodes + [helper.make_node("Mul", [x, s], [mid], name=f"{base}_mul"),
                    helper.make_node("Add", [mid, t], [bn.y], name=f"{base}_add")]


# ---------------------------------------------------------------- inputs for the check


def example_inputs(model, input_shapes: Sequence[Sequence[int]] | None, seed: int, path) -> tuple:
    """Random inputs for the graph's inputs (those that are not initializers): shapes from the graph, symbolic
    dimensions from `input_shapes` (one full shape per input, in order). Floats are standard normal, integers
    0 or 1, booleans random.

    Raises:
        InputError: a symbolic dimension without `input_shapes` (naming the input), or shapes that do not fit.
    """
    import torch
    from onnx import helper

    specs = _graph_inputs(model)
    if input_shapes is not None and len(input_shapes) != len(specs):
        raise InputError(f"{path}: has {len(specs)} inputs {[s.name for s in specs]}, but {param('example_inputs')} "
                         f"gives {len(input_shapes)} shapes", param="example_inputs")
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for i, spec in enumerate(specs):
        t = spec.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        shape = _input_shape(spec.name, dims, None if input_shapes is None else tuple(input_shapes[i]), path)
        dtype = torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(t.elem_type))).dtype
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=g).to(dtype))
        else:
            inputs.append(torch.randint(0, 2, shape, generator=g).to(dtype))
    return tuple(inputs)


def _graph_inputs(model) -> list:
    """The graph's inputs that are not initializers (those a caller feeds)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _input_shape(name: str, dims: list, given: tuple | None, path) -> tuple[int, ...]:
    if given is None:
        symbolic = [d for d in dims if not isinstance(d, int) or d <= 0]
        if symbolic:
            raise InputError(f"{path}: input {name!r} has shape {dims} with symbolic dimensions "
                             f"{', '.join(map(str, symbolic))}; give its shape with {param('example_inputs')}",
                             param="example_inputs")
        return tuple(dims)
    if len(given) != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, given)):
        raise InputError(f"{path}: input {name!r} has shape {dims}, but {param('example_inputs')} gives "
                         f"{list(given)}", param="example_inputs")
    return given


# ---------------------------------------------------------------- fold, checked


def fold_onnx(
    source: str | os.PathLike | OnnxFile,
    out: str | os.PathLike | None = None,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    samples: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    skip: Sequence[str] = (),
    affine_as: str = "mul",
    provider: str = "cpu",
    force: bool = False,
    check: bool = True,
    in_place: bool = False,
    merge: bool = True,
):
    """Fold every BatchNormalization node of an ONNX file it can, check the result in onnxruntime against the
    original, and write it to `out` only if the check passed.

    Args:
        source: the ONNX file (a path, or an OnnxFile from load_onnx: its model is changed in place).
        out: where to write the folded file (its external data beside it when the input had some); None: check
            only, write nothing.
        input_shapes: one shape per graph input, for symbolic dimensions (a graph with fixed shapes needs none).
        samples, seed: random inputs checked besides the example (at several batch sizes when the batch
            axis is symbolic).
        rtol, atol: |Δ| ≤ atol + rtol·|original|; default atol 1e-4 of each output's largest magnitude. Where
            an output is over it, the original run in float64 (onnx.reference) arbitrates: the folded file passes
            when it is no further from it than 1.5× the original's own float32 error.
        skip: BN node names or glob patterns left as they are.
        affine_as: "mul" (Mul + Add) or "conv" (a depthwise 1×1 Conv) for BNs that fold into no neighbour.
        provider: onnxruntime's: "cpu" or "cuda".
        force: replace an existing `out`.
        in_place: `out` may be the input file (replaced atomically after a passing check; external data too).
        merge: after folding, summed branches that read one tensor (RepVGG, MobileOne, FastViT blocks) become
            one Conv where exact (bntool.onnx_merge); `report.merges` lists them.
        check: raise CheckFailed when the check fails (else return the failed report).

    Returns:
        A FoldReport (the PyTorch path's: decisions per BN node, counts, comparisons at both onnxruntime
        optimisation levels).

    Raises:
        InputError / CorruptFileError: the file cannot be used (see load_onnx), onnxruntime cannot run it,
            a symbolic input dimension without `input_shapes`, a bad option, an output that must not be written.
        CheckFailed: with `check`, the folded file's outputs differ beyond tolerance; nothing written.
    """
    from .compare import check_samples
    from .errors import CheckFailed
    from .folding import FoldReport
    from .onnx_export import check_provider

    if affine_as not in AffineAs.values():
        raise InputError(f"{param('affine_as')} {affine_as!r}: choose one of {', '.join(AffineAs.values())}",
                         param="affine_as")
    check_samples(samples)
    check_provider(provider)
    tolerance = Tolerance.resolve(rtol, atol, DEFAULT_TOLERANCE)
    onnx_file = source if isinstance(source, OnnxFile) else load_onnx(source)
    _refuse_unfoldable(onnx_file, skip)
    outputs = Outputs()
    if out is not None:
        plan_onnx_output(outputs, out, onnx_file, force=force, in_place=in_place)
        outputs.check()
    inputs = example_inputs(onnx_file.model, input_shapes, seed, onnx_file.path)
    original = OriginalRuns(onnx_file.path, provider, inputs)

    started = time.perf_counter()
    model = onnx_file.model
    report = FoldReport(tolerance=tolerance, batch_norm_ops_before=_bn_count(model),
                        params_before=_param_count(model))
    from .folding import check_skip_patterns

    shapes = {spec.name: tuple(x.shape) for spec, x in zip(_graph_inputs(model), inputs)}
    feed = {spec.name: x.numpy() for spec, x in zip(_graph_inputs(model), inputs)}
    graph = OnnxGraph.of(model, shapes, feed)  # once, for the plan and its surgery
    plan = plan_onnx_fold(model, skip, graph=graph)
    check_skip_patterns(skip, [d.name for d in plan.decisions])
    changes = apply_onnx_fold_plan(model, plan, affine_as, graph=graph, merge=merge)
    del graph
    report.decisions, report.merges = plan.decisions, plan.merges
    report.batch_norm_ops_after = _bn_count(model)
    report.params_after = sum(int(np.prod(t.dims)) for t in changes.initializers(model))
    report.ops_left = [f"{d.name}: {d.reason}" for d in plan.decisions if d.action == FoldAction.REFUSED]
    with outputs:
        staged = _stage(model, changes, out, outputs, onnx_file)
        report.fold_seconds = time.perf_counter() - started
        del model, onnx_file, changes  # onnxruntime reads the staged file; the proto is not needed any more
        _give_memory_back()
        started = time.perf_counter()
        result = _check(original, staged, inputs, tolerance, samples, seed, provider)
        report.comparisons, report.passed = result.comparisons, result.passed
        report.check_seconds = time.perf_counter() - started
        if report.passed and out is not None:
            outputs.commit()
    if check and not report.passed:
        raise CheckFailed(f"the folded ONNX file's outputs differ from the original's: max abs error "
                          f"{report.max_abs:.3g} ({report.max_abs_over_scale:.3g} of the output's magnitude) over "
                          f"{tolerance.describe()}; nothing written", report=report)
    return report


def _give_memory_back() -> None:
    """Return freed heap memory to the system before onnxruntime loads the model again (glibc keeps a freed
    protobuf arena's pages otherwise, and the check would hold the model twice)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def _bn_count(model) -> int:
    from .onnx_export import op_counts

    return op_counts(model).get(BN_TYPE, 0)


def _param_count(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _stage(model, changes: TensorChanges, out, outputs: Outputs, onnx_file: OnnxFile) -> Path:
    """Write the folded model where the check reads it: the output's temp file (committed after a passing
    check), or a private temp directory when there is no output."""
    import tempfile

    if out is None:
        directory = Path(tempfile.mkdtemp(prefix=".bntool-tmp-"))
        outputs.staging.append(directory)  # removed with the outputs
        target = directory / "folded.onnx"
        plan_onnx_output(outputs, target, onnx_file)
        save_onnx(model, target, outputs, onnx_file, changes)
    else:
        save_onnx(model, out, outputs, onnx_file, changes)
        target = Path(out)
    return next(p.temp for p in outputs.planned if p.path == target)  # type: ignore[return-value]  # set until committed


class OriginalRuns:
    """The original file in onnxruntime as it is written (ORT_DISABLE_ALL: no fusion of its own): the check's
    reference outputs. The session is made on first use and given back by `close()`."""

    def __init__(self, path: Path, provider: str, inputs: tuple):
        self.path, self.provider, self.inputs = path, provider, inputs
        self.session = None
        self.float64: Any = None  # onnx.reference.ReferenceEvaluator, made on first use

    def open(self):
        from .onnx_export import check_signature, ort_session

        if self.session is None:
            self.session = ort_session(self.path, self.provider, "ORT_DISABLE_ALL")
            check_signature(self.session, self.inputs, self.path)
        return self.session

    def close(self) -> None:
        self.session = None

    def get_inputs(self) -> list:
        """The original's graph inputs as onnxruntime describes them (the folded file keeps them)."""
        return self.open().get_inputs()

    def __call__(self, label: str, xs: tuple) -> list:
        session = self.open()
        feed = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), xs)}
        try:
            return session.run(None, feed)
        except Exception as e:
            raise InputError(f"{self.path}: onnxruntime cannot run it on the {label} input "
                             f"({type(e).__name__}: {first_line(e)})") from e

    def float64_outputs(self, xs: tuple) -> dict[str, np.ndarray]:
        """The original graph run in float64 (onnx.reference on a copy with every float tensor made double)."""
        from onnx.reference import ReferenceEvaluator

        if self.float64 is None:
            self.float64 = ReferenceEvaluator(as_float64(load_onnx(self.path, check=False).model))
        feed = {i: x.detach().cpu().double().numpy() if x.is_floating_point() else x.numpy()
                for i, x in zip(self.float64.input_names, xs)}
        return dict(zip(self.float64.output_names, self.float64.run(None, feed)))


def as_float64(model):
    """The model with float32/float16/bfloat16 tensors, inputs, outputs, casts and constants made float64."""
    from onnx import TensorProto, numpy_helper

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    g = model.graph
    for info in [*g.input, *g.output, *g.value_info]:
        if info.type.tensor_type.elem_type in floats:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, t in enumerate(g.initializer):
        if t.data_type in floats:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i in floats:
                a.i = TensorProto.DOUBLE
            if a.name == "value" and a.HasField("t") and a.t.data_type in floats:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return model


def _check(original: OriginalRuns, staged: Path, inputs, tolerance, samples, seed, provider):
    """onnxruntime on the folded file against the original, level by level; a comparison over tolerance is
    re-judged against the original run in float64."""
    from .onnx_export import compare_runs

    exact_only = Tolerance(0.0, 0.0, atol_relative=False)

    def arbitrate(c, xs, ref, out, name) -> None:
        if not math.isfinite(c.max_abs):
            return
        exact = original.float64_outputs(xs).get(name)
        if exact is None:
            return
        c.float64_error_original = compare_arrays(c.input, name, exact, ref, exact_only).max_abs
        c.float64_error_candidate = compare_arrays(c.input, name, exact, out, exact_only).max_abs
        c.passed = c.float64_error_candidate <= 1.5 * c.float64_error_original + 0.01 * c.threshold

    try:
        return compare_runs(original, "the original file", staged, inputs, tolerance, samples=samples, seed=seed,
                            provider=provider, candidate_check=arbitrate, inputs_like=original)
    except InputError as e:
        if str(original.path) in str(e):
            raise
        raise RuntimeError(f"the folded file does not load in onnxruntime: {e}") from e  # bntool's bug: exit 3
