"""Recalibration: exact pooled statistics, eval-mode semantics, batch-size independence, clean failures."""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import pytest
import torch
from helpers import assert_clean_error
from torch import nn

from bntool import fold, zoo
from bntool.errors import InputError
from bntool.layers import bn_modules
from bntool.recalibration import ChannelStats, recalibrate


def bn_stats(model):
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return torch.cat([b.running_mean for b in bns]), torch.cat([b.running_var for b in bns])


def rel_diff(a, b):
    (ma, va), (mb, vb) = a, b
    return max(float(((ma - mb).abs() / vb.sqrt()).max()), float(((va - vb).abs() / vb).max()))


def data_for(name, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *zoo.ZOO[name].input_shape[1:]), generator=g) * 1.5 + 0.3


def test_chan_merge_matches_two_pass_float64():
    x = torch.randn(1000, 3, dtype=torch.float64) * 5 + 1e4  # large mean: naive sum of squares would cancel
    acc = ChannelStats(3, torch.device("cpu"))
    for chunk in x.split(37):
        acc.add(len(chunk), chunk.mean(0), ((chunk - chunk.mean(0)) ** 2).sum(0))
    assert torch.allclose(acc.mean, x.mean(0), rtol=1e-12)
    assert torch.allclose(acc.unbiased_var, x.var(0), rtol=1e-9)


def test_cumulative_is_the_pooled_average_over_all_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    data = torch.randn(50, 3, 8, 8) * 2 + 1
    recalibrate(model, list(data.split(7)), mode="cumulative")  # uneven batches: 7, 7, ..., 1
    with torch.no_grad():
        y = model[0](data).double()
    expected_mean, expected_var = y.mean((0, 2, 3)), y.transpose(0, 1).reshape(4, -1).var(1)
    assert torch.allclose(model[1].running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[1].running_var.double(), expected_var, rtol=1e-5)


def test_cumulative_is_independent_of_batch_order():
    model = zoo.build("resnet")
    batches = list(data_for("resnet").split(16))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate(a, batches, mode="cumulative")
    recalibrate(b, batches[::-1], mode="cumulative")
    assert rel_diff(bn_stats(a), bn_stats(b)) < 1e-5


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "tokens", "subclass", "mlp", "reused"])
def test_exact_mode_is_batch_size_independent_and_exact(name):
    data = data_for(name)
    results = {}
    for bs in (1, 64):
        model = zoo.build(name)
        report = recalibrate(model, list(data.split(bs)), mode="exact")
        results[bs] = bn_stats(model)
    assert rel_diff(results[1], results[64]) < 1e-5
    # Exactness: in eval mode, every BN input is normalized over the data by the stored statistics.
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, []).append(a[0].double()))
               for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        model(data)
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    for n, xs in inputs.items():
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1)
        bn = modules[n]
        assert torch.allclose(flat.mean(1), bn.running_mean.double(), atol=1e-5 * float(bn.running_var.max()) ** 0.5)
        assert torch.allclose(flat.var(1), bn.running_var.double(), rtol=1e-4)
    assert report.passes >= 2


def test_train_mode_recalibration_degrades_at_batch_size_one_but_exact_does_not():
    g = torch.Generator().manual_seed(0)
    # Samples differ in brightness and contrast, as real images do: per-sample batch statistics are biased.
    data = data_for("resnet") * (torch.rand(64, 1, 1, 1, generator=g) * 1.5 + 0.5) + torch.randn(64, 1, 1, 1,
                                                                                               generator=g)
    exact_big = zoo.build("resnet")
    recalibrate(exact_big, list(data.split(64)), mode="exact")
    cumulative_small = zoo.build("resnet")
    recalibrate(cumulative_small, list(data.split(1)), mode="cumulative")
    assert rel_diff(bn_stats(cumulative_small), bn_stats(exact_big)) > 0.1
    exact_small = zoo.build("resnet")
    recalibrate(exact_small, list(data.split(1)), mode="exact")
    assert rel_diff(bn_stats(exact_small), bn_stats(exact_big)) < 1e-5


