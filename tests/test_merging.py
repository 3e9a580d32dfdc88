"""Merging summed linear branches after folding (bntool.merging): exact against a float64 reference, on random
branch configurations, on the zoo's ACNet and DBB blocks, and the sums that must stay as they are."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bntool import zoo
from bntool.checkpoint import load_model, state_dict_of
from bntool.folding import fold
from bntool.layout import FoldLayout

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def reference64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(x.double())


def layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in model.modules())


def randomized(model: nn.Module, seed: int) -> nn.Module:
    zoo.randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


class Branches(nn.Module):
    """Σ branches(x), then ReLU: the re-parameterisable block, built from a list of branch modules."""

    def __init__(self, branches: list[nn.Module], identity: nn.Module | None = None):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity

    def forward(self, x):
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


class Net(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def conv_bn(dims, cin, cout, k, stride, groups, bias, padding=None):
    k = k if isinstance(k, tuple) else (k,) * dims
    padding = tuple(kk // 2 for kk in k) if padding is None else padding
    return nn.Sequential(CONV[dims](cin, cout, k, stride, padding, groups=groups, bias=bias), BN[dims](cout))


@st.composite
def block_configs(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    channels = draw(st.sampled_from([4, 6]))
    groups = draw(st.sampled_from([1, 2, channels]))
    stride = draw(st.sampled_from([1, 2]))
    k = draw(st.sampled_from([3, 5]))
    choices = ["1x1", "asym", "avg", "1x1-kxk"] + (["identity"] if stride == 1 else [])
    kinds = draw(st.lists(st.sampled_from(choices), min_size=1, max_size=3, unique=True))
    return dims, channels, groups, stride, k, kinds, draw(st.booleans()), draw(st.integers(0, 2**16))


def build_block(dims, channels, groups, stride, k, kinds, bias):
    c = channels
    branches = [conv_bn(dims, c, c, k, stride, groups, bias)]
    for kind in kinds:
        if kind == "1x1":
            branches.append(conv_bn(dims, c, c, 1, stride, groups, bias))
        elif kind == "asym":  # 1×k (ACNet): aligned with the k×k centre
            branches.append(conv_bn(dims, c, c, (1,) * (dims - 1) + (k,), stride, groups, bias))
        elif kind == "avg":  # 1×1 conv without bias, average pool counting padded zeros, BN (DBB)
            branches.append(nn.Sequential(CONV[dims](c, c, 1, groups=groups, bias=False),
                                          POOL[dims](3, stride, 1), BN[dims](c)))
        elif kind == "1x1-kxk":  # 1×1 conv without bias feeding a k×k conv (DBB)
            branches.append(nn.Sequential(CONV[dims](c, c, 1, groups=groups, bias=False),
                                          *conv_bn(dims, c, c, k, stride, groups, bias)))
    return Branches(branches, BN[dims](c) if "identity" in kinds else None)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_configs())
def test_random_branches_merge_exactly(config):
    dims, channels, groups, stride, k, kinds, bias, seed = config
    torch.manual_seed(seed)
    model = randomized(Net(build_block(dims, channels, groups, stride, k, kinds, bias)), seed)
    x = torch.randn(2, channels, *[6] * dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # In float64 the merge's math is free of float32 rounding: merged equals the branches to 1e-10.
    folded, report = fold(copy.deepcopy(model).double(), x)
    assert [d.merged for d in report.merges] == [True], report.merges
    assert layers(folded) == 1  # every branch in one conv
    assert folded.block.reparam.groups % groups == 0  # depthwise stays depthwise
    ref = reference64(model, x)
    with torch.no_grad():
        assert (folded(x) - ref).abs().max() <= 1e-10 * ref.abs().max().clamp(min=1)


class TwoLinear(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(n, n), nn.BatchNorm1d(n))
        self.b = nn.Linear(n, n, bias=False)
        self.identity = nn.BatchNorm1d(n)

    def forward(self, x):
        return self.a(x) + self.b(x) - self.identity(x)


def test_linear_branches_merge_into_one_linear():
    model = randomized(Net(TwoLinear()), 1)
    x = torch.randn(5, 6)
    folded, report = fold(model, x)
    assert report.merges[0].merged and isinstance(folded.block.reparam, nn.Linear)
    assert layers(folded) == 1
    folded64, _ = fold(copy.deepcopy(model).double(), x.double())
    ref = reference64(model, x)
    assert (folded64(x.double()) - ref).abs().max() <= 1e-10 * ref.abs().max()


class ReadTwice(nn.Module):
    """The 1×1 branch's output is also returned: it cannot disappear into the sum."""

    def __init__(self, c=4):
        super().__init__()
        self.kxk, self.one = conv_bn(2, c, c, 3, 1, 1, False), conv_bn(2, c, c, 1, 1, 1, False)

    def forward(self, x):
        one = self.one(x)
        return self.kxk(x) + one, one


def not_merged(block: nn.Module, shape=(2, 4, 8, 8)) -> str:
    model = randomized(Net(block), 3)
    x = torch.randn(shape)
    folded, report = fold(model, x)
    assert report.passed
    assert not any(d.merged for d in report.merges)
    return " ".join(d.reason + " ".join(d.left_out) for d in report.merges)


