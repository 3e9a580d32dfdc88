"""The fold layout: which modules a fold changed, so a freshly built architecture can take a folded state_dict.

A folded state_dict no longer fits `--arch` as built (BNs became Identity or ChannelAffine, some convs gained a
bias). `FoldLayout` records those changes; it travels inside the state_dict as a uint8 tensor of JSON under
`LAYOUT_KEY`, and on the folded model itself (`layout_of` / `attach_layout`), so saving cannot forget it.
Depends only on layers.py and rewrite.py (merged branches are rebuilt from their records), imported where a model
is changed: the records themselves (FoldLayout, MergeDecision) import no torch, so an ONNX fold's report does not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from .errors import InputError

if TYPE_CHECKING:  # torch only where a model is changed: an ONNX fold's report holds a layout, and imports none
    import torch
    from torch import nn

# The state_dict key of the layout record.
LAYOUT_KEY = "bntool.fold_layout"
# The attribute a folded model carries its layout in.
_ATTRIBUTE = "_bntool_fold_layout"


@dataclass
class MergeDecision:
    """One sum of branches reading one tensor: merged into one layer, or not, and why."""

    module: str  # the module whose forward adds them ("" for the model itself; the Add node in an ONNX graph)
    branches: list[str]  # qualified names of the branch modules; "identity" for the input itself
    merged: bool
    into: str = ""  # the new layer's qualified name
    reason: str = ""
    left_out: list[str] = field(default_factory=list)  # branches of the sum kept, each with why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FoldLayout:
    """Module names a fold changed: BNs now Identity, BNs now ChannelAffine (some `centered`: subtract the
    mean first), conv/linear layers that gained a bias, and BN+act layers now a FoldedNormAct (`norm_act`:
    their Identity/ChannelAffine sits inside it, before their own drop and act). `merges`: summed branches
    merged into one layer afterwards (MergeRecord JSON, applied in order). `depthwise_affine`: depthwise 1×1
    convs a BN folded into, now a DepthwiseAffine (named as in the model after its merges)."""

    identity: list[str] = field(default_factory=list)
    affine: list[str] = field(default_factory=list)
    centered: list[str] = field(default_factory=list)
    bias_added: list[str] = field(default_factory=list)
    norm_act: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    depthwise_affine: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.identity or self.affine or self.bias_added or self.merges or self.depthwise_affine)

    def merged(self, later: FoldLayout) -> FoldLayout:
        """This layout followed by a later fold of the same model (a BN folded once is no BN the next time)."""
        def union(a: list[str], b: list[str]) -> list[str]:
            return list(dict.fromkeys([*a, *b]))

        return FoldLayout(union(self.identity, later.identity), union(self.affine, later.affine),
                          union(self.centered, later.centered), sorted(set(self.bias_added) | set(later.bias_added)),
                          union(self.norm_act, later.norm_act), [*self.merges, *later.merges],
                          union(self.depthwise_affine, later.depthwise_affine))

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoldLayout:
        """Raises InputError if `data` is not a layout record."""
        if not isinstance(data, dict) or not all(
                isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()):
            raise InputError(f"corrupt fold layout record: {str(data)[:100]!r}")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"fold layout record has entries {unknown} this bntool does not know (written by a "
                             "newer version, or corrupt)")
        known = {k: list(data.get(k, [])) for k in cls.__dataclass_fields__}
        layout = cls(**known)
        if not set(layout.centered) <= set(layout.affine):
            raise InputError("corrupt fold layout record: a 'centered' layer that is not 'affine'")
        from .rewrite import MergeRecord

        for text in layout.merges:
            MergeRecord.from_json(text)
        return layout

    def to_tensor(self) -> torch.Tensor:
        """The layout as a uint8 tensor of JSON, to store in a state_dict under LAYOUT_KEY."""
        import torch

        return torch.tensor(list(json.dumps(self.to_dict(), sort_keys=True).encode()), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> FoldLayout:
        """Read a layout record written by `to_tensor`. Raises InputError if it is not one."""
        try:
            data = json.loads(bytes(tensor.flatten().tolist()).decode())
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise InputError(f"corrupt fold layout record under {LAYOUT_KEY!r} ({type(e).__name__})") from e
        return cls.from_dict(data)

    def apply(self, model: nn.Module) -> nn.Module:
        """Give a freshly built architecture this folded structure, so its folded state_dict loads.

        Args:
            model: the architecture as built (not folded).

        Returns:
            `model`, changed in place (modules replaced, biases added) and carrying this layout.

        Raises:
            InputError: the layout names a module the architecture does not have, or one that is not a BN.
        """
        import torch
        from torch import nn
        from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

        from .layers import (
            ChannelAffine,
            DepthwiseAffine,
            FoldedNormAct,
            bn_num_features,
            has_standard_forward,
            is_bn,
            make_custom_bn_folded,
            norm_act_parts,
            plain_depthwise_1x1,
            replace_module,
        )
        from .rewrite import MergeRecord, apply_merges

        modules = dict(model.named_modules())
        for name in self.bias_added:
            layer = named_module(modules, name)
            if not isinstance(layer, (_ConvNd, nn.Linear)):
                raise InputError(f"fold layout adds a bias to {name!r}, which is a {type(layer).__name__}, not a "
                                 "conv or linear layer in this architecture")
            out_channels = layer.weight.shape[1] * layer.groups if isinstance(layer, _ConvTransposeNd) \
                else layer.weight.shape[0]
            layer.bias = nn.Parameter(layer.weight.new_zeros(out_channels))
        for name in self.identity + self.affine:
            bn = named_module(modules, name)
            if not is_bn(bn):
                raise InputError(f"fold layout names {name!r}, which is not a BatchNorm layer in this architecture")
            affine = name in self.affine
            c, like = bn_num_features(bn), cast(torch.Tensor, bn.running_mean)
            parts = norm_act_parts(bn) if name in self.norm_act else None
            if has_standard_forward(bn) or parts is not None:
                replacement = ChannelAffine.empty(c, like, name in self.centered) if affine else nn.Identity()
                replace_module(model, name, FoldedNormAct(replacement, *parts) if parts else replacement)
            else:
                ones, zeros = like.new_ones(c), like.new_zeros(c)
                make_custom_bn_folded(bn, ones if affine else None, zeros if affine else None)
        apply_merges(model, [MergeRecord.from_json(text) for text in self.merges])
        modules = dict(model.named_modules(remove_duplicate=False))
        made: dict[int, DepthwiseAffine] = {}  # a conv registered under several names stays one module
        for name in self.depthwise_affine:
            conv = named_module(modules, name)
            if id(conv) not in made and not plain_depthwise_1x1(conv):
                raise InputError(f"fold layout turns {name!r} into a per-channel affine, but it is a "
                                 f"{type(conv).__name__}, not a depthwise 1×1 conv in this architecture")
            if id(conv) not in made:
                weight = cast(torch.Tensor, conv.weight)
                made[id(conv)] = DepthwiseAffine.empty(cast(int, conv.out_channels), weight.dim() - 2, weight)
            replace_module(model, name, made[id(conv)])
        attach_layout(model, self)
        return model


def layout_of(model: nn.Module) -> FoldLayout | None:
    """The fold layout a folded model carries (None for a model never folded)."""
    return getattr(model, _ATTRIBUTE, None)


def attach_layout(model: nn.Module, layout: FoldLayout) -> None:
    """Record on `model` that it has `layout`'s folded structure (kept by deepcopy and by save_checkpoint)."""
    object.__setattr__(model, _ATTRIBUTE, layout)


def named_module(modules: dict[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        raise InputError(f"fold layout names {name!r}, which this architecture does not have")
    return modules[name]
