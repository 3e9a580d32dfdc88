"""How an image becomes a model input: one preprocessing for every command, and where each value came from.

Each setting (size, center crop, resize, interpolation, mean, std) comes from the first of: what the user gave
(`ImageOptions`), the model input's shape, the model's own data config (timm's `pretrained_cfg`), the ImageNet
defaults. `Preprocessing` records the result and its sources; images.py applies it to an image.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError, param
from .utils import plural

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # Pillow's mode for an image of this many channels


@dataclass
class ImageOptions:
    """The preprocessing a user asked for; None means "not given": `resolve_preprocessing` fills it in."""

    image_size: int | tuple[int, int] | None = None  # side (or (height, width)) after the crop
    resize: int | None = None  # shorter side before the center crop
    center_crop: bool | None = None  # False: resize straight to the size (aspect not kept)
    interpolation: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
DEFAULT_CROP_FRACTION = 224 / 256  # torchvision's and timm's ImageNet evaluation: resize 256, crop 224
GIVEN, INPUT_SHAPE, MODEL_CONFIG, DEFAULT = "given", "the input shape", "the model's pretrained_cfg", "default"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input, resolved once and shared by every command; `sources` says where
    each value came from ("given", "the input shape", "the model's pretrained_cfg" or "default")."""

    size: tuple[int, int]  # (height, width) of the model input
    # before the center crop (unused without it): the shorter image side (torchvision's Resize(int)), or for a
    # non-square crop the (height, width) the image is scaled to cover, aspect kept (timm's ResizeKeepRatio),
    # or with `squash` the (height, width) it is scaled to, aspect not kept (timm's crop_mode "squash")
    resize: int | tuple[int, int]
    center_crop: bool
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    squash: bool = False

    @property
    def channels(self) -> int:
        return len(self.mean)

    def upscale(self, width: int, height: int) -> float:
        """How much an image of this size is enlarged on its way to the model input."""
        if self.center_crop:
            new_width, new_height = self.resized_size(width, height)
            return max(new_width / width, new_height / height)
        return max(self.size[0] / height, self.size[1] / width)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image after the resize that precedes the center crop, computed as timm's eval
        transform does: torchvision's Resize(int) for one side, timm's ResizeKeepRatio for (height, width), and
        both sides as given when squashed."""
        if self.squash and not isinstance(self.resize, int):
            return (self.resize[1], self.resize[0])
        if isinstance(self.resize, int):
            short, long = sorted((width, height))
            new_long = int(self.resize * long / short)
            return (self.resize, new_long) if width <= height else (new_long, self.resize)
        ratio = min(height / self.resize[0], width / self.resize[1])  # the smaller scale that covers both sides
        return (round(width / ratio), round(height / ratio))

    def describe(self) -> str:
        """'resize 73 → center crop 64×64 (bicubic), mean 0.485,0.456,0.406, std 0.229,0.224,0.225'."""
        h, w = self.size
        resize = (self.resize if isinstance(self.resize, int) else
                  f"to {_hw(self.resize)} (aspect not kept)" if self.squash else f"to cover {_hw(self.resize)}")
        steps = (f"resize {resize} → center crop {h}×{w}" if self.center_crop else f"resize to {h}×{w}")
        return f"{steps} ({self.interpolation}), mean {_numbers(self.mean)}, std {_numbers(self.std)}"

    def describe_sources(self) -> str:
        """'size from the input shape; resize (crop_pct 0.875), interpolation, mean, std from the model's
        pretrained_cfg': each source once, its settings in a fixed order, details in parentheses."""
        groups: dict[str, dict[str, list[str]]] = {}
        for name in sorted(self.sources, key=lambda n: _SETTING_ORDER.index(n) if n in _SETTING_ORDER else 99):
            base, _, detail = self.sources[name].partition(" (")
            groups.setdefault(base, {}).setdefault(detail.rstrip(")"), []).append(self._label(name))
        parts = []
        for base, by_detail in groups.items():
            names = ", ".join(", ".join(names) + (f" ({detail})" if detail else "")
                              for detail, names in by_detail.items())
            parts.append(f"{names} {_source_phrase(base)}")
        return "; ".join(parts)

    def _label(self, setting: str) -> str:
        """A setting's name in the sources line; the crop says whether it is on ("crop given" read as both)."""
        if setting == "crop":
            return "center crop" if self.center_crop else "no center crop"
        return setting

    def to_dict(self) -> dict[str, Any]:
        resize = self.resize if isinstance(self.resize, int) else list(self.resize)
        return {"size": list(self.size), "resize": resize if self.center_crop else None,
                "center_crop": self.center_crop, "squash": self.squash, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "sources": dict(self.sources)}


