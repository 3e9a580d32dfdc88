"""Image files → model inputs: finding them, decoding with Pillow, the resize and crop, scaling and normalizing
as a `Preprocessing` (preprocessing.py) says; a folder as a Dataset that names unreadable files instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import param
from .preprocessing import PIL_MODES, Preprocessing
from .utils import first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


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
                    return RefusedImage(str(self.files[i]), refusal)
                return image_to_tensor(img, self.preprocessing)
        except Image.DecompressionBombError as e:
            return RefusedImage(str(self.files[i]), first_line(e))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return str(self.files[i])


@dataclass(frozen=True)
class RefusedImage:
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
        img = _resize_and_crop(img.convert(PIL_MODES[p.channels]), p)
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
