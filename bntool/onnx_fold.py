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

from .choices import AffineAs, FoldAction
from .compare import Tolerance, compare_arrays
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

    inits = {t.name for t in model.graph.initializer}
    specs = [i for i in model.graph.input if i.name not in inits]
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
    outputs = Outputs()
    if out is not None:
        plan_onnx_output(outputs, out, onnx_file, force=force)
        outputs.check()
    inputs = example_inputs(onnx_file.model, input_shapes, seed, onnx_file.path)
    original = OriginalRuns(onnx_file.path, provider, inputs)  # exit 2 here if onnxruntime cannot run the file

    started = time.perf_counter()
    model = onnx_file.model
    report = FoldReport(tolerance=tolerance, batch_norm_ops_before=_bn_count(model),
                        params_before=_param_count(model))
    from .folding import check_skip_patterns

    plan = plan_onnx_fold(model, skip)
    check_skip_patterns(skip, [d.name for d in plan.decisions])
    apply_onnx_fold_plan(model, plan, affine_as)
    report.decisions = plan.decisions
    report.batch_norm_ops_after, report.params_after = _bn_count(model), _param_count(model)
    report.ops_left = [f"{d.name}: {d.reason}" for d in plan.decisions if d.action == FoldAction.REFUSED]
    with outputs:
        staged = _stage(model, out, outputs, onnx_file)
        report.fold_seconds = time.perf_counter() - started
        del model, onnx_file  # onnxruntime reads the staged file; the proto is not needed any more
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


def _bn_count(model) -> int:
    from .onnx_export import op_counts

    return op_counts(model).get(BN_TYPE, 0)


def _param_count(model) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _stage(model, out, outputs: Outputs, onnx_file: OnnxFile) -> Path:
    """Write the folded model where the check reads it: the output's temp file (committed after a passing
    check), or a private temp directory when there is no output."""
    import tempfile

    if out is None:
        directory = Path(tempfile.mkdtemp(prefix=".bntool-tmp-"))
        outputs.staging.append(directory)  # removed with the outputs
        target = directory / "folded.onnx"
        plan_onnx_output(outputs, target, None)
        save_onnx(model, target, outputs, onnx_file)
    else:
        save_onnx(model, out, outputs, onnx_file)
        target = Path(out)
    return next(p.temp for p in outputs.planned if p.path == target)


class OriginalRuns:
    """The original file in onnxruntime, one optimisation level at a time: the check's reference outputs."""

    def __init__(self, path: Path, provider: str, inputs: tuple):
        from .onnx_export import OPTIMIZATION_LEVELS, check_signature, ort_session

        self.path, self.provider = path, provider
        self.level = OPTIMIZATION_LEVELS[0]
        self.session = ort_session(path, provider, self.level)
        check_signature(self.session, inputs, path)
        self.names = [i.name for i in self.session.get_inputs()]
        self.float64 = None

    def __call__(self, label: str, xs: tuple, level: str) -> list:
        from .onnx_export import ort_session

        if level != self.level:
            self.session = None  # release the previous level's session first
            self.session, self.level = ort_session(self.path, self.provider, level), level
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self.names, xs)}
        try:
            return self.session.run(None, feed)
        except Exception as e:
            raise InputError(f"{self.path}: onnxruntime cannot run it on the {label} input "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})"
                             ) from e

    def float64_outputs(self, xs: tuple) -> dict[str, np.ndarray]:
        """The original graph run in float64 (onnx.reference on a copy with every float tensor made double)."""
        from onnx.reference import ReferenceEvaluator

        if self.float64 is None:
            self.float64 = ReferenceEvaluator(as_float64(load_onnx(self.path, check=False).model))
        feed = {n: x.detach().cpu().double().numpy() if x.is_floating_point() else x.numpy()
                for n, x in zip(self.names, xs)}
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
                            provider=provider, candidate_check=arbitrate)
    except InputError as e:
        if str(original.path) in str(e):
            raise
        raise RuntimeError(f"the folded file does not load in onnxruntime: {e}") from e  # bntool's bug: exit 3