_SETTING_ORDER = ("size", "crop", "resize", "interpolation", "mean", "std")


def _source_phrase(source: str) -> str:
    return "given" if source == GIVEN else ("by default" if source.startswith(DEFAULT) else f"from {source}")


def _numbers(values: Sequence[float]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def resolve_preprocessing(
    options: ImageOptions | None = None,
    *,
    model: Any = None,
    input_shape: Sequence[int] | None = None,
) -> Preprocessing:
    """One preprocessing for every command: each value from the first of `options` (what the user gave),
    `input_shape` (the model input's (N, C, H, W): its size and channels), the model's own data config (timm's
    `pretrained_cfg`, through `timm.data.resolve_data_config` when timm is loaded) and the ImageNet defaults.

    Raises InputError when the given values contradict each other or the input shape."""
    o = options or ImageOptions()
    cfg = model_data_config(model)
    sources: dict[str, str] = {}
    size = _resolve_size(o, input_shape, cfg, sources)
    channels = int(input_shape[-3]) if input_shape is not None and len(input_shape) >= 3 else None
    mean = _resolve_stat("mean", o.mean, cfg, channels, IMAGENET_MEAN, sources)
    std = _resolve_stat("std", o.std, cfg, channels, IMAGENET_STD, sources)
    if len(mean) != len(std):
        raise InputError(f"{param('mean')} has {plural(len(mean), 'value')} but {param('std')} has {len(std)}: "
                         "give one per channel")
    if any(v <= 0 for v in std):
        raise InputError(f"{param('std')} {_numbers(std)}: every value must be positive")
    if len(mean) not in PIL_MODES:
        raise InputError(f"images have 1, 3 or 4 channels; the model input has {len(mean)}")
    if o.center_crop is not None:
        center_crop = o.center_crop
        sources["crop"] = GIVEN
    elif _squashes(cfg) and o.resize is None:
        # timm's squash: each side scaled to size / crop_pct, aspect not kept, then the center crop (none at 1)
        center_crop = cfg.get("crop_pct", 1.0) < 1
        sources["crop"] = MODEL_CONFIG
    else:
        center_crop = True
    resize = _resolve_resize(o, size, center_crop, cfg, sources)
    squash = center_crop and o.center_crop is None and o.resize is None and _squashes(cfg)
    if squash:
        resize = _pair(resize)
    if o.interpolation is not None:
        interpolation = o.interpolation.lower()
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"{param('interpolation')} {o.interpolation!r}: expected one of "
                             f"{', '.join(INTERPOLATIONS)}")
        sources["interpolation"] = GIVEN
    elif cfg.get("interpolation") in INTERPOLATIONS:
        interpolation = cfg["interpolation"]
        sources["interpolation"] = MODEL_CONFIG
    else:
        interpolation = "bilinear"
        sources["interpolation"] = DEFAULT
    return Preprocessing(size, resize, center_crop, interpolation, mean, std, sources, squash)


def _squashes(cfg: Mapping[str, Any]) -> bool:
    return cfg.get("crop_mode") == "squash"


def _pair(resize: int | tuple[int, int]) -> tuple[int, int]:
    return (resize, resize) if isinstance(resize, int) else resize


def _resolve_size(o: ImageOptions, input_shape, cfg, sources) -> tuple[int, int]:
    from_shape = None
    if input_shape is not None:
        if len(input_shape) < 3:
            raise InputError(f"images become (C, H, W) samples, but {param('input_shape')} is "
                             f"{shape_text(input_shape)}")
        from_shape = (int(input_shape[-2]), int(input_shape[-1]))
    if o.image_size is not None:
        given = (o.image_size, o.image_size) if isinstance(o.image_size, int) else tuple(o.image_size)
        if len(given) != 2 or any(int(v) <= 0 for v in given):
            raise InputError(f"{param('image_size')} {o.image_size!r}: expected a positive side or (height, width)")
        if from_shape is not None and tuple(given) != from_shape:
            raise InputError(f"{param('image_size')} {_hw(given)} contradicts {param('input_shape')} "
                             f"{shape_text(input_shape)}: give one of them")
        sources["size"] = GIVEN
        return (int(given[0]), int(given[1]))
    if from_shape is not None:
        sources["size"] = INPUT_SHAPE
        return from_shape
    if cfg.get("input_size"):
        sources["size"] = MODEL_CONFIG
        _, h, w = cfg["input_size"]
        return (int(h), int(w))
    sources["size"] = DEFAULT + " (ImageNet)"
    return (224, 224)


