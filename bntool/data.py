"""Calibration data sources → an iterable of input batches.

Sources: a folder of images (decoded with Pillow, batched by a torch DataLoader with workers), tensor files
(.npy, .npz, .pt) and a user's own loader given as 'module.path:callable'.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, param, passes_through
from .files import check_input_file
from .utils import a_type, first_line, import_object, parse_kwargs, plural

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x", "data")


def first_input(batch: Any, input_key: str | None = None) -> torch.Tensor:
    """The model input in a batch: a tensor, the first item of a tuple/list, or a dict entry."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        keys = (input_key,) if input_key else INPUT_KEYS
        for k in keys:
            if k in batch:
                return first_input(batch[k])
        if input_key:  # the named key is not there: say which are, not "name the input"
            raise InputError(f"{param('input_key')} {input_key!r}: the batch is a dict without it; its keys are "
                             f"{sorted(map(str, batch))}", param="input_key")
        raise InputError(f"batch is a dict with keys {sorted(batch)}; name the input with {param('input_key')}")
    if isinstance(batch, (list, tuple)) and batch:
        return first_input(batch[0], input_key)
    raise InputError(f"cannot find an input tensor in a batch of type {type(batch).__name__}")


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
UPSCALE_WARNING = 2.0  # warn when images are enlarged more than this
GIVEN, INPUT_SHAPE, MODEL_CONFIG, DEFAULT = "given", "the input shape", "the model's pretrained_cfg", "default"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input, resolved once and shared by every command; `sources` says where
    each value came from ("given", "the input shape", "the model's pretrained_cfg" or "default")."""

    size: tuple[int, int]  # (height, width) of the model input
    # before the center crop (unused without it): the shorter image side (torchvision's Resize(int)), or for a
    # non-square crop the (height, width) the image is scaled to cover, aspect kept (timm's ResizeKeepRatio)
    resize: int | tuple[int, int]
    center_crop: bool
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    sources: dict[str, str] = field(default_factory=dict, compare=False)

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
        transform does: torchvision's Resize(int) for one side, timm's ResizeKeepRatio for (height, width)."""
        if isinstance(self.resize, int):
            short, long = sorted((width, height))
            new_long = int(self.resize * long / short)
            return (self.resize, new_long) if width <= height else (new_long, self.resize)
        ratio = min(height / self.resize[0], width / self.resize[1])  # the smaller scale that covers both sides
        return (round(width / ratio), round(height / ratio))

    def describe(self) -> str:
        """'resize 73 → center crop 64×64 (bicubic), mean 0.485,0.456,0.406, std 0.229,0.224,0.225'."""
        h, w = self.size
        resize = self.resize if isinstance(self.resize, int) else f"to cover {_hw(self.resize)}"
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
                "center_crop": self.center_crop, "interpolation": self.interpolation, "mean": list(self.mean),
                "std": list(self.std), "sources": dict(self.sources)}


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
    if len(mean) not in _PIL_MODES:
        raise InputError(f"images have 1, 3 or 4 channels; the model input has {len(mean)}")
    if o.center_crop is not None:
        center_crop = o.center_crop
        sources["crop"] = GIVEN
    elif cfg.get("crop_mode") == "squash":
        center_crop = False
        sources["crop"] = MODEL_CONFIG
    else:
        center_crop = True
    resize = _resolve_resize(o, size, center_crop, cfg, sources)
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
    return Preprocessing(size, resize, center_crop, interpolation, mean, std, sources)


def _resolve_size(o: ImageOptions, input_shape, cfg, sources) -> tuple[int, int]:
    from_shape = None
    if input_shape is not None:
        if len(input_shape) < 3:
            raise InputError(f"images become (C, H, W) samples, but {param('input_shape')} is {_shape(input_shape)}")
        from_shape = (int(input_shape[-2]), int(input_shape[-1]))
    if o.image_size is not None:
        given = (o.image_size, o.image_size) if isinstance(o.image_size, int) else tuple(o.image_size)
        if len(given) != 2 or any(int(v) <= 0 for v in given):
            raise InputError(f"{param('image_size')} {o.image_size!r}: expected a positive side or (height, width)")
        if from_shape is not None and tuple(given) != from_shape:
            raise InputError(f"{param('image_size')} {_hw(given)} contradicts {param('input_shape')} "
                             f"{_shape(input_shape)}: give one of them")
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


