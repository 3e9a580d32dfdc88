"""Exit 2 is the user's fault, exit 3 is ours: the boundary around user code, and inputs refused before work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PYTHON, assert_clean_error

import bntool
from bntool import zoo
from bntool.errors import InputError, UserCodeError, raised_by_bntool, user_code
from bntool.verification import check_health

ARCH = ["--arch", "bntool.zoo:resnet"]


def _module_in(tmp_path, monkeypatch, name: str, body: str):
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return __import__(name)


def _bntool_function(source: str, name: str):
    """A function whose code says it lives in the bntool package, as a bug in bntool's own code would."""
    namespace: dict = {}
    exec(compile(source, str(Path(bntool.__file__).parent / "imaginary_module.py"), "exec"), namespace)
    return namespace[name]


# ---------------------------------------------------------------- the boundary


def test_wrong_shape_example_to_the_api_is_an_input_error():
    with pytest.raises(UserCodeError, match="the model's forward on the example inputs failed: RuntimeError") as info:
        bntool.fold(zoo.build("resnet"), torch.randn(1, 5, 32, 32))
    assert isinstance(info.value, InputError) and isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(InputError, match="forward"):
        bntool.inspect(zoo.build("resnet"), torch.randn(1, 5, 32, 32))
    with pytest.raises(UserCodeError, match="TypeError: .*takes 2 positional arguments"):  # raised inside torch
        bntool.fold(zoo.build("resnet"), (torch.randn(1, 3, 32, 32), torch.randn(1, 3)))


def test_user_model_raising_names_the_forward(tmp_path, monkeypatch):
    module = _module_in(tmp_path, monkeypatch, "my_net", (
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)\n"
        "    def forward(self, x):\n"
        "        if x.shape[-1] != 8:\n"
        "            raise ValueError('this net takes 8x8 images')\n"
        "        return self.bn(self.conv(x))\n"))
    with pytest.raises(UserCodeError, match="ValueError: this net takes 8x8 images"):
        bntool.fold(module.Net(), torch.randn(1, 3, 9, 9))
    folded, report = bntool.fold(module.Net(), torch.randn(1, 3, 8, 8))
    assert report.passed


def test_a_bug_in_bntool_code_inside_the_boundary_stays_a_bug(monkeypatch):
    broken = _bntool_function("def iter_tensors(obj):\n    raise RuntimeError('bntool bug')\n", "iter_tensors")
    monkeypatch.setattr("bntool.graph.iter_tensors", broken)
    with pytest.raises(RuntimeError, match="bntool bug") as info:
        bntool.fold(zoo.build("resnet"), zoo.example_input("resnet"))
    assert not isinstance(info.value, InputError)


def test_boundary_attribution():
    def user_raises():
        with user_code("the thing"):
            torch.ones(2, 3) @ torch.ones(2, 3)

    with pytest.raises(UserCodeError, match="the thing failed: RuntimeError"):
        user_raises()
    ours = _bntool_function("def helper():\n    return [][1]\n", "helper")
    with pytest.raises(IndexError) as info:
        with user_code("the thing"):
            ours()
    assert raised_by_bntool(info.value)
    with pytest.raises(StopIteration), user_code("iterating"):  # control flow passes untouched
        next(iter([]))
    with pytest.raises(KeyboardInterrupt), user_code("the thing"):
        raise KeyboardInterrupt


def _loader(tmp_path, monkeypatch, body: str) -> str:
    _module_in(tmp_path, monkeypatch, "my_batches", body)
    return "my_batches:batches"


def test_loader_whose_second_batch_has_the_wrong_shape(tmp_path, monkeypatch, cli, resnet_sd):
    spec = _loader(tmp_path, monkeypatch, (
        "import torch\n"
        "def batches():\n"
        "    return [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32)]\n"))
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--loader", spec, "-o", out)
    assert_clean_error(result, contains="calibration batch 2 of shape (4, 3, 32) failed")
    assert not out.exists()


def test_loader_raising_midway_and_in_a_worker(tmp_path, monkeypatch):
    module = _module_in(tmp_path, monkeypatch, "my_data", (
        "import torch\n"
        "class Broken(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 8\n"
        "    def __getitem__(self, i):\n"
        "        if i == 5:\n"
        "            raise OSError('disk on fire')\n"
        "        return torch.randn(3, 32, 32)\n"))
    for workers in (0, 1):
        loader = torch.utils.data.DataLoader(module.Broken(), batch_size=2, num_workers=workers)
        with pytest.raises(UserCodeError, match="reading the calibration data failed: OSError"):
            bntool.recalibrate(zoo.build("resnet"), loader)


@pytest.mark.parametrize("mode", ["exact", "ema", "cumulative"])
def test_wrong_channel_data_in_every_mode(tmp_path, cli, resnet_sd, mode):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 2, 32, 32)).astype(np.float32))
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / "x.npy", "--mode", mode, "-o", out)
    assert_clean_error(result, contains="failed")
    assert not out.exists()