def _resolve_stat(name, given, cfg, channels, imagenet, sources) -> tuple[float, ...]:
    if given is not None:
        values, sources[name] = tuple(float(v) for v in given), GIVEN
    elif cfg.get(name) is not None:
        values, sources[name] = tuple(float(v) for v in cfg[name]), MODEL_CONFIG
    elif channels == 1:  # a grayscale model: the ImageNet value averaged over the colour channels
        values, sources[name] = (sum(imagenet) / 3,), DEFAULT + " (ImageNet, channel average)"
    else:
        values, sources[name] = tuple(imagenet), DEFAULT + " (ImageNet)"
    if channels is not None and len(values) != channels:
        raise InputError(f"{param(name)} {_numbers(values)} has {plural(len(values), 'value')}, but "
                         f"{param('input_shape')} has {plural(channels, 'channel')}: give one value per channel")
    return values


def _resolve_resize(o: ImageOptions, size, center_crop, cfg, sources) -> int | tuple[int, int]:
    if not center_crop:
        if o.resize is not None:
            raise InputError(f"{param('resize')} is the shorter side before the center crop: it needs "
                             f"{param('center_crop')}")
        return max(size)
    if o.resize is not None:
        if o.resize < max(size):
            raise InputError(f"{param('resize')} {o.resize} is smaller than the crop {_hw(size)}")
        sources["resize"] = GIVEN
        return int(o.resize)
    fraction, source = DEFAULT_CROP_FRACTION, DEFAULT + " (crop 224 of 256)"
    if cfg.get("crop_pct"):
        fraction, source = float(cfg["crop_pct"]), f"{MODEL_CONFIG} (crop_pct {float(cfg['crop_pct']):g})"
    sources["resize"] = source
    scaled = tuple(max(side, math.floor(side / fraction)) for side in size)
    # timm's eval transform: one shorter side when both agree, else the (height, width) to cover, aspect kept
    return scaled[0] if scaled[0] == scaled[1] else scaled


def shape_text(shape) -> str:
    return ",".join(str(int(d)) for d in shape)


def _hw(size) -> str:
    return f"{size[0]}×{size[1]}"


def model_data_config(model: Any) -> dict[str, Any]:
    """The preprocessing a model declares: timm's `pretrained_cfg` (or the older `default_cfg`), through
    `timm.data.resolve_data_config` when timm is already loaded; {} for models that declare none."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not isinstance(cfg, Mapping) or not cfg:
        return {}
    if "timm" in sys.modules:
        try:
            from timm.data import resolve_data_config

            return _plausible_data_config(resolve_data_config({}, model=model))
        except Exception:  # an old or partial timm, or a config it cannot read: read the config directly
            pass
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return _plausible_data_config({k: cfg[k] for k in keys if cfg.get(k) is not None})


def _plausible_data_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a model's data config that have the types and ranges timm gives them; a model's own odd
    config (a 2-value input_size, crop_pct "abc") is left out rather than fail deep in the preprocessing."""
    def positive_ints(v, n):
        return isinstance(v, (tuple, list)) and len(v) == n and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)

    def numbers(v):
        return isinstance(v, (tuple, list)) and len(v) > 0 and all(
            isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) for d in v)

    checks = {"input_size": lambda v: positive_ints(v, 3), "mean": numbers,
              "std": lambda v: numbers(v) and all(d > 0 for d in v),
              "crop_pct": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
              "interpolation": lambda v: isinstance(v, str), "crop_mode": lambda v: isinstance(v, str)}
    plausible = {k: v for k, v in cfg.items() if k not in checks or checks[k](v)}
    channels = plausible.get("input_size", (None,))[0]
    for key in ("mean", "std"):  # one value per channel of the declared input
        if key in plausible and channels is not None and len(plausible[key]) != channels:
            del plausible[key]
    return plausible
