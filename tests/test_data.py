"""data.py: which batches a rank gets, where the input sits in a batch, and one preprocessing for every
command: where each value comes from, what images become, data that does not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_pngs
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bntool.data import check_fits, first_input, open_data, shard_batches
from bntool.errors import InputError
from bntool.images import image_to_tensor
from bntool.preprocessing import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, Preprocessing, resolve_preprocessing


@given(n=st.integers(0, 200), batch=st.integers(1, 32), world=st.integers(1, 5))
def test_shards_partition_the_single_process_batches(n, batch, world):
    """Every rank's batches together are exactly the batches one process would see, each once, in order."""
    single = [range(s, min(s + batch, n)) for s in range(0, n, batch)]
    shards = [shard_batches(n, batch, (rank, world)) for rank in range(world)]
    assert sorted((r for shard in shards for r in shard), key=lambda r: r.start) == single
    for rank, shard in enumerate(shards):
        assert shard == single[rank::world]


def test_shard_sizes_differ_by_at_most_one_batch():
    sizes = [len(shard_batches(100, 8, (rank, 3))) for rank in range(3)]  # 13 batches over 3 ranks
    assert sizes == [5, 4, 4]


def test_first_input_of_tensors_tuples_and_dicts():
    x = torch.randn(2, 3)
    assert first_input(x) is x
    assert first_input((x, torch.tensor([1, 0]))) is x  # (input, label)
    assert first_input([[x], "meta"]) is x
    assert first_input({"pixel_values": x, "labels": torch.tensor([0, 1])}) is x
    assert first_input({"image": x}) is x
    assert first_input({"feat": x, "other": torch.zeros(1)}, input_key="feat") is x
    assert first_input({"inputs": (x, 1)}) is x


def test_first_input_errors_name_the_problem():
    with pytest.raises(InputError, match="keys"):
        first_input({"feat": torch.zeros(1)})
    with pytest.raises(InputError, match="str"):
        first_input("not a batch")
    with pytest.raises(InputError):
        first_input(())


# The data config timm 1.0 attaches to efficientnet_b0 (its `pretrained_cfg`), as a plain model would carry it.
EFFNET_CFG = {"architecture": "efficientnet_b0", "input_size": (3, 224, 224), "interpolation": "bicubic",
              "crop_pct": 0.875, "crop_mode": "center", "mean": (0.485, 0.456, 0.406),
              "std": (0.229, 0.224, 0.225), "num_classes": 1000}
# Squashed, not aspect-kept, before the crop (timm's crop_mode "squash", as some ViT and MobileCLIP configs have).
SQUASH_CFG = dict(EFFNET_CFG, crop_mode="squash", crop_pct=0.9, interpolation="bilinear")
# A model trained with other statistics and a larger crop fraction (e.g. timm's CLIP-normalized models).
CLIP_CFG = {"input_size": (3, 256, 256), "interpolation": "bilinear", "crop_pct": 0.95, "crop_mode": "center",
            "mean": (0.4815, 0.4578, 0.4082), "std": (0.2686, 0.2613, 0.2758)}


