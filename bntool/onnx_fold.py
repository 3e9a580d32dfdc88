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

from .choices import FoldAction
from .compare import Tolerance, combine, compare_arrays
from .errors import InputError, param
from .files import Outputs
from .onnx_model import (
    BNNode,
    Constants,
    OnnxFile,
    all_names,
    batch_norm_nodes,
    graph_output_names,
    load_onnx,
    plan_onnx_output,
    readers_of,
    save_onnx,
    unique_name,
)

AFFINE_AS = ("mul", "conv")  # how a BN that folds nowhere is written: Mul+Add, or a depthwise 1×1 Conv
DEFAULT_TOLERANCE = Tolerance(rtol=0.0, atol=1e-4)  # the fold check's float32 rule (bntool.folding)
BN_TYPE = "BatchNormalization"


# ---------------------------------------------------------------- the graph, as the fold rules see it


@dataclass
class OnnxGraph:
    """The main graph's dataflow: who produces and who reads each tensor, the constants, tensor ranks."""

    model: Any
    constants: Constants
    producer: dict[str, Any]
    readers: dict[str, list[Any]]
    outputs: set[str]
    ranks: dict[str, int]
    elem_types: dict[str, int]
    names: set[str]

    @classmethod
    def of(cls, model) -> OnnxGraph:
        graph = model.graph
        producer = {o: node for node in graph.node for o in node.output if o}
        ranks, elem_types = tensor_types(model)
        return cls(model=model, constants=Constants(graph), producer=producer, readers=readers_of(graph),
                   outputs=graph_output_names(graph), ranks=ranks, elem_types=elem_types, names=all_names(model))

    def only_reader(self, tensor: str, node) -> str:
        """Why `tensor` is read by more than `node` ("" when `node` is its only reader)."""
        others = [n for n in self.readers.get(tensor, []) if n is not node]
        if tensor in self.outputs:
            return f"{tensor!r} is also a graph output"
        if others:
            return f"{tensor!r} is also read by {_node_name(others[0])}" + (
                f" and {len(others) - 1} more" if len(others) > 1 else "")
        return ""

    def shared(self, name: str, node) -> bool:
        """Whether the constant `name` is read by another node than `node` (then it is copied, not changed)."""
        return any(n is not node for n in self.readers.get(name, [])) or name in self.outputs or \
            list(node.input).count(name) > 1


def _node_name(node) -> str:
    return node.name or f"{node.op_type} → {node.output[0]}"