def _shape(shape) -> str:
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


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass
class DataSource:
    """Re-iterable batches of model inputs, with what is known about them."""

    batches: Iterable[Any]
    description: str
    num_samples: int | None = None
    input_key: str | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files seen so far
    kind: str = "loader"  # "images" | "tensor" | "loader"
    preprocessing: Preprocessing | None = None  # image folders only
    image_sizes: tuple[tuple[int, int], tuple[int, int]] | None = None  # smallest and largest (width, height) seen
    sample_shape: tuple[int, ...] | None = None  # tensor files: the shape of one sample
    warnings: list[str] = field(default_factory=list)

    @passes_through
    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            if isinstance(batch, _SkippingBatch):
                if batch.refused:
                    raise InputError(f"{batch.refused[0].path}: {batch.refused[0].reason}")
                self.skipped.extend(f for f in batch.skipped if f not in self.skipped)  # once over all passes
                if batch.tensor is None:
                    continue
                batch = batch.tensor
            yield first_input(batch, self.input_key)

    def summary(self) -> str:
        """One line: what the data is and how it becomes model inputs, with where each setting came from."""
        count = f"{self.num_samples:,} " if self.num_samples is not None else ""
        if self.kind == "images" and self.preprocessing is not None:
            p = self.preprocessing
            sizes = ""
            if self.image_sizes:
                (w0, h0), (w1, h1) = self.image_sizes
                sizes = f" ({w0}×{h0})" if (w0, h0) == (w1, h1) else f" ({w0}×{h0} … {w1}×{h1})"
            return f"{count}images in {self.description}{sizes}: {p.describe()}; {p.describe_sources()}"
        if self.kind == "tensor":
            return f"{count}samples of shape {self.sample_shape} from {self.description}, used as they are"
        return f"{count}batches from {self.description}, used as they are" if not count else (
            f"{count}samples from {self.description}, used as they are")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.description, "num_samples": self.num_samples,
                "preprocessing": self.preprocessing.to_dict() if self.preprocessing else None,
                "image_sizes": [list(s) for s in self.image_sizes] if self.image_sizes else None,
                "sample_shape": list(self.sample_shape) if self.sample_shape else None,
                "skipped": len(self.skipped), "warnings": list(self.warnings), "summary": self.summary()}


def check_fits(batch: torch.Tensor, example: torch.Tensor, what: str = "data") -> None:
    """A data batch must have the example input's rank and per-sample shape (the batch size may differ);
    InputError naming both shapes if not, instead of a failed or meaningless comparison later."""
    if batch.dim() != example.dim() or tuple(batch.shape[1:]) != tuple(example.shape[1:]):
        raise InputError(f"{what}: samples of shape {tuple(batch.shape[1:])} do not fit {param('input_shape')} "
                         f"{_shape(example.shape)} (each sample must be {tuple(example.shape[1:])})")


