"""#19: a depthwise 1×1 conv with a BN folded in becomes a DepthwiseAffine (x·w + b), which PyTorch runs far faster
at small batches than its per-channel conv path; the numbers, the saved file and script/trace/export unchanged."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

import bntool
from bntool.checkpoint import Checkpoint, save_checkpoint
from bntool.folding import apply_fold_plan, fold, plan_fold
from bntool.layers import DepthwiseAffine
from bntool.zoo import randomize_bn

NET_SOURCE = '''
import torch
from torch import nn


class DepthwiseNet(nn.Module):
    """Depthwise 1×1 convs + BN: plain, shared (called twice), hooked, strided, padded, in 1D and 3D."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 1, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 1, groups=8)
        self.bn_shared = nn.BatchNorm2d(8)
        self.strided = nn.Conv2d(8, 8, 1, stride=2, groups=8)
        self.bn_strided = nn.BatchNorm2d(8)
        self.padded = nn.Conv2d(8, 8, 1, padding=1, groups=8)
        self.bn_padded = nn.BatchNorm2d(8)
        self.dw1d = nn.Conv1d(8, 8, 1, groups=8)
        self.bn1d = nn.BatchNorm1d(8)
        self.dw3d = nn.Conv3d(8, 8, 1, groups=8, padding="valid")
        self.bn3d = nn.BatchNorm3d(8)

    def forward(self, x):
        x = torch.relu(self.bn(self.dw(self.stem(x))))
        x = self.bn_shared(self.shared(x))
        x = torch.relu(x) + self.shared(x)  # the shared conv's second call: its BN folds only where exact
        y = self.bn_strided(self.strided(x))
        z = self.bn_padded(self.padded(y))
        n, c, h, w = z.shape
        s = self.bn1d(self.dw1d(z.flatten(2))).view(n, c, h, w)
        return self.bn3d(self.dw3d(s.unsqueeze(2))).squeeze(2)
'''


def build(tmp_path, monkeypatch) -> nn.Module:
    (tmp_path / "dwnet.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import dwnet

    torch.manual_seed(0)
    return randomize_bn(dwnet.DepthwiseNet()).eval()


def plain_fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The fold without the replacement: the plan applied as it is."""
    folded = copy.deepcopy(model)
    apply_fold_plan(folded, plan_fold(folded, x))
    return folded


def test_depthwise_1x1_convs_with_a_folded_bn_become_exact_affines(tmp_path, monkeypatch):
    model = build(tmp_path, monkeypatch)
    x = torch.randn(1, 3, 12, 12)
    folded, report = fold(model, x, merge=False)
    replaced = {n for n, m in folded.named_modules() if isinstance(m, DepthwiseAffine)}
    assert replaced == {"dw", "dw1d", "dw3d"} == set(report.layout.depthwise_affine)
    assert type(folded.strided) is nn.Conv2d and type(folded.padded) is nn.Conv2d  # stride 2, zero padding: kept
    with torch.no_grad():
        got, plain = folded(x), plain_fold(model, x)(x)
        reference = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6 * float(plain.abs().max()))
    floor = float((plain.double() - reference).abs().max())
    assert float((got.double() - reference).abs().max()) <= floor * 1.01 + 1e-7


def test_a_hooked_depthwise_conv_is_kept(tmp_path, monkeypatch):
    model = build(tmp_path, monkeypatch)
    calls = []
    model.dw.register_forward_hook(lambda *args: calls.append(1))
    folded, _ = fold(model, torch.randn(1, 3, 8, 8), merge=False)
    assert type(folded.dw) is nn.Conv2d and isinstance(folded.dw1d, DepthwiseAffine)


def test_the_folded_file_loads_scripts_traces_and_exports(tmp_path, monkeypatch):
    model = build(tmp_path, monkeypatch)
    x = torch.randn(1, 3, 12, 12)
    folded, _ = fold(model, x, merge=False)
    src, out = tmp_path / "model.pt", tmp_path / "folded.pt"
    torch.save(model.state_dict(), src)
    save_checkpoint(Checkpoint(model=model, kind="state_dict", path=src), folded, out)
    loaded = bntool.load_model(out, arch="dwnet:DepthwiseNet")
    assert isinstance(loaded.dw, DepthwiseAffine)
    with torch.no_grad():
        expected = folded(x)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(torch.jit.script(loaded)(x), expected)
        assert torch.equal(torch.jit.trace(loaded, x)(x), expected)
    torch.onnx.export(loaded, (x,), io.BytesIO(), dynamo=False)


def test_unbatched_input_broadcasts_over_the_channel_axis():
    conv = nn.Conv2d(4, 4, 1, groups=4)
    affine = DepthwiseAffine(conv.weight.detach().flatten(), conv.bias.detach(), 2)
    x = torch.randn(4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(affine(x), conv(x), rtol=1e-6, atol=1e-6)