def test_ema_mode_matches_training_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    batches = list((torch.randn(40, 3, 6, 6) + 2).split(10))
    expected_mean, expected_var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            y = model[0](b).double()
            expected_mean = 0.7 * expected_mean + 0.3 * y.mean((0, 2, 3))
            expected_var = 0.7 * expected_var + 0.3 * y.transpose(0, 1).reshape(4, -1).var(1)
    report = recalibrate(model, batches, mode="ema", momentum=0.3, reset=True)
    assert [layer.samples for layer in report.layers] == [40 * 4 * 4]  # values per channel it saw (was 0)
    assert torch.allclose(model[1].running_mean.double(), expected_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model[1].running_var.double(), expected_var, rtol=1e-5)
    assert model[1].momentum == 0.1  # restored


class DropoutBeforeBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.drop(self.fc(x)))


def test_only_bn_layers_train_unlike_update_bn():
    torch.manual_seed(0)
    data = torch.randn(512, 8)
    ours, theirs = DropoutBeforeBN(), DropoutBeforeBN()
    theirs.load_state_dict(ours.state_dict())
    recalibrate(ours, list(data.split(64)))
    torch.optim.swa_utils.update_bn(list(data.split(64)), theirs)
    with torch.no_grad():
        clean = ours.fc(data)
    assert torch.allclose(ours.bn.running_var, clean.var(0), rtol=1e-4)  # dropout stayed off
    # update_bn ran dropout: the variance it stored is far from the inference-time variance.
    assert float((theirs.bn.running_var / clean.var(0)).mean()) > 1.5
    assert ours.training and ours.drop.training and ours.bn.training  # modes restored as they were given


def test_amp_and_channels_last_run():
    model = zoo.build("resnet")
    report = recalibrate(model, list(data_for("resnet").split(16)), amp=True, channels_last=True)
    assert report.samples == 64 and torch.isfinite(bn_stats(model)[1]).all()


