"""The dataflow of one real forward: which op produced each tensor, and which ops read it.

Recorded with a TorchFunctionMode (every torch call, functional or method) and module hooks (which module
was running), so it follows Python control flow, subclasses and functional code that symbolic tracing
(torch.fx) cannot. Tensors are identified by object, and every one is kept alive during the trace so
that ids are never reused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import passes_through
from .utils import iter_tensors

# Ops that only move data: each output element is one input element, so a per-channel affine commutes
# with them once the channel mapping is checked (see channel_map).
DATA_MOVEMENT_OPS = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "squeeze", "unsqueeze", "contiguous",
    "t", "swapaxes", "swapdims", "movedim", "moveaxis", "clone", "view_as", "reshape_as",
}
# Identity in eval mode.
DROPOUT_OPS = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
LAYER_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear"}
# Ops that read some of their tensor arguments (by position) only for shape, dtype or device, never values.
SHAPE_ONLY_ARGS = {
    "reshape_as": {1}, "view_as": {1}, "expand_as": {1}, "type_as": {1},
    "zeros_like": {0}, "ones_like": {0}, "empty_like": {0}, "full_like": {0}, "rand_like": {0}, "randn_like": {0},
    "new_zeros": {0}, "new_ones": {0}, "new_empty": {0}, "new_full": {0},
}
# Attributes of a BatchNorm module; reading one from outside its own forward is recorded (see `trace`).
BN_ATTRIBUTES = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "num_features",
                           "eps", "momentum", "affine", "track_running_stats"})
OPAQUE = "opaque"  # the op name recorded for a call into a TorchScript submodule


@dataclass(eq=False)
class OpCall:
    """One torch function call made during the forward."""

    index: int
    name: str
    func: Callable
    args: tuple
    kwargs: dict
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    module: nn.Module | None  # innermost module whose forward made the call


@dataclass(eq=False)
class ModuleCall:
    module: nn.Module
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


@dataclass
class Dataflow:
    ops: list[OpCall] = field(default_factory=list)
    module_calls: dict[int, list[ModuleCall]] = field(default_factory=lambda: defaultdict(list))
    model_outputs: list[torch.Tensor] = field(default_factory=list)
    # Per watched module (by id): (attribute, reading module) for reads made outside its own forward.
    foreign_reads: dict[int, list[tuple[str, nn.Module | None]]] = field(default_factory=lambda: defaultdict(list))
    opaque: list[nn.Module] = field(default_factory=list)  # TorchScript submodules: called, not traced into
    _producer: dict[int, OpCall] = field(default_factory=dict)
    _readers: dict[int, list[OpCall]] = field(default_factory=lambda: defaultdict(list))
    _keep: list[Any] = field(default_factory=list)

    def producer(self, t: torch.Tensor) -> OpCall | None:
        return self._producer.get(id(t))

    def readers(self, t: torch.Tensor) -> list[OpCall | str]:
        """Ops that read t, plus "output" if the model returns it."""
        readers: list[OpCall | str] = list(self._readers.get(id(t), []))
        if any(o is t for o in self.model_outputs):
            readers.append("output")
        return readers

    def value_readers(self, t: torch.Tensor) -> list[OpCall | str]:
        """Like `readers`, without ops that read t only for its shape (`y.reshape_as(t)`, `zeros_like(t)`) and
        eval-mode no-ops that return t itself (dropout with training=False): its readers are t's readers."""
        return [r for r in self.readers(t) if not (isinstance(r, OpCall) and (
            reads_shape_only(r, t) or (is_eval_identity(r) and any(o is t for o in r.outputs))))]

    def calls_of(self, module: nn.Module) -> list[ModuleCall]:
        return self.module_calls.get(id(module), [])

    def ops_in(self, module: nn.Module, name: str | None = None) -> list[OpCall]:
        return [op for op in self.ops if op.module is module and (name is None or op.name == name)]

    def count(self, name: str) -> int:
        return sum(op.name == name for op in self.ops)


def reads_shape_only(op: OpCall, t: torch.Tensor) -> bool:
    positions = SHAPE_ONLY_ARGS.get(op.name)
    if not positions or any(v is t for v in op.kwargs.values()):
        return False
    return all(i in positions for i, a in enumerate(op.args) if a is t)


def _op_name(func: Callable) -> str:
    return getattr(func, "__name__", str(func))


class _Recorder(TorchFunctionMode):
    def __init__(self, flow: Dataflow, stack: list[nn.Module]):
        super().__init__()
        self.flow, self.stack = flow, stack

    @passes_through
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = list(iter_tensors(out))
        if outputs:  # metadata queries (size, shape, dim) return no tensor and read no values
            inputs = list(iter_tensors(args)) + list(iter_tensors(kwargs))
            op = OpCall(len(self.flow.ops), _op_name(func), func, args, kwargs, inputs, outputs,
                        self.stack[-1] if self.stack else None)
            self.flow.ops.append(op)
            self.flow._keep.append((args, kwargs, out))
            for t in inputs:
                self.flow._readers[id(t)].append(op)
            for t in outputs:
                if not any(t is i for i in inputs):  # in-place ops keep their input's producer
                    self.flow._producer[id(t)] = op
        return out


