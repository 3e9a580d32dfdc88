"""SyncBatchNorm subclasses (timm's SyncBatchNormAct: BN, then drop and activation around `super().forward`)
recalibrate like their plain twins, in one process and merged across processes (torchrun, gloo, 2 CPUs)."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from helpers import PYTHON
from torch import nn

from bntool.recalibration import recalibrate

SYNC_MODEL = '''
import torch
from torch import nn


class SyncBatchNormAct(nn.SyncBatchNorm):
    """As timm's: the BN of SyncBatchNorm.forward, then its own drop and activation."""

    def __init__(self, channels, sync=True):
        super().__init__(channels)
        self.drop, self.act = nn.Dropout(0.5), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class BatchNormAct(nn.BatchNorm2d):
    def __init__(self, channels):
        super().__init__(channels)
        self.drop, self.act = nn.Dropout(0.5), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def build(sync=True):
    torch.manual_seed(0)
    norm = SyncBatchNormAct if sync else BatchNormAct
    return nn.Sequential(nn.Conv2d(3, 6, 3), norm(6), nn.Conv2d(6, 6, 3), norm(6), nn.Conv2d(6, 4, 1), norm(4))


def plain():
    return build(sync=False)
'''


@pytest.fixture
def sync_arch(tmp_path, monkeypatch):
    (tmp_path / "syncnet.py").write_text(SYNC_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import syncnet

    return importlib.reload(syncnet)


def stats(model):
    return [(m.running_mean.double(), m.running_var.double()) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("mode", ["cumulative", "exact"])
def test_a_sync_bn_subclass_recalibrates_like_its_plain_twin_in_one_process(sync_arch, mode):
    data = [torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(i)) * 2 + 1 for i in range(3)]
    sync, plain = sync_arch.build().eval(), sync_arch.plain().eval()
    plain.load_state_dict(sync.state_dict())
    recalibrate(sync, data, mode=mode)
    recalibrate(plain, data, mode=mode)
    for (ms, vs), (mp, vp) in zip(stats(sync), stats(plain)):
        assert torch.allclose(ms, mp, atol=1e-6) and torch.allclose(vs, vp, rtol=1e-6)
    assert type(sync[1]).forward is sync_arch.SyncBatchNormAct.forward  # nothing left patched
    assert nn.SyncBatchNorm.forward.__qualname__ == "SyncBatchNorm.forward"


@pytest.mark.slow  # torchrun with two processes, like tests/test_distributed.py
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_a_sync_bn_subclass_merges_exactly_across_processes(tmp_path, sync_arch):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((24, 3, 10, 10)).astype(np.float32) + 1)
    sync = sync_arch.build()
    torch.save(sync.state_dict(), tmp_path / "sync.pt")
    common = ["--data", tmp_path / "x.npy", "-b", "4", "--mode", "exact", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bntool", "recalibrate", tmp_path / "sync.pt", "--arch", "syncnet:build", *common,
                          "-o", tmp_path / "two.pt"], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    one = subprocess.run([PYTHON, "-m", "bntool", "recalibrate", tmp_path / "sync.pt", "--arch", "syncnet:plain",
                          *common, "-o", tmp_path / "one.pt"], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for k in a:
        if k.endswith("running_var"):
            assert torch.allclose(a[k], b[k], rtol=1e-5), k
        elif k.endswith("running_mean"):
            assert torch.allclose(a[k], b[k], atol=1e-5), k
