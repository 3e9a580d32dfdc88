"""Which modules are BatchNorm, what they compute in eval mode, and the modules that replace them."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

# Forwards whose eval-mode output is exactly the BN affine of the input and nothing else.
_STANDARD_BN_FORWARDS = {_BatchNorm.forward, nn.SyncBatchNorm.forward}
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    _STANDARD_BN_FORWARDS.add(_cls.forward)


def is_frozen_bn(module: nn.Module) -> bool:
    """torchvision/timm-style FrozenBatchNorm: fixed stats held as buffers, no batch_norm op."""
    buffers = dict(module.named_buffers(recurse=False))
    return "FrozenBatchNorm" in type(module).__name__ and {"running_mean", "running_var"} <= set(buffers)


BN_CLASS_NAMES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "FrozenBatchNorm2d"}


def bn_type_name(module: nn.Module) -> str:
    """The class name, also for modules inside a TorchScript archive."""
    return getattr(module, "original_name", None) or type(module).__name__


def is_bn(module: nn.Module) -> bool:
    if isinstance(module, torch.jit.ScriptModule):
        return bn_type_name(module) in BN_CLASS_NAMES and hasattr(module, "running_mean")
    return isinstance(module, _BatchNorm) or is_frozen_bn(module)


def has_standard_forward(module: nn.Module) -> bool:
    """True where forward is only the normalization (no activation, drop-path, ... added by a subclass)."""
    if is_frozen_bn(module):
        return type(module).__name__ == "FrozenBatchNorm2d"
    return type(module).forward in _STANDARD_BN_FORWARDS


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_bn(m)]


def bn_num_features(module: nn.Module) -> int:
    return int(cast(torch.Tensor, module.running_mean).numel())


def bn_stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A BN's (running_mean, running_var), typed: torch types a module's attributes Tensor | Module."""
    return cast(torch.Tensor, module.running_mean), cast(torch.Tensor, module.running_var)


def channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Shape a per-channel vector to broadcast over axis 1 of an ndim tensor."""
    return t.view([1, -1] + [1] * (ndim - 2)) if ndim >= 2 else t


def exports_as_conv(x: torch.Tensor) -> bool:
    """Whether an ONNX export is running and x is a float32 (N, C, spatial...) tensor of rank 3-5: a per-channel
    affine is then written as one depthwise 1×1 Conv node, as onnxruntime runs a BatchNormalization node (in its
    blocked layout, the next activation fused), where a Mul and an Add leave that layout (DenseNet-121 with its
    62 affines as Mul+Add ran 1.17× slower than its unfolded export)."""
    return torch.onnx.is_in_onnx_export() and x.dtype == torch.float32 and 3 <= x.dim() <= 5


def depthwise_conv(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x·scale + shift per channel (axis 1) as a depthwise 1×1 convolution."""
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    return conv(x, scale.reshape([-1, 1] + [1] * (x.dim() - 2)), shift, groups=scale.numel())


class ChannelAffine(nn.Module):
    """Per-channel (axis 1) x·scale + shift: what an eval-mode BatchNorm computes, without a batch_norm op.
    With `center`, (x - center)·scale + shift: two ops, but no precision lost when the mean is far from 0."""

    if TYPE_CHECKING:  # its buffers, for the type checker only: class annotations would break torch.jit.script
        scale: torch.Tensor
        shift: torch.Tensor
        center: torch.Tensor | None

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, center: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())
        self.register_buffer("center", center.clone() if center is not None else None)

    @classmethod
    def empty(cls, num_features: int, like: torch.Tensor, centered: bool = False) -> ChannelAffine:
        """Identity scale and shift of `like`'s dtype and device, to be filled by load_state_dict."""
        ones, zeros = like.new_ones(num_features), like.new_zeros(num_features)
        return cls(ones, zeros, zeros if centered else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.center is not None:
            x = x - channel_view(self.center, x.dim())
        if not torch.jit.is_scripting():  # skipped by TorchScript: a scripted model keeps Mul+Add
            if exports_as_conv(x):
                return depthwise_conv(x, self.scale, self.shift)
        # mul then add: as fast as the eval batch_norm kernel on CPU, where a broadcast addcmul is ~2.5x slower.
        return x * channel_view(self.scale, x.dim()) + channel_view(self.shift, x.dim())

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}" + (", centered" if self.center is not None else "")