# ---------------------------------------------------------------- refused before any work


@pytest.mark.parametrize("samples", [-1, 1.5, True])
def test_bad_sample_counts(samples):
    model, x = zoo.build("mlp"), zoo.example_input("mlp")
    with pytest.raises(InputError, match="samples"):
        bntool.fold(model, x, samples=samples)
    with pytest.raises(InputError, match="samples"):
        bntool.verify(model, x, samples=samples, onnx=False)
    with pytest.raises(InputError, match="samples"):
        bntool.export_onnx(model, x, "unused.onnx", samples=samples)


def test_skip_pattern_matching_nothing():
    model, x = zoo.build("resnet"), zoo.example_input("resnet")
    with pytest.raises(InputError, match="'layer9.*': matches no BatchNorm layer") as info:
        bntool.fold(model, x, skip=["stem.*", "layer9.*"])
    assert "stem.1" in str(info.value)  # says which names exist
    with pytest.raises(InputError, match="not one string"):
        bntool.fold(model, x, skip="stem.1")
    _, report = bntool.fold(model, x, skip=["stem.*"])
    assert {d.name for d in report.decisions if d.reason == "skipped by request"} == {"stem.1"}


def test_cli_skip_typo(tmp_path, cli, resnet_sd):
    out = tmp_path / "out.pt"
    result = cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,32,32", "--skip", "layer1.bn9", "-o", out)
    assert_clean_error(result, contains="matches no BatchNorm layer")
    assert not out.exists()


@pytest.mark.parametrize("opset", [0, 6, 999, -1])
def test_opset_outside_the_exporters_range(tmp_path, opset):
    with pytest.raises(InputError, match="exports ONNX opsets 7 to"):
        bntool.export_onnx(zoo.build("mlp"), zoo.example_input("mlp"), tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_opset_the_dynamo_exporter_cannot_write_is_not_silently_changed(tmp_path):
    with pytest.raises(InputError, match="not the requested 9"):
        bntool.export_onnx(zoo.build("mlp"), zoo.example_input("mlp"), tmp_path / "m.onnx", exporter="dynamo",
                           opset=9, samples=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- health verdicts


def test_zero_batches_tracked_with_trained_statistics_is_healthy():
    model = zoo.build("resnet")  # randomized statistics, as after training
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.zero_()  # saved before the buffer existed, converted, or filtered
    check = check_health(model)
    assert check.passed, check.summary
    assert not any(layer.flags for layer in bntool.inspect(model).layers)


def test_statistics_at_their_initial_values_are_never_updated():
    model = zoo.build("resnet")
    model.layer1.bn1.reset_running_stats()
    model.layer1.bn1.num_batches_tracked.fill_(500)  # the counter says trained; the statistics say otherwise
    check = check_health(model)
    assert not check.passed and "layer1.bn1" in check.figures["failed"]
    assert "never updated" in check.figures["failed"]["layer1.bn1"][0]


@pytest.mark.parametrize("flags,needle", [(["--device", "banana"], "--device 'banana'"),
                                          (["--device", "meta"], "--device 'meta'"),
                                          (["--workers", "-1"], "--workers -1")])
def test_bad_recalibration_flags(tmp_path, cli, resnet_sd, flags, needle):
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 32, 32), dtype=np.float32))
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / "x.npy", *flags, "-o", out)
    assert_clean_error(result, contains=needle)
    assert not out.exists()


# ---------------------------------------------------------------- half-precision folds