class WithConfig(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pretrained_cfg = dict(cfg)
        self.conv = nn.Conv2d(3, 4, 3)


def test_defaults_are_imagenet_at_224():
    p = resolve_preprocessing()
    assert (p.size, p.resize, p.center_crop, p.interpolation) == ((224, 224), 256, True, "bilinear")
    assert (p.mean, p.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert set(p.sources.values()) == {"default (ImageNet)", "default (crop 224 of 256)", "default"}


def test_input_shape_gives_the_size_and_the_crop_keeps_the_ratio():
    p = resolve_preprocessing(input_shape=(1, 3, 64, 64))
    assert p.size == (64, 64) and p.resize == 73  # floor(64 / 0.875), as timm computes it
    assert p.sources["size"] == "the input shape"
    assert "size from the input shape" in p.describe_sources()


def test_model_config_then_overrides():
    p = resolve_preprocessing(model=WithConfig(CLIP_CFG))
    assert p.size == (256, 256) and p.resize == int(256 / 0.95) and p.interpolation == "bilinear"
    assert p.mean == CLIP_CFG["mean"] and p.std == CLIP_CFG["std"]
    assert p.sources["mean"] == "the model's pretrained_cfg"
    assert p.sources["resize"] == "the model's pretrained_cfg (crop_pct 0.95)"
    given = resolve_preprocessing(ImageOptions(mean=(0.5, 0.5, 0.5), interpolation="nearest"),
                                  model=WithConfig(CLIP_CFG), input_shape=(2, 3, 96, 128))
    assert given.size == (96, 128) and given.mean == (0.5, 0.5, 0.5) and given.std == CLIP_CFG["std"]
    assert given.interpolation == "nearest" and given.sources["interpolation"] == "given"
    assert given.resize == (int(96 / 0.95), int(128 / 0.95))  # each side, as timm's eval transform scales them


@pytest.mark.parametrize("cfg", [EFFNET_CFG, CLIP_CFG, SQUASH_CFG, dict(SQUASH_CFG, crop_pct=1.0)])
@pytest.mark.parametrize("size", [(96, 128), (128, 96), (64, 200), (112, 112)])
def test_images_match_timms_own_eval_transform(cfg, size):
    """Non-square input shapes too (they were up to 4.4 apart): timm's create_transform is the reference."""
    from PIL import Image
    from test_arch import timm_or_skip

    timm = timm_or_skip()
    model = WithConfig(cfg)
    reference = timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, *size)}, model=model))
    p = resolve_preprocessing(model=model, input_shape=(1, 3, *size))
    rng = np.random.default_rng(0)
    for width, height in [(200, 150), (150, 220), (100, 100), (333, 97)]:
        img = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
        ours, theirs = image_to_tensor(img, p), reference(img)
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5, rtol=0), (width, height)


