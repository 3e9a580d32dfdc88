"""Calibration data sources → an iterable of input batches.

Sources: a folder of images (decoded with Pillow, batched by a torch DataLoader with workers), tensor files
(.npy, .npz, .pt) and a user's own loader given as 'module.path:callable'.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, passes_through
from .utils import first_line, import_object, parse_kwargs

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
        raise InputError(f"batch is a dict with keys {sorted(batch)}; name the input with --input-key")
    if isinstance(batch, (list, tuple)) and batch:
        return first_input(batch[0], input_key)
    raise InputError(f"cannot find an input tensor in a batch of type {type(batch).__name__}")


@dataclass
class ImageOptions:
    image_size: int = 224
    resize: int | None = None  # shorter side before the crop; default image_size·256/224
    center_crop: bool = True
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD


@dataclass
class DataSource:
    """Re-iterable batches of model inputs, with what is known about them."""

    batches: Iterable[Any]
    description: str
    num_samples: int | None = None
    input_key: str | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files seen so far

    @passes_through
    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            if isinstance(batch, _SkippingBatch):
                self.skipped.extend(f for f in batch.skipped if f not in self.skipped)  # once over all passes
                if batch.tensor is None:
                    continue
                batch = batch.tensor
            yield first_input(batch, self.input_key)


def open_source(
    source: str | os.PathLike | None = None,
    *,
    loader: str | None = None,
    loader_kwargs: str | Mapping[str, Any] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    image: ImageOptions | None = None,
    npz_key: str | None = None,
    input_key: str | None = None,
    strict: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataSource:
    """Open --data (a folder of images or a tensor file) or --loader.

    With world_size > 1 this process gets every world_size-th batch, starting at `rank`: the batches are the
    ones a single process would see, so merged statistics equal a single-process run (a user's --loader is
    used as given: shard it yourself, e.g. with DistributedSampler)."""
    if batch_size <= 0:
        raise InputError(f"--batch-size {batch_size}: must be positive")
    if num_workers < 0:
        raise InputError(f"--workers {num_workers}: must be 0 (load in this process) or more")
    if loader is not None:
        return _user_loader(loader, loader_kwargs, input_key)
    if source is None:
        raise InputError("no calibration data: pass --data PATH (images folder or .npy/.npz/.pt) or --loader")
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    shard = (rank, world_size)
    if path.is_dir():
        return _image_folder(path, batch_size, num_workers, image or ImageOptions(), strict, seed, shard)
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz", ".pt", ".pth"):
        tensor = _read_tensor_file(path, npz_key)
        batches = _TensorBatches(tensor, batch_size, shard)
        return DataSource(batches, f"{path} {tuple(tensor.shape)}", batches.num_samples)
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
                    raise InputError(f"{path}: holds arrays {keys}; choose one with --npz-key")
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
    obj = import_object(spec, what="--loader")
    kwargs = parse_kwargs(loader_kwargs, what="--loader-kwargs")
    if callable(obj) and not isinstance(obj, torch.utils.data.DataLoader):
        try:
            obj = obj(**kwargs)
        except Exception as e:
            raise InputError(f"--loader {spec!r}: calling it failed ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Iterable):
        raise InputError(f"--loader {spec!r}: returned a {type(obj).__name__}, not an iterable of batches")
    n = len(obj.dataset) if hasattr(obj, "dataset") and hasattr(obj.dataset, "__len__") else None
    return DataSource(obj, f"--loader {spec}", n, input_key=input_key)


# ---------------------------------------------------------------- images


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabeled images, resized on the shorter side, center-cropped, normalized. None for unreadable files."""

    def __init__(self, files: Sequence[Path], options: ImageOptions):
        self.files, self.options = list(files), options

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                return image_to_tensor(img.convert("RGB"), self.options)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return str(self.files[i])


def image_to_tensor(img, o: ImageOptions) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    size = o.image_size
    shorter = o.resize or round(size * 256 / 224) if o.center_crop else size
    w, h = img.size
    scale = shorter / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(o.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(o.std, dtype=torch.float32).view(-1, 1, 1)
    return (t - mean) / std


@dataclass
class _SkippingBatch:
    tensor: torch.Tensor | None
    skipped: list[str]


def _collate_skipping(items):
    good = [t for t in items if isinstance(t, torch.Tensor)]
    bad = [t for t in items if isinstance(t, str)]
    return _SkippingBatch(torch.stack(good) if good else None, bad)


class _StrictBatches:
    """Fail on the first unreadable image instead of skipping it."""

    def __init__(self, loader):
        self.loader = loader

    @passes_through
    def __iter__(self):
        for batch in self.loader:
            if batch.skipped:
                raise InputError(f"{batch.skipped[0]}: cannot decode image (drop --strict to skip unreadable files)")
            yield batch

    def __len__(self):
        return len(self.loader)


def _image_folder(folder: Path, batch_size, num_workers, options: ImageOptions, strict, seed, shard) -> DataSource:
    files = find_images(folder)
    if not files:
        raise InputError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    dataset = ImageFolderDataset(files, options)
    batch_indices = [list(r) for r in shard_batches(len(files), batch_size, shard)]
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_indices, num_workers=num_workers, collate_fn=_collate_skipping,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed))
    batches = _StrictBatches(loader) if strict else loader
    return DataSource(batches, f"{folder} ({len(files)} images)", sum(len(b) for b in batch_indices))
