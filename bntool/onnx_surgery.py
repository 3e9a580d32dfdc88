"""The ONNX fold's surgery: a fold plan applied to a ModelProto's main graph. Each folded BN's scale and shift go
into its target layers' initializers (bntool.folding.math in float64 on numpy arrays, cast once to each tensor's
dtype; a constant another node reads is copied, never changed); each other BN becomes an exact affine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .choices import FoldAction
from .errors import InputError, param
from .onnx_graph import CONSTANT_OPS, OnnxGraph, attr, node_name
from .onnx_model import BNNode, batch_norm_nodes, graph_output_names, unique_name
from .onnx_save import TensorChanges, give_memory_back

BN_TYPE = "BatchNormalization"
TRIM_EVERY = 16 << 20  # bytes of new constants after which the fold's freed temporaries go back to the system


@dataclass
class OnnxFoldPlan:
    """The decisions for every BatchNormalization node (bntool.folding's FoldStep; target = an ONNX node)."""

    steps: list = field(default_factory=list)
    merges: list = field(default_factory=list)  # MergeDecisions: summed branches made one Conv when applied

    @property
    def decisions(self) -> list:
        return [s.decision for s in self.steps]


def bn_statistics(bn: BNNode) -> dict[str, np.ndarray]:
    """The node's scale, bias, mean and var as flat float64 arrays (all constants: checked by the caller)."""
    return {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in bn.values.items()}


def bn_scale_shift(bn: BNNode) -> tuple[np.ndarray, np.ndarray]:
    """y = x·scale + shift in float64 (bntool.folding.math.bn_scale_shift on the node's constants)."""
    from .folding.math import bn_scale_shift as scale_shift

    t = bn_statistics(bn)
    return scale_shift(t["mean"], t["var"], t["scale"], t["bias"], bn.epsilon)


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
        self.unreturned = 0  # bytes of constants made since freed memory was last given back

    def set_constant(self, node, index: int, value: np.ndarray, dtype, base: str) -> None:
        """Give input `index` of `node` the value `value` cast once to `dtype`: in place when the tensor is an
        initializer only this node reads, else as a new initializer (the old one stays for its other readers)."""
        from onnx import numpy_helper

        name = node.input[index] if len(node.input) > index else ""
        cast = np.ascontiguousarray(value.astype(dtype))
        if name and name in self.initializers and not self.graph.shared(name, node):
            tensor = numpy_helper.from_array(cast, name)
            self.changes.replaced[name] = self.graph.constants.tensors[name] = tensor
            self.unreturned += value.nbytes
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
        self.unreturned += value.nbytes
        return name

    def give_memory_back(self, every: int = TRIM_EVERY) -> None:
        """Once the constants made since the last time reach `every` bytes, give the fold's freed float64
        temporaries back to the system. Called between two BNs, when the last one's temporaries are gone:
        freed between the model's own allocations, glibc would keep them, and the fold's peak would grow by
        about a model's size."""
        if self.unreturned >= every:
            give_memory_back()
            self.unreturned = 0

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


def apply_onnx_fold_plan(model, plan: OnnxFoldPlan, affine_as: str = "auto",
                         input_shapes: dict[str, tuple[int, ...]] | None = None,
                         example: dict[str, np.ndarray] | None = None, graph: OnnxGraph | None = None,
                         merge: bool = True) -> TensorChanges:
    """Apply `plan` to `model`: each folded BN's scale and shift into its target layers' constants
    (bntool.folding.math, float64, cast once to each tensor's dtype), each affine BN replaced by a depthwise 1×1
    Conv or Mul+Add (`affine_as`: "auto", "conv", "mul", see affine_form; Sub, Mul, Add where it is centered).
    Nodes change in place; the initializers' changes are returned (`save_onnx(..., changes=)` writes them
    without a second copy of the model in memory; `changes.apply_to(model)` puts them in the model). `graph`:
    the OnnxGraph the plan was made on, if the model has not changed since (saves building it again). `merge`:
    then summed branches of one tensor (RepVGG, MobileOne) become one Conv where exact (bntool.onnx_merge;
    listed in `plan.merges`)."""
    graph = graph if graph is not None else OnnxGraph.of(model, input_shapes, example)
    surgery = _Surgery(model, graph)
    bns = {bn.name: bn for bn in batch_norm_nodes(model) if not bn.where}
    layers: dict[str, Any] = {}
    for node in model.graph.node:  # a named node wins over an unnamed one whose output bears its name
        if node.name or node_name(node) not in layers:
            layers[node_name(node)] = node
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
        surgery.give_memory_back()
    surgery.finish(merge)
    plan.merges = surgery.merges
    surgery.give_memory_back(every=1)
    return surgery.changes


def _fold_into(node, target, scale: np.ndarray, shift: np.ndarray, producer: bool, surgery: _Surgery) -> None:
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
    weight = np.asarray(w, dtype=np.float64)
    weight = weight if out_in else weight.T
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    b = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if producer:
        s, t = select_channels(scale, shift, target.channels, target.shift)
        if b is not None and b.size == 1 < s.size:
            b = np.broadcast_to(b, s.shape)
        if op == "Gemm" and t is not None:
            t = t / beta  # α·A·B + β·C: the shift enters through β·C
        new_w, new_b = fold_into_producer(weight, b, s, t, groups=int(attr(node, "group", 1)),
                                          transposed=op == "ConvTranspose")
    else:
        idx = np.asarray(target.channels, dtype=np.int64)
        new_w, added = fold_into_consumer(weight, None, scale[idx], shift[idx], groups=int(attr(node, "group", 1)))
        if op == "Gemm":
            added = added * (alpha / beta)
        new_b = added if b is None else b + added
    new_w = new_w if out_in else new_w.T
    base = node.name or node.output[0]
    surgery.set_constant(node, 1, new_w, w.dtype, f"{base}.weight_folded")
    if new_b is None:
        return
    dtype = w.dtype if bias is None else bias.dtype
    if bias is not None and bias.ndim > 1:
        new_b = new_b.reshape(bias.shape)
    if op == "MatMul" and bias_node is node:  # no bias input: an Add after it, as a linear layer's export has
        surgery.add_bias_after(node, new_b, dtype, f"{base}.bias_folded")
    else:
        surgery.set_constant(bias_node, bias_index, new_b, dtype, f"{base}.bias_folded")


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


def affine_form(graph: OnnxGraph, x: str, affine_as: str = "auto", centered: bool = False) -> str:
    """"conv" (one depthwise 1×1 Conv) or "mul" (Mul and Add; Sub first where `centered`): how the affine of a BN
    reading `x` is written. "auto" takes the Conv for a float32 input of rank 3–5: onnxruntime runs a 4-D
    BatchNormalization node as that same depthwise Conv in its blocked (NCHWc) layout, a following Relu fused,
    where a Mul and an Add are two kernels that each convert the layout back and forth (DenseNet-121: 1.19× the
    original's latency as Mul+Add, 1.00× as Conv; 1-D and 3-D: within 1.01× of the BN node, Mul+Add 1.06–1.09×).
    float16 keeps Mul and Add (not every onnxruntime build has a float16 Conv on CPU), as do ranks < 3. "conv"
    asked for on a float64 tensor is an InputError: onnxruntime has no float64 Conv, so the file would not run."""
    from onnx import TensorProto

    rank = graph.ranks.get(x, 0)
    if centered or rank < 3 or affine_as == "mul":
        return "mul"
    if affine_as == "conv":
        if graph.elem_types.get(x) == TensorProto.DOUBLE:
            raise InputError(f"{param('affine_as')} conv: {x!r} is float64 and onnxruntime has no float64 Conv "
                             "(the file would not run); use mul, or auto (Mul+Add there)")
        return "conv"
    return "conv" if rank <= 5 and graph.elem_types.get(x) == TensorProto.FLOAT else "mul"


def _affine_nodes(bn: BNNode, scale: np.ndarray, shift: np.ndarray, surgery: _Surgery, affine_as: str,
                  graph: OnnxGraph, centered: bool = False) -> list:
    """y = x·scale + shift per channel (axis 1), exactly the BN in eval mode: Mul and Add with [C, 1, …]
    constants; (x − mean)·scale + shift' where the mean is far from zero; or one depthwise 1×1 Conv."""
    import onnx

    from .folding.math import affine_with_center

    helper = onnx.helper
    rank = graph.ranks[bn.x]
    dtype = helper.tensor_dtype_to_np_dtype(graph.elem_types[bn.x])  # X's type (opset 15 lets γ, β differ)
    base = bn.name
    if affine_form(graph, bn.x, affine_as, centered) == "conv":
        ones = [1] * (rank - 2)
        w = surgery.new_constant(scale.reshape(-1, 1, *ones), dtype, f"{base}.affine_weight")
        b = surgery.new_constant(shift, dtype, f"{base}.affine_bias")
        return [helper.make_node("Conv", [bn.x, w, b], [bn.y], name=f"{base}_affine", group=bn.channels,
                                 kernel_shape=ones)]
    trailing = [1] * max(rank - 2, 0)
    nodes, x = [], bn.x
    if centered:
        mean = np.asarray(bn.values["mean"], dtype=np.float64).reshape(-1)
        shift = affine_with_center(scale, shift, mean)[1]
        m = surgery.new_constant(mean.reshape(-1, *trailing), dtype, f"{base}.affine_mean")
        x_centered = unique_name(graph.names, f"{base}_centered")
        nodes.append(helper.make_node("Sub", [x, m], [x_centered], name=f"{base}_sub"))
        x = x_centered
    s = surgery.new_constant(scale.reshape(-1, *trailing), dtype, f"{base}.affine_scale")
    t = surgery.new_constant(shift.reshape(-1, *trailing), dtype, f"{base}.affine_shift")
    mid = unique_name(graph.names, f"{base}_scaled")
    return nodes + [helper.make_node("Mul", [x, s], [mid], name=f"{base}_mul"),
                    helper.make_node("Add", [mid, t], [bn.y], name=f"{base}_add")]
