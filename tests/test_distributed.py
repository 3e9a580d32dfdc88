"""torchrun with the gloo backend, 2 CPU processes: merged statistics equal a single-process run."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import PYTHON

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable"),
              pytest.mark.slow]  # each test starts torchrun processes


def torchrun(*args, env_extra=None, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "bntool", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def single(*args):
    return subprocess.run([PYTHON, "-m", "bntool", *[str(a) for a in args]], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def calib(tmp_path):
    g = np.random.default_rng(0)
    # Per-sample brightness/contrast: batch composition matters for train-mode (cumulative) recalibration.
    x = g.standard_normal((45, 3, 32, 32)) * g.uniform(0.5, 2, (45, 1, 1, 1)) + g.normal(0, 1, (45, 1, 1, 1))
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    return tmp_path / "x.npy"


@pytest.mark.parametrize("mode", ["cumulative", "exact"])
def test_two_processes_equal_one(tmp_path, resnet_sd, calib, mode):
    common = [resnet_sd, "--arch", "bntool.zoo:resnet", "--data", calib, "-b", "4", "--mode", mode, "--quiet"]
    one = single("recalibrate", *common, "-o", tmp_path / "one.pt")
    assert one.returncode == 0, one.stderr
    two = torchrun("recalibrate", *common, "-o", tmp_path / "two.pt")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in a:
        if k.endswith("running_mean"):
            scale = a[k.replace("mean", "var")].double().sqrt()
            assert ((a[k].double() - b[k].double()).abs() / scale).max() < 1e-6, k
        elif k.endswith("running_var"):
            assert ((a[k].double() - b[k].double()).abs() / a[k].double()).max() < 1e-6, k


def test_failure_on_one_rank_stops_all_and_writes_nothing(tmp_path, resnet_sd):
    (tmp_path / "flaky_loader.py").write_text(
        "import os, torch\n"
        "def batches():\n"
        "    for i in range(4):\n"
        "        if os.environ.get('RANK') == '1' and i == 2:\n"
        "            raise OSError('disk read failed on shard 1')\n"
        "        yield torch.randn(4, 3, 32, 32)\n")
    out = tmp_path / "out.pt"
    result = torchrun("recalibrate", resnet_sd, "--arch", "bntool.zoo:resnet", "--loader", "flaky_loader:batches",
                      "-o", out, env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert result.returncode != 0
    assert "disk read failed on shard 1" in result.stderr
    assert "rank 1 failed" in result.stderr  # rank 0 says which rank broke
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 2 and "internal error" not in result.stderr  # one line per rank; torchrun adds its own
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.pt")]


def test_api_with_an_initialized_group_merges_exactly(tmp_path):
    """The library call inside the user's own process group (spawned here with gloo)."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from bntool import zoo\n"
        "from bntool.recalibration import recalibrate\n"
        "dist.init_process_group('gloo')\n"
        "r, w = dist.get_rank(), dist.get_world_size()\n"
        "data = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 1\n"
        "model = zoo.build('resnet')\n"
        "report = recalibrate(model, list(data.split(4))[r::w], mode='exact')\n"
        "if r == 0:\n"
        "    torch.save(model.state_dict(), sys.argv[1])\n"
        "    print('samples', report.samples, 'world', report.world_size)\n"
        "dist.barrier()\n"
        "dist.destroy_process_group()\n")  # as a well-behaved script ends; exiting with gloo up can abort
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "two.pt")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samples 24 world 2" in out.stdout
    from bntool import zoo
    from bntool.recalibration import recalibrate

    data = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 1
    model = zoo.build("resnet")
    recalibrate(model, list(data.split(4)), mode="exact")
    two = torch.load(tmp_path / "two.pt")
    for k, v in model.state_dict().items():
        if "running" in k:
            assert torch.allclose(v.double(), two[k].double(), rtol=1e-6, atol=1e-7), k
