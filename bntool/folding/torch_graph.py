"""The planner's graph interface (planner.FoldGraph) over one traced PyTorch forward (bntool/graph.py):
nodes are OpCalls, tensors are torch tensors, layers are conv/linear modules."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..graph import LAYER_OPS, Dataflow, OpCall, is_eval_identity
from .planner import OpKind

STANDARD_CONSUMERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
CONCAT_OPS = {"cat", "concat", "concatenate"}


class TorchGraph:
    """The planner's FoldGraph over one traced forward: nodes are OpCalls, tensors are torch tensors."""

    def __init__(self, flow: Dataflow, names: dict[int, str], tied: Counter):
        self.flow, self.names, self.tied = flow, names, tied

    def producer(self, tensor):
        return self.flow.producer(tensor)

    def value_readers(self, tensor):
        return self.flow.value_readers(tensor)

    def kind(self, op: OpCall) -> OpKind:
        if op.name in LAYER_OPS:
            return OpKind.LAYER
        if is_eval_identity(op) and len(op.inputs) == 1 and op.args and op.args[0] is op.inputs[0]:
            return OpKind.MOVE
        if _is_plain_sum(op):
            return OpKind.ADD
        if op.name in CONCAT_OPS:
            return OpKind.CONCAT
        if self._is_own_copy_pad(op):
            return OpKind.COPY_PAD
        return OpKind.OTHER

    def _is_own_copy_pad(self, op: OpCall) -> bool:
        """The pad a conv with padding_mode reflect/replicate/circular makes in its own forward."""
        if op.name != "pad" or op.module is None or type(op.module) not in STANDARD_CONSUMERS \
                or op.module.padding_mode == "zeros":
            return False
        readers = self.flow.value_readers(op.outputs[0])
        return len(readers) == 1 and isinstance(readers[0], OpCall) and readers[0].module is op.module

    def op_name(self, op: OpCall) -> str:
        return op.name

    def inputs(self, op: OpCall) -> list:
        if op.name in CONCAT_OPS:
            return list(op.args[0] if op.args else op.kwargs["tensors"])
        if _is_plain_sum(op):
            return list(op.args[:2])
        return [op.args[0]]

    def output(self, op: OpCall):
        return op.outputs[0]

    def shape(self, tensor) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def concat_axis(self, op: OpCall) -> int:
        return op.args[1] if len(op.args) > 1 else op.kwargs.get("dim", 0)

    def move_probe(self, op: OpCall, probe: torch.Tensor) -> torch.Tensor:
        return op.func(probe, *op.args[1:], **op.kwargs)

    def layer_name(self, op: OpCall) -> str:
        return self.names[id(op.module)]

    def layer_has_bias(self, op: OpCall) -> bool:
        return getattr(op.module, "bias", None) is not None

    def channel_axes(self, op: OpCall) -> tuple[int, int]:
        return (-1, -1) if isinstance(op.module, nn.Linear) else (1, 1)

    def producer_refusal(self, op: OpCall) -> str:
        layer = op.module
        if not isinstance(layer, (_ConvNd, nn.Linear)):
            return f"fed by a bare {op.name} call, not a conv/linear module"
        bias_arg = op.args[2] if len(op.args) > 2 else op.kwargs.get("bias")
        if op.args[1] is not layer.weight or bias_arg is not layer.bias:
            return "the conv transforms its weight in forward (e.g. weight standardization)"
        calls = self.flow.calls_of(layer)
        if len(calls) != 1:
            return f"the conv/linear feeding it is called {len(calls)} times"
        if not any(o is op.outputs[0] for o in calls[0].outputs):
            return "the conv/linear post-processes its output"
        return self._shared(layer, op)

    def consumer_refusal(self, op: OpCall, x) -> str | None:
        layer = op.module
        if layer is None or type(layer) not in STANDARD_CONSUMERS or op.args[1] is not layer.weight \
                or op.args[0] is not x:
            return None
        if isinstance(layer, _ConvNd) and layer.padding_mode == "zeros" and any(layer._reversed_padding_repeated_twice):
            return "the next conv zero-pads its input"
        if len(self.flow.calls_of(layer)) != 1:
            return None
        return self._shared(layer, op)

    def _shared(self, layer: nn.Module, op: OpCall) -> str:
        """Folding rewrites the layer's weight and bias: nothing else may use them (a tied module, a bare call)."""
        if self.tied[id(layer.weight)] > 1:
            return "the conv/linear weight is shared with another module"
        for attr in ("weight", "bias"):
            t = getattr(layer, attr)
            others = [r for r in self.flow.readers(t) if r is not op] if t is not None else []
            if others:
                by = others[0]
                what = f"{by.name} in {self.where(by.module)}" if isinstance(by, OpCall) else "the model's output"
                return f"the conv/linear {attr} is also read by {what}: folding into it would change that too"
        return ""

    def where(self, module: nn.Module | None) -> str:
        name = self.names.get(id(module)) if module is not None else None
        return f"{name!r}'s forward" if name else "the model's forward"


def _is_plain_sum(op: OpCall) -> bool:
    """a + b of two tensors of the output's shape (no broadcasting, no alpha, not in place)."""
    if op.name not in ("add", "__add__", "__radd__") or len(op.args) != 2 or op.kwargs.get("alpha", 1) != 1:
        return False
    a, b = op.args
    out = op.outputs[0]
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a is not b
            and a.shape == out.shape and b.shape == out.shape and not any(o is a or o is b for o in op.outputs))