def _torchvision_scaled(path, channels=3) -> torch.Tensor:
    """What torchvision reads: `decode_png` (uint16 for 16-bit files) scaled by the dtype's range, grey repeated."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img)
    scale = 65535.0 if array.dtype in (np.uint16, np.int32) else (255.0 if array.dtype == np.uint8 else 1.0)
    t = torch.from_numpy(array.astype(np.float32) / np.float32(scale))
    return t.expand(channels, *t.shape) if t.dim() == 2 else t.permute(2, 0, 1)


@pytest.mark.parametrize("kind", ["png16", "tiff_float"])
def test_16_bit_and_float_images_keep_their_values(tmp_path, kind):
    """A 16-bit PNG (Pillow mode I;16) and a float TIFF (mode F) are scaled by their range, not saturated by a
    conversion to 8-bit RGB (the normalised mean was 2.4 for a mid-grey image)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    values = rng.random((24, 32))  # in [0, 1)
    if kind == "png16":
        path = tmp_path / "grey16.png"
        Image.fromarray((values * 65535).astype(np.uint16)).save(path)
        try:
            from torchvision.io import decode_png, read_file

            decoded = decode_png(read_file(str(path)))
            assert decoded.dtype == torch.uint16 and torch.equal(
                decoded[0].to(torch.int32), torch.from_numpy((values * 65535).astype(np.int32)))
        except (ImportError, RuntimeError):  # torchvision's compiled image ops may not load on this torch
            pass
    else:
        path = tmp_path / "grey.tif"
        Image.fromarray(values.astype(np.float32)).save(path)
    p = Preprocessing(size=(24, 32), resize=32, center_crop=False, interpolation="bilinear",
                      mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I", "F")
        ours = image_to_tensor(img, p)
    expected = (_torchvision_scaled(path) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert abs(float(ours.mean())) < 0.6  # mid-grey, not saturated white (≈ 2.4)


def test_a_16_bit_image_resizes_as_its_8_bit_twin(tmp_path):
    """The same picture in 8 and 16 bits (v·257) gives the same inputs after a resize and a crop, up to the
    8-bit resize's rounding to whole levels (after each of its two passes: at most one level in all)."""
    from PIL import Image

    eight = (np.random.default_rng(1).random((50, 70)) * 255).astype(np.uint8)
    p = Preprocessing(size=(32, 32), resize=36, center_crop=True, interpolation="bilinear", mean=(0.5,), std=(0.25,))
    ours = image_to_tensor(Image.fromarray(eight.astype(np.uint16) * 257), p)
    twin = image_to_tensor(Image.fromarray(eight), p)
    assert ours.shape == twin.shape == (1, 32, 32)
    assert float((ours - twin).abs().max()) <= 1.01 / 255 / 0.25


def test_squash_crop_mode_scales_each_side_then_crops():
    """timm's crop_mode "squash": each side to size / crop_pct (aspect not kept), then the center crop."""
    p = resolve_preprocessing(model=WithConfig(dict(EFFNET_CFG, crop_mode="squash")), input_shape=(1, 3, 32, 48))
    assert p.squash and p.center_crop and p.sources["crop"] == "the model's pretrained_cfg"
    assert p.resize == (36, 54) and p.resized_size(100, 10) == (54, 36)
    assert p.describe().startswith("resize to 36×54 (aspect not kept) → center crop 32×48 (bicubic)")
    whole = resolve_preprocessing(model=WithConfig(dict(SQUASH_CFG, crop_pct=1.0)), input_shape=(1, 3, 32, 32))
    assert not whole.center_crop and whole.describe().startswith("resize to 32×32 (bilinear)")  # no crop at 1
    given = resolve_preprocessing(ImageOptions(resize=40), model=WithConfig(SQUASH_CFG), input_shape=(1, 3, 32, 32))
    assert not given.squash and given.resize == 40  # a --resize given is the shorter side, aspect kept


@pytest.mark.parametrize("options, shape, needle", [
    (ImageOptions(image_size=128), (1, 3, 64, 64), "image_size 128×128 contradicts input_shape 1,3,64,64"),
    (ImageOptions(mean=(0.5, 0.5)), (1, 3, 64, 64), "mean 0.5,0.5 has 2 values, but input_shape has 3"),
    (ImageOptions(std=(0.2, 0.0, 0.2)), None, "every value must be positive"),
    (ImageOptions(interpolation="cubic"), None, "expected one of nearest, bilinear, bicubic"),
    (ImageOptions(resize=100), (1, 3, 128, 128), "smaller than the crop"),
    (None, (1, 20), "images become (C, H, W) samples"),
])
def test_contradictions_are_input_errors(options, shape, needle):
    with pytest.raises(InputError, match=None) as e:
        resolve_preprocessing(options, input_shape=shape)
    assert needle in str(e.value), str(e.value)


def test_grayscale_input_gets_one_channel():
    p = resolve_preprocessing(input_shape=(1, 1, 28, 28))
    assert p.channels == 1 and p.mean == (pytest.approx(sum(IMAGENET_MEAN) / 3),)
    from PIL import Image

    t = image_to_tensor(Image.new("RGB", (28, 28), (255, 255, 255)), p)
    assert t.shape == (1, 28, 28)
    assert torch.allclose(t, torch.full((1, 28, 28), (1 - p.mean[0]) / p.std[0]))


def test_image_to_tensor_crops_the_center_of_the_resized_image():
    """A 128×64 image, left half red, right half blue; resized to 64×32 then cropped 32×32 in the middle:
    the left 16 columns are red, the right 16 blue (nearest: no blending at the edge)."""
    from PIL import Image

    array = np.zeros((64, 128, 3), dtype=np.uint8)
    array[:, :64, 0] = 255
    array[:, 64:, 2] = 255
    p = Preprocessing(size=(32, 32), resize=32, center_crop=True, interpolation="nearest", mean=(0.0, 0.0, 0.0),
                      std=(1.0, 1.0, 1.0))
    t = image_to_tensor(Image.fromarray(array), p)
    expected = torch.zeros(3, 32, 32)
    expected[0, :, :16] = 1.0
    expected[2, :, 16:] = 1.0
    assert torch.equal(t, expected)
    squash = image_to_tensor(Image.fromarray(array), Preprocessing((8, 8), 8, False, "nearest", (0.5,) * 3,
                                                                   (0.25,) * 3))
    reference = (np.asarray(Image.fromarray(array).resize((8, 8), Image.NEAREST), dtype=np.float32) / 255 - 0.5) / 0.25
    assert torch.allclose(squash, torch.from_numpy(reference).permute(2, 0, 1))


@pytest.fixture
def png_folder(tmp_path):
    return write_pngs(tmp_path / "pngs", 12, 64)


def test_small_images_at_the_default_size_warn_about_upscaling(png_folder):
    source = open_data(png_folder, batch_size=5)
    assert source.preprocessing.size == (224, 224)
    assert len(source.warnings) == 1 and "upscaled 4.0×" in source.warnings[0]
    assert "--input-shape 1,3,64,64" in source.warnings[0]
    assert [tuple(b.shape) for b in source] == [(5, 3, 224, 224), (5, 3, 224, 224), (2, 3, 224, 224)]


def test_images_at_the_input_shape_are_their_own_pixels(png_folder):
    from PIL import Image

    source = open_data(png_folder, batch_size=12, input_shape=(1, 3, 64, 64),
                         image=ImageOptions(center_crop=False))
    assert source.warnings == []
    (batch,) = list(source)
    first = np.asarray(Image.open(png_folder / "00.png"), dtype=np.float32) / 255
    expected = (torch.from_numpy(first).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(batch[0], expected, atol=1e-6)
    line = source.summary()
    assert line.startswith(f"12 images in {png_folder} (64×64): resize to 64×64 (bilinear)"), line
    assert "size from the input shape" in line and "no center crop given" in line
    data = json.loads(json.dumps(source.to_dict()))
    assert data["num_samples"] == 12 and data["preprocessing"]["size"] == [64, 64]
    assert data["preprocessing"]["sources"]["mean"] == "default (ImageNet)"


def test_timm_model_config_reaches_the_images(png_folder):
    model = WithConfig(EFFNET_CFG)
    source = open_data(png_folder, batch_size=4, model=model, input_shape=(1, 3, 64, 64))
    p = source.preprocessing
    assert p.interpolation == "bicubic" and p.resize == 73
    assert p.sources["interpolation"] == "the model's pretrained_cfg"
    assert "interpolation, mean, std from the model's pretrained_cfg" in source.summary()
    assert source.warnings == []  # 64 → 73: a 1.14× resize


def test_tensor_file_that_does_not_fit_the_input_shape(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 224, 224), dtype=np.float32))
    with pytest.raises(InputError) as e:
        open_data(tmp_path / "x.npy", input_shape=(1, 3, 64, 64))
    assert str(e.value) == (f"{tmp_path / 'x.npy'}: samples of shape (3, 224, 224) do not fit input_shape "
                            "1,3,64,64 (each sample must be (3, 64, 64))")
    ok = open_data(tmp_path / "x.npy", input_shape=(1, 3, 224, 224))
    assert ok.summary() == f"8 samples of shape (3, 224, 224) from {tmp_path / 'x.npy'}, used as they are"


def test_check_fits_allows_another_batch_size():
    check_fits(torch.zeros(5, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(InputError, match="each sample must be"):
        check_fits(torch.zeros(5, 8, 8), torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("cfg", [{"input_size": (224, 224)}, {"input_size": (1, 3, 32, 32)},
                                 {"input_size": (True, 32, 32)}, {"input_size": (3, 32, 32), "crop_pct": "abc"},
                                 {"input_size": (3, 32, 32), "crop_pct": -1.0}, {"input_size": (3, 32, 32),
                                                                                 "mean": (0.5, 0.5)}])
def test_a_models_odd_data_config_is_left_out_not_fatal(cfg):
    from bntool.preprocessing import model_data_config

    model = torch.nn.Conv2d(3, 3, 1)
    model.pretrained_cfg = cfg
    plausible = model_data_config(model)
    p = resolve_preprocessing(None, model=model)
    assert p.size in ((224, 224), (32, 32)) and len(p.mean) == 3
    assert all(k not in plausible for k in ("crop_pct", "mean") if k in cfg)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_strip_image_too_large_to_resize_is_refused_naming_it(tmp_path, workers):
    """A 100000×1 PNG would become 25,600,000×256 pixels before the crop: MemoryError (exit 3) without workers,
    a worker's traceback with them. Now one InputError naming the file, either way."""
    from PIL import Image

    folder = write_pngs(tmp_path / "imgs", 2, 40)
    Image.fromarray(np.zeros((1, 100_000, 3), dtype=np.uint8)).save(folder / "strip.png")
    source = open_data(folder, batch_size=4, num_workers=workers)
    with pytest.raises(InputError) as e:
        list(source)
    message = str(e.value)
    assert message.startswith(f"{folder / 'strip.png'}: an image of 100000×1 pixels would be resized to "
                              "25,600,000×256 before the center crop"), message
    squashed = open_data(folder, batch_size=4, num_workers=workers, image=ImageOptions(center_crop=False))
    assert [tuple(b.shape) for b in squashed] == [(3, 3, 224, 224)]