def test_half_precision_fold_that_would_overflow_keeps_an_affine():
    """γ/σ = 1000 times conv weights of 100 is 1e5, past float16's 65504: folding would write inf weights
    (the old check passed it: NaN dropped out of max()). The BN becomes an exact affine instead."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(100.0)
        model[0].bias.zero_()
        model[1].running_var.fill_(1e-6 - 1e-5 + 1e-6)  # var + eps = 1e-6: scale 1/1e-3 = 1000
        model[4].running_var.fill_(0.5)
    model = model.half()
    x = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e-3).half()
    with torch.no_grad():
        reference = model(x)
    assert torch.isfinite(reference).all()  # the model itself is fine in float16
    folded, report = bntool.fold(model, x, samples=2)
    decisions = {d.name: d for d in report.decisions}
    assert decisions["1"].action == "affine" and "overflows float16" in decisions["1"].reason
    assert decisions["4"].action == "folded"  # the other BN folds as usual
    assert all(torch.isfinite(p).all() for p in folded.parameters())
    with torch.no_grad():
        out = folded(x)
    assert torch.isfinite(out).all() and report.passed
    assert float((out.double() - reference.double()).abs().max()) <= 5e-2 * float(reference.abs().max())


# ---------------------------------------------------------------- the command line


def test_usage_errors_are_one_line(cli):
    for args in (["fold", "--no-such-option"], ["fold", "x.pt", "--samples", "many", "-o", "y.pt"], ["recalibrate"]):
        result = cli(*args)
        assert_clean_error(result, contains="--help")


def test_huge_example_input_is_an_input_error(tmp_path, cli, resnet_sd):
    out = tmp_path / "out.pt"
    result = cli("fold", resnet_sd, *ARCH, "--input-shape", "1,3,100000,100000", "-o", out)
    assert_clean_error(result, contains="--input-shape 1,3,100000,100000: cannot allocate")
    assert not out.exists()


@pytest.mark.slow
def test_library_warnings_only_with_debug(tmp_path, resnet_sd):
    # A subprocess: in-process, pytest's own warning capture would swallow what --debug shows.
    (tmp_path / "noisy_arch.py").write_text(
        "import warnings\n"
        "from bntool import zoo\n"
        "def build():\n"
        "    warnings.warn('TypedStorage is deprecated', UserWarning)\n"
        "    return zoo.resnet()\n")

    def run(*args):
        return subprocess.run([PYTHON, "-m", "bntool", *args, "inspect", str(resnet_sd), "--arch", "noisy_arch:build"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    result = run()
    assert result.returncode == 0 and "TypedStorage" not in result.stderr, result.stderr
    result = run("--debug")
    assert result.returncode == 0 and "TypedStorage" in result.stderr, result.stderr


def test_demo_into_a_file(tmp_path, cli):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    assert_clean_error(cli("demo", target), contains="not a directory")
    assert target.read_text() == "mine"


# ---------------------------------------------------------------- API arguments and message wording


@pytest.mark.parametrize("call, parameter", [
    (lambda m, x: bntool.fold(m, "notatensor"), "example_inputs"),
    (lambda m, x: bntool.recalibrate(m, data=5), "data"),
    (lambda m, x: bntool.load_model("model.pt", arch=3), "arch"),
    (lambda m, x: bntool.inspect("model.pt"), "model"),
    (lambda m, x: bntool.recalibrate(m, [x], momentum="0.1"), "momentum"),
    (lambda m, x: bntool.verify(m, x, samples=1.5, onnx=False), "samples"),
    (lambda m, x: bntool.open_data(5), "source"),
])
def test_wrong_typed_api_arguments_are_input_errors_naming_the_parameter(call, parameter):
    """Were raw TypeError/AttributeError from deep inside."""
    model, x = zoo.build("resnet"), zoo.example_input("resnet")
    with pytest.raises(InputError) as info:
        call(model, x)
    assert info.value.param == parameter and str(info.value).startswith(f"{parameter}: expected "), str(info.value)


def test_the_cpu_with_an_index_is_the_cpu():
    """torch.device("cpu", 0) (what `torch.device(kind, local_rank)` gives) was refused."""
    model = zoo.build("resnet")
    report = bntool.recalibrate(model, [zoo.example_input("resnet")], device=torch.device("cpu", 0))
    assert report.samples == 2 and next(model.parameters()).device == torch.device("cpu")


def test_counts_and_articles_read_as_english(tmp_path, monkeypatch):
    sd = zoo.build("resnet").state_dict()
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "m.pt")
    with pytest.raises(InputError, match=r"1 missing key \(fc.bias\)"):
        bntool.load_model(tmp_path / "m.pt", arch="bntool.zoo:resnet")
    _module_in(tmp_path, monkeypatch, "intloader", "def make():\n    return 3\n")
    with pytest.raises(InputError, match="returned an int, not an iterable"):
        bntool.open_data(loader="intloader:make")
    from bntool.data import resolve_preprocessing

    with pytest.raises(InputError, match="has 3 values, but input_shape has 1 channel: give one value per channel"):
        resolve_preprocessing(bntool.ImageOptions(mean=(0.5, 0.5, 0.5)), input_shape=(1, 1, 28, 28))


def test_an_input_key_that_is_not_there_says_which_keys_are():
    """`--input-key nope` was told to name the input with --input-key."""
    from bntool.data import first_input

    with pytest.raises(InputError) as info:
        first_input({"pixels": torch.zeros(1), "label": torch.zeros(1)}, input_key="nope")
    assert str(info.value) == "input_key 'nope': the batch is a dict without it; its keys are ['label', 'pixels']"


def test_error_lines_carry_no_terminal_escapes():
    """torch.export colours its errors (`\x1b[96mThis is step 1/3\x1b[0m`): an `error:` line is plain text."""
    from bntool.errors import first_line
    from bntool.onnx_check import error_line

    e = RuntimeError("Failed to export the model. \x1b[96mThis is step 1/3\x1b[0m of exporting.\nNext steps")
    assert first_line(e) == "Failed to export the model. This is step 1/3 of exporting."
    assert error_line(e) == "RuntimeError: Failed to export the model. This is step 1/3 of exporting."