class DepthwiseAffine(nn.Module):
    """What a depthwise 1×1 conv (groups = in = out channels, stride 1, no padding) computes, x·w + b per channel,
    as one mul and one add: the same float ops (bit for bit on CPU), without PyTorch's slow per-channel conv
    path at small batches. `dims`: the conv's spatial dims, so batched and unbatched inputs both broadcast."""

    if TYPE_CHECKING:  # its buffers, for the type checker only: class annotations would break torch.jit.script
        scale: torch.Tensor
        shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dims: int):
        super().__init__()
        self.dims = dims
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    @classmethod
    def empty(cls, num_features: int, dims: int, like: torch.Tensor) -> DepthwiseAffine:
        """Identity scale and shift of `like`'s dtype and device, to be filled by load_state_dict."""
        return cls(like.new_ones(num_features), like.new_zeros(num_features), dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # skipped by TorchScript: a scripted model keeps Mul+Add
            if x.dim() == self.dims + 2 and exports_as_conv(x):
                return depthwise_conv(x, self.scale, self.shift)
        view = [-1] + [1] * self.dims
        return x * self.scale.view(view) + self.shift.view(view)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}, dims={self.dims}"


def plain_depthwise_1x1(module: nn.Module) -> bool:
    """A plain Conv1d/2d/3d (no subclass, no hooks) whose output channel c is x[c]·w[c] + b[c] elementwise."""
    if type(module) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return False
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    conv = cast(nn.modules.conv._ConvNd, module)
    c = conv.in_channels
    return (conv.groups == c == conv.out_channels and all(k == 1 for k in conv.kernel_size)
            and all(s == 1 for s in conv.stride)
            and (conv.padding in ("valid", "same") or all(p == 0 for p in conv.padding)))


# BN+activation classes whose forward is exactly: normalize, then self.drop (if any), then self.act (timm's
# BatchNormAct2d family). Folded, they become a FoldedNormAct: plain modules, no per-call interception.
NORM_ACT_CLASS_NAMES = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}


def norm_act_parts(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(drop, act) of a known BN+activation module, or None for any other class."""
    if type(module).__name__ not in NORM_ACT_CLASS_NAMES or isinstance(module, torch.jit.ScriptModule):
        return None
    act, drop = getattr(module, "act", None), getattr(module, "drop", nn.Identity())
    if not isinstance(act, nn.Module) or not isinstance(drop, nn.Module):
        return None
    return drop, act


class FoldedNormAct(nn.Module):
    """A folded BN+activation module (timm's BatchNormAct2d): the folded affine, or nothing where the
    normalization went into a conv, then the module's own drop and act, as its forward ran them. A plain
    module, so it scripts, traces, exports and compiles, and costs no more than its activation."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm, self.drop, self.act = norm, drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


class _BatchNormAsAffine(TorchFunctionMode):
    """Inside a BN subclass's own forward, turn its batch_norm call into the folded affine (or identity)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:
            x = args[0] if args else kwargs["input"]
            scale = getattr(self.module, "folded_scale", None)
            if scale is None:
                return x
            return torch.addcmul(channel_view(self.module.folded_shift, x.dim()), x, channel_view(scale, x.dim()))
        return func(*args, **kwargs)


class FoldedNormForward:
    """Instance-level forward for a folded BN subclass: runs the subclass's own forward (activation,
    drop-path, ...) with its normalization replaced. A plain class so the module still pickles."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with _BatchNormAsAffine(self.module):
            return type(self.module).forward(self.module, *args, **kwargs)


def strip_bn_state(module: nn.Module) -> None:
    """Remove the statistics and affine parameters of a BN whose normalization was folded away."""
    for name in ("weight", "bias"):
        if name in module._parameters:
            module._parameters[name] = None
        if name in module._buffers:
            module._buffers[name] = None
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if name in module._buffers:
            module._buffers[name] = None


def make_custom_bn_folded(module: nn.Module, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """Keep a BN subclass (its extra behaviour) but make its normalization identity or a fixed affine."""
    strip_bn_state(module)
    # It has none left; this also stops load_state_dict re-adding a counter. (torch types it Tensor | Module.)
    module.track_running_stats = False  # type: ignore[assignment]
    if scale is not None:
        assert shift is not None  # scale and shift come together
        module.register_buffer("folded_scale", scale.clone())
        module.register_buffer("folded_shift", shift.clone())
    module.forward = FoldedNormForward(module)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` ("layer1.0.bn1") of `root` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