def tensor_types(model) -> tuple[dict[str, int], dict[str, int]]:
    """The rank and element type of every tensor shape inference can tell, from a copy of the graph without
    its large weights (their shapes suffice; the copy stays small)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(_without_large_tensors(model))
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # inference is best effort: a rank it cannot tell makes the fold choose an exact fallback
        inferred = light
    ranks, elem_types = {}, {}
    g = inferred.graph
    for info in [*g.input, *g.value_info, *g.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            ranks[info.name] = len(t.shape.dim)
        if t.elem_type:
            elem_types[info.name] = t.elem_type
    for init in model.graph.initializer:
        ranks[init.name], elem_types[init.name] = len(init.dims), init.data_type
    return ranks, elem_types


def _without_large_tensors(model):
    """The model with each initializer over 1 KiB replaced by its shape only (a graph input of that shape)."""
    import onnx

    small = onnx.ModelProto()
    small.ir_version, small.producer_name = model.ir_version, model.producer_name
    small.opset_import.extend(model.opset_import)
    small.functions.extend(model.functions)
    g = small.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if len(init.raw_data) <= 1024 and not init.external_data:
            g.initializer.append(init)
        elif init.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return small


# ---------------------------------------------------------------- inspect


def inspect_onnx(source: str | os.PathLike | OnnxFile):
    """Every BatchNormalization node: configuration, statistics, health (bntool.inspection's rules) and what
    `fold_onnx` would do with it and why. Returns an InspectReport (the PyTorch path's shape)."""
    from .inspection import InspectReport

    onnx_file = source if isinstance(source, OnnxFile) else load_onnx(source)
    plan = plan_onnx_fold(onnx_file.model)
    steps = {s.decision.name: s for s in plan.steps}
    layers = []
    for bn in batch_norm_nodes(onnx_file.model):
        info = describe_bn_node(bn)
        d = steps[bn.name].decision
        info.fold_action, info.fold_target, info.fold_reason = d.action, d.target, d.reason
        layers.append(info)
    graph = onnx_file.model.graph
    total_params = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return InspectReport(layers=layers, total_modules=len(graph.node), total_params=total_params, fold_planned=True)


def describe_bn_node(bn: BNNode):
    """A BNLayerInfo for one node, its health from the same rules as a PyTorch BN (inspection.health_flags)."""
    from .inspection import BNLayerInfo, TensorSummary, health_flags

    values = bn.as_module_values()
    if values.running_mean is None or values.running_var is None:
        flags = ["statistics computed at run time (mean/var are not initializers)"]
    else:
        flags = health_flags(values)
    return BNLayerInfo(
        name=bn.name, type=BN_TYPE, channels=bn.channels, eps=bn.epsilon, momentum=bn.momentum, affine=True,
        track_running_stats=values.running_mean is not None, training=bool(bn.training_mode),
        num_batches_tracked=None, running_mean=TensorSummary.of(values.running_mean),
        running_var=TensorSummary.of(values.running_var), weight=TensorSummary.of(values.weight),
        bias=TensorSummary.of(values.bias), flags=flags)


# ---------------------------------------------------------------- the plan


@dataclass
class OnnxFoldPlan:
    """The decisions for every BatchNormalization node (bntool.folding's FoldStep; target = an ONNX node)."""

    steps: list = field(default_factory=list)

    @property
    def decisions(self) -> list:
        return [s.decision for s in self.steps]


class _NoFold(Exception):
    """Why a BN cannot be folded in the direction tried."""


def plan_onnx_fold(model, skip: Sequence[str] = ()) -> OnnxFoldPlan:
    """Decide, for each BatchNormalization node, where its math goes: into the node that produces its input
    (Conv, ConvTranspose, Gemm, MatMul with a constant 2-D weight) when nothing else reads that output, else an
    exact per-channel affine; left as it is with the reason when its statistics are not constants, it runs in
    training mode, it sits in a subgraph or function, or `skip` names it."""
    from .folding import BNDecision, FoldStep

    graph = OnnxGraph.of(model)
    plan = OnnxFoldPlan()
    for bn in batch_norm_nodes(model):
        decision = BNDecision(name=bn.name, type=BN_TYPE, channels=bn.channels, action=FoldAction.REFUSED)
        step = FoldStep(decision=decision)
        reason = _refusal(bn, skip)
        if reason:
            decision.reason = reason
        else:
            try:
                step.targets = [_producer_target(bn, graph)]
                decision.action, decision.target = FoldAction.FOLDED, step.targets[0].layer
            except _NoFold as why:
                decision.reason = f"not folded into its producer: {why}"
                if graph.ranks.get(bn.x) is None or graph.elem_types.get(bn.x) is None:
                    decision.reason += "; and its input's rank or type is unknown (no exact affine without it)"
                else:
                    decision.action, decision.replaced_by = FoldAction.AFFINE, "Mul+Add"
        plan.steps.append(step)
    return plan


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
    if len({v.size for v in bn.values.values()}) != 1:
        return "scale, bias, mean and var have different lengths"
    var = bn.values["var"].astype(np.float64)
    if not all(np.isfinite(v.astype(np.float64)).all() for v in bn.values.values()) or (var + bn.epsilon < 0).any():
        return "NaN/Inf or negative variance in its statistics; recalibrate first"
    return ""


def _producer_target(bn: BNNode, graph: OnnxGraph):
    """The FoldTarget for folding `bn` into the node producing its input, or _NoFold saying why not."""
    from .folding import FoldTarget

    node = graph.producer.get(bn.x)
    if node is None:
        raise _NoFold(f"its input {bn.x!r} is a graph input or a constant")
    shared = graph.only_reader(bn.x, bn.node)
    if shared:
        raise _NoFold(shared)
    if node.domain not in ("", "ai.onnx") or node.op_type not in _PRODUCER_RULES:
        raise _NoFold(f"its producer {_node_name(node)} is a {node.op_type}, not a Conv/ConvTranspose/Gemm/MatMul")
    _PRODUCER_RULES[node.op_type](node, bn, graph)  # raises _NoFold when this node's fold would not be exact
    channels = list(range(bn.channels))
    return FoldTarget(layer=_node_name(node), channels=channels, shift=[True] * len(channels))


def _weight(node, index: int, graph: OnnxGraph, what: str) -> np.ndarray:
    name = node.input[index] if len(node.input) > index else ""
    value = graph.constants.get(name) if name else None
    if value is None:
        raise _NoFold(f"{_node_name(node)}'s {what} {name!r} is not a constant")
    if not np.issubdtype(value.dtype, np.floating):
        raise _NoFold(f"{_node_name(node)}'s {what} is {value.dtype}, not floating point")
    return value


def _attr(node, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _conv_rule(node, bn: BNNode, graph: OnnxGraph) -> None:
    w = _weight(node, 1, graph, "weight")
    if len(node.input) > 2 and node.input[2]:
        _weight(node, 2, graph, "bias")
    out_channels = w.shape[0] if node.op_type == "Conv" else w.shape[1] * int(_attr(node, "group", 1))
    if out_channels != bn.channels:
        raise _NoFold(f"{_node_name(node)} has {out_channels} output channels, the BN {bn.channels}")


def _gemm_rule(node, bn: BNNode, graph: OnnxGraph) -> None:
    w = _weight(node, 1, graph, "B")
    columns = w.shape[0] if _attr(node, "transB", 0) else w.shape[-1]
    if columns != bn.channels:
        raise _NoFold(f"{_node_name(node)} has {columns} outputs, the BN {bn.channels}")
    if len(node.input) > 2 and node.input[2]:
        _weight(node, 2, graph, "C")
    elif float(_attr(node, "beta", 1.0)) == 0.0:
        raise _NoFold(f"{_node_name(node)} has beta 0 (no place for the BN's shift)")


def _matmul_rule(node, bn: BNNode, graph: OnnxGraph) -> None:
    w = _weight(node, 1, graph, "weight")
    # The BN normalises axis 1; a MatMul's weight maps the last axis: the same axis only for 2-D activations.
    if w.ndim != 2 or graph.ranks.get(node.input[0]) != 2:
        raise _NoFold(f"{_node_name(node)} is not a 2-D MatMul with a constant 2-D weight")
    if w.shape[1] != bn.channels:
        raise _NoFold(f"{_node_name(node)} has {w.shape[1]} outputs, the BN {bn.channels}")


_PRODUCER_RULES = {"Conv": _conv_rule, "ConvTranspose": _conv_rule, "Gemm": _gemm_rule, "MatMul": _matmul_rule}


# ---------------------------------------------------------------- the math (float64, cast once)


def bn_scale_shift(bn: BNNode) -> tuple[np.ndarray, np.ndarray]:
    """y = x·scale + shift, in float64: scale = γ/√(var+ε), shift = β − mean·scale."""
    v = {k: np.asarray(a, dtype=np.float64).reshape(-1) for k, a in bn.values.items()}
    scale = v["scale"] / np.sqrt(v["var"] + bn.epsilon)
    return scale, v["bias"] - v["mean"] * scale


def fold_into_conv(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                   transposed: bool = False, groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Conv(W', b') = BN(Conv(W, b)): each output channel's weights times its scale; b' = b·scale + shift.
    A ConvTranspose's weight is [in, out/groups, k…]: output channel o of group g is column o − g·out/groups."""
    w = weight.astype(np.float64)
    if transposed:
        cin, per_group = w.shape[0], w.shape[1]
        s = scale.reshape(groups, 1, per_group)  # [g, 1, out/g] against w as [g, in/g, out/g, k…]
        w = (w.reshape(groups, cin // groups, per_group, -1) * s[..., None]).reshape(weight.shape)
    else:
        w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    b = np.zeros_like(scale) if bias is None else bias.astype(np.float64)
    return w, b * scale + shift


def fold_into_gemm(b_weight: np.ndarray, c: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                   trans_b: bool, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Gemm = α·A·B + β·C: scaling B's output columns scales the product; C' = C·scale + shift/β."""
    w = b_weight.astype(np.float64)
    w = w * (scale[:, None] if trans_b else scale[None, :])
    c64 = np.zeros_like(scale) if c is None else c.astype(np.float64)
    return w, np.broadcast_to(c64, np.broadcast_shapes(c64.shape, scale.shape)) * scale + shift / beta


# ---------------------------------------------------------------- surgery


class _Surgery:
    """Changes to one ModelProto's main graph: new or replaced constants (copied when shared), node rewrites."""

    def __init__(self, model, graph: OnnxGraph):
        self.model, self.graph = model, graph
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.removed_nodes: set[int] = set()
        self.inserted: dict[int, list] = {}  # position of a removed BN → nodes in its place

    def set_constant(self, node, index: int, value: np.ndarray, dtype, base: str) -> None:
        """Give input `index` of `node` the value `value` cast once to `dtype`: in place when the tensor is an
        initializer only this node reads, else as a new initializer (the old one stays for its other readers)."""
        from onnx import numpy_helper

        name = node.input[index] if len(node.input) > index else ""
        cast = np.ascontiguousarray(value.astype(dtype))
        if name and name in self.initializers and not self.graph.shared(name, node):
            self.initializers[name].CopyFrom(numpy_helper.from_array(cast, name))
            return
        new = unique_name(self.graph.names, base)
        self.model.graph.initializer.append(numpy_helper.from_array(cast, new))
        self.initializers[new] = self.model.graph.initializer[-1]
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = new

    def new_constant(self, value: np.ndarray, dtype, base: str) -> str:
        from onnx import numpy_helper

        name = unique_name(self.graph.names, base)
        self.model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.astype(dtype)), name))
        return name

    def remove_bn(self, bn: BNNode, replacement: list | None = None) -> None:
        index = _index_of(self.model.graph, bn.node)
        self.removed_nodes.add(index)
        if replacement:
            self.inserted[index] = replacement

    def finish(self, bn_inputs: set[str]) -> None:
        """Rebuild the node list (replacements where their BN was, order kept), and drop the BNs' constants and
        value_info that nothing reads any more."""
        g = self.model.graph
        nodes = []
        for i, node in enumerate(g.node):
            if i in self.removed_nodes:
                nodes.extend(self.inserted.get(i, []))
            else:
                nodes.append(node)
        del g.node[:]
        g.node.extend(nodes)
        read = {name for node in g.node for name in node.input} | graph_output_names(g)
        read |= {name for node in g.node for name in _subgraph_reads(node)}
        produced = {o for node in g.node for o in node.output} | {i.name for i in g.input}
        unused = [t for t in g.initializer if t.name in bn_inputs and t.name not in read]
        for t in unused:
            g.initializer.remove(t)
        stale = [v for v in g.value_info if v.name not in produced and v.name not in {t.name for t in g.initializer}]
        for v in stale:
            g.value_info.remove(v)


def _subgraph_reads(node) -> set[str]:
    from .onnx_model import _outer_names

    return _outer_names(node)


def _index_of(graph, node) -> int:
    for i, n in enumerate(graph.node):
        if n is node:
            return i
    raise ValueError("node not in graph")


def apply_onnx_fold_plan(model, plan: OnnxFoldPlan, affine_as: str = "mul") -> None:
    """Apply `plan` to `model` in place: each folded BN's math into its producer's constants, each affine BN
    replaced by Mul+Add (or a depthwise 1×1 Conv), float64 math cast once to each tensor's dtype."""
    graph = OnnxGraph.of(model)
    surgery = _Surgery(model, graph)
    bns = {bn.name: bn for bn in batch_norm_nodes(model) if not bn.where}
    bn_inputs: set[str] = set()
    for step in plan.steps:
        bn = bns.get(step.decision.name)
        if bn is None or step.decision.action == FoldAction.REFUSED:
            continue
        bn_inputs |= set(bn.inputs.values())
        scale, shift = bn_scale_shift(bn)
        if step.decision.action == FoldAction.FOLDED:
            _fold_producer(graph.producer[bn.x], bn, scale, shift, surgery)
        else:
            surgery.remove_bn(bn, _affine_nodes(bn, scale, shift, surgery, affine_as, graph))
    surgery.finish(bn_inputs)


def _fold_producer(node, bn: BNNode, scale: np.ndarray, shift: np.ndarray, surgery: _Surgery) -> None:
    graph = surgery.graph
    w = graph.constants.get(node.input[1])
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = graph.constants.get(node.input[2]) if has_bias else None
    base = node.name or node.output[0]
    if node.op_type in ("Conv", "ConvTranspose"):
        new_w, new_b = fold_into_conv(w, bias, scale, shift, node.op_type == "ConvTranspose",
                                      int(_attr(node, "group", 1)))
        surgery.set_constant(node, 1, new_w, w.dtype, f"{base}.weight_folded")
        surgery.set_constant(node, 2, new_b, w.dtype if bias is None else bias.dtype, f"{base}.bias_folded")
    elif node.op_type == "Gemm":
        beta = float(_attr(node, "beta", 1.0))
        new_w, new_c = fold_into_gemm(w, bias, scale, shift, bool(_attr(node, "transB", 0)), beta)
        surgery.set_constant(node, 1, new_w, w.dtype, f"{base}.B_folded")
        surgery.set_constant(node, 2, new_c, w.dtype if bias is None else bias.dtype, f"{base}.C_folded")
    else:  # MatMul(A, W) with 2-D A: becomes Gemm(A, W', shift), the same product with the BN's shift as C
        import onnx

        new_w, new_c = fold_into_gemm(w, None, scale, shift, False, 1.0)
        surgery.set_constant(node, 1, new_w, w.dtype, f"{base}.weight_folded")
        c = surgery.new_constant(new_c, w.dtype, f"{base}.bias_folded")
        gemm = onnx.helper.make_node("Gemm", [node.input[0], node.input[1], c], [node.output[0]], name=node.name)
        node.CopyFrom(gemm)
    node.output[0] = bn.y  # the producer now writes the BN's output; the BN goes
    surgery.remove_bn(bn)


def _affine_nodes(bn: BNNode, scale: np.ndarray, shift: np.ndarray, surgery: _Surgery, affine_as: str,
                  graph: OnnxGraph) -> list:
    """y = x·scale + shift per channel (axis 1), exactly the BN in eval mode: Mul and Add with [C, 1, …]
    constants, or one depthwise 1×1 Conv (`affine_as="conv"`)."""
    import onnx

    from onnx import helper

    rank = graph.ranks[bn.x]
    dtype = helper.tensor_dtype_to_np_dtype(graph.elem_types[bn.x])  # X's type (opset 15 lets γ, β differ)
    base = bn.name
    if affine_as == "conv" and rank >= 3:
        ones = [1] * (rank - 2)
        w = surgery.new_constant(scale.reshape(-1, 1, *ones), dtype, f"{base}.affine_weight")
        b = surgery.new_constant(shift, dtype, f"{base}.affine_bias")
        return [onnx.helper.make_node("Conv", [bn.x, w, b], [bn.y], name=f"{base}_affine", group=bn.channels,
                                      kernel_shape=ones)]
    trailing = [1] * max(rank - 2, 0)
    s = surgery.new_constant(scale.reshape(-1, *trailing), dtype, f"{base}.affine_scale")
    t = surgery.new_constant(shift.reshape(-1, *trailing), dtype, f"{base}.affine_shift")
    mid = unique_name(graph.names, f"{base}_scaled")
    return [onnx.helper.make_node("Mul", [bn.x, s], [mid], name=f"{base}_mul"),
            onnx.helper.make_node("Add", [mid, t], [bn.y], name=f"{base}_add")]