@pytest.mark.parametrize("block, reason", [
    (Branches([conv_bn(2, 4, 4, 3, 1, 1, False), nn.Sequential(*conv_bn(2, 4, 4, 1, 1, 1, False), nn.ReLU())]),
     "nonlinearity"),
    (Branches([conv_bn(2, 4, 4, 5, 1, 1, False, padding=0), conv_bn(2, 4, 4, 1, 2, 1, False, padding=0)]),
     "different strides"),
    (Branches([conv_bn(2, 4, 4, 3, 1, 1, False), nn.Sequential(
        nn.Conv2d(4, 4, 3, 1, 1, bias=False, padding_mode="reflect"), nn.BatchNorm2d(4))]), "padding modes differ"),
    (Branches([conv_bn(2, 4, 4, 3, 1, 1, False), nn.Sequential(  # the 1×1's bias would meet the 3×3's zero padding
        nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, 1, 1))]), "border"),
    (Branches([conv_bn(2, 4, 4, 3, 2, 1, False), conv_bn(2, 4, 4, 2, 2, 1, False, padding=0)]),  # same size, shifted
     "not aligned"),
    (ReadTwice(), "also read elsewhere"),
])
def test_sums_that_must_not_merge_say_why(block, reason):
    assert reason in not_merged(block)


@pytest.mark.parametrize("name, before, after", [("acnet", 11, 5), ("dbb", 17, 5)])
def test_acnet_and_dbb_blocks_merge_to_one_conv_each(name, before, after, tmp_path):
    model, x = zoo.build(name), zoo.example_input(name)
    folded, report = fold(model, x)
    assert (layers(model), layers(folded)) == (before, after)
    assert all(d.merged for d in report.merges) and len(report.merges) == 3
    ref = reference64(model, x)
    with torch.no_grad():
        out = folded(x)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # save → load_model from --arch: the same merged structure, the same outputs
    torch.save(state_dict_of(folded), tmp_path / "f.pt")
    loaded = load_model(tmp_path / "f.pt", arch=f"bntool.zoo:{name}")
    assert layers(loaded) == after
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_no_merge_keeps_the_branches():
    model, x = zoo.build("acnet"), zoo.example_input("acnet")
    folded, report = fold(model, x, merge=False)
    assert layers(folded) == 11 and report.merges == [] and report.layout.merges == []


def test_merged_model_scripts_traces_and_exports(tmp_path):
    model, x = zoo.build("dbb"), zoo.example_input("dbb")
    folded, _ = fold(model, x)
    with torch.no_grad():
        expected = folded(x)
        assert torch.allclose(torch.jit.script(folded)(x), expected, atol=1e-6)
        assert torch.allclose(torch.jit.trace(folded, (x,))(x), expected, atol=1e-6)
    import onnxruntime as ort

    torch.onnx.export(folded, (x,), tmp_path / "m.onnx", input_names=["x"], dynamo=False)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x.numpy()})[0]
    assert abs(got - expected.numpy()).max() <= 1e-5 * float(expected.abs().max())


def test_corrupt_merge_record_is_an_input_error():
    from bntool.errors import InputError

    with pytest.raises(InputError, match="branch-merge record"):
        FoldLayout.from_dict({"merges": ["{not json"]})
    layout = FoldLayout(merges=['{"module": "blocks.9", "root": "add", "input": "x", "terms": ["a"], '
                                '"name": "reparam", "layer": {"kind": "Conv2d"}}'])
    with pytest.raises(InputError, match="does not have"):
        layout.apply(zoo.acnet())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0"])
def test_timm_reparameterisable_models_merge_like_timm(name):
    from test_arch import timm_or_skip

    timm = timm_or_skip()  # imported as bntool imports it
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = zoo.randomize_bn(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 32, 32)
    folded, report = fold(model, x)
    assert report.passed
    assert layers(folded) <= layers(reparameterize_model(copy.deepcopy(model)))


def test_cli_lists_merges_and_no_merge_keeps_branches(cli, tmp_path):
    import json

    torch.save(zoo.build("acnet").state_dict(), tmp_path / "m.pt")
    args = ["fold", tmp_path / "m.pt", "--arch", "bntool.zoo:acnet", "--input-shape", "2,3,32,32", "--samples", "0"]
    shown = cli(*args, "-o", tmp_path / "f.pt")
    assert shown.code == 0 and "blocks.0: square, hor, ver → reparam" in shown.out
    merged = json.loads(cli(*args, "-o", tmp_path / "g.pt", "--json").out)
    assert [m["merged"] for m in merged["merges"]] == [True] * 3
    kept = json.loads(cli(*args, "-o", tmp_path / "n.pt", "--json", "--no-merge").out)
    assert kept["merges"] == [] and kept["layout"]["merges"] == []
    assert layers(load_model(tmp_path / "n.pt", arch="bntool.zoo:acnet")) == 11
    assert layers(load_model(tmp_path / "g.pt", arch="bntool.zoo:acnet")) == 5


class Summed(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.kxk, self.one = conv_bn(2, c, c, 3, 1, c, False), conv_bn(2, c, c, 1, 1, c, False)

    def forward(self, x):
        return self.kxk(x) + self.one(x)


class LayerScale(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, c))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class RepMixer(nn.Module):
    """FastViT's token mixer: x + γ·(mixer(x) − norm(x)), its mixer itself a sum of branches."""

    def __init__(self, c=4):
        super().__init__()
        self.mixer, self.norm, self.layer_scale = Summed(c), nn.BatchNorm2d(c), LayerScale(c)

    def forward(self, x):
        return x + self.layer_scale(self.mixer(x) - self.norm(x))


def test_nested_sums_and_a_per_channel_scale_merge_into_one_conv():
    model = randomized(Net(RepMixer()), 4)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    folded, report = fold(copy.deepcopy(model).double(), x)
    assert [d.merged for d in report.merges] == [True] * 3 and layers(folded) == 1  # mixer, mixer − norm, x + γ·…
    assert next(m for m in folded.modules() if isinstance(m, nn.Conv2d)).groups == 4  # still depthwise
    ref = reference64(model, x)
    with torch.no_grad():
        assert (folded(x) - ref).abs().max() <= 1e-10 * ref.abs().max()
