"""Where the model runs: `--device` checked against this machine; a model moved (and put in eval mode) for one job,
then put back as it was."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import InputError, param

DEVICES = "cpu, cuda, cuda:N (e.g. cuda:1) or mps"


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this machine has.

    Raises:
        InputError: not one of cpu, cuda, cuda:N, mps (the message lists them), or not available here.
    """
    text = str(device).strip()
    bad = InputError(f"{param('device')} {str(device)!r}: expected {DEVICES}", param="device")
    if re.fullmatch(r"cpu(:(0|[1-9][0-9]{0,3}))?", text):  # torch.device("cpu", 0) is the CPU too (one device)
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:(0|[1-9][0-9]{0,3}))?|mps", text):  # ASCII digits, as torch parses them
        raise bad
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise bad from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"{param('device')} {text}: CUDA is not available ({why}); use {param('device')} cpu",
                             param="device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise InputError(f"{param('device')} {text}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}", param="device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{param('device')} mps: MPS is not available on this machine; use {param('device')} cpu",
                         param="device")
    return dev


def device_of(model: nn.Module) -> torch.device:
    """Where `model` runs: its first parameter's (or buffer's) device; CPU for a model without tensors."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def check_not_meta(model: nn.Module) -> None:
    """InputError for a model whose tensors are on the meta device: they have shapes but no values."""
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise InputError(f"the {param('model')} is on the meta device (its tensors have shapes but no values): "
                         "load its weights first, e.g. model.to_empty(device='cpu') then "
                         "model.load_state_dict(torch.load(path))", param="model")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: its first floating parameter's (or buffer's); float32 for none."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def float64_device(device: torch.device) -> torch.device:
    """Where float64 math on `device`'s tensors runs: the device itself, or CPU where it has no float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """`t` detached in float64, on its own device where that has float64 (else on CPU)."""
    return t.detach().to(float64_device(t.device), torch.float64)


def to_device(inputs: tuple[Any, ...], device: torch.device | None) -> tuple[Any, ...]:
    """The tensors among `inputs` on `device` (None: as they are)."""
    if device is None:
        return inputs
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


class Placement:
    """A model's parameters and buffers as given, to put back after a job moved them (device, memory format)."""

    def __init__(self, model: nn.Module):
        self.params = [(p, p.data) for m in model.modules() for p in m._parameters.values() if p is not None]
        self.buffers = [(m, n, b) for m in model.modules() for n, b in m._buffers.items() if b is not None]

    def restore(self) -> None:
        """Every parameter and buffer back as it was: the same tensor objects, holding what the job wrote."""
        with torch.no_grad():
            for p, data in self.params:
                if p.data.data_ptr() != data.data_ptr() or p.data.stride() != data.stride():
                    p.data = data
            for m, n, b in self.buffers:
                now = m._buffers[n] if n in m._buffers else None  # a ScriptModule's buffers have no .get
                if now is not None and now is not b:
                    b.copy_(now)  # what the job wrote (recalibrated statistics) went to the moved copy
                    m._buffers[n] = b


@contextlib.contextmanager
def moved_to(model: nn.Module, device: str | torch.device | None) -> Iterator[torch.device]:
    """Run a job with `model` on `device` and put it back afterwards (also on error); yields the device the
    job runs on (`device` None: where the model is, and nothing moves)."""
    if device is None:
        yield device_of(model)
        return
    dev = resolve_device(device)
    if all(t.device == dev for t in (*model.parameters(), *model.buffers())):
        yield dev  # already there: nothing to move or put back
        return
    placement = Placement(model)
    try:
        model.to(dev)
        yield dev
    finally:
        placement.restore()


@contextlib.contextmanager
def statistics_kept(model: nn.Module) -> Iterator[None]:
    """The running statistics and counts of every module in training mode as they were (also on error): a BN the
    user left in training mode inside an eval model updates them on each forward that a plan or a check runs,
    and the caller's model must come back unchanged."""
    saved = [(t, t.detach().clone()) for m in model.modules() if m.training
             for name in ("running_mean", "running_var", "num_batches_tracked")
             if isinstance(t := getattr(m, name, None), torch.Tensor)]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Every module's training flag as it was after a job that puts the model in eval mode (also on error)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