def open_data(
    source: str | os.PathLike | None = None,
    *,
    loader: str | None = None,
    loader_kwargs: str | Mapping[str, Any] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    image: ImageOptions | Preprocessing | None = None,
    model: Any = None,
    input_shape: Sequence[int] | None = None,
    npz_key: str | None = None,
    input_key: str | None = None,
    strict: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataSource:
    """Open --data (a folder of images or a tensor file) or --loader.

    Images are preprocessed as `resolve_preprocessing(image, model=model, input_shape=input_shape)` says (a
    `Preprocessing` is used as it is). With `input_shape`, tensor files must hold samples of that shape.

    With world_size > 1 this process gets every world_size-th batch, starting at `rank`: the batches are the
    ones a single process would see, so merged statistics equal a single-process run (a user's --loader is
    used as given: shard it yourself, e.g. with DistributedSampler)."""
    if batch_size <= 0:
        raise InputError(f"{param('batch_size')} {batch_size}: must be positive")
    if num_workers < 0:
        raise InputError(f"{param('workers')} {num_workers}: must be 0 (load in this process) or more")
    if loader is not None:
        return _user_loader(loader, loader_kwargs, input_key)
    if source is None:
        raise InputError(f"no calibration data: pass {param('data')} PATH (images folder or .npy/.npz/.pt) or "
                         f"{param('loader')}")
    path = Path(source)
    is_folder = os.path.isdir(path)
    if not is_folder:  # nothing missing, no FIFO or device read as a data file
        check_input_file(path, "a folder of images or a .npy, .npz or .pt file")
    shard = (rank, world_size)
    if is_folder:
        if not isinstance(image, Preprocessing):
            image = resolve_preprocessing(image, model=model, input_shape=input_shape)
        return _image_folder(path, batch_size, num_workers, image, strict, seed, shard)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz", ".pt", ".pth"):
        tensor = _read_tensor_file(path, npz_key)
        if input_shape is not None:
            check_fits(tensor, torch.empty(tuple(input_shape), device="meta"), str(path))
        batches = _TensorBatches(tensor, batch_size, shard)
        return DataSource(batches, str(path), batches.num_samples, kind="tensor",
                          sample_shape=tuple(tensor.shape[1:]))
    raise InputError(f"{path}: unsupported data file; use a folder of images, .npy, .npz or .pt")


def shard_batches(n_items: int, batch_size: int, shard: tuple[int, int]) -> list[range]:
    """The index ranges of this rank's batches: batch i goes to rank i mod world_size."""
    rank, world = shard
    starts = range(0, n_items, batch_size)
    return [range(s, min(s + batch_size, n_items)) for i, s in enumerate(starts) if i % world == rank]


class _TensorBatches:
    def __init__(self, tensor: torch.Tensor, batch_size: int, shard: tuple[int, int] = (0, 1)):
        self.tensor = tensor
        self.ranges = shard_batches(len(tensor), batch_size, shard)
        self.num_samples = sum(len(r) for r in self.ranges)

    def __iter__(self):
        for r in self.ranges:
            yield self.tensor[r.start:r.stop]

    def __len__(self):
        return len(self.ranges)


def _read_tensor_file(path: Path, npz_key: str | None) -> torch.Tensor:
    import numpy as np

    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if npz_key is None and len(keys) != 1:
                    raise InputError(f"{path}: holds arrays {keys}; choose one with {param('npz_key')}")
                key = npz_key or keys[0]
                if key not in keys:
                    raise InputError(f"{path}: no array {key!r}; it holds {keys}")
                array = archive[key]
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            return _tensor_from_object(path, obj)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: cannot read tensor data ({first_line(e)})") from e
    if array.dtype.kind not in "fiub":
        raise InputError(f"{path}: array of dtype {array.dtype} is not numeric")
    return _check_tensor(path, torch.from_numpy(np.ascontiguousarray(array)))


def _tensor_from_object(path: Path, obj: Any) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):
        return _check_tensor(path, obj)
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
        return _check_tensor(path, obj[0])  # (inputs, labels)
    if isinstance(obj, Mapping):
        for k in INPUT_KEYS:
            if isinstance(obj.get(k), torch.Tensor):
                return _check_tensor(path, obj[k])
    raise InputError(f"{path}: expected a tensor, an (inputs, labels) pair or a dict with one of {INPUT_KEYS}")


