"""Calibration data sources → an iterable of input batches.

Sources: a folder of images (decoded with Pillow, batched by a torch DataLoader with workers), tensor files
(.npy, .npz, .pt) and a user's own loader given as 'module.path:callable'. How an image becomes a model input is
preprocessing.py (what is done) and images.py (doing it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InputError, param, passes_through
from .files import check_input_file
from .images import IMAGE_SUFFIXES, ImageFolderDataset, RefusedImage, find_images, image_sizes
from .preprocessing import ImageOptions, Preprocessing, resolve_preprocessing, shape_text
from .preprocessing import model_data_config as model_data_config  # options.py imports it from here
from .utils import a_type, first_line, import_object, parse_kwargs

UPSCALE_WARNING = 2.0  # warn when images are enlarged more than this
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
                         f"{shape_text(example.shape)} (each sample must be {tuple(example.shape[1:])})")


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


@dataclass
class _SkippingBatch:
    tensor: torch.Tensor | None
    skipped: list[str]
    refused: list[RefusedImage] = field(default_factory=list)


def _collate_skipping(items):
    good = [t for t in items if isinstance(t, torch.Tensor)]
    bad = [t for t in items if isinstance(t, str)]
    refused = [t for t in items if isinstance(t, RefusedImage)]
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
