"""--device on every command that runs the model; the library runs where it is asked and puts the model back.

No GPU here: device-correct surgery is checked on the meta device (a tensor created on the CPU next to a meta
one fails exactly as it would next to a CUDA one), and the CUDA tests run where a GPU is present.
"""

from __future__ import annotations

import copy
import json
from xml.etree import ElementTree as ET

import numpy as np
import pytest
import torch
from helpers import assert_clean_error

from bntool import InputError, fold, inspect, load_model, zoo
from bntool.compare import random_like, random_stream
from bntool.devices import Placement, moved_to, resolve_device
from bntool.folding import apply_fold_plan, plan_fold
from bntool.layout import layout_of

ARCH = ["--arch", "bntool.zoo:resnet"]
SHAPE = ["--input-shape", "2,3,32,32"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def command_args(command: str, ckpt, tmp_path) -> list:
    """A working invocation of `command` on the saved ResNet, writing into tmp_path."""
    out = {"fold": ["-o", tmp_path / "out.pt"], "export-onnx": ["-o", tmp_path / "out.onnx", "--samples", "1"],
           "recalibrate": ["-o", tmp_path / "out.pt"], "verify": ["--samples", "1"], "inspect": []}[command]
    if command == "recalibrate":
        np.save(tmp_path / "x.npy", zoo.example_input("resnet").repeat(4, 1, 1, 1).numpy())
        return [command, ckpt, *ARCH, "--data", tmp_path / "x.npy", *out]
    return [command, ckpt, *ARCH, *SHAPE, *out]


COMMANDS = ["inspect", "fold", "recalibrate", "export-onnx", "verify"]


# ---------------------------------------------------------------- the flag


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_that_runs_the_model_takes_device_cpu(cli, resnet_sd, tmp_path, command):
    result = cli(*command_args(command, resnet_sd, tmp_path), "--device", "cpu", "--json")
    assert result.code == 0, result.err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device, needle", [
    ("gpu", "--device 'gpu': expected cpu, cuda, cuda:N (e.g. cuda:1) or mps"),
    ("cuda:x", "--device 'cuda:x': expected"),
    ("meta", "--device 'meta': expected"),
])
def test_a_device_that_is_no_device_is_exit_2_listing_the_accepted_values(cli, resnet_sd, tmp_path, command, device,
                                                                         needle):
    assert_clean_error(cli(*command_args(command, resnet_sd, tmp_path), "--device", device), contains=needle)
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(CUDA, reason="a GPU is present")
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_without_a_gpu_is_exit_2_before_any_work(cli, resnet_sd, tmp_path, command):
    result = cli(*command_args(command, resnet_sd, tmp_path), "--device", "cuda:1")
    assert_clean_error(result, contains="--device cuda:1: CUDA is not available")
    assert "--device cpu" in result.err
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(CUDA, reason="a GPU is present")
def test_verify_that_cannot_use_the_device_still_writes_the_junit_report(cli, resnet_sd, tmp_path):
    junit = tmp_path / "verify.xml"
    result = cli(*command_args("verify", resnet_sd, tmp_path), "--device", "cuda", "--junit-xml", junit)
    assert_clean_error(result, contains="CUDA is not available")
    error = ET.parse(junit).getroot().find(".//error")
    assert error is not None and "--device cuda" in error.get("message")


def test_resolve_device_names_what_this_machine_lacks():
    assert resolve_device(" cpu ") == torch.device("cpu")
    with pytest.raises(InputError, match="expected cpu, cuda"):
        resolve_device("cuda:-1")
    if not torch.backends.mps.is_available():
        with pytest.raises(InputError, match="MPS is not available"):
            resolve_device("mps")
    if CUDA:
        with pytest.raises(InputError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


# ---------------------------------------------------------------- the library


def test_placement_puts_back_the_same_tensor_objects_with_what_the_job_wrote():
    model = zoo.build("resnet")
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    pointers = {n: t.data_ptr() for n, t in before.items()}
    placement = Placement(model)
    model.to(memory_format=torch.channels_last)  # moves storage, as a device change does
    bn = model.stem[1]
    bn.running_mean = torch.full_like(bn.running_mean, 7.0)  # the job's result, in a moved copy of the buffer
    placement.restore()
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(after[n] is t and t.data_ptr() == pointers[n] for n, t in before.items())
    assert (before["stem.1.running_mean"] == 7.0).all()


def test_moved_to_the_device_the_model_is_on_moves_nothing():
    model = zoo.build("resnet")
    weight = next(model.parameters())
    with moved_to(model, "cpu") as dev:
        assert dev == torch.device("cpu") and next(model.parameters()) is weight
    with moved_to(model, None) as dev:
        assert dev == torch.device("cpu")


def test_placement_restores_after_an_error():
    model = zoo.build("resnet")
    weight = next(p for p in model.parameters() if p.dim() == 4)
    placement = Placement(model)
    try:
        model.to(memory_format=torch.channels_last)
        raise RuntimeError("interrupted")
    except RuntimeError:
        placement.restore()
    assert next(p for p in model.parameters() if p.dim() == 4) is weight and weight.is_contiguous()


def test_fold_with_device_returns_the_copy_where_the_model_was_and_leaves_the_model_alone():
    model = zoo.build("resnet").eval()
    x = zoo.example_input("resnet")
    state = copy.deepcopy(model.state_dict())
    folded, report = fold(model, x, device="cpu", samples=2)
    again, _ = fold(model, x, samples=2)
    assert report.passed
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(folded.state_dict().values(), again.state_dict().values()))
    assert layout_of(folded) == layout_of(again)


