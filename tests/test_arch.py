"""Models from where people keep them: a module in the working directory, timm's registry, close matches on typos."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, assert_clean_error
from torch import nn

from bntool.arch import add_working_directory, resolve_factory
from bntool.errors import InputError

USER_MODULE = '''
from torch import nn


def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class Net(nn.Sequential):
    def __init__(self):
        super().__init__(*build(4))
'''


def timm_or_skip():
    """timm, imported as bntool imports it (torchvision's C++ ops may not match a CPU torch); skip without it."""
    try:
        resolve_factory("timm:create_model")
    except InputError as e:
        if "not installed" in str(e):
            pytest.skip("timm is not installed (pip install -e '.[timm]')")
        raise
    import timm

    return timm


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A user's folder: mymodels.py and a state_dict of its model, as the current directory."""
    (tmp_path / "mymodels.py").write_text(USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodels

        model = mymodels.build(num_classes=4)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mymodels", None)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def console_script(*args, cwd):
    """The installed `bntool` script, which (unlike `python -m`) does not put the working directory on sys.path."""
    script = shutil.which("bntool")
    if script is None:
        pytest.skip("the bntool console script is not installed (pip install -e .)")
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="80")
    return subprocess.run([script, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_console_script_unpickles_a_module_whose_class_is_in_the_working_directory(user_project):
    """A whole pickled module (`torch.save(model)`) of mymodels' class loads with --trust-pickle from the console
    script as with `python -m bntool` (the unpickler imports `mymodels` as --arch does)."""
    sys.path.insert(0, str(user_project))
    try:
        import mymodels

        torch.save(mymodels.Net(), user_project / "whole.pt")  # the pickle names mymodels.Net
    finally:
        sys.path.remove(str(user_project))
        sys.modules.pop("mymodels", None)
    result = console_script("inspect", "whole.pt", "--trust-pickle", "--json", cwd=user_project)
    assert result.returncode == 0, result.stderr
    assert [layer["name"] for layer in json.loads(result.stdout)["layers"]] == ["1"]


def test_console_script_imports_a_module_from_the_working_directory(user_project):
    result = console_script("inspect", "model.pt", "--arch", "mymodels:build", "--arch-kwargs",
                            '{"num_classes": 4}', "--json", cwd=user_project)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [layer["name"] for layer in report["layers"]] == ["1"]
    assert any("working directory" in note for note in report["notes"]), report.get("notes")
    assert report["total_params"] == 8 * 3 * 3 * 3 + 2 * 8 + 8 * 4 + 4


def test_working_directory_note_only_when_it_was_added(user_project, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(user_project))])
    sys.modules.pop("mymodels", None)
    try:
        factory = resolve_factory("mymodels:build")
        assert isinstance(factory.build(), nn.Sequential)
        assert any("working directory" in n and "python -m" in n for n in factory.notes), factory.notes
        assert not add_working_directory()  # already there now: nothing added twice
        again = resolve_factory("mymodels:build")
        assert again.notes == []
    finally:
        sys.modules.pop("mymodels", None)


@pytest.mark.parametrize("spec, suggestion", [
    ("mymodels:biuld", "'mymodels:build'"),
    ("mymodel:build", "'mymodels:build'"),
    ("torch.nn:BatchNorm2", "'torch.nn:BatchNorm2d'"),
    ("torch.nnn:Conv2d", "'torch.nn:Conv2d'"),
])
def test_typos_get_close_matches(user_project, spec, suggestion):
    with pytest.raises(InputError) as e:
        resolve_factory(spec)
    message = str(e.value)
    assert message.startswith(f"arch {spec!r}") and f"did you mean {suggestion}" in message, message
    sys.modules.pop("mymodels", None)


def test_cli_typo_is_one_line_with_the_suggestion(user_project, cli):
    result = cli("inspect", "model.pt", "--arch", "mymodels:buld")
    assert_clean_error(result, contains="did you mean 'mymodels:build'")
    sys.modules.pop("mymodels", None)


@pytest.mark.parametrize("spec, suggestion", [
    ("torchvision.models:resnet81", "'torchvision.models:resnet18'"),
    ("torchvision.modelz:resnet18", "'torchvision.models:resnet18'"),
])
def test_torchvision_typos_get_close_matches(tmp_path, spec, suggestion):
    """A fresh process: where torchvision's C++ ops do not match torch, the import is retried after bntool
    declares their schemas, and the typo found then once lost its hint."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    torch.save(nn.Linear(2, 2).state_dict(), tmp_path / "m.pt")
    result = subprocess.run([sys.executable, "-m", "bntool", "inspect", "m.pt", "--arch", spec], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert f"did you mean {suggestion}" in result.stderr, result.stderr


def test_timm_name_resolves_through_the_registry(tmp_path, cli):
    timm = timm_or_skip()
    factory = resolve_factory("timm:efficientnet_b0")
    assert factory.source == "timm registry"
    model = factory.build(num_classes=10)
    reference = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
    assert type(model) is type(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    torch.save(reference.state_dict(), tmp_path / "effnet.pt")
    result = cli("inspect", tmp_path / "effnet.pt", "--arch", "timm:efficientnet_b0", "--arch-kwargs",
                 '{"num_classes": 10}', "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    expected = [n for n, m in reference.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert [layer["name"] for layer in report["layers"]] == expected


def test_timm_typo_suggests_registered_models():
    timm_or_skip()
    with pytest.raises(InputError) as e:
        resolve_factory("timm:efficientnet_b9")
    assert "timm has no model 'efficientnet_b9'" in str(e.value)
    assert "did you mean 'timm:efficientnet_b8'" in str(e.value)


def test_timm_attribute_still_works():
    timm = timm_or_skip()
    assert resolve_factory("timm:create_model").build is timm.create_model



def test_timm_model_preprocessing_matches_timms_own_transform(tmp_path):
    """The images bntool feeds a timm model are the ones timm's eval transform makes from the same file."""
    timm_or_skip()
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from bntool.data import open_data

    model = resolve_factory("timm:efficientnet_b0").build(num_classes=10)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((64, 80, 3)) * 255).astype(np.uint8)).save(folder / "wide.png")
    source = open_data(folder, model=model, input_shape=(1, 3, 64, 64), batch_size=1)
    p = source.preprocessing
    assert (p.interpolation, p.resize, p.sources["mean"]) == ("bicubic", 73, "the model's pretrained_cfg")
    (batch,) = list(source)
    config = resolve_data_config({"input_size": (3, 64, 64)}, model=model)
    expected = create_transform(**config)(Image.open(folder / "wide.png").convert("RGB"))
    assert torch.allclose(batch[0], expected, atol=1e-5), float((batch[0] - expected).abs().max())


def test_confusable_characters_rank_first_in_close_matches():
    from bntool.arch import close_matches

    names = [f"efficientnet_b{i}" for i in range(9)] + ["resnet18", "resnet101", "ResNet"]
    assert close_matches("efficientnet_bO", names)[0] == "efficientnet_b0"
    assert close_matches("resnetl8", names)[0] == "resnet18"
    assert close_matches("resnet1O1", names)[0] == "resnet101"
    assert close_matches("RESNET", names)[0] == "ResNet"
    assert close_matches("efficientnet_b9", names)[0] == "efficientnet_b8"  # a real typo keeps its neighbour


def test_timm_typo_with_a_letter_o_for_a_zero_suggests_the_zero_first():
    timm_or_skip()
    with pytest.raises(InputError) as e:
        resolve_factory("timm:efficientnet_bO")
    assert "did you mean 'timm:efficientnet_b0'" in str(e.value), str(e.value)