def test_errors_restore_the_model():
    model = zoo.build("resnet")
    before = copy.deepcopy(model.state_dict())

    def batches():
        yield data_for("resnet", 8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recalibrate(model, batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m.training for m in model.modules())


def test_api_errors():
    with pytest.raises(InputError, match="no BatchNorm"):
        recalibrate(zoo.build("nobn"), [torch.randn(2, 3, 16, 16)])
    with pytest.raises(InputError, match="re-iterable"):
        recalibrate(zoo.build("resnet"), (x for x in [torch.randn(2, 3, 32, 32)]), mode="exact")
    with pytest.raises(InputError, match="^mode 'fast'") as e:
        recalibrate(zoo.build("resnet"), [torch.randn(2, 3, 32, 32)], mode="fast")
    assert e.value.param == "mode" and e.value.render(lambda p: f"--{p}").startswith("--mode 'fast'")
    with pytest.raises(InputError, match="^momentum 2") as e:
        recalibrate(zoo.build("resnet"), [torch.randn(2, 3, 32, 32)], mode="ema", momentum=2)
    assert e.value.param == "momentum"
    with pytest.raises(InputError, match="batch 1 holds 1 sample, one value per channel"):
        recalibrate(zoo.build("mlp"), [torch.randn(1, 20)])
    with pytest.raises(InputError, match="batch 2 holds 1 sample \\(a short last batch") as e:  # 11 + 1
        recalibrate(zoo.build("mlp"), list(torch.randn(12, 20).split(11)))
    assert e.value.param is None and "so that no batch holds a single sample" in str(e.value)


# ---------------------------------------------------------------- CLI and data sources


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        arr = (rng.random((40 + i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"img{i}.{['png', 'jpg', 'webp'][i % 3]}")
    return folder


ARCH = ["--arch", "bntool.zoo:resnet"]


def test_cli_image_folder(tmp_path, cli, resnet_sd, images):
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", images, "--image-size", "32", "-b", "4", "--workers",
                 "0", "-o", out, "--json")
    assert result.code == 0, result.err
    assert "skipped 1 unreadable image (first" in result.err
    (images / "sub" / "broken2.png").write_bytes(b"\x89PNG truncated")
    exact = cli("recalibrate", resnet_sd, *ARCH, "--data", images, "--image-size", "32", "-b", "4", "--workers",
                "0", "-o", tmp_path / "exact.pt", "--mode", "exact", "--json")
    assert exact.code == 0, exact.err
    assert json.loads(exact.out)["passes"] > 2 and "skipped 2 unreadable images" in exact.err  # not 2 × passes
    (images / "sub" / "broken2.png").unlink()
    report = json.loads(result.out)
    assert report["samples"] == 10 and report["mode"] == "cumulative"
    assert out.exists()
    strict = cli("recalibrate", resnet_sd, *ARCH, "--data", images, "--image-size", "32", "-b", "4", "--workers",
                 "0", "-o", tmp_path / "strict.pt", "--strict")
    assert_clean_error(strict, contains="broken.jpg")
    assert not (tmp_path / "strict.pt").exists()


def test_cli_tensor_files_and_modes(tmp_path, cli, resnet_sd):
    arr = np.random.default_rng(0).standard_normal((20, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    np.savez(tmp_path / "x.npz", images=arr, labels=np.arange(20))
    torch.save((torch.from_numpy(arr), torch.arange(20)), tmp_path / "x.pt")
    outputs = []
    for i, (source, extra) in enumerate([("x.npy", []), ("x.npz", ["--npz-key", "images"]), ("x.pt", [])]):
        out = tmp_path / f"out{i}.pt"
        result = cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / source, *extra, "-o", out, "--quiet")
        assert result.code == 0, result.err
        outputs.append(torch.load(out))
    assert all(torch.equal(outputs[0][k], o[k]) for o in outputs[1:] for k in outputs[0])
    assert_clean_error(cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / "x.npz", "-o", tmp_path / "o.pt"),
                       contains="--npz-key")
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / "x.npy", "-o", tmp_path / "exact.pt",
                 "--mode", "exact", "-b", "3", "--cache-budget", "1M")
    assert result.code == 0 and " passes, " in result.out and "pass(es)" not in result.out
    assert "segment replays" in result.out and "of 1 MiB" in result.out, result.out
    # A prior of 1e12 source samples against 20 target samples keeps the checkpoint's statistics.
    result = cli("recalibrate", resnet_sd, *ARCH, "--data", tmp_path / "x.npy", "-o", tmp_path / "prior.pt",
                 "--prior", "1e12", "--quiet")
    assert result.code == 0, result.err
    before, after = torch.load(resnet_sd), torch.load(tmp_path / "prior.pt")
    assert all(torch.allclose(before[k], after[k], rtol=1e-6, atol=1e-7) for k in before if "running" in k)
    assert not torch.allclose(outputs[0]["stem.1.running_var"], before["stem.1.running_var"], rtol=1e-3)


def write_loader_module(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "my_loader.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_loader", None)
    return "my_loader:batches"


def test_cli_user_loader_with_dict_batches(tmp_path, cli, resnet_sd, monkeypatch):
    spec = write_loader_module(tmp_path, monkeypatch, (
        "import torch\n"
        "def batches(n=3):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return [{'pixels': torch.randn(4, 3, 32, 32, generator=g), 'label': 0} for _ in range(n)]\n"))
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--loader", spec, "--loader-kwargs", '{"n": 2}', "--input-key",
                 "pixels", "-o", out, "--json")
    assert result.code == 0, result.err
    assert '"samples": 8' in result.out


@pytest.mark.parametrize("case", ["empty_folder", "shape", "nan", "no_bn", "loader", "cuda", "overflow", "missing",
                                  "budget"])