def test_inspect_with_device_plans_the_same_fold():
    model = zoo.build("mobilenet").eval()
    x = zoo.example_input("mobilenet")
    here, there = inspect(model, x), inspect(model, x, device="cpu")
    assert [(r.name, r.fold_action, r.fold_target) for r in here.layers] == \
           [(r.name, r.fold_action, r.fold_target) for r in there.layers]


def test_random_check_inputs_are_made_on_the_examples_device_and_the_same_on_every_device():
    x = torch.zeros(2, 3, 4, 4)
    on_cpu = random_like((x,), random_stream(3))[0]
    on_meta = random_like((x.to("meta"),), random_stream(3))[0]
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
    assert torch.equal(on_cpu, random_like((x,), random_stream(3))[0])


@pytest.mark.parametrize("name", [n for n in zoo.ZOO if n != "nobn"])
def test_fold_surgery_creates_every_tensor_on_the_models_device(name):
    """Plan on the CPU, apply to a meta-device copy, run it: a scale, bias or replacement module made on the CPU
    fails here as it would on a GPU."""
    model = zoo.build(name).eval()
    x = zoo.example_input(name)
    plan = plan_fold(model, (x,))
    on_meta = copy.deepcopy(model).to("meta")
    apply_fold_plan(on_meta, plan)
    devices = {t.device.type for t in [*on_meta.parameters(), *on_meta.buffers()]}
    assert devices == {"meta"}, devices
    assert on_meta(x.to("meta")).device.type == "meta"


def test_a_fold_layout_rebuilds_on_the_architectures_device():
    model = zoo.build("resnet").eval()
    folded, _ = fold(model, zoo.example_input("resnet"))
    with torch.device("meta"):
        empty = zoo.resnet()
    layout_of(folded).apply(empty)
    assert {t.device.type for t in [*empty.parameters(), *empty.buffers()]} == {"meta"}


# ---------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_on_cuda(cli, resnet_sd, tmp_path, command):
    result = cli(*command_args(command, resnet_sd, tmp_path), "--device", "cuda", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)
    written = tmp_path / "out.pt"
    if written.exists():  # the file loads on a machine without a GPU: every tensor was saved from the CPU
        sd = torch.load(written, map_location=None, weights_only=True)
        assert {t.device.type for t in sd.values()} == {"cpu"}
        load_model(written, arch="bntool.zoo:resnet")


@needs_cuda
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "preact", "shared", "subclass", "tokens"])
def test_fold_on_cuda_matches_the_fold_on_cpu(name):
    model = zoo.build(name).eval()
    x = zoo.example_input(name)
    on_cpu, _ = fold(model, x, samples=2)
    on_gpu, report = fold(model, x, samples=2, device="cuda")
    assert report.passed
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cpu"}
    assert next(model.parameters()).device.type == "cpu"
    # The same float64 math on another device: equal up to the last bit of the cast weights.
    for (k, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7, msg=k)


@needs_cuda
def test_fold_of_a_model_already_on_cuda_stays_there():
    model = zoo.build("resnet").eval().cuda()
    folded, report = fold(model, zoo.example_input("resnet").cuda(), samples=2)
    assert report.passed and next(folded.parameters()).is_cuda


@pytest.mark.parametrize("device", ["cuda:01", "cuda:00", "cuda:99999999999999999999", "cuda:١"])
def test_device_indexes_torch_would_reject_are_exit_2(cli, resnet_sd, tmp_path, device):
    result = cli(*command_args("fold", resnet_sd, tmp_path), "--device", device)
    assert_clean_error(result, contains=f"--device {device!r}: expected cpu, cuda")
    with pytest.raises(InputError):
        fold(zoo.build("resnet"), zoo.example_input("resnet"), device=device)


@pytest.mark.parametrize("job", ["verify", "export_onnx", "fold", "inspect"])
def test_a_model_in_training_mode_stays_in_training_mode(job, tmp_path):
    import bntool

    model = zoo.build("resnet").train()
    x = zoo.example_input("resnet")
    kwargs = {"verify": dict(exporter="legacy", samples=1), "export_onnx": dict(path=tmp_path / "m.onnx", samples=1,
                                                                                exporter="legacy", check=False),
              "fold": dict(check=False), "inspect": {}}[job]
    getattr(bntool, job)(model, x, device="cpu", **kwargs)
    assert all(m.training for m in model.modules())
