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

from bntool.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageOptions,
    Preprocessing,
    check_fits,
    first_input,
    image_to_tensor,
    open_data,
    resolve_preprocessing,
    shard_batches,
)
from bntool.errors import InputError


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
    assert given.resize == int(128 / 0.95)


def test_squash_crop_mode_resizes_straight():
    p = resolve_preprocessing(model=WithConfig(dict(EFFNET_CFG, crop_mode="squash")), input_shape=(1, 3, 32, 32))
    assert not p.center_crop and p.sources["crop"] == "the model's pretrained_cfg"
    assert p.describe().startswith("resize to 32×32 (bicubic)")


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
    from bntool.data import model_data_config

    model = torch.nn.Conv2d(3, 3, 1)
    model.pretrained_cfg = cfg
    plausible = model_data_config(model)
    p = resolve_preprocessing(None, model=model)
    assert p.size in ((224, 224), (32, 32)) and len(p.mean) == 3
    assert all(k not in plausible for k in ("crop_pct", "mean") if k in cfg)