def _check_tensor(path: Path, t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2 or len(t) == 0:
        raise InputError(f"{path}: expected a batch of samples (N, ...), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    return t


def _user_loader(spec: str, loader_kwargs, input_key) -> DataSource:
    obj = import_object(spec, what=param("loader"))
    kwargs = parse_kwargs(loader_kwargs, what=param("loader_kwargs"))
    if callable(obj) and not isinstance(obj, torch.utils.data.DataLoader):
        try:
            obj = obj(**kwargs)
        except Exception as e:
            raise InputError(f"{param('loader')} {spec!r}: calling it failed "
                             f"({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(obj, Iterable):
        raise InputError(f"{param('loader')} {spec!r}: returned {a_type(obj)}, not an iterable of batches")
    n = len(obj.dataset) if hasattr(obj, "dataset") and hasattr(obj.dataset, "__len__") else None
    return DataSource(obj, f"--loader {spec}", n, input_key=input_key)


# ---------------------------------------------------------------- images


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabeled images, preprocessed as `preprocessing` says. The path (a str) for unreadable files."""

    def __init__(self, files: Sequence[Path], preprocessing: Preprocessing):
        self.files, self.preprocessing = list(files), preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                refusal = too_large_to_resize(img.size, self.preprocessing)
                if refusal:
                    return _RefusedImage(str(self.files[i]), refusal)
                return image_to_tensor(img, self.preprocessing)
        except Image.DecompressionBombError as e:
            return _RefusedImage(str(self.files[i]), first_line(e))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return str(self.files[i])


@dataclass(frozen=True)
class _RefusedImage:
    """An image that decodes but cannot be used (returned, not raised, so a worker process reports it as
    this process would: one `InputError` line naming the file)."""

    path: str
    reason: str


def too_large_to_resize(size: tuple[int, int], p: Preprocessing) -> str:
    """Why an image of `size` (width, height) cannot go through the resize before the center crop: a 100000×1
    strip would first become 25,600,000×256 pixels (gigabytes). The limit is Pillow's own for decoding
    (`Image.MAX_IMAGE_PIXELS`); "" when it fits."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if not p.center_crop or not limit:
        return ""
    width, height = p.resized_size(*size)
    if width * height <= limit:
        return ""
    return (f"an image of {size[0]}×{size[1]} pixels would be resized to {width:,}×{height:,} before the center "
            f"crop, more than Pillow's limit of {limit:,} pixels; crop it, remove it, or turn off "
            f"{param('center_crop')} to resize every image straight to the input size")


def image_to_tensor(img, p: Preprocessing) -> torch.Tensor:
    """Resize (keeping the aspect) and center-crop as timm's eval transform does, or resize straight to the size;
    scale to [0, 1] by the image's range; normalize. Float32, (C, H, W).

    8-bit images are divided by 255; 16-bit ones (Pillow's modes I;16 and I, as 16-bit PNGs open) by 65535 and
    float ones (mode F, e.g. float TIFFs) are taken as they are, as torchvision's `read_image` + `to_dtype(...,
    scale=True)` and `ToTensor` read them (integer pixels are kept in [0, 1] after resizing, as 8-bit resizing keeps
    them in 0…255); these greyscale images fill every colour channel (alpha 1)."""
    import numpy as np

    h, w = p.size
    if img.mode in _HIGH_DEPTH_SCALE:
        grey = _resize_and_crop(_high_depth_as_float(img), p)
        plane = np.asarray(grey, dtype=np.float32).reshape(h, w, 1)
        if _HIGH_DEPTH_SCALE[img.mode] != 1.0:  # integer pixels stay in their range, as 8-bit resizing keeps them
            plane = np.clip(plane, 0.0, 1.0)
        planes = [plane] * min(p.channels, 3) + [np.ones_like(plane)] * (p.channels == 4)
        array, scale = np.concatenate(planes, axis=2), 1.0
    else:
        img = _resize_and_crop(img.convert(_PIL_MODES[p.channels]), p)
        array, scale = np.asarray(img, dtype=np.float32).reshape(h, w, -1).copy(), 255.0
    t = torch.from_numpy(array).permute(2, 0, 1) / scale
    mean = torch.tensor(p.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(p.std, dtype=torch.float32).view(-1, 1, 1)
    return (t - mean) / std


# Pillow's single-channel modes of more than 8 bits and the full-scale value of each (mode I is how Pillow opens
# 16-bit greyscale PNGs; its values are clipped to 16 bits).
_HIGH_DEPTH_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def _high_depth_as_float(img):
    """A 16-bit or float image as a mode-F image of values in its own range scaled to [0, 1] (float: as is)."""
    import numpy as np
    from PIL import Image

    scale = _HIGH_DEPTH_SCALE[img.mode]
    array = np.asarray(img).astype(np.float32)
    if scale != 1.0:
        array = np.clip(array, 0, scale) / np.float32(scale)
    return Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))


def _resize_and_crop(img, p: Preprocessing):
    """The resize (and center crop) of `p`, with the sizes and offsets timm's eval transform computes."""
    from PIL import Image

    resample = getattr(Image.Resampling, p.interpolation.upper())
    h, w = p.size
    if not p.center_crop:
        return img.resize((w, h), resample)
    new_w, new_h = p.resized_size(*img.size)
    img = img.resize((max(w, new_w), max(h, new_h)), resample)
    left, top = int(round((img.size[0] - w) / 2.0)), int(round((img.size[1] - h) / 2.0))
    return img.crop((left, top, left + w, top + h))


def image_sizes(files: Sequence[Path], limit: int = 64) -> list[tuple[int, int]]:
    """(width, height) of up to `limit` files spread over the list; headers only, nothing decoded."""
    from PIL import Image

    step = max(1, len(files) // limit)
    sizes = []
    for path in files[::step][:limit]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except Exception:  # unreadable files are reported (or refused with strict) when the data is read
            continue
    return sizes


@dataclass
class _SkippingBatch:
    tensor: torch.Tensor | None
    skipped: list[str]
    refused: list[_RefusedImage] = field(default_factory=list)


def _collate_skipping(items):
    good = [t for t in items if isinstance(t, torch.Tensor)]
    bad = [t for t in items if isinstance(t, str)]
    refused = [t for t in items if isinstance(t, _RefusedImage)]
    return _SkippingBatch(torch.stack(good) if good else None, bad, refused)


class _StrictBatches:
    """Fail on the first unreadable image instead of skipping it."""

    def __init__(self, loader):
        self.loader = loader

    @passes_through
    def __iter__(self):
        for batch in self.loader:
            if batch.skipped:
                raise InputError(f"{batch.skipped[0]}: cannot decode image "
                                 f"(drop {param('strict')} to skip unreadable files)")
            yield batch

    def __len__(self):
        return len(self.loader)


def _image_folder(folder: Path, batch_size, num_workers, preprocessing: Preprocessing, strict, seed,
                  shard) -> DataSource:
    files = find_images(folder)
    if not files:
        raise InputError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    dataset = ImageFolderDataset(files, preprocessing)
    batch_indices = [list(r) for r in shard_batches(len(files), batch_size, shard)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_indices, num_workers=num_workers, collate_fn=_collate_skipping,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed))
    batches = _StrictBatches(loader) if strict else loader
    sizes = image_sizes(files)
    source = DataSource(batches, str(folder), sum(len(b) for b in batch_indices), kind="images",
                        preprocessing=preprocessing)
    if sizes:
        source.image_sizes = (min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1]))
        worst = max(sizes, key=lambda s: preprocessing.upscale(*s))
        factor = preprocessing.upscale(*worst)
        if factor > UPSCALE_WARNING:
            h, w = preprocessing.size
            source.warnings.append(
                f"images of {worst[0]}×{worst[1]} are upscaled {factor:.1f}× to reach the {h}×{w} input; if the "
                f"model was trained at their size, pass the input shape (--input-shape 1,{preprocessing.channels},"
                f"{worst[1]},{worst[0]}) or --image-size, and --no-center-crop")
    return source