def test_cli_bad_input(tmp_path, cli, resnet_sd, case, monkeypatch):
    out = tmp_path / "out.pt"
    ckpt, arch, data = resnet_sd, ARCH, ["--data", tmp_path / "x.npy"]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    needle = None
    if case == "empty_folder":
        (tmp_path / "empty").mkdir()
        data, needle = ["--data", tmp_path / "empty"], "no images found"
    elif case == "shape":
        x, needle = x[:, :2], "forward on calibration batch 1 of shape (4, 2, 32, 32) failed"
    elif case == "nan":
        x[1, 0, 0, 0], needle = np.nan, "--data: calibration batch 1 contains NaN"
    elif case == "no_bn":
        ckpt = tmp_path / "nobn.pt"
        torch.save(zoo.build("nobn").state_dict(), ckpt)
        arch, needle = ["--arch", "bntool.zoo:NoBN"], "no BatchNorm"
    elif case == "loader":
        data, needle = ["--loader", "no_such_module_abc:load"], "cannot import module"
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        data, needle = data + ["--device", "cuda"], "CUDA is not available"
    elif case == "overflow":
        x, needle = x * 1e25, "NaN/Inf"
    elif case == "missing":
        data, needle = ["--data", tmp_path / "nope.npy"], "no such file"
    elif case == "budget":
        data, needle = data + ["--mode", "exact", "--cache-budget", "lots"], "--cache-budget 'lots'"
    np.save(tmp_path / "x.npy", x)
    result = cli("recalibrate", ckpt, *arch, *data, "-o", out)
    assert_clean_error(result, contains=needle)
    assert not out.exists()


def test_cli_ctrl_c_writes_nothing(tmp_path, cli, resnet_sd, monkeypatch):
    spec = write_loader_module(tmp_path, monkeypatch, (
        "import torch\n"
        "def batches():\n"
        "    yield torch.randn(4, 3, 32, 32)\n"
        "    raise KeyboardInterrupt\n"))
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--loader", spec, "-o", out)
    assert result.code == 130 and "nothing written" in result.err
    assert not out.exists() and not any(p.name.startswith(".out.pt") for p in tmp_path.iterdir())


