"""Every checkpoint kind loads; every bad input is one clear line, exit 2, nothing written."""

from __future__ import annotations

import os
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PYTHON, assert_clean_error, files_in
from safetensors.torch import save_file

from bntool import zoo
from bntool.checkpoint import load_checkpoint, save_checkpoint, strip_prefixes
from bntool.errors import InputError
from bntool.files import atomic_write, check_output_path

ARCH = ["--arch", "bntool.zoo:resnet"]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_pt(resnet_sd):
    ckpt = load_checkpoint(resnet_sd, arch="bntool.zoo:resnet")
    assert ckpt.kind == "state_dict"
    assert same_weights(ckpt.model, zoo.build("resnet"))


def test_safetensors_roundtrip(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(zoo.build("resnet").state_dict(), str(path))
    ckpt = load_checkpoint(path, arch="bntool.zoo:resnet")
    assert ckpt.fmt == "safetensors" and same_weights(ckpt.model, zoo.build("resnet"))
    out = tmp_path / "out.safetensors"
    save_checkpoint(ckpt, ckpt.model, out)
    assert same_weights(load_checkpoint(out, arch="bntool.zoo:resnet").model, zoo.build("resnet"))


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "ema"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_training_checkpoint_wrappers(tmp_path, key, prefix):
    sd = {prefix + k: v for k, v in zoo.build("resnet").state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({key: sd, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    ckpt = load_checkpoint(path, arch="bntool.zoo:resnet")
    assert ckpt.kind == "wrapped" and ckpt.key == key and ckpt.stripped_prefix == prefix
    assert same_weights(ckpt.model, zoo.build("resnet"))
    out = tmp_path / "out.pt"
    save_checkpoint(ckpt, ckpt.model, out)
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 7 and saved["optimizer"] == {"lr": 0.1}  # other keys are kept


def test_explicit_key(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"teacher": zoo.build("resnet").state_dict(), "student": zoo.build("resnet", seed=1).state_dict()},
               path)
    ckpt = load_checkpoint(path, arch="bntool.zoo:resnet", key="student")
    assert same_weights(ckpt.model, zoo.build("resnet", seed=1))
    with pytest.raises(InputError, match="no key 'nope'"):
        load_checkpoint(path, arch="bntool.zoo:resnet", key="nope")


def test_pickled_module_needs_trust(tmp_path, cli):
    path = tmp_path / "module.pt"
    torch.save(zoo.build("resnet"), path)
    result = cli("inspect", path)
    assert_clean_error(result, contains="--trust-pickle")
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.kind == "module" and same_weights(ckpt.model, zoo.build("resnet"))


def test_pickle_is_not_executed_without_trust(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(InputError, match="trust_pickle") as info:  # the library names its parameter
        load_checkpoint(path, arch="bntool.zoo:resnet")
    assert info.value.param == "trust_pickle"
    assert not marker.exists()


def test_torchscript_inspect_and_fold_unsupported(tmp_path, cli):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(zoo.build("resnet")), path)
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    assert '"BatchNorm2d"' in result.out
    out = tmp_path / "out.pt"
    assert_clean_error(cli("fold", path, "--input-shape", "1,3,32,32", "-o", out), contains="not supported")
    assert not out.exists()


def test_strip_prefixes_only_when_every_key_has_it():
    sd = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert strip_prefixes(sd) == (sd, "")


# ---------------------------------------------------------------- bad input, through the CLI


def _jpeg(path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, format="JPEG")
    return path


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "truncated", "jpeg", "garbage"])
def test_bad_checkpoint_files(tmp_path, cli, resnet_sd, case):
    path = tmp_path / "bad.pt"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        data = resnet_sd.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "jpeg":
        _jpeg(path)
    elif case == "garbage":
        path.write_bytes(os.urandom(1000))
    out = tmp_path / "out.pt"
    result = cli("fold", path, *ARCH, "--input-shape", "1,3,32,32", "-o", out)
    assert_clean_error(result, contains=str(path))
    assert not out.exists()
    assert files_in(tmp_path) <= {"bad.pt", "resnet.pt"}


def test_corrupt_zip_member(tmp_path, cli, resnet_sd):
    path = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(resnet_sd) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[: len(data) // 2] if info.filename.endswith(".pkl") else data)
    assert_clean_error(cli("inspect", path, *ARCH))


@pytest.mark.parametrize("arch,kwargs,needle", [
    ("bntool.zoo:mobilenet", None, "does not fit --arch"),
    ("no_such_module_xyz:build", None, "cannot import module"),
    ("bntool.zoo:no_such_factory", None, "has no 'no_such_factory'"),
    ("bntool.zoo:ZOO", None, "not callable"),
    ("bntool.zoo", None, "expected 'module.path:callable'"),
    ("bntool.zoo:resnet", "{num_classes: 3", "invalid JSON"),
    ("bntool.zoo:resnet", "[1, 2]", "expected a JSON object"),
    ("bntool.zoo:resnet", '{"num_classes": 3}', "shape mismatches"),
    ("bntool.zoo:resnet", '{"nonsense": 3}', "calling it with"),
])
def test_bad_arch(tmp_path, cli, resnet_sd, arch, kwargs, needle):
    extra = ["--arch-kwargs", kwargs] if kwargs else []
    out = tmp_path / "out.pt"
    result = cli("fold", resnet_sd, "--arch", arch, *extra, "--input-shape", "1,3,32,32", "-o", out)
    assert_clean_error(result, contains=needle)
    assert not out.exists()


def test_state_dict_without_arch(cli, resnet_sd):
    assert_clean_error(cli("inspect", resnet_sd), contains="--arch")


def test_output_in_missing_directory(tmp_path, cli, resnet_sd):
    result = cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", tmp_path / "nope" / "out.pt")
    assert_clean_error(result, contains="does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_output_in_read_only_directory(tmp_path, cli, resnet_sd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert_clean_error(cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", ro / "o.pt"))
    finally:
        ro.chmod(stat.S_IRWXU)


def test_output_on_read_only_filesystem(cli, resnet_sd):
    # /proc is read-only for everyone, root included.
    assert_clean_error(cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", "/proc/bntool.pt"))


def test_refuses_overwrite_and_in_place(tmp_path, cli, resnet_sd):
    out = tmp_path / "exists.pt"
    out.write_bytes(b"keep me")
    assert_clean_error(cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", out), contains="--force")
    assert out.read_bytes() == b"keep me"
    before = resnet_sd.read_bytes()
    assert_clean_error(cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", resnet_sd),
                       contains="--in-place")
    assert resnet_sd.read_bytes() == before
    assert cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", out, "--force").code == 0
    assert cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "-o", resnet_sd, "--in-place").code == 0


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.pt"

    def failing(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert files_in(tmp_path) == set()


def test_atomic_write_gives_a_normal_file_mode(tmp_path):
    """Temp files are private (0600); the written output gets what open() would give, or the replaced file's."""
    umask = os.umask(0o022)
    try:
        fresh = atomic_write(tmp_path / "fresh.pt", lambda tmp: Path(tmp).write_bytes(b"x"))
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.pt"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        atomic_write(kept, lambda tmp: Path(tmp).write_bytes(b"new"))
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(umask)


def test_atomic_write_ctrl_c_leaves_nothing_and_keeps_old_file(tmp_path):
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def interrupted(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert files_in(tmp_path) == {"out.pt"} and target.read_bytes() == b"old"


@pytest.mark.slow
def test_killed_process_leaves_no_output(tmp_path, resnet_sd):
    """SIGKILL in the middle of a save: the target never appears half-written."""
    out = tmp_path / "out.pt"
    script = (
        "import os, signal, torch\n"
        "from bntool.files import atomic_write\n"
        "def w(tmp):\n"
        "    open(tmp, 'wb').write(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_write({str(out)!r}, w)\n"
    )
    subprocess.run([PYTHON, "-c", script], check=False)
    assert not out.exists()


def test_check_output_path_messages(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        check_output_path(tmp_path)


# ---------------------------------------------------------------- key names as the training script wrote them


class LitLike(torch.nn.Module):
    """What a LightningModule saves: the network as an attribute, next to other modules with state."""

    def __init__(self):
        super().__init__()
        self.model = zoo.resnet()
        self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(10))


def lightning_checkpoint(path: Path) -> dict:
    lit = LitLike()
    lit.model.load_state_dict(zoo.build("resnet").state_dict())
    ckpt = {"state_dict": lit.state_dict(), "optimizer_states": [{"state": {}, "param_groups": []}],
            "lr_schedulers": [], "epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0"}
    torch.save(ckpt, path)
    return ckpt


def test_a_lightning_checkpoint_loads_into_the_bare_architecture_and_saves_back_as_lightning_wrote_it(tmp_path, cli):
    original = lightning_checkpoint(tmp_path / "last.ckpt")
    ckpt = load_checkpoint(tmp_path / "last.ckpt", arch="bntool.zoo:resnet")
    assert ckpt.submodule == "model." and list(ckpt.other_entries) == ["criterion.weight"]
    assert same_weights(ckpt.model, zoo.build("resnet"))
    assert any("'model.'" in note for note in ckpt.notes)

    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32))
    result = cli("recalibrate", tmp_path / "last.ckpt", "--arch", "bntool.zoo:resnet", "--data", tmp_path / "x.npy",
                 "-o", tmp_path / "recal.ckpt")
    assert result.code == 0, result.err
    assert "note: took the weights under 'model.'" in result.out
    saved = torch.load(tmp_path / "recal.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(original["state_dict"]) and saved["epoch"] == 3
    resumed = LitLike()
    resumed.load_state_dict(saved["state_dict"], strict=True)  # what Lightning does on resume
    recalibrated = saved["state_dict"]["model.stem.1.running_mean"]
    assert torch.equal(resumed.model.stem[1].running_mean, recalibrated)
    assert not torch.equal(recalibrated, original["state_dict"]["model.stem.1.running_mean"])


def test_a_folded_lightning_checkpoint_loads_back_with_bntool(tmp_path, cli):
    lightning_checkpoint(tmp_path / "last.ckpt")
    result = cli("fold", tmp_path / "last.ckpt", "--arch", "bntool.zoo:resnet", "--input-shape", "2,3,32,32",
                 "-o", tmp_path / "folded.ckpt")
    assert result.code == 0, result.err
    saved = torch.load(tmp_path / "folded.ckpt", weights_only=True)
    assert "optimizer_states" not in saved and "criterion.weight" in saved["state_dict"]
    assert all(k.startswith("model.") for k in saved["state_dict"] if k != "criterion.weight")
    folded = load_checkpoint(tmp_path / "folded.ckpt", arch="bntool.zoo:resnet").model.eval()
    x = zoo.example_input("resnet")
    torch.testing.assert_close(folded(x), zoo.build("resnet")(x), rtol=1e-4, atol=1e-4)


def test_two_attributes_that_both_fit_the_architecture_are_exit_2(tmp_path, cli):
    sd = zoo.build("resnet").state_dict()
    both = {**{"model." + k: v for k, v in sd.items()}, **{"ema." + k: v for k, v in sd.items()}}
    torch.save({"state_dict": both}, tmp_path / "last.ckpt")
    result = cli("inspect", tmp_path / "last.ckpt", "--arch", "bntool.zoo:resnet")
    assert_clean_error(result, contains="'ema.' and 'model.' all fit --arch bntool.zoo:resnet")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_written_back(tmp_path, prefix):
    sd = {prefix + k: v for k, v in zoo.build("resnet").state_dict().items()}
    torch.save(sd, tmp_path / "ddp.pt")
    ckpt = load_checkpoint(tmp_path / "ddp.pt", arch="bntool.zoo:resnet")
    save_checkpoint(ckpt, ckpt.model, tmp_path / "out.pt")
    assert set(torch.load(tmp_path / "out.pt", weights_only=True)) == set(sd)


def test_lightning_around_a_compiled_or_nested_network_loads_and_keeps_its_keys(tmp_path):
    sd = zoo.build("resnet").state_dict()
    for prefix in ("model._orig_mod.", "model.backbone."):
        keys = {prefix + k: v for k, v in sd.items()}
        torch.save({"state_dict": {**keys, "head.weight": torch.ones(3)}, "epoch": 1}, tmp_path / "l.ckpt")
        ckpt = load_checkpoint(tmp_path / "l.ckpt", arch="bntool.zoo:resnet")
        assert ckpt.submodule == prefix and same_weights(ckpt.model, zoo.build("resnet"))
        save_checkpoint(ckpt, ckpt.model, tmp_path / "out.ckpt", force=True)
        assert set(torch.load(tmp_path / "out.ckpt", weights_only=True)["state_dict"]) == {*keys, "head.weight"}


def test_weights_that_almost_fit_under_an_attribute_name_the_keys_that_differ_there(tmp_path, cli):
    sd = {"model." + k: v for k, v in zoo.build("resnet").state_dict().items()}
    del sd["model.fc.bias"]
    torch.save({"state_dict": sd}, tmp_path / "almost.ckpt")
    result = cli("inspect", tmp_path / "almost.ckpt", "--arch", "bntool.zoo:resnet")
    assert_clean_error(result, contains="(the weights under 'model.'): does not fit --arch bntool.zoo:resnet: "
                                        "1 missing key (fc.bias)")


def test_top_level_weights_with_an_ema_copy_that_also_fits_take_the_top_level_ones(tmp_path, cli):
    """A model saved with its EMA copy as an attribute: both the top-level keys and the 'ema.' ones fit the
    architecture. The top-level weights are the model's own (what load_state_dict of the wrapper restores), so
    they are taken, with a note naming --key ema; the EMA weights were taken silently (with a note) before."""
    own, ema = zoo.build("resnet", seed=0).state_dict(), zoo.build("resnet", seed=1).state_dict()
    sd = {**own, **{"ema." + k: v for k, v in ema.items()}}
    torch.save(sd, tmp_path / "with_ema.pt")
    ckpt = load_checkpoint(tmp_path / "with_ema.pt", arch="bntool.zoo:resnet")
    assert ckpt.submodule == "" and same_weights(ckpt.model, zoo.build("resnet", seed=0))
    assert any("top-level weights" in n and "--key ema" in n for n in ckpt.notes), ckpt.notes
    save_checkpoint(ckpt, ckpt.model, tmp_path / "out.pt")
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(saved) == set(sd) and torch.equal(saved["ema.stem.1.running_mean"], ema["stem.1.running_mean"])

    chosen = load_checkpoint(tmp_path / "with_ema.pt", arch="bntool.zoo:resnet", key="ema")
    assert chosen.submodule == "ema." and same_weights(chosen.model, zoo.build("resnet", seed=1))
    result = cli("inspect", tmp_path / "with_ema.pt", "--arch", "bntool.zoo:resnet")
    assert result.code == 0 and "note: took the top-level weights; the copy under 'ema.'" in result.out
    assert_clean_error(cli("inspect", tmp_path / "with_ema.pt", "--arch", "bntool.zoo:resnet", "--key", "swa"),
                       contains="no key 'swa' and no weights under 'swa.'")


def test_key_names_one_of_two_attributes_that_both_fit(tmp_path):
    sd = zoo.build("resnet").state_dict()
    both = {**{"model." + k: v for k, v in sd.items()}, **{"ema." + k: v * 0 for k, v in sd.items()}}
    torch.save({"state_dict": both, "epoch": 2}, tmp_path / "last.ckpt")
    ckpt = load_checkpoint(tmp_path / "last.ckpt", arch="bntool.zoo:resnet", key="model")
    assert ckpt.key == "state_dict" and ckpt.submodule == "model." and same_weights(ckpt.model, zoo.build("resnet"))


@pytest.mark.parametrize("shape", ["1,3,x", "1,,32,32", "1,3,32,32,", "1,3,32,-1", "one"])
def test_a_malformed_input_shape_is_refused_not_shortened(tmp_path, cli, resnet_sd, shape):
    """Every part of --input-shape is a positive integer: '1,3,x' was read as (1, 3), a silently different
    shape."""
    out = tmp_path / "out.pt"
    assert_clean_error(cli("fold", resnet_sd, *ARCH, "--input-shape", shape, "-o", out), contains="--input-shape")
    assert not out.exists()


def test_a_float16_state_dict_loaded_into_a_float32_arch_says_so(tmp_path, cli):
    """A float16 state_dict comes out float32 (load_state_dict casts into the model --arch builds): said in a note,
    not silently."""
    model = zoo.build("resnet")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               tmp_path / "half.pt")
    loaded = load_checkpoint(tmp_path / "half.pt", arch="bntool.zoo:resnet")
    assert any("float16 weights were loaded into the float32 model" in n for n in loaded.notes), loaded.notes
    torch.save(model.state_dict(), tmp_path / "full.pt")
    assert not any("were loaded" in n for n in load_checkpoint(tmp_path / "full.pt", arch="bntool.zoo:resnet").notes)
