"""The ONNX graph as the shared fold planner sees it (`folding.planner.FoldGraph`): producers, value readers,
op kinds, concrete shapes and channel probes of an onnx.ModelProto's main graph. Decides nothing itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .folding.planner import OUTPUT, OpKind
from .onnx_model import Constants, all_names, default_opset, graph_output_names, readers_of, without_large_tensors

if TYPE_CHECKING:
    import torch

_MOVES = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
# Nodes whose output shapes the planner reads (layers, moves, sums, concats, pads).
_SHAPED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Concat", "Pad", *_MOVES}
# Ops a constant input's value may pass through (computed with onnx.reference when all inputs are constants).
CONSTANT_OPS = {"Transpose", "Reshape", "Shape", "Cast", "Concat", "Slice", "Unsqueeze", "Squeeze", "Identity",
                "Gather", "ConstantOfShape", "Flatten", "Range", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt"}


def node_name(node) -> str:
    return node.name or f"{node.op_type} → {node.output[0]}"


def attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


@dataclass
class OnnxGraph:
    """The main graph's dataflow: who writes and who reads each tensor, constants, shapes (concrete where the
    graph's inputs have the shapes given), element types. Implements the planner's FoldGraph."""

    model: Any
    constants: Constants
    producers: dict[str, Any]
    readers: dict[str, list[Any]]
    outputs: set[str]
    shapes: dict[str, tuple[int, ...]]
    ranks: dict[str, int]
    elem_types: dict[str, int]
    names: set[str]
    unknown: list[str] = field(default_factory=list)  # tensors whose shapes only a run tells (none was given)

    @classmethod
    def of(cls, model, input_shapes: dict[str, tuple[int, ...]] | None = None,
           example: dict[str, np.ndarray] | None = None) -> OnnxGraph:
        """`example`: graph inputs by name; where shape inference leaves the shapes the rules need unknown
        (Slice bounds computed at run time, common without constant folding), one onnxruntime run on it
        tells them."""
        graph = model.graph
        producers = {o: node for node in graph.node for o in node.output if o}
        shapes, ranks, elem_types = tensor_types(model, input_shapes or {})
        missing = _shapes_the_rules_miss(graph, shapes)
        if example is not None and missing:
            shapes.update(run_shapes(model, missing, example))
            ranks.update({name: len(shape) for name, shape in shapes.items()})
            missing = []
        return cls(model=model, constants=Constants(graph), producers=producers, readers=readers_of(graph),
                   outputs=graph_output_names(graph), shapes=shapes, ranks=ranks, elem_types=elem_types,
                   names=all_names(model), unknown=missing)

    # ---------------------------------------------------------------- constants

    def value(self, name: str, depth: int = 0) -> np.ndarray | None:
        """The constant value of tensor `name`: an initializer, a Constant, or computed from constants alone
        (a Transpose of a weight, a Pad's pads built by Reshape/Cast/Concat: how exporters write them without
        constant folding); None when it depends on a graph input."""
        value = self.constants.get(name) if name else None
        node = self.producers.get(name) if value is None and name else None
        if node is None or depth > 16 or node.op_type not in CONSTANT_OPS or node.domain not in ("", "ai.onnx"):
            return value
        inputs = [self.value(i, depth + 1) if i else None for i in node.input]
        if any(v is None for i, v in zip(node.input, inputs) if i):
            return None
        return _run_node(node, inputs, self.model)[list(node.output).index(name)]

    def shared(self, name: str, node) -> bool:
        """Whether the constant `name` is read by another node than `node` (then it is copied, not changed)."""
        return any(n is not node for n in self.readers.get(name, [])) or name in self.outputs or \
            list(node.input).count(name) > 1

    # ---------------------------------------------------------------- the planner's FoldGraph

    def producer(self, tensor: str):
        return self.producers.get(tensor)

    def value_readers(self, tensor: str) -> list:
        readers = [n for n in self.readers.get(tensor, []) if n.op_type != "Shape"]  # Shape reads no values
        return readers + ([OUTPUT] if tensor in self.outputs else [])

    def kind(self, node) -> OpKind:
        if node.domain not in ("", "ai.onnx"):
            return OpKind.OTHER
        op = node.op_type
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return OpKind.LAYER if self._layer_ok(node) else OpKind.OTHER
        if self.linear_parts(node) is not None:
            return OpKind.LAYER
        known = all(t in self.shapes for t in (*node.input[:1], node.output[0]))
        if op in _MOVES and known and (op != "Dropout" or len(node.output) == 1 or not node.output[1]):
            return OpKind.MOVE
        if op == "Add" and len(node.input) == 2 and all(self.shapes.get(t) == self.shapes.get(node.output[0])
                                                        for t in node.input) and node.output[0] in self.shapes:
            return OpKind.ADD
        if op == "Concat" and all(t in self.shapes for t in (*node.input, node.output[0])):
            return OpKind.CONCAT
        if op == "Pad" and self._copying_pad(node):
            return OpKind.COPY_PAD
        return OpKind.OTHER

    def op_name(self, node) -> str:
        return f"{node.op_type} {node.name}" if node.name else node.op_type

    def inputs(self, node) -> list[str]:
        kind = self.kind(node)
        if kind is OpKind.ADD or kind is OpKind.CONCAT:
            return list(node.input)
        return [node.input[0]]

    def output(self, node) -> str:
        return node.output[0]

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.shapes[tensor]

    def concat_axis(self, node) -> int:
        return int(attr(node, "axis", 0)) % len(self.shapes[node.output[0]])

    def move_probe(self, node, probe: torch.Tensor) -> torch.Tensor:
        if node.op_type == "Transpose":
            perm = attr(node, "perm", None)
            return probe.permute(*(perm if perm else reversed(range(probe.dim()))))
        return probe.reshape(self.shapes[node.output[0]])  # the other moves keep the element order

    def layer_name(self, node) -> str:
        return node_name(node)

    def layer_has_bias(self, node) -> bool:
        return node.op_type == "Add" or (len(node.input) > 2 and bool(node.input[2]))

    def channel_axes(self, node) -> tuple[int, int]:
        return (1, 1) if node.op_type in ("Conv", "ConvTranspose") else (-1, -1)

    def linear_parts(self, node) -> tuple[Any, int] | None:
        """For an Add that adds a constant bias (one value per output) to a MatMul by a constant weight, read by
        nothing else (a linear layer as exporters write it): the MatMul and the bias's input index."""
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        for i in (0, 1):
            matmul = self.producers.get(node.input[1 - i])
            if matmul is None or matmul.op_type != "MatMul" or not self._layer_ok(matmul):
                continue
            bias, w = self.constant_spec(node.input[i]), self.constant_spec(matmul.input[1])
            assert w is not None  # _layer_ok: the MatMul's weight is a constant
            if bias is not None and bias[1] in ((w[1][1],), (1, w[1][1])) and \
                    len(self.readers.get(matmul.output[0], [])) == 1 and matmul.output[0] not in self.outputs:
                return matmul, i
        return None

    def producer_refusal(self, node) -> str:
        if node.op_type == "Add":
            return "" if node.output[0] in self.shapes else f"{node_name(node)}'s output shape is unknown"
        if node.output[0] not in self.shapes:
            return f"{node_name(node)}'s output shape is unknown"
        if node.op_type == "Gemm":
            c = self.value(node.input[2]) if self.layer_has_bias(node) else None
            out = self.shapes[node.output[0]][-1]
            if c is not None and c.size not in (1, out) or (c is not None and c.size == 1 and out != 1):
                return f"{node_name(node)}'s C is not one value per output"
            if float(attr(node, "beta", 1.0)) == 0.0:
                return f"{node_name(node)} has beta 0 (no place for the BN's shift)"
        return ""  # a weight another node reads too is copied, not changed

    def consumer_refusal(self, node, x: str) -> str | None:
        if node.op_type == "Add":
            return None  # a linear's bias Add reads the MatMul, never the BN
        if node.input[0] != x or list(node.input).count(x) != 1:
            return None
        if node.op_type == "Conv" and (any(attr(node, "pads", [])) or
                                       attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            return "the next conv zero-pads its input"
        if node.op_type == "ConvTranspose":
            return None  # its input channels are the weight's first axis: not a consumer fold here
        if node.op_type == "Gemm":
            c = self.value(node.input[2]) if self.layer_has_bias(node) else None
            if c is not None and c.ndim > 1 and c.shape[0] != 1:
                return f"{node_name(node)}'s C varies per row"
            if float(attr(node, "beta", 1.0)) == 0.0:
                return f"{node_name(node)} has beta 0"
        if node.op_type == "MatMul" and self.ranks.get(x, 0) < 2:
            return None
        return ""

    # ---------------------------------------------------------------- helpers

    def _layer_ok(self, node) -> bool:
        """A conv/linear the planner may target: a constant floating weight (and bias); Gemm without transA;
        MatMul by a constant 2-D weight."""
        w = self.constant_spec(node.input[1]) if len(node.input) > 1 else None
        if w is None or not np.issubdtype(w[0], np.floating):
            return False
        if len(node.input) > 2 and node.input[2] and self.constant_spec(node.input[2]) is None:
            return False
        if node.op_type == "Gemm":
            return not attr(node, "transA", 0)
        return node.op_type != "MatMul" or len(w[1]) == 2

    def constant_spec(self, name: str) -> tuple[Any, tuple[int, ...]] | None:
        """(numpy dtype, shape) of a constant tensor, without reading its values where it is stored as one."""
        from onnx import helper

        proto = self.constants.proto(name) if name else None
        if proto is not None:
            return helper.tensor_dtype_to_np_dtype(proto.data_type), tuple(proto.dims)
        value = self.value(name)
        return None if value is None else (value.dtype, value.shape)

    def _copying_pad(self, node) -> bool:
        """A Pad that copies its input's values into the border (reflect, edge, wrap) and pads no channel."""
        if attr(node, "mode", "constant") == "constant":
            return False
        pads = attr(node, "pads", None)
        if pads is None:
            pads = self.value(node.input[1]) if len(node.input) > 1 else None
        if pads is None or (len(node.input) > 3 and node.input[3]):
            return False
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        rank = len(pads) // 2
        return rank >= 2 and not pads[1] and not pads[rank + 1]


def _shapes_the_rules_miss(graph, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The outputs of the nodes whose shapes the planner reads, and the BNs' inputs, that shape inference left
    unknown (sorted)."""
    missing = {o for node in graph.node if node.op_type in _SHAPED for o in node.output[:1] if o and o not in shapes}
    missing |= {n.input[0] for n in graph.node if n.op_type == "BatchNormalization" and n.input[0] not in shapes}
    return sorted(missing)


def run_shapes(model, names: list[str], example: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shapes of tensors `names` in one onnxruntime run of `model` on `example` (graph outputs added to a
    copy of the graph's structure; the weights are shared through the serialized model)."""
    import onnx
    import onnxruntime as ort

    g = model.graph
    extra = [onnx.helper.make_empty_tensor_value_info(name) for name in names]
    g.output.extend(extra)
    try:
        serialized = model.SerializeToString()
    finally:
        for _ in extra:
            g.output.pop()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # its errors come back as exceptions (one line): no log of its own
    try:
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        del serialized
        results = session.run(names, example)
    except Exception:  # the check will say what onnxruntime thinks of the file; here shapes stay unknown
        return {}
    return {name: tuple(r.shape) for name, r in zip(names, results) if r.ndim and all(d > 0 for d in r.shape)}


def _run_node(node, inputs: list, model) -> list:
    """One node evaluated by onnx's reference implementation on constant inputs."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if name else "" for i, name in enumerate(node.input)]
    single = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))], domain=node.domain)
    single.attribute.extend(node.attribute)
    evaluator = ReferenceEvaluator(single, opsets={"": default_opset(model) or 13})
    return cast(list, evaluator.run(None, {n: v for n, v in zip(names, inputs) if n}))  # all outputs: a list


def tensor_types(model, input_shapes: dict[str, tuple[int, ...]]):
    """Concrete shapes, ranks and element types of the tensors shape inference can tell, from a copy of the
    graph without its large weights (their shapes suffice) whose symbolic input dimensions are `input_shapes`'s
    (or 1)."""
    import onnx

    light = without_large_tensors(model, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # best effort: a shape it cannot tell makes the planner stop there (an exact fallback)
        inferred = light
    shapes, ranks, elem_types = {}, {}, {}
    g = inferred.graph
    for info in [*g.input, *g.value_info, *g.output]:
        t = info.type.tensor_type
        if t.HasField("shape"):
            ranks[info.name] = len(t.shape.dim)
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            if all(d > 0 for d in dims):
                shapes[info.name] = tuple(dims)
        if t.elem_type:
            elem_types[info.name] = t.elem_type
    for init in model.graph.initializer:
        shapes[init.name], ranks[init.name], elem_types[init.name] = tuple(init.dims), len(init.dims), init.data_type
    return shapes, ranks, elem_types