def test_cli_ctrl_c_swallowed_on_the_way_still_writes_nothing(tmp_path, cli, resnet_sd, monkeypatch):
    """A real SIGINT whose KeyboardInterrupt the code it lands in drops (as CPython drops one raised in the at-fork
    hook a DataLoader worker's fork runs: "Exception ignored in …"): the run went on, wrote -o and exited 0."""
    spec = write_loader_module(tmp_path, monkeypatch, (
        "import os, signal, torch\n"
        "def batches():\n"
        "    try:\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "    except KeyboardInterrupt:\n"
        "        pass  # swallowed\n"
        "    Half()  # a half-built object whose __del__ fails, as a DataLoader iterator's does then\n"
        "    for _ in range(20):\n"
        "        SEEN.append(1)\n"
        "        yield torch.randn(4, 3, 32, 32)\n"
        "SEEN = []\n"
        "class Half:\n"
        "    def __del__(self):\n"
        "        raise AttributeError('no _workers_status')\n"))
    out = tmp_path / "out.pt"
    result = cli("recalibrate", resnet_sd, *ARCH, "--loader", spec, "-o", out)
    assert result.code == 130 and "interrupted: nothing written" in result.err, (result.code, result.err)
    assert len(sys.modules["my_loader"].SEEN) <= 2  # stopped at the next batch, not after the whole run
    # In a process of its own (pytest catches "Exception ignored" itself): one line on stderr, no traceback.
    import subprocess

    from helpers import PYTHON, ROOT

    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}")
    run = subprocess.run([PYTHON, "-m", "bntool", "recalibrate", str(resnet_sd), *ARCH, "--loader", spec, "-o",
                          str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 130 and run.stderr.strip() == "interrupted: nothing written", run.stderr
    assert not out.exists() and not any(p.name.startswith(".out.pt") for p in tmp_path.iterdir())


def test_cli_ctrl_c_turned_into_another_error_is_still_an_interrupt(tmp_path, cli, resnet_sd, monkeypatch):
    """A SIGINT that code turns into another exception (pybind11 makes the KeyboardInterrupt of a Ctrl-C during
    `import onnxruntime` an ImportError): exit 130, not 3 ("internal error … a bug")."""
    spec = write_loader_module(tmp_path, monkeypatch, (
        "import signal, torch\n"
        "def batches():\n"
        "    try:\n"
        "        signal.raise_signal(signal.SIGINT)\n"
        "    except KeyboardInterrupt:\n"
        "        raise ImportError('initialization failed') from None\n"
        "    yield torch.randn(4, 3, 32, 32)\n"))
    result = cli("recalibrate", resnet_sd, *ARCH, "--loader", spec, "-o", tmp_path / "out.pt")
    assert result.code == 130 and "interrupted: nothing written" in result.err, (result.code, result.err)


def test_cli_keeps_an_ignored_sigint_ignored(tmp_path, cli, resnet_sd, monkeypatch):
    """A run started with SIGINT ignored (trap '' INT, a background job of a script) goes on through a SIGINT."""
    import signal

    spec = write_loader_module(tmp_path, monkeypatch, (
        "import signal, torch\n"
        "def batches():\n"
        "    signal.raise_signal(signal.SIGINT)\n"
        "    yield torch.randn(4, 3, 32, 32)\n"))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = cli("recalibrate", resnet_sd, *ARCH, "--loader", spec, "-o", tmp_path / "out.pt")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.code == 0 and (tmp_path / "out.pt").exists(), result.err


# ---------------------------------------------------------------- BN subclasses with children of their own


class BatchNormAct2d(nn.BatchNorm2d):
    """A replica of timm.layers.BatchNormAct2d (norm_act.py): the BN subclass carries its own drop layer and
    activation as child modules and applies them after the normalization."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        x = torch.nn.functional.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        return self.act(self.drop(x))


class DropPath(nn.Module):
    """Stochastic depth as timm.layers.DropPath: zero whole samples in training, identity in eval."""

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class BatchNormDropPath(nn.BatchNorm2d):
    """A BN subclass with a drop-path child applied to its output."""

    def __init__(self, num_features, drop_path=None):
        super().__init__(num_features)
        self.drop_path = drop_path if drop_path is not None else nn.Identity()

    def forward(self, x):
        return self.drop_path(super().forward(x))


def two_layer_net(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), norm, nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()


@pytest.mark.parametrize("mode", ["cumulative", "ema", "exact"])
@pytest.mark.parametrize("kind", ["dropout", "drop_path"])
def test_bn_subclass_children_stay_in_eval_mode(mode, kind):
    import functools

    if kind == "dropout":
        with_drop = two_layer_net(BatchNormAct2d(8, drop_layer=functools.partial(nn.Dropout, 0.5)))
        without = two_layer_net(BatchNormAct2d(8))
    else:
        with_drop = two_layer_net(BatchNormDropPath(8, DropPath(0.5)))
        without = two_layer_net(BatchNormDropPath(8))
    assert all(torch.equal(a, b) for a, b in zip(with_drop.state_dict().values(), without.state_dict().values()))
    data = list((torch.randn(64, 3, 10, 10, generator=torch.Generator().manual_seed(1)) + 0.5).split(16))
    torch.manual_seed(2)
    recalibrate(with_drop, data, mode=mode)
    recalibrate(without, data, mode=mode)
    # Independent reference for the statistic the drop layer would corrupt: the second BN's input is the eval-mode
    # network's activation, whatever the mode (cumulative and exact pool it; ema averages it per batch).
    for a, b in zip(bn_stats(with_drop), bn_stats(without)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a - b).abs().max()
    if mode == "exact":
        with torch.no_grad():
            second = without[2](without[1](without[0](torch.cat(data))))
        assert torch.allclose(without[3].running_var, second.var((0, 2, 3)), rtol=1e-4)
    assert not any(m.training for m in with_drop.modules())  # modes restored


# ---------------------------------------------------------------- broken statistics, unreached layers


@pytest.mark.parametrize("mode", ["cumulative", "ema", "exact"])
def test_nan_and_inf_statistics_are_repaired_in_every_mode(mode):
    data = list(data_for("resnet").split(16))
    clean, broken = zoo.build("resnet"), zoo.build("resnet")
    bns = [m for m in broken.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].running_var[0] = float("nan")
    bns[1].running_mean[:] = float("inf")
    bns[-1].running_var[:] = float("nan")
    recalibrate(clean, data, mode=mode)
    report = recalibrate(broken, data, mode=mode)
    assert torch.isfinite(bn_stats(broken)[1]).all() and not any(layer.skipped for layer in report.layers)
    assert rel_diff(bn_stats(broken), bn_stats(clean)) < 1e-6


class Gated(nn.Module):
    """A BN on a branch that only runs for inputs with a positive mean: not reached by negative data."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn, self.side = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.side(y) if float(x.mean()) > 0 else y


@pytest.mark.parametrize("mode", ["cumulative", "exact"])
def test_a_bn_no_batch_reaches_keeps_its_statistics(mode):
    model = Gated().eval()
    model.side.running_mean.fill_(0.25)
    report = recalibrate(model, [torch.randn(8, 3, 6, 6) - 3], mode=mode)
    assert torch.all(model.side.running_mean == 0.25) and torch.all(model.side.running_var == 1)
    assert "no calibration batch reached it" in report.layers[1].skipped and not report.layers[0].skipped


@pytest.mark.parametrize("mode", ["cumulative", "exact"])
def test_device_and_memory_format_are_put_back(mode):
    model = zoo.build("resnet")
    expected = copy.deepcopy(model)
    recalibrate(expected, list(data_for("resnet").split(16)), mode=mode)
    params = {n: (p, p.data_ptr(), p.stride()) for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    recalibrate(model, list(data_for("resnet").split(16)), mode=mode, channels_last=True, device="cpu")
    for n, p in model.named_parameters():
        assert p is params[n][0] and p.data_ptr() == params[n][1] and p.stride() == params[n][2], n
    for n, b in model.named_buffers():
        assert b is buffers[n] and b.is_contiguous(), n
    assert rel_diff(bn_stats(model), bn_stats(expected)) < 1e-5  # the new statistics are in the original buffers


# ---------------------------------------------------------------- exact mode's segment cache


def exact_stats(model, batches, **kwargs):
    report = recalibrate(model, batches, mode="exact", **kwargs)
    return bn_stats(model), report


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "reused", "conv1d", "decoder", "subclass"])
def test_segment_cache_gives_the_statistics_of_whole_forwards(name):
    data = list(data_for(name, 32).split(8))
    plain, plain_report = exact_stats(zoo.build(name), data, cache_budget=0)
    cached, report = exact_stats(zoo.build(name), data)
    assert plain_report.segment_replays == 0 and report.passes == plain_report.passes
    assert rel_diff(cached, plain) < 1e-6
    if name in ("resnet", "mobilenet"):
        assert report.segment_replays > report.passes and report.cache_peak_bytes > 0


def test_segment_cache_over_budget_falls_back_to_recomputing():
    data = list(data_for("mobilenet", 32).split(8))
    plain, _ = exact_stats(zoo.build("mobilenet"), data, cache_budget=0)
    _, free = exact_stats(zoo.build("mobilenet"), data)
    tight, report = exact_stats(zoo.build("mobilenet"), data, cache_budget=free.cache_peak_bytes // 3)
    assert report.cache_over_budget > 0 and 0 < report.cache_peak_bytes <= free.cache_peak_bytes // 3
    assert 0 < report.segment_replays < free.segment_replays
    assert rel_diff(tight, plain) < 1e-6


class Reshuffling:
    """A re-iterable whose batches come in another order each time, as from a shuffling DataLoader."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def __iter__(self):
        self.epoch += 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.epoch))
        return iter([self.batches[i] for i in order])


def test_segment_cache_switches_off_when_the_batches_change_between_passes():
    data = list(data_for("resnet", 32).split(8))
    plain, _ = exact_stats(zoo.build("resnet"), data, cache_budget=0)
    shuffled, report = exact_stats(zoo.build("resnet"), Reshuffling(data))
    assert "differs between passes" in report.cache_note
    assert rel_diff(shuffled, plain) < 1e-6  # exact statistics do not depend on the order of the batches


class MutatesAfterUse(nn.Module):
    """Changes a chain's (cached) output in place after one BN has read it: a later pass must not reuse it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.bn_a, self.bn_b, self.bn_c = nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.conv, self.conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.features(x)
        a = self.bn_a(y)
        y.mul_(3)  # in place, on what the cache handed out (the passes for bn_b and bn_c both start from y)
        return self.bn_c(self.conv2(self.bn_b(self.conv(y + a))))


def test_segment_cache_never_reuses_a_tensor_changed_in_place():
    data = list((torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 1).split(8))
    torch.manual_seed(0)
    model = MutatesAfterUse().eval()
    plain, cached = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate(plain, data, mode="exact", cache_budget=0)
    report = recalibrate(cached, data, mode="exact")
    assert report.segment_replays > 0
    assert rel_diff(bn_stats(cached), bn_stats(plain)) < 1e-6
    with torch.no_grad():  # independent reference for the last BN: its input's statistics under final statistics
        x = torch.cat(data)
        y = plain.features(x)
        z = plain.conv2(plain.bn_b(plain.conv(y * 3 + plain.bn_a(y))))
    assert torch.allclose(cached.bn_c.running_var, z.var((0, 2, 3)), rtol=1e-4)


# ---------------------------------------------------------------- the source statistics as a prior


def blended(source_mean, source_var, target, big_n, n):
    """The formula of Schneider et al. 2020 on a float64 target activation (channels on axis 1)."""
    flat = target.double().transpose(0, 1).reshape(target.shape[1], -1)
    return ((big_n * source_mean.double() + n * flat.mean(1)) / (big_n + n),
            (big_n * source_var.double() + n * flat.var(1)) / (big_n + n))


@pytest.mark.parametrize("mode", ["cumulative", "exact"])
def test_prior_blends_source_and_target_statistics(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model.eval()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    source = copy.deepcopy(model)
    data = torch.randn(12, 3, 8, 8) * 2 + 1
    report = recalibrate(model, list(data.split(5)), mode=mode, prior=16)
    assert report.prior == 16
    with torch.no_grad():
        h = source[0](data)
        mean1, var1 = blended(source[1].running_mean, source[1].running_var, h, 16, 12)
        assert torch.allclose(model[1].running_mean.double(), mean1, atol=1e-6)
        assert torch.allclose(model[1].running_var.double(), var1, rtol=1e-5)
        if mode == "exact":  # the second level is measured under the blended first level, as inference will see it
            source[1].running_mean.copy_(mean1)
            source[1].running_var.copy_(var1)
            mean2, var2 = blended(source[4].running_mean, source[4].running_var, source[:4](data), 16, 12)
            assert torch.allclose(model[4].running_mean.double(), mean2, atol=1e-6)
            assert torch.allclose(model[4].running_var.double(), var2, rtol=1e-5)


def test_prior_zero_is_off_and_bad_priors_are_input_errors():
    data = list(data_for("resnet", 16).split(8))
    a, b = zoo.build("resnet"), zoo.build("resnet")
    recalibrate(a, data, prior=0)
    recalibrate(b, data)
    assert rel_diff(bn_stats(a), bn_stats(b)) == 0
    for bad, mode in [(-1, "cumulative"), (float("nan"), "exact"), (4, "ema")]:
        with pytest.raises(InputError, match="prior"):
            recalibrate(zoo.build("resnet"), data, mode=mode, prior=bad)
    broken = zoo.build("resnet")
    next(m for m in broken.modules() if isinstance(m, nn.BatchNorm2d)).running_var[0] = float("nan")
    with pytest.raises(InputError, match="no source to blend with"):
        recalibrate(broken, data, prior=8)


def test_a_trained_models_batch_count_is_kept_and_a_fresh_one_gets_the_calibration_batches():
    data = list(data_for("resnet").split(16))
    trained = zoo.build("resnet")  # randomize_bn marks its statistics as 100 batches old
    recalibrate(trained, data)
    assert {int(m.num_batches_tracked) for _, m in bn_modules(trained)} == {100}
    fresh = zoo.resnet().eval()
    recalibrate(fresh, data)
    assert {int(m.num_batches_tracked) for _, m in bn_modules(fresh)} == {len(data)}


def test_a_folded_model_is_named_as_such_when_there_is_nothing_to_recalibrate():
    folded, _ = fold(zoo.build("resnet"), zoo.example_input("resnet"))
    with pytest.raises(InputError, match="bntool folded it"):
        recalibrate(folded, list(data_for("resnet").split(16)))


def test_prior_refuses_never_updated_source_statistics_and_names_the_parameter(cli, tmp_path):
    data = list(data_for("resnet", 16).split(8))
    fresh = zoo.resnet().eval()  # as constructed: num_batches_tracked 0, mean 0, variance 1 everywhere
    before = bn_stats(fresh)
    with pytest.raises(InputError, match="never updated") as e:
        recalibrate(fresh, data, prior=8)
    assert e.value.param == "prior" and e.value.render(lambda p: f"--{p}").startswith("--prior: the statistics of")
    assert rel_diff(bn_stats(fresh), before) == 0
    recalibrate(zoo.build("resnet"), data, prior=8)  # a trained model's statistics are a source
    with pytest.raises(InputError) as e:
        recalibrate(zoo.build("resnet"), data, prior=-1)
    assert e.value.param == "prior"
    torch.save(zoo.resnet().state_dict(), tmp_path / "fresh.pt")
    torch.save(torch.cat(data), tmp_path / "x.pt")
    r = cli("recalibrate", tmp_path / "fresh.pt", "--arch", "bntool.zoo:resnet", "--data", tmp_path / "x.pt",
            "--prior", "8", "-o", tmp_path / "out.pt")
    assert r.code == 2 and "error: --prior: the statistics of" in r.err and "never updated" in r.err, r.err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("budget", [float("inf"), float("nan"), -1, "4G", True])
def test_bad_cache_budgets_are_input_errors(budget):
    with pytest.raises(InputError, match="cache_budget") as e:
        recalibrate(zoo.build("resnet"), list(data_for("resnet", 8).split(4)), mode="exact", cache_budget=budget)
    assert e.value.param == "cache_budget"


@pytest.mark.parametrize("text", ["inf", "1e400", "4ib", "nan", "-1", "4 GX"])
def test_cli_cache_budget_accepts_sizes_only(cli, tmp_path, resnet_sd, text):
    torch.save(data_for("resnet", 8), tmp_path / "x.pt")
    r = cli("recalibrate", resnet_sd, "--arch", "bntool.zoo:resnet", "--data", tmp_path / "x.pt", "--mode", "exact",
            "--cache-budget", text, "-o", tmp_path / "out.pt")
    assert r.code == 2 and f"error: --cache-budget {text!r}" in r.err and "units" in r.err.replace("\n", " ") or (
        r.code == 2 and "too large" in r.err), r.err
    assert not (tmp_path / "out.pt").exists()


def test_cache_budget_sizes():
    from bntool.segments import parse_bytes

    assert [parse_bytes(t) for t in ("4G", "4GiB", "4gb", "512M", "100k", "0", "123", "1.5K", "2B")] == [
        4 << 30, 4 << 30, 4 << 30, 512 << 20, 100 << 10, 0, 123, 1536, 2]


def test_a_model_on_the_meta_device_is_an_input_error_in_every_api():
    from bntool import export_onnx, inspect, plan_fold, verify

    with torch.device("meta"):
        model = zoo.resnet()
    x = zoo.example_input("resnet")
    calls = [lambda: recalibrate(model, [x]), lambda: inspect(model), lambda: fold(model, x),
             lambda: plan_fold(model, x), lambda: export_onnx(model, x, "never.onnx"), lambda: verify(model, x)]
    for call in calls:
        with pytest.raises(InputError, match="meta device") as e:
            call()
        assert "load_state_dict" in str(e.value)