@passes_through
def trace(model: nn.Module, inputs: Sequence[Any], watch: Sequence[nn.Module] = ()) -> tuple[Dataflow, Any]:
    """Run model(*inputs) once under no_grad, recording its dataflow. Returns (dataflow, output).

    TorchScript submodules are opaque: each call is recorded as one op named OPAQUE (hooks and torch
    function modes cannot see inside them). For each module in `watch`, reads of its BN_ATTRIBUTES made
    outside its own forward are recorded in `flow.foreign_reads`. The model is left as it was.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("trace needs an eager (Python) model, not a TorchScript module")
    flow = Dataflow()
    stack: list[nn.Module] = []

    def pre_hook(module, args, kwargs):
        stack.append(module)
        flow.module_calls[id(module)].append(
            ModuleCall(module, list(iter_tensors(args)) + list(iter_tensors(kwargs)), []))

    def post_hook(module, args, kwargs, output):
        stack.pop()
        flow.module_calls[id(module)][-1].outputs = list(iter_tensors(output))
        flow._keep.append(output)

    handles: list[Any] = []  # hook handles
    restore: list[tuple[nn.Module, str | None, Any]] = []  # (parent, child name, child), or (module, None, class)
    try:
        for parent in list(model.modules()):
            if isinstance(parent, torch.jit.ScriptModule):
                continue
            for child_name, child in list(parent._modules.items()):
                if isinstance(child, torch.jit.ScriptModule):
                    restore.append((parent, child_name, child))
                    parent._modules[child_name] = _OpaqueCall(child, flow, stack)
                    flow.opaque.append(child)
            handles.append(parent.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(parent.register_forward_hook(post_hook, with_kwargs=True))
        for module in watch:
            restore.append((module, None, type(module)))
            module.__class__ = _watching_class(type(module), stack, flow)
        with torch.no_grad(), _Recorder(flow, stack):
            output = model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for owner, child_name, original in reversed(restore):
            if child_name is None:
                owner.__class__ = original
            else:
                owner._modules[child_name] = original
    flow.model_outputs = list(iter_tensors(output))
    flow._keep.append(output)
    return flow, output


class _OpaqueCall(nn.Module):
    """Stands in for a TorchScript submodule during a trace: calls it, records the call as one op."""

    def __init__(self, inner: nn.Module, flow: Dataflow, stack: list[nn.Module]):
        super().__init__()
        self.inner, self.flow, self.stack = inner, flow, stack

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        inputs, outputs = list(iter_tensors(args)) + list(iter_tensors(kwargs)), list(iter_tensors(out))
        op = OpCall(len(self.flow.ops), OPAQUE, self.inner, args, kwargs, inputs, outputs, self.inner)
        self.flow.ops.append(op)
        self.flow._keep.append((args, kwargs, out))
        for t in inputs:
            self.flow._readers[id(t)].append(op)
        for t in outputs:
            if not any(t is i for i in inputs):
                self.flow._producer[id(t)] = op
        return out


def _watching_class(cls: type, stack: list[nn.Module], flow: Dataflow) -> type:
    """A subclass of cls that records reads of BN_ATTRIBUTES made while another module is running."""

    def __getattribute__(self, name):
        if name in BN_ATTRIBUTES and (not stack or stack[-1] is not self):
            flow.foreign_reads[id(self)].append((name, stack[-1] if stack else None))
        return cls.__getattribute__(self, name)

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})


def is_eval_identity(op: OpCall) -> bool:
    """Data-movement ops, and dropout called with training=False."""
    if op.name in DATA_MOVEMENT_OPS:
        return True
    if op.name in DROPOUT_OPS:
        training = op.kwargs.get("training", op.args[2] if len(op.args) > 2 else True)
        return training is False
    return False


def replay(ops: Sequence[OpCall], probe: torch.Tensor) -> torch.Tensor:
    """Apply a recorded chain of single-tensor data-movement ops to another tensor of the same shape."""
    for op in ops:
        probe = op.func(probe, *op.args[1:], **op.kwargs)
    return probe


def channel_map(probe: torch.Tensor, axis: int) -> list[int] | None:
    """probe holds channel numbers of some source layout; return, for each index along `axis`, the one
    source channel all its elements come from, or None where an index mixes channels."""
    moved = probe.movedim(axis, 0).reshape(probe.shape[axis], -1)
    if moved.shape[1] == 0:
        return None
    lo, hi = moved.min(dim=1).values, moved.max(dim=1).values
    if not torch.equal(lo, hi):
        return None
    return [int(v) for v in lo.tolist()]


def channel_probe(shape: Sequence[int], axis: int) -> torch.Tensor:
    """A float64 tensor of `shape` whose value is the index along `axis` (exact up to 2**53 channels)."""
    n = shape[axis]
    view = [1] * len(shape)
    view[axis] = n
    return torch.arange(n, dtype=torch.float64).view(view).expand(*shape).contiguous()


def dependency_levels(flow: Dataflow, modules: Sequence[nn.Module]) -> dict[int, int]:
    """For each module in `modules` (by id): 1 + the largest level among those of `modules` upstream of it.

    A module of level k reads data that depends only on modules of levels < k, so once those are fixed its
    input statistics can be measured exactly. Ops are recorded in execution order, so one sweep suffices.
    """
    wanted = {id(m) for m in modules}
    tensor_level: dict[int, int] = {}
    module_level: dict[int, int] = {}
    for op in flow.ops:
        level = max((tensor_level.get(id(t), 0) for t in op.inputs), default=0)
        owner = op.module
        if owner is not None and id(owner) in wanted and op.name == "batch_norm":
            level += 1
            module_level[id(owner)] = max(module_level.get(id(owner), 0), level)
        for t in op.outputs:
            tensor_level[id(t)] = max(tensor_level.get(id(t), 0), level)
    return module_level
